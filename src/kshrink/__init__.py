"""kshrink: make trained Keras 3 models smaller, lighter and faster, with measured accuracy.

Example:

```python
import kshrink

model = kshrink.zoo.pretrained("lenet_300_100")
small, report = kshrink.compress(model, [kshrink.Quantize(mode="int8")])
print(report)
data = kshrink.datasets.load("mnist")
print(kshrink.measure.compare(model, small, data.test))
```

`import kshrink` registers kshrink's layer classes with Keras (`kshrink.layers`, which needs
only keras and numpy), so `keras.saving.load_model` reads a quantized model after it; every
other name is imported on first use.
"""

import importlib
import re
import sys

__version__ = "0.1.0"

# What TensorFlow prints when it starts, whatever TF_CPP_MIN_LOG_LEVEL says; nothing to act on.
_STARTUP_NOISE = re.compile(
    r"absl::InitializeLog|oneDNN custom operations|cpu_feature_guard|"
    r"To enable the following instructions|rebuild TensorFlow with"
)


def _start_keras_quietly(run_op: bool = False) -> None:
    """Imports Keras (and with `run_op` starts its backend) without TensorFlow's start-up
    notices."""
    from kshrink._stderr import quiet_stderr

    with quiet_stderr(_STARTUP_NOISE):
        import keras

        if run_op:
            keras.ops.convert_to_numpy(keras.ops.ones((2,)) + 1)


if "keras" not in sys.modules:
    _start_keras_quietly()
from kshrink import layers  # noqa: E402  registers kshrink's layer classes with Keras

_EXPORTS = {
    "compress": "kshrink.api",
    "search": "kshrink.analysis",
    "SearchReport": "kshrink.analysis",
    "Size": "kshrink.analysis",
    "Memory": "kshrink.analysis",
    "Latency": "kshrink.analysis",
    "Macs": "kshrink.analysis",
    "save": "kshrink.io",
    "load": "kshrink.io",
    "ArtifactError": "kshrink.artifact",
    "Recipe": "kshrink.core.recipe",
    "CompressionReport": "kshrink.core.report",
    "LayerResult": "kshrink.core.report",
    "StepReport": "kshrink.core.report",
    "Select": "kshrink.core.select",
    "as_functional": "kshrink.core.graph",
    "Handler": "kshrink.core.technique",
    "Stage": "kshrink.core.technique",
    "StepContext": "kshrink.core.technique",
    "Technique": "kshrink.core.technique",
    "register_technique": "kshrink.core.technique",
    "registered_techniques": "kshrink.core.technique",
    "FineTune": "kshrink.core.training",
    "KshrinkError": "kshrink.errors",
    "export": "kshrink.deploy",
    "ExportReport": "kshrink.deploy",
    "Cluster": "kshrink.cluster",
    "ClusterOverride": "kshrink.cluster",
    "DepthPrune": "kshrink.prune",
    "Fold": "kshrink.fold",
    "LowRank": "kshrink.lowrank",
    "Prune": "kshrink.prune",
    "Quantize": "kshrink.quantize",
    "StructuredPrune": "kshrink.prune",
    "Override": "kshrink.quantize",
}
_SUBMODULES = ("analysis", "cluster", "datasets", "deploy", "fold", "io", "lowrank", "measure",
               "prune", "quantize", "reconstruct", "report", "testing", "zoo")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES) + ["layers"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"kshrink.{name}")
    else:
        raise AttributeError(f"module 'kshrink' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return __all__
