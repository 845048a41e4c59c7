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
"""

from kshrink import datasets, measure, prune, zoo
from kshrink.api import compress
from kshrink.core.recipe import Recipe
from kshrink.core.report import CompressionReport, LayerResult, StepReport
from kshrink.core.select import Select
from kshrink.core.training import FineTune
from kshrink.core.technique import (
    Handler,
    StepContext,
    Technique,
    register_technique,
    registered_techniques,
)
from kshrink.errors import KshrinkError
from kshrink.prune import Prune
from kshrink.quantize import Quantize

__version__ = "0.1.0"

__all__ = [
    "CompressionReport", "FineTune", "Handler", "KshrinkError", "LayerResult", "Prune",
    "Quantize", "Recipe", "Select", "StepContext", "StepReport", "Technique", "compress",
    "datasets", "measure", "prune", "register_technique", "registered_techniques", "zoo",
]
