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

Names are imported on first use, so `import kshrink` stays cheap until Keras is needed (the
command line starts Keras itself, quietly).
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "compress": "kshrink.api",
    "save": "kshrink.artifact",
    "load": "kshrink.artifact",
    "ArtifactError": "kshrink.artifact",
    "Recipe": "kshrink.core.recipe",
    "CompressionReport": "kshrink.core.report",
    "LayerResult": "kshrink.core.report",
    "StepReport": "kshrink.core.report",
    "Select": "kshrink.core.select",
    "Handler": "kshrink.core.technique",
    "StepContext": "kshrink.core.technique",
    "Technique": "kshrink.core.technique",
    "register_technique": "kshrink.core.technique",
    "registered_techniques": "kshrink.core.technique",
    "FineTune": "kshrink.core.training",
    "KshrinkError": "kshrink.errors",
    "export": "kshrink.deploy",
    "ExportReport": "kshrink.deploy",
    "Cluster": "kshrink.cluster",
    "DepthPrune": "kshrink.prune",
    "Fold": "kshrink.fold",
    "LowRank": "kshrink.lowrank",
    "Prune": "kshrink.prune",
    "Quantize": "kshrink.quantize",
    "StructuredPrune": "kshrink.prune",
    "Override": "kshrink.quantize",
}
_SUBMODULES = ("cluster", "datasets", "fold", "lowrank", "measure", "prune", "quantize", "zoo")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


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
