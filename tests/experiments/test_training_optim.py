"""train_run with the optimizers, schedules and measurements of issue 13, on the synthetic dataset: the same steps
as torch's optimizers in a hand-written loop, resume identical with optimizer and scheduler state, probes along the
actual update, step-wise sharpness with each optimizer's threshold, full-batch gradient descent."""
from __future__ import annotations

import json

import pytest
import torch

from experiments.config import RunConfig
from experiments.data import load_dataset
from experiments.losses import get_loss
from experiments.models import build_model
from experiments.optim import lr_at
from experiments.store import RunStore
from experiments.training import train_run

# 160 synthetic images, batch 32: 5 steps per pass; fc-tanh keeps every step cheap
TINY = dict(model="fc-tanh", dataset="synthetic", subset=0.08, epochs=2, batch_size=32, probe_every=0,
            sharpness_samples=32, local_smoothness_samples=64, sharpness_tol=1e-2, device="cpu")
OPTIMIZERS = {
    "sgd-momentum-nesterov-cosine": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3,
                                         lr_schedule="cosine", warmup_steps=3),
    "adam-step": dict(lr=1e-3, optimizer="adam", weight_decay=1e-3, lr_schedule="step", lr_decay_every=3,
                      lr_decay_factor=0.5),
    "adamw": dict(lr=1e-3, optimizer="adamw", weight_decay=0.1, adam_beta1=0.8),
}


def records(path):
    return [json.loads(line) for line in (path / "records.jsonl").read_text().splitlines()]


def _hand_loop(cfg: RunConfig):
    """torch's optimizer and scheduler classes written out by hand, on the run's data, seed and minibatch draws
    (train_run's sampler also draws one minibatch per evaluation, for the local smoothness)."""
    data = load_dataset(cfg.dataset, subset=cfg.subset, seed=cfg.seed)
    n = data.x_train.shape[0]
    per_epoch = cfg.steps_per_epoch(n)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, input_shape=data.input_shape)
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), momentum=cfg.momentum, nesterov=cfg.nesterov, **kw)
    else:
        cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        opt = cls(model.parameters(), betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, **kw)
    total = cfg.total_steps(n)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_at(
        t, 1.0, cfg.lr_schedule, total_steps=total, warmup_steps=cfg.warmup_steps, decay_every=cfg.lr_decay_every,
        decay_factor=cfg.lr_decay_factor))
    gen = torch.Generator().manual_seed(cfg.seed)
    losses, lrs = [], []
    for t in range(total):
        if t % per_epoch == 0 and cfg.batch_size:
            torch.randint(n, (cfg.batch_size,), generator=gen)  # the evaluation's local-smoothness minibatch
        if cfg.batch_size:
            idx = torch.randint(n, (cfg.batch_size,), generator=gen)
            xb, yb = data.x_train[idx], data.y_train[idx]
        else:
            xb, yb = data.x_train, data.y_train
        loss = get_loss(cfg.loss)(model(xb), yb)
        lrs.append(opt.param_groups[0]["lr"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses, lrs, model


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_steps_equal_torchs_optimizer_in_a_hand_written_loop(name, tmp_path):
    cfg = RunConfig(**{**TINY, **OPTIMIZERS[name]})
    outcome = train_run(cfg, tmp_path)
    steps = [r for r in records(outcome.path) if r["kind"] == "step"]
    losses, lrs, _ = _hand_loop(cfg)
    assert [r["loss"] for r in steps] == pytest.approx(losses, rel=1e-6)
    if cfg.lr_schedule == "constant":
        assert all("lr" not in r for r in steps) and set(lrs) == {cfg.lr}
    else:  # the scheduled lr of each step is recorded with it
        assert [r["lr"] for r in steps] == pytest.approx(lrs, rel=1e-12) and len(set(lrs)) > 2


@pytest.mark.parametrize("name", list(OPTIMIZERS) + ["full-batch-gd"])
def test_resume_after_kill_matches_uninterrupted_with_optimizer_state(name, tmp_path):
    extra = OPTIMIZERS.get(name, dict(batch_size=0, epochs=12, eval_every=4, lr=0.1, momentum=0.5))
    # warm-started sharpness: the next measurement's start vector travels in the checkpoint too
    cfg = RunConfig(**{**TINY, **extra, "probe_every": 2, "sharpness_every": 3, "sharpness_start": "warm",
                       "pass_sharpness": False})
    whole = records(train_run(cfg, tmp_path / "whole").path)

    class Interrupt(Exception):
        pass

    def die(run_id, done, total):
        if done > total // 2 + 1:
            raise Interrupt

    # FLUSH_EVERY is 50: with runs this short the callback fires only at the end of each pass
    import experiments.loop as loop
    old, loop.FLUSH_EVERY = loop.FLUSH_EVERY, 1
    try:
        with pytest.raises(Interrupt):
            train_run(cfg, tmp_path / "killed", progress=die)
    finally:
        loop.FLUSH_EVERY = old
    store = RunStore(tmp_path / "killed", cfg)
    assert not store.done and 0 < len(records(store.dir)) < len(whole)
    resumed = records(train_run(cfg, tmp_path / "killed", resume=True).path)
    assert resumed == whole
    # and warm starts did start warm: later measurements need fewer products than the first
    n_hvp = [r["sharpness_n_hvp"] for r in whole if r["kind"] == "sharpness"]
    assert len(n_hvp) > 2 and min(n_hvp[1:]) < n_hvp[0]


def test_probe_along_the_update_lands_where_the_step_lands(tmp_path):
    """Full-batch GD with momentum: the probe at s = η along d = Δw/η is the next point, whose loss the next step
    record holds (same batch: the whole subset)."""
    cfg = RunConfig(**{**TINY, "batch_size": 0, "epochs": 6, "lr": 0.1, "momentum": 0.9, "probe_every": 1,
                       "probe_steps": 8, "probe_direction": "update"})
    recs = records(train_run(cfg, tmp_path).path)
    probes = [r for r in recs if r["kind"] == "probe"]
    steps = {r["step"]: r["loss"] for r in recs if r["kind"] == "step"}
    assert all(p["direction"] == "update" for p in probes) and len(probes) == 6
    for p in probes[:-1]:
        assert p["step_sizes"][1] == pytest.approx(0.1)  # s = 1.0 x lr is on the grid [0.5, 4] x lr, K = 8
        assert p["losses"][1] == pytest.approx(steps[p["step"] + 1], rel=1e-5)
        assert p["base_loss"] == pytest.approx(steps[p["step"]], rel=1e-6)
    # with momentum the update is not −η·g: the probes differ from gradient probes after the first step
    grad = [r for r in records(train_run(RunConfig(**{**cfg.to_dict(), "probe_direction": "gradient"}),
                                         tmp_path / "g").path) if r["kind"] == "probe"]
    assert grad[0]["losses"] == pytest.approx(probes[0]["losses"], rel=1e-5)  # first step: no momentum yet
    assert grad[3]["losses"] != pytest.approx(probes[3]["losses"], rel=1e-3)


def test_update_probe_of_plain_sgd_is_the_gradient_probe(tmp_path):
    base = {**TINY, "probe_every": 2, "epochs": 1}
    a = [r for r in records(train_run(RunConfig(**base), tmp_path / "a").path) if r["kind"] == "probe"]
    b = [r for r in records(train_run(RunConfig(**base, probe_direction="update"), tmp_path / "b").path)
         if r["kind"] == "probe"]
    # the default direction is not named in the record (plain-SGD records stay as they always were)
    assert [r.get("direction", "gradient") for r in a] == ["gradient"] * 3 and [r["direction"] for r in b] == ["update"] * 3
    for x, y in zip(a, b):
        assert x["losses"] == pytest.approx(y["losses"], rel=1e-5)
        assert x["effective_beta"] == pytest.approx(y["effective_beta"], rel=1e-4)


@pytest.mark.parametrize("optimizer, threshold", [("sgd", 2 / 0.05), ("adam", 38 / 0.05)])
def test_sharpness_every_n_steps_with_the_optimizers_threshold(optimizer, threshold, tmp_path):
    cfg = RunConfig(**{**TINY, "lr": 0.05, "optimizer": optimizer, "sharpness_every": 3, "sharpness_samples": 0,
                       "pass_sharpness": False})
    recs = records(train_run(cfg, tmp_path).path)
    sharp = [r for r in recs if r["kind"] == "sharpness"]
    assert [r["step"] for r in sharp] == [0, 3, 6, 9]
    for r in sharp:
        assert r["samples"] == 160 and r["sharpness"] > 0 and r["sharpness_n_hvp"] > 0  # the whole subset
        assert r["stability_threshold"] == pytest.approx(threshold) and r["lr"] == 0.05
        assert ("preconditioned_sharpness" in r) == (optimizer == "adam")
    assert all("sharpness" not in r for r in recs if r["kind"] == "smoothness")  # --no-pass-sharpness
    if optimizer == "adam":  # P⁻¹ scales curvature up by orders of magnitude early in Adam's run (√v̂ is small)
        assert all(r["preconditioned_sharpness"] > 10 * r["sharpness"] for r in sharp)


def test_full_batch_gd_takes_one_step_per_pass_and_evaluates_every_n(tmp_path):
    cfg = RunConfig(**{**TINY, "batch_size": "full", "epochs": 7, "eval_every": 3, "lr": 0.1})
    assert cfg.batch_size == 0 and cfg.steps_per_epoch(160) == 1
    outcome = train_run(cfg, tmp_path)
    recs = records(outcome.path)
    assert [r["step"] for r in recs if r["kind"] == "step"] == list(range(7))
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [0, 3, 6, 7]  # every 3 passes, and at the end
    assert sorted(p.name for p in (outcome.path / "checkpoints").iterdir()) == [
        "epoch-000.pt", "epoch-003.pt", "epoch-006.pt", "epoch-007.pt"]
    losses, _, _ = _hand_loop(cfg)
    assert [r["loss"] for r in recs if r["kind"] == "step"] == pytest.approx(losses, rel=1e-6)


def test_mse_loss_is_used_everywhere(tmp_path):
    cfg = RunConfig(**{**TINY, "loss": "mse", "probe_every": 2, "epochs": 1})
    recs = records(train_run(cfg, tmp_path).path)
    losses, _, model = _hand_loop(cfg)
    assert [r["loss"] for r in recs if r["kind"] == "step"] == pytest.approx(losses, rel=1e-6)
    first = next(r for r in recs if r["kind"] == "probe")
    assert first["base_loss"] == pytest.approx(losses[0], rel=1e-6)
    data = load_dataset("synthetic", subset=0.08)
    with torch.no_grad():
        expected = float(get_loss("mse")(model.eval()(data.x_test), data.y_test))
    assert recs[-2]["kind"] == "eval" and recs[-2]["test_loss"] == pytest.approx(expected, rel=1e-5)


def test_cli_takes_full_batch_and_the_optimizer_options(tmp_path):
    from click.testing import CliRunner

    from experiments.cli import main
    args = ["--quiet", "train", "--model", "fc-tanh", "--dataset", "synthetic", "--subset", "0.05", "--epochs", "3",
            "--batch-size", "full", "--optimizer", "adam", "--lr", "0.001", "--lr-schedule", "cosine",
            "--warmup-steps", "2", "--sharpness-every", "2", "--sharpness-samples", "16", "--probe-every", "0",
            "--local-smoothness-samples", "16", "--device", "cpu", "--results-dir", str(tmp_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "train").iterdir()
    config = json.loads((run / "config.json").read_text())
    assert (config["batch_size"], config["optimizer"], config["lr_schedule"], config["warmup_steps"]) == (
        0, "adam", "cosine", 2)
    sharp = [r for r in records(run) if r["kind"] == "sharpness"]
    assert [r["step"] for r in sharp] == [0, 2] and all("preconditioned_sharpness" in r for r in sharp)
    bad = CliRunner().invoke(main, ["train", "--batch-size", "half", "--results-dir", str(tmp_path)])
    assert bad.exit_code == 2 and "'half' is neither a positive integer nor 'full'" in bad.output
