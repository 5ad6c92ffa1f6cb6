"""The runtime file: where a running daemon's status API really listens, readable by every local user.

`meshd status`, `peers` and `reload` fall back to it when they cannot take the address from the config: a
user who may not read the service's config (root/meshd only), or a `listen.status` edited but not yet
restarted. The daemon writes ``status.json`` at start (atomically, mode 0644) and removes it when it stops.
Where: systemd's ``$RUNTIME_DIRECTORY`` (the unit's ``RuntimeDirectory=meshd``: ``/run/meshd``), else
``$MESHD_RUNTIME_DIR``, else the state directory. Documented in docs/status.md.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meshd.store import atomic_write

FILE_NAME = "status.json"
DEFAULT_RUNTIME_DIR = Path("/run/meshd")
MAX_BYTES = 64 * 1024  # the file is a few hundred bytes; never read more of it


def daemon_path(state_dir: Path, env: Mapping[str, str] = os.environ) -> Path:
    """Where this daemon writes its runtime file."""
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0] or env.get("MESHD_RUNTIME_DIR", "")
    return (Path(runtime) if runtime else state_dir) / FILE_NAME


def client_paths(state_dir: Path | None, env: Mapping[str, str] = os.environ) -> list[Path]:
    """Where a client looks: the runtime directory (``$MESHD_RUNTIME_DIR``, else /run/meshd), then the state
    directory of the config when it could be read."""
    paths = [Path(env.get("MESHD_RUNTIME_DIR") or DEFAULT_RUNTIME_DIR) / FILE_NAME]
    if state_dir is not None:
        paths.append(state_dir / FILE_NAME)
    return paths


def write(path: Path, *, status: str, config: Path, domain: str, pid: int) -> None:
    """Replace the runtime file atomically (mode 0644: the address is no secret). Raises StoreError."""
    doc = {"status": status, "config": str(config), "domain": domain, "pid": pid}
    atomic_write(path, (json.dumps(doc, sort_keys=True) + "\n").encode(), fsync=False, mode=0o644)


def read(path: Path) -> dict[str, Any] | None:
    """The runtime file's content, or None when it is absent, unreadable or not one of ours."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(MAX_BYTES))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("status"), str) or not isinstance(doc.get("config"), str):
        return None
    return doc


def remove(path: Path, pid: int) -> None:
    """Remove the runtime file if it is still this process's (a newer daemon may have replaced it)."""
    doc = read(path)
    if doc is not None and doc.get("pid") == pid:
        with contextlib.suppress(OSError):
            path.unlink()
