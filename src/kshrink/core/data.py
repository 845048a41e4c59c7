"""Checks on the data a user passes: everything that would make training, calibration or
measurement silently wrong is refused here with one line."""

from __future__ import annotations

import numpy as np

from kshrink.errors import KshrinkError


def split_labels(data, model):
    """`data` with its labels explicit where only the model can tell them: the inputs of a
    model with several inputs, given as a list or tuple of one plain array per input, become
    `(inputs, None)`. Anything else is returned as it is: `(x, y)`, `x`, a dict, a stream.

    A pair of plain arrays cannot be `(x, y)` for a two-input model (its `x` would be a list
    or a dict of two arrays), so the reading is never a guess. Every public entry that takes
    data calls this first; below it, a 2-tuple or 2-list is `(x, y)`.
    """
    count = len(getattr(model, "inputs", None) or ())
    if (count >= 2 and isinstance(data, (tuple, list)) and len(data) == count
            and not any(isinstance(part, (tuple, list, dict)) or part is None for part in data)):
        return list(data), None
    return data


def check_data(data, model=None, name: str = "data") -> None:
    """Raises `KshrinkError` unless `data` (`(x, y)` or `x`; `x` an array, or a dict or list
    of arrays) is usable: arrays of at least one dimension, at least one example, the same
    number of examples in every part, finite values, and class labels the model can produce.

    Args:
        data: what the user passed.
        model: the model it is for; its output width bounds integer labels.
        name: what to call it in the message (`"data"`, `"validation_data"`).
    """
    if data is None:
        return
    data = split_labels(data, model)
    x, y = data if isinstance(data, (tuple, list)) and len(data) == 2 else (data, None)
    if isinstance(x, dict):
        parts = {f"{name} x[{k!r}]": v for k, v in x.items()}
    elif isinstance(x, (tuple, list)):
        parts = {f"{name} x[{i}]": v for i, v in enumerate(x)}
    else:
        parts = {f"{name} x": x}
    if y is not None:
        parts[f"{name} y"] = y
    length = None
    for label, values in parts.items():
        values = np.asarray(values)
        if values.ndim == 0:
            raise KshrinkError(f"{label} is a single number (0-d); it must hold one row per "
                               "example")
        if len(values) == 0:
            raise KshrinkError(f"{label} holds no examples")
        if length is not None and len(values) != length:
            raise KshrinkError(f"{name}: inputs and labels differ in length ({length} vs "
                               f"{len(values)})")
        length = len(values)
        _check_kind(values, label)
        _check_finite(values, label)
    if y is not None and model is not None:
        _check_labels(np.asarray(y), model, f"{name} y")


def _check_kind(values: np.ndarray, label: str) -> None:
    """Real numbers (or booleans) only: complex values would lose their imaginary part and
    strings, dates or objects fail deep inside the backend."""
    if values.dtype.kind not in "biuf":
        raise KshrinkError(f"{label} holds {values.dtype} values; it must hold real numbers "
                           "(integers, floats or booleans)")


def _check_finite(values: np.ndarray, label: str) -> None:
    if not np.issubdtype(values.dtype, np.floating):
        return
    bad = ~np.isfinite(values)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise KshrinkError(f"{label} holds NaN or Inf: the first at index {index} "
                           f"({values[index]})")


def _check_labels(y: np.ndarray, model, label: str) -> None:
    """Class labels (one per example, for a model with a class axis) must be whole numbers
    in [0, classes)."""
    outputs = getattr(model, "outputs", None) or []
    if len(outputs) != 1 or y.ndim != 1:
        return
    classes = outputs[0].shape[-1]
    if not isinstance(classes, int) or classes < 2:
        return
    if not np.issubdtype(y.dtype, np.integer):
        fractional = np.flatnonzero(y != np.round(y))
        if fractional.size:
            raise KshrinkError(f"{label} holds the label {y[fractional[0]]} at index "
                               f"{int(fractional[0])}; class labels are whole numbers")
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= classes:
        bad = low if low < 0 else high
        raise KshrinkError(f"{label} holds the class label {bad}, outside the model's "
                           f"{classes} classes (0 to {classes - 1})")


def model_inputs(data, limit: int | None = None):
    """The model inputs of `data` (`(x, y)` or `x`; `x` an array, or a dict or list of
    arrays), their first `limit` examples if given."""
    x = data[0] if isinstance(data, (tuple, list)) and len(data) == 2 else data
    if limit is None:
        return x
    if isinstance(x, dict):
        return {k: v[:limit] for k, v in x.items()}
    return [v[:limit] for v in x] if isinstance(x, (tuple, list)) else x[:limit]


def example_count(x) -> int:
    """How many examples the inputs `x` (an array, or a dict or list of arrays) hold."""
    if isinstance(x, dict):
        return len(next(iter(x.values())))
    return len(x[0]) if isinstance(x, (tuple, list)) else len(x)


def labels_of(data):
    """The labels of `data` (`(x, y)` or `x`), or None when it holds inputs only."""
    return data[1] if isinstance(data, (tuple, list)) and len(data) == 2 else None


def take(x, n: int):
    """The first `n` examples of the inputs `x` (an array, a dict or a list of arrays),
    repeated when `x` holds fewer."""
    if isinstance(x, dict):
        return {k: take(v, n) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [take(v, n) for v in x]
    x = np.asarray(x)
    return np.resize(x, (n,) + x.shape[1:]) if len(x) < n else x[:n]


def example_inputs(model, n: int, seed: int = 0):
    """Random inputs shaped and typed like the model's: an array, or the dict or list of
    arrays a model with several inputs takes. Integer inputs (token ids, masks) are 0 or 1,
    valid for any vocabulary."""
    rng = np.random.default_rng(seed)

    def example(spec):
        shape = (n,) + tuple(d or 1 for d in spec.shape[1:])
        if "int" in str(spec.dtype) or "bool" in str(spec.dtype):
            return rng.integers(0, 2, size=shape).astype(spec.dtype)
        return rng.random(shape, dtype=np.float32)

    single = len(model.inputs) == 1  # `model.input` is unset on a Sequential built by shape
    if single:
        return example(model.inputs[0])
    import keras

    return keras.tree.map_structure(example, model.input)
