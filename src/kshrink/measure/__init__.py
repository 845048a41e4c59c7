"""Honest measurement: weights, MACs, file size, load time and memory, latency, accuracy,
fidelity.

Each function returns a dataclass; `compare` puts an original and a compressed model side by
side in one table, measured in the same run.
"""

from kshrink.measure.accuracy import Fidelity, evaluate, fidelity, predict, top1_accuracy
from kshrink.measure.compare import (
    Comparison,
    Measurement,
    compare,
    evaluate_data,
    example_inputs,
    measure,
)
from kshrink.measure.files import FileSize, file_size
from kshrink.measure.latency import Latency, latency
from kshrink.measure.load import LoadCost, load_cost
from kshrink.measure.macs import MacStats, layer_macs, macs
from kshrink.measure.weights import LayerWeights, WeightStats, weight_drift, weight_stats

__all__ = [
    "Comparison", "FileSize", "Fidelity", "LayerWeights", "Latency", "LoadCost", "MacStats",
    "Measurement", "WeightStats", "compare", "evaluate", "evaluate_data", "example_inputs",
    "fidelity",
    "file_size", "latency", "layer_macs", "load_cost", "macs", "measure", "predict",
    "top1_accuracy", "weight_drift", "weight_stats",
]
