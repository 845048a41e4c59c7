"""Task accuracy, and fidelity of a compressed model to its original."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np


# Examples per batch when measuring: at most this many, and at most `BATCH_BYTES` of inputs (a
# batch of 256 224x224 images would make TensorFlow hold several GB of activations).
BATCH_EXAMPLES = 256
BATCH_BYTES = 16 << 20
DIRECT_BATCHES = 4  # up to this many batches, `predict` calls the model itself


def batch_size_for(x) -> int:
    """Examples per batch to run `x` (an array or a structure of arrays) through a model."""
    per_example = sum(v.nbytes // max(len(v), 1) for v in keras.tree.flatten(x)
                      if hasattr(v, "nbytes") and getattr(v, "ndim", 0) > 0)
    return int(max(1, min(BATCH_EXAMPLES, BATCH_BYTES // max(per_example, 1))))


def predict(model: keras.Model, x, batch_size: int | None = None):
    """The model's outputs for `x` as float32 numpy: one array, or for a model with several
    outputs (a dict, say) a list of them in `keras.tree.flatten` order. `batch_size`
    defaults to `batch_size_for(x)`."""
    batch_size = batch_size or batch_size_for(x)
    count = len(keras.tree.flatten(x)[0])
    if keras.backend.backend() != "jax" and count <= DIRECT_BATCHES * batch_size:
        # A few batches: called directly. `predict` first traces a function and builds a
        # tf.data pipeline for each new model, which costs more than the calls themselves
        # (TensorFlow, small CNN, 256 examples: 0.18 s against 0.04 s); kshrink predicts
        # once on each of many new models (probes, calibration). JAX compiles either way.
        batches = [keras.tree.map_structure(lambda v: v[i:i + batch_size], x)
                   for i in range(0, count, batch_size)]
        parts = [keras.tree.flatten(model(b, training=False)) for b in batches]
        outputs = [np.concatenate([keras.ops.convert_to_numpy(p[k]) for p in parts])
                   for k in range(len(parts[0]))]
    else:
        outputs = keras.tree.flatten(model.predict(x, batch_size=batch_size, verbose=0))
    outputs = [np.asarray(o, dtype=np.float32) for o in outputs]
    return outputs[0] if len(outputs) == 1 else outputs


def is_classifier(outputs) -> bool:
    """One output of shape (examples, classes), classes >= 2: arg-max is a class."""
    return isinstance(outputs, np.ndarray) and outputs.ndim == 2 and outputs.shape[1] >= 2


def top1_accuracy(outputs: np.ndarray, y: np.ndarray) -> float:
    """Share of rows whose arg-max output equals the integer label (or one-hot label)."""
    y = np.asarray(y)
    labels = y.argmax(-1) if y.ndim == outputs.ndim else y.reshape(-1)
    return float(np.mean(outputs.argmax(-1).reshape(-1) == labels))


def evaluate(model: keras.Model, x, y, batch_size: int | None = None) -> dict:
    """Task metrics: top-1 accuracy for a classifier, plus the model's own compiled metrics if
    it has any. A model that is not a classifier (an encoder, a regressor) has no accuracy:
    compare it by `fidelity` instead."""
    metrics = {}
    batch_size = batch_size or batch_size_for(x)
    outputs = predict(model, x, batch_size)
    if is_classifier(outputs):
        metrics["accuracy"] = top1_accuracy(outputs, y)
    if model.compiled and model.loss is not None:
        compiled = model.evaluate(x, y, batch_size=batch_size, verbose=0, return_dict=True)
        # Its own "accuracy" is the top-1 accuracy above again (for sparse labels).
        metrics.update({f"compiled_{k}": float(v) for k, v in compiled.items()
                        if not (k == "accuracy" and "accuracy" in metrics)})
    return metrics


@dataclasses.dataclass(frozen=True)
class Fidelity:
    """How closely a compressed model's outputs follow the original's on the same inputs.

    Attributes:
        top1_agreement: share of rows where both models' arg-max agree; None unless the
            model is a classifier (`is_classifier`).
        max_abs_diff: largest absolute difference of any output value.
        mean_abs_diff: mean absolute difference.
        cosine: mean cosine similarity of the output rows (all outputs of an example
            together).
    """

    top1_agreement: float | None
    max_abs_diff: float
    mean_abs_diff: float
    cosine: float


def fidelity(reference, outputs) -> Fidelity:
    """Compares two models' outputs on the same inputs, as `predict` gives them (an array, or
    a list of arrays of the same shapes)."""
    agreement = None
    if is_classifier(reference):
        agreement = float(np.mean(reference.argmax(1) == outputs.argmax(1)))
    reference, outputs = _rows(reference), _rows(outputs)
    diff = np.abs(reference - outputs)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(outputs, axis=1)
    cosine = np.sum(reference * outputs, axis=1) / np.where(norms == 0, 1, norms)
    cosine = np.where(norms == 0, (diff.max(axis=1) == 0).astype(float), cosine)
    return Fidelity(
        top1_agreement=agreement,
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        cosine=float(cosine.mean()),
    )


def relative_error(reference, outputs) -> float:
    """`||outputs - reference|| / ||reference||` over every value of every output (arrays,
    or lists of arrays as `predict` gives them): kshrink's one measure of how far a changed
    layer or model computes from the original."""
    reference, outputs = _rows(reference), _rows(outputs)
    return float(np.linalg.norm(outputs - reference) / max(np.linalg.norm(reference), 1e-12))


def _rows(outputs) -> np.ndarray:
    """One row per example of every output value, float64."""
    parts = keras.tree.flatten(outputs)
    return np.concatenate([np.asarray(keras.ops.convert_to_numpy(p), dtype=np.float64)
                           .reshape(len(p), -1) for p in parts], axis=1)
