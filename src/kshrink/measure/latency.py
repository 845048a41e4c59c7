"""Inference latency and throughput at fixed batch sizes."""

from __future__ import annotations

import dataclasses
import time

import keras
import numpy as np


@dataclasses.dataclass(frozen=True)
class Latency:
    """Attributes: batch_size; median_ms and p95_ms per batch; throughput in samples/s."""

    batch_size: int
    median_ms: float
    p95_ms: float
    throughput: float


def latency(model: keras.Model, x: np.ndarray, *, batch_sizes=(1, 32), warmup: int = 5,
            runs: int = 50) -> list[Latency]:
    """Times `model.predict_on_batch` (Keras' compiled predict step) on slices of `x`.

    Each batch size is warmed up (tracing/compilation excluded), then timed `runs` times.

    Args:
        model: the model to time.
        x: example inputs; batches are its first `batch_size` rows (repeated if too few).
        batch_sizes: the batch sizes to time.
        warmup: untimed calls before timing.
        runs: timed calls; median and 95th percentile are reported.
    """
    results = []
    for batch_size in batch_sizes:
        batch = np.resize(x, (batch_size,) + x.shape[1:]) if len(x) < batch_size else x[:batch_size]
        for _ in range(warmup):
            model.predict_on_batch(batch)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model.predict_on_batch(batch)
            times.append(time.perf_counter() - start)
        median = float(np.median(times))
        results.append(Latency(batch_size, median * 1e3, float(np.percentile(times, 95)) * 1e3,
                               batch_size / median))
    return results
