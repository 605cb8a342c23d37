"""Per-layer curvature (experiments.features.per_layer.compute): blocks, records against direct estimator calls and a dense Hessian,
determinism across a kill and resume, and the figures/markdown of `smoothness-lab per-layer`."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn
from torch.func import functional_call

import smoothness
from experiments.features.per_layer import compute as per_layer
from experiments.features.per_layer.figures import plot_per_layer
from experiments.cli import main
from experiments.config import RunConfig
from experiments.models import build_model
from experiments.store import RunStore
from experiments.training import train_run

TINY = dict(dataset="synthetic", subset=0.08, epochs=2, batch_size=32, probe_every=0, sharpness_samples=32,
            local_smoothness_samples=64, per_layer=True)


def records(path):
    return [json.loads(line) for line in (path / "records.jsonl").read_text().splitlines()]


def test_blocks_of_both_convnets():
    plain = build_model("convnet", input_shape=(1, 28, 28), num_classes=10)
    bn = build_model("bn-convnet", input_shape=(1, 28, 28), num_classes=10)
    pair = lambda m: [f"{m}.weight", f"{m}.bias"]  # noqa: E731
    assert per_layer.blocks(plain) == {"features.0": pair("features.0"), "features.4": pair("features.4"),
                                       "classifier": pair("classifier")}
    assert per_layer.blocks(bn) == {m: pair(m) for m in ("features.0", "features.3", "features.4", "features.7",
                                                         "classifier")}
    assert per_layer.layer_labels(plain) == {"features.0": "conv1", "features.4": "conv2", "classifier": "fc"}
    assert per_layer.layer_labels(bn) == {"features.0": "conv1", "features.3": "bn1", "features.4": "conv2",
                                          "features.7": "bn2", "classifier": "fc"}


@pytest.fixture(scope="module")
def bn_convnet_records():
    torch.manual_seed(0)
    model = build_model("bn-convnet", input_shape=(1, 28, 28), num_classes=10)
    batch = (torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)))
    return model, batch, per_layer.measure(model, batch, F.cross_entropy)


def test_records_are_the_estimators(bn_convnet_records):
    """λ_max of each block is top_eigenvalues(..., params=block) called directly; GGN blocks are PSD; the whole
    network's λ_min is negative (a network Hessian at random weights is indefinite)."""
    model, batch, recs = bn_convnet_records
    blocks = per_layer.blocks(model)
    assert [(r["module"], r["matrix"]) for r in recs] == [(m, k) for k in per_layer.MATRICES for m in blocks] + [
        ("all", "hessian")]
    for r in recs[:-1]:
        direct = smoothness.top_eigenvalues(model, F.cross_entropy, batch, tol=per_layer.TOL,
                                            max_iter=per_layer.MAX_ITER, bn_mode="batch", kind=r["matrix"],
                                            params=blocks[r["module"]])
        assert r["lambda_max"] == direct.values[0] and r["n_hvp"] == direct.n_hvp and r["converged"]
        assert r["samples"] == 16 and r["bn_mode"] == "batch" and r["trace_probes"] == per_layer.PROBES
        if r["matrix"] == "ggn":
            assert r["lambda_max"] >= 0
    whole = recs[-1]
    assert whole["lambda_min"] < 0 and whole["converged"] and whole["n_params"] == sum(
        p.numel() for p in model.parameters())
    assert all(isinstance(v, (str, bool, int, float)) for r in recs for v in r.values())


def _dense_hessian(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    buffers = dict(model.named_buffers())

    def loss(flat):
        params = dict(zip(names, (t.reshape(s) for t, s in zip(torch.split(flat, [s.numel() for s in shapes]),
                                                                  shapes))))
        return F.cross_entropy(functional_call(model, {**params, **{n: b.clone() for n, b in buffers.items()}},
                                               (x,)), y)

    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return torch.autograd.functional.hessian(loss, w).numpy()


def test_dense_reference_on_a_tiny_bn_mlp():
    """At tol 1e-10 every number is the dense matrix's: λ_min(H), λ_max of each H block; Hutchinson's block traces
    within 4 standard errors; the last layer's H and G blocks coincide (the output is linear in its weights)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 3, (10,))
    H = _dense_hessian(model, x, y)
    recs = per_layer.measure(model, (x, y), F.cross_entropy, tol=1e-10)
    assert per_layer.layer_labels(model) == {"0": "fc1", "1": "bn1", "3": "fc2"}
    whole = recs[-1]
    assert whole["lambda_min"] < 0
    assert whole["lambda_min"] == pytest.approx(np.linalg.eigvalsh(H)[0], rel=1e-8)
    offsets, i = {}, 0
    for n, p in model.named_parameters():
        offsets[n] = range(i, i + p.numel())
        i += p.numel()
    for r in recs[:-1]:
        idx = [j for n in per_layer.blocks(model)[r["module"]] for j in offsets[n]]
        block = H[np.ix_(idx, idx)]
        if r["matrix"] == "hessian":
            assert r["lambda_max"] == pytest.approx(np.linalg.eigvalsh(block)[-1], rel=1e-8)
            assert abs(r["trace"] - np.trace(block)) <= 4 * r["trace_stderr"] + 1e-12
        else:
            assert r["lambda_max"] >= -1e-12
    last = {r["matrix"]: r for r in recs if r["layer"] == "fc2"}
    assert last["hessian"]["lambda_max"] == pytest.approx(last["ggn"]["lambda_max"], rel=1e-8)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny real study: ConvNet and BN-ConvNet, seeds 0 and 1, 2 passes, with --per-layer."""
    root = tmp_path_factory.mktemp("per-layer")
    cfgs = [RunConfig(model=m, seed=s, **TINY) for m in ("convnet", "bn-convnet") for s in (0, 1)]
    outcomes = [train_run(cfg, root) for cfg in cfgs]
    assert all(o.status == "done" for o in outcomes)
    return root, cfgs, {cfg.run_id: records(o.path) for cfg, o in zip(cfgs, outcomes)}


def test_records_at_every_measurement(study):
    _, cfgs, recs = study
    for cfg in cfgs:
        mine = [r for r in recs[cfg.run_id] if r["kind"] == "per_layer"]
        modules = 3 if cfg.model == "convnet" else 5
        assert len(mine) == 3 * (2 * modules + 1)  # init and two passes
        assert sorted({r["epoch"] for r in mine}) == [0, 1, 2]
        assert all(r["samples"] == 32 for r in mine)


class _Interrupt(Exception):
    pass


def test_resume_after_kill_gives_identical_records(study, tmp_path):
    _, cfgs, recs = study
    cfg = cfgs[2]  # bn-convnet, seed 0

    def die_in_second_epoch(run_id, done, total):
        if done > 7:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train_run(cfg, tmp_path, progress=die_in_second_epoch)
    assert not RunStore(tmp_path, cfg).done
    outcome = train_run(cfg, tmp_path, resume=True)
    assert outcome.status == "done" and records(outcome.path) == recs[cfg.run_id]


def test_figures_and_markdown_of_a_tiny_study(study, tmp_path):
    root, _, _ = study
    paths = plot_per_layer(root, tmp_path / "figures")
    assert {p.name for p in paths} == {"per_layer_lambda.png", "per_layer_lambda.pdf", "per_layer_trace.png",
                                       "per_layer_trace.pdf", "per_layer.md"}
    text = (root / "per_layer.md").read_text()
    for needle in ("| convnet | conv1 | 2 |", "| bn-convnet | bn2 | 2 |", "λ_min(H), whole",
                   "BatchNorm: each network − convnet, paired by seed", "H vs G"):
        assert needle in text
    # the BN rows of the BatchNorm family pair only the layers both networks have
    family = text.split("BatchNorm: each network")[1].split("## ")[0]
    assert "| bn1 |" not in family and "| conv2 | tr(H − G) | convnet | bn-convnet | 2 |" in family
    assert plot_per_layer(root, tmp_path / "again")[-1].read_text() == text  # deterministic
    result = CliRunner().invoke(main, ["-q", "per-layer", str(root), "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output


def test_a_study_without_per_layer_records_is_one_line_error(tmp_path):
    cfg = RunConfig(model="convnet", **{**TINY, "per_layer": False, "epochs": 1})
    train_run(cfg, tmp_path)
    result = CliRunner().invoke(main, ["per-layer", str(tmp_path)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "no per_layer records; run the study with --per-layer" in lines[0]
