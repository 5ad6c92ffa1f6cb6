"""meshd.codec: flat float64 vector <-> little-endian bytes."""

from __future__ import annotations

import struct

import pytest
import torch

from meshd.codec import CODECS, CodecError, CodecName, decode, encode, itemsize, quantize
from meshd.errors import MeshdError


def _vec(n: int = 257, seed: int = 0, scale: float = 10.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen, dtype=torch.float64) * scale


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_matches_quantize(codec: CodecName) -> None:
    vec = _vec()
    data = encode(vec, codec)
    assert len(data) == len(vec) * itemsize(codec)
    out = decode(data, len(vec), codec)
    assert out.dtype == torch.float64 and out.shape == vec.shape
    assert torch.equal(out, quantize(vec, codec))
    # Quantized vectors re-encode exactly (what a Share carries is what the receiver gets).
    assert encode(out, codec) == data
    assert torch.equal(quantize(out, codec), out)


def test_f64_is_exact_and_others_are_close() -> None:
    vec = _vec()
    assert torch.equal(decode(encode(vec, "f64"), len(vec), "f64"), vec)
    rel32 = float((quantize(vec, "f32") - vec).abs().max() / vec.abs().max())
    rel16 = float((quantize(vec, "f16") - vec).abs().max() / vec.abs().max())
    assert 0 < rel32 < 1e-7
    assert 0 < rel16 < 1e-3


def test_little_endian_layout() -> None:
    vec = torch.tensor([1.5, -2.25], dtype=torch.float64)
    assert encode(vec, "f64") == struct.pack("<2d", 1.5, -2.25)
    assert encode(vec, "f32") == struct.pack("<2f", 1.5, -2.25)
    assert encode(vec, "f16") == struct.pack("<2e", 1.5, -2.25)


@pytest.mark.parametrize("codec", CODECS)
def test_decode_length_is_strict(codec: CodecName) -> None:
    data = encode(_vec(10), codec)
    decode(data, 10, codec)
    for bad in (data[:-1], data + b"\x00", data[: itemsize(codec)]):
        with pytest.raises(CodecError):
            decode(bad, 10, codec)
    with pytest.raises(CodecError):
        decode(data, 11, codec)
    with pytest.raises(CodecError):
        decode(data, -1, codec)
    with pytest.raises(CodecError):
        decode(data, True, codec)


def test_decode_accepts_buffers_and_copies() -> None:
    vec = _vec(8)
    buf = bytearray(encode(vec, "f64"))
    out = decode(memoryview(buf), 8, "f64")
    buf[:8] = b"\xff" * 8  # mutating the source after decoding must not change the tensor
    assert torch.equal(out, vec)
    out += 1  # and the result is writable
    assert decode(b"", 0, "f32").shape == (0,)


def test_f16_overflow_rejected_at_encode() -> None:
    assert torch.equal(quantize(torch.tensor([65504.0], dtype=torch.float64), "f16"), torch.tensor([65504.0]).double())
    for big in (70000.0, -1e5, 1e300):
        vec = torch.tensor([0.0, big], dtype=torch.float64)
        with pytest.raises(CodecError, match="f16 range"):
            encode(vec, "f16")
        with pytest.raises(CodecError):
            quantize(vec, "f16")
        encode(vec, "f64")  # fine where it fits
    with pytest.raises(CodecError, match="f32 range"):
        encode(torch.tensor([1e300], dtype=torch.float64), "f32")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rejected(bad: float) -> None:
    for codec in CODECS:
        with pytest.raises(CodecError, match="non-finite"):
            encode(torch.tensor([1.0, bad], dtype=torch.float64), codec)


def test_bad_inputs() -> None:
    with pytest.raises(CodecError):
        encode(torch.zeros(3, dtype=torch.float32), "f32")
    with pytest.raises(CodecError):
        encode(torch.zeros(2, 2, dtype=torch.float64), "f32")
    with pytest.raises(CodecError):
        encode([1.0, 2.0], "f32")  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="unknown codec"):
        encode(torch.zeros(3, dtype=torch.float64), "bf16")  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="unknown codec"):
        decode(b"", 0, "i8")  # type: ignore[arg-type]


def test_codec_error_is_value_error_and_meshd_error() -> None:
    assert issubclass(CodecError, ValueError)
    assert issubclass(CodecError, MeshdError)
