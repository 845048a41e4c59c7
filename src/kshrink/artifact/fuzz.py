"""Mutations of valid `.kshrink` files for fuzzing the loader (tests and benchmarks use it).

Byte-level mutations (flips, truncation, insertion) mostly stop at the container or the
checksum; structure-aware ones edit the header or a payload and re-sign the file, as a hostile
writer would, so the loader's own validation is what gets exercised.
"""

from __future__ import annotations

import json
import random

import numpy as np
import safetensors.numpy

from kshrink.artifact.container import FORMAT, HEADER, _stamp
from kshrink.artifact.encodings import _varints, compress, decompress

MUTATIONS = ("flip", "truncate", "insert", "header_text", "header_number", "payload",
             "version", "gaps", "dims", "types")
# Values of the wrong type or range, put in place of any header value by "types".
ODD_VALUES = ("", "x" * 300, [], [1, "a"], {}, {"a": 1}, None, True, False, -1, 0, 1.5, 2**63,
              10**4000, -(10**30), [[[]]], "nan")
SIZE_KEYS = ("units", "filters", "input_dim", "output_dim")


def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One random mutation of a valid file: (mutation name, new bytes)."""
    kind = rng.choice(MUTATIONS)
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return kind, bytes(out)
    if kind == "truncate":
        return kind, data[: rng.randrange(len(data))]
    if kind == "insert":
        at = rng.randrange(len(data))
        return kind, data[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) + data[at:]
    blobs = safetensors.numpy.load(data)
    text = decompress(blobs[HEADER].tobytes(), 1 << 26).decode()
    if kind == "header_text":
        chars = list(text)
        for _ in range(rng.randint(1, 4)):
            chars[rng.randrange(len(chars))] = rng.choice('{}[]":,0123456789-.eatrufnl ')
        text = "".join(chars)
    elif kind == "version":  # a file from a format version this kshrink does not know
        header = json.loads(text)
        header["version"] = rng.choice([0, 2, 99, "1", None, 2**64])
        text = json.dumps(header)
    elif kind == "dims":  # sizes each in bounds whose product is not
        header = json.loads(text)
        _grow_sizes(header["config"], rng)
        text = json.dumps(header)
    elif kind == "gaps":  # a sparse tensor's gap list rewritten to run past it or wrap int64
        header = json.loads(text)
        _rewrite_gaps(header, blobs, rng)
        text = json.dumps(header)
    elif kind == "header_number":
        header = json.loads(text)
        _replace_random_number(header, rng)
        text = json.dumps(header)
    elif kind == "types":  # type confusion: any value (a class name, a shape, an encoding...)
        header = json.loads(text)
        _replace_random_value(header, rng)
        text = json.dumps(header)
    else:  # payload: change bytes of one tensor blob
        name = rng.choice([n for n in blobs if n != HEADER])
        blob = bytearray(blobs[name].tobytes())
        if blob:
            blob[rng.randrange(len(blob))] ^= 0xFF
        blobs[name] = np.frombuffer(bytes(blob), np.uint8)
    blobs[HEADER] = np.frombuffer(compress(text.encode()), np.uint8)
    return kind, safetensors.numpy.save(blobs, metadata={FORMAT: _stamp(blobs)})


def _replace_random_number(tree, rng: random.Random) -> None:
    slots = []
    stack = [tree]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(
            node, list) else ()
        for key, value in items:
            if isinstance(value, int) and not isinstance(value, bool):
                slots.append((node, key))
            elif isinstance(value, (dict, list)):
                stack.append(value)
    if slots:
        node, key = rng.choice(slots)
        node[key] = rng.choice([0, -1, 1, node[key] + 1, node[key] * 7, 2**31, 2**40, 10**15])


def _replace_random_value(tree, rng: random.Random) -> None:
    slots = []
    stack = [tree]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            slots.append((node, key))
            if isinstance(value, (dict, list)):
                stack.append(value)
    node, key = rng.choice(slots)
    node[key] = rng.choice(ODD_VALUES)


def _grow_sizes(config, rng: random.Random) -> None:
    """Sets several layer widths, and the input widths they are built for, to large powers
    of two."""
    slots = []
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            slots += [(node, k) for k in SIZE_KEYS if isinstance(node.get(k), int)]
            shape = node.get("input_shape")
            if isinstance(shape, list) and shape and isinstance(shape[-1], int):
                slots.append((shape, len(shape) - 1))
            stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend(node)
    for node, key in rng.sample(slots, min(len(slots), rng.randint(2, 6))):
        node[key] = 1 << rng.choice([12, 16, 20, 24, 30])


def _rewrite_gaps(header: dict, blobs: dict, rng: random.Random) -> None:
    sparse = [t for t in header["tensors"] if t["encoding"].get("kind") == "sparse"
              and t["encoding"].get("positions") == "gaps" and t["encoding"]["count"]]
    if not sparse:
        return
    tensor = rng.choice(sparse)
    encoding = tensor["encoding"]
    payload = decompress(blobs[tensor["blob"]].tobytes(), 1 << 30)
    count = encoding["count"]
    big = rng.choice([1 << 62, (1 << 63) - 1, int(np.prod(tensor["shape"])), 1 << 40])
    gaps = [big if rng.random() < 0.5 else rng.randrange(64) for _ in range(count)]
    positions = _varints(np.array(gaps, dtype=np.uint64))
    blobs[tensor["blob"]] = np.frombuffer(
        compress(positions + payload[encoding["positions_bytes"]:]), np.uint8)
    encoding["positions_bytes"] = len(positions)
