"""Resume after a kill at ANY point gives records.jsonl byte-identical to an uninterrupted run (issue 10, item 1),
and the store orders its writes so that a power loss cannot leave a checkpoint without its records (item 10).

A process kill is simulated in-process, deterministically: a hook raises `Kill` before the k-th record is appended
(or after half of its line was written), or just before / just after the j-th file rename (checkpoints, config.json,
timing.json, done). Those are the only moments at which the run's files change, so together they cover every state
a SIGKILL can leave on disk: before the first checkpoint, inside every pass, in the middle of a measurement, between
a checkpoint and the records that follow it, and after the last record but before `done`. A power loss is simulated
on top of that by rolling back what was never fsynced. One real SIGKILL of a subprocess checks the same end to end.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from experiments.config import RunConfig
from experiments.store import RunStore
from experiments.training import train_run

# MNIST-1D with the seed-000 MLP: 120 training signals, 4 steps a pass, 3 passes, a probe every 3 steps; 24 records.
# About 0.2 s a run, so every kill point can be tried.
CFG = RunConfig(model="mlp", dataset="mnist1d", subset=0.03, epochs=3, batch_size=32, probe_every=3, probe_steps=3,
                local_smoothness_samples=64, sharpness_samples=32, sharpness_tol=1e-2, study="killpoints")
# the noisy-BN MLP draws from torch's global RNG in every training forward pass: resume must restore that RNG too
NOISY = RunConfig(**{**CFG.to_dict(), "model": "bn-mlp", "norm": "noisy"})


class Kill(BaseException):
    """Stands in for SIGKILL: a BaseException, so that no `except Exception` in the code under test swallows it."""


class Hooks:
    """Counts record appends and file renames while a run executes, and kills it at a chosen one.

    ``point`` is ``(kind, n)``: ``append`` kills before the n-th record is written, ``torn`` after half of its line
    was written, ``replace-before`` / ``replace-after`` just before / after the n-th ``os.replace``."""

    def __init__(self, point=None):
        self.kind, self.at = point if point is not None else (None, None)
        self.appends = 0
        self.replaces = []

    def install(self, mp: pytest.MonkeyPatch) -> "Hooks":
        append, replace = RunStore.append, os.replace

        def hooked_append(store, record):
            if self.kind in ("append", "torn") and self.appends == self.at:
                if self.kind == "torn":
                    line = json.dumps(record).encode()
                    with open(store.records_path, "ab") as f:
                        f.write(line[:len(line) // 2])
                raise Kill
            self.appends += 1
            return append(store, record)

        def hooked_replace(src, dst, *args, **kwargs):
            n = len(self.replaces)
            self.replaces.append(Path(dst).name)
            if self.kind == "replace-before" and n == self.at:
                raise Kill
            replace(src, dst, *args, **kwargs)
            if self.kind == "replace-after" and n == self.at:
                raise Kill

        mp.setattr(RunStore, "append", hooked_append)
        mp.setattr(os, "replace", hooked_replace)
        return self


def records_bytes(root: Path, cfg: RunConfig = CFG) -> bytes:
    return (root / cfg.run_id / "records.jsonl").read_bytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its records' bytes, and how many appends and renames it made."""
    out = {}
    for cfg in (CFG, NOISY):
        root = tmp_path_factory.mktemp("reference")
        with pytest.MonkeyPatch.context() as mp:
            hooks = Hooks().install(mp)
            assert train_run(cfg, root).status == "done"
        out[cfg.run_id] = (records_bytes(root, cfg), hooks.appends, hooks.replaces)
    return out


def kill_and_resume(root: Path, point, cfg: RunConfig = CFG, after_crash=None) -> bytes:
    """Run until the kill at ``point``, optionally damage the files as a power loss would, resume, return records."""
    with pytest.MonkeyPatch.context() as mp:
        hooks = Hooks(point).install(mp)
        if after_crash is not None:
            after_crash.install(mp)
        try:
            train_run(cfg, root, resume=True)
        except Kill:
            pass
        else:
            raise AssertionError(f"the kill point {point} was never reached ({hooks.appends} appends, "
                                 f"renames {hooks.replaces})")
    if after_crash is not None:
        after_crash.power_loss()
    outcome = train_run(cfg, root, resume=True)
    # "skipped": the kill came after `done` was renamed in
    assert outcome.status in ("done", "skipped") and (outcome.path / "done").exists(), point
    return records_bytes(root, cfg)


def _mismatches(reference_bytes, points, tmp_path, cfg=CFG):
    """The kill points whose resumed records differ from the uninterrupted run's."""
    return [point for i, point in enumerate(points)
            if kill_and_resume(tmp_path / f"p{i}", point, cfg) != reference_bytes]


def test_resume_from_a_kill_before_every_record_is_byte_identical(reference, tmp_path):
    ref, n_appends, _ = reference[CFG.run_id]
    assert n_appends == 3 * 4 + len(range(0, 3 * 4, 3)) + 2 * (3 + 1)  # steps, probes, eval + smoothness
    points = [("append", k) for k in range(n_appends)]
    assert _mismatches(ref, points, tmp_path) == []


def test_resume_from_a_torn_record_line_is_byte_identical(reference, tmp_path):
    """The kill lands in the middle of writing a line: the issue's case (inside the first pass) and a measurement."""
    ref, n_appends, _ = reference[CFG.run_id]
    assert _mismatches(ref, [("torn", 4), ("torn", 9), ("torn", n_appends - 1)], tmp_path) == []


def test_resume_from_a_kill_around_every_rename_is_byte_identical(reference, tmp_path):
    """Before/after each checkpoint, config.json, timing.json and done rename (so also: checkpoint written, the
    records after it not yet)."""
    ref, _, renames = reference[CFG.run_id]
    assert sum(name.startswith("epoch-") for name in renames) == CFG.epochs + 1
    points = [(kind, j) for j in range(len(renames)) for kind in ("replace-before", "replace-after")]
    assert _mismatches(ref, points, tmp_path) == []


def test_resume_restores_the_global_rng_of_noisy_modules(reference, tmp_path):
    """Noisy BatchNorm draws its shift from torch's global RNG: kills inside each pass and mid-measurement."""
    ref, n_appends, _ = reference[NOISY.run_id]
    points = [("append", k) for k in (1, 4, 9, 14, 19, n_appends - 1)]
    assert _mismatches(ref, points, tmp_path, cfg=NOISY) == []


def test_a_second_kill_during_the_resume_is_also_recovered(reference, tmp_path):
    ref, _, _ = reference[CFG.run_id]
    root = tmp_path / "twice"
    for point in (("append", 5), ("append", 3), ("replace-after", 2)):  # counted from each relaunch's start
        with pytest.MonkeyPatch.context() as mp:
            Hooks(point).install(mp)
            with pytest.raises(Kill):
                train_run(CFG, root, resume=True)
    assert train_run(CFG, root, resume=True).status == "done"
    assert records_bytes(root) == ref


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_on_cuda_restores_the_device_rng_of_noisy_modules(tmp_path):
    """On CUDA, noisy BatchNorm draws from the device's generator, which the checkpoint must carry as well."""
    cfg = RunConfig(**{**NOISY.to_dict(), "device": "cuda"})
    whole = [records_bytes(tmp_path / f"whole{i}", cfg) for i in range(2)
             if train_run(cfg, tmp_path / f"whole{i}").status == "done"]
    if whole[0] != whole[1]:
        pytest.skip("two uninterrupted CUDA runs differ here (non-deterministic kernels): nothing to compare with")
    assert _mismatches(whole[0], [("append", 4), ("append", 14)], tmp_path, cfg=cfg) == []


# -- power loss: what was never fsynced is gone ----------------------------------------------------------------
class PowerLoss:
    """Simulates a power loss at the kill: records.jsonl loses what was written after its last fsync, and
    (``lose_renames``) a rename is undone unless its directory was fsynced after it. Install it after `Hooks`."""

    def __init__(self, records_path: Path, lose_renames: bool):
        self.records_path = records_path.resolve()
        self.lose_renames = lose_renames
        self.synced = {}       # file -> its size at its last fsync
        self.pending = []      # renames not yet made durable by an fsync of their directory: (dst, old bytes)

    def install(self, mp: pytest.MonkeyPatch) -> "PowerLoss":
        fsync, replace = os.fsync, os.replace   # os.replace is already the Hooks wrapper: it may raise Kill

        def hooked_fsync(fd):
            fsync(fd)
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
            if path.is_dir():
                self.pending = [(dst, old) for dst, old in self.pending if dst.parent != path]
            else:
                self.synced[path] = os.fstat(fd).st_size

        def hooked_replace(src, dst, *args, **kwargs):
            src, dst = Path(src).resolve(), Path(dst).resolve()
            old = dst.read_bytes() if dst.exists() else None
            try:
                replace(src, dst, *args, **kwargs)
            finally:
                if not src.exists():  # the rename happened (before or after a Kill)
                    self.pending.append((dst, old))
                    if src in self.synced:
                        self.synced[dst] = self.synced.pop(src)

        mp.setattr(os, "fsync", hooked_fsync)
        mp.setattr(os, "replace", hooked_replace)
        return self

    def power_loss(self) -> None:
        if self.lose_renames:
            for dst, old in reversed(self.pending):
                if old is None:
                    dst.unlink()
                else:
                    dst.write_bytes(old)
        if self.records_path.exists():
            with open(self.records_path, "r+b") as f:
                f.truncate(min(self.synced.get(self.records_path, 0), os.fstat(f.fileno()).st_size))


@pytest.mark.parametrize("lose_renames", [False, True], ids=["renames-kept", "renames-lost"])
def test_power_loss_at_any_rename_never_leaves_a_checkpoint_without_its_records(reference, tmp_path, lose_renames):
    ref, _, renames = reference[CFG.run_id]
    points = [("replace-after", j) for j in range(len(renames))]  # the moments just before an fsync

    def loss():
        return PowerLoss(tmp_path / f"p{loss.i}" / CFG.run_id / "records.jsonl", lose_renames)

    bad = []
    for i, point in enumerate(points):
        loss.i = i
        if kill_and_resume(tmp_path / f"p{i}", point, CFG, loss()) != ref:
            bad.append(point)
    assert bad == []


# -- a real SIGKILL, through the command line -----------------------------------------------------------------
_CHILD = r"""
import sys, time
from experiments.store import RunStore
from experiments.cli import main

marker, pause_before = sys.argv[1], int(sys.argv[2])
append, count = RunStore.append, [0]

def paused_append(store, record):  # pause (to be killed) before the n-th record: a deterministic kill point
    if count[0] == pause_before:
        open(marker, "w").close()
        time.sleep(600)
    count[0] += 1
    append(store, record)

RunStore.append = paused_append
main(sys.argv[3:], prog_name="smoothness-lab")
"""
_TRAIN = ["--model", "mlp", "--dataset", "mnist1d", "--subset", "0.03", "--epochs", "3", "--batch-size", "32",
          "--probe-every", "3", "--probe-steps", "3", "--local-smoothness-samples", "64", "--sharpness-samples", "32",
          "--sharpness-tol", "0.01", "--study", "killpoints"]


@pytest.mark.slow
def test_sigkill_inside_the_first_pass_then_train_resume_is_byte_identical(tmp_path):
    """The issue's setup: kill -9 after epoch-000.pt exists but before epoch-001.pt, then `train --resume`."""
    from click.testing import CliRunner

    from experiments.cli import main
    killed, marker = tmp_path / "killed", tmp_path / "paused"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(marker), "6", "-q", "train", *_TRAIN,
                              "--results-dir", str(killed)], env=env)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert child.poll() is None, "the child run ended before its kill point"
            assert time.monotonic() < deadline, "the child run never reached its kill point"
            time.sleep(0.1)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    run = killed / "killpoints" / CFG.run_id
    assert (run / "checkpoints" / "epoch-000.pt").exists() and not (run / "checkpoints" / "epoch-001.pt").exists()
    assert not (run / "done").exists()

    refused = CliRunner().invoke(main, ["-q", "train", *_TRAIN, "--results-dir", str(killed)])
    assert refused.exit_code != 0 and "--resume" in refused.output
    resumed = CliRunner().invoke(main, ["-q", "train", *_TRAIN, "--results-dir", str(killed), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    whole = CliRunner().invoke(main, ["-q", "train", *_TRAIN, "--results-dir", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    assert (run / "done").exists()
    assert (run / "records.jsonl").read_bytes() == records_bytes(tmp_path / "whole" / "killpoints")
