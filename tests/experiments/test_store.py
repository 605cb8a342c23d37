"""The run store: records survive a kill, configs are never overwritten, unwritable roots fail early."""
import json
import os

import pytest

from experiments.config import RunConfig
from experiments.store import RunStore, StoreError, check_writable


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
    assert store.latest_checkpoint() == {"epoch": 1}
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
