"""Everything measured for one model, or for an original and its compressed version side by side."""

from __future__ import annotations

import dataclasses
import inspect
import json
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from kshrink.core.classes import is_user_class, model_classes, probe_imports
from kshrink.core.data import (
    check_data,
    example_inputs,
    labels_of,
    model_inputs,
    split_labels,
)
from kshrink.core.stream import as_stream
from kshrink.errors import MeasurementError
from kshrink.measure.accuracy import (
    Fidelity,
    evaluate,
    fidelity,
    is_classifier,
    predict,
    top1_accuracy,
)
from kshrink.artifact import save as save_compact
from kshrink.core.graph import copy_model
from kshrink.measure.files import FileSize, file_size, optimizer_state_bytes
from kshrink.measure.latency import Latency, latency, latency_in_turns
from kshrink.measure.load import LoadCost, load_cost
from kshrink.measure.macs import macs
from kshrink.measure.weights import WeightStats, weight_stats
from kshrink.render import Table, faster, smaller

Progress = Callable[[str], None]
# Bytes of optimizer state a compiled, untrained model's file holds (its step count and
# learning rate): below this, a file is measured as it is.
OPTIMIZER_NOISE = 1024


@dataclasses.dataclass(frozen=True)
class Measurement:
    """What one model costs: weights, MACs, file, load, latency and (with data) accuracy."""

    weights: WeightStats
    macs: int | None  # None: it depends on a length only known at run time (give data)
    file: FileSize
    load: LoadCost | None  # None: not measured
    latency: tuple[Latency, ...]
    metrics: dict | None
    compact_bytes: int | None = None  # the model as a compact `.kshrink` file

    def table(self) -> Table:
        return _table(self, None, None)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["weights"] = self.weights.to_dict()
        return d


@dataclasses.dataclass(frozen=True)
class Comparison:
    """An original and a compressed model measured in the same run."""

    original: Measurement
    compressed: Measurement
    fidelity: Fidelity | None

    def table(self) -> Table:
        return _table(self.original, self.compressed, self.fidelity)

    def summary(self) -> Table:
        """The card a person reads first: size on disk in each format, weights, accuracy or
        agreement, latency, and a one-line verdict as its title."""
        a, b = self.original, self.compressed
        mb = lambda v: f"{v / 1e6:.3f} MB"
        before, suffix = Path(a.file.path).suffix, Path(b.file.path).suffix
        formats = suffix if before == suffix else f"{before} -> {suffix}"
        rows = [(f"file ({formats})", mb(a.file.bytes), mb(b.file.bytes),
                 smaller(a.file.bytes, b.file.bytes))]
        if a.compact_bytes and b.compact_bytes and suffix != ".kshrink":
            rows.append(("compact file (.kshrink)", mb(a.compact_bytes), mb(b.compact_bytes),
                         smaller(a.compact_bytes, b.compact_bytes)))
        rows.append(("weights in memory", mb(a.weights.bytes), mb(b.weights.bytes),
                     smaller(a.weights.bytes, b.weights.bytes)))
        quality = None
        if a.metrics and b.metrics and "accuracy" in a.metrics:
            change = (b.metrics["accuracy"] - a.metrics["accuracy"]) * 100
            rows.append(("accuracy", f"{a.metrics['accuracy']:.4f}",
                         f"{b.metrics['accuracy']:.4f}", f"{change:+.2f} pp"))
            quality = f"accuracy {change:+.2f} pp"
        elif self.fidelity is not None:
            measure, value = (("top-1 agreement", self.fidelity.top1_agreement)
                              if self.fidelity.top1_agreement is not None
                              else ("output cosine", self.fidelity.cosine))
            rows.append((measure, "", f"{value:.4f}", ""))
            quality = f"{measure} {value:.4f}"
        ta, tb = a.latency[0], b.latency[0]
        speed = faster(ta.median_ms, tb.median_ms, ta.spread_ms, tb.spread_ms)
        rows.append((f"latency, batch {ta.batch_size}", f"{ta.median_ms:.2f} ms",
                     f"{tb.median_ms:.2f} ms", speed))
        best = min((b.file.bytes, suffix), ((b.compact_bytes or b.file.bytes), ".kshrink"))
        verdict = [f"{smaller(a.file.bytes, best[0])} on disk (as {best[1]})"]
        verdict += [quality] if quality else []
        verdict.append(f"latency: {speed}")
        return Table("summary: " + ", ".join(verdict), ("", "original", "compressed",
                                                         "change"), rows)

    def to_dict(self) -> dict:
        return {
            "original": self.original.to_dict(),
            "compressed": self.compressed.to_dict(),
            "fidelity": dataclasses.asdict(self.fidelity) if self.fidelity else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        return f"{self.summary().to_text()}\n\n{self.table().to_text()}"

    def to_markdown(self) -> str:
        return f"{self.summary().to_markdown()}\n\n{self.table().to_markdown()}"

    __str__ = to_text


def measure(model: keras.Model, data=None, *, path=None, load_runs: int = 3,
            latency_runs: int = 50, progress: Progress | None = None,
            custom_objects: dict | None = None) -> Measurement:
    """Measures one model.

    Args:
        model: the model in memory.
        data: `(x, y)` to evaluate on (or `x` alone: no accuracy), a dataset or PyDataset
            (accuracy over all of it, latency on its first examples), or None (latency then
            uses random inputs).
        path: its saved `.keras` or `.kshrink` file; if None it is saved to a temporary
            `.keras` file first. A `.keras` file that holds optimizer state (a trained,
            compiled model) is measured as a temporary copy without it, and the table says
            how much was left out: the model does not need it.
        load_runs: fresh processes for load time and memory (median reported); 0: not
            measured.
        latency_runs: timed calls per batch size.
        progress: called with a short message before each phase.
        custom_objects: the user's classes the saved file needs beyond those `model` is made
            of (a custom loss or metric it was compiled with), by name. The fresh processes
            import the modules of these and of the model's own custom layers; a class defined
            in `__main__` cannot be imported there, and load cost is then not measured (with
            a warning).
    """
    say = progress or (lambda message: None)
    data = _Data(data, model)
    untimed = _untimed(model, data, path, load_runs, say, custom_objects)
    say("latency")
    x = model_inputs(data.sample) if data.sample is not None else example_inputs(model, 32)
    return dataclasses.replace(untimed, latency=tuple(latency(model, x, runs=latency_runs)))


def _untimed(model, data, path, load_runs: int, say, custom_objects) -> Measurement:
    """Everything but latency."""
    classes = {**model_classes(model), **{name: cls for name, cls in
                                          (custom_objects or {}).items()
                                          if inspect.isclass(cls) and is_user_class(cls)}}
    with tempfile.TemporaryDirectory(prefix="kshrink-") as tmp:
        optimizer_bytes = 0
        if path is not None and Path(path).suffix == ".keras":
            optimizer_bytes = optimizer_state_bytes(path)
            if optimizer_bytes > OPTIMIZER_NOISE:  # not what the model needs: measure without
                path = None
        if path is None:
            path = Path(tmp) / "model.keras"
            copy_model(model).save(path)  # uncompiled: no optimizer state in the file
        load = None
        why_not = probe_imports(classes.values())[2]
        if why_not and load_runs:
            warnings.warn(f"load time and memory of {Path(path).name} not measured: {why_not}",
                          stacklevel=3)
        elif load_runs:
            say(f"load time and memory of {Path(path).name} ({load_runs} fresh processes)")
            loader = "kshrink" if Path(path).suffix == ".kshrink" else "keras"
            load = load_cost(path, runs=load_runs, loader=loader, classes=classes.values())
        size = dataclasses.replace(file_size(path), optimizer_bytes=optimizer_bytes)
        compact_bytes = _compact_bytes(model, Path(path), Path(tmp) / "model.kshrink")
    metrics = None
    if labels_of(data.sample) is not None:
        say("accuracy")
        metrics = data.evaluate(model)
    counted = macs(model, _sequence_length(model, data.sample))
    # A total that leaves out the layers whose length is unknown would mislead: none.
    total = None if counted.unknown else counted.total
    return Measurement(weight_stats(model), total, size, load, (), metrics, compact_bytes)


def _sequence_length(model, sample) -> int | None:
    """The length of the run-time dimension (a transformer's sequence) in `sample`, if the
    model's first input leaves it open."""
    if sample is None:
        return None
    spec = model.inputs[0].shape
    if len(spec) < 2 or spec[1] is not None:
        return None
    first = keras.tree.flatten(model_inputs(sample))[0]
    return int(first.shape[1]) if getattr(first, "ndim", 0) >= 2 else None


def _compact_bytes(model, path: Path, scratch: Path) -> int | None:
    """The size of `model` as a compact file: `path` if it is one, else written to `scratch`
    (None for a model the compact format cannot hold)."""
    if path.suffix == ".kshrink":
        return path.stat().st_size
    try:
        save_compact(model, scratch)
    except Exception:  # e.g. a layer class the format cannot name; the rest still measures
        return None
    return scratch.stat().st_size


def compare(original: keras.Model, compressed: keras.Model, data=None, *, original_path=None,
            compressed_path=None, load_runs: int = 3, latency_runs: int = 50,
            progress: Progress | None = None, custom_objects: dict | None = None) -> Comparison:
    """Measures both models in the same run and puts them side by side, with ratios.

    Latency is timed in alternating rounds of the two models. A time that changed by less
    than the run-to-run spread (or by under 5%) is shown as "no measurable change".

    Args:
        original: the model before compression.
        compressed: the model after.
        data: evaluation data as `measure` takes it, or None (then no accuracy or
            fidelity; fidelity is measured on at most the first 2,048 examples).
        original_path, compressed_path: their saved files, if already saved.
        load_runs, latency_runs, progress, custom_objects: as in `measure`.

    Example:

    ```python
    print(kshrink.measure.compare(model, small, (x_test, y_test)))
    ```
    """
    say = progress or (lambda message: None)
    data = _Data(data, original)
    a = _untimed(original, data, original_path, load_runs, say, custom_objects)
    b = _untimed(compressed, data, compressed_path, load_runs, say, custom_objects)
    say("latency, both models in turns")
    inputs = [model_inputs(data.sample) if data.sample is not None else example_inputs(m, 32)
              for m in (original, compressed)]
    ta, tb = latency_in_turns([original, compressed], inputs, runs=latency_runs)
    fid = None
    if data.sample is not None:
        x = model_inputs(data.sample)
        fid = fidelity(predict(original, x), predict(compressed, x))
    return Comparison(dataclasses.replace(a, latency=tuple(ta)),
                      dataclasses.replace(b, latency=tuple(tb)), fid)


class _Data:
    """What measurement reads of `data`: `sample`, arrays for latency and fidelity (a
    stream's first examples), and `evaluate`, accuracy over all of it."""

    def __init__(self, data, model):
        data = split_labels(data, model)
        self.stream = as_stream(data, model)
        if self.stream is not None and self.stream.once:
            raise MeasurementError("measurement reads its data more than once; a generator "
                                   "can be read only once: pass a dataset or arrays")
        self.sample = self.stream.head() if self.stream is not None else data
        check_data(self.sample, model)

    def evaluate(self, model) -> dict:
        if self.stream is None:
            return evaluate(model, model_inputs(self.sample), labels_of(self.sample))
        correct = total = 0
        for batch in self.stream.batches():
            x, y = batch[0], np.asarray(batch[1])
            outputs = predict(model, x)
            if not is_classifier(outputs):
                return {}
            correct += top1_accuracy(outputs, y) * len(y)
            total += len(y)
        return {"accuracy": correct / total}


def evaluate_data(model: keras.Model, data) -> dict:
    """Task metrics of `model` over `data` in any form `measure` takes (`{}` without labels
    or for a model that is not a classifier)."""
    data = _Data(data, model)
    return data.evaluate(model) if labels_of(data.sample) is not None else {}


def _table(a: Measurement, b: Measurement | None, fid: Fidelity | None) -> Table:
    rows = []

    def row(label, va, vb, fmt, change=None):
        show = lambda v: "-" if v is None else fmt(v)
        cells = [label, show(va)]
        if b is not None:
            cells += [show(vb), change(va, vb) if change and None not in (va, vb) else ""]
        rows.append(cells)

    mb = lambda v: f"{v / 1e6:.3f} MB"
    row("parameters", a.weights.parameters, b and b.weights.parameters, "{:,}".format)
    row("non-zero parameters", a.weights.nonzeros, b and b.weights.nonzeros, "{:,}".format)
    row("weight bytes", a.weights.bytes, b and b.weights.bytes, mb, smaller)
    row("MACs per example", a.macs, b and b.macs, "{:,}".format, smaller)
    row("file size", a.file.bytes, b and b.file.bytes, mb, smaller)
    row("file size, deflated", a.file.deflated, b and b.file.deflated, mb, smaller)
    if a.compact_bytes is not None:
        row("compact file (.kshrink)", a.compact_bytes, b and b.compact_bytes, mb, smaller)
    if a.file.optimizer_bytes or (b is not None and b.file.optimizer_bytes):
        row("optimizer state, left out of the file", a.file.optimizer_bytes,
            b and b.file.optimizer_bytes, mb)
    if a.load is not None and (b is None or b.load is not None):
        row("load time", a.load.seconds, b and b.load.seconds,
            lambda v: f"{v * 1e3:.0f} ms",
            b and (lambda x, y: faster(x, y, a.load.seconds_range, b.load.seconds_range)
                   if min(a.load.runs, b.load.runs) >= 3 else "too few runs to tell"))
        row("load memory, peak", a.load.peak_bytes, b and b.load.peak_bytes, mb, smaller)
        row("load memory, resident", a.load.resident_bytes, b and b.load.resident_bytes, mb,
            smaller)
    for i, t in enumerate(a.latency):
        tb = b.latency[i] if b is not None else None
        row(f"latency, batch {t.batch_size} (median)", t.median_ms, tb and tb.median_ms,
            lambda v: f"{v:.2f} ms",
            tb and (lambda x, y, t=t, tb=tb: faster(x, y, t.spread_ms, tb.spread_ms)))
        row(f"latency, batch {t.batch_size} (p95)", t.p95_ms, tb and tb.p95_ms,
            lambda v: f"{v:.2f} ms")
    last = a.latency[-1]
    row(f"throughput, batch {last.batch_size}", last.throughput,
        b and b.latency[-1].throughput, lambda v: f"{v:,.0f}/s")
    if a.metrics is not None:
        for key, va in a.metrics.items():
            row(key, va, b and b.metrics.get(key), lambda v: f"{v:.4f}",
                lambda x, y: f"{(y - x) * 100:+.2f} pp" if "acc" in key else f"{y - x:+.4f}")
    if fid is not None and fid.top1_agreement is not None:
        rows.append(["top-1 agreement with original", "", f"{fid.top1_agreement:.4f}", ""])
    if fid is not None:
        rows.append(["max |output difference|", "", f"{fid.max_abs_diff:.2e}", ""])
        rows.append(["cosine similarity of outputs", "", f"{fid.cosine:.6f}", ""])
    columns = ("", "original", "compressed", "change") if b is not None else ("", "model")
    return Table("measurements", columns, rows)

