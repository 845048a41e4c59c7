"""The held-out split and the one-layer probes: the loss rise of each level alone."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from kshrink.analysis.search.report import level_text
from kshrink.api import compress
from kshrink.core.data import check_data, example_count, labels_of, model_inputs, split_labels
from kshrink.core.progress import counting
from kshrink.core.stream import as_stream
from kshrink.core.training import task_loss
from kshrink.errors import KshrinkError
from kshrink.measure.accuracy import predict

HELD_OUT = 0.1  # share of `data` held out when no validation_data is given


def split_held_out(model, data, validation_data):
    """`(train, held_out)`, each `(x, y)` arrays: the held-out part is `validation_data`, or
    else the last tenth of `data`. A stream gives its first examples (`Stream.head`): every
    candidate is fine-tuned and judged on the same ones."""
    data, validation_data = (_arrays(data, model), _arrays(validation_data, model))
    for name, part in (("data", data), ("validation_data", validation_data)):
        if part is not None and labels_of(part) is None:
            raise KshrinkError(f"search: {name} must be (x, y) with class labels, to judge "
                               "accuracy; received inputs only")
        check_data(part, model, name)
    if data is None:
        raise KshrinkError("search needs data=(x, y): candidates are fine-tuned and judged on it")
    if validation_data is not None:
        return tuple(data), tuple(validation_data)
    x, y = data
    count = example_count(x)
    held = max(1, int(round(count * HELD_OUT)))
    if count - held < 1:
        raise KshrinkError(f"search: data holds {count} example(s); it needs at least 2, to "
                           "hold some out, or pass validation_data")
    cut = count - held

    def part(sl):
        return keras.tree.map_structure(lambda v: v[sl], x), np.asarray(y)[sl]

    return part(slice(None, cut)), part(slice(cut, None))


def _arrays(data, model):
    stream = as_stream(data, model)
    return split_labels(stream.head() if stream is not None else data, model)


def subset(data, limit: int):
    """The first `limit` examples of `(x, y)`."""
    return model_inputs(data, limit), np.asarray(labels_of(data))[:limit]


def probe_each(model, work, x, measure, *, data=None, fine_tune=None, progress=None,
               title: str = "probing", label=str, seen=None) -> dict:
    """The probe engine of `search` and `sensitivity`: for each `(key, steps)` of `work`,
    `model` compressed by `steps` alone (a recipe; none: left out) on `data`, fine-tuned with
    `fine_tune` if given, and `measure(outputs)` of it on `x`.

    Args:
        label: `key -> str` for the progress line of each probe.
        seen: `(key, model) -> None`, shown each probe's model (e.g. to time it).

    Returns:
        key -> what `measure` returned, for every key with steps.
    """
    measured = {}
    for key, steps in counting(progress, title, work, lambda item: label(item[0])):
        if not steps:
            continue
        alone, _ = compress(model, steps, data=data, fine_tune=fine_tune, fidelity_samples=0,
                            verbose=False)
        if seen is not None:
            seen(key, alone)
        measured[key] = measure(predict(alone, x))
    return measured


def loss_rises(model, space, probe, progress, train, recover=None) -> dict:
    """Per dimension, the held-out loss rise at each level with that one alone compressed
    (calibrated on as many examples of `train` as `probe` holds; or fine-tuned on `train`
    with `recover`, a `FineTune`, if given), made non-decreasing along the levels (a deeper
    level never counts as cheaper)."""
    x, y = probe
    loss = task_loss(model, y)
    base = _loss(loss, y, predict(model, x))
    work = []
    for path, levels in space.choices.items():
        for level in levels:
            steps = space.probe(path, level)
            if steps and recover:  # BatchNorm's moving averages lag a short fine-tune
                steps = [dataclasses.replace(steps[0], reestimate_batchnorm=True), *steps[1:]]
            work.append(((path, level), steps))
    title = "search: probing layers one at a time" + (
        f", each fine-tuned {recover.steps_per_epoch} steps" if recover else "")
    measured = probe_each(
        model, work, x, lambda outputs: max(_loss(loss, y, outputs) - base, 0.0),
        data=train if recover else subset(train, example_count(x)), fine_tune=recover,
        progress=progress, title=title, label=lambda key: f"{key[0]} at {level_text(key[1])}",
        seen=lambda key, alone: space.observe(*key, alone))
    return {path: list(np.maximum.accumulate([measured.get((path, lv), 0.0) for lv in levels]))
            for path, levels in space.choices.items()}


def _loss(loss, y, outputs) -> float:
    return float(keras.ops.convert_to_numpy(loss(y, outputs)))
