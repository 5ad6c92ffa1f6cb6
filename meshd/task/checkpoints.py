"""Model checkpoints of a learning task: atomic, checksummed, msgpack (no pickle), decoded with limits.

A corrupt newest checkpoint is skipped with a warning and the previous one is used. Writes go through
:func:`meshd.store.atomic_write` (temporary file, fsync, rename, fsync of the directory).

Checkpoint file (``ckpt-s<seq:012d>-v<version:012d>.mdck``; ``seq`` is the store's own write counter, so
the newest checkpoint is the last one written whatever the clock did; files of older meshd versions are
named ``ckpt-<version:012d>-<created_ms>.mdck``, carry no ``seq`` and count as older than any new one)::

    b"MDCK1\\n" | sha256(payload) (32 bytes) | payload
    payload = msgpack map {"format": 1, "version": int, "weight": float, "fingerprint": str,
                           "created_ms": int, "count": int, "values": bin (count little-endian f64),
                           "extra": map}
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch
from torch import nn

from meshd.errors import StoreError
from meshd.store import atomic_write, fsync_dir

__all__ = [
    "CHECKPOINT_MAGIC",
    "Checkpoint",
    "CheckpointStore",
    "decode_checkpoint",
    "encode_checkpoint",
    "export_state_dict",
]

CHECKPOINT_MAGIC = b"MDCK1\n"
_FORMAT = 1
_DIGEST_LEN = 32
_SUFFIX = ".mdck"
_NAME_RE = re.compile(r"^ckpt-(\d+)-(\d+)\.mdck$")  # before the store's write counter: ckpt-VERSION-MS
_SEQ_NAME_RE = re.compile(r"^ckpt-s(\d+)-v(\d+)\.mdck$")

# Limits for decoding checkpoint payloads: a checkpoint holds one flat vector and a small "extra" map.
_MAX_STR = 1 << 16
_MAX_ARRAY = 1 << 16
_MAX_MAP = 1 << 12
DEFAULT_MAX_CHECKPOINT_BYTES = 1 << 32  # 4 GiB: ~500M float64 parameters


def export_state_dict(module: nn.Module, path: Path, *, mode: int = 0o600) -> None:
    """Write the module's ``state_dict`` with ``torch.save`` (atomically) for serving outside meshd."""
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    atomic_write(Path(path), buf.getvalue(), mode=mode)


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A saved model: flat values, averaging weight, version, architecture fingerprint and small extras."""

    version: int  # the model version (updates counted); not what orders checkpoints (``seq`` does)
    weight: float  # averaging (push-sum) weight that goes with ``values``
    values: torch.Tensor  # float64 1-D, the meshd.task.models.flatten layout
    fingerprint: str  # meshd.task.models.fingerprint of the model the values belong to
    created_ms: int  # wall-clock milliseconds at creation
    extra: dict[str, Any] = field(default_factory=dict)  # small msgpack-able map (step counters, ...)
    seq: int = 0  # set by CheckpointStore.save: its write counter (0: not saved yet, or an older format)

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 0:
            raise StoreError(f"checkpoint version must be a non-negative integer, got {self.version!r}")
        if isinstance(self.created_ms, bool) or not isinstance(self.created_ms, int) or self.created_ms < 0:
            raise StoreError(f"checkpoint created_ms must be a non-negative integer, got {self.created_ms!r}")
        if isinstance(self.seq, bool) or not isinstance(self.seq, int) or self.seq < 0:
            raise StoreError(f"checkpoint seq must be a non-negative integer, got {self.seq!r}")
        if not isinstance(self.values, torch.Tensor) or self.values.dim() != 1:
            raise StoreError("checkpoint values must be a 1-D tensor")
        if not isinstance(self.fingerprint, str):
            raise StoreError("checkpoint fingerprint must be a string")
        if not isinstance(self.extra, dict):
            raise StoreError("checkpoint extra must be a dict")
        object.__setattr__(self, "weight", float(self.weight))
        object.__setattr__(self, "values", self.values.detach().to("cpu", torch.float64).contiguous())

    @property
    def sort_key(self) -> tuple[int, int, int]:
        """Newest = written last by the store; for files of older versions, by version then wall clock."""
        return (self.seq, self.version, self.created_ms)

    @property
    def file_name(self) -> str:
        if self.seq:
            return f"ckpt-s{self.seq:012d}-v{self.version:012d}{_SUFFIX}"
        return f"ckpt-{self.version:012d}-{self.created_ms}{_SUFFIX}"


def encode_checkpoint(ckpt: Checkpoint) -> bytes:
    """The checkpoint file bytes: magic, sha256 of the payload, msgpack payload."""
    values = ckpt.values.numpy().astype("<f8", copy=False).tobytes()
    try:
        payload = msgpack.packb(
            {
                "format": _FORMAT,
                "version": ckpt.version,
                "weight": ckpt.weight,
                "fingerprint": ckpt.fingerprint,
                "created_ms": ckpt.created_ms,
                "count": int(ckpt.values.numel()),
                "values": values,
                "extra": ckpt.extra,
                "seq": ckpt.seq,
            },
            use_bin_type=True,
        )
    except (TypeError, ValueError, OverflowError) as exc:
        raise StoreError(f"checkpoint extra is not msgpack-encodable: {exc}") from exc
    return CHECKPOINT_MAGIC + hashlib.sha256(payload).digest() + payload


class CorruptCheckpoint(StoreError):
    """Checkpoint bytes failed a check; ``reason`` is short and fit for a warning."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def decode_checkpoint(blob: bytes) -> Checkpoint:
    """Parse and verify checkpoint file bytes; any problem raises :class:`CorruptCheckpoint`."""
    head = len(CHECKPOINT_MAGIC) + _DIGEST_LEN
    if len(blob) < head:
        raise CorruptCheckpoint(f"truncated: {len(blob)} bytes")
    if blob[: len(CHECKPOINT_MAGIC)] != CHECKPOINT_MAGIC:
        raise CorruptCheckpoint("bad magic: not a meshd checkpoint")
    payload = blob[head:]
    if hashlib.sha256(payload).digest() != blob[len(CHECKPOINT_MAGIC) : head]:
        raise CorruptCheckpoint("checksum mismatch")
    try:
        doc = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_str_len=_MAX_STR,
            max_bin_len=len(payload),
            max_array_len=_MAX_ARRAY,
            max_map_len=_MAX_MAP,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise CorruptCheckpoint(f"undecodable payload ({type(exc).__name__})") from exc
    if not isinstance(doc, dict):
        raise CorruptCheckpoint("payload is not a map")
    if doc.get("format") != _FORMAT:
        raise CorruptCheckpoint(f"unsupported format {doc.get('format')!r}")
    expected_types: dict[str, type | tuple[type, ...]] = {
        "version": int,
        "weight": (float, int),
        "fingerprint": str,
        "created_ms": int,
        "count": int,
        "values": bytes,
        "extra": dict,
    }
    for key, typ in expected_types.items():
        if not isinstance(doc.get(key), typ) or isinstance(doc.get(key), bool):
            raise CorruptCheckpoint(f"field {key!r} is missing or has the wrong type")
    seq = doc.get("seq", 0)
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise CorruptCheckpoint("field 'seq' has the wrong type")
    raw: bytes = doc["values"]
    count: int = doc["count"]
    if count < 0 or len(raw) != 8 * count:
        raise CorruptCheckpoint(f"values hold {len(raw)} bytes, expected {count} float64")
    arr = np.frombuffer(raw, dtype="<f8").astype(np.float64)
    if not np.isfinite(arr).all() or not math.isfinite(doc["weight"]):
        raise CorruptCheckpoint("non-finite values")
    try:
        return Checkpoint(
            version=doc["version"],
            weight=float(doc["weight"]),
            values=torch.from_numpy(arr),
            fingerprint=doc["fingerprint"],
            created_ms=doc["created_ms"],
            extra=doc["extra"],
            seq=seq,
        )
    except StoreError as exc:
        raise CorruptCheckpoint(str(exc)) from exc


class CheckpointStore:
    """Checkpoints in one directory (mode 0700); keeps the ``keep`` newest valid ones."""

    def __init__(
        self,
        directory: Path,
        keep: int = 2,
        *,
        fsync: bool = True,
        max_file_bytes: int = DEFAULT_MAX_CHECKPOINT_BYTES,
    ) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise StoreError(f"checkpoint keep must be an integer >= 1, got {keep!r}")
        self._dir = Path(directory)
        self._keep = keep
        self._fsync = fsync
        self._max_bytes = max_file_bytes
        self._last_seq = 0
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # mkdir's mode is filtered by the umask, and an existing directory keeps its mode: set it.
            os.chmod(self._dir, 0o700)
        except OSError as exc:
            raise StoreError(f"cannot create checkpoint directory {self._dir}: {exc}") from exc

    @property
    def directory(self) -> Path:
        return self._dir

    def save(self, ckpt: Checkpoint) -> Path:
        """Write ``ckpt`` atomically, then delete all but the ``keep`` newest valid checkpoints.

        Pruning also removes corrupt checkpoint files and temporary files left by an interrupted write:
        once a fresh valid checkpoint exists they can only produce repeated warnings.
        """
        seq = max(self._last_seq, self._highest_seq_on_disk()) + 1
        ckpt = dataclasses.replace(ckpt, seq=seq)
        path = self._dir / ckpt.file_name
        atomic_write(path, encode_checkpoint(ckpt), fsync=self._fsync)
        self._last_seq = seq
        self._prune()
        return path

    def _highest_seq_on_disk(self) -> int:
        """The store's write counter lives in the file names: the highest one there (0 if none)."""
        try:
            names = [p.name for p in self._dir.iterdir()]
        except OSError:
            return 0
        return max((int(m.group(1)) for n in names if (m := _SEQ_NAME_RE.match(n))), default=0)

    def load_latest(self) -> tuple[Checkpoint | None, list[str]]:
        """The newest valid checkpoint by (version, created_ms) read from content, and warnings.

        One warning names each corrupt or unreadable checkpoint file newer (by file name) than the one
        returned, and what was used instead.  Never raises for bad files.
        """
        valid, invalid = self._scan()
        best = max(valid, key=lambda item: item[1].sort_key, default=None)
        warnings: list[str] = []
        fallback = f"falling back to {best[0].name}" if best else "no valid checkpoint to fall back to"
        best_key = best[1].sort_key if best else None
        for path, reason in sorted(invalid, key=lambda item: _name_key(item[0]) or (-1, -1, -1), reverse=True):
            key = _name_key(path)
            if best_key is None or key is None or key > best_key:
                warnings.append(f"checkpoint {path.name} is corrupt ({reason}); {fallback}")
        return (best[1] if best else None), warnings

    # ----------------------------------------------------------------------------------------- helpers

    def _scan(self) -> tuple[list[tuple[Path, Checkpoint]], list[tuple[Path, str]]]:
        valid: list[tuple[Path, Checkpoint]] = []
        invalid: list[tuple[Path, str]] = []
        try:
            paths = sorted(p for p in self._dir.iterdir() if p.name.endswith(_SUFFIX) and p.name.startswith("ckpt-"))
        except OSError:
            return valid, invalid
        for path in paths:
            try:
                size = path.stat().st_size
                if size > self._max_bytes:
                    invalid.append((path, f"too large: {size} bytes"))
                    continue
                blob = path.read_bytes()
            except OSError as exc:
                invalid.append((path, f"unreadable: {exc.strerror or exc}"))
                continue
            try:
                valid.append((path, decode_checkpoint(blob)))
            except CorruptCheckpoint as exc:
                invalid.append((path, exc.reason))
        return valid, invalid

    def _prune(self) -> None:
        valid, invalid = self._scan()
        valid.sort(key=lambda item: item[1].sort_key, reverse=True)
        doomed = [p for p, _ in valid[self._keep :]] + [p for p, _ in invalid]
        with contextlib.suppress(OSError):
            doomed += [p for p in self._dir.iterdir() if p.name.startswith(".ckpt-") and p.name.endswith(".tmp")]
        for path in doomed:
            with contextlib.suppress(OSError):
                path.unlink()
        if doomed and self._fsync:
            with contextlib.suppress(OSError):
                fsync_dir(self._dir)


def _name_key(path: Path) -> tuple[int, int, int] | None:
    """A file name's place in :attr:`Checkpoint.sort_key` order, or None when it is not a checkpoint name."""
    if m := _SEQ_NAME_RE.match(path.name):
        return (int(m.group(1)), int(m.group(2)), 0)
    m = _NAME_RE.match(path.name)
    return (0, int(m.group(1)), int(m.group(2))) if m else None
