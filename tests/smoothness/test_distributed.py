"""group=: two gloo ranks on CPU, each with its own shard of chunks, return what one process returns on the union."""
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import smoothness as sm

WORLD = 2


def setup():
    """A float64 BatchNorm MLP with non-trivial running statistics, and three chunks (5, 3 and 6 samples)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model(2 + torch.randn(16, 5, generator=g, dtype=torch.float64))  # running stats move off 0 / 1
    model.eval()
    chunks = [(torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
              for n in (5, 3, 6)]
    return model, nn.CrossEntropyLoss(), chunks


SHARDS = [[0, 1], [2]]  # rank 0 holds 8 samples, rank 1 holds 6


def estimates(model, loss_fn, data, group=None):
    out, products = {}, []
    for kind, bn_mode in (("hessian", "batch"), ("ggn", "batch"), ("empirical-fisher", "running")):
        eig = sm.top_eigenvalues(model, loss_fn, data, k=1, tol=1e-8, bn_mode=bn_mode, kind=kind, group=group)
        trace = sm.hessian_trace(model, loss_fn, data, n_probes=2, bn_mode=bn_mode, kind=kind, group=group)
        out[kind] = (eig.values, eig.batch_size, trace.mean, trace.stderr, trace.batch_size)
        products += [eig.product, trace.product]
    conc = sm.gradient_concentration(model, loss_fn, data, k=1, tol=1e-6, params=["3.weight", "3.bias"],
                                     group=group)
    out["concentration"] = (conc.fraction, conc.loss, conc.grad_norm, conc.eigenvalues)
    density = sm.spectral_density(model, loss_fn, data, n_probes=1, n_steps=4, kind="ggn", group=group)
    out["density"] = (density.nodes, density.weights)
    out["products"] = products + [density.product]
    return out


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model, loss_fn, chunks = setup()
        shard = [chunks[i] for i in SHARDS[rank]]
        torch.save(estimates(model, loss_fn, shard, group=dist.group.WORLD), f"{out_dir}/rank{rank}.pt")
        dist.barrier()   # both ranks are done before either tears gloo down (else: "terminate called", SIGABRT)
    finally:
        dist.destroy_process_group()


def close(a, b):
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    if isinstance(a, int):
        return a == b
    return abs(a - b) <= 1e-10 * max(1.0, abs(b))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_ranks_equal_one_process_on_the_union(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    model, loss_fn, chunks = setup()
    expected = estimates(model, loss_fn, chunks)
    assert expected["hessian"][1] == 14
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    products = expected.pop("products")   # recorded: chunked products, combined over the ranks
    assert products == ["double-backward per chunk"] * 2 + ["jvp + vjp per chunk"] * 2 + \
        ["per-sample gradients per chunk"] * 2 + ["jvp + vjp per chunk"]
    for got in ranks:   # rank 1's shard is one chunk: its local products are one batch's
        local = [p.replace(" per chunk", "") for p in products]
        assert [p.replace(" per chunk", "") for p in got.pop("products")] == [f"{p}, all-reduced" for p in local]
    for key, value in expected.items():
        for rank, got in enumerate(ranks):
            assert close(got[key], value), (key, rank, got[key], value)
    assert ranks[0] == ranks[1]  # every rank took the same products: bit for bit the same results
    np.testing.assert_array_less(-1e-12, np.concatenate([np.asarray(x) for x in expected["density"][0]]))


def test_group_must_be_initialised():
    model, loss_fn, chunks = setup()
    with pytest.raises(ValueError, match="init_process_group"):
        sm.hessian_trace(model, loss_fn, chunks, n_probes=2, group=object())
