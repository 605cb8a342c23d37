"""The crash-safe run store: one directory per run, records appended and flushed as produced, atomic markers.

The only code that opens, parses or writes a run directory's files (layout and schema: results/README.md). Its write
order lets ``--resume`` turn a kill at any moment into exactly the records of an uninterrupted run; `RunStore` is the
run lifecycle `train_run` and the Tracker share, `RunState` the vocabulary of run states, and its readers raise
`StoreError` naming the file and line of anything malformed.

Details: docs/explanation/modules.md#store
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, List, Optional, Tuple

import numpy as np
import torch

from smoothness import BN_MODES

from experiments.atomic import atomic_write, atomic_write_bytes, atomic_write_json, fsync_dir, remove_temporaries
from experiments.config import ConfigError, RunConfig
from experiments.features.base import CORE_RECORD_NUMBERS, RecordSchema

__all__ = ["StoreError", "RunFinished", "RunState", "RunStore", "RecordsCheck", "check_finished", "finish_mark",
           "finished_state", "provenance_change", "timing_of", "check_writable", "read_config", "read_config_file",
           "ConfigFile", "iter_records", "iter_numbered_records", "read_records", "atomic_write", "atomic_write_bytes",
           "atomic_write_json", "RECORD_NUMBERS", "RECORD_NUMBER_LISTS", "RECORD_STRINGS", "RECORD_INTEGERS", "RECORD_MATRICES", "RUN_FILES", "PROGRESS_FILES", "is_run_dir",
           "run_files", "has_config", "is_done", "has_progress", "checkpoint_epochs", "last_record", "last_event",
           "event_fields", "run_log_handler", "weights_file", "load_weights", "run_lock", "is_locked",
           "read_tracker_info", "read_dataset_info"]

log = logging.getLogger(__name__)

# -- the files of a run directory (results/README.md) ----------------------------------------------------------
CONFIG, RECORDS, TIMING, DATASET, RUN_LOG, DONE = (
    "config.json", "records.jsonl", "timing.json", "dataset.json", "run.log", "done")
CODE = "code.json"   # a user factory's source file and sha256 (experiments.plugins)
TRACKER = "tracker.json"   # a loop of one's own tracked by experiments.Tracker: its model and optimizer classes
CHECKPOINTS = "checkpoints"
SURFACES = "surfaces"         # surfaces/<stem>.npz, written by `smoothness-lab surface`
CHECKPOINT_GLOB = "epoch-*.pt"
#: A folder is a run directory when it holds any of these (and its name does not start with "."). Holding one of
#: PROGRESS_FILES without config.json makes it a broken run (its model, lr and seed are unknown); holding only a
#: run.log, a run that failed before it started, or is starting now.
RUN_FILES = (CONFIG, RECORDS, DONE, TIMING, CHECKPOINTS, RUN_LOG)
PROGRESS_FILES = (RECORDS, DONE, TIMING, CHECKPOINTS)



class RunState:
    """The one vocabulary of run states. On disk (`smoothness-lab status`, in this order): ``running``, ``corrupt``,
    ``truncated`` (finished, but records.jsonl no longer holds the records it finished with: `check_finished`),
    ``diverged``, ``done``, ``failed``, ``interrupted``, ``not started``. What a launch reports per run
    (`experiments.launch_result.RunOutcome`): ``done``, ``diverged``, ``skipped`` (already finished), ``failed``,
    ``busy`` (another live launch trains it). The study tables say ``unfinished`` for a run that is neither."""
    DONE, DIVERGED, RUNNING, INTERRUPTED, FAILED = "done", "diverged", "running", "interrupted", "failed"
    CORRUPT, TRUNCATED, NOT_STARTED = "corrupt", "truncated", "not started"
    SKIPPED, BUSY, UNFINISHED = "skipped", "busy", "unfinished"
    #: the states `smoothness-lab status` shows, in the order it counts them
    ON_DISK = (DONE, DIVERGED, RUNNING, INTERRUPTED, FAILED, CORRUPT, TRUNCATED, NOT_STARTED)
    #: the states of a finished run
    FINISHED = (DONE, DIVERGED)


#: numeric fields of each record kind (results/README.md): a number, or null for a non-finite one. Read from the
#: measurement registry (each measurement declares its records, experiments/features/) plus the kinds the loop
#: writes itself (``diverged``), on every look-up: a measurement registered later is checked too.
RECORD_NUMBERS = RecordSchema("numbers", CORE_RECORD_NUMBERS)
#: list-of-numbers fields of each record kind
RECORD_NUMBER_LISTS = RecordSchema("number_lists", {})
RECORD_STRINGS = RecordSchema("strings", {})
RECORD_INTEGERS = RecordSchema("integers", {})
RECORD_MATRICES = RecordSchema("number_matrices", {})


WEIGHTS = ("init", "final")   # the weight sets every run keeps: weights-init.pt, weights-final.pt


def _weights_name(which: str) -> str:
    return f"weights-{which}.pt"


class StoreError(RuntimeError):
    """The results directory cannot be used as asked; the message says why and what to do.

    Raised by the readers of run files, it also carries ``path``, ``line`` (None when the file as a whole is wrong),
    ``problem`` (what is wrong, without the location), ``unreadable`` (the file system refused the file:
    permissions, a disk error) and ``torn`` (a last line without its newline, as a kill mid-write leaves) apart,
    so that status and analysis can word the location their own way."""

    def __init__(self, message: str, path=None, problem: Optional[str] = None, line: Optional[int] = None, *,
                 torn: bool = False, unreadable: bool = False):
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.problem, self.line, self.torn, self.unreadable = problem or message, line, torn, unreadable


# -- what a folder holds ---------------------------------------------------------------------------------------
def run_files(path) -> List[str]:
    """The names of `RUN_FILES` that ``path`` holds, in that order."""
    path = Path(path)
    return [name for name in RUN_FILES if (path / name).exists()]


def is_run_dir(path) -> bool:
    """Whether ``path`` is a run directory (the rule at `RUN_FILES`)."""
    path = Path(path)
    return path.is_dir() and not path.name.startswith(".") and bool(run_files(path))


def has_config(run_dir) -> bool:
    return (Path(run_dir) / CONFIG).is_file()


def config_path(run_dir) -> Path:
    return Path(run_dir) / CONFIG


def records_path(run_dir) -> Path:
    return Path(run_dir) / RECORDS


def is_done(run_dir) -> bool:
    """Whether the ``done`` marker is there: the run finished (or diverged)."""
    return (Path(run_dir) / DONE).exists()


def checkpoint_epochs(run_dir) -> List[int]:
    """The epochs of the checkpoints in ``run_dir/checkpoints``, ascending (a file whose name is not epoch-NNN.pt is
    passed over)."""
    directory = Path(run_dir) / CHECKPOINTS
    if not directory.is_dir():
        return []
    stems = (p.stem.removeprefix("epoch-") for p in directory.glob(CHECKPOINT_GLOB))
    return sorted(int(s) for s in stems if s.isdigit())


def checkpoint_path(run_dir, epoch: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"epoch-{int(epoch):03d}.pt"


def has_progress(run_dir) -> bool:
    """Whether an unfinished run directory holds records or a checkpoint of an earlier launch (continuing it needs
    ``resume``; ``training.train_run`` refuses it otherwise)."""
    records = records_path(run_dir)
    return (records.exists() and records.stat().st_size > 0) or bool(checkpoint_epochs(run_dir))


def _clean(value):
    """JSON has no NaN/inf: non-finite numbers become null (the schema says so)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def _record_line(record: dict) -> bytes:
    return (json.dumps(_clean(record), allow_nan=False) + "\n").encode("utf-8")


def check_writable(root: Path) -> Path:
    """Fail before any work if ``root`` cannot hold results."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise StoreError(f"the results directory {root} is not writable ({exc.strerror or exc}); "
                         f"choose another with --results-dir or fix its permissions") from None
    return root


# -- readers ---------------------------------------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        problem = f"cannot be read ({exc.strerror or exc})"
        raise StoreError(f"{path}: {problem}", path, problem, unreadable=True) from None


@dataclass(frozen=True)
class ConfigFile:
    """A run's ``config.json`` as written: the JSON object (``data``) and its ``text``, so that a reader that checks
    fields of its own can point at their line (`line_of`)."""
    path: Path
    data: dict
    text: str

    def line_of(self, key: str) -> int:
        """The line of ``"key":`` in the file (1 if not found)."""
        m = re.search(rf'^.*"{re.escape(key)}"\s*:', self.text, flags=re.MULTILINE)
        return self.text.count("\n", 0, m.start()) + 1 if m else 1


def read_config_file(path) -> ConfigFile:
    """A run's ``config.json`` as a JSON object, unchecked against RunConfig (status shows, and analysis averages,
    runs whose options an older version wrote). StoreError names the file (and line) when it is not readable
    UTF-8 JSON holding an object."""
    path = Path(path)
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8")
        obj = json.loads(text)
    except UnicodeDecodeError as exc:
        problem = f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})"
        raise StoreError(f"{path}: {problem}; expected the run's config as JSON", path, problem) from None
    except json.JSONDecodeError as exc:
        problem = f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        raise StoreError(f"{path}: {problem}; expected the run's config as a JSON object", path, problem,
                           exc.lineno) from None
    if not isinstance(obj, dict):
        problem = f"must be a JSON object (the run's config), got {_json_type(obj)}"
        raise StoreError(f"{path}: {problem}", path, problem, 1)
    return ConfigFile(path, obj, text)


def read_config(path) -> RunConfig:
    """The RunConfig saved in a run's ``config.json``, checked: readable UTF-8 JSON, an object of known options of
    the right types, and (where the file holds them) a run_id and config_hash that match those options.

    Every problem is a one-line StoreError that names the file; use ``to_dict()`` / ``run_id`` on the result."""
    path = Path(path)
    data = read_config_file(path).data
    try:
        cfg = RunConfig.from_dict(data)
    except ConfigError as exc:
        raise StoreError(f"{path}: {exc}", path, str(exc)) from None
    for key, mine in (("config_hash", cfg.config_hash), ("run_id", cfg.run_id)):
        if key in data and data[key] != mine:
            problem = (f"{key} {data[key]!r} does not match the options in the file (they give {mine!r}); the file "
                       f"was edited, or written by another version of the toolkit")
            raise StoreError(f"{path}: {problem}", path, problem)
    return cfg


def _json_type(value) -> str:
    names = {list: "an array", str: "a string", bool: "true/false", int: "a number", float: "a number",
             dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _record_problem(record) -> Optional[str]:
    """What is wrong with one parsed record line, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {_json_type(record)}"
    if "kind" not in record:
        return "a record without a 'kind'"
    kind = record.get("kind")
    if not isinstance(kind, str):
        return f"'kind' must be a string, got {kind!r}"
    for key in ("step", "epoch"):
        value = record.get(key)
        if key in record and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            return f"{key!r} must be a non-negative integer, got {value!r}"
    if "step" not in record:
        return "no 'step' key"
    if "bn_mode" in record and record["bn_mode"] not in BN_MODES:
        return f"'bn_mode' must be {' or '.join(repr(m) for m in BN_MODES)}, got {record['bn_mode']!r}"
    for key in RECORD_NUMBERS.get(kind, ()):
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"{key!r} must be a number or null, got {value!r}"
    for key in RECORD_NUMBER_LISTS.get(kind, ()):
        value = record.get(key)
        if value is not None and (not isinstance(value, list) or any(
                v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))) for v in value)):
            return f"{key!r} must be a list of numbers, got {value!r}"
    for key in RECORD_STRINGS.get(kind, ()):
        if not isinstance(record.get(key), str):
            return f"{key!r} must be a string, got {record.get(key)!r:.60}"
    for key in RECORD_INTEGERS.get(kind, ()):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"{key!r} must be a non-negative integer, got {value!r:.60}"
    shape = None
    for key in RECORD_MATRICES.get(kind, ()):
        rows = record.get(key)
        if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
            return f"{key!r} must be a non-empty list of non-empty lists of numbers, got {rows!r:.60}"
        bad = [v for r in rows for v in r if isinstance(v, bool) or not isinstance(v, (int, float))]
        if bad:
            return f"{key!r} must hold numbers, got {bad[0]!r:.60}"
        if shape is not None and [len(r) for r in rows] != shape[1]:
            return f"{key!r} and {shape[0]!r} must have the same shape (one list per probe, of equal lengths)"
        shape = shape or (key, [len(r) for r in rows])
    return None


def iter_numbered_records(path, *, torn_tail: str = "skip") -> Iterator[Tuple[int, dict]]:
    """(line number, record) for every record of a records.jsonl file, each checked against results/README.md.

    A last line without its newline is what a kill in the middle of a write leaves. ``torn_tail`` says what to do
    with it when it does not parse: "skip" it, "warn" (a `UserWarning`, then skip) or "error". Any other bad line
    raises StoreError("<file>, line <n>: corrupt record (<what is wrong>). ..."). A missing file yields nothing."""
    if torn_tail not in ("skip", "warn", "error"):
        raise ValueError(f"torn_tail must be 'skip', 'warn' or 'error', got {torn_tail!r}")
    path = Path(path)
    if not path.exists():
        return
    yield from _parse_records(path, _read_bytes(path), torn_tail)


def iter_records(path, *, torn_tail: str = "skip") -> Iterator[dict]:
    """`iter_numbered_records` without the line numbers."""
    for _, record in iter_numbered_records(path, torn_tail=torn_tail):
        yield record


def _parse_records(path: Path, data: bytes, torn_tail: str) -> Iterator[Tuple[int, dict]]:
    lines = data.split(b"\n")
    for i, raw in enumerate(lines):
        torn = i == len(lines) - 1      # no newline after it (empty when the file ends with one)
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            problem = f"not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1})"
        except json.JSONDecodeError as exc:
            problem = f"not valid JSON ({exc.msg} at column {exc.colno})"
        else:
            problem = _record_problem(record)
        if problem is None:
            yield i + 1, record
            continue
        if torn and torn_tail != "error":
            if torn_tail == "warn":
                warnings.warn(f"{path}, line {i + 1}: skipping a truncated last record (the line being written "
                              f"when the run was killed)", stacklevel=4)
            return
        raise StoreError(f"{path}, line {i + 1}: corrupt record ({problem}). Each line must be one JSON record "
                           f"as described in results/README.md; move the run directory away and rerun it",
                           path, problem, i + 1, torn=torn) from None


def read_records(path, *, torn_tail: str = "skip") -> List[dict]:
    """`iter_records` as a list."""
    return list(iter_records(path, torn_tail=torn_tail))


class RunFinished(StoreError):
    """The run directory holds a finished run (``done``): it is not trained again."""


def timing_of(timer) -> dict:
    """timing.json's content: seconds per phase of an `experiments.loop.Timer`, and their ``total``."""
    return {**timer.seconds, "total": sum(timer.seconds.values())}


class RunStore:
    """One run's directory: config.json, records.jsonl, timing.json, checkpoints/, run.log, done."""

    def __init__(self, root: Path, config: RunConfig):
        self.config = config
        self.dir = Path(root) / config.run_id
        self.records_path = self.dir / RECORDS
        self.checkpoints = self.dir / CHECKPOINTS
        self._file: Optional[BinaryIO] = None
        self._size = 0                      # bytes in records.jsonl, and their running sha256
        self._sha = hashlib.sha256()
        self._synced = False                # records.jsonl's directory entry is durable
        self._resuming = False              # `start(resume=True)`: `begin` continues from a checkpoint

    # -- lifecycle --------------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return is_done(self.dir)

    def open(self) -> "RunStore":
        """Create or re-open the directory; refuse one that holds a different config."""
        new_dir = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        if new_dir:
            fsync_dir(self.dir.parent)
        cfg_path = self.dir / CONFIG
        if cfg_path.exists():
            try:
                theirs = read_config_file(cfg_path).data
            except StoreError as exc:
                raise StoreError(f"{cfg_path} is unreadable ({exc.problem}); move the directory away to "
                                 f"rerun") from None
            if theirs.get("config_hash") != self.config.config_hash:
                raise StoreError(f"{self.dir} already holds a run with a different config "
                                 f"(hash {theirs.get('config_hash')} vs {self.config.config_hash}); "
                                 f"nothing was overwritten: use another --results-dir or --study name")
        atomic_write_json(cfg_path, {**self.config.to_dict(), "run_id": self.config.run_id,
                                     "config_hash": self.config.config_hash})
        if not self.checkpoints.exists():
            self.checkpoints.mkdir()
            fsync_dir(self.dir)
        return self

    def has_progress(self) -> bool:
        """Whether an earlier attempt left records or checkpoints (then only a resume may continue)."""
        return has_progress(self.dir)

    # -- the run lifecycle: start, begin, checkpoint, diverged / finish (train_run and Tracker both use it) ----------
    def start(self, *, resume: bool, how: str = "pass --resume") -> "RunStore":
        """Open the directory for training (`open`): refuse a finished run (`RunFinished`), and an interrupted one
        unless ``resume`` (``how`` says how the caller resumes)."""
        if self.done:
            raise RunFinished(f"{self.dir} holds a finished run of this config; its results stand (move the "
                              f"directory away, or change the study or a config field, to train it again)")
        self.open()
        if not resume and self.has_progress():
            raise StoreError(f"{self.dir} holds an interrupted run of this config; {how} to continue it from its "
                             f"last checkpoint (or move the directory away to start over)")
        self._resuming = resume
        return self

    def begin(self, provenance: dict, init_weights: dict) -> Optional[dict]:
        """Begin training after `start`: the checkpoint to continue from, or None for a fresh start.

        ``provenance`` maps code.json / dataset.json / tracker.json to what this launch uses (None: no such file).
        When a resume finds a checkpoint, each must match the file written when the run started (`provenance_change`):
        a change is refused in one line naming it, and the files are never rewritten; then records.jsonl is cut back
        to the checkpoint (`restore`). A fresh start writes them, and ``init_weights`` (the model's state_dict) as
        weights-init.pt."""
        try:
            if self._resuming and self.latest_checkpoint() is not None:
                for name, info in provenance.items():
                    change = provenance_change(self.dir, name, info)
                    if change is not None:
                        raise StoreError(change)
                saved = self.restore()
                if saved is not None:
                    return saved
            else:
                self.restore()   # no checkpoint: a fresh start; any records of an earlier attempt are dropped
            for name, info in provenance.items():
                if info is not None:
                    atomic_write_json(self.dir / name, info)
            self.save_weights("init", init_weights)
            return None
        except BaseException:
            self.close()
            raise

    def checkpoint(self, epoch: int, state: dict, timer) -> None:
        """`save_checkpoint` (timed as ``checkpoint`` by ``timer``, an `experiments.loop.Timer`), then timing.json."""
        with timer("checkpoint"):
            self.save_checkpoint(epoch, state)
        self.write_timing(timing_of(timer))

    def diverged(self, step: int, epoch: int, reason: str, timer) -> None:
        """End the run at a non-finite loss: the ``diverged`` record, timing.json, ``done``."""
        self.append({"kind": "diverged", "step": step, "epoch": epoch, "bn_mode": "batch", "loss": None,
                     "reason": reason})
        self.write_timing(timing_of(timer))
        self.mark_done()

    def finish(self, final_weights: dict, timer) -> None:
        """End a completed run: timing.json, weights-final.pt, then ``done`` (records first: `mark_done`)."""
        self.close()
        self.write_timing(timing_of(timer))
        self.save_weights("final", final_weights)
        self.mark_done()

    def _open_records(self) -> BinaryIO:
        if self._file is None:
            existing = self.records_path.read_bytes() if self.records_path.exists() else b""
            self._size, self._sha = len(existing), hashlib.sha256(existing)
            self._file = open(self.records_path, "ab")
        return self._file

    def append(self, record: dict) -> None:
        """Append one record and flush it to the OS: a killed process loses at most this line."""
        line = _record_line(record)
        f = self._open_records()
        f.write(line)
        f.flush()
        self._size += len(line)
        self._sha.update(line)

    def sync_records(self) -> dict:
        """Make every record appended so far durable (fsync the file and, once, its directory entry); return the
        records mark {"bytes", "sha256"} that a checkpoint taken now covers."""
        f = self._open_records()
        f.flush()
        os.fsync(f.fileno())
        if not self._synced:
            fsync_dir(self.dir)
            self._synced = True
        return {"bytes": self._size, "sha256": self._sha.hexdigest()}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def mark_done(self) -> None:
        """Write ``done``, after the records are durable: a finished run never lacks its last records. The marker
        holds the records mark of the finished run (`check_finished` compares the records file with it)."""
        mark = self.sync_records()
        self.close()
        atomic_write_json(self.dir / DONE, {"records_mark": mark})

    def write_timing(self, timing: dict) -> None:
        atomic_write_json(self.dir / TIMING, timing)

    def load_init_weights(self, device=None) -> dict:
        """``weights-init.pt``: the model's state_dict at initialisation (`save_weights`), on ``device``."""
        return torch.load(self.dir / _weights_name("init"), map_location=device, weights_only=True)

    # -- records ----------------------------------------------------------------------------------------------
    def read_records(self) -> List[dict]:
        """This run's records; a torn last line (a kill mid-write) is skipped, any other bad line is a StoreError."""
        return read_records(self.records_path)

    # -- checkpoints ------------------------------------------------------------------------------------------
    def save_checkpoint(self, epoch: int, state: dict) -> None:
        """Write ``checkpoints/epoch-NNN.pt`` holding ``state`` and the records mark, records first (module doc)."""
        state = {**state, "records_mark": self.sync_records()}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(checkpoint_path(self.dir, epoch), buffer.getvalue())

    def _checkpoint_files(self) -> List[Path]:
        return sorted(self.checkpoints.glob(CHECKPOINT_GLOB)) if self.checkpoints.exists() else []

    @staticmethod
    def _load(path: Path) -> Optional[dict]:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # a checkpoint torn by a crash, or not a checkpoint at all
            return None

    def save_weights(self, which: str, state_dict: dict) -> Path:
        """``weights-<which>.pt``: the model's state_dict (parameters and BN buffers, on CPU), written atomically.
        Runs keep ``init`` and ``final`` beside their records (about 120 kB each for the ConvNets, and outside the
        git-ignored checkpoints/) so loss surfaces and interpolations can be drawn without retraining."""
        if which not in WEIGHTS:
            raise ValueError(f"unknown weights {which!r}; use one of {WEIGHTS}")
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buffer)
        path = self.dir / _weights_name(which)
        atomic_write_bytes(path, buffer.getvalue())
        return path

    def latest_checkpoint(self) -> Optional[dict]:
        """The newest checkpoint that loads (a torn one is passed over), without checking it against the records."""
        for path in reversed(self._checkpoint_files()):
            state = self._load(path)
            if state is not None:
                return state
        return None

    def restore(self) -> Optional[dict]:
        """Prepare a resume: the newest checkpoint, with records.jsonl cut back to exactly the records it covers
        (its records mark); None, and no records, if there is no checkpoint.

        What a kill or a power loss can leave is repaired: a torn last line, records made after the checkpoint,
        temporary files. A checkpoint that does not load, or that carries no records mark (an older version wrote
        it), is deleted with a warning, and the one before it is used. What no crash can leave is refused with a
        StoreError, so that damage is named rather than papered over: a corrupt line before the last one, or a
        records file whose beginning is not the one the newest checkpoint saw (records fsynced before the
        checkpoint was written have been lost or changed since)."""
        self.close()
        for directory in (self.dir, self.checkpoints):
            if directory.exists():
                for leftover in remove_temporaries(directory):
                    log.info("removed %s, left by an interrupted write", leftover)
        records = self.records_path.read_bytes() if self.records_path.exists() else b""
        for _ in _parse_records(self.records_path, records, torn_tail="skip"):
            pass
        chosen, keep = None, 0
        for path in reversed(self._checkpoint_files()):
            state = self._load(path)
            mark = state.get("records_mark") if isinstance(state, dict) else None
            if isinstance(mark, dict):
                if not (mark["bytes"] <= len(records)
                        and hashlib.sha256(records[:mark["bytes"]]).hexdigest() == mark["sha256"]):
                    found = (f"it holds only {len(records)} bytes" if len(records) < mark["bytes"]
                             else "its first bytes differ")
                    raise StoreError(
                        f"{self.records_path} does not begin with the {mark['bytes']} bytes of records that {path} "
                        f"was written after ({found}): records saved before the checkpoint were lost or changed "
                        f"since; move the run directory away and rerun it")
                chosen, keep = state, mark["bytes"]
                break
            log.warning("resume: deleting %s: it %s; resuming from the checkpoint before it", path,
                        "does not load" if state is None else "was written by an older version (no records mark)")
            path.unlink()
        if self.checkpoints.exists():
            fsync_dir(self.checkpoints)
        self._file = open(self.records_path, "ab")
        if len(records) != keep:
            self._file.truncate(keep)
            os.fsync(self._file.fileno())
        self._size, self._sha = keep, hashlib.sha256(records[:keep])
        return chosen


# -- what a run started with: code.json, dataset.json, tracker.json ---------------------------------------------
#: the fields of each provenance file that a resume compares (code.json: each factory's sha256)
PROVENANCE_FIELDS = {DATASET: ("fingerprint",),
                     TRACKER: ("model_label", "dataset_label", "model_class", "parameters", "optimizer_class")}


def _read_json_object(path: Path) -> Optional[dict]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _short(value) -> str:
    return f"{value[:8]}…" if isinstance(value, str) and len(value) == 64 else repr(value)


def provenance_change(run_dir, name: str, now: Optional[dict]) -> Optional[str]:
    """One line naming what differs between the provenance file ``name`` the run started with (code.json,
    dataset.json or tracker.json) and ``now``; None when nothing compared differs. A file or field the run did not
    write (runs of older versions have no dataset fingerprint) is not compared."""
    then = _read_json_object(Path(run_dir) / name)
    if then is None or now is None:
        return None
    advice = "start a new run folder (or another study name), or restore"
    if name == CODE:
        for key, entry in now.items():
            old = then.get(key)
            if isinstance(old, dict) and isinstance(entry, dict) and old.get("sha256") != entry.get("sha256"):
                return (f"the {key} factory {entry.get('import')} changed since this run started ({name} sha256 "
                        f"{_short(old.get('sha256'))} → {_short(entry.get('sha256'))}, {entry.get('file')}); "
                        f"{advice} the code it started with to resume it")
        return None
    for field in PROVENANCE_FIELDS.get(name, ()):
        if field in then and field in now and then[field] != now[field]:
            what = now.get("factory") or now.get("path") or now.get("label") or now.get("source") or "data"
            subject = f"the dataset {what}" if name == DATASET else f"the tracked loop's {field}"
            return (f"{subject} changed since this run started ({name} {field} {_short(then[field])} → "
                    f"{_short(now[field])}); {advice} the "
                    f"{'data' if name == DATASET else 'model, data and optimizer'} it started with to resume it")
    return None


# -- a finished run's records: still those it finished with? ------------------------------------------------------
@dataclass(frozen=True)
class RecordsCheck:
    """What `check_finished` found wrong: ``state`` is `RunState.TRUNCATED` (fewer bytes than the run finished
    with) or `RunState.CORRUPT` (other bytes), ``problem`` one line naming the file."""
    state: str
    problem: str


def finish_mark(run_dir) -> Tuple[Optional[dict], str]:
    """(records mark, where it comes from) that a finished run's records.jsonl must match: the one in ``done``
    (exact), else the newest checkpoint's (the file must begin with it); (None, "") when there is neither (runs
    finished before ``done`` held it, their checkpoints deleted: cannot be checked)."""
    marker = _read_json_object(Path(run_dir) / DONE)
    mark = marker.get("records_mark") if marker else None
    if _is_mark(mark):
        return mark, DONE
    for epoch in reversed(checkpoint_epochs(run_dir)):
        state = RunStore._load(checkpoint_path(run_dir, epoch))
        mark = state.get("records_mark") if isinstance(state, dict) else None
        if _is_mark(mark):
            return mark, str(Path(CHECKPOINTS) / checkpoint_path(run_dir, epoch).name)
    return None, ""


def _is_mark(mark) -> bool:
    return isinstance(mark, dict) and isinstance(mark.get("bytes"), int) and isinstance(mark.get("sha256"), str)


def check_finished(run_dir) -> Optional[RecordsCheck]:
    """For a finished run (``done``): whether records.jsonl still holds the records the run finished with, compared
    with the records mark ``done`` keeps (or, for runs finished before it kept one, the newest checkpoint's). None
    when they match, when the run is not finished, or when there is no mark to compare with (older runs)."""
    run_dir = Path(run_dir)
    if not is_done(run_dir):
        return None
    mark, source = finish_mark(run_dir)
    if mark is None:
        return None
    try:
        data = _read_bytes(records_path(run_dir)) if records_path(run_dir).exists() else b""
    except StoreError as exc:
        return RecordsCheck(RunState.CORRUPT, f"{RECORDS}: {exc.problem}")
    exact = source == DONE
    n = mark["bytes"]
    if len(data) < n:
        return RecordsCheck(RunState.TRUNCATED, (
            f"{RECORDS}: {len(data)} bytes, but the run finished with {n} ({source} records mark): the file was cut "
            f"since; its last records are missing, restore the file or rerun the run"))
    if hashlib.sha256(data[:n]).hexdigest() != mark["sha256"] or (exact and len(data) != n):
        return RecordsCheck(RunState.CORRUPT, (
            f"{RECORDS}: not the records the run finished with ({source} records mark: {n} bytes, sha256 "
            f"{_short(mark['sha256'])}); it was changed since: restore the file or rerun the run"))
    return None


def finished_state(run_dir) -> Optional[str]:
    """`RunState.DONE` or `RunState.DIVERGED` when the run directory says the run finished, else None (a cheap
    look: the ``done`` marker and the last record)."""
    if not is_done(run_dir):
        return None
    return RunState.DIVERGED if last_record(run_dir).get("kind") == "diverged" else RunState.DONE


# -- a cheap look at the last record (launchers, slurm, surface) -------------------------------------------------
def last_record(run_dir: Path) -> dict:
    """The last complete line of ``run_dir/records.jsonl``, unchecked; {} when there is none or it does not parse.
    Reads only the file's tail, so that a launcher can poll a long run cheaply."""
    try:
        with open(records_path(run_dir), "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 65536))
            record = json.loads(f.read().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return {}
    return record if isinstance(record, dict) else {}


# -- run.log: the launcher's event lines -------------------------------------------------------------------------
EVENTS = ("start", "finish", "failed", "interrupted")
_LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
_EVENT = re.compile(r"^\S+ \S+ [A-Z]+ (" + "|".join(EVENTS) + r")\b(.*)$")


def run_log_handler(run_dir: Path) -> logging.Handler:
    """A logging handler that appends to ``run_dir/run.log`` in the format `last_event` reads; the launcher logs
    ``start <run-id> pid=.. host=.. [slurm_job=..]``, ``finish``, ``failed`` and ``interrupted`` lines through it."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(Path(run_dir) / RUN_LOG, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    return handler


def last_event(run_dir: Path, events=EVENTS) -> Tuple[Optional[str], str]:
    """The last of the launcher's ``events`` lines in run.log: (event, the rest of the line); (None, "") without."""
    try:
        lines = (Path(run_dir) / RUN_LOG).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None, ""
    for line in reversed(lines):
        m = _EVENT.match(line)
        if m and m.group(1) in events:
            return m.group(1), m.group(2).strip(" :")
    return None, ""


def event_fields(rest: str) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """(pid, host, SLURM job) from the rest of a run.log start line."""
    def field(name):
        m = re.search(rf"\b{name}=(\S+)", rest)
        return m.group(1).rstrip(",") if m else None
    return field("pid"), field("host"), field("slurm_job")


# -- weights: weights-init.pt, weights-final.pt, checkpoints/epoch-NNN.pt -----------------------------------------
def weights_file(run_dir: Path, epoch: str) -> Path:
    """The file holding a run's weights at ``epoch`` ("init", "final", or a number: a checkpoint still kept);
    StoreError saying why when the run has none."""
    run_dir = Path(run_dir)
    if epoch in WEIGHTS:
        path = run_dir / _weights_name(epoch)
        if not path.exists():
            if epoch == "final" and not is_done(run_dir):
                why = "the run has not finished; resume it first"
            elif epoch == "final" and last_record(run_dir).get("kind") == "diverged":
                why = "the run diverged, so it has no finite final weights"
            else:
                why = "it was trained before runs kept their weights; retrain it to draw surfaces"
            raise StoreError(f"{run_dir} has no {path.name} ({why})")
        return path
    path = checkpoint_path(run_dir, int(epoch))
    if not path.exists():
        have = [str(e) for e in checkpoint_epochs(run_dir)]
        raise StoreError(f"{run_dir} has no checkpoint of epoch {epoch} (checkpoints present: "
                         f"{', '.join(have) or 'none'}); use --epoch init or final")
    return path


def load_weights(path: Path) -> Tuple[dict, str]:
    """(model state_dict on CPU, sha256 of the file) from a weights file or a checkpoint (its ``model``); a file
    that does not load, or holds no state_dict, is a StoreError."""
    path = Path(path)
    data = _read_bytes(path)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:   # torch.load raises many types on a truncated or foreign file
        raise StoreError(f"{path} is not a readable weights file ({len(data)} bytes; {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); it is truncated or "
                         f"damaged: restore it, or retrain the run") from None
    state = obj["model"] if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StoreError(f"{path} holds no model state_dict (got {type(state).__name__}); restore the run's "
                         f"weights file, or retrain the run")
    return state, hashlib.sha256(data).hexdigest()


# -- surfaces/<stem>.npz: arrays and the JSON spec they were computed from ------------------------------------
def surface_file(run_dir: Path, stem: str) -> Path:
    return Path(run_dir) / SURFACES / f"{stem}.npz"


def surface_files(run_dir: Path) -> List[Path]:
    """The run's stored surfaces, by name."""
    return sorted((Path(run_dir) / SURFACES).glob("*.npz"))


def stored_form(spec: dict) -> dict:
    """``spec`` as `read_arrays` gives it back (tuples become lists), to compare a wanted spec with a stored one."""
    return json.loads(json.dumps(spec, sort_keys=True))


def write_arrays(path: Path, spec: dict, arrays: dict) -> None:
    """One npz holding ``arrays`` and ``spec`` (as JSON, under "spec"), written atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, spec=np.array(json.dumps(spec, sort_keys=True)), **arrays)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())


def read_arrays(path: Path) -> Tuple[dict, dict]:
    """(spec, arrays) of a file `write_arrays` wrote; OSError, ValueError, KeyError, EOFError or
    zipfile.BadZipFile when it is unreadable, truncated or not such a file."""
    with np.load(path, allow_pickle=False) as f:
        return json.loads(str(f["spec"])), {k: f[k] for k in f.files if k != "spec"}


# -- the run lock ------------------------------------------------------------------------------------------------
@contextmanager
def run_lock(run_dir: Path):
    """Hold an exclusive lock on ``run_dir/run.log`` while the run executes, so that two launches into the same
    results directory never train one run at once; yields False (and holds nothing) if another process holds it.
    The lock dies with its process, even on SIGKILL. No-op where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield True
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / RUN_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def is_locked(run_dir: Path) -> bool:
    """Whether a live process holds ``run_lock`` on this run (on this machine)."""
    try:
        import fcntl
        fd = os.open(Path(run_dir) / RUN_LOG, os.O_RDONLY)
    except (ImportError, OSError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def read_code(run_dir) -> Optional[dict]:
    """The run's ``code.json`` (written by `RunStore.begin`), or None when it has none or it does not parse."""
    return _read_json_object(Path(run_dir) / CODE)


def read_tracker_info(run_dir) -> Optional[dict]:
    """The run's ``tracker.json`` (a loop tracked by ``experiments.Tracker``), or None."""
    return _read_json_object(Path(run_dir) / TRACKER)


def read_dataset_info(run_dir) -> Optional[dict]:
    """The run's ``dataset.json`` (what data it read), or None."""
    return _read_json_object(Path(run_dir) / DATASET)
