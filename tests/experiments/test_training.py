"""The training loop on the synthetic dataset: schedule, determinism, resume, divergence, restoration."""
import json

import pytest
import torch

from experiments.config import RunConfig
from experiments.store import RunStore, StoreError
from experiments.training import train_run

TINY = dict(dataset="synthetic", subset=0.08, epochs=2, batch_size=32, probe_every=2, probe_steps=3,
            sharpness_samples=32, local_smoothness_samples=64)


def records(path):
    return [json.loads(line) for line in (path / "records.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cfg = RunConfig(model="bn-convnet", **TINY)
    outcome = train_run(cfg, root)
    return cfg, outcome, records(outcome.path)


def test_schedule_and_schema(finished):
    cfg, outcome, recs = finished
    assert outcome.status == "done" and (outcome.path / "done").exists()
    steps_per_epoch = round(160 / 32)
    kinds = [r["kind"] for r in recs]
    assert kinds.count("step") == 2 * steps_per_epoch
    assert kinds.count("probe") == len(range(0, 2 * steps_per_epoch, 2))
    assert kinds.count("eval") == 3 and kinds.count("smoothness") == 3  # init + after each pass
    for r in recs:
        assert r["bn_mode"] in ("batch", "running") and isinstance(r["step"], int)
    probe = next(r for r in recs if r["kind"] == "probe")
    assert probe["step_sizes"] == pytest.approx(list(cfg.step_sizes))
    assert probe["loss_min"] == min(probe["losses"]) and probe["loss_max"] == max(probe["losses"])
    assert probe["effective_beta"] == pytest.approx(max(
        g / (s * probe["grad_norm"]) for g, s in zip(probe["grad_diff_norms"], probe["step_sizes"])))
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [0, 1, 2] and evals[0]["bn_mode"] == "running"
    smooth = [r for r in recs if r["kind"] == "smoothness"]
    assert all(r["local_smoothness"] > 0 and r["sharpness"] > 0 and r["sharpness_n_hvp"] > 0 for r in smooth)
    timing = json.loads((outcome.path / "timing.json").read_text())
    assert {"train", "probe", "eval", "local_smoothness", "sharpness"} <= set(timing)
    assert timing["total"] == pytest.approx(sum(v for k, v in timing.items() if k != "total"))
    assert sorted(p.name for p in (outcome.path / "checkpoints").iterdir()) == [
        "epoch-000.pt", "epoch-001.pt", "epoch-002.pt"]


def test_learns_on_synthetic(finished):
    _, _, recs = finished
    evals = [r for r in recs if r["kind"] == "eval"]
    assert evals[-1]["test_accuracy"] > evals[0]["test_accuracy"] + 0.2


def test_same_seed_identical_records_and_finished_run_skipped(finished, tmp_path):
    cfg, _, recs = finished
    assert records(train_run(cfg, tmp_path).path) == recs
    again = train_run(cfg, tmp_path)
    assert again.status == "skipped"


def test_other_seed_differs(finished, tmp_path):
    cfg, _, recs = finished
    other = records(train_run(RunConfig(model="bn-convnet", **{**TINY, "seed": 1}), tmp_path).path)
    assert [r.get("loss") for r in other if r["kind"] == "step"] != [r.get("loss") for r in recs if r["kind"] == "step"]


class _Interrupt(Exception):
    pass


def test_resume_after_kill_matches_uninterrupted(finished, tmp_path):
    cfg, _, recs = finished

    def die_in_second_epoch(run_id, done, total):
        if done > 7:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train_run(cfg, tmp_path, progress=die_in_second_epoch)
    store = RunStore(tmp_path, cfg)
    partial = records(store.dir)
    assert not store.done and len(partial) < len(recs)
    with pytest.raises(StoreError, match="--resume"):
        train_run(cfg, tmp_path)
    outcome = train_run(cfg, tmp_path, resume=True)
    assert outcome.status == "done"
    assert records(outcome.path) == recs


def test_divergence_is_recorded_and_stops_the_run(tmp_path):
    cfg = RunConfig(model="convnet", lr=500.0, **{**TINY, "epochs": 3})
    outcome = train_run(cfg, tmp_path)
    assert outcome.status == "diverged"
    recs = records(outcome.path)
    assert recs[-1]["kind"] == "diverged" and recs[-1]["loss"] is None
    assert recs[-1]["step"] == outcome.steps
    assert all(r["step"] <= outcome.steps for r in recs)
    assert (outcome.path / "done").exists()


def test_global_rng_untouched_by_nothing_but_seed(tmp_path):
    """A run seeds torch itself: two runs in one process do not leak RNG state into each other's numbers."""
    torch.manual_seed(123)
    a = records(train_run(RunConfig(model="convnet", **{**TINY, "epochs": 1}), tmp_path / "a").path)
    torch.manual_seed(999)
    b = records(train_run(RunConfig(model="convnet", **{**TINY, "epochs": 1}), tmp_path / "b").path)
    assert a == b
