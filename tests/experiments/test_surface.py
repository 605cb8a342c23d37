"""Surfaces of stored runs: kept weights, the array store, kill-and-resume, executors, CLI and figures."""
import hashlib
import json
import shutil

import numpy as np
import psutil
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import smoothness
from experiments.features.surface import grid as sf
from experiments.cli import main
from experiments.config import RunConfig
from experiments.data import load_dataset
from experiments.models import build_model
from experiments.training import train_run

TINY = dict(dataset="synthetic", subset=0.08, epochs=2, batch_size=32, probe_every=0, sharpness_samples=0,
            local_smoothness_samples=64, study="surf")
SMALL = dict(grid=5, samples=48, lo=-0.8, hi=0.6)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One finished run per model (ConvNet, BN-ConvNet) on the synthetic set, as the CLI would leave them."""
    root = tmp_path_factory.mktemp("results") / "surf"
    runs = {m: train_run(RunConfig(model=m, **TINY), root).path for m in ("convnet", "bn-convnet")}
    return root, runs


@pytest.fixture
def copy_of(study, tmp_path):
    """A fresh copy of the study (the tests write surfaces into their runs)."""
    root, runs = study
    dst = tmp_path / "surf"
    shutil.copytree(root, dst)
    return dst, {m: dst / p.name for m, p in runs.items()}


def _model(run_dir, which):
    cfg = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    state, _ = sf.load_state(sf.weights_file(run_dir, which))
    return cfg, sf.build_run_model(cfg, state, (1, 28, 28), 10)


# -- the weights every run keeps -----------------------------------------------------------------------------------
def test_runs_keep_initial_and_final_weights(study):
    _, runs = study
    run = runs["bn-convnet"]
    cfg = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    init = torch.load(run / "weights-init.pt", weights_only=True)
    final = torch.load(run / "weights-final.pt", weights_only=True)
    torch.manual_seed(cfg.seed)   # what train_run does before building the model
    fresh = build_model(cfg.model, norm=cfg.norm).state_dict()
    assert list(init) == list(fresh) and all(torch.equal(init[k], fresh[k]) for k in fresh)
    last = torch.load(run / "checkpoints" / "epoch-002.pt", weights_only=False)["model"]
    assert list(final) == list(last) and all(torch.equal(final[k], last[k]) for k in last)
    assert not torch.equal(init["classifier.weight"], final["classifier.weight"])
    assert not any(p.name.startswith(".") for p in run.iterdir())   # no temporary files left behind
    assert (run / "weights-final.pt").stat().st_size < 200_000


def test_diverged_or_old_runs_say_why_there_are_no_weights(tmp_path):
    out = train_run(RunConfig(model="convnet", lr=1e4, **{**TINY, "epochs": 1}), tmp_path)
    assert out.status == "diverged"
    assert (out.path / "weights-init.pt").exists() and not (out.path / "weights-final.pt").exists()
    with pytest.raises(sf.SurfaceError, match="diverged"):
        sf.weights_file(out.path, "final")
    (out.path / "weights-init.pt").unlink()
    with pytest.raises(sf.SurfaceError, match="retrain"):
        sf.weights_file(out.path, "init")
    with pytest.raises(sf.SurfaceError, match="checkpoints present: 0"):
        sf.weights_file(out.path, "7")


# -- the store and its resumption ----------------------------------------------------------------------------------
def test_stored_surface_equals_library_call(copy_of):
    _, runs = copy_of
    spec = sf.SurfaceSpec(direction_seed=3, **SMALL)
    (stored,) = sf.compute_surfaces([runs["bn-convnet"]], spec, executor="serial", device="cpu", quiet=True)
    assert stored.path == runs["bn-convnet"] / "surfaces" / f"{spec.stem}.npz" and stored.complete
    cfg, model = _model(runs["bn-convnet"], "final")
    data = load_dataset("synthetic", subset=cfg.subset, seed=cfg.seed)
    idx = torch.randperm(data.x_train.shape[0], generator=torch.Generator().manual_seed(sf.SAMPLE_SEED))[:48]
    g = torch.Generator().manual_seed(3)
    dirs = [smoothness.random_direction(model, generator=g) for _ in range(2)]
    ref = smoothness.loss_surface(model, F.cross_entropy, (data.x_train[idx], data.y_train[idx]), dirs,
                                  list(spec.coords), bn_mode="running")
    np.testing.assert_array_equal(stored.losses, ref.losses)
    np.testing.assert_array_equal(stored.accuracies, ref.accuracies)
    again = sf.read_surface(stored.path)
    assert again.spec["run"] == runs["bn-convnet"].name and again.spec["weights_sha256"]["final"] == \
        hashlib.sha256((runs["bn-convnet"] / "weights-final.pt").read_bytes()).hexdigest()
    with np.load(stored.path, allow_pickle=False) as f:   # the documented arrays, readable without pickle
        assert sorted(f.files) == ["accuracies", "done", "losses", "spec", "x", "y"]
        assert f["losses"].shape == (5, 5) and f["done"].dtype == bool


def test_kill_and_resume_fills_only_the_missing_cells(copy_of, tmp_path, monkeypatch):
    root, runs = copy_of
    spec = sf.SurfaceSpec(bn_stats="recompute", **SMALL)
    untouched = tmp_path / "reference"
    shutil.copytree(runs["bn-convnet"], untouched)
    (full,) = sf.compute_surfaces([untouched], spec, executor="serial", device="cpu", quiet=True)

    class Killed(Exception):
        pass

    def kill_after_two(run_dir, task):
        if kill_after_two.n == 2:
            raise Killed
        kill_after_two.n += 1
    kill_after_two.n = 0
    with pytest.raises(Killed):
        sf.compute_surfaces([runs["bn-convnet"]], spec, executor="serial", device="cpu", quiet=True,
                            on_task=kill_after_two)
    partial = sf.read_surface(sf.surface_path(runs["bn-convnet"], spec))
    assert partial.done.sum() == 3 * 5 and partial.done[:3].all() and not partial.done[3:].any()
    assert np.isnan(partial.losses[3:]).all()

    evaluated = []
    original = sf._Built.evaluate
    monkeypatch.setattr(sf._Built, "evaluate", lambda self, task: evaluated.append(task) or original(self, task))
    (resumed,) = sf.compute_surfaces([runs["bn-convnet"]], spec, executor="serial", device="cpu", quiet=True)
    assert evaluated == [(3, (0, 1, 2, 3, 4)), (4, (0, 1, 2, 3, 4))]
    np.testing.assert_array_equal(resumed.losses, full.losses)
    np.testing.assert_array_equal(resumed.accuracies, full.accuracies)
    evaluated.clear()
    sf.compute_surfaces([runs["bn-convnet"]], spec, executor="serial", device="cpu", quiet=True)
    assert evaluated == []   # a finished surface is not recomputed


def test_missing_units_group_rows_and_1d_runs():
    done = np.zeros((3, 4), dtype=bool)
    done[0] = True
    done[1, [0, 2]] = True
    assert sf.missing_units(done) == [(1, (1, 3)), (2, (0, 1, 2, 3))]
    line = np.zeros(10, dtype=bool)
    line[[1, 2]] = True
    assert sf.missing_units(line) == [(None, (0, 3, 4, 5)), (None, (6, 7, 8, 9))]


def test_units_per_task_spreads_the_rows_over_one_task_per_worker():
    assert [sf.units_per_task(n, w) for n, w in [(15, 1), (15, 2), (5, 2), (1, 4), (3, 8)]] == [15, 8, 3, 1, 1]


def test_rows_travel_in_one_task_per_worker_and_are_stored_as_each_comes(copy_of, monkeypatch):
    """A worker builds the model and directions once per task: tasks hold several rows of one run (each row stored the
    moment it arrives). Failed before: one task, so one model build, per grid row (issue 21's surface regression)."""
    _, runs = copy_of
    spec = sf.SurfaceSpec(**SMALL)
    seen, stored_rows = [], []
    original = sf.executors.run_tasks

    def spy(name, tasks, **kwargs):
        seen.extend(tasks)
        return original(name, tasks, **kwargs)
    monkeypatch.setattr(sf.executors, "run_tasks", spy)

    def on_task(run_dir, unit):   # each row is on disk before the next is computed
        stored_rows.append(unit[0])
        assert sf.read_surface(sf.surface_path(run_dir, spec)).done.sum() == 5 * (unit[0] + 1)
    both = [runs["convnet"], runs["bn-convnet"]]
    sf.compute_surfaces(both, spec, executor="serial", workers=2, device="cpu", quiet=True, on_task=on_task)
    rows = [[unit[0] for unit in task.args[2]] for task in seen]
    assert rows == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]            # 10 rows, 2 workers: one run's 5 rows per task
    assert stored_rows == [0, 1, 2, 3, 4] * 2
    seen.clear()
    (one,) = sf.compute_surfaces([runs["convnet"]], sf.SurfaceSpec(**{**SMALL, "grid": 7}), executor="serial",
                                 workers=3, device="cpu", quiet=True)
    assert [[unit[0] for unit in task.args[2]] for task in seen] == [[0, 1, 2], [3, 4, 5], [6]]
    assert one.complete


def test_other_weights_are_refused_not_overwritten(copy_of):
    _, runs = copy_of
    spec = sf.SurfaceSpec(dim=1, **SMALL)
    (stored,) = sf.compute_surfaces([runs["convnet"]], spec, executor="serial", device="cpu", quiet=True)
    before = stored.path.read_bytes()
    state = torch.load(runs["convnet"] / "weights-final.pt", weights_only=True)
    state["classifier.bias"] += 1
    torch.save(state, runs["convnet"] / "weights-final.pt")
    with pytest.raises(sf.SurfaceError, match="other weights.*weights_sha256.*move it away"):
        sf.compute_surfaces([runs["convnet"]], spec, executor="serial", device="cpu", quiet=True)
    assert stored.path.read_bytes() == before


def test_interpolation_endpoints_are_the_init_and_final_models(copy_of):
    _, runs = copy_of
    spec = sf.SurfaceSpec(kind="interpolation", epoch="init:final", dim=1, grid=5, lo=-0.5, hi=1.5, samples=48,
                          normalize="none", ignore="none")
    (stored,) = sf.compute_surfaces([runs["bn-convnet"]], spec, executor="serial", device="cpu", quiet=True)
    np.testing.assert_array_equal(stored.x, [-0.5, 0.0, 0.5, 1.0, 1.5])
    cfg, final = _model(runs["bn-convnet"], "final")
    _, init = _model(runs["bn-convnet"], "init")
    hybrid = build_model(cfg.model, norm=cfg.norm)   # init weights, final running statistics (module docstring)
    hybrid.load_state_dict({**final.state_dict(), **{n: p.detach() for n, p in init.named_parameters()}})
    x, y = sf.evaluation_batch(cfg, 48, None)
    for model, i in ((hybrid, 1), (final, 3)):
        model.eval()
        with torch.no_grad():
            assert stored.losses[i] == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-6, abs=1e-7)


# -- executors -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_process_pool_gives_the_serial_numbers(copy_of, tmp_path):
    _, runs = copy_of
    spec = sf.SurfaceSpec(**SMALL)
    other = tmp_path / "serial"
    shutil.copytree(runs["bn-convnet"].parent, other)
    pooled = sf.compute_surfaces(list(runs.values()), spec, executor="process", workers=2, device="cpu",
                                 quiet=True)
    serial = sf.compute_surfaces([other / p.name for p in runs.values()], spec, executor="serial", device="cpu",
                                 quiet=True)
    for a, b in zip(pooled, serial):
        np.testing.assert_array_equal(a.losses, b.losses)
        np.testing.assert_array_equal(a.accuracies, b.accuracies)


@pytest.mark.slow
@pytest.mark.needs_ray
def test_ray_gives_the_serial_numbers(copy_of, tmp_path):
    _, runs = copy_of
    spec = sf.SurfaceSpec(dim=1, **SMALL)
    other = tmp_path / "serial"
    shutil.copytree(runs["convnet"], other)
    (a,) = sf.compute_surfaces([runs["convnet"]], spec, executor="ray", workers=1, device="cpu", quiet=True)
    (b,) = sf.compute_surfaces([other], spec, executor="serial", device="cpu", quiet=True)
    np.testing.assert_array_equal(a.losses, b.losses)


# -- CLI and figures -----------------------------------------------------------------------------------------------
def _cli(*args):
    return CliRunner().invoke(main, ["-q", "surface", *map(str, args)], catch_exceptions=False)


@pytest.mark.slow
def test_cli_surfaces_figures_and_byte_reproducible_redraw(copy_of):
    root, runs = copy_of
    common = ["--grid", "4", "--samples", "32", "--executor", "serial", "--device", "cpu"]
    for extra in ([], ["--dim", "1"], ["--interpolate", "--bn-stats", "recompute"]):
        result = _cli(root, *common, *extra)
        assert result.exit_code == 0, result.output
    figures = sorted(p.name for p in (root / "figures").iterdir())
    stems = sorted({p.rsplit(".", 1)[0] for p in figures})
    assert [s.split("-")[0] for s in stems] == ["interpolation", "surface", "surface"]
    assert all(f"{s}.{e}" in figures for s in stems for e in ("png", "pdf"))
    for run in runs.values():
        assert sorted(p.stem for p in (run / "surfaces").glob("*.npz")) == stems
    before = {p: p.read_bytes() for p in (root / "figures").iterdir()}
    assert _cli(root, *common).exit_code == 0          # finished: only redraws
    assert {p: p.read_bytes() for p in (root / "figures").iterdir()} == before
    from experiments.analysis import plot_study   # `plot` leaves the surface figures as `surface` drew them
    assert not any(p.stem.startswith(("surface", "interpolation")) for p in plot_study(root))
    assert {p: p.read_bytes() for p in before} == before


def test_cli_bad_input(copy_of, tmp_path):
    root, runs = copy_of
    run = runs["convnet"]
    cases = [
        (["--range", "1:-1"], "LOW < HIGH"),
        (["--range", "abc"], "LOW:HIGH"),
        (["--epoch", "last"], "--epoch must be init, final"),
        (["--epoch", "5"], "no checkpoint of epoch 5"),
        (["--bn-mode", "batch", "--bn-stats", "recompute"], "applies only to --bn-mode running"),
        (["--interpolate", "--dim", "2"], "--dim do not apply"),
        (["--samples", "100000"], "exceeds the run's training subset"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, ["-q", "surface", str(run), "--executor", "serial", *args])
        assert result.exit_code != 0 and message in result.output, (args, result.output)
    result = CliRunner().invoke(main, ["surface", str(tmp_path)])
    assert result.exit_code != 0 and "neither a run directory" in result.output
    assert not (run / "surfaces").exists()   # nothing written by a refused command


# -- issue 20: the run's own loss ----------------------------------------------------------------------------------
def test_mse_run_is_evaluated_with_its_own_loss_and_labelled_with_it(tmp_path):
    """Failed before: a run trained with --loss mse was evaluated with cross-entropy, labelled "training loss"."""
    from experiments.features.surface.figures import curves_figure
    from experiments.losses import squared_error
    run = train_run(RunConfig(model="convnet", loss="mse", **TINY), tmp_path).path
    spec = sf.SurfaceSpec(dim=1, grid=3, lo=-1.0, hi=1.0, samples=48)
    (stored,) = sf.compute_surfaces([run], spec, executor="serial", device="cpu", quiet=True)
    assert stored.spec["loss"] == "mse" and sf.read_surface(stored.path).spec["loss"] == "mse"
    cfg, model = _model(run, "final")
    x, y = sf.evaluation_batch(cfg, 48, None)
    model.eval()
    with torch.no_grad():
        assert stored.losses[1] == pytest.approx(float(squared_error(model(x), y)), rel=1e-6)
        assert stored.losses[1] != pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-2)
    fig = curves_figure([stored])
    assert fig.axes[0].get_ylabel() == "training loss (mse)"


def test_surface_files_written_before_the_loss_was_recorded_read_as_cross_entropy(copy_of):
    _, runs = copy_of
    spec = sf.SurfaceSpec(dim=1, grid=3, samples=48)
    (stored,) = sf.compute_surfaces([runs["convnet"]], spec, executor="serial", device="cpu", quiet=True)
    old = {k: v for k, v in stored.spec.items() if k != "loss"}
    sf.StoredSurface(**{**stored.__dict__, "spec": old}).save()
    assert sf.read_surface(stored.path).spec["loss"] == "cross-entropy"
    (again,) = sf.compute_surfaces([runs["convnet"]], spec, executor="serial", device="cpu", quiet=True)
    assert again.complete   # resumable: not refused as "other options"


# -- issue 20: bad inputs are refused in one line, before any work -------------------------------------------------
def _refused(result, message):
    """A clean one-line click error (no traceback, no other exception) saying ``message``."""
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    assert "Traceback" not in result.output and message in result.output, result.output


@pytest.mark.parametrize("args,message", [
    (["--grid", "100000"], "would need 158 GiB of memory"),          # was a numpy MemoryError traceback
    (["--grid", "100000"], "the limit is 1 GiB"),
    (["--range", "-1e308:1e308"], "beyond ±1000"),                   # was an overflow traceback
    (["--device", "tpu"], "'tpu' is not one of 'auto', 'cpu', 'cuda'"),
    (["--epoch", "²"], "--epoch must be init, final"),               # "²".isdigit() is True, int("²") fails
    (["--vlevel", "1e-9"], "at most 200 can be drawn"),
    (["--vlevel", "1e-4"], "at most 200 can be drawn"),              # drew for minutes
    (["--vmax", "inf"], "must be finite"),
])
def test_cli_refuses_bad_options_before_computing(copy_of, args, message):
    _, runs = copy_of
    result = CliRunner().invoke(main, ["-q", "surface", str(runs["convnet"]), "--executor", "serial", "--grid", "3",
                                       "--samples", "16", *args])
    _refused(result, message)
    assert not (runs["convnet"] / "surfaces").exists()


def _break_truncate(run, other):
    path = run / "weights-final.pt"
    path.write_bytes(path.read_bytes()[:1000])


def _break_empty(run, other):
    (run / "weights-final.pt").write_bytes(b"")


def _break_foreign(run, other):
    shutil.copy(other / "weights-final.pt", run / "weights-final.pt")


@pytest.mark.parametrize("damage,message", [(_break_truncate, "not a readable weights file"),
                                            (_break_empty, "not a readable weights file"),
                                            (_break_foreign, "does not hold weights of this run's model (convnet")])
def test_damaged_or_foreign_weights_are_refused_in_the_parent(copy_of, damage, message):
    """Failed before: a traceback, a bare "Aborted!", or a state_dict error inside a worker."""
    _, runs = copy_of
    damage(runs["convnet"], runs["bn-convnet"])
    result = CliRunner().invoke(main, ["-q", "surface", str(runs["convnet"]), "--grid", "3", "--samples", "16",
                                       "--workers", "1"])
    _refused(result, message)
    assert str(runs["convnet"] / "weights-final.pt") in result.output
    assert not (runs["convnet"] / "surfaces").exists()


def test_truncated_surface_file_says_to_delete_it_and_is_kept(copy_of):
    """Failed before: zipfile.BadZipFile traceback."""
    _, runs = copy_of
    args = ["-q", "surface", str(runs["convnet"]), "--executor", "serial", "--dim", "1", "--grid", "3",
            "--samples", "16", "--no-figures"]
    assert CliRunner().invoke(main, args).exit_code == 0
    (path,) = (runs["convnet"] / "surfaces").glob("*.npz")
    path.write_bytes(path.read_bytes()[:200])
    before = path.read_bytes()
    result = CliRunner().invoke(main, args)
    _refused(result, f"{path} is not a readable surface file")
    assert "delete it" in result.output and path.read_bytes() == before


# -- issue 20: workers -----------------------------------------------------------------------------------------------
def _workers(parent):
    """The task processes among ``parent``'s descendants: the children of its multiprocessing fork server (not the
    server itself, nor the resource tracker)."""
    out = []
    for p in parent.children():
        try:
            if "forkserver" in " ".join(p.cmdline()):
                out += p.children()
        except psutil.Error:
            pass
    return out


def test_a_killed_worker_gives_one_clear_error_and_the_rows_stay(copy_of):
    """Failed before: a BrokenProcessPool traceback."""
    import os
    import signal
    _, runs = copy_of
    spec = sf.SurfaceSpec(grid=40, samples=48)

    def kill_workers(run_dir, task):
        # every task has a process of its own, and one may have sent its row just before it is killed: kill the
        # running ones after every stored row, until a row is lost
        for worker in _workers(psutil.Process()):
            os.kill(worker.pid, signal.SIGKILL)
    with pytest.raises(sf.SurfaceError, match="worker process died.*run the same command again"):
        sf.compute_surfaces([runs["convnet"]], spec, executor="process", workers=2, device="cpu", quiet=True,
                            on_task=kill_workers)
    kept = sf.read_surface(sf.surface_path(runs["convnet"], spec))
    assert 0 < kept.done.sum() < kept.done.size


def _status(process):
    try:
        return process.status()
    except psutil.NoSuchProcess:
        return None


def test_workers_and_job_folder_die_with_a_killed_parent(copy_of, tmp_path):
    """kill -9 of the CLI process: its workers exit and remove the shared job folder within seconds.
    Failed before: two workers and the resource tracker kept running, the temporary folder stayed."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path
    _, runs = copy_of
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(Path(__file__).parents[2])}
    cmd = [sys.executable, "-c", "from experiments.cli import main; main()", "-q", "surface", str(runs["convnet"]),
           "--grid", "200", "--samples", "48", "--workers", "2", "--no-figures"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 120
        while not (len(_workers(parent)) == 2 and list((runs["convnet"] / "surfaces").glob("*.npz"))):
            assert proc.poll() is None and time.monotonic() < deadline, "the surface command never started workers"
            time.sleep(0.1)
        children = parent.children(recursive=True)   # the workers and the resource tracker
        assert list(tmp.glob("smoothness-shared-*"))
    finally:
        proc.kill()
    proc.wait()
    # Generous on a loaded machine; a worker that has exited but whose new parent (a container's init that does not
    # reap) never collects it is a zombie: it has died, which is what this test asks.
    _, alive = psutil.wait_procs(children, timeout=60)
    running = [p for p in alive if _status(p) not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD, None)]
    assert running == [], [_status(p) for p in running]
    deadline = time.monotonic() + 60
    while list(tmp.glob("smoothness-shared-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(tmp.glob("smoothness-shared-*")) == []
