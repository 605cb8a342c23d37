"""The crash-safe run store: one directory per run, records appended and flushed as produced, atomic markers.

Layout and record schema: results/README.md. Everything that replaces a file writes a temporary file in the same
directory and renames it over the target (atomic on POSIX), so a kill leaves either the old or the new file.
"""
from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Iterable, List, Optional

import torch

from .config import RunConfig


WEIGHTS = ("init", "final")   # the weight sets every run keeps: weights-init.pt, weights-final.pt


class StoreError(RuntimeError):
    """The results directory cannot be used as asked; the message says why and what to do."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _clean(value):
    """JSON has no NaN/inf: non-finite numbers become null (the schema says so)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


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


class RunStore:
    """One run's directory: config.json, records.jsonl, timing.json, checkpoints/, run.log, done."""

    def __init__(self, root: Path, config: RunConfig):
        self.config = config
        self.dir = Path(root) / config.run_id
        self.records_path = self.dir / "records.jsonl"
        self.checkpoints = self.dir / "checkpoints"
        self._file: Optional[io.TextIOBase] = None

    # -- lifecycle --------------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return (self.dir / "done").exists()

    def open(self) -> "RunStore":
        """Create or re-open the directory; refuse one that holds a different config."""
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.dir / "config.json"
        mine = {**self.config.to_dict(), "run_id": self.config.run_id, "config_hash": self.config.config_hash}
        if cfg_path.exists():
            try:
                theirs = json.loads(cfg_path.read_text())
            except (OSError, ValueError) as exc:
                raise StoreError(f"{cfg_path} is unreadable ({exc}); move the directory away to rerun") from None
            if theirs.get("config_hash") != self.config.config_hash:
                raise StoreError(f"{self.dir} already holds a run with a different config "
                                 f"(hash {theirs.get('config_hash')} vs {self.config.config_hash}); "
                                 f"nothing was overwritten: use another --results-dir or --study name")
        atomic_write_json(cfg_path, mine)
        self.checkpoints.mkdir(exist_ok=True)
        return self

    def append(self, record: dict) -> None:
        if self._file is None:
            self._file = open(self.records_path, "a", encoding="utf-8")
        self._file.write(json.dumps(_clean(record), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def mark_done(self) -> None:
        self.close()
        atomic_write_bytes(self.dir / "done", b"")

    def write_timing(self, timing: dict) -> None:
        atomic_write_json(self.dir / "timing.json", timing)

    # -- records ----------------------------------------------------------------------------------------------
    def read_records(self) -> List[dict]:
        if not self.records_path.exists():
            return []
        out = []
        lines = self.records_path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            try:
                out.append(json.loads(line))
            except ValueError:
                if i == len(lines) - 1:
                    break  # the line being written when the run was killed
                raise StoreError(f"{self.records_path}: line {i + 1} is corrupt") from None
        return out

    def rewrite_records(self, records: Iterable[dict]) -> None:
        self.close()
        data = "".join(json.dumps(_clean(r), allow_nan=False) + "\n" for r in records)
        atomic_write_bytes(self.records_path, data.encode())

    # -- checkpoints ------------------------------------------------------------------------------------------
    def save_checkpoint(self, epoch: int, state: dict) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.checkpoints / f"epoch-{epoch:03d}.pt", buffer.getvalue())
        if self._file is not None:
            os.fsync(self._file.fileno())

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
        files = sorted(self.checkpoints.glob("epoch-*.pt")) if self.checkpoints.exists() else []
        for path in reversed(files):
            try:
                return torch.load(path, map_location="cpu", weights_only=False)
            except Exception:  # a checkpoint torn by a crash: fall back to the one before
                continue
        return None
