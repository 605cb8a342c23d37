"""Tests for experiments/features/diagnostics.py (`smoothness-lab variance` and `smoothness-lab ics`) and TensorBoard logging.

MNIST-1D is generated locally by the mnist1d package; the ICS tests train on the deterministic synthetic set (tiny).
"""
from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from experiments.cli import main
from experiments.config import RunConfig
from experiments.data import DATASETS
from experiments.features.diagnostics.commands import ics_trace, residual_locations, residual_variance, variance_table
from experiments.models import build_model
from experiments.training import train_run


@pytest.fixture(scope="module")
def table():
    return variance_table("mnist1d", seed=0, batch_size=200)


# ---------------------------------------------------------------------------------------------------------------
# variance through the residual MLP (seed 002)

def test_variance_table_layout(table):
    assert list(table.columns) == ["model", "position", "location", "variance", "ratio"]
    assert list(table["model"].unique()) == ["resmlp", "bn-resmlp"]
    assert table[table.model == "resmlp"]["location"].tolist() == residual_locations(5)
    inputs = table[table.location == "input"]
    assert inputs["variance"].nunique() == 1 and 0.9 < inputs["variance"].iloc[0] < 1.1  # standardised data
    assert (inputs["ratio"] == 1).all()


def test_without_bn_variance_explodes(table):
    """Seed 002: without BN the variance roughly doubles per residual block (1.9 -> 27.5)."""
    ratios = table[table.model == "resmlp"].set_index("location")["ratio"]
    assert ratios["residual 5"] > 10
    assert (ratios.diff().dropna() > 0).all()


def test_with_bn_variance_stays_flat(table):
    """Seed 002: with BN before each residual branch the variance stays about flat (~1.7)."""
    ratios = table[table.model == "bn-resmlp"].set_index("location")["ratio"]
    assert ratios["residual 5"] < 3


def test_residual_variance_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = build_model("bn-resmlp", input_shape=(1, 40)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(50, 1, 40)
    values = residual_variance(model, x)
    assert len(values) == 7 and values[0] == pytest.approx(float(x.flatten(1).var(0, correction=0).mean()))
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # running statistics untouched
    assert residual_variance(model, x, train=False) != values  # eval mode: running statistics (0, 1)


def test_residual_variance_errors():
    with pytest.raises(ValueError, match="has no residual_outputs"):
        residual_variance(nn.Linear(3, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="at least 2"):
        residual_variance(build_model("resmlp", input_shape=(1, 40)), torch.randn(1, 1, 40))
    with pytest.raises(ValueError, match="--batch-size must be between 2 and the 4000"):
        variance_table("mnist1d", batch_size=5000)


def test_variance_command_writes_table_csv_and_figure(tmp_path):
    out = tmp_path / "variance"
    result = CliRunner().invoke(main, ["variance", "--out", str(out), "--batch-size", "100"])
    assert result.exit_code == 0, result.output
    assert "residual 5" in result.output and "bn-resmlp" in result.output
    for name in ("variance.csv", "variance.png", "variance.pdf"):
        assert (out / name).stat().st_size > 0, name
    written = pd.read_csv(out / "variance.csv")
    assert len(written) == 14 and set(written["model"]) == {"resmlp", "bn-resmlp"}
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temporary files
    bad = CliRunner().invoke(main, ["variance", "--dataset", "imagenet", "--out", str(out)])
    assert bad.exit_code == 1 and "choose one of: fashion-mnist" in bad.output


# ---------------------------------------------------------------------------------------------------------------
# internal covariate shift along SGD

@pytest.mark.parametrize("model", ["convnet", "bn-convnet"])
def test_ics_with_lr_zero_is_absent(model):
    frame = ics_trace(model, dataset="synthetic", subset=0.05, lr=0.0, steps=3, every=1, batch_size=8,
                      device="cpu")
    assert frame["step"].unique().tolist() == [0, 1, 2]
    assert (frame["grad_diff_norm"] == 0).all()
    assert frame["cosine"].to_numpy() == pytest.approx(1.0, abs=1e-12)
    assert frame.attrs["diverged_at"] is None
    layers = frame[frame.step == 0]
    if model == "convnet":
        assert layers["layer"].tolist() == ["features.0", "features.4", "classifier"]
    else:  # the BN layers are ICS layers too, but only conv/linear layers get a weight_layer index
        assert layers["layer"].tolist() == ["features.0", "features.3", "features.4", "features.7", "classifier"]
    assert layers["weight_layer"].dropna().tolist() == [1, 2, 3]


def test_ics_with_positive_lr_shifts_later_layers():
    frame = ics_trace("convnet", dataset="synthetic", subset=0.05, lr=0.1, steps=1, every=1, batch_size=8,
                      device="cpu")
    first, *later = frame.itertuples()
    assert first.grad_diff_norm == 0 and first.cosine == pytest.approx(1.0)
    assert all(r.grad_diff_norm > 0 and r.cosine < 1 for r in later)


def test_ics_command_writes_csv_and_figure(tmp_path):
    out = tmp_path / "ics"
    result = CliRunner().invoke(main, ["ics", "--dataset", "synthetic", "--subset", "0.05", "--batch-size", "8",
                                       "--steps", "3", "--every", "2", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("ics.csv", "ics.json", "ics.png", "ics.pdf"):
        assert (out / name).stat().st_size > 0, name
    frame = pd.read_csv(out / "ics.csv")
    assert {"layer", "step", "grad_diff_norm", "cosine", "model"} <= set(frame.columns)
    assert frame.groupby("model").size().to_dict() == {"convnet": 2 * 3, "bn-convnet": 2 * 5}  # steps 0 and 2


@pytest.mark.parametrize("args, message", [
    (["--models", "convnet,resnet"], "unknown model 'resnet'; choose one of: convnet, bn-convnet"),
    (["--models", "convnet:bogus"], "unknown norm 'bogus' in 'convnet:bogus'; choose one of: none, torch"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet' (--dataset); choose one of: fashion-mnist"),
    (["--dataset", "mnist1d"], "model 'convnet' expects inputs of shape (28, 28)"),
])
def test_ics_command_errors_list_choices(args, message, tmp_path):
    result = CliRunner().invoke(main, ["ics", "--out", str(tmp_path / "x"), "--device", "cpu", *args])
    assert result.exit_code == 1 and message in result.output, result.output
    assert not (tmp_path / "x").exists()


def test_ics_dataset_help_lists_every_dataset():
    result = CliRunner().invoke(main, ["ics", "--help"])
    assert all(name in result.output for name in DATASETS)


# ---------------------------------------------------------------------------------------------------------------
# TensorBoard (RunConfig.tensorboard)

def test_tensorboard_scalars_are_written(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    cfg = RunConfig(model="bn-convnet", dataset="synthetic", subset=0.01, batch_size=10, epochs=1, probe_every=1,
                    probe_steps=2, local_smoothness_samples=10, sharpness_samples=8, sharpness_tol=0.1,
                    device="cpu", tensorboard=True, study="tb")
    outcome = train_run(cfg, tmp_path)
    assert outcome.status == "done" and outcome.steps == 2
    events = list((outcome.path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = event_accumulator.EventAccumulator(str(outcome.path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"step/loss", "step/accuracy", "eval/train_loss", "eval/test_accuracy", "probe/effective_beta",
            "probe/loss_max", "smoothness/local_smoothness", "smoothness/sharpness"} <= tags
    assert [e.step for e in acc.Scalars("step/loss")] == [0, 1]
    assert [e.step for e in acc.Scalars("eval/test_accuracy")] == [0, 2]
    assert not any(t.endswith(("/step", "/epoch")) for t in tags)  # the x axis is not logged as a scalar
    assert dataclasses.replace(cfg, tensorboard=False).run_id == cfg.run_id  # execution option: same run id
