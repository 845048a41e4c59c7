"""Reading and writing model files safely: clear errors in, atomic writes out."""

from __future__ import annotations

import json
import os
import re
import warnings
import zipfile
from pathlib import Path

import keras

from kshrink.core.archive import check_inflation
from kshrink.core.atomic import atomic_output
from kshrink.core.classes import is_user_class
from kshrink.core.graph import runnable_names
from kshrink.errors import KshrinkError, ModelFileError
from kshrink.layers.specs import implied_kernel_elements


SUFFIXES = (".keras", ".kshrink")
MAX_CONFIG_BYTES = 64 << 20
MAX_CONFIG_OBJECTS = 100_000
# 2^31 parameters is 8 GiB of float32: bigger models exist, and pass `max_parameters`.
MAX_PARAMETERS = 1 << 31
WEIGHTS = "model.weights.h5"


def load(path, *, max_parameters: int = MAX_PARAMETERS, custom_objects: dict | None = None,
         safe_mode: bool = True) -> keras.Model:
    """Loads a `.keras` or `.kshrink` file; every way it can be wrong is one `KshrinkError`
    (`ArtifactError` for a `.kshrink`, `ModelFileError` otherwise).

    A `.keras` file is checked before Keras reads it: its config's size and layer count, and
    the kernel values the config implies, against `max_parameters` and against the bytes its
    weights file holds (so a small file cannot make Keras allocate gigabytes).

    Args:
        path: the file.
        max_parameters: refuse a config that implies more kernel values.
        custom_objects: the user's classes the model is made of (custom layers, losses), by
            class name, as `keras.saving.load_model` takes them
            (`kshrink.core.classes.import_modules` collects a module's).
        safe_mode: refuse Lambda layers (code in the file); pass False only for files you
            trust.

    On TensorFlow, model and layer names it cannot run are replaced (see
    `kshrink.core.graph.runnable_names`).

    Example:

    ```python
    model = kshrink.load("small.kshrink")   # or "model.keras"
    ```
    """
    with keras.saving.CustomObjectScope(custom_objects or {}), warnings.catch_warnings():
        # A compiled model saved before it trained (as `compress` returns it) holds its
        # optimizer's step count only; Keras builds the optimizer on load and says it skipped
        # those: nothing was lost.
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model = _load(Path(path), max_parameters, safe_mode)
    return runnable_names(model)[0]


def _load(path: Path, max_parameters: int, safe_mode: bool) -> keras.Model:
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelFileError(f"not a file: {path}")
    if path.suffix == ".kshrink":
        from kshrink.artifact import load

        return load(path, safe_mode=safe_mode)
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
            check_inflation(archive, str(path))
            bad = archive.testzip()
            if bad is None:
                _check_keras_config(archive, path, max_parameters)
        if bad is not None:
            raise ModelFileError(f"{path} is corrupt: member {bad} fails its checksum")
        return keras.saving.load_model(path, safe_mode=safe_mode)
    except ModelFileError:
        raise
    except KshrinkError as e:
        raise ModelFileError(str(e)) from None
    except Exception as e:
        raise ModelFileError(f"cannot load {path}: {load_error(e)}") from None


def load_error(error: Exception) -> str:
    """Keras' reason a model did not load, in full but without the configs it dumps, and for
    a class it cannot find, how to give it."""
    message = " ".join(str(error).split())
    # Keras wraps the cause in a message about the outer class; the cause comes last.
    message = message.rpartition("Exception encountered: ")[2]
    message = message.split(" Full object config:")[0].split(" config={")[0]
    missing = re.search(r"Could not locate class '([\w.]+)'", message)
    if missing:
        name = missing.group(1)
        module = re.search(r"'module': '([\w.]+)', 'class_name': '" + re.escape(name) + "'",
                           str(error))
        where = module.group(1) if module else "MODULE"
        fix = ("import kshrink first (import kshrink)" if where.startswith("kshrink")
               else f"import the module that defines it: kshrink --import {where} ... on the "
                    f"command line, custom_objects={{'{name}': {name}}} in Python")
        message = f"{missing.group(0)}; {fix}"
    return message[:1000] or type(error).__name__


def _check_keras_config(archive: zipfile.ZipFile, path: Path, max_parameters: int) -> None:
    try:
        config = json.loads(archive.read("config.json"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ModelFileError(f"{path}: its config.json is not readable JSON "
                             f"({' '.join(str(e).split())[:120]})") from None
    layers, stack = 0, [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            layers += "class_name" in item
            stack.extend(v for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend(item)
    if layers > MAX_CONFIG_OBJECTS:
        raise ModelFileError(f"{path}: its config declares {layers:,} objects; kshrink reads "
                             f"at most {MAX_CONFIG_OBJECTS:,}")
    implied = implied_kernel_elements(config)
    if implied > max_parameters:
        raise ModelFileError(f"{path}: its config implies {implied:,} kernel values, more than "
                             f"max_parameters={max_parameters:,}")
    stored = archive.getinfo(WEIGHTS).file_size if WEIGHTS in archive.namelist() else 0
    if implied > 2 * stored + (1 << 16):  # int4 kernels take half a byte per value
        raise ModelFileError(f"{path}: its config implies {implied:,} kernel values, its "
                             f"weights file holds {stored:,} bytes")


def loading_needs(model: keras.Model, path) -> str | None:
    """What it takes to load `model` once saved at `path` beyond `keras.saving.load_model`,
    as a phrase (None: plain Keras reads it)."""
    if Path(path).suffix == ".kshrink":
        return "kshrink.load"
    classes = {type(l) for l in model._flatten_layers(include_self=True, recursive=True)}
    modules = sorted({cls.__module__ for cls in classes if is_user_class(cls)})
    needs = []
    if any(cls.__module__.startswith("kshrink") for cls in classes):
        needs.append("import kshrink (it holds kshrink's quantized layers)")
    if modules:
        needs.append(f"import {', '.join(modules)} (its custom layers)")
    return ", then ".join(needs) or None


def check_output_path(path) -> Path:
    """`path` as a `Path` if a model can be written there (.keras or .kshrink, in an existing
    writable folder, not a folder itself); a `ModelFileError` saying why not otherwise."""
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


def save(model: keras.Model, path) -> Path:
    """Saves `model` as `.keras` or as the compact `.kshrink`, chosen by the suffix, and
    returns the path.

    Either way the file appears whole or not at all (temporary file, then rename); a path
    that cannot be written (no such folder, a folder, another suffix) is a `ModelFileError`
    before anything is written.

    Example:

    ```python
    kshrink.save(small, "small.kshrink")   # smallest exact encodings; or "small.keras"
    ```
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
