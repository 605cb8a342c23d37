"""Training to a target loss and the generalisation measures along a run (issue 24): the stop, the records, resume,
and study grids over further options (``StudyConfig.axes``)."""
import json
import math

import pytest
import torch

from experiments.features.generalization import compute as generalization
from experiments.config import ConfigError, RunConfig, StudyConfig
from experiments.data import load_dataset
from experiments.losses import get_loss
from experiments.models import build_model
from experiments.training import train_run

TINY = dict(model="mlp", dataset="synthetic", subset=0.08, epochs=3, batch_size=32, probe_every=0,
            sharpness_samples=32, local_smoothness_samples=64, generalization_samples=64)


def records(path):
    return [json.loads(line) for line in (path / "records.jsonl").read_text().splitlines()]


class _Interrupt(Exception):
    pass


def test_a_run_that_never_reaches_the_target_trains_every_epoch_and_says_so(tmp_path):
    cfg = RunConfig(**TINY, target_train_loss=1e-9, generalization_every=2)
    outcome = train_run(cfg, tmp_path)
    recs = records(outcome.path)
    assert outcome.status == "done" and outcome.steps == cfg.total_steps(160)
    target = [r for r in recs if r["kind"] == "target"]
    assert target == [{"kind": "target", "step": outcome.steps, "epoch": 3, "reached": False, "target": 1e-9,
                       "train_loss": target[0]["train_loss"]}]
    # every 2 passes from initialisation, and at the end
    assert [r["epoch"] for r in recs if r["kind"] == "generalization"] == [0, 2, 3]


def test_the_run_stops_at_the_first_evaluation_at_or_below_the_target(tmp_path):
    free = train_run(RunConfig(**TINY), tmp_path / "free")
    losses = [r["train_loss"] for r in records(free.path) if r["kind"] == "eval"]
    target = (losses[1] + losses[2]) / 2   # reached after the second pass, not after the first
    assert losses[1] > target >= losses[2]
    cfg = RunConfig(**TINY, target_train_loss=target, generalization_every=100)
    outcome = train_run(cfg, tmp_path / "stop")
    recs = records(outcome.path)
    per_epoch = cfg.steps_per_epoch(160)
    assert outcome.status == "done" and outcome.steps == 2 * per_epoch
    assert recs[-1] == {"kind": "target", "step": 2 * per_epoch, "epoch": 2, "reached": True, "target": target,
                        "train_loss": losses[2]}
    assert [r["epoch"] for r in recs if r["kind"] == "generalization"] == [0, 2]  # init, and where it stopped
    assert max(r["step"] for r in recs) == 2 * per_epoch and (outcome.path / "weights-final.pt").exists()
    # the same training up to the stop as the run without a target
    assert [r for r in records(free.path) if r["kind"] == "step" and r["step"] < 2 * per_epoch] == \
        [r for r in recs if r["kind"] == "step"]


def test_the_record_holds_every_measure_and_equals_a_direct_measurement(tmp_path):
    cfg = RunConfig(**TINY, generalization_every=100)
    outcome = train_run(cfg, tmp_path)
    final = [r for r in records(outcome.path) if r["kind"] == "generalization"][-1]
    assert set(generalization.FIELDS) <= set(final) and all(math.isfinite(final[f]) for f in generalization.FIELDS)
    assert final["bn_mode"] == "running" and final["n_samples"] == 64
    data = load_dataset(cfg.dataset, subset=cfg.subset, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, norm=cfg.norm, input_shape=data.input_shape, num_classes=data.num_classes)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(torch.load(outcome.path / "weights-final.pt"))
    order = torch.randperm(data.x_train.shape[0], generator=torch.Generator().manual_seed(cfg.seed + 10_000))
    idx = order[:cfg.generalization_samples]
    again = generalization.measure(model, (data.x_train[idx], data.y_train[idx]), get_loss(cfg.loss), init,
                                   data.input_shape)
    assert {k: again[k] for k in generalization.FIELDS} == pytest.approx(
        {k: final[k] for k in generalization.FIELDS}, rel=1e-5)


def test_a_killed_run_with_a_target_resumes_to_the_same_records(tmp_path):
    cfg = RunConfig(**TINY, target_train_loss=1e-9, generalization_every=1)
    whole = records(train_run(cfg, tmp_path / "whole").path)

    def die_in_second_epoch(run_id, done, total):
        if done > 7:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train_run(cfg, tmp_path / "cut", progress=die_in_second_epoch)
    outcome = train_run(cfg, tmp_path / "cut", resume=True)
    assert records(outcome.path) == whole


def test_options_are_checked():
    with pytest.raises(ConfigError, match="--target-train-loss"):
        RunConfig(target_train_loss=-1.0)
    with pytest.raises(ConfigError, match="--generalization-every"):
        RunConfig(generalization_every=-1)
    with pytest.raises(ConfigError, match="--generalization-samples"):
        RunConfig(generalization_samples=0)
    # off by default, and then not part of the run id: every earlier run keeps its id
    assert "target_train_loss" not in RunConfig().hashed_dict()
    assert RunConfig(target_train_loss=0.01).run_id != RunConfig().run_id


def test_study_axes_multiply_the_grid_and_survive_a_round_trip():
    study = StudyConfig(name="g", models=("mlp",), lrs=(0.1,), seeds=(0, 1),
                        axes=(("batch_size", (32, 128)), ("weight_decay", (0.0, 1e-4))))
    runs = study.runs()
    assert len(runs) == 8 and len({r.run_id for r in runs}) == 8
    assert {(r.batch_size, r.weight_decay) for r in runs} == {(32, 0.0), (32, 1e-4), (128, 0.0), (128, 1e-4)}
    assert StudyConfig.from_dict(json.loads(json.dumps(study.to_dict()))) == study
    plain = StudyConfig(name="p")
    assert "axes" not in plain.to_dict()  # study.json files written before axes existed compare equal
    with pytest.raises(ConfigError, match="axis"):
        StudyConfig(axes=(("seed", (0, 1)),))
    with pytest.raises(ConfigError, match="distinct"):
        StudyConfig(axes=(("batch_size", (32, 32)),))
    with pytest.raises(ConfigError, match="--weight-decay"):
        StudyConfig(axes=(("weight_decay", (-1.0,)),))


def test_generalization_command_on_a_small_real_grid(tmp_path):
    """Train a 2 x 2 x 2 grid (BN x lr x weight decay) with the measures at the end, then `smoothness-lab
    generalization`: its τ equals scipy's on the numbers in the records."""
    from click.testing import CliRunner
    from scipy import stats

    from experiments.cli import main

    study = StudyConfig(name="g", models=("mlp", "bn-mlp"), lrs=(0.05, 0.2), seeds=(0,),
                        axes=(("weight_decay", (0.0, 1e-3)),), base=RunConfig(**{**TINY, "epochs": 2},
                                                                              generalization_every=100))
    root = tmp_path / "g"
    for cfg in study.runs():
        train_run(cfg, root)
    result = CliRunner().invoke(main, ["generalization", str(root), "--resamples", "200"])
    assert result.exit_code == 0, result.output
    assert (root / "generalization.md").exists() and (root / "figures" / "measure_vs_gap.png").exists()
    gaps, sharp = [], []
    for run in sorted(root.glob("*/records.jsonl")):
        recs = [json.loads(line) for line in run.read_text().splitlines()]
        ev = [r for r in recs if r["kind"] == "eval"][-1]
        gaps.append(ev["train_accuracy"] - ev["test_accuracy"])
        sharp.append([r for r in recs if r["kind"] == "generalization"][-1]["lambda_max"])
    expected = stats.kendalltau(sharp, gaps).statistic
    import pandas as pd
    table = pd.read_csv(root / "generalization.csv").set_index("measure")
    assert table.loc["lambda_max", "n_used"] == 8
    assert table.loc["lambda_max", "tau"] == pytest.approx(expected, abs=1e-12)


def test_generalization_command_without_records_says_what_to_run(tmp_path):
    from click.testing import CliRunner

    from experiments.cli import main

    train_run(RunConfig(**TINY), tmp_path / "plain")
    result = CliRunner().invoke(main, ["generalization", str(tmp_path / "plain")])
    assert result.exit_code == 1 and "--generalization-every" in result.output and "Traceback" not in result.output
