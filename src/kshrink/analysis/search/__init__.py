"""`search`: the per-layer recipe that compresses a model most within an accuracy budget.

How (sensitivity-guided greedy allocation, after NetAdapt, AMC and HAQ):

1. **Hold out** `validation_data`, or else the last 10% of `data`; the search fine-tunes on
   the rest and judges every candidate on the held-out examples.
2. **Probe each layer alone**: every level of the search space (a sparsity, an encoding: a
   cluster count or a bit width, a residual block removed, a channel ratio) is applied alone
   through `compress`, calibrated on training examples, and the rise of the held-out loss
   is measured; for `latency`, the probe's model is timed too,
   which makes the table of what each level saves (NetAdapt). Sparsities and bit widths are
   probed at once, without training. Blocks and channels removed are fine-tuned for
   `probe_steps` first (NetAdapt's short-term fine-tune): one-shot, the loss a structural
   change causes says little of what fine-tuning recovers (the residual CNN's first block
   removed rose the loss most at once, and lost least after fine-tuning).
3. **Allocate greedily**: from every layer at its first level, take again and again the move
   (one layer to a deeper level) that saves the most of the objective per unit of loss it
   costs. The moves in that order make a path from the least to the most compressed model.
4. **Bisect the path**: a candidate is a point on the path, compressed with its recipe and
   fine-tuned for `epochs` from the original (distilling from it), then measured: objective
   and held-out accuracy. The smallest candidate within `max_accuracy_drop` wins; each round
   looks halfway (in the estimated objective, on a log scale) between the deepest point
   within the budget and the first one found outside it. When the two are next to each
   other, the move between them is ruled out, the path planned again from the deepest point
   within the budget without it, and the new path's first move tried next.

The winner's recipe is plain data: `compress(model, report.recipe, data=...)` (or `kshrink
compress --recipe`) on the same training examples (the first `report.training_examples` of
`data`) gives the same weights, since the recipe's fine-tune seeds the random generators.

Example:

```python
small, report = kshrink.search(model, (x, y), objective="size", max_accuracy_drop=0.3,
                               epochs=2)
print(report.to_text())
print(report.recipe.to_yaml())
fast, report = kshrink.search(model, (x, y), objective=kshrink.Latency(runtime="onnx"),
                              max_accuracy_drop=1.0)
```
"""

from __future__ import annotations

import dataclasses
import math
import time

import keras
import numpy as np

from kshrink.analysis.search.objectives import (OBJECTIVES, Latency, Macs, Memory, Objective,
                                                Size, objective_from)
from kshrink.analysis.search.planner import Plan
from kshrink.analysis.search.probes import loss_rises, split_held_out, subset
from kshrink.analysis.search.report import Candidate, SearchReport, describe
from kshrink.analysis.search.spaces import templates_for
from kshrink.api import compress
from kshrink.core.data import example_count, model_inputs
from kshrink.core.graph import copy_model
from kshrink.core.progress import Message, Progress, within
from kshrink.core.options import (MAX_BATCH, MAX_EPOCHS, MAX_SEED, MAX_STEPS, check_int,
                                  check_range)
from kshrink.core.recipe import Recipe
from kshrink.core.training import FineTune
from kshrink.errors import KshrinkError
from kshrink.measure.accuracy import is_classifier, predict, top1_accuracy
from kshrink.measure.weights import weight_stats

__all__ = ["search", "Objective", "Size", "Memory", "Latency", "Macs", "OBJECTIVES",
           "SearchReport", "Candidate"]


def search(model: keras.Model, data, *, objective: str | Objective = "size",
           max_accuracy_drop: float = 1.0, validation_data=None,
           fine_tune: FineTune | None = None, rounds: int = 6, probe_samples: int = 2000,
           probe_steps: int = 100, techniques=None, progress: Progress | None = None,
           epochs: int | None = None, batch_size: int | None = None,
           learning_rate: float | None = None, seed: int | None = None,
           latency_batch_size: int | None = None, latency_runtime: str | None = None,
           channels: str | None = None):
    """Searches per-layer compression levels for the smallest (or fastest) model within an
    accuracy budget.

    Args:
        model: the float model (not modified).
        data: `(x, y)` with class labels: arrays (`x` may be a dict by input name, or a list
            of one array per input), or a stream (`tf.data.Dataset`, `PyDataset`, torch
            `DataLoader`), of which the first 2,048 examples (at most 256 MB) are read and
            searched on as arrays: every candidate is fine-tuned and judged on the same
            examples.
        objective: what to make smaller, an objective config or its name (the config with
            its defaults): `Size()` (`"size"`): bytes of the compact `.kshrink` file,
            searched over per-layer sparsity (`prune`, 0 to 98%) and per-layer weight
            encoding: float, or 256 to 4 shared values (`cluster`), or int8/int4
            (`quantize`); `Memory()`: bytes of the weights held in memory, searched over
            float/int8/int4 per layer (int4 in groups of 128 inputs; quantization-aware
            training when the search fine-tunes); `Latency(batch_size=1, runtime="keras",
            channels="uniform")`: the median time of a forward pass on this machine, in
            Keras or in the runtime named, searched over removing each residual block
            (`depth_prune`) and a share of the channels (`structured_prune`, 0 to 75%),
            BatchNorm folded; `Macs(channels="uniform")`: the same space, counted in
            multiply-accumulates per example. See each class for its options.
        max_accuracy_drop: the budget: percentage points of held-out top-1 accuracy the
            result may lose.
        validation_data: the held-out `(x, y)`; default: the last 10% of `data`, and the
            candidates fine-tune on the rest. Best: examples the model was never trained on;
            ones it was trained on flatter the original, so the budget turns down candidates
            that would keep its test accuracy.
        fine_tune: how every candidate is fine-tuned (per step), a `kshrink.FineTune`;
            default: `FineTune(epochs=2, batch_size=128, learning_rate=1e-3, distill=True,
            seed=0)`, distilling from the original, or the one its shorthands below give.
        rounds: candidates compressed and measured at most.
        probe_samples: held-out examples the one-layer probes measure the loss on.
        probe_steps: optimizer steps (at most an epoch) each probe that removes a block or
            channels is fine-tuned for before its loss is measured, as the candidates are;
            0, or no fine-tuning: measured at once. Sparsity and bit-width probes are always
            measured at once.
        techniques: what the search may use, each a name, `{name: options}` or a
            technique config, e.g. `["prune", "cluster", "quantize"]` or
            `[kshrink.Prune(method="sparsegpt", schedule="one_shot"), "cluster"]`. The
            search sets each one's level (prune's sparsity, cluster's clusters, quantize's
            mode, structured_prune's ratio, depth_prune's blocks), its layers and its
            schedule; every other option is the one given (the layers it `exclude`s, or
            leaves out of its `layers`, are not searched). Default: `prune` and `cluster`
            for size, `quantize` for memory, `depth_prune` and `structured_prune` (keeping
            multiples of 4 channels) for latency and macs.
        progress: told of each probe and each round, e.g. `print` or
            `kshrink.core.progress.Console()`.
        epochs, batch_size, learning_rate, seed: shorthands for the default fine-tune's
            options: `epochs=0` is post-training only; the same seed and data give the
            same result.
        latency_batch_size, latency_runtime, channels: shorthands with an objective's name:
            `objective="latency", latency_runtime="onnx"` is
            `objective=Latency(runtime="onnx")`.

    Returns:
        `(model, SearchReport)`: the chosen candidate's model (the original, copied, when
        none kept the budget: `report.chosen` is then None) and the report.
    """
    objective = objective_from(objective, latency_batch_size, latency_runtime, channels)
    check_range("search", "max_accuracy_drop", max_accuracy_drop, 0.0, 100.0)
    fine_tune = _fine_tune(fine_tune, epochs, batch_size, learning_rate, seed)
    check_int("search", "rounds", rounds, low=1, high=MAX_EPOCHS)
    check_int("search", "probe_samples", probe_samples, low=1, high=MAX_BATCH)
    check_int("search", "probe_steps", probe_steps, low=0, high=MAX_STEPS)
    templates = templates_for(objective, techniques)
    train, held = split_held_out(model, data, validation_data)
    x_held, y_held = held
    reference = predict(model, x_held)
    if not is_classifier(reference):
        raise KshrinkError("search keeps a top-1 accuracy budget, so the model must output "
                           f"class scores. Received: outputs of shape {np.shape(reference)}")
    space = objective.space(model, templates, x_held, trains=fine_tune is not None)
    if not space.choices:
        raise KshrinkError(f"search: no layer of {model.name!r} can be compressed for "
                           f"{objective.name}")
    accuracy = top1_accuracy(reference, y_held)
    probe = subset(held, probe_samples)
    recover = None
    if fine_tune is not None and probe_steps and space.probes_recover:
        per_epoch = math.ceil(example_count(model_inputs(train)) / fine_tune.batch_size)
        recover = dataclasses.replace(fine_tune, epochs=1, verbose=False,
                                      steps_per_epoch=min(probe_steps, per_epoch))
    rise = loss_rises(model, space, probe, progress, train, recover)
    plan = Plan(space, rise)
    candidates, chosen, kept = [], None, None  # kept: the chosen candidate's model
    for round_ in range(1, rounds + 1):
        levels = plan.next()
        if levels is None:
            break
        recipe = Recipe(space.recipe(levels, trains=fine_tune is not None), fine_tune)
        say = within(progress, f"search: round {round_}/{rounds}")
        if say:
            say(Message(f"{describe(levels)} ({space.estimate_text(levels)})", result=True))
        started = time.perf_counter()
        small, _ = compress(model, recipe, data=train, fidelity_samples=0, progress=say,
                            fine_tune=fine_tune and dataclasses.replace(fine_tune,
                                                                         verbose=False),
                            verbose=False)
        measured = top1_accuracy(predict(small, x_held), y_held)
        candidate = Candidate(levels, recipe, space.measure(small), measured,
                              100 * (accuracy - measured) <= max_accuracy_drop + 1e-9,
                              time.perf_counter() - started)
        candidates.append(candidate)
        if say:
            say(Message(f"{candidate.objective:,} {objective.unit}, accuracy "
                        f"{100 * measured:.2f}% "
                        f"({100 * (measured - accuracy):+.2f} pp): "
                        + ("within" if candidate.within_budget else "outside") + " the budget",
                        result=True))
        plan.tell(candidate.within_budget)
        if candidate.within_budget and (
                chosen is None or candidate.objective < candidates[chosen].objective):
            chosen, kept = len(candidates) - 1, small
    report = SearchReport(
        objective=objective.name, max_accuracy_drop=max_accuracy_drop, accuracy=accuracy,
        original_objective=space.measure(model), float_bytes=weight_stats(model).bytes,
        training_examples=example_count(model_inputs(train)),
        held_out_examples=example_count(x_held),
        loss_rise={p: tuple(zip(space.choices[p], r)) for p, r in rise.items()},
        candidates=tuple(candidates),
        chosen=chosen, probe_steps=recover.steps_per_epoch if recover else 0,
        latency_runtime=objective.runtime)
    return (copy_model(model) if kept is None else kept), report


def _fine_tune(fine_tune, epochs, batch_size, learning_rate, seed) -> FineTune | None:
    """How every candidate is fine-tuned: `fine_tune` as given, or the default one with the
    options its shorthands set; None: post-training only (`epochs=0`)."""
    given = {key: value for key, value in (("epochs", epochs), ("batch_size", batch_size),
                                           ("learning_rate", learning_rate), ("seed", seed))
             if value is not None}
    if fine_tune is not None:
        if not isinstance(fine_tune, FineTune):
            raise KshrinkError("search: fine_tune must be a kshrink.FineTune, or None. "
                               f"Received: {type(fine_tune).__name__}")
        if given:
            raise KshrinkError(f"search: fine_tune is a config; set {', '.join(given)} on it, "
                               "not as keywords of search")
        return fine_tune
    options = {"epochs": 2, "batch_size": 128, "learning_rate": 1e-3, "seed": 0, **given}
    check_int("search", "epochs", options["epochs"], low=0, high=MAX_EPOCHS)
    check_int("search", "batch_size", options["batch_size"], low=1, high=MAX_BATCH)
    check_range("search", "learning_rate", options["learning_rate"], 1e-9, 10.0)
    check_int("search", "seed", options["seed"], low=0, high=MAX_SEED)
    return FineTune(**options, distill=True) if options["epochs"] else None
