"""meshd.core.codec: flat float64 vector <-> little-endian bytes."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.core.codec import (
    CODECS,
    Q8_BLOCK,
    CodecError,
    CodecName,
    decode,
    encode,
    encoded_size,
    itemsize,
    quantize,
    quantize_encoded,
)
from meshd.errors import MeshdError


def _vec(n: int = 257, seed: int = 0, scale: float = 10.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen, dtype=torch.float64) * scale


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_matches_quantize(codec: CodecName) -> None:
    vec = _vec()
    data = encode(vec, codec)
    assert len(data) == encoded_size(len(vec), codec)
    out = decode(data, len(vec), codec)
    assert out.dtype == torch.float64 and out.shape == vec.shape
    assert torch.equal(out, quantize(vec, codec))
    # Quantized vectors re-encode exactly (what a Share carries is what the receiver gets); q8 and q4 may pick
    # a finer exponent for them (other bytes), but they decode to the very same values.
    if codec not in ("q8", "q4"):
        assert encode(out, codec) == data
    assert torch.equal(decode(encode(out, codec), len(vec), codec), out)
    assert torch.equal(quantize(out, codec), out)
    # One pass gives both: the values a share carries and the bytes that decode to exactly them.
    values, payload = quantize_encoded(vec, codec)
    assert payload == data and torch.equal(values, out)


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


def _assert_half_a_step_at_most(vec: torch.Tensor, codec: CodecName, levels: int) -> None:
    """Per block, the error is at most half of one step; a power-of-two step is at most 2 x span / levels."""
    err = (quantize(vec, codec) - vec).abs()
    for lo in range(0, len(vec), Q8_BLOCK):
        block = vec[lo : lo + Q8_BLOCK]
        span = float(block.max() - block.min())
        assert float(err[lo : lo + Q8_BLOCK].max()) <= span / (levels // 2) / 2 + 1e-12


def test_q8_size_and_error_bound() -> None:
    vec = _vec(1000, scale=0.3)
    data = encode(vec, "q8")
    assert len(data) == 1000 + 5 * -(-1000 // Q8_BLOCK)  # < 1.1 bytes per value, header included
    _assert_half_a_step_at_most(vec, "q8", 255)
    const = torch.full((70,), 0.125, dtype=torch.float64)
    assert torch.equal(quantize(const, "q8"), const)  # a constant block is exact


def test_q8_refuses_absurd_exponents() -> None:
    data = bytearray(encode(_vec(10), "q8"))
    data[0] = 0x7F  # k = 127: far beyond any accepted value
    with pytest.raises(CodecError, match="exponent"):
        decode(bytes(data), 10, "q8")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=0, max_size=300),
       st.sampled_from(["q8", "q4"]))
def test_block_codecs_round_trip_exactly_for_any_vector(values: list[float], codec: CodecName) -> None:
    vec = torch.tensor(values, dtype=torch.float64)
    data = encode(vec, codec)
    assert len(data) == encoded_size(len(values), codec)
    out = decode(data, len(values), codec)
    assert torch.equal(out, quantize(vec, codec))
    # what a share carries (its quantized values, encoded again) is exactly what the receiver merges
    assert torch.equal(decode(encode(out, codec), len(values), codec), out)


def test_q4_size_error_bound_and_nibble_layout() -> None:
    vec = _vec(1001, scale=0.3)
    data = encode(vec, "q4")
    assert len(data) == 501 + 5 * -(-1001 // Q8_BLOCK)  # < 0.6 bytes per value, header included
    _assert_half_a_step_at_most(vec, "q4", 15)
    # The layout of docs/protocol.md: value 2j in the low nibble of byte j, then the high nibble.
    three = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)  # k = -2 (15 steps of 1/4 span 0..2), m = 0
    raw = encode(three, "q4")
    assert raw[5:] == bytes([0x40, 0x08])
    padded = bytearray(raw)
    padded[-1] |= 0x10  # the unused high nibble of an odd count must be 0
    with pytest.raises(CodecError, match="padding"):
        decode(bytes(padded), 3, "q4")
