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
from kshrink.artifact.encodings import compress, decompress

MUTATIONS = ("flip", "truncate", "insert", "header_text", "header_number", "payload",
             "version")


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
    elif kind == "header_number":
        header = json.loads(text)
        _replace_random_number(header, rng)
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
