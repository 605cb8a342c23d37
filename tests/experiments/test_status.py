"""`smoothness-lab status` (experiments.status): every state on run directories made by a real tiny launch and then
cut, corrupted or locked the way a kill, a disk error or a concurrent launch would leave them."""
import hashlib
import json
import shutil
import socket

import pytest
from click.testing import CliRunner

from experiments import launchers, training
from experiments.cli import main
from experiments.config import RunConfig
from experiments.launchers import launch
from experiments.status import STATES, run_info
from experiments.store import StoreError, run_lock

CFG = RunConfig(study="st", dataset="synthetic", subset=0.05, epochs=2, batch_size=32, probe_every=5,
                sharpness_samples=32, local_smoothness_samples=64)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-epoch run (with its checkpoints and run.log), to copy and damage."""
    root = tmp_path_factory.mktemp("finished")
    (result,) = launch([CFG], root, executor="serial", quiet=True)
    assert result.status == "done"
    return root / CFG.run_id


@pytest.fixture
def run(finished, tmp_path):
    study = tmp_path / "st"
    shutil.copytree(finished, study / CFG.run_id)
    return study / CFG.run_id


def cut(run_dir, epoch):
    """The run as a kill after checkpoint ``epoch`` leaves it: later checkpoints, records and `done` gone."""
    (run_dir / "done").unlink()
    for p in (run_dir / "checkpoints").glob("epoch-*.pt"):
        if int(p.stem[6:]) > epoch:
            p.unlink()
    lines = (run_dir / "records.jsonl").read_text().splitlines(keepends=True)
    keep = [x for x in lines if json.loads(x)["epoch"] <= epoch and json.loads(x)["kind"] != "step"
            or json.loads(x)["epoch"] < epoch]
    (run_dir / "records.jsonl").write_text("".join(keep))
    log = (run_dir / "run.log").read_text().splitlines(keepends=True)
    (run_dir / "run.log").write_text("".join(x for x in log if " finish " not in x))


def test_the_states_are_the_documented_ones():
    import experiments.status as status
    assert STATES == ("done", "diverged", "running", "interrupted", "failed", "corrupt", "truncated", "not started")
    for state in STATES:
        assert f"\n{state} " in status.__doc__


def test_done_and_diverged(run):
    state, detail = run_info(run)
    assert state == "done" and detail.startswith("test accuracy ") and detail.endswith("after 2 epochs")
    with open(run / "records.jsonl", "a") as f:
        f.write(json.dumps({"kind": "diverged", "step": 5, "epoch": 1, "bn_mode": "batch", "loss": None,
                            "reason": "non-finite training loss"}) + "\n")
    data = (run / "records.jsonl").read_bytes()   # the records a diverged run finishes with: in its done marker
    (run / "done").write_text(json.dumps({"records_mark": {"bytes": len(data),
                                                           "sha256": hashlib.sha256(data).hexdigest()}}))
    assert run_info(run) == ("diverged", "at step 5: non-finite training loss")


def test_interrupted_says_where_it_resumes_and_how_it_ended(run):
    cut(run, 1)
    assert run_info(run) == ("interrupted", "resumes from its checkpoint after epoch 1 of 2 (killed: its process "
                                            "is gone)")
    with open(run / "records.jsonl", "a") as f:
        f.write('{"kind": "step", "st')                  # a line torn by the kill: not corruption
    assert run_info(run)[0] == "interrupted"
    with open(run / "run.log", "a") as f:
        f.write("2024-01-01 00:00:00,000 WARNING interrupted after 3.0 s; relaunch the sweep\n")
    assert run_info(run)[1] == "resumes from its checkpoint after epoch 1 of 2 (interrupted: Ctrl-C or SIGTERM)"


def test_a_run_started_on_another_host(run):
    cut(run, 0)
    log = (run / "run.log").read_text().replace(f"host={socket.gethostname()}", "host=node17")
    (run / "run.log").write_text(log.replace(" device=", " slurm_job=4242 device=", 1))
    state, detail = run_info(run)
    assert state == "interrupted" and "after epoch 0 of 2" in detail
    assert "last started on node17 in SLURM job 4242" in detail and "may still be running there" in detail


def test_running_while_a_process_holds_the_lock(run):
    cut(run, 1)
    with run_lock(run) as mine:
        assert mine
        state, detail = run_info(run)
    assert state == "running"
    assert detail.startswith("by pid ") and f"on {socket.gethostname()}" in detail
    assert detail.endswith("last checkpoint after epoch 1 of 2")
    assert run_info(run)[0] == "interrupted"           # the lock dies with its holder


def test_a_busy_run_is_left_alone_and_reported_busy_not_failed(run):
    """Failed before the fix: the second launch reported the run as failed."""
    cut(run, 1)
    before = (run / "run.log").read_bytes()
    with run_lock(run):
        (result,) = launch([CFG], run.parent, executor="serial", resume=True, quiet=True)
        assert run_info(run)[0] == "running"
    assert result.status == "busy" and "another launch is training it right now" in result.error
    assert (run / "run.log").read_bytes() == before


def test_a_run_refused_for_lack_of_resume_stays_interrupted(run):
    """Failed before the fix: the refusal was logged as `failed` and status lost the checkpoint."""
    cut(run, 1)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(StoreError, match=r"interrupted before \(" + CFG.run_id + r"\); pass --resume"):
        launch([CFG], run.parent, executor="process", quiet=True)
    (result,) = [launchers.execute(CFG.to_dict(), str(run.parent), False, None, 1)]   # `train` without --resume
    assert result.status == "failed" and "pass --resume" in result.error
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert run_info(run) == ("interrupted", "resumes from its checkpoint after epoch 1 of 2 (killed: its process "
                                            "is gone)")


def test_failed_keeps_the_error_and_the_checkpoint(run, monkeypatch):
    cut(run, 1)

    def boom(*args, **kwargs):
        raise RuntimeError("out of cheese")
    monkeypatch.setattr(training, "train_run", boom)
    (result,) = launch([CFG], run.parent, executor="serial", resume=True, quiet=True)
    assert result.status == "failed"
    assert run_info(run) == ("failed", "RuntimeError: out of cheese; resumes from its checkpoint after epoch 1 of 2")


def _rewrite_line(path, index, text):
    lines = path.read_bytes().split(b"\n")
    lines[index] = text
    path.write_bytes(b"\n".join(lines))


@pytest.mark.parametrize("damage,problem", [
    (lambda r: (r / "config.json").unlink(),
     "config.json: missing, although the directory holds the run's records or checkpoints"),
    (lambda r: (r / "config.json").write_text("{not json"), "config.json: not valid JSON ("),
    (lambda r: (r / "config.json").write_text("[1, 2]"),
     "config.json: must be a JSON object (the run's config), got an array"),
    (lambda r: (r / "config.json").write_text(
        json.dumps({**json.loads((r / "config.json").read_text()), "lr": "abc"})),
     "config.json: --lr must be a number, got 'abc'"),
    (lambda r: _rewrite_line(r / "records.jsonl", 1, b'["kind", "step"]'),
     "records.jsonl:2: expected a JSON object, got an array"),
    (lambda r: _rewrite_line(r / "records.jsonl", 2, b'{"kind": "step", "loss": "\xff"}'),
     "records.jsonl:3: not UTF-8 text (byte 0xff at column 27)"),
    (lambda r: _rewrite_line(r / "records.jsonl", 3, b'{"kind": "st'), "records.jsonl:4: not valid JSON ("),
    (lambda r: _rewrite_line(r / "records.jsonl", 4, b'{"step": 3}'), "records.jsonl:5: a record without a 'kind'"),
    (lambda r: (r / "records.jsonl").write_bytes((r / "records.jsonl").read_bytes()[:-20]),   # torn, yet `done`
     "records.jsonl:"),
    (lambda r: (r / "records.jsonl").unlink(), "records.jsonl: no records, although the run is marked done"),
])
def test_corrupt_runs_are_named_with_file_line_and_reason(run, damage, problem):
    """Failed before the fix: these showed as done (or, for a JSON array line, status crashed)."""
    damage(run)
    state, detail = run_info(run)
    assert state == "corrupt" and detail.startswith(problem), detail


def test_status_command_on_a_corrupt_study_prints_one_row_per_run(run):
    """Failed before the fix with AttributeError ('list' object has no attribute 'get')."""
    _rewrite_line(run / "records.jsonl", 1, b"[1, 2, 3]")
    (run.parent / "figures").mkdir()                 # not runs: figures, submitit's hidden logs
    (run.parent / ".slurm" / "17").mkdir(parents=True)
    result = CliRunner().invoke(main, ["status", str(run.parent)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    row, counts = result.output.strip().splitlines()
    assert row.split()[:2] == [CFG.run_id, "corrupt"] and "records.jsonl:2: expected a JSON object, got an array" in row
    assert counts == ("1 runs: 0 done, 0 diverged, 0 running, 0 interrupted, 0 failed, 1 corrupt, 0 truncated, "
                      "0 not started")


def test_not_started(tmp_path):
    assert run_info(tmp_path / "nothing-here") == ("not started", "")
    (tmp_path / "empty").mkdir()
    assert run_info(tmp_path / "empty") == ("not started", "")
