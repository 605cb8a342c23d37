"""Atomic, durable file replacement: the one writer for every file the toolkit rewrites (configs, markers,
checkpoints, timing, figures, reports).

``with atomic_write(path) as f: ...`` writes into a new temporary file in the target's directory, fsyncs it, renames
it over ``path`` (atomic on POSIX: a reader or a crash sees the old file or the new one, never a mix) and fsyncs the
directory, so that the rename itself survives a power loss. On an exception the temporary file is removed and
``path`` is untouched.

The temporary file is created with mode 0o666, like ``open()``, so the process umask applies (a 022 umask gives
0o644). ``tempfile.mkstemp`` would create it 0o600, and the rename would carry that mode onto the result.
"""
from __future__ import annotations

import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

_TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (files created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temporary(path: Path) -> tuple[int, Path]:
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{_TMP_SUFFIX}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {path}")  # pragma: no cover


@contextmanager
def atomic_write(path, mode: str = "wb", encoding: str = "utf-8") -> Iterator[IO]:
    """Yield a file object (``mode`` "wb" or "w") whose content replaces ``path`` when the block ends normally."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, mode, **({"encoding": encoding} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def remove_temporaries(directory: Path) -> list[Path]:
    """Delete the temporary files that writes interrupted by a kill left in ``directory``; return them."""
    leftovers = [p for p in Path(directory).glob(f".*{_TMP_SUFFIX}") if p.is_file()]
    for p in leftovers:
        p.unlink(missing_ok=True)
    return leftovers
