"""The crash-safe run store: one directory per run, records appended and flushed as produced, atomic markers.

Layout and record schema: results/README.md. Files that are replaced (config.json, timing.json, checkpoints, done)
go through `experiments.atomic`: a temporary file, fsynced, renamed over the target, then the directory fsynced.

Write order, so that a kill or a power loss at any moment leaves a state that ``--resume`` turns into exactly the
records of an uninterrupted run:

1. records are appended to records.jsonl and flushed (a kill loses at most the line being written);
2. a checkpoint first fsyncs records.jsonl (and its directory), then is written and renamed in; it stores the length
   and sha256 of the records it covers (its "records mark");
3. ``done`` is renamed in only after records.jsonl is fsynced.

`RunStore.restore` takes the newest checkpoint, checks that the records file begins with the records it covers, and
cuts the file back to that mark (dropping records made after the checkpoint, and a torn last line).

Readers for other tools: `read_config` and `iter_records` / `read_records` raise `StoreError` naming the file (and
line) for anything that is not what results/README.md describes: non-UTF-8 bytes, a line that is not a JSON object,
a value of the wrong type.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, List, Optional

import torch

from .atomic import atomic_write, atomic_write_bytes, atomic_write_json, fsync_dir, remove_temporaries
from .config import ConfigError, RunConfig

__all__ = ["StoreError", "RunStore", "check_writable", "read_config", "iter_records", "read_records",
           "atomic_write", "atomic_write_bytes", "atomic_write_json", "RECORD_NUMBERS", "last_record", "run_lock",
           "is_locked"]

log = logging.getLogger(__name__)

CHECKPOINT_GLOB = "epoch-*.pt"

#: numeric fields of each record kind (results/README.md): a number, or null for a non-finite one
RECORD_NUMBERS = {
    "step": ("loss", "accuracy"),
    "probe": ("base_loss", "grad_norm", "loss_min", "loss_max", "grad_pred_min", "grad_pred_max", "effective_beta"),
    "eval": ("train_loss", "train_accuracy", "test_loss", "test_accuracy"),
    "smoothness": ("local_smoothness", "sharpness", "sharpness_n_hvp"),
    "diverged": ("loss",),
    "generalization": ("n_samples", "base_loss", "worst_case_sharpness", "average_case_sharpness",
                       "average_case_sharpness_stderr", "epsilon_sharpness", "pacbayes_flatness", "pacbayes_sigma",
                       "pacbayes_mag_flatness", "pacbayes_mag_sigma", "relative_flatness", "lambda_max",
                       "hessian_trace", "distance_to_init", "spectral_product_log", "path_norm"),
    "target": ("target", "train_loss"),
    "per_layer": ("lambda_max", "trace", "trace_stderr", "lambda_min", "n_params", "samples", "n_hvp", "trace_probes"),
}
#: list-of-numbers fields of each record kind
RECORD_NUMBER_LISTS = {"probe": ("step_sizes", "losses", "grad_diff_norms")}


WEIGHTS = ("init", "final")   # the weight sets every run keeps: weights-init.pt, weights-final.pt


class StoreError(RuntimeError):
    """The results directory cannot be used as asked; the message says why and what to do."""


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
def read_config(path) -> RunConfig:
    """The RunConfig saved in a run's ``config.json``, checked: readable UTF-8 JSON, an object of known options of
    the right types, and (where the file holds them) a run_id and config_hash that match those options.

    Every problem is a one-line StoreError that names the file; use ``to_dict()`` / ``run_id`` on the result."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise StoreError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise StoreError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                         f"expected the run's config as JSON") from None
    except ValueError as exc:
        raise StoreError(f"{path}: not valid JSON ({exc}); expected the run's config as a JSON object") from None
    try:
        cfg = RunConfig.from_dict(data)
    except ConfigError as exc:
        raise StoreError(f"{path}: {exc}") from None
    for key, mine in (("config_hash", cfg.config_hash), ("run_id", cfg.run_id)):
        if key in data and data[key] != mine:
            raise StoreError(f"{path}: {key} {data[key]!r} does not match the options in the file (they give "
                             f"{mine!r}); the file was edited, or written by another version of the toolkit")
    return cfg


def _json_type(value) -> str:
    names = {list: "an array", str: "a string", bool: "true/false", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _record_problem(record) -> Optional[str]:
    """What is wrong with one parsed record line, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {_json_type(record)}"
    kind = record.get("kind")
    if not isinstance(kind, str):
        return f"'kind' must be a string, got {kind!r}"
    for key in ("step", "epoch"):
        value = record.get(key)
        if key in record and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            return f"{key!r} must be a non-negative integer, got {value!r}"
    if "step" not in record:
        return "no 'step' key"
    if "bn_mode" in record and record["bn_mode"] not in ("batch", "running"):
        return f"'bn_mode' must be 'batch' or 'running', got {record['bn_mode']!r}"
    for key in RECORD_NUMBERS.get(kind, ()):
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"{key!r} must be a number or null, got {value!r}"
    for key in RECORD_NUMBER_LISTS.get(kind, ()):
        value = record.get(key)
        if value is not None and (not isinstance(value, list) or any(
                v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))) for v in value)):
            return f"{key!r} must be a list of numbers, got {value!r}"
    return None


def iter_records(path, *, torn_tail: str = "skip") -> Iterator[dict]:
    """The records of a records.jsonl file, each checked against results/README.md.

    A last line without its newline is what a kill in the middle of a write leaves. ``torn_tail`` says what to do
    with it when it does not parse: "skip" it, "warn" (a `UserWarning`, then skip) or "error". Any other bad line
    raises StoreError("<file>, line <n>: corrupt record (<what is wrong>). ..."). A missing file yields nothing."""
    if torn_tail not in ("skip", "warn", "error"):
        raise ValueError(f"torn_tail must be 'skip', 'warn' or 'error', got {torn_tail!r}")
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    yield from _parse_records(path, data, torn_tail)


def _parse_records(path: Path, data: bytes, torn_tail: str) -> Iterator[dict]:
    lines = data.split(b"\n")
    for i, raw in enumerate(lines):
        torn = i == len(lines) - 1      # no newline after it (empty when the file ends with one)
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            problem = f"not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1})"
        except ValueError as exc:
            problem = f"not valid JSON: {exc}"
        else:
            problem = _record_problem(record)
        if problem is None:
            yield record
            continue
        if torn and torn_tail != "error":
            if torn_tail == "warn":
                warnings.warn(f"{path}, line {i + 1}: skipping a truncated last record (the line being written "
                              f"when the run was killed)", stacklevel=3)
            return
        raise StoreError(f"{path}, line {i + 1}: corrupt record ({problem}). Each line must be one JSON record as "
                         f"described in results/README.md; move the run directory away and rerun it") from None


def read_records(path, *, torn_tail: str = "skip") -> List[dict]:
    """`iter_records` as a list."""
    return list(iter_records(path, torn_tail=torn_tail))


class RunStore:
    """One run's directory: config.json, records.jsonl, timing.json, checkpoints/, run.log, done."""

    def __init__(self, root: Path, config: RunConfig):
        self.config = config
        self.dir = Path(root) / config.run_id
        self.records_path = self.dir / "records.jsonl"
        self.checkpoints = self.dir / "checkpoints"
        self._file: Optional[BinaryIO] = None
        self._size = 0                      # bytes in records.jsonl, and their running sha256
        self._sha = hashlib.sha256()
        self._synced = False                # records.jsonl's directory entry is durable

    # -- lifecycle --------------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return (self.dir / "done").exists()

    def open(self) -> "RunStore":
        """Create or re-open the directory; refuse one that holds a different config."""
        new_dir = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        if new_dir:
            fsync_dir(self.dir.parent)
        cfg_path = self.dir / "config.json"
        if cfg_path.exists():
            try:
                theirs = json.loads(cfg_path.read_bytes().decode("utf-8"))
                if not isinstance(theirs, dict):
                    raise ValueError(f"a JSON {type(theirs).__name__}, not an object")
            except (OSError, ValueError) as exc:
                raise StoreError(f"{cfg_path} is unreadable ({exc}); move the directory away to rerun") from None
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
        has_records = self.records_path.exists() and self.records_path.stat().st_size > 0
        return has_records or (self.checkpoints.exists() and any(self.checkpoints.glob(CHECKPOINT_GLOB)))

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
        """Write ``done``, after the records are durable: a finished run never lacks its last records."""
        self.sync_records()
        self.close()
        atomic_write_bytes(self.dir / "done", b"")

    def write_timing(self, timing: dict) -> None:
        atomic_write_json(self.dir / "timing.json", timing)

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
        atomic_write_bytes(self.checkpoints / f"epoch-{epoch:03d}.pt", buffer.getvalue())

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
        path = self.dir / f"weights-{which}.pt"
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


# -- the run lock, and a cheap look at the last record (launchers, slurm and status read them) ---------------------
def last_record(run_dir: Path) -> dict:
    """The last complete line of ``run_dir/records.jsonl``, unchecked; {} when there is none or it does not parse.
    Reads only the file's tail, so that a launcher can poll a long run cheaply."""
    try:
        with open(Path(run_dir) / "records.jsonl", "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 65536))
            return json.loads(f.read().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return {}


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
    fd = os.open(run_dir / "run.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
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
        fd = os.open(run_dir / "run.log", os.O_RDONLY)
    except (ImportError, OSError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)
