"""The executor registry (experiments.executors): an executor defined outside the package, registered with one call,
runs a sweep and a surface through the CLI; the CLI's --executor choices are exactly the registered names; every task
is reported once, whatever the executor does."""
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from experiments import executors
from experiments.features.surface import grid as sf
from experiments.cli import main
from experiments.config import ConfigError
from experiments.executors import EXECUTORS, Executor, ExecutorOptions, Outcome, Task


class Inline(Executor):
    """The smallest executor: every task in this thread, in order; it remembers what it ran."""

    name = "inline-test"

    def __init__(self):
        self.ran = []

    def default_workers(self, n_tasks, options):
        return 1

    def run(self, tasks, *, workers, threads, options, on_done, on_progress, shared, gpus):
        class Sink:
            put = staticmethod(on_progress)
        for task in tasks:
            self.ran.append(task.key)
            head = (shared[task.shared],) if task.shared is not None else ()
            on_done(Outcome(task.key, task.fn(*head, *task.args, progress=Sink())))


class Losing(Executor):
    """An executor whose workers all vanish: every task is reported failed."""

    name = "losing-test"

    def run(self, tasks, *, workers, threads, options, on_done, on_progress, shared, gpus):
        for task in tasks:
            on_done(Outcome(task.key, failure="its worker vanished", cause="a test"))


@pytest.fixture
def registered():
    """Inline and Losing in the registry for one test (and only then)."""
    added = {cls.name: executors.register_executor(cls()) for cls in (Inline, Losing)}
    yield added
    for name in added:
        EXECUTORS.pop(name)


SWEEP = ["sweep", "--models", "convnet", "--seeds", "0", "--dataset", "synthetic", "--subset", "0.05", "--epochs", "1",
         "--probe-every", "5", "--sharpness-samples", "32", "--local-smoothness-samples", "64", "--name", "s",
         "--no-figures"]


def records(study):
    return {p.name: [json.loads(line) for line in (p / "records.jsonl").read_text().splitlines()]
            for p in sorted(study.iterdir()) if (p / "config.json").exists()}


def test_a_sweep_and_a_surface_through_an_executor_registered_from_outside(registered, tmp_path):
    inline = registered["inline-test"]
    result = CliRunner().invoke(main, ["-q", *SWEEP, "--results-dir", str(tmp_path / "inline"),
                                       "--executor", "inline-test"])
    assert result.exit_code == 0, result.output
    study = tmp_path / "inline" / "s"
    (run_dir,) = [p for p in study.iterdir() if (p / "config.json").exists()]
    assert inline.ran == [run_dir.name] and (run_dir / "done").exists()
    (launched,) = json.loads((study / "launch.json").read_text())["launches"]
    assert launched["executor"] == "inline-test" and launched["workers"] == 1 and launched["runs"] == {"done": 1}
    serial = CliRunner().invoke(main, ["-q", *SWEEP, "--results-dir", str(tmp_path / "serial"), "--executor", "serial"])
    assert serial.exit_code == 0, serial.output
    assert records(study) == records(tmp_path / "serial" / "s")

    copy = tmp_path / "copy" / run_dir.name
    shutil.copytree(run_dir, copy)
    inline.ran.clear()
    args = ["--grid", "3", "--samples", "16", "--no-figures", "--device", "cpu"]
    result = CliRunner().invoke(main, ["-q", "surface", str(run_dir), "--executor", "inline-test", "--workers", "3",
                                       *args])
    assert result.exit_code == 0, result.output
    assert len(inline.ran) == 3                      # the three rows of the grid, one task per worker
    (stored,) = [sf.read_surface(p) for p in (run_dir / "surfaces").glob("*.npz")]
    assert stored.complete
    spec = sf.SurfaceSpec(grid=3, samples=16)
    (reference,) = sf.compute_surfaces([copy], spec, executor="serial", device="cpu", quiet=True)
    np.testing.assert_array_equal(stored.losses, reference.losses)


def test_outcomes_that_are_failures_fail_the_run_and_the_surface(registered, tmp_path):
    result = CliRunner().invoke(main, [*SWEEP, "--results-dir", str(tmp_path), "--executor", "losing-test"])
    assert result.exit_code == 1, result.output
    assert "runs: 1 failed" in result.output and "its worker vanished (a test)" in result.output
    assert not list((tmp_path / "s").glob("*/done"))
    again = CliRunner().invoke(main, ["-q", *SWEEP, "--results-dir", str(tmp_path), "--executor", "serial"])
    assert again.exit_code == 0, again.output
    (run_dir,) = [p for p in (tmp_path / "s").iterdir() if (p / "config.json").exists()]
    result = CliRunner().invoke(main, ["-q", "surface", str(run_dir), "--executor", "losing-test", "--grid", "3",
                                       "--samples", "16", "--no-figures", "--device", "cpu"])
    assert result.exit_code == 1 and "worker process died (a test)" in result.output, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["run", "sweep", "surface"])
def test_the_cli_lists_exactly_the_registered_executors(registered, command):
    help_text = CliRunner().invoke(main, [command, "--help"], terminal_width=200).output
    assert f"--executor [{'|'.join(EXECUTORS)}]" in help_text
    assert list(EXECUTORS) == ["serial", "process", "ray", "slurm", "inline-test", "losing-test"]


def test_the_cli_refuses_a_name_that_is_not_registered(tmp_path):
    result = CliRunner().invoke(main, [*SWEEP, "--results-dir", str(tmp_path), "--executor", "inline-test"])
    assert result.exit_code == 2 and "'inline-test' is not one of 'serial', 'process', 'ray', 'slurm'" in result.output


def echo(x, progress=None):
    return x


def test_every_task_is_reported_exactly_once(registered):
    class Forgetful(Inline):
        name = "forgetful-test"

        def run(self, tasks, **kwargs):
            super().run(tasks[:1], **kwargs)
    executors.register_executor(Forgetful())
    try:
        seen = []
        tasks = [Task(str(k), echo, (k,)) for k in range(3)]
        executors.run_tasks("forgetful-test", tasks, workers=1, threads=1, on_done=seen.append)
        assert [o.ok for o in seen] == [True, False, False] and seen[0].result == 0
        assert "lost track of this task" in seen[1].error
    finally:
        EXECUTORS.pop("forgetful-test")


def test_checks_name_the_executor_and_its_options():
    with pytest.raises(ConfigError, match="unknown --executor 'dask'; choose one of: serial, process, ray, slurm"):
        executors.get_executor("dask")
    with pytest.raises(ConfigError, match=r"--ray-address applies to --executor ray only \(got --executor serial\)"):
        executors.check_executor("serial", ExecutorOptions(ray_address="127.0.0.1:1"))
    with pytest.raises(ConfigError, match="--workers must be a positive integer, got 0"):
        executors.check_executor("process", workers=0)
    assert executors.default_workers("serial", 10) == 1
    assert executors.default_workers("process", 10, one_gpu=True) == 1     # rows sharing this machine's GPU
    assert executors.default_workers("slurm", 10, one_gpu=True) == 10     # a job, and a GPU, per task
