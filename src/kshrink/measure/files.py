"""Size of a model file on disk, as it is and deflate-compressed."""

from __future__ import annotations

import dataclasses
import os
import zlib

_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class FileSize:
    """Attributes: path; bytes (as stored); deflated (after zlib level 9, as a zip would)."""

    path: str
    bytes: int
    deflated: int


def file_size(path) -> FileSize:
    """Measures `path`: its size, and its size after deflate (level 9), read in chunks."""
    compressor = zlib.compressobj(9)
    deflated = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            deflated += len(compressor.compress(chunk))
    deflated += len(compressor.flush())
    return FileSize(str(path), os.path.getsize(path), deflated)
