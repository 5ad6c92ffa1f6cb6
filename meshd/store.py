"""Atomic persistence under the state directory: JSON state files and any file written whole.

Every write goes to a temporary file in the target's directory, is fsynced, renamed over the target and
the directory is fsynced, so a crash (kill -9, power loss) leaves either the old or the new file, never a
torn one. No torch here: the mesh uses it too. Model checkpoints (checksummed, msgpack, no pickle) are
:mod:`meshd.task.checkpoints`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from meshd.errors import StoreError

__all__ = ["atomic_write", "fsync_dir", "read_json", "write_json_atomic"]

_MISSING: Any = object()


def atomic_write(path: Path, data: bytes, *, fsync: bool = True, mode: int = 0o600,
                 owner: tuple[int, int] | None = None) -> None:
    """Replace ``path`` with ``data`` atomically (temp file in the same directory, fsync, rename, fsync dir).

    The file gets exactly ``mode`` (the umask does not apply) and, if given, ``owner`` (uid, gid).
    On failure the temporary file is removed
    and :class:`StoreError` is raised; the old file, if any, is untouched.
    """
    path = Path(path)
    directory = path.parent
    try:
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise StoreError(f"cannot create a temporary file next to {path}: {exc}") from exc
    tmp = Path(tmp_name)
    try:
        try:
            if owner is not None:
                os.fchown(fd, *owner)
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if fsync:
            fsync_dir(directory)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StoreError(f"cannot write {path}: {exc}") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def read_json(path: Path, default: Any = _MISSING) -> Any:
    """Parse the JSON file at ``path``; if it does not exist return ``default`` (when given).

    A missing file without ``default``, an unreadable file or invalid JSON raises :class:`StoreError`.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        if default is not _MISSING:
            return default
        raise StoreError(f"{path}: file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path}: cannot read: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreError(f"{path}: invalid JSON: {exc}") from exc


def write_json_atomic(path: Path, obj: Any, fsync: bool = True) -> None:
    """Write ``obj`` as JSON (sorted keys, no NaN) to ``path`` with :func:`atomic_write` (mode 0600)."""
    try:
        text = json.dumps(obj, sort_keys=True, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{path}: cannot encode as JSON: {exc}") from exc
    atomic_write(Path(path), text.encode("utf-8"), fsync=fsync)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
