"""The launchers (experiments.launchers) on tiny synthetic sweeps: serial, process and Ray executors give identical
records; finished runs are skipped untouched; a run that raises or whose process dies (at any point: see dying.py)
is reported and the others finish; a directory holding another config stops the launch before anything is
written."""
import array
import fcntl
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import termios
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as mp_wait
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from dying import EXIT_CODE, Bomb  # noqa: E402

from experiments import launchers  # noqa: E402
from experiments.config import RunConfig, StudyConfig  # noqa: E402
from experiments.executors import process as process_executor  # noqa: E402
from experiments.executors.ray import check_ray_address  # noqa: E402
from experiments.launchers import RunOutcome, launch, preflight  # noqa: E402
from experiments.status import run_info  # noqa: E402
from experiments.store import StoreError  # noqa: E402

TINY = dict(dataset="synthetic", subset=0.05, epochs=1, batch_size=32, probe_every=5, sharpness_samples=32,
            local_smoothness_samples=64)


def grid(models=("convnet", "bn-convnet"), lrs=(0.04,), seeds=(0, 1), name="grid", **over):
    return StudyConfig(name=name, models=tuple(models), lrs=tuple(lrs), seeds=tuple(seeds),
                       base=RunConfig(study=name, **{**TINY, **over})).runs()


def records(root):
    """{run id: parsed records} for every run directory under root."""
    return {p.name: [json.loads(line) for line in (p / "records.jsonl").read_text().splitlines()]
            for p in sorted(root.iterdir()) if (p / "config.json").exists()}


def snapshot(run_dir):
    """Bytes and mtime of every file in a run directory."""
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The grid run by the serial executor: the reference every other executor must match."""
    root = tmp_path_factory.mktemp("serial")
    results = launch(grid(), root, executor="serial", quiet=True)
    return root, results


def test_threads_default_is_the_same_for_every_executor():
    assert launchers.default_threads() == launchers.DEFAULT_THREADS == 1  # whatever the number of workers
    assert "Threads and reproducibility" in launchers.__doc__


def test_serial_finishes_every_run_with_a_run_log(reference):
    root, results = reference
    assert [r.run_id for r in results] == [c.run_id for c in grid()]
    assert {r.status for r in results} == {"done"}
    for cfg in grid():
        log = (root / cfg.run_id / "run.log").read_text()
        assert f"start {cfg.run_id} pid=" in log and "threads=1" in log
        assert f"finish {cfg.run_id}: done after 3 steps" in log
        assert run_info(root / cfg.run_id)[0] == "done"


def test_process_executor_gives_identical_records(reference, tmp_path):
    results = launch(grid(), tmp_path, executor="process", workers=2, quiet=True)
    assert {r.status for r in results} == {"done"}
    assert records(tmp_path) == records(reference[0])
    logs = [(tmp_path / r.run_id / "run.log").read_text() for r in results]
    pids = {log.split(" pid=")[1].split()[0] for log in logs}
    assert len(pids) == 4 and str(os.getpid()) not in pids   # a process of its own for every run, not this one
    assert all(" threads=1 " in log for log in logs)


@pytest.mark.needs_ray
def test_ray_executor_gives_identical_records(reference, tmp_path):
    import ray
    (broken,) = grid(models=("convnet",), seeds=(7,))
    (tmp_path / broken.run_id).mkdir()
    (tmp_path / broken.run_id / "records.jsonl").write_text("garbage\n{}\n")   # this one fails at once
    results = launch(grid() + (broken,), tmp_path, executor="ray", workers=2, resume=True, quiet=True)
    assert not ray.is_initialized()           # the local cluster started for the launch is shut down
    assert [r.status for r in results] == ["done"] * 4 + ["failed"]
    assert "corrupt" in results[-1].error and "ERROR failed" in (tmp_path / broken.run_id / "run.log").read_text()
    shutil.rmtree(tmp_path / broken.run_id)
    assert records(tmp_path) == records(reference[0])


def test_finished_runs_are_skipped_untouched_and_duplicates_run_once(reference):
    root, _ = reference
    before = {cfg.run_id: snapshot(root / cfg.run_id) for cfg in grid()}
    again = grid() + grid(models=("convnet:none",))      # convnet:none is convnet: the same run ids
    results = launch(again, root, executor="process", workers=2, quiet=True)
    assert [r.run_id for r in results] == [c.run_id for c in grid()]
    assert {r.status for r in results} == {"skipped"}
    assert {cfg.run_id: snapshot(root / cfg.run_id) for cfg in grid()} == before


def test_a_directory_with_another_config_stops_the_launch(tmp_path):
    runs = grid(seeds=(0,))
    victim = tmp_path / runs[0].run_id
    victim.mkdir()
    theirs = {**runs[0].to_dict(), "run_id": runs[0].run_id, "config_hash": "0123456789ab"}
    (victim / "config.json").write_text(json.dumps(theirs))
    (victim / "records.jsonl").write_text('{"kind": "step"}\n')
    before = snapshot(victim)
    for executor in ("serial", "process"):
        with pytest.raises(StoreError, match=r"holds a different config.*'0123456789ab'"):
            launch(runs, tmp_path, executor=executor, quiet=True)
    assert snapshot(victim) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [runs[0].run_id]   # the other run was not started
    (victim / "config.json").write_text("{not json")
    with pytest.raises(StoreError, match="unreadable.*not valid JSON"):
        preflight(runs, tmp_path)
    (victim / "config.json").write_text(json.dumps({**runs[0].to_dict(), "lr": 0.5}))  # another run's options
    with pytest.raises(StoreError, match=r"holds a different config \(hash"):
        preflight(runs, tmp_path)


def test_a_failing_run_is_reported_and_the_others_finish(tmp_path):
    broken, good = grid(models=("convnet",), seeds=(0, 1))
    bad_dir = tmp_path / broken.run_id
    bad_dir.mkdir()
    (bad_dir / "records.jsonl").write_text("garbage\n{}\n")      # a corrupt line that is not the last one
    results = launch([broken, good], tmp_path, executor="process", workers=2, resume=True, quiet=True)
    assert [r.status for r in results] == ["failed", "done"]
    assert "StoreError" in results[0].error and "corrupt" in results[0].error
    log = (bad_dir / "run.log").read_text()
    assert "ERROR failed: StoreError" in log and "Traceback" in log
    assert run_info(bad_dir) == ("corrupt", "records.jsonl:1: not valid JSON (Expecting value at column 1)")
    assert (tmp_path / good.run_id / "done").exists()


def _start_pid(log_path):
    try:
        text = log_path.read_text()
    except OSError:
        return None
    return int(text.split(" pid=")[1].split()[0]) if " pid=" in text else None


def wait_for(condition, what: str, timeout: float = 600.0):
    """Poll ``condition()`` until it is true; the deadline is only a guard against a hang, never part of the test."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what}"
        time.sleep(0.02)
    return value


def test_a_killed_run_process_fails_only_its_run(tmp_path):
    """A run's process killed mid-run (out of memory, kill -9): that run is failed, the others finish; relaunching
    resumes the killed run. The victim holds still after its first record until the test kills it (no race
    between the kill and the run finishing on its own)."""
    runs = grid(models=("convnet",), seeds=(0, 1, 2), epochs=2)
    root, held = tmp_path / "results", tmp_path / "held"
    victim = root / runs[0].run_id
    out = {}
    thread = threading.Thread(target=lambda: out.update(results=launch(
        runs, root, executor="process", workers=2, resume=True, quiet=True,
        data_dir=Bomb("hold-mid-run", victim, held))))
    thread.start()
    pid = int(wait_for(lambda: held.exists() and held.read_text(), "the victim's first record"))
    assert pid == _start_pid(victim / "run.log") and not (victim / "done").exists()
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive()
    results = out["results"]
    assert [r.status for r in results] == ["failed", "done", "done"]
    assert "its process died (killed by SIGKILL: out of memory?)" in results[0].error
    assert run_info(victim)[0] == "interrupted" and "(killed: its process is gone)" in run_info(victim)[1]
    again = launch(runs, root, executor="process", workers=2, resume=True, quiet=True)
    assert [r.status for r in again] == ["done", "skipped", "skipped"]


# -- a run's process dying at any point: the run is reported, never lost, and nothing raises -------------------
def _pending_bytes(conn) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(conn.fileno(), termios.FIONREAD, buf)
    return buf[0]


@pytest.fixture
def deaths_unseen_by_wait(monkeypatch):
    """mp_wait reports only pipes with data waiting, never a process's end: as if every death happened just after
    the launcher's wait returned, before it looked at the processes."""
    real = process_executor.mp_wait

    def wait(objects, timeout=None):
        ready = real(objects, timeout)
        return [o for o in ready if isinstance(o, Connection) and _pending_bytes(o) > 0]
    monkeypatch.setattr(process_executor, "mp_wait", wait)


def test_a_process_dying_before_its_run_starts_is_reported_failed(tmp_path, deaths_unseen_by_wait):
    """Failed before the fix: the dead worker was dropped from the pool with its run, and launch returned no
    result for it (the CLI exited 0)."""
    (run,) = grid(models=("convnet",), seeds=(0,))
    results = launch([run], tmp_path, executor="process", workers=1, data_dir=Bomb("now"), quiet=True)
    assert [(r.run_id, r.status) for r in results] == [(run.run_id, "failed")]
    assert f"process died (exit code {EXIT_CODE}" in results[0].error and "relaunch" in results[0].error


def test_a_process_dying_mid_run_fails_that_run_only(tmp_path, deaths_unseen_by_wait):
    victim, other = grid(models=("convnet",), seeds=(0, 1))
    results = launch([victim, other], tmp_path, executor="process", workers=2, resume=True, quiet=True,
                     data_dir=Bomb("mid-run", tmp_path / victim.run_id))
    assert [r.status for r in results] == ["failed", "done"]
    assert f"process died (exit code {EXIT_CODE}" in results[0].error
    assert not (tmp_path / victim.run_id / "done").exists() and (tmp_path / other.run_id / "done").exists()
    again = launch([victim, other], tmp_path, executor="process", workers=2, resume=True, quiet=True)
    assert [r.status for r in again] == ["done", "skipped"]


def test_a_process_dying_after_its_result_is_no_trouble(tmp_path, monkeypatch):
    """Failed before the fix with BrokenPipeError: the process that ran the first run died while idle, just after
    the launcher had seen it alive. Here the process waits after sending its result until the launcher's first
    look finds it alive; that look then lets it exit and waits for its end, so the death always falls between
    the launcher's check and its next step, however loaded the machine."""
    first, second = grid(models=("convnet",), seeds=(0, 1))
    root, flag = tmp_path / "results", tmp_path / "die-now"
    real_is_alive, deaths = mp.process.BaseProcess.is_alive, []

    def is_alive_then_dies(self):
        alive = real_is_alive(self)
        if alive and not deaths and self.pid == _start_pid(root / first.run_id / "run.log") \
                and (root / first.run_id / "done").exists():
            flag.touch()                                    # the process exits now (Bomb "idle-after")
            deaths.append(mp_wait([self.sentinel], timeout=600) != [])
        return alive
    monkeypatch.setattr(mp.process.BaseProcess, "is_alive", is_alive_then_dies)
    results = launch([first, second], root, executor="process", workers=1, quiet=True,
                     data_dir=Bomb("idle-after", root / first.run_id, flag))
    assert [r.status for r in results] == ["done", "done"]
    assert deaths == [True]


@pytest.mark.parametrize("mode", ["at-result", "torn-result"])
def test_a_process_dying_while_it_reports_a_finished_run(tmp_path, mode):
    """The run wrote `done` (complete records) and its process died sending the result, whole or half-way: the
    run is reported as what its directory says, with the death noted; nothing raises."""
    (run,) = grid(models=("convnet",), seeds=(0,))
    (result,) = launch([run], tmp_path, executor="process", workers=1, data_dir=Bomb(mode), quiet=True)
    assert result.status == "done" and "died after the run finished" in result.error
    assert (tmp_path / run.run_id / "done").exists()


def test_the_cli_exits_non_zero_when_a_process_dies(tmp_path, monkeypatch, deaths_unseen_by_wait):
    """Failed before the fix: the lost run was not counted and `sweep` exited 0."""
    from experiments.cli import main
    real_launch = launchers.launch
    monkeypatch.setattr(launchers, "launch", lambda *a, **k: real_launch(*a, **{**k, "data_dir": Bomb("now")}))
    result = CliRunner().invoke(main, ["sweep", "--models", "convnet", "--seeds", "0", "--dataset", "synthetic",
                                       "--subset", "0.05", "--epochs", "1", "--name", "s", "--results-dir",
                                       str(tmp_path), "--executor", "process", "--no-figures"])
    assert result.exit_code == 1, result.output
    assert "runs: 1 failed" in result.output and "FAILED" in result.output and "process died" in result.output
    assert "Traceback" not in result.output


def test_bad_executor_arguments():
    from experiments.config import ConfigError
    with pytest.raises(ConfigError, match="choose one of: serial, process, ray, slurm"):
        launch(grid(), "/nonexistent", executor="dask")
    with pytest.raises(ConfigError, match="--ray-address applies to --executor ray only"):
        launch(grid(), "/nonexistent", executor="process", ray_address="127.0.0.1:6379")
    with pytest.raises(ConfigError, match="not HOST:PORT"):
        check_ray_address("localhost")
    assert RunOutcome("x", "done", 1.0).error == ""
