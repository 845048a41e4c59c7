"""Exact encodings of one tensor: each is tried and the smallest after entropy coding is kept.

Every encoding is lossless (decoding gives the same bits), so techniques never need to know
about storage: a pruned kernel finds the sparse encoding, a clustered one the palette, a
quantized one its integers, and zstd squeezes what is left.

- `raw`: the values as stored.
- `float16`: float32 values that are all exactly float16.
- `palette`: a codebook of the distinct values and, per value, its index in `bits` bits.
- `sparse`: a bitmap of the non-zeros (or the gaps between them, whichever is smaller), then
  the non-zero values, themselves in their best encoding of the ones above.
"""

from __future__ import annotations

import math

import numpy as np
import zstandard

MAX_PALETTE = 1 << 16
# zstd's strongest levels for small tensors; big ones (MBs) get a level that keeps saving quick.
ZSTD_LEVEL, ZSTD_LEVEL_LARGE, LARGE = 19, 9, 4 << 20
_CHUNK = 1 << 20  # values per chunk when packing bits, to bound temporary memory


class EncodingError(ValueError):
    """A payload that does not decode to what its header declares."""


def encode(values: np.ndarray) -> tuple[dict, bytes]:
    """The smallest exact encoding of `values`: (header, compressed payload)."""
    flat = np.ascontiguousarray(values).reshape(-1)
    best = None
    for header, parts in _candidates(flat):
        blob = compress(b"".join(parts))
        if best is None or len(blob) < len(best[1]):
            best = (header, blob)
    return best


def decode(header: dict, blob, dtype: np.dtype, size: int) -> np.ndarray:
    """Decodes a payload into a flat array of `size` values of `dtype`.

    Raises:
        EncodingError: anything that does not add up (sizes, bit widths, codebook indices).
    """
    _require(isinstance(header, dict), "the encoding is not a mapping")
    data = decompress(blob, _payload_size(header, dtype, size))
    values, used = _decode_flat(header, data, dtype, size)
    if used != len(data):
        raise EncodingError("payload longer than its encoding declares")
    return values


def _candidates(flat: np.ndarray):
    yield {"kind": "raw"}, [flat.tobytes()]
    for header, parts in _dense_candidates(flat):
        yield header, parts
    nonzero = _bits(flat) != 0  # by bit pattern: -0.0 is a value to keep, not a zero
    count = int(nonzero.sum())
    if 0 < count < flat.size // 2 or count == 0:
        positions = _best_positions(nonzero)
        values = flat[nonzero]
        inner = min(((h, p) for h, p in [({"kind": "raw"}, [values.tobytes()])]
                     + list(_dense_candidates(values))),
                    key=lambda hp: len(compress(b"".join(hp[1]))))
        header = {"kind": "sparse", "positions": positions[0], "count": count,
                  "positions_bytes": len(positions[1]), "values": inner[0]}
        yield header, [positions[1]] + inner[1]


def _dense_candidates(flat: np.ndarray):
    if flat.dtype == np.float32:
        with np.errstate(over="ignore"):  # values beyond float16's range just fail the test
            half = flat.astype(np.float16)
        if np.array_equal(half.astype(np.float32).view(np.uint32), flat.view(np.uint32)):
            yield {"kind": "float16"}, [half.tobytes()]
    # Distinct bit patterns, so -0.0 and 0.0 (and NaN payloads) stay apart.
    codebook, indices = np.unique(_bits(flat), return_inverse=True)
    width = max(1, math.ceil(math.log2(len(codebook)))) if len(codebook) > 1 else 1
    if len(codebook) <= MAX_PALETTE and width < flat.dtype.itemsize * 8:
        book = (codebook.view(flat.dtype) if flat.dtype.kind == "f" else codebook).astype(
            flat.dtype).tobytes()
        yield ({"kind": "palette", "entries": len(codebook), "bits": width},
               [book, pack_bits(indices, width)])
        if width < 8 < flat.dtype.itemsize * 8:
            # One index a byte: zstd's Huffman stage then sees the symbols and codes the
            # frequent clusters in fewer bits, often beating the packed form.
            yield ({"kind": "palette", "entries": len(codebook), "bits": 8},
                   [book, indices.astype(np.uint8).tobytes()])


def _bits(flat: np.ndarray) -> np.ndarray:
    """Floats viewed as unsigned integers of the same width; other arrays as they are."""
    return flat.view(f"u{flat.dtype.itemsize}") if flat.dtype.kind == "f" else flat


def _best_positions(nonzero: np.ndarray) -> tuple[str, bytes]:
    bitmap = np.packbits(nonzero, bitorder="little").tobytes()
    gaps = np.diff(np.flatnonzero(nonzero), prepend=-1) - 1
    varints = _varints(gaps)
    if len(compress(varints)) < len(compress(bitmap)):
        return "gaps", varints
    return "bitmap", bitmap


def _decode_flat(header: dict, data: bytes, dtype: np.dtype, size: int):
    kind = header.get("kind")
    itemsize = dtype.itemsize
    if kind == "raw":
        need = size * itemsize
        _require(len(data) >= need, "raw payload too short")
        return np.frombuffer(data, dtype=dtype, count=size), need  # read-only, no copy
    if kind == "float16":
        _require(dtype == np.float32, "float16 encoding of a non-float32 tensor")
        need = size * 2
        _require(len(data) >= need, "float16 payload too short")
        return np.frombuffer(data, dtype=np.float16, count=size).astype(np.float32), need
    if kind == "palette":
        entries, bits = header.get("entries"), header.get("bits")
        _require(isinstance(entries, int) and 1 <= entries <= MAX_PALETTE, "bad palette size")
        _require(isinstance(bits, int) and 1 <= bits <= 16 and entries <= 1 << bits,
                 "bad palette bit width")
        book_bytes = entries * itemsize
        index_bytes = packed_size(size, bits)
        _require(len(data) >= book_bytes + index_bytes, "palette payload too short")
        book = np.frombuffer(data, dtype=dtype, count=entries)
        indices = unpack_bits(data[book_bytes: book_bytes + index_bytes], bits, size)
        _require(size == 0 or int(indices.max()) < entries, "palette index out of range")
        return book[indices], book_bytes + index_bytes
    if kind == "sparse":
        count, positions_bytes = header.get("count"), header.get("positions_bytes")
        _require(isinstance(count, int) and 0 <= count <= size, "bad non-zero count")
        _require(isinstance(positions_bytes, int) and 0 <= positions_bytes <= len(data),
                 "bad positions length")
        where = _positions(header.get("positions"), data[:positions_bytes], size, count)
        inner = header.get("values")
        _require(isinstance(inner, dict) and inner.get("kind") != "sparse", "bad sparse values")
        values, used = _decode_flat(inner, data[positions_bytes:], dtype, count)
        out = np.zeros(size, dtype=dtype)
        out[where] = values
        return out, positions_bytes + used
    raise EncodingError(f"unknown encoding {kind!r}")


def _positions(kind, data: bytes, size: int, count: int) -> np.ndarray:
    if kind == "bitmap":
        _require(len(data) == (size + 7) // 8, "bitmap length does not match the tensor")
        bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little", count=size)
        where = np.flatnonzero(bits)
    elif kind == "gaps":
        gaps = _read_varints(data, count)
        # Bounded before the sum, which could otherwise wrap around int64.
        _require(count == 0 or (int(gaps.max()) < size
                                and float(gaps.sum(dtype=np.float64)) + count <= size),
                 "gap positions run past the tensor")
        where = np.cumsum(gaps + 1) - 1
        _require(count == 0 or int(where[-1]) < size, "gap positions run past the tensor")
    else:
        raise EncodingError(f"unknown position encoding {kind!r}")
    _require(len(where) == count, "position count does not match")
    return where


def _payload_size(header: dict, dtype: np.dtype, size: int) -> int:
    """Upper bound of the decompressed payload, checked before decompressing."""
    kind = header.get("kind")
    if kind == "sparse":
        positions = header.get("positions_bytes")
        _require(_whole(positions) and 0 <= positions <= 10 * size + 8,
                 "bad positions length")
        count = header.get("count")
        _require(_whole(count) and 0 <= count <= size, "bad non-zero count")
        _require(isinstance(header.get("values"), dict), "bad sparse values header")
        return positions + _payload_size(header["values"], dtype, count)
    if kind == "palette":
        entries, bits = header.get("entries"), header.get("bits")
        _require(_whole(entries) and _whole(bits) and 1 <= bits <= 16
                 and 1 <= entries <= MAX_PALETTE, "bad palette header")
        return entries * dtype.itemsize + packed_size(size, bits)
    return size * dtype.itemsize


def _whole(value) -> bool:
    """An integer of the header's, not a bool (JSON true is no count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def pack_bits(indices: np.ndarray, bits: int) -> bytes:
    """Packs non-negative integers below 2**bits, little-endian bit order."""
    indices = np.asarray(indices, dtype=np.uint32)
    if bits == 8:
        return indices.astype(np.uint8).tobytes()
    if bits == 16:
        return indices.astype("<u2").tobytes()
    chunks = []
    step = _CHUNK - _CHUNK % 8  # whole bytes per chunk
    for start in range(0, len(indices), step):
        part = indices[start: start + step]
        planes = ((part[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
        chunks.append(planes.reshape(-1))
    stream = np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)
    return np.packbits(stream, bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """The `count` unsigned integers of `bits` bits each packed in `data` (little-endian bit
    order, as `pack_bits` writes them), as int64."""
    if bits == 8:
        return np.frombuffer(data, np.uint8, count=count).astype(np.int64)
    if bits == 16:
        return np.frombuffer(data, "<u2", count=count).astype(np.int64)
    stream = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little",
                           count=count * bits)
    weights = (1 << np.arange(bits, dtype=np.int64))
    out = np.empty(count, dtype=np.int64)
    for start in range(0, count, _CHUNK):
        part = stream[start * bits: (start + _CHUNK) * bits].reshape(-1, bits)
        out[start: start + len(part)] = part @ weights
    return out


def packed_size(count: int, bits: int) -> int:
    """Bytes that `count` values of `bits` bits take packed."""
    return (count * bits + 7) // 8


def _varints(values: np.ndarray) -> bytes:
    """LEB128: 7 bits a byte, high bit set while more bytes follow."""
    values = np.asarray(values, dtype=np.uint64)
    out = bytearray()
    for v in values.tolist():
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def _read_varints(data: bytes, count: int) -> np.ndarray:
    out = np.empty(count, dtype=np.int64)
    i = n = 0
    value = shift = 0
    for byte in data:
        value |= (byte & 0x7F) << shift
        if byte & 0x80:
            shift += 7
            _require(shift < 63, "varint too long")
            continue
        _require(n < count, "more gaps than non-zeros")
        out[n] = value
        n += 1
        value = shift = 0
        i += 1
    _require(n == count and shift == 0, "gap list does not match the non-zero count")
    return out


def compress(data: bytes) -> bytes:
    """`data` as one zstd frame with its checksum and size (a faster level for large data)."""
    level = ZSTD_LEVEL if len(data) < LARGE else ZSTD_LEVEL_LARGE
    return zstandard.ZstdCompressor(level=level, write_checksum=True,
                                    write_content_size=True).compress(data)


def decompress(blob, limit: int) -> bytes:
    """The zstd frame `blob` (bytes or a uint8 array) decompressed, refusing more than
    `limit` bytes."""
    try:
        params = zstandard.get_frame_parameters(blob)
    except zstandard.ZstdError as e:
        raise EncodingError(f"not a zstd frame ({e})") from None
    _require(params.content_size != zstandard.CONTENTSIZE_UNKNOWN
             and params.content_size <= limit, "payload larger than its tensor allows")
    try:
        return zstandard.ZstdDecompressor().decompress(blob, max_output_size=limit)
    except zstandard.ZstdError as e:
        raise EncodingError(f"corrupt payload ({e})") from None


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise EncodingError(message)
