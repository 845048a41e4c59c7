"""The compact `.kshrink` file: the Keras model config plus every variable in its smallest exact
encoding, in a safetensors container. See docs/format.md.

Loading never unpickles or runs code from the file: the config is JSON deserialized by Keras in
safe mode (no Lambda layers, only known classes), every length is checked before anything is
allocated, a SHA-256 over header and payloads catches corruption before the config is read,
and every failure is one `ArtifactError`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import keras
import numpy as np
import safetensors
import safetensors.numpy

from kshrink.artifact.encodings import EncodingError, compress, decode, decompress, encode
from kshrink.core.atomic import atomic_output
from kshrink.core.graph import ensure_supported
from kshrink.errors import KshrinkError, short
from kshrink.layers.specs import implied_kernel_elements  # importing kshrink.layers registers its classes

FORMAT = "kshrink"
VERSION = 1
SUFFIX = ".kshrink"
MAX_ELEMENTS = 1 << 34  # 16 Gi values: a declared total above this is refused outright
MAX_HEADER = 64 << 20  # bytes of header JSON (config and tensor list) once decompressed
HEADER = "header"
_DTYPES = {"float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32",
           "int64", "bool"}


class ArtifactError(KshrinkError):
    """A `.kshrink` file that is malformed, truncated, corrupt, or asks for something unsafe."""


def save(model: keras.Model, path) -> Path:
    """Writes `model` as a compact `.kshrink` file (atomically: temp file, then rename).

    The same model gives the same bytes every time.

    Example:

    ```python
    kshrink.save(small, "lenet.kshrink")
    model = kshrink.load("lenet.kshrink")
    ```
    """
    path = Path(path)
    if path.suffix != SUFFIX:
        raise ArtifactError(f"compact files end in {SUFFIX}. Received: {path.name}")
    ensure_supported(model)
    config = keras.saving.serialize_keras_object(model)
    tensors, blobs = [], {}
    for i, (key, variable) in enumerate(_named_variables(model)):
        values = np.asarray(keras.ops.convert_to_numpy(variable.value))
        header, blob = encode(values)
        name = f"t{i}"
        blobs[name] = np.frombuffer(blob, dtype=np.uint8)
        tensors.append({"path": key, "shape": list(values.shape),
                        "dtype": str(values.dtype), "encoding": header, "blob": name})
    body = {"format": FORMAT, "version": VERSION, "config": config, "tensors": tensors}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    blobs[HEADER] = np.frombuffer(compress(text.encode()), dtype=np.uint8)
    data = safetensors.numpy.save(blobs, metadata={FORMAT: _stamp(blobs)})
    with atomic_output(path) as tmp:
        Path(tmp).write_bytes(data)
    return path


def load(path, *, safe_mode: bool = True) -> keras.Model:
    """Loads a `.kshrink` file into a Keras model; quantized layers stay int8/int4 in memory.

    Args:
        path: the file.
        safe_mode: refuse Lambda layers and classes Keras does not know (pass False only for
            files you trust).

    Raises:
        ArtifactError: the file is missing, malformed, truncated, corrupt or unsafe.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"compact file not found: {path}")
    try:
        handle = safetensors.safe_open(str(path), framework="numpy")
    except Exception as e:  # safetensors reports malformed headers and offsets
        raise ArtifactError(f"{path} is not a kshrink file ({_one_line(e)})") from None
    with handle as f:
        # Blobs are read one at a time, twice: once for the checksum, once to decode into
        # the variables, so the whole file is never held in memory beside the model.
        def blob(name):
            try:
                return f.get_tensor(name)
            except Exception as e:
                raise ArtifactError(f"{path} is truncated or corrupt ({_one_line(e)})") from None

        names = set(f.keys())
        stamp = _read_stamp((f.metadata() or {}).get(FORMAT))
        if stamp is None or HEADER not in names:
            raise ArtifactError(f"{path} is a safetensors file, not a kshrink file")
        if stamp.get("version") != VERSION:
            raise ArtifactError(f"{path}: format version {stamp.get('version')!r}; this "
                                f"kshrink reads version {VERSION}")
        if _digest(names, blob) != stamp.get("sha256"):
            raise ArtifactError(f"{path} is corrupt: its checksum does not match")
        try:
            text = decompress(blob(HEADER).tobytes(), MAX_HEADER).decode()
        except (EncodingError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{path}: unreadable header ({_one_line(e)})") from None
        body = _parse_body(text, path)
        tensors = _check_tensors(body["tensors"], names - {HEADER}, path)
        _check_config_sizes(body["config"], tensors, path)
        _check_classes(body["config"], safe_mode, path)
        try:
            model = keras.saving.deserialize_keras_object(body["config"], safe_mode=safe_mode)
        except Exception as e:
            raise ArtifactError(
                f"{path}: the model config cannot be rebuilt ({_one_line(e)})") from None
        if not isinstance(model, keras.Model):
            raise ArtifactError(f"{path}: the config is not a Keras model")
        variables = dict(_named_variables(model))
        if sorted(variables) != sorted(t["path"] for t in tensors):
            raise ArtifactError(f"{path}: the stored tensors do not match the model's variables")
        for t in tensors:
            variable = variables[t["path"]]
            if list(variable.shape) != t["shape"] or str(variable.dtype) != t["dtype"]:
                raise ArtifactError(
                    f"{path}: tensor {t['path']} is {t['dtype']}{t['shape']}, the model "
                    f"expects {variable.dtype}{list(variable.shape)}")
            try:
                values = decode(t["encoding"], blob(t["blob"]), np.dtype(t["dtype"]),
                                t["size"])
            except EncodingError as e:
                raise ArtifactError(f"{path}: tensor {t['path']}: {e}") from None
            variable.assign(values.reshape(t["shape"]))
    return model


def _named_variables(model: keras.Model, prefix: str = "") -> list:
    """(key, variable) for every variable, keyed by the chain of layer names and its name.

    Not `variable.path`: that depends on the name scope a variable was created in, which
    changes when a nested model is rebuilt from its config.
    """
    named = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            named += _named_variables(layer, f"{prefix}{layer.name}/")
            continue
        for i, variable in enumerate(layer.weights):
            named.append((f"{prefix}{layer.name}/{i}:{variable.name}", variable))
    return named


def _stamp(blobs: dict) -> str:
    # One metadata entry: safetensors does not keep the order of several.
    return json.dumps({"sha256": _digest(blobs, blobs.get), "version": VERSION},
                      sort_keys=True)


def _read_stamp(text):
    try:
        stamp = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        return None
    return stamp if isinstance(stamp, dict) else None


def _digest(names, blob) -> str:
    """SHA-256 over every blob's name and bytes, in name order; `blob(name)` reads one."""
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(name.encode())
        h.update(np.ascontiguousarray(blob(name)).tobytes())
    return h.hexdigest()


def _parse_body(text: str, path: Path) -> dict:
    try:
        body = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ArtifactError(f"{path}: unreadable header ({_one_line(e)})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a kshrink file")
    if body.get("version") != VERSION:
        raise ArtifactError(f"{path}: header format version {short(body.get('version'))}; "
                            f"this kshrink reads version {VERSION}")
    if not isinstance(body.get("config"), dict) or not isinstance(body.get("tensors"), list):
        raise ArtifactError(f"{path}: header lacks the model config or the tensor list")
    return body


def _check_tensors(tensors: list, blobs: set, path: Path) -> list:
    """Validates every declared tensor and its total size before anything is decoded."""
    checked, total = [], 0
    for t in tensors:
        ok = (isinstance(t, dict) and isinstance(t.get("path"), str)
              and isinstance(t.get("shape"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_ELEMENTS
                      for d in t["shape"])
              and isinstance(t.get("dtype"), str) and t["dtype"] in _DTYPES
              and isinstance(t.get("encoding"), dict)
              and isinstance(t.get("blob"), str) and t["blob"] in blobs)
        if not ok:
            raise ArtifactError(f"{path}: malformed tensor entry")
        size = int(np.prod(t["shape"], dtype=object)) if t["shape"] else 1
        total += size
        if total > MAX_ELEMENTS:
            raise ArtifactError(f"{path}: declares more than {MAX_ELEMENTS} values")
        checked.append({**t, "size": size})
    return checked


def _check_config_sizes(config: dict, tensors: list, path: Path) -> None:
    """Refuses configs with integers far larger than the weights stored, before Keras builds
    (and allocates) anything from them."""
    limit = max(sum(t["size"] for t in tensors), 1 << 24)
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, int) and not isinstance(item, bool) and abs(item) > limit:
            raise ArtifactError(f"{path}: the config holds a size ({item}) larger than any "
                                "the stored weights allow")
    # Each number may be in bounds and their product not (two Dense layers of 2^24 units):
    # the kernels the config implies, counted from it before Keras allocates them.
    implied = implied_kernel_elements(config)
    declared = sum(t["size"] for t in tensors)
    if implied > 2 * declared + (1 << 16):  # int4 kernels store half their elements
        raise ArtifactError(f"{path}: the config implies {implied:,} kernel values, the file "
                            f"stores {declared:,}")


def _check_classes(config: dict, safe_mode: bool, path: Path) -> None:
    """Names the first class the config asks for that cannot be loaded safely."""
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        if not isinstance(item, dict):
            continue
        stack.extend(item.values())
        name, module = item.get("class_name"), item.get("module")
        if not isinstance(name, str) or not isinstance(module, str):
            continue
        if safe_mode and name == "Lambda":
            raise ArtifactError(f"{path} holds a Lambda layer, which runs code from the file; "
                                "load it with safe_mode=False only if you trust the file")
        registered = item.get("registered_name") or name
        if name == "function" and isinstance(item.get("config"), str):
            registered = item["config"]  # a registered function: "package>name"
        if not module.startswith("keras") and keras.saving.get_registered_object(
                registered) is None:
            raise ArtifactError(f"{path} needs the unknown class {registered!r}: import the "
                                f"module that defines it ({module}) before loading, or pass "
                                "custom_objects (kshrink --import MODULE on the command line)")


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:200] or type(error).__name__
