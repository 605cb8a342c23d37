"""experiments.Tracker: a plain loop tracked by it writes the built-in loop's records (byte for byte, when it draws
its batches as train_run does), survives a kill, leaves training unchanged, and every command reads its run."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import experiments
from experiments.cli import main
from experiments import features as measurements
from experiments.config import ConfigError, RunConfig
from experiments.loop import Diverged, Hook
from experiments.features import Measurement, Option, Record
from experiments.features.base import every
from experiments.store import StoreError, read_records
from experiments.tracker import Tracker, run_config
from experiments.training import train_run

sys.path.insert(0, str(Path(__file__).parent))
from tracked_loop import tracked_run  # noqa: E402

HERE = Path(__file__).parent
ROOT = HERE.parents[1]

# MLP on the synthetic set: 200 images, 10 steps a pass; SGD with momentum, so the update is not −ηg
CFG = RunConfig(model="mlp", dataset="synthetic", subset=0.1, epochs=2, batch_size=20, optimizer="sgd", momentum=0.9,
                probe_every=3, probe_direction="update", sharpness_every=4, local_smoothness_samples=50,
                sharpness_samples=50, study="own-loop", device="cpu")


def _records(root: Path, cfg: RunConfig) -> bytes:
    return (root / cfg.run_id / "records.jsonl").read_bytes()


def test_exported_from_the_package():
    assert experiments.Tracker is Tracker


def test_a_tracked_loop_writes_the_records_of_the_built_in_loop(tmp_path):
    train_run(CFG, tmp_path / "built-in")
    tracked_run(CFG, tmp_path / "tracked")
    assert _records(tmp_path / "tracked", CFG) == _records(tmp_path / "built-in", CFG)
    kinds = {r["kind"] for r in read_records(tmp_path / "tracked" / CFG.run_id / "records.jsonl")}
    assert kinds == {"step", "probe", "sharpness", "eval", "smoothness"}
    run = tmp_path / "tracked" / CFG.run_id
    assert (run / "done").exists() and (run / "weights-init.pt").exists() and (run / "weights-final.pt").exists()
    assert json.loads((run / "tracker.json").read_text())["model_class"] == "experiments.models.MLP"


def test_adam_and_a_schedule_are_recorded_as_the_built_in_loop_records_them(tmp_path):
    cfg = dataclasses.replace(CFG, optimizer="adam", momentum=0.0, lr=1e-3, lr_schedule="cosine", warmup_steps=3,
                              probe_every=5, sharpness_every=10, epochs=1)
    train_run(cfg, tmp_path / "built-in")
    tracked_run(cfg, tmp_path / "tracked")
    assert _records(tmp_path / "tracked", cfg) == _records(tmp_path / "built-in", cfg)
    records = read_records(tmp_path / "tracked" / cfg.run_id / "records.jsonl")
    assert "preconditioned_sharpness" in next(r for r in records if r["kind"] == "sharpness")
    assert all("lr" in r for r in records if r["kind"] == "step")


def test_tracking_leaves_the_training_unchanged(tmp_path):
    tracked = tracked_run(CFG, tmp_path / "t", share_sampler=False)
    untracked = tracked_run(CFG, tmp_path / "u", track=False)
    for (name, a), b in zip(tracked.state_dict().items(), untracked.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("crash_at", [4, 15])   # before the first checkpoint (pass 1), and in pass 2 after it
def test_a_killed_tracked_loop_resumes_to_the_records_of_an_uninterrupted_one(tmp_path, crash_at):
    cfg = dataclasses.replace(CFG, epochs=3)
    tracked_run(cfg, tmp_path / "whole")
    script = [sys.executable, str(HERE / "tracked_loop.py"), str(tmp_path / "killed"), json.dumps(cfg.to_dict())]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    died = subprocess.run(script + [str(crash_at)], env=env, capture_output=True, text=True)
    assert died.returncode == 3, died.stderr
    assert not (tmp_path / "killed" / cfg.run_id / "done").exists()
    again = subprocess.run(script, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert _records(tmp_path / "killed", cfg) == _records(tmp_path / "whole", cfg)


# -- a measurement registered from outside the package, after import: a gradient hook, a point hook and state that a
# checkpoint must carry (the number of gradient calls so far, in every record)
def _outside_hooks(ctx):
    every_n = ctx.cfg.outside_every
    if not every_n:
        return ()
    count = {"n": 0}
    ctx.checkpointed["outside_count"] = (lambda: count["n"], lambda n: count.update(n=n or 0))

    def gradient(state):
        count["n"] += 1
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in ctx.model.parameters() if p.grad is not None))
        return ctx.at(state.step, {"kind": "outside_grad", "bn_mode": "batch", "grad_norm": float(norm),
                                   "calls": count["n"]})

    def point(state):
        return ctx.at(state.step, {"kind": "outside_point", "bn_mode": "batch", "calls": count["n"]})

    return (Hook("outside_grad", every_n, "gradient", gradient), Hook("outside_point", ctx.per_eval, "point", point))


OUTSIDE = Measurement(
    name="outside", schedule="every --outside-every steps (0 = off) and at every evaluation",
    options=(Option("outside_every", int, 0, "gradient norm every N steps (0 = off)", check=every),),
    records=(Record("outside_grad", numbers=("grad_norm", "calls")), Record("outside_point", numbers=("calls",))),
    hooks=_outside_hooks)


@pytest.fixture
def outside():
    measurements.register(OUTSIDE)
    try:
        yield OUTSIDE
    finally:
        measurements.unregister("outside")


def test_a_measurement_registered_after_import_runs_in_a_tracked_loop_and_resumes(outside, tmp_path):
    cfg = dataclasses.replace(CFG, epochs=3, probe_every=0, sharpness_every=0, pass_sharpness=False, outside_every=3)
    train_run(cfg, tmp_path / "built-in")
    tracked_run(cfg, tmp_path / "tracked")
    assert _records(tmp_path / "tracked", cfg) == _records(tmp_path / "built-in", cfg)
    records = read_records(tmp_path / "tracked" / cfg.run_id / "records.jsonl")
    assert [r["step"] for r in records if r["kind"] == "outside_grad"] == list(range(0, 30, 3))
    assert [(r["step"], r["calls"]) for r in records if r["kind"] == "outside_point"] == \
        [(0, 0), (10, 4), (20, 7), (30, 10)]
    # interrupted in pass 2, after the checkpoint of pass 1: the resumed tracker gets the measurement's state back
    tracked_run(cfg, tmp_path / "interrupted", interrupt_at=15)
    assert not (tmp_path / "interrupted" / cfg.run_id / "done").exists()
    tracked_run(cfg, tmp_path / "interrupted")
    assert _records(tmp_path / "interrupted", cfg) == _records(tmp_path / "tracked", cfg)


def _loop(tmp_path, cfg=CFG, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    x, y = torch.randn(40, 1, 28, 28), torch.randint(10, (40,))
    return Tracker(tmp_path, model, F.cross_entropy, opt, train_data=(x, y), test_data=(x[:10], y[:10]),
                   config=cfg, **kw), model, opt, (x, y)


def test_a_config_that_does_not_describe_the_optimizer_is_refused(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(784, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="lr: config 0.04, optimizer 0.1"):
        Tracker(tmp_path, model, F.cross_entropy, opt, train_data=(torch.randn(4, 784), torch.arange(4)),
                test_data=(torch.randn(4, 784), torch.arange(4)), config=RunConfig())
    assert run_config(opt, model="mlp", study="mine").lr == 0.1


def test_an_interrupted_run_needs_resume_and_a_finished_one_is_kept(tmp_path):
    tracker, model, opt, (x, y) = _loop(tmp_path)
    with tracker.step((x[:20], y[:20])) as s:
        loss = F.cross_entropy(model(x[:20]), y[:20])
        loss.backward()
        opt.step()
        s.record(loss)
    tracker.checkpoint()
    tracker.close_files()
    again, *_ = _loop(tmp_path)
    with pytest.raises(StoreError, match="call tracker.resume"):
        again.begin_step((x, y))
    again, *_ = _loop(tmp_path)
    assert again.resume() == {} and again.step_index == 1
    for _ in range(CFG.epochs):
        again.end_epoch()
    again.close()
    with pytest.raises(StoreError, match="finished run"):
        _loop(tmp_path)[0].resume()


def test_a_step_without_its_loss_or_with_a_closure_is_refused(tmp_path):
    tracker, model, opt, (x, y) = _loop(tmp_path)
    with pytest.raises(RuntimeError, match="s.record"):
        with tracker.step((x, y)):
            pass
    with pytest.raises(RuntimeError, match="closure"):
        with tracker.step((x, y)):
            opt.step(lambda: F.cross_entropy(model(x), y))


def test_divergence_writes_the_diverged_record_and_finishes_the_run(tmp_path):
    cfg = dataclasses.replace(CFG, probe_every=0, sharpness_every=0)
    tracker, model, opt, (x, y) = _loop(tmp_path, cfg)
    with pytest.raises(Diverged):
        for t in range(5):
            with tracker.step((x, y)) as s:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                s.record(loss * (float("nan") if t == 3 else 1.0))
        tracker.end_epoch()   # step records are written in bulk: here the loss of step 3 is seen
    run = tmp_path / tracker.config.run_id   # named after the network's class (nn.Sequential), not "mlp"
    records = read_records(run / "records.jsonl")
    assert [r["step"] for r in records if r["kind"] == "step"] == [0, 1, 2]
    assert records[-1]["kind"] == "diverged" and records[-1]["step"] == 3
    assert (run / "done").exists() and tracker.finished


def test_every_command_reads_a_tracked_run(tmp_path):
    cfg = dataclasses.replace(CFG, spectrum_every=2, probe_every=5, sharpness_every=0)
    tracked_run(cfg, tmp_path)
    run = tmp_path / cfg.run_id
    for args in (["status", str(tmp_path)], ["plot", str(tmp_path)], ["report", str(tmp_path)],
                 ["spectrum", str(tmp_path)],
                 ["surface", str(run), "--grid", "3", "--samples", "50", "--executor", "serial"]):
        result = CliRunner().invoke(main, ["-q", *args])
        assert result.exit_code == 0, (args, result.output)
    assert (tmp_path / "report.md").exists() and list((tmp_path / "figures").glob("*.png"))
    assert list((run / "surfaces").glob("*.npz"))


def test_map_style_datasets_and_loss_modules_are_accepted(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(30, 784), torch.randint(10, (30,))
    model = torch.nn.Linear(784, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = run_config(opt, model="mlp", dataset="synthetic", batch_size=10, epochs=1, probe_every=1,
                     local_smoothness_samples=20, sharpness_samples=20, study="own")
    tracker = Tracker(tmp_path, model, torch.nn.CrossEntropyLoss(), opt,
                      train_data=torch.utils.data.TensorDataset(x, y), test_data=(x[:5], y[:5]), config=cfg)
    assert torch.equal(tracker.data.x_train, x) and torch.equal(tracker.data.y_train, y)
    with tracker:
        with tracker.step((x[:10], y[:10])) as s:
            loss = torch.nn.functional.cross_entropy(model(x[:10]), y[:10])
            loss.backward()
            opt.step()
            s.record(loss)
        tracker.end_epoch()
    records = read_records(tmp_path / tracker.config.run_id / "records.jsonl")
    assert [r["kind"] for r in records] == ["eval", "smoothness", "probe", "step", "eval", "smoothness"]
    assert records[3]["accuracy"] is None   # no outputs given: no accuracy
