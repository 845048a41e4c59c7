import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kshrink.artifact.encodings import EncodingError, decode, encode, pack_bits, unpack_bits

DTYPES = ["float32", "float16", "int8", "int32", "uint8"]


def roundtrip(values):
    header, blob = encode(values)
    out = decode(header, blob, values.dtype, values.size).reshape(values.shape)
    assert out.dtype == values.dtype
    assert out.tobytes() == values.tobytes()  # bit for bit, -0.0 and NaN included
    return header, blob


@settings(max_examples=150, deadline=None)
@given(dtype=st.sampled_from(DTYPES), shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=12),
       data=st.data())
def test_every_encoding_is_exact(dtype, shape, data):
    kind = data.draw(st.sampled_from(["any", "sparse", "palette"]))
    values = data.draw(hnp.arrays(dtype, shape))
    if kind == "sparse":
        values = np.where(data.draw(hnp.arrays(bool, shape)), values, np.zeros_like(values))
    elif kind == "palette":
        palette = data.draw(hnp.arrays(dtype, (3,)))
        values = palette[data.draw(hnp.arrays(np.int64, shape, elements=st.integers(0, 2)))]
    roundtrip(values)


def test_the_smallest_encoding_is_chosen():
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(200, 100)).astype(np.float32)
    assert roundtrip(dense)[0]["kind"] == "raw"
    assert roundtrip(dense.astype(np.float16).astype(np.float32))[0]["kind"] == "float16"
    shared = np.linspace(-1, 1, 16, dtype=np.float32)[rng.integers(0, 16, (200, 100))]
    header, blob = roundtrip(shared)
    assert header == {"kind": "palette", "entries": 16, "bits": 4}
    assert len(blob) < 200 * 100 * 4 / 8 * 1.05  # about 4 bits a value
    sparse = np.where(rng.random((200, 100)) < 0.05, shared, 0).astype(np.float32)
    header, blob = roundtrip(sparse)
    assert header["kind"] == "sparse" and header["values"]["kind"] == "palette"
    assert len(blob) < len(roundtrip(shared)[1]) / 4
    zero_signs = np.array([0.0, -0.0, 1.0, -0.0], dtype=np.float32)
    roundtrip(zero_signs)


@pytest.mark.parametrize("bits", range(1, 17))
def test_bit_packing_round_trips(bits):
    values = np.random.default_rng(bits).integers(0, 1 << bits, size=1001)
    packed = pack_bits(values, bits)
    assert len(packed) == (1001 * bits + 7) // 8
    np.testing.assert_array_equal(unpack_bits(packed, bits, 1001), values)


@pytest.mark.parametrize("header", [
    {"kind": "mystery"},
    {"kind": "palette", "entries": 0, "bits": 4},
    {"kind": "palette", "entries": 20, "bits": 4},
    {"kind": "palette", "entries": 4, "bits": 40},
    {"kind": "sparse", "count": 10**9, "positions": "bitmap", "positions_bytes": 2,
     "values": {"kind": "raw"}},
    {"kind": "sparse", "count": 2, "positions": "gaps", "positions_bytes": 2,
     "values": {"kind": "sparse"}},
])
def test_bad_headers_raise_encoding_error(header):
    _, blob = encode(np.arange(16, dtype=np.float32))
    with pytest.raises(EncodingError):
        decode(header, blob, np.dtype("float32"), 16)


def test_payload_larger_than_the_tensor_is_refused_before_decompressing():
    _, blob = encode(np.random.default_rng(0).normal(size=1000).astype(np.float32))
    with pytest.raises(EncodingError, match="larger than its tensor allows"):
        decode({"kind": "raw"}, blob, np.dtype("float32"), 10)


def test_a_gap_list_that_overflows_int64_is_an_encoding_error():
    from kshrink.artifact.encodings import EncodingError, _positions

    big = (1 << 62) + 5
    varint = bytearray()
    while True:  # LEB128, as the writer stores gaps
        byte, big = big & 0x7F, big >> 7
        varint.append(byte | (0x80 if big else 0))
        if not big:
            break
    data = bytes(varint) * 4  # four gaps of 2^62: their running sum wraps around int64
    with pytest.raises(EncodingError, match="past the tensor"):
        _positions("gaps", data, 1000, 4)
