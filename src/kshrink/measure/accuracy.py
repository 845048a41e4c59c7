"""Task accuracy, and fidelity of a compressed model to its original."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np


def predict(model: keras.Model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The model's outputs for `x`, as float32 numpy."""
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float32)


def top1_accuracy(outputs: np.ndarray, y: np.ndarray) -> float:
    """Share of rows whose arg-max output equals the integer label (or one-hot label)."""
    y = np.asarray(y)
    labels = y.argmax(-1) if y.ndim == outputs.ndim else y.reshape(-1)
    return float(np.mean(outputs.argmax(-1).reshape(-1) == labels))


def evaluate(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> dict:
    """Task metrics: top-1 accuracy, plus the model's own compiled metrics if it has any."""
    metrics = {"accuracy": top1_accuracy(predict(model, x, batch_size), y)}
    if model.compiled and model.loss is not None:
        compiled = model.evaluate(x, y, batch_size=batch_size, verbose=0, return_dict=True)
        metrics.update({f"compiled_{k}": float(v) for k, v in compiled.items()})
    return metrics


@dataclasses.dataclass(frozen=True)
class Fidelity:
    """How closely a compressed model's outputs follow the original's on the same inputs.

    Attributes:
        top1_agreement: share of rows where both models' arg-max agree.
        max_abs_diff: largest absolute difference of any output value.
        mean_abs_diff: mean absolute difference.
        cosine: mean cosine similarity of the output rows.
    """

    top1_agreement: float
    max_abs_diff: float
    mean_abs_diff: float
    cosine: float


def fidelity(reference: np.ndarray, outputs: np.ndarray) -> Fidelity:
    """Compares two output arrays of the same shape (e.g. from `predict`)."""
    reference = reference.reshape(len(reference), -1).astype(np.float64)
    outputs = outputs.reshape(len(outputs), -1).astype(np.float64)
    diff = np.abs(reference - outputs)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(outputs, axis=1)
    cosine = np.sum(reference * outputs, axis=1) / np.where(norms == 0, 1, norms)
    cosine = np.where(norms == 0, (diff.max(axis=1) == 0).astype(float), cosine)
    return Fidelity(
        top1_agreement=float(np.mean(reference.argmax(1) == outputs.argmax(1))),
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        cosine=float(cosine.mean()),
    )
