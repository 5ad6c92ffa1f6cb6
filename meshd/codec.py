"""Flat model vector <-> bytes. Pure: no I/O, no asyncio.

A model travels as one flat float64 vector, cast to the codec's dtype and laid out little-endian:

- ``"f64"``: 8 bytes per value, exact.
- ``"f32"``: 4 bytes per value, round-to-nearest.
- ``"f16"``: 2 bytes per value, round-to-nearest; a value beyond the f16 range is refused (``CodecError``)
  instead of silently becoming ``inf``.

API:

- ``encode(vec, codec) -> bytes``: ``vec`` is a 1-D ``torch.float64`` tensor; non-finite values, and values
  that overflow the codec's dtype, raise ``CodecError``.
- ``decode(data, count, codec) -> torch.Tensor``: strict: ``len(data)`` must be exactly
  ``count * itemsize(codec)``; returns a fresh, writable 1-D float64 tensor (one copy, from the buffer).
- ``quantize(vec, codec) -> torch.Tensor``: what the receiver will decode, as float64; bit-identical to
  ``decode(encode(vec, codec), len(vec), codec)`` and idempotent (re-encoding a quantized vector is exact).
- ``itemsize(codec) -> int`` and ``CODECS``.

``decode`` checks framing only; whether the values are acceptable (finite, bounded) is the merger's call.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import numpy.typing as npt
import torch

from meshd.errors import MeshdError

CodecName = Literal["f64", "f32", "f16"]
CODECS: tuple[CodecName, ...] = get_args(CodecName)

_DTYPES: dict[str, np.dtype[np.floating]] = {
    "f64": np.dtype("<f8"),
    "f32": np.dtype("<f4"),
    "f16": np.dtype("<f2"),
}


class CodecError(MeshdError, ValueError):
    """A vector cannot be encoded, or bytes do not decode to the announced vector."""


def _dtype(codec: str) -> np.dtype[np.floating]:
    try:
        return _DTYPES[codec]
    except (KeyError, TypeError):
        raise CodecError(f"unknown codec {codec!r} (expected one of {', '.join(CODECS)})") from None


def itemsize(codec: CodecName) -> int:
    """Bytes per value on the wire."""
    return _dtype(codec).itemsize


def _cast(vec: torch.Tensor, codec: str) -> npt.NDArray[np.floating]:
    """``vec`` cast to the codec's little-endian dtype; refuses non-finite input and overflow."""
    dtype = _dtype(codec)
    if not isinstance(vec, torch.Tensor):
        raise CodecError(f"expected a torch.Tensor, got {type(vec).__name__}")
    if vec.dtype != torch.float64 or vec.dim() != 1:
        raise CodecError(f"expected a 1-D float64 tensor, got {vec.dtype} with shape {tuple(vec.shape)}")
    src = vec.detach().cpu().numpy()  # shares memory with vec: no copy
    if not np.isfinite(src).all():
        raise CodecError("vector has non-finite values")
    with np.errstate(over="ignore"):
        out = src.astype(dtype, copy=False)  # copies only when the dtype differs
    if out is not src and not np.isfinite(out).all():
        raise CodecError(f"vector has values beyond the {codec} range (max abs {float(np.abs(src).max())!r})")
    return out


def encode(vec: torch.Tensor, codec: CodecName) -> bytes:
    """Little-endian bytes of ``vec`` (1-D float64) in the codec's dtype."""
    return _cast(vec, codec).tobytes()


def decode(data: bytes | bytearray | memoryview, count: int, codec: CodecName) -> torch.Tensor:
    """``count`` values from ``data`` as a fresh 1-D float64 tensor; the length must match exactly."""
    dtype = _dtype(codec)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise CodecError(f"count must be a non-negative int, got {count!r}")
    size = len(memoryview(data).cast("B"))
    if size != count * dtype.itemsize:
        raise CodecError(f"{codec} payload of {count} values needs {count * dtype.itemsize} bytes, got {size}")
    arr = np.frombuffer(data, dtype=dtype, count=count)  # a read-only view: no copy
    return torch.from_numpy(arr.astype(np.float64))  # the one copy, native float64 and writable


def quantize(vec: torch.Tensor, codec: CodecName) -> torch.Tensor:
    """``vec`` as the receiver will decode it (float64); raises ``CodecError`` where ``encode`` would."""
    cast = _cast(vec, codec)
    if cast.dtype == np.float64 and cast.dtype.isnative:
        return vec.detach().cpu().clone()
    return torch.from_numpy(cast.astype(np.float64))
