"""The measurement registry (experiments/features/): a measurement defined outside the package is one object and
one `register` call away from the command line, the run's records, `status` and the report; registering it changes
no run id; every schedule is 0 = off; per-pass sharpness is its own option with the published runs' meaning."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from experiments import features as measurements, optim
from experiments.features.local_smoothness import compute as local_smoothness_compute
from experiments.cli import main
from experiments.config import ConfigError, RunConfig
from experiments.features import Measurement, Metric, Option, Record, RegistryError
from experiments.features.base import every
from experiments.store import RECORD_NUMBERS, read_config, read_records
from experiments.training import train_run

RESULTS = Path(__file__).resolve().parents[2] / "results"
TINY = dict(model="fc-tanh", dataset="synthetic", subset=0.08, epochs=2, batch_size=32, probe_every=0,
            sharpness_samples=32, local_smoothness_samples=64, pass_sharpness=False, device="cpu")


# -- a measurement from outside the package: the gradient norm every N steps -------------------------------------
def _gradnorm_hooks(ctx):
    import torch

    from experiments.loop import Hook

    def measure(state):  # a gradient hook: .grad holds the step's minibatch gradient
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in ctx.model.parameters() if p.grad is not None))
        return ctx.at(state.step, {"kind": "gradnorm", "bn_mode": "batch", "grad_norm": float(norm)})

    every_n = ctx.cfg.gradnorm_every
    return (Hook("gradnorm", every_n, "gradient", measure, what="a gradient norm"),) if every_n else ()


GRADNORM = Measurement(
    name="gradnorm", schedule="every --gradnorm-every steps (0 = off), once the step's gradient is known",
    options=(Option("gradnorm_every", int, 0, "minibatch gradient norm every N steps (0 = off)", check=every),),
    records=(Record("gradnorm", numbers=("grad_norm",)),),
    hooks=_gradnorm_hooks,
    metrics=(Metric("final_grad_norm", "final minibatch gradient norm ‖∇L‖₂", "gradnorm", "grad_norm",
                    "last"),))


@pytest.fixture
def gradnorm():
    measurements.register(GRADNORM)
    try:
        yield GRADNORM
    finally:
        measurements.unregister("gradnorm")


def test_a_measurement_registered_outside_reaches_cli_records_status_and_report(gradnorm, tmp_path):
    runner = CliRunner()
    shown = runner.invoke(main, ["train", "--help"])
    assert shown.exit_code == 0 and "--gradnorm-every" in shown.output and "minibatch gradient norm" in shown.output

    args = ["-q", "train", "--model", "fc-tanh", "--dataset", "synthetic", "--subset", "0.08", "--epochs", "2",
            "--probe-every", "0", "--no-pass-sharpness", "--local-smoothness-samples", "64", "--device", "cpu",
            "--results-dir", str(tmp_path), "--study", "gn", "--gradnorm-every", "2"]
    out = runner.invoke(main, args)
    assert out.exit_code == 0, out.output
    (run_dir,) = (tmp_path / "gn").iterdir()
    records = read_records(run_dir / "records.jsonl")   # checked against the schema, gradnorm included
    grad = [r for r in records if r["kind"] == "gradnorm"]
    assert [r["step"] for r in grad] == [0, 2, 4, 6, 8] and all(r["grad_norm"] > 0 for r in grad)
    assert RECORD_NUMBERS["gradnorm"] == ("grad_norm",)
    cfg = read_config(run_dir / "config.json")          # the option is saved, hashed and read back
    assert json.loads((run_dir / "config.json").read_text())["gradnorm_every"] == 2
    assert cfg.gradnorm_every == 2 and cfg.run_id == run_dir.name
    assert "gradnorm_every" in cfg.hashed_dict()

    status = runner.invoke(main, ["status", str(tmp_path / "gn")])
    assert status.exit_code == 0 and run_dir.name in status.output, status.output

    report = runner.invoke(main, ["-q", "report", str(tmp_path / "gn")])
    assert report.exit_code == 0, report.output
    assert "final minibatch gradient norm" in (tmp_path / "gn" / "report.md").read_text()


def test_an_unregistered_measurements_option_leaves_the_cli(tmp_path):
    """Found in a full run: after a test unregistered its measurement, `train` still passed --gradnorm-every's
    default to RunConfig ("unknown option --gradnorm-every") and failed every later command."""
    runner = CliRunner()
    measurements.register(GRADNORM)
    try:
        assert "--gradnorm-every" in runner.invoke(main, ["train", "--help"]).output
    finally:
        measurements.unregister("gradnorm")
    shown = runner.invoke(main, ["train", "--help"])
    assert shown.exit_code == 0 and "--gradnorm-every" not in shown.output
    out = runner.invoke(main, ["-q", "train", "--model", "fc-tanh", "--dataset", "synthetic", "--subset", "0.08",
                               "--epochs", "1", "--probe-every", "0", "--no-pass-sharpness", "--device", "cpu",
                               "--local-smoothness-samples", "64", "--results-dir", str(tmp_path)])
    assert out.exit_code == 0, out.output


def test_registering_a_measurement_changes_no_run_id(gradnorm):
    configs = sorted(RESULTS.glob("*/*/config.json"))
    assert configs
    for path in configs:   # read_config recomputes the id from the options and checks it against the file
        assert read_config(path).run_id == path.parent.name
    base = RunConfig(**TINY)
    assert base.gradnorm_every == 0 and "gradnorm_every" not in base.hashed_dict()
    assert RunConfig(**TINY, gradnorm_every=0) == base          # its default stays out of the id
    assert RunConfig(**TINY, gradnorm_every=3).run_id != base.run_id
    with pytest.raises(ConfigError, match="--gradnorm-every must be a non-negative integer"):
        RunConfig(**TINY, gradnorm_every=-1)


def test_an_option_cannot_be_registered_twice(gradnorm):
    with pytest.raises(RegistryError, match="already registered"):
        measurements.register(GRADNORM)
    twin = Measurement(name="twin", schedule="-", options=(Option("gradnorm_every", int, 0, "again"),))
    with pytest.raises(RegistryError, match="already exist"):
        measurements.register(twin)
    lr = Measurement(name="lr-clash", schedule="-", options=(Option("lr", float, 0.1, "a RunConfig field"),))
    with pytest.raises(RegistryError, match="already exist"):
        measurements.register(lr)


# -- one schedule convention -----------------------------------------------------------------------------------------
def test_every_schedule_is_zero_for_off():
    """Every --*-every option takes 0 and says it means off; --eval-every, the evaluation points every per-pass
    measurement and checkpoint hangs on, is the one that must be positive."""
    schedules = [o for o in measurements.options() if o.name.endswith("_every") and o.name != "eval_every"]
    assert {o.name for o in schedules} >= {"probe_every", "sharpness_every", "spectrum_every", "generalization_every"}
    for o in schedules:
        assert "0 = off" in o.help and o.problem(0) is None, o.name
    with pytest.raises(ConfigError, match="--eval-every must be a positive integer"):
        RunConfig(eval_every=0)


def test_per_pass_sharpness_is_its_own_option_and_old_configs_keep_their_meaning():
    eos = json.loads(next(RESULTS.glob("edge-of-stability/*/config.json")).read_text())
    main_study = json.loads(next(RESULTS.glob("fashion-mnist-bn/*/config.json")).read_text())
    assert "pass_sharpness" not in eos and eos["sharpness_every"] == 20
    # saved before the option existed: per-pass sharpness was on exactly when --sharpness-every was 0
    assert RunConfig.from_dict(eos).pass_sharpness is False
    assert RunConfig.from_dict(main_study).pass_sharpness is True
    assert RunConfig.from_dict(eos).run_id == eos["run_id"]
    # a new run: --sharpness-every only schedules the step-wise records; the per-pass one is --pass-sharpness
    both = RunConfig(sharpness_every=20)
    assert both.pass_sharpness and both.hashed_dict()["pass_sharpness"] is True   # differs from the legacy value
    assert "pass_sharpness" not in RunConfig(sharpness_every=20, pass_sharpness=False).hashed_dict()
    assert "pass_sharpness" not in RunConfig().hashed_dict()
    assert RunConfig(pass_sharpness=False).hashed_dict()["pass_sharpness"] is False


def test_per_pass_measurements_can_be_switched_off(tmp_path):
    cfg = RunConfig(**{**TINY, "pass_local_smoothness": False, "pass_sharpness": False})
    kinds = {r["kind"] for r in read_records(train_run(cfg, tmp_path).path / "records.jsonl")}
    assert kinds == {"step", "eval"}


# -- the step a measurement uses is the optimizer's current one --------------------------------------------------------
@pytest.mark.parametrize("schedule", [dict(lr_schedule="step", lr_decay_every=3, lr_decay_factor=0.5),
                                      dict(lr_schedule="cosine", warmup_steps=2)])
def test_local_smoothness_steps_with_the_scheduled_learning_rate(schedule, tmp_path, monkeypatch):
    seen = []
    real = local_smoothness_compute.local_smoothness

    def spy(model, minibatch, full_batch, lr, loss_fn):
        seen.append(lr)
        return real(model, minibatch, full_batch, lr, loss_fn)

    monkeypatch.setattr(local_smoothness_compute, "local_smoothness", spy)
    cfg = RunConfig(**{**TINY, "lr": 0.05, **schedule})
    records = read_records(train_run(cfg, tmp_path).path / "records.jsonl")
    steps = [r["step"] for r in records if r["kind"] == "smoothness"]
    assert steps == [0, 5, 10]
    expected = [optim.lr_at(t, cfg.lr, cfg.lr_schedule, total_steps=10, warmup_steps=cfg.warmup_steps,
                            decay_every=cfg.lr_decay_every, decay_factor=cfg.lr_decay_factor) for t in steps]
    measured = [r for r in records if r["kind"] == "smoothness"]
    if cfg.lr_schedule == "cosine":   # η = 0 at the end of a cosine schedule: no step, nothing measured
        assert expected[-1] == pytest.approx(0, abs=1e-12) and measured[-1]["local_smoothness"] is None
        expected = expected[:-1]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert len(set(seen)) == len(seen)       # it moved with the schedule, not the base cfg.lr
    step_lr = {r["step"]: r["lr"] for r in records if r["kind"] == "step"}
    assert seen[1] == pytest.approx(step_lr[5])   # the rate step 5 is taken with


def test_the_probe_bn_modes_are_the_librarys():
    """The option lists them by hand (so that --help imports no torch); they must stay smoothness.BN_MODES."""
    import smoothness
    assert tuple(measurements.find_option("probe_bn_mode").choices) == tuple(smoothness.BN_MODES)
