"""Curvature over an iterable of batches: every estimator, exact against the concatenated batch without BatchNorm,
against the sample-weighted per-chunk combination with BatchNorm in batch mode; memory of one chunk; clear errors."""
import weakref

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import smoothness as sm

DT = torch.float64
SIZES = (5, 4, 3)   # unequal on purpose: the weights are n_c / N, not 1 / (number of chunks)


def plain_mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).to(DT)
    model.input_shape = (6,)
    return model


def split(batch, sizes=SIZES):
    x, y = batch
    out, i = [], 0
    for n in sizes:
        out.append((x[i:i + n], y[i:i + n]))
        i += n
    assert i == len(x)
    return out


def flat(model, d):
    return torch.cat([d[n].reshape(-1) for n, p in model.named_parameters() if p.requires_grad])


# -- no coupling between samples: chunks == the concatenated batch --------------------------------------------------
@pytest.fixture(params=["plain-batch", "bn-running"])
def uncoupled(request, ref):
    """Models whose loss is a mean of per-sample losses: no BatchNorm, or BatchNorm with running statistics."""
    if request.param == "plain-batch":
        model, bn_mode = plain_mlp(), "batch"
    else:
        model, bn_mode = ref.make_model("mlp"), "running"
    return model, nn.CrossEntropyLoss(), ref.make_batch(model, n=sum(SIZES)), bn_mode


@pytest.mark.parametrize("container", ["list", "tuple", "dataloader"])
def test_hvp_over_chunks_equals_the_concatenated_batch(ref, uncoupled, container):
    model, loss_fn, batch, bn_mode = uncoupled
    chunks = split(batch)
    if container == "tuple":
        chunks = tuple(chunks)
    elif container == "dataloader":
        chunks = DataLoader(TensorDataset(*batch), batch_size=4, shuffle=False)  # chunks of 4, 4, 4
    for seed in range(2):
        v = ref.random_direction(model, seed)
        expected = flat(model, sm.hvp(model, loss_fn, batch, v, bn_mode=bn_mode))
        before = ref.snapshot(model)
        got = flat(model, sm.hvp(model, loss_fn, chunks, v, bn_mode=bn_mode))
        ref.assert_same_snapshot(before, model)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)


def test_every_estimator_over_chunks_equals_the_concatenated_batch(ref, uncoupled):
    model, loss_fn, batch, bn_mode = uncoupled
    chunks = split(batch)
    d = ref.random_direction(model, 5)
    before = ref.snapshot(model)

    top_one = sm.top_eigenvalues(model, loss_fn, batch, k=2, tol=1e-10, bn_mode=bn_mode)
    top_many = sm.top_eigenvalues(model, loss_fn, chunks, k=2, tol=1e-10, bn_mode=bn_mode)
    np.testing.assert_allclose(top_many.values, top_one.values, rtol=1e-9)
    assert top_many.batch_size == top_one.batch_size == sum(SIZES)

    trace_one = sm.hessian_trace(model, loss_fn, batch, n_probes=6, bn_mode=bn_mode)
    trace_many = sm.hessian_trace(model, loss_fn, chunks, n_probes=6, bn_mode=bn_mode)
    assert trace_many.mean == pytest.approx(trace_one.mean, rel=1e-10)
    assert trace_many.n_hvp == 6 and trace_many.batch_size == sum(SIZES)

    assert sm.directional_curvature(model, loss_fn, chunks, d, bn_mode=bn_mode).value == pytest.approx(
        sm.directional_curvature(model, loss_fn, batch, d, bn_mode=bn_mode).value, rel=1e-10)

    dens_one = sm.spectral_density(model, loss_fn, batch, n_probes=2, n_steps=12, bn_mode=bn_mode)
    dens_many = sm.spectral_density(model, loss_fn, chunks, n_probes=2, n_steps=12, bn_mode=bn_mode)
    for a, b in zip(dens_one.nodes + dens_one.weights, dens_many.nodes + dens_many.weights):
        np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-11)
    assert dens_many.batch_size == sum(SIZES)

    conc_one = sm.gradient_concentration(model, loss_fn, batch, 2, bn_mode=bn_mode)
    conc_many = sm.gradient_concentration(model, loss_fn, chunks, 2, bn_mode=bn_mode)
    assert conc_many.fraction == pytest.approx(conc_one.fraction, abs=1e-8)
    assert conc_many.grad_norm == pytest.approx(conc_one.grad_norm, rel=1e-10)
    assert conc_many.loss == pytest.approx(conc_one.loss, rel=1e-12)
    ref.assert_same_snapshot(before, model)


def test_dense_hessian_of_chunks(ref, uncoupled):
    """The operator over chunks is the dense Hessian of the whole batch, column by column (float64)."""
    model, loss_fn, batch, bn_mode = uncoupled
    h = ref.dense_hessian(model, loss_fn, batch, bn_mode)
    for i in (0, 7, h.shape[0] - 1):
        e = torch.zeros(h.shape[0], dtype=DT)
        e[i] = 1.0
        got = flat(model, sm.hvp(model, loss_fn, split(batch), ref.unflatten(model, e), bn_mode=bn_mode))
        torch.testing.assert_close(got, h[:, i], rtol=1e-9, atol=1e-12)


# -- BatchNorm in batch mode: each chunk its own statistics ---------------------------------------------------------
def test_bn_batch_mode_is_the_weighted_combination_of_chunk_products(ref):
    """L = Σ n_c/N · L(w; B_c) with each chunk normalised by its own batch statistics: the product is the weighted
    sum of per-chunk products, and it differs from the concatenated batch's (whose statistics cover all samples)."""
    for kind in ("mlp", "conv"):
        model = ref.make_model(kind)
        loss_fn = nn.CrossEntropyLoss()
        batch = ref.make_batch(model, n=sum(SIZES))
        chunks = split(batch)
        v = ref.random_direction(model, 2)
        expected = sum(n / sum(SIZES) * flat(model, sm.hvp(model, loss_fn, c, v, bn_mode="batch"))
                       for n, c in zip(SIZES, chunks))
        got = flat(model, sm.hvp(model, loss_fn, chunks, v, bn_mode="batch"))
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)
        whole = flat(model, sm.hvp(model, loss_fn, batch, v, bn_mode="batch"))
        assert ref.rel_err(got, whole) > 1e-2, "BN couples samples: chunking must change the batch-mode loss"
        dense = sum(n / sum(SIZES) * ref.dense_hessian(model, loss_fn, c, "batch") for n, c in zip(SIZES, chunks))
        top = sm.top_eigenvalues(model, loss_fn, chunks, k=1, tol=1e-10, bn_mode="batch")
        assert top.values[0] == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-8)


def test_one_chunk_is_the_single_batch_bit_for_bit(ref):
    model = ref.make_model("conv")
    batch = ref.make_batch(model, n=12)
    v = ref.random_direction(model, 1)
    a = sm.hvp(model, nn.CrossEntropyLoss(), batch, v)
    b = sm.hvp(model, nn.CrossEntropyLoss(), [batch], v)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert sm.top_eigenvalues(model, nn.CrossEntropyLoss(), [batch], k=1) == \
        sm.top_eigenvalues(model, nn.CrossEntropyLoss(), batch, k=1)


@pytest.mark.parametrize("bn_mode", sm.BN_MODES)
def test_model_restored_bit_for_bit(ref, bn_mode):
    model = ref.make_model("conv")
    model.eval()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    chunks = split(ref.make_batch(model, n=12))
    before = ref.snapshot(model)
    d = ref.random_direction(model, 3)
    sm.hvp(model, nn.CrossEntropyLoss(), chunks, d, bn_mode=bn_mode)
    sm.top_eigenvalues(model, nn.CrossEntropyLoss(), chunks, k=2, bn_mode=bn_mode)
    sm.hessian_trace(model, nn.CrossEntropyLoss(), chunks, n_probes=3, bn_mode=bn_mode)
    sm.directional_curvature(model, nn.CrossEntropyLoss(), chunks, d, bn_mode=bn_mode)
    sm.spectral_density(model, nn.CrossEntropyLoss(), chunks, n_probes=1, n_steps=4, bn_mode=bn_mode)
    sm.gradient_concentration(model, nn.CrossEntropyLoss(), chunks, 2, bn_mode=bn_mode)
    ref.assert_same_snapshot(before, model)


# -- memory: one chunk's graph at a time ----------------------------------------------------------------------------
class SavedBytes:
    """Bytes of the tensors autograd graphs hold alive (``saved_tensors_hooks``), and their peak.

    The holder keeps a detached alias: holding the tensor itself would close a reference cycle through C++ (node ->
    saved variable -> holder -> tensor -> node) that keeps dead graphs alive for ever. Autograd rebuilds the
    unpacked tensor's history from the saved variable, so double backward is unaffected (checked below).
    """

    class _Holder:
        def __init__(self, tensor):
            self.tensor = tensor

    def __init__(self):
        self.live = self.peak = 0

    def _free(self, n):
        self.live -= n

    def pack(self, tensor):
        holder = self._Holder(tensor.detach())
        n = tensor.numel() * tensor.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(holder, self._free, n)
        return holder

    @staticmethod
    def unpack(holder):
        return holder.tensor

    def measure(self, fn):
        self.live = self.peak = 0
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            fn()
        return self.peak


@pytest.mark.parametrize("estimator", ["hvp", "top_eigenvalues"])
def test_graph_memory_does_not_grow_with_the_number_of_chunks(ref, estimator):
    """Peak bytes held by autograd graphs: 8 chunks of 16 cost what 1 chunk of 16 costs, while one batch of 128
    costs about 8 times as much (so the measure does see batch size)."""
    model = ref.make_model("conv")
    loss_fn = nn.CrossEntropyLoss()
    batch = ref.make_batch(model, n=128, seed=4)
    v = ref.random_direction(model, 1)

    def run(data):
        if estimator == "hvp":
            return lambda: sm.hvp(model, loss_fn, data, v)
        return lambda: sm.top_eigenvalues(model, loss_fn, data, k=1, max_iter=4)

    meter = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        hv = sm.hvp(model, loss_fn, batch, v)
    assert all(torch.equal(hv[n], t) for n, t in sm.hvp(model, loss_fn, batch, v).items()), "the meter changed H·v"
    one_chunk = meter.measure(run(split(batch, (16, 112))[:1]))
    eight_chunks = meter.measure(run(split(batch, (16,) * 8)))
    one_batch = meter.measure(run(batch))
    assert one_chunk > 0
    assert eight_chunks <= 1.05 * one_chunk, (eight_chunks, one_chunk)
    assert one_batch >= 5 * one_chunk, (one_batch, one_chunk)
    assert meter.live == 0, "every graph is freed when the estimator returns"


# -- bad input ------------------------------------------------------------------------------------------------------
ESTIMATORS = ["hvp", "top_eigenvalues", "hessian_trace", "directional_curvature", "spectral_density",
              "gradient_concentration"]


def call(name, model, data):
    loss_fn = nn.CrossEntropyLoss()
    d = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    if name == "hvp":
        return sm.hvp(model, loss_fn, data, d)
    if name == "top_eigenvalues":
        return sm.top_eigenvalues(model, loss_fn, data, k=1, max_iter=3)
    if name == "hessian_trace":
        return sm.hessian_trace(model, loss_fn, data, n_probes=2)
    if name == "directional_curvature":
        return sm.directional_curvature(model, loss_fn, data, d)
    if name == "spectral_density":
        return sm.spectral_density(model, loss_fn, data, n_probes=1, n_steps=2)
    return sm.gradient_concentration(model, loss_fn, data, 1, max_iter=3)


@pytest.fixture
def mlp_chunks(ref):
    model = plain_mlp()
    return model, split(ref.make_batch(model, n=12))


@pytest.mark.parametrize("name", ESTIMATORS)
def test_empty_iterable(mlp_chunks, name):
    model, _ = mlp_chunks
    for empty in ([], (), DataLoader(TensorDataset(torch.zeros(0, 6, dtype=DT), torch.zeros(0).long()),
                                     batch_size=4)):
        with pytest.raises(ValueError, match="iterable of batches is empty"):
            call(name, model, empty)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_one_shot_iterator(mlp_chunks, name):
    model, chunks = mlp_chunks
    with pytest.raises(TypeError, match="one-shot iterator.*list or a DataLoader"):
        call(name, model, (c for c in chunks))


@pytest.mark.parametrize("name", ESTIMATORS)
def test_mismatched_chunks(mlp_chunks, name):
    model, chunks = mlp_chunks
    (x0, y0), (x1, y1), (x2, y2) = chunks
    with pytest.raises(ValueError, match="chunk 1 of the batches has inputs of shape \\(4, 7\\)"):
        call(name, model, [(x0, y0), (torch.zeros(4, 7, dtype=DT), y1), (x2, y2)])
    with pytest.raises(ValueError, match="chunk 2 of the batches: inputs and targets differ in length"):
        call(name, model, [(x0, y0), (x1, y1), (x2, y2[:2])])
    with pytest.raises(ValueError, match="chunk 1 of the batches: the batch is empty"):
        call(name, model, [(x0, y0), (x1[:0], y1[:0])])
    with pytest.raises(TypeError, match="chunk 1 of the batches: batch must be a pair"):
        call(name, model, [(x0, y0), x1])
    with pytest.raises(TypeError, match="chunk 1 of the batches: batch must hold two tensors"):
        call(name, model, [(x0, y0), (x1.tolist(), y1)])


def _mismatched(chunks):
    """Chunk 2 unlike chunk 0 in one way each: inputs' per-sample shape, inputs' dtype, targets' dtype (a last chunk
    that is merely smaller is fine, see SIZES)."""
    (x0, y0), (x1, y1), (x2, y2) = chunks
    return [
        ("inputs of shape (3, 2, 3) and dtype torch.float64, but chunk 0 has inputs of shape (5, 6)",
         [(x0, y0), (x1, y1), (x2.reshape(3, 2, 3), y2)]),
        ("inputs of shape (3, 6) and dtype torch.float32, but chunk 0 has inputs of shape (5, 6) and dtype "
         "torch.float64", [(x0, y0), (x1, y1), (x2.float(), y2)]),
        ("targets of shape (3,) and dtype torch.int32, but chunk 0 has targets of shape (5,) and dtype torch.int64",
         [(x0, y0), (x1, y1), (x2, y2.int())]),
    ]


@pytest.mark.parametrize("name", ESTIMATORS + ["loss_surface", "interpolation"])
def test_chunks_of_another_shape_or_dtype_name_the_chunk(mlp_chunks, name):
    """Before: loss_surface and interpolation ran such chunks into the model (a raw torch RuntimeError),
    and every estimator did so for a dtype that differs."""
    model, chunks = mlp_chunks
    d = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    w = {n: p.detach() for n, p in model.named_parameters()}
    for what, data in _mismatched(chunks):
        expected = "chunk 2 of the batches has " + what
        with pytest.raises(ValueError) as info:
            if name == "loss_surface":
                sm.loss_surface(model, nn.CrossEntropyLoss(), data, [d], [[0.0, 0.5]], bn_mode="batch")
            elif name == "interpolation":
                sm.interpolation(model, nn.CrossEntropyLoss(), data, w, d, [0.0, 1.0], bn_mode="batch")
            else:
                call(name, model, data)
        assert str(info.value).startswith(expected), str(info.value)
        assert "all chunks must share the per-sample shape and the dtype" in str(info.value)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_not_an_iterable(mlp_chunks, name):
    model, _ = mlp_chunks
    for bad in (3, {"x": 1}, "batches"):
        with pytest.raises(TypeError, match="pair \\(inputs, targets\\) or an iterable of such pairs"):
            call(name, model, bad)


def test_batches_that_change_between_passes(ref):
    """A shuffling DataLoader gives other chunks on the next pass: with BatchNorm in batch mode that is another
    loss, so the operator would change under Lanczos; it is refused, naming the fix."""
    model = plain_mlp()
    batch = ref.make_batch(model, n=12)
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(*batch), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="changed between two passes.*shuffle=False"):
        sm.top_eigenvalues(model, nn.CrossEntropyLoss(), loader, k=1)

    class Shrinking:
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            return iter(split(batch)[:3 if self.passes == 1 else 2])

    with pytest.raises(ValueError, match="2 chunks instead of 3"):
        sm.hvp(model, nn.CrossEntropyLoss(), Shrinking(), ref.random_direction(model))
