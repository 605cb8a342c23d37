"""The run store: records survive a kill, configs are never overwritten, unwritable roots fail early, resume cuts
the records back to the checkpoint, writes are ordered for durability, readers give one-line errors."""
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from experiments.atomic import atomic_write, atomic_write_text
from experiments.config import RunConfig
from experiments.store import RunStore, StoreError, check_writable, read_config, read_records


def test_append_is_readable_line_by_line_and_nan_becomes_null(tmp_path):
    store = RunStore(tmp_path, RunConfig()).open()
    store.append({"kind": "step", "step": 0, "loss": float("nan"), "accuracy": 0.5})
    store.append({"kind": "step", "step": 1, "loss": 1.0, "accuracy": float("inf")})
    # flushed: another reader sees both lines before close
    lines = store.records_path.read_text().splitlines()
    assert [json.loads(x) for x in lines] == [
        {"kind": "step", "step": 0, "loss": None, "accuracy": 0.5},
        {"kind": "step", "step": 1, "loss": 1.0, "accuracy": None}]
    store.close()


def test_truncated_last_line_is_tolerated_but_corruption_inside_is_not(tmp_path):
    store = RunStore(tmp_path, RunConfig()).open()
    store.append({"kind": "step", "step": 0})
    store.close()
    with open(store.records_path, "a") as f:
        f.write('{"kind": "st')
    assert store.read_records() == [{"kind": "step", "step": 0}]
    store.records_path.write_text('{"kind": "st\n{"kind": "step", "step": 1}\n')
    with pytest.raises(StoreError, match="line 1"):
        store.read_records()


def test_different_config_in_same_directory_is_refused_and_untouched(tmp_path):
    cfg = RunConfig()
    store = RunStore(tmp_path, cfg).open()
    path = store.dir / "config.json"
    data = json.loads(path.read_text())
    data["config_hash"] = "0" * 12
    path.write_text(json.dumps(data))
    before = path.read_bytes()
    with pytest.raises(StoreError, match="different config"):
        RunStore(tmp_path, cfg).open()
    assert path.read_bytes() == before


def test_done_marker_and_checkpoints(tmp_path):
    store = RunStore(tmp_path, RunConfig()).open()
    assert not store.done and store.latest_checkpoint() is None
    store.save_checkpoint(0, {"epoch": 0})
    store.save_checkpoint(1, {"epoch": 1})
    (store.checkpoints / "epoch-002.pt").write_bytes(b"torn")  # a checkpoint cut short by a crash
    assert store.latest_checkpoint()["epoch"] == 1
    store.mark_done()
    assert store.done
    assert not [p for p in store.dir.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere, so permissions cannot be tested")
def test_unwritable_root_fails_early(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(StoreError, match="not writable"):
        check_writable(ro / "study")


def test_root_that_is_a_file_fails_early(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(StoreError, match="not writable"):
        check_writable(target / "study")


# -- resume: the records file is cut back to exactly what the checkpoint covers --------------------------------
def _store_with_two_checkpoints(tmp_path):
    store = RunStore(tmp_path, RunConfig()).open()
    store.append({"kind": "eval", "step": 0, "epoch": 0})
    store.save_checkpoint(0, {"epoch": 0})
    after_0 = store.records_path.read_bytes()
    store.append({"kind": "step", "step": 0, "epoch": 0, "loss": 1.0})
    store.save_checkpoint(1, {"epoch": 1})
    after_1 = store.records_path.read_bytes()
    store.append({"kind": "step", "step": 1, "epoch": 1, "loss": 0.5})
    store.records_path.open("ab").write(b'{"kind": "st')  # torn by the kill
    store.close()
    return store, after_0, after_1


def test_restore_cuts_records_back_to_the_newest_checkpoint(tmp_path):
    store, _, after_1 = _store_with_two_checkpoints(tmp_path)
    (store.checkpoints / ".epoch-002.pt.1234abcd.tmp").write_bytes(b"half a checkpoint")
    state = store.restore()
    assert state["epoch"] == 1 and store.records_path.read_bytes() == after_1
    assert not list(store.checkpoints.glob(".*.tmp"))
    store.append({"kind": "step", "step": 1, "epoch": 1, "loss": 0.5})  # appends continue the cut file
    assert store.records_path.read_bytes() == after_1 + b'{"kind": "step", "step": 1, "epoch": 1, "loss": 0.5}\n'


@pytest.mark.parametrize("damage", ["no-mark", "torn"])
def test_restore_falls_back_past_a_checkpoint_it_cannot_use(tmp_path, damage, caplog):
    """A checkpoint from a version that stored no records mark, or one that does not load, is deleted (so that no
    later resume picks it up again) and the resume starts from the one before it."""
    store, after_0, _ = _store_with_two_checkpoints(tmp_path)
    newest = store.checkpoints / "epoch-001.pt"
    if damage == "no-mark":
        state = torch.load(newest, weights_only=False)
        del state["records_mark"]
        torch.save(state, newest)
    else:
        newest.write_bytes(newest.read_bytes()[:20])
    with caplog.at_level("WARNING", logger="experiments.store"):
        state = store.restore()
    assert state["epoch"] == 0 and store.records_path.read_bytes() == after_0
    assert not newest.exists() and "epoch-001.pt" in caplog.text


@pytest.mark.parametrize("damage", ["records-lost", "records-changed", "corrupt-line"])
def test_restore_refuses_records_that_no_crash_can_explain(tmp_path, damage):
    """Records the checkpoint saw fsynced cannot vanish or change in a crash: that is damage, named, not resumed."""
    store, _, after_1 = _store_with_two_checkpoints(tmp_path)
    damaged = {"records-lost": after_1[:-5], "records-changed": after_1.replace(b"1.0", b"2.0"),
               "corrupt-line": b"garbage\n" + after_1}[damage]
    store.records_path.write_bytes(damaged)
    needle = "corrupt record" if damage == "corrupt-line" else "does not begin with the .*epoch-001.pt"
    with pytest.raises(StoreError, match=f"{needle}.*move the run directory away"):
        store.restore()
    assert store.records_path.read_bytes() == damaged and (store.checkpoints / "epoch-001.pt").exists()


def test_restore_without_a_usable_checkpoint_starts_over(tmp_path):
    store = RunStore(tmp_path, RunConfig()).open()
    store.append({"kind": "eval", "step": 0, "epoch": 0})
    store.close()
    assert store.has_progress()
    assert store.restore() is None and store.records_path.read_bytes() == b""
    assert not store.has_progress()


# -- durability: records are on disk before the checkpoint (or done) that covers them --------------------------
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd to name fsynced files")
def test_records_are_fsynced_before_the_checkpoint_and_done_are_renamed_in(tmp_path, monkeypatch):
    calls = []
    fsync, replace = os.fsync, os.replace

    def logged_fsync(fd):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        calls.append(("fsync", path.name if path.is_file() else path.name + "/",
                      os.fstat(fd).st_size if path.is_file() else None))
        fsync(fd)

    def logged_replace(src, dst):
        replace(src, dst)
        calls.append(("replace", Path(dst).name, None))

    store = RunStore(tmp_path, RunConfig()).open()
    run = store.dir.name
    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "replace", logged_replace)
    store.append({"kind": "eval", "step": 0, "epoch": 0})
    store.append({"kind": "smoothness", "step": 0, "epoch": 0})
    size = store.records_path.stat().st_size
    store.save_checkpoint(0, {"epoch": 0})
    records_synced, checkpoint_in = calls.index(("fsync", "records.jsonl", size)), calls.index(
        ("replace", "epoch-000.pt", None))
    assert records_synced < calls.index(("fsync", f"{run}/", None)) < checkpoint_in  # the file's entry, too
    assert calls[checkpoint_in + 1] == ("fsync", "checkpoints/", None)  # the rename itself is durable
    calls.clear()
    store.append({"kind": "step", "step": 0, "epoch": 0, "loss": 1.0})
    store.mark_done()
    size = store.records_path.stat().st_size
    assert calls.index(("fsync", "records.jsonl", size)) < calls.index(("replace", "done", None))
    assert calls[-2:] == [("replace", "done", None), ("fsync", f"{run}/", None)]


# -- files keep the user's umask (atomic writes used to create them 0600) ---------------------------------------
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        store = RunStore(tmp_path, RunConfig()).open()
        store.append({"kind": "eval", "step": 0, "epoch": 0})
        store.save_checkpoint(0, {"epoch": 0})
        store.write_timing({"train": 1.0})
        store.mark_done()
        with atomic_write(tmp_path / "figure.png") as f:  # the API figures and reports can write through
            f.write(b"png")
        atomic_write_text(tmp_path / "report.md", "# report\n")
    finally:
        os.umask(old)
    files = [store.dir / n for n in ("config.json", "records.jsonl", "timing.json", "done")] + [
        store.checkpoints / "epoch-000.pt", tmp_path / "figure.png", tmp_path / "report.md"]
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: oct(mode) for p in files}


def test_atomic_write_leaves_the_old_file_on_error(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as f:
            f.write("half of the new")
            raise RuntimeError("the writer failed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.md"]


# -- readers: one-line StoreErrors naming the file and line ---------------------------------------------------
def _records_file(tmp_path, content: bytes) -> Path:
    path = tmp_path / "records.jsonl"
    path.write_bytes(content)
    return path


GOOD = b'{"kind": "step", "step": 0, "epoch": 0, "bn_mode": "batch", "loss": 2.3, "accuracy": 0.1}\n'


@pytest.mark.parametrize("line,needle", [
    (b'{"kind": "eval", "step": 1, "epoch": 0, "test_loss": 1.\xff}\n', "not UTF-8 text (byte 0xff"),
    (b'[1, 2, 3]\n', "expected a JSON object, got an array"),
    (b'{"kind": "step", "step": 1, "epoch": 0, "loss": "abc"}\n', "'loss' must be a number or null, got 'abc'"),
    (b'{"kind": "step", "step": "1", "epoch": 0}\n', "'step' must be a non-negative integer"),
    (b'{"kind": "probe", "step": 1, "epoch": 0, "losses": [1.0, "x"]}\n', "'losses' must be a list of numbers"),
    (b'{"kind": "step", "step": 1, "epoch": 0, "bn_mode": "train"}\n', "'bn_mode' must be 'batch' or 'running'"),
    (b'{"kind": "st\n', "not valid JSON"),
])
def test_a_bad_record_line_is_a_store_error_naming_file_and_line(tmp_path, line, needle):
    path = _records_file(tmp_path, GOOD + line + GOOD)
    with pytest.raises(StoreError) as err:
        read_records(path)
    message = str(err.value)
    assert message.startswith(f"{path}, line 2: ") and needle in message and "\n" not in message


def test_a_torn_last_line_is_skipped_warned_about_or_refused(tmp_path):
    path = _records_file(tmp_path, GOOD + b'{"kind": "step", "st')
    assert read_records(path) == [json.loads(GOOD)]
    with pytest.warns(UserWarning, match="line 2: skipping a truncated last record"):
        assert read_records(path, torn_tail="warn") == [json.loads(GOOD)]
    with pytest.raises(StoreError, match=r"line 2: corrupt record \(not valid JSON"):
        read_records(path, torn_tail="error")
    # a complete record that only lacks its newline is kept; a missing file has no records
    assert read_records(_records_file(tmp_path, GOOD + GOOD.rstrip())) == [json.loads(GOOD)] * 2
    assert read_records(tmp_path / "absent.jsonl") == []


def test_read_config_round_trips_and_names_the_file_and_option(tmp_path):
    cfg = RunConfig(lr=0.1, seed=3)
    store = RunStore(tmp_path, cfg).open()
    path = store.dir / "config.json"
    assert read_config(path) == cfg
    saved = json.loads(path.read_text())
    for change, needle in [({"lr": "abc"}, "--lr must be a number, got 'abc'"),
                           ({"naive_init": "false"}, "--naive-init must be true or false"),
                           ({"epochs": 2.5}, "--epochs must be an integer, got 2.5"),
                           ({"bogus": 1}, "unknown config keys: ['bogus']"),
                           ({"lr": 0.2}, "config_hash")]:
        path.write_text(json.dumps({**saved, **change}))
        with pytest.raises(StoreError) as err:
            read_config(path)
        assert str(err.value).startswith(f"{path}: ") and needle in str(err.value), change
    for content, needle in [(b'{"lr": 0.1\xff}', "not UTF-8"), (b"{not json", "not valid JSON"),
                            (b"[1, 2]", "must be a JSON object")]:
        path.write_bytes(content)
        with pytest.raises(StoreError, match=f"^{path}: .*{needle}"):
            read_config(path)


@pytest.mark.parametrize("record, problem", [
    ({"kind": "per_layer", "step": 0, "epoch": 0, "layer": "fc", "matrix": "hessian"}, "'module' must be a string"),
    ({"kind": "per_layer", "step": 0, "module": "fc", "layer": "fc", "matrix": "ggn"},
     "'epoch' must be a non-negative integer"),
    ({"kind": "spectrum", "step": 0, "epoch": 0, "bn_mode": "batch", "samples": 8, "n_params": 3, "n_steps": 2,
      "nodes": [[1.0, 2.0]], "weights": [[0.5]]}, "'weights' and 'nodes' must have the same shape"),
])
def test_records_are_checked_against_the_fields_their_feature_declares(tmp_path, record, problem):
    """One validator: the Record a feature declares (strings, integers, number matrices), checked by the store."""
    from experiments.store import StoreError, read_records
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps({"kind": "step", "step": 1, "epoch": 0, "loss": 1.0})
                    + "\n")
    with pytest.raises(StoreError, match=problem):
        read_records(path)
