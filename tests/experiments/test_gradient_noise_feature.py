"""The gradient-noise feature along training: records per unit, the training trajectory untouched, the refusal of
example units with BatchNorm in batch mode, the dashboard drawn by `plot`, and `watch` on a run that is writing."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from experiments.cli import main
from experiments.config import RunConfig
from experiments.store import read_records
from experiments.training import train_run

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(model="fc-tanh", dataset="synthetic", subset=0.08, epochs=2, batch_size=32, probe_every=0,
            sharpness_samples=32, local_smoothness_samples=64, pass_sharpness=False, device="cpu")


def _records(cfg, root):
    return read_records(train_run(cfg, root).path / "records.jsonl")


def test_records_per_unit_and_the_trajectory_is_unchanged(tmp_path):
    plain = _records(RunConfig(**TINY), tmp_path / "plain")
    cfg = RunConfig(**TINY, gradient_noise_every=5, gradient_noise_unit="both", gradient_noise_batches=4)
    measured = _records(cfg, tmp_path / "measured")
    steps = lambda recs: [(r["step"], r["loss"]) for r in recs if r["kind"] == "step"]
    assert steps(measured) == steps(plain)          # the measurement draws nothing from the run's generators
    batch = [r for r in measured if r["kind"] == "gradient_noise"]
    example = [r for r in measured if r["kind"] == "gradient_noise_example"]
    assert [r["step"] for r in batch] == [r["step"] for r in example] == list(range(0, len(steps(plain)), 5))
    assert all(r["n_units"] == 4 and r["unit_size"] == 32 for r in batch)
    assert all(r["n_units"] == 128 and r["unit_size"] == 1 for r in example)
    for r in batch + example:
        assert r["norm_test"] > 0 and r["gsnr"] > 0 and r["step_length"] > 0 and r["alpha"] >= -1
        assert sum(r["histogram_counts"]) + r["histogram_below"] + r["histogram_above"] > 0
    assert all(r["tic_diag"] is None for r in batch) and all(r["tic_diag"] > 0 for r in example)
    # minibatch gradients average B examples: their GSNR is larger than the per-example one at the same weights
    first = {r["kind"]: r for r in measured if r["step"] == 0 and r["kind"].startswith("gradient_noise")}
    assert first["gradient_noise"]["gsnr"] > first["gradient_noise_example"]["gsnr"]


def test_auto_takes_minibatch_units_with_batchnorm_and_example_units_are_refused(tmp_path):
    cfg = RunConfig(**{**TINY, "model": "bn-mlp"}, gradient_noise_every=10, gradient_noise_batches=2)
    kinds = {r["kind"] for r in _records(cfg, tmp_path / "auto")}
    assert "gradient_noise" in kinds and "gradient_noise_example" not in kinds
    bad = RunConfig(**{**TINY, "model": "bn-mlp"}, gradient_noise_every=10, gradient_noise_unit="example")
    with pytest.raises(Exception, match="unit batch"):
        train_run(bad, tmp_path / "bad")


def test_full_batch_is_refused_before_anything_is_written(tmp_path):
    out = CliRunner().invoke(main, ["-q", "train", "--model", "fc-tanh", "--dataset", "synthetic", "--subset", "0.08",
                                    "--batch-size", "full", "--gradient-noise-every", "5", "--device", "cpu",
                                    "--results-dir", str(tmp_path)])
    assert out.exit_code != 0 and "full-batch" in out.output
    assert not any(tmp_path.rglob("config.json"))


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "experiments.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_plot_draws_a_dashboard_and_watch_follows_a_writing_run(tmp_path):
    study = tmp_path / "gn"
    train = _cli("-q", "train", "--model", "fc-tanh", "--dataset", "synthetic", "--subset", "0.08", "--epochs", "6",
                 "--probe-every", "0", "--local-smoothness-samples", "64", "--sharpness-samples", "32",
                 "--gradient-noise-every", "4", "--gradient-noise-batches", "4", "--device", "cpu",
                 "--results-dir", str(tmp_path), "--study", "gn")
    deadline = time.time() + 300
    while not any(study.glob("*/records.jsonl")) and time.time() < deadline:
        time.sleep(0.05)
    watch = _cli("watch", str(study), "--interval", "0.2")
    out, err = watch.communicate(timeout=600)   # it stops by itself once the run has finished
    assert train.wait(timeout=600) == 0 and watch.returncode == 0, err
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert any(": running" in ln for ln in lines) and ": done" in lines[-1], out
    assert "α" in lines[-1] and "GSNR" in lines[-1]
    (run,) = [p for p in study.iterdir() if p.is_dir() and p.name != "figures"]
    assert (study / "figures" / f"dashboard-{run.name}.png").stat().st_size > 0
    shown = CliRunner().invoke(main, ["plot", str(study)])
    assert shown.exit_code == 0 and f"dashboard-{run.name}.png" in shown.output


@pytest.mark.slow
def test_watch_stops_cleanly_on_ctrl_c(tmp_path):
    cfg = RunConfig(**TINY, gradient_noise_every=10, gradient_noise_batches=2)
    run = train_run(cfg, tmp_path).path
    (run / "done").unlink()                     # looks unfinished: watch would wait for it forever
    watch = _cli("watch", str(run), "--interval", "0.2")
    line = watch.stdout.readline()
    assert run.name in line and "running" in line
    watch.send_signal(signal.SIGINT)
    out, err = watch.communicate(timeout=120)
    assert watch.returncode == 0 and "stopped" in err and "Traceback" not in err


def test_a_tracked_loop_writes_the_gradient_noise_records_of_the_built_in_loop(tmp_path):
    """The Tracker (and so the Lightning callback, which drives it) measures the feature as train_run does: α along
    the update the optimizer is about to make (SGD with momentum: not −ηg)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tracked_loop import tracked_run
    cfg = RunConfig(model="mlp", dataset="synthetic", subset=0.1, epochs=2, batch_size=20, optimizer="sgd",
                    momentum=0.9, probe_every=0, local_smoothness_samples=50, sharpness_samples=50, study="own-loop",
                    device="cpu", gradient_noise_every=4, gradient_noise_unit="both", gradient_noise_batches=3)
    train_run(cfg, tmp_path / "built-in")
    tracked_run(cfg, tmp_path / "tracked")
    built, tracked = ((tmp_path / d / cfg.run_id / "records.jsonl").read_bytes() for d in ("built-in", "tracked"))
    assert tracked == built
    kinds = [json.loads(line)["kind"] for line in built.decode().splitlines()]
    assert kinds.count("gradient_noise") == kinds.count("gradient_noise_example") == 5


def test_the_sample_is_cut_into_minibatches_of_the_runs_size_or_two_halves():
    import torch
    from experiments.features.gradient_noise.compute import fixed_minibatches
    x, y = torch.arange(100.).view(100, 1), torch.arange(100)
    order = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    batches = fixed_minibatches(x, y, order, 8, 32)            # only 3 minibatches of 32 fit in 100 images
    assert [len(b[1]) for b in batches] == [32, 32, 32] and torch.equal(batches[0][1], order[:32])
    halves = fixed_minibatches(x[:10], y[:10], torch.arange(10), 8, 32)   # fewer than two minibatches: two halves
    assert [b[1].tolist() for b in halves] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
