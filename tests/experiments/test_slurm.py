"""`--executor slurm` (experiments.executors.slurm) through submitit's local executor, which runs each job as a process on this
machine the way SLURM would on a node: records identical to the serial executor's, a preempted job requeued and
resumed from its checkpoint, a job that dies reported as failed; the --slurm-* options as the sbatch lines a real
cluster would get."""
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

pytestmark = pytest.mark.needs_slurm
submitit = pytest.importorskip("submitit", reason="needs the slurm extra (submitit is not installed): "
                                                  "pip install -e '.[slurm]'")

sys.path.insert(0, str(Path(__file__).parent))
from dying import Bomb  # noqa: E402

from experiments.cli import main  # noqa: E402
from experiments.config import ConfigError, RunConfig, StudyConfig  # noqa: E402
from experiments.launchers import launch  # noqa: E402
from experiments.executors.slurm import SlurmOptions, check_slurm, make_executor, parse_sbatch  # noqa: E402
from experiments.status import run_info  # noqa: E402
from experiments.store import is_run_dir  # noqa: E402

LOCAL = SlurmOptions(cluster="local")
TINY = dict(dataset="synthetic", subset=0.05, epochs=1, batch_size=32, probe_every=5, sharpness_samples=32,
            local_smoothness_samples=64)


def study_states(study_dir):
    """The state of every run directory of a study folder, by name."""
    return [run_info(p)[0] for p in sorted(Path(study_dir).iterdir()) if is_run_dir(p)]


def grid(name="g", seeds=(0,), **over):
    return StudyConfig(name=name, models=("convnet", "bn-convnet"), lrs=(0.04,), seeds=seeds,
                       base=RunConfig(study=name, **{**TINY, **over})).runs()


def records(root):
    return {p.name: [json.loads(line) for line in (p / "records.jsonl").read_text().splitlines()]
            for p in sorted(root.iterdir()) if (p / "config.json").exists()}


@pytest.fixture(autouse=True)
def jobs_import_the_test_helpers(monkeypatch):
    """Local jobs are fresh interpreters: they see PYTHONPATH, not this process's sys.path."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))


def test_local_jobs_give_the_serial_executors_records(tmp_path):
    serial, slurm = tmp_path / "serial", tmp_path / "slurm"
    launch(grid(), serial, executor="serial", quiet=True)
    results = launch(grid(), slurm, executor="slurm", slurm=LOCAL, workers=2, quiet=True)
    assert [r.status for r in results] == ["done", "done"]
    assert records(slurm) == records(serial)
    for r in results:
        log = (slurm / r.run_id / "run.log").read_text()
        assert f"start {r.run_id} pid=" in log and " threads=1 " in log and f"finish {r.run_id}: done" in log
    assert sorted(p.name.split("_")[1] for p in (slurm / ".slurm").glob("*_log.out")) == ["0", "0"]
    assert study_states(slurm) == ["done", "done"]      # .slurm is not a run
    again = launch(grid(), slurm, executor="slurm", slurm=LOCAL, quiet=True)
    assert [r.status for r in again] == ["skipped", "skipped"]


def _start_pid(run_dir):
    try:
        return int((run_dir / "run.log").read_text().split(" pid=")[1].split()[0])
    except (OSError, IndexError):
        return None


def test_a_preempted_job_is_requeued_and_resumes_from_its_checkpoint(tmp_path):
    """SLURM signals USR2 before a time limit or a preemption; the job requeues itself with resume=True and the
    run continues from its last checkpoint, giving the records of an uninterrupted run."""
    (run, _) = grid(epochs=4)
    launch([run], tmp_path / "serial", executor="serial", quiet=True)
    out = {}
    thread = threading.Thread(target=lambda: out.update(results=launch(
        [run], tmp_path / "slurm", executor="slurm", slurm=LOCAL, quiet=True)))
    thread.start()
    run_dir = tmp_path / "slurm" / run.run_id
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "epoch-001.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not (run_dir / "done").exists(), "the run ended before it could be preempted"
    os.kill(_start_pid(run_dir), signal.SIGUSR2)           # what SLURM sends (submitit asks for --signal=USR2@90)
    thread.join(timeout=300)
    (result,) = out["results"]
    assert result.status == "done", result
    log = (run_dir / "run.log").read_text()
    assert log.count(" start ") == 2 and "WARNING interrupted" in log and "resume=True, resuming from checkpoints/" \
        "epoch-00" in log
    assert records(tmp_path / "slurm") == records(tmp_path / "serial")


def test_a_job_that_dies_is_reported_failed_with_its_log(tmp_path):
    (run, _) = grid()
    (result,) = launch([run], tmp_path, executor="slurm", slurm=LOCAL, data_dir=Bomb("now"), quiet=True)
    assert result.status == "failed"
    assert result.error.startswith("SLURM job ") and "ended without a result" in result.error
    assert str(tmp_path / ".slurm") in result.error


def test_the_cli_runs_a_sweep_on_local_jobs(tmp_path):
    result = CliRunner().invoke(main, ["-q", "sweep", "--models", "convnet", "--seeds", "0-1", "--dataset",
                                       "synthetic", "--subset", "0.05", "--epochs", "1", "--sharpness-samples", "16",
                                       "--name", "s", "--results-dir", str(tmp_path), "--no-figures",
                                       "--executor", "slurm", "--slurm-cluster", "local", "--slurm-time", "30",
                                       "--slurm-cpus", "1"])
    assert result.exit_code == 0, result.output
    assert study_states(tmp_path / "s") == ["done", "done"]
    (launched,) = json.loads((tmp_path / "s" / "launch.json").read_text())["launches"]
    assert launched["executor"] == "slurm" and launched["runs"] == {"done": 2}


def test_options_become_the_sbatch_lines_of_each_job(tmp_path, monkeypatch):
    """A real cluster cannot be reached from CI: the options are checked in the job script submitit writes."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for cmd in ("srun", "sbatch"):
        (fake / cmd).write_text("#!/bin/sh\nexit 1\n")
        (fake / cmd).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    options = SlurmOptions(partition="gpu", time_min=90, gpus=1, mem_gb=16, sbatch=parse_sbatch(
        ["account=mylab", "--constraint=a100", "exclusive"]))
    check_slurm(options)
    executor = make_executor(options, tmp_path / "logs", threads=2, workers=3)
    script = executor._executor._make_submission_file_text("python -m job", "uid")
    for line in ("--partition=gpu", "--time=90", "--gpus-per-node=1", "--cpus-per-task=2", "--mem=16GB",
                 "--account=mylab", "--constraint=a100", "--signal=USR2@90", "--nodes=1", "--ntasks-per-node=1"):
        assert f"#SBATCH {line}\n" in script
    assert "#SBATCH --exclusive\n" in script
    assert executor._executor.parameters["array_parallelism"] == 3
    assert f"--output={tmp_path / 'logs'}/%j_0_log.out" in script


@pytest.mark.parametrize("options,message", [
    (SlurmOptions(cluster="pbs"), "unknown --slurm-cluster 'pbs'"),
    (SlurmOptions(cluster="local", time_min=0), "--slurm-time must be a positive number of minutes"),
    (SlurmOptions(cluster="local", gpus=-1), "--slurm-gpus must be >= 0"),
])
def test_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        check_slurm(options)
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        parse_sbatch(["=1"])
    with pytest.raises(ConfigError, match="--slurm-gpus 1"):
        launch(grid(device="cuda"), "/nonexistent", executor="slurm", slurm=LOCAL)
