"""Reading and writing model files safely: clear errors in, atomic writes out."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import keras

from kshrink.core.atomic import atomic_output
from kshrink.errors import ModelFileError


SUFFIXES = (".keras", ".kshrink")
MAX_CONFIG_BYTES = 64 << 20


def load_model_file(path) -> keras.Model:
    """Loads a `.keras` or `.kshrink` file; every way it can be wrong is one `KshrinkError`."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelFileError(f"not a file: {path}")
    if path.suffix == ".kshrink":
        from kshrink.artifact import load

        return load(path)
    if path.suffix != ".keras":
        raise ModelFileError(f"expected a .keras or .kshrink model file. Received: {path.name}")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path} is not a Keras model file (not a zip archive)")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if "config.json" not in names:
                raise ModelFileError(f"{path} is not a Keras model file (no config.json inside)")
            declared = archive.getinfo("config.json").file_size
            if declared > MAX_CONFIG_BYTES:
                raise ModelFileError(
                    f"{path}: its config.json is {declared:,} bytes; kshrink reads at most "
                    f"{MAX_CONFIG_BYTES:,} (a model's config is kilobytes to a few megabytes)")
            bad = archive.testzip()
        if bad is not None:
            raise ModelFileError(f"{path} is corrupt: member {bad} fails its checksum")
        return keras.saving.load_model(path)
    except ModelFileError:
        raise
    except Exception as e:
        message = " ".join(str(e).split())[:300] or type(e).__name__
        raise ModelFileError(f"cannot load {path}: {message}") from None


def check_output_path(path) -> Path:
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ModelFileError(f"output must end in .keras or .kshrink. Received: {path.name}")
    if not path.parent.is_dir():
        raise ModelFileError(f"output directory does not exist: {path.parent}")
    if path.is_dir():
        raise ModelFileError(f"output {path} is a directory; name a file")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ModelFileError(f"output directory is not writable: {path.parent}")
    return path


def save_model_file(model: keras.Model, path) -> Path:
    """Saves `model` as `.keras` or as the compact `.kshrink`, chosen by the suffix.

    Either way the file appears whole or not at all (temporary file, then rename).
    """
    path = check_output_path(path)
    if path.suffix == ".kshrink":
        from kshrink.artifact import save

        return save(model, path)
    return save_model_atomic(model, path)


def save_model_atomic(model: keras.Model, path) -> Path:
    """Saves `model` as `.keras` at `path` via a temporary file and a rename.

    An interrupted or failed save never leaves a half-written file at `path`.
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise ModelFileError(f"output must end in .keras. Received: {path.name}")
    with atomic_output(path) as tmp:
        model.save(tmp)
    return path
