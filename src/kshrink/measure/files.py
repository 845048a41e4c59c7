"""Size of a model file on disk, as it is and deflate-compressed."""

from __future__ import annotations

import dataclasses
import os
import zipfile
import zlib

_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class FileSize:
    """Attributes: path; bytes (as stored); deflated (after zlib level 9, as a zip would);
    optimizer_bytes: the optimizer state a `.keras` file the user gave held, left out of the
    file measured (see `kshrink.measure.measure`)."""

    path: str
    bytes: int
    deflated: int
    optimizer_bytes: int = 0


def file_size(path) -> FileSize:
    """Measures `path`: its size, and its size after deflate (level 9), read in chunks."""
    compressor = zlib.compressobj(9)
    deflated = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            deflated += len(compressor.compress(chunk))
    deflated += len(compressor.flush())
    return FileSize(str(path), os.path.getsize(path), deflated)


def optimizer_state_bytes(path) -> int:
    """Bytes of optimizer state (Adam's moments and the like) stored in a `.keras` file: a
    trained, compiled model carries them; the model itself does not need them."""
    import h5py

    sizes = []
    try:
        with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as f, \
                h5py.File(f, "r") as weights:
            group = weights.get("optimizer")
            if group is not None:
                group.visititems(lambda _, item: sizes.append(item.nbytes)
                                 if isinstance(item, h5py.Dataset) else None)
    except (KeyError, OSError, zipfile.BadZipFile):
        return 0
    return sum(sizes)
