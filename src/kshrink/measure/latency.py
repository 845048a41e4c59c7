"""Inference latency and throughput at fixed batch sizes, with the run-to-run spread."""

from __future__ import annotations

import dataclasses
import time

import keras
import numpy as np

from kshrink.core.data import take
from kshrink.errors import MeasurementError


@dataclasses.dataclass(frozen=True)
class Latency:
    """One model at one batch size.

    Attributes:
        batch_size: examples per call.
        median_ms, p95_ms: per call.
        throughput: examples per second at the median.
        spread_ms: the 25th and 75th percentiles per call: a change of the median inside
            both models' spreads is noise, not a result.
    """

    batch_size: int
    median_ms: float
    p95_ms: float
    throughput: float
    spread_ms: tuple[float, float] = (0.0, 0.0)


def latency(model: keras.Model, x: np.ndarray, *, batch_sizes=(1, 32), warmup: int = 5,
            runs: int = 50) -> list[Latency]:
    """Times `model.predict_on_batch` (Keras' compiled predict step) on slices of `x`.

    Each batch size is warmed up (tracing/compilation excluded), then timed `runs` times.

    Args:
        model: the model to time.
        x: example inputs (an array, or a dict or list of arrays for a model with several);
            batches are its first `batch_size` rows (repeated if too few).
        batch_sizes: the batch sizes to time.
        warmup: untimed calls before timing.
        runs: timed calls; median, 95th percentile and spread are reported.
    """
    return latency_in_turns([model], [x], batch_sizes=batch_sizes, warmup=warmup,
                            runs=runs)[0]


def latency_in_turns(models: list, inputs: list, *, batch_sizes=(1, 32), warmup: int = 5,
                     runs: int = 50, rounds: int = 5) -> list[list[Latency]]:
    """Times several models in alternating rounds, so a slow spell of the machine falls on
    all of them alike: one list of `Latency` per model, as `latency` gives."""
    if not isinstance(runs, int) or runs < 1:
        raise MeasurementError(f"runs must be a positive integer. Received: runs={runs!r}")
    results = [[] for _ in models]
    for batch_size in batch_sizes:
        batches = [take(x, batch_size) for x in inputs]
        for model, batch in zip(models, batches):
            for _ in range(warmup):
                model.predict_on_batch(batch)
        times = [[] for _ in models]
        per_round = [runs // rounds + (r < runs % rounds) for r in range(rounds)]
        for count in per_round:
            for i, (model, batch) in enumerate(zip(models, batches)):
                for _ in range(count):
                    start = time.perf_counter()
                    model.predict_on_batch(batch)
                    times[i].append(time.perf_counter() - start)
        for i, samples in enumerate(times):
            ms = np.asarray(samples) * 1e3
            median = float(np.median(ms))
            results[i].append(Latency(batch_size, median, float(np.percentile(ms, 95)),
                                      batch_size / median * 1e3,
                                      (float(np.percentile(ms, 25)),
                                       float(np.percentile(ms, 75)))))
    return results
