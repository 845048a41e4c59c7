"""Which layers can take low precision: quantize one layer at a time and measure the damage.

Example:

```python
report = kshrink.analysis.sensitivity(model, (x_val, y_val), mode="int4")
print(report.table().to_text())
keep = report.most_sensitive(2)   # e.g. keep these at int8 with a Quantize override
```
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from kshrink.analysis.search.probes import probe_each
from kshrink.core.data import check_data, example_count, labels_of, model_inputs, split_labels
from kshrink.core.graph import path_of
from kshrink.core.progress import Progress
from kshrink.core.stream import as_stream
from kshrink.core.select import Select
from kshrink.core.options import check_int
from kshrink.core.technique import StepContext
from kshrink.layers import keras_quantizes
from kshrink.measure.accuracy import is_classifier, predict, relative_error, top1_accuracy
from kshrink.quantize.technique import Quantize, skip_reason
from kshrink.render import Table


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
    """The effect of quantizing one layer alone.

    Attributes:
        layer: layer name.
        layer_type: class name.
        accuracy_drop: float accuracy minus accuracy with only this layer quantized, in
            percentage points (None without labels).
        output_error: relative L2 error of the outputs: ||y_q - y|| / ||y||.
    """

    layer: str
    layer_type: str
    accuracy_drop: float | None
    output_error: float


@dataclasses.dataclass(frozen=True)
class SensitivityReport:
    """Layers ranked from most to least sensitive (accuracy drop, then output error)."""

    mode: str
    accuracy: float | None
    layers: tuple[LayerSensitivity, ...]

    def most_sensitive(self, count: int) -> list[str]:
        """The names of the `count` most sensitive layers."""
        return [entry.layer for entry in self.layers[:count]]

    def table(self) -> Table:
        rows = [(e.layer, e.layer_type,
                 "-" if e.accuracy_drop is None else f"{e.accuracy_drop:+.2f}",
                 f"{e.output_error:.4f}") for e in self.layers]
        title = f"sensitivity to {self.mode}, one layer at a time"
        if self.accuracy is not None:
            title += f" (float accuracy {100 * self.accuracy:.2f}%)"
        return Table(title, ("layer", "type", "accuracy drop (pp)", "output error"), rows)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "accuracy": self.accuracy,
                "layers": [dataclasses.asdict(e) for e in self.layers]}


def sensitivity(model: keras.Model, data, *, mode: str = "int8",
                group_size: int | None = 128, samples: int | None = 2000,
                seed: int = 0, progress: Progress | None = None) -> SensitivityReport:
    """Quantizes each quantizable layer of `model` alone and measures what it costs.

    Args:
        model: the float model (not modified).
        data: `(x, y)` or `x` alone (then only the output error is measured), as arrays or
            a stream (`tf.data.Dataset`, `PyDataset`, torch `DataLoader`): its first
            examples are read, at most `samples` (without `samples`, as many as
            `compress` calibrates on: 2,048, or 256 MB).
        mode: the precision to test, as in `Quantize`.
        group_size: int4 only, as in `Quantize`.
        samples: examples drawn from `data` with `seed` (None: all of them).
        seed: the draw; the same seed gives the same report.
        progress: told of each layer as it is measured, e.g. `print` or
            `kshrink.core.progress.Console()`.

    Returns:
        A `SensitivityReport`, most sensitive layer first.
    """
    check_int("sensitivity", "samples", samples, low=1, allow_none=True)
    stream = as_stream(data, model)
    if stream is not None:
        data = stream.head(samples) if samples is not None else stream.head()
    data = split_labels(data, model)
    x, y = model_inputs(data), labels_of(data)
    check_data(data, model)
    count = example_count(x)
    if samples is not None and samples < count:
        chosen = np.sort(np.random.default_rng(seed).choice(count, samples, replace=False))
        x = keras.tree.map_structure(lambda v: np.asarray(v)[chosen], x)
        y = None if y is None else np.asarray(y)[chosen]
    reference = predict(model, x)
    classifier = is_classifier(reference)
    accuracy = top1_accuracy(reference, y) if y is not None and classifier else None
    # Layers inside custom layers too: Keras quantizes those in place.
    candidates = StepContext(original=model).choose_layers(model, None, None, skip_reason,
                                                           in_place=keras_quantizes)
    def measure(outputs):
        drop = None if accuracy is None else 100 * (accuracy - top1_accuracy(outputs, y))
        return drop, relative_error(reference, outputs)

    work = [(path_of(layer), [Quantize(mode=mode, group_size=group_size, keep_int8=False,
                                       layers=Select(names=(path_of(layer),)))])
            for layer in candidates]
    measured = probe_each(model, work, x, measure, progress=progress,
                          title=f"sensitivity at {mode}")
    entries = [LayerSensitivity(path_of(layer), type(layer).__name__,
                                *measured[path_of(layer)]) for layer in candidates]
    entries.sort(key=lambda e: (-(e.accuracy_drop or 0.0), -e.output_error))
    return SensitivityReport(mode, accuracy, tuple(entries))
