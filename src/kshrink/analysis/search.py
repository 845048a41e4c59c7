"""`search`: the per-layer recipe that compresses a model most within an accuracy budget.

How (sensitivity-guided greedy allocation, after NetAdapt, AMC and HAQ):

1. **Hold out** `validation_data`, or else the last 10% of `data`; the search fine-tunes on
   the rest and judges every candidate on the held-out examples.
2. **Probe each layer alone**: every level of the search space (a sparsity, a bit width, a
   residual block removed, a channel ratio) is applied alone through `compress`, and the
   rise of the held-out loss is measured; for `latency`, the probe's model is timed too,
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
```
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections import Counter
from pathlib import Path

import keras
import numpy as np

from kshrink.api import compress
from kshrink.artifact import save as save_compact
from kshrink.cluster import Cluster
from kshrink.core.data import check_data, example_count, labels_of, model_inputs
from kshrink.core.graph import copy_model, leaf_layers, path_of
from kshrink.core.progress import Message, Progress, counting, within
from kshrink.core.recipe import Recipe
from kshrink.core.select import Select
from kshrink.core.technique import StepContext, check_choice, check_int, check_range
from kshrink.core.training import FineTune, task_loss
from kshrink.deploy import RUNTIME_NAMES, check_runtime, in_runtime
from kshrink.errors import KshrinkError
from kshrink.fold import Fold
from kshrink.layers import keras_quantizes
from kshrink.layers.specs import kernel_weights
from kshrink.measure.accuracy import is_classifier, predict, top1_accuracy
from kshrink.measure.latency import latency, latency_in_turns
from kshrink.measure.macs import macs
from kshrink.measure.weights import weight_stats
from kshrink.prune import DepthPrune, Prune, SparsityOverride, StructuredPrune, residual_blocks
from kshrink.quantize import Override, Quantize
from kshrink.quantize.technique import skip_reason as quantize_skip_reason
from kshrink.render import Table

OBJECTIVES = ("size", "memory", "latency", "macs")
UNITS = {"size": "bytes", "memory": "bytes", "latency": "us", "macs": "MACs"}
SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98)
BIT_WIDTHS = ("float", "int8", "int4")
CHANNEL_RATIOS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.75)  # share of each layer's channels removed
LATENCY_RUNS = 30  # timed calls per latency measurement (the median counts)
CLUSTERS = 16  # weight sharing behind pruning for `size`: 4-bit indices into 16 centroids
HELD_OUT = 0.1  # share of `data` held out when no validation_data is given
_FREE = 1e-6  # the loss a move that costs nothing is taken to cost, so it goes first


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One recipe the search compressed, fine-tuned and measured.

    Attributes:
        levels: the level each layer was given (a sparsity, or a bit width), by path.
        recipe: the recipe that made it.
        objective: what it measured: file bytes for `size`, resident weight bytes for
            `memory`, microseconds per forward pass for `latency`, MACs per example for
            `macs`.
        accuracy: top-1 accuracy on the held-out examples.
        within_budget: whether it lost at most `max_accuracy_drop`.
        seconds: how long compressing it took.
    """

    levels: dict
    recipe: Recipe
    objective: int
    accuracy: float
    within_budget: bool
    seconds: float


@dataclasses.dataclass(frozen=True)
class SearchReport:
    """What `search` tried and what it chose.

    Attributes:
        objective: `"size"`, `"memory"`, `"latency"` or `"macs"`.
        max_accuracy_drop: the budget, in percentage points of held-out accuracy.
        accuracy: the original model's held-out accuracy.
        original_objective: the original's objective (its compact file's bytes for `size`,
            its latency unfolded for `latency`).
        float_bytes: the original's weight bytes.
        training_examples: how many examples of `data` the candidates were fine-tuned on
            (the first ones; the rest were held out unless `validation_data` was given).
        held_out_examples: how many examples judged the candidates.
        loss_rise: per layer (or block, or `channels`), `(level, loss rise)` for each level
            it could take, least compressed first: the held-out loss rise with it alone
            compressed so (after `probe_steps` of fine-tuning).
        candidates: every candidate, in the order they were tried.
        chosen: the index of the winner in `candidates`; None when none kept the budget.
    """

    objective: str
    max_accuracy_drop: float
    accuracy: float
    original_objective: int
    float_bytes: int
    training_examples: int
    held_out_examples: int
    loss_rise: dict
    candidates: tuple[Candidate, ...]
    chosen: int | None
    probe_steps: int = 0  # optimizer steps each probe was fine-tuned for before its loss
    latency_runtime: str = "keras"  # where `latency` was timed

    @property
    def best(self) -> Candidate | None:
        return None if self.chosen is None else self.candidates[self.chosen]

    @property
    def recipe(self) -> Recipe | None:
        """The winner's recipe (None when no candidate kept the budget)."""
        return None if self.best is None else self.best.recipe

    def front(self) -> list[Candidate]:
        """The candidates no other beats on both objective and accuracy, smallest first."""
        ordered = sorted(self.candidates, key=lambda c: (c.objective, -c.accuracy))
        front, best = [], -1.0
        for candidate in ordered:
            if candidate.accuracy > best:
                front.append(candidate)
                best = candidate.accuracy
        return front

    @property
    def objective_label(self) -> str:
        latency = "latency, us" + ("" if self.latency_runtime == "keras"
                                   else f" ({RUNTIME_NAMES[self.latency_runtime]})")
        return {"size": "file bytes (.kshrink)", "memory": "weight bytes in memory",
                "latency": latency, "macs": "MACs per example"}[self.objective]

    def plot_points(self) -> tuple[str, list]:
        """`(label, [(objective, accuracy, chosen), ...])`, as `kshrink.report.html(front=)`
        takes them; the original is the first point."""
        points = [(self.original_objective, self.accuracy, False)]
        points += [(c.objective, c.accuracy, i == self.chosen)
                   for i, c in enumerate(self.candidates)]
        return self.objective_label, points

    def table(self) -> Table:
        front = {id(c) for c in self.front()}
        rows = [("original", f"{self.original_objective:,}", "1.00x",
                 f"{100 * self.accuracy:.2f}%", "+0.00", "", "")]
        for i, c in enumerate(self.candidates):
            mark = "chosen" if i == self.chosen else ("front" if id(c) in front else "")
            rows.append((f"{i + 1}: {_describe(c.levels)}", f"{c.objective:,}",
                         f"{self.original_objective / c.objective:.2f}x",
                         f"{100 * c.accuracy:.2f}%",
                         f"{100 * (c.accuracy - self.accuracy):+.2f}",
                         "yes" if c.within_budget else "no", mark))
        title = (f"search for {self.objective} within {self.max_accuracy_drop:g} pp, judged on "
                 f"{self.held_out_examples:,} held-out examples")
        return Table(title, ("candidate", self.objective_label, "gain", "accuracy",
                             "change (pp)", "in budget", ""), rows)

    def layer_table(self) -> Table:
        title = "held-out loss rise with one layer compressed alone, and the choice"
        if self.probe_steps:
            title = title.replace(" alone,", f" alone and fine-tuned {self.probe_steps} steps,")
        choices = {tuple(level for level, _ in pairs) for pairs in self.loss_rise.values()}
        rows = []
        for path, pairs in self.loss_rise.items():
            chosen = _level_text(self.best.levels[path]) if self.best else "-"
            if len(choices) == 1:
                rows.append((path, chosen, *(f"{rise:+.4f}" for _, rise in pairs)))
            else:
                rows.append((path, chosen, ", ".join(f"{_level_text(level)} {rise:+.4f}"
                                                     for level, rise in pairs)))
        if len(choices) == 1:
            return Table(title, ("layer", "chosen", *map(_level_text, choices.pop())), rows)
        return Table(title, ("layer", "chosen", "loss rise by level"), rows)

    def tables(self) -> list[Table]:
        return [self.table(), self.layer_table()]

    def to_text(self) -> str:
        lines = [self.table().to_text(), "", self.layer_table().to_text()]
        if self.best is None:
            lines += ["", f"no candidate kept held-out accuracy within "
                          f"{self.max_accuracy_drop:g} pp: nothing is chosen"]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()

    def to_dict(self) -> dict:
        return {
            "objective": self.objective, "max_accuracy_drop": self.max_accuracy_drop,
            "accuracy": self.accuracy, "original_objective": self.original_objective,
            "float_bytes": self.float_bytes, "training_examples": self.training_examples,
            "held_out_examples": self.held_out_examples,
            "loss_rise": {k: [list(pair) for pair in v] for k, v in self.loss_rise.items()},
            "probe_steps": self.probe_steps, "latency_runtime": self.latency_runtime,
            "chosen": self.chosen,
            "candidates": [{"levels": c.levels, "recipe": c.recipe.to_data(),
                            "objective": c.objective, "accuracy": c.accuracy,
                            "within_budget": c.within_budget, "seconds": c.seconds}
                           for c in self.candidates],
        }


def search(model: keras.Model, data, *, objective: str = "size",
           max_accuracy_drop: float = 1.0, validation_data=None, epochs: int = 2,
           batch_size: int = 128, learning_rate: float = 1e-3, rounds: int = 6,
           probe_samples: int = 2000, probe_steps: int = 100, seed: int = 0,
           latency_batch_size: int = 1, latency_runtime: str = "keras",
           progress: Progress | None = None):
    """Searches per-layer compression levels for the smallest (or fastest) model within an
    accuracy budget.

    Args:
        model: the float model (not modified).
        data: `(x, y)` arrays (`x` may be a dict by input name), with class labels.
        objective: `"size"`: bytes of the compact `.kshrink` file, searched over per-layer
            sparsity (0 to 98%) with 16-cluster weight sharing after it; `"memory"`: bytes
            of the weights held in memory, searched over float/int8/int4 per layer (int4 in
            groups of 128 inputs; quantization-aware training when `epochs` > 0);
            `"latency"`: the median time of a forward pass at `latency_batch_size` on this
            machine, searched over removing each residual block (`DepthPrune`) and a share
            of every layer's channels (`StructuredPrune`, 0 to 75%), BatchNorm folded;
            `"macs"`: the same space, counted in multiply-accumulates per example.
        max_accuracy_drop: the budget: percentage points of held-out top-1 accuracy the
            result may lose.
        validation_data: the held-out `(x, y)`; default: the last 10% of `data`, and the
            candidates fine-tune on the rest. Best: examples the model was never trained on;
            ones it was trained on flatter the original, so the budget turns down candidates
            that would keep its test accuracy.
        epochs: fine-tuning epochs of every candidate (per step, distilling from the
            original); 0: post-training only.
        batch_size: fine-tuning batch size.
        learning_rate: fine-tuning initial learning rate (cosine decay).
        rounds: candidates compressed and measured at most.
        probe_samples: held-out examples the one-layer probes measure the loss on.
        probe_steps: optimizer steps (at most an epoch) each probe that removes a block or
            channels is fine-tuned for before its loss is measured, distilling from the
            original at `learning_rate`; 0, or `epochs` 0: measured at once. Sparsity and
            bit-width probes are always measured at once.
        seed: seeds every fine-tune; the same seed and data give the same result.
        latency_batch_size: the batch size `latency` is timed at.
        latency_runtime: where `latency` is timed: `"keras"` (`predict_on_batch`), or the
            runtime the model will be deployed to, `"litert"` or `"onnx"`: every probe and
            candidate is then exported (float) and timed there (`kshrink.deploy`). Keras
            adds a fixed cost per call (about 0.5 ms on 2 cores) that a deployment runtime
            does not, and runtimes time channel counts differently.
        progress: told of each probe and each round, e.g. `print` or
            `kshrink.core.progress.Console()`.

    Returns:
        `(model, SearchReport)`: the chosen candidate's model (the original, copied, when
        none kept the budget: `report.chosen` is then None) and the report.
    """
    check_choice("search", "objective", objective, OBJECTIVES)
    check_range("search", "max_accuracy_drop", max_accuracy_drop, 0.0, 100.0)
    check_int("search", "epochs", epochs, low=0)
    check_int("search", "batch_size", batch_size, low=1)
    check_range("search", "learning_rate", learning_rate, 1e-9, 10.0)
    check_int("search", "rounds", rounds, low=1)
    check_int("search", "probe_samples", probe_samples, low=1)
    check_int("search", "probe_steps", probe_steps, low=0)
    check_int("search", "seed", seed, low=0)
    check_int("search", "latency_batch_size", latency_batch_size, low=1)
    if latency_runtime != "keras" and objective != "latency":
        raise KshrinkError(f"search: latency_runtime times the latency objective; objective "
                           f"{objective!r} is not timed. Received: "
                           f"latency_runtime={latency_runtime!r}")
    check_runtime("search", latency_runtime)
    train, held = _split(model, data, validation_data)
    x_held, y_held = held
    reference = predict(model, x_held)
    if not is_classifier(reference):
        raise KshrinkError("search keeps a top-1 accuracy budget, so the model must output "
                           f"class scores. Received: outputs of shape {np.shape(reference)}")
    if objective == "size":
        space = _SizeSpace(model)
    elif objective == "memory":
        space = _MemorySpace(model)
    elif objective == "macs":
        space = _MacsSpace(model)
    else:
        space = _LatencySpace(model, x_held, latency_batch_size, latency_runtime)
    if not space.choices:
        raise KshrinkError(f"search: no layer of {model.name!r} can be compressed for "
                           f"{objective}")
    accuracy = top1_accuracy(reference, y_held)
    fine_tune = FineTune(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                         distill=True, seed=seed) if epochs else None
    probe = _subset(held, probe_samples)
    recover = None
    if fine_tune is not None and probe_steps and space.probes_recover:
        per_epoch = math.ceil(example_count(model_inputs(train)) / batch_size)
        recover = dataclasses.replace(fine_tune, epochs=1, verbose=False,
                                      steps_per_epoch=min(probe_steps, per_epoch))
    rise = _loss_rises(model, space, probe, progress, train, recover)
    plan = _Plan(space, rise)
    candidates, chosen, kept = [], None, None  # kept: the chosen candidate's model
    for round_ in range(1, rounds + 1):
        levels = plan.next()
        if levels is None:
            break
        recipe = Recipe(space.recipe(levels, trains=fine_tune is not None), fine_tune)
        say = within(progress, f"search: round {round_}/{rounds}")
        if say:
            say(Message(f"{_describe(levels)} ({space.estimate_text(levels)})", result=True))
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
            say(Message(f"{candidate.objective:,} {UNITS[objective]}, accuracy "
                        f"{100 * measured:.2f}% "
                        f"({100 * (measured - accuracy):+.2f} pp): "
                        + ("within" if candidate.within_budget else "outside") + " the budget",
                        result=True))
        plan.tell(candidate.within_budget)
        if candidate.within_budget and (
                chosen is None or candidate.objective < candidates[chosen].objective):
            chosen, kept = len(candidates) - 1, small
    report = SearchReport(
        objective=objective, max_accuracy_drop=max_accuracy_drop, accuracy=accuracy,
        original_objective=space.measure(model), float_bytes=weight_stats(model).bytes,
        training_examples=example_count(model_inputs(train)),
        held_out_examples=example_count(x_held),
        loss_rise={p: tuple(zip(space.choices[p], r)) for p, r in rise.items()},
        candidates=tuple(candidates),
        chosen=chosen, probe_steps=recover.steps_per_epoch if recover else 0,
        latency_runtime=latency_runtime)
    return (copy_model(model) if kept is None else kept), report


class _Space:
    """A search space: for each dimension (a layer, a residual block, the channel ratio) the
    levels it can take, untouched first; what each level is estimated to cost in the
    objective; and the recipe for a choice of levels."""

    probes_need_data = False
    probes_recover = False  # whether a probe is fine-tuned before its loss is measured
    choices: dict  # dimension -> its levels

    def start(self) -> dict:
        return {p: levels[0] for p, levels in self.choices.items()}

    def estimate(self, levels) -> float:
        return sum(self.cost(p, v) for p, v in levels.items())

    def observe(self, path, level, model) -> None:
        """Sees the model a probe made (the latency space times it)."""


class _SizeSpace(_Space):
    """Per-layer sparsity, then 16-cluster weight sharing: what the compact file stores is
    about the non-zero weights, at 4 bits each."""

    def __init__(self, model):
        self.weights = {path_of(layer): sum(int(np.prod(w.shape)) for w in kernel_weights(layer))
                        for layer in leaf_layers(model)
                        if kernel_weights(layer)
                        and not getattr(layer, "quantization_mode", None)}
        self.choices = {path: SPARSITIES for path in self.weights}

    def probe(self, path, sparsity):
        return [Prune(sparsity=sparsity, schedule="one_shot", skip_first_last=False,
                      layers=Select(names=(path,)))] if sparsity else None

    def cost(self, path, sparsity) -> float:
        """Estimated bytes: a 4-bit index and about 2 bits of position per non-zero."""
        return self.weights[path] * (1 - sparsity) * 0.75

    def estimate_text(self, levels) -> str:
        return f"kernels about {self.estimate(levels):,.0f} bytes"

    def measure(self, model) -> int:
        with tempfile.TemporaryDirectory() as folder:
            return save_compact(model, Path(folder) / "candidate.kshrink").stat().st_size

    def recipe(self, levels, trains: bool) -> list:
        pruned = {p: s for p, s in levels.items() if s > 0}
        steps = []
        if pruned:
            # The level most layers share is the step's sparsity; the others are overrides.
            counts = Counter(pruned.values())
            main = max(counts, key=lambda s: (counts[s], s))
            overrides = tuple(
                SparsityOverride(layers=Select(names=tuple(sorted(
                    p for p, v in pruned.items() if v == s))), sparsity=s)
                for s in sorted(counts, reverse=True) if s != main)
            steps.append(Prune(sparsity=main, skip_first_last=False,
                               schedule="polynomial" if trains else "one_shot",
                               layers=Select(names=tuple(sorted(pruned))), overrides=overrides))
        steps.append(Cluster(clusters=CLUSTERS))
        return steps


class _MemorySpace(_Space):
    """float, int8 or int4 weights per layer: the bytes held in memory."""

    BYTES = {"float": 4.0, "int8": 1.0, "int4": 0.5}

    def __init__(self, model):
        layers = StepContext(original=model).choose_layers(
            model, None, None, quantize_skip_reason, in_place=keras_quantizes)
        self.weights = {path_of(layer): sum(int(np.prod(w.shape)) for w in layer.weights)
                        for layer in layers}
        self.choices = {path: BIT_WIDTHS for path in self.weights}

    def probe(self, path, mode):
        return None if mode == "float" else [Quantize(mode=mode, layers=Select(names=(path,)))]

    def cost(self, path, mode) -> float:
        return self.weights[path] * self.BYTES[mode]

    def estimate_text(self, levels) -> str:
        return f"kernels about {self.estimate(levels):,.0f} bytes"

    def measure(self, model) -> int:
        return weight_stats(model).bytes

    def recipe(self, levels, trains: bool) -> list:
        quantized = tuple(sorted(p for p, m in levels.items() if m != "float"))
        int4 = tuple(sorted(p for p, m in levels.items() if m == "int4"))
        overrides = (Override(layers=Select(names=int4), mode="int4"),) if int4 else ()
        return [Quantize(mode="int8", qat=trains, layers=Select(names=quantized),
                         overrides=overrides)]


class _LatencySpace(_Space):
    """Residual blocks kept or removed, and a share of every layer's channels removed, then
    BatchNorm folded: what a forward pass at the given batch size takes on this machine, in
    Keras or, exported, in the runtime named.

    What each level saves is timed once, on the model a probe made (NetAdapt's measured
    table); a candidate's estimate adds those savings, and each candidate is timed whole.
    """

    probes_need_data = probes_recover = True
    CHANNELS = "channels"

    def __init__(self, model, x, batch_size: int, runtime: str = "keras"):
        self.x, self.batch_size, self.runtime = x, batch_size, runtime
        self.choices = {block.merge: ("keep", "remove") for block in residual_blocks(model)}
        self.choices[self.CHANNELS] = CHANNEL_RATIOS
        folded, _ = compress(model, Fold(), verbose=False)
        self.folded = self.runner(folded)
        self.base = self.timed(self.folded)
        self.saved = {}

    def probe(self, path, level):
        if level in ("keep", 0.0):
            return None
        first = (StructuredPrune(ratio=level, round_to=4) if path == self.CHANNELS
                 else DepthPrune(blocks=1, layers=Select(names=(path,))))
        return [first, Fold()]

    def observe(self, path, level, model) -> None:
        self.saved[path, level] = max(self.saving(model), 0)

    def saving(self, model) -> float:
        """What `model` saves against the original folded, both timed in turns: the
        difference of two timings apart drifts with the machine by more than a small
        level saves."""
        timed = latency_in_turns([self.folded, self.runner(model)], [self.x, self.x],
                                 batch_sizes=(self.batch_size,), runs=LATENCY_RUNS)
        return 1000 * (timed[0][0].median_ms - timed[1][0].median_ms)

    def cost(self, path, level) -> float:
        """Minus the time the level saves, timed alone (none for an untouched level)."""
        levels = self.choices[path]
        saved = [self.saved.get((path, lv), 0) for lv in levels[:levels.index(level) + 1]]
        return -max(saved)

    def estimate(self, levels) -> float:
        return max(self.base + super().estimate(levels), 0.05 * self.base)

    def estimate_text(self, levels) -> str:
        return f"about {self.estimate(levels):,.0f} us"

    def runner(self, model):
        """What is timed: the model, or its export loaded in the runtime."""
        return in_runtime(model, self.runtime, self.x)

    def timed(self, runner) -> int:
        return round(1000 * latency(runner, self.x, batch_sizes=(self.batch_size,),
                                    runs=LATENCY_RUNS)[0].median_ms)

    def measure(self, model) -> int:
        return self.timed(self.runner(model))

    def recipe(self, levels, trains: bool) -> list:
        removed = tuple(sorted(p for p, v in levels.items() if v == "remove"))
        steps = [DepthPrune(blocks=len(removed), layers=Select(names=removed))] if removed else []
        if levels.get(self.CHANNELS):
            steps.append(StructuredPrune(ratio=levels[self.CHANNELS], round_to=4))
        return steps + [Fold()]


class _MacsSpace(_LatencySpace):
    """The latency space's dimensions, counted in multiply-accumulates per example
    (`kshrink.measure.macs`) instead of timed: exact and the same on every machine."""

    def __init__(self, model):
        super().__init__(model, None, 1)

    def estimate_text(self, levels) -> str:
        return f"about {self.estimate(levels):,.0f} MACs"

    def timed(self, model) -> int:
        return macs(model).total

    def saving(self, model) -> float:
        return self.base - self.measure(model)


def _split(model, data, validation_data):
    """`(train, held_out)`, each `(x, y)`: the held-out part is `validation_data`, or else the
    last tenth of `data`."""
    for name, part in (("data", data), ("validation_data", validation_data)):
        if part is not None and not isinstance(part, (tuple, list, dict, np.ndarray)):
            raise KshrinkError(f"search: {name} must be arrays (x, y): every candidate is "
                               "fine-tuned and judged on the same examples. Received: "
                               f"{type(part).__name__}")
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

    def part(values, sl):
        return {k: v[sl] for k, v in values.items()} if isinstance(values, dict) else values[sl]

    return ((part(x, slice(None, cut)), np.asarray(y)[:cut]),
            (part(x, slice(cut, None)), np.asarray(y)[cut:]))


def _subset(data, limit: int):
    return model_inputs(data, limit), np.asarray(labels_of(data))[:limit]


def _loss_rises(model, space, probe, progress, train=None, recover=None) -> dict:
    """Per dimension, the held-out loss rise at each level with that one alone compressed
    (and then fine-tuned on `train` with `recover`, a `FineTune`, if given), made
    non-decreasing along the levels (a deeper level never counts as cheaper)."""
    x, y = probe
    loss = task_loss(model, y)
    base = _loss(loss, y, predict(model, x))
    work = [(path, level) for path, levels in space.choices.items() for level in levels]
    measured = {}
    title = "search: probing layers one at a time" + (
        f", each fine-tuned {recover.steps_per_epoch} steps" if recover else "")
    for path, level in counting(progress, title, work,
                                lambda item: f"{item[0]} at {_level_text(item[1])}"):
        steps = space.probe(path, level)
        if not steps:
            measured[path, level] = 0.0
            continue
        if recover:  # BatchNorm's moving averages lag a short fine-tune: estimated anew
            steps = [dataclasses.replace(steps[0], reestimate_batchnorm=True), *steps[1:]]
        data = train if recover else (probe if space.probes_need_data else None)
        alone, _ = compress(model, steps, data=data, fine_tune=recover, fidelity_samples=0,
                            verbose=False)
        space.observe(path, level, alone)
        measured[path, level] = max(_loss(loss, y, predict(alone, x)) - base, 0.0)
    return {path: list(np.maximum.accumulate([measured[path, lv] for lv in levels]))
            for path, levels in space.choices.items()}


class _Plan:
    """Which levels to try next: points on the greedy path, bisected (see the module's
    docstring, step 4), and a new path when a move between two neighbours proves misjudged."""

    def __init__(self, space, rise):
        self.space, self.rise = space, rise
        self.caps = {}  # dimension -> the deepest level index a new path may give it
        self.origin = space.start()  # where the path starts: the deepest levels known good
        self.path = _greedy_path(space, rise)
        self.good = self.bad = None  # path points: the deepest within budget, the first not
        self.point = None

    def next(self) -> dict | None:
        """The levels to try next; None when nothing is left to try."""
        point = _next_point(self.space, self.origin, self.path, self.good, self.bad)
        if point is None and self.bad is not None:
            # The move into the first point outside the budget lost too much from the
            # deepest point within it: the probes misjudged it. Rule it out (its dimension
            # held one level short of it) and plan again from that point.
            if self.good is not None:
                self.origin = self.path[self.good]
            moved, level = next((d, v) for d, v in self.path[self.bad].items()
                                if v != self.origin[d])
            self.caps[moved] = self.space.choices[moved].index(level) - 1
            self.path = _greedy_path(self.space, self.rise, self.caps, self.origin)
            self.good = self.bad = None
            # Every point tried past the origin lost too much, so the new path's deeper
            # points likely do too: try its first move, the least compression left.
            point = 0 if self.path else None
        self.point = point
        return None if point is None else self.path[point]

    def tell(self, within_budget: bool) -> None:
        """What the levels `next` gave measured."""
        if within_budget:
            self.good = self.point
        else:
            self.bad = self.point


def _greedy_path(space, rise, caps=None, start=None) -> list[dict]:
    """The allocation after each greedy move from `start` (default: every dimension
    untouched), from one move to every dimension at its deepest level (or at its cap: `caps`
    maps a dimension to the deepest level index it may take)."""
    caps = caps or {}
    start = start or space.start()
    index = {path: space.choices[path].index(start[path]) for path in space.choices}
    path = []
    while True:
        best = None
        for layer, k in index.items():
            levels = space.choices[layer]
            for j in range(k + 1, caps.get(layer, len(levels) - 1) + 1):
                saving = space.cost(layer, levels[k]) - space.cost(layer, levels[j])
                loss = max(rise[layer][j] - rise[layer][k], _FREE)
                if best is None or saving / loss > best[0]:
                    best = (saving / loss, layer, j)
        if best is None:
            return path
        index[best[1]] = best[2]
        path.append({layer: space.choices[layer][k] for layer, k in index.items()})


def _next_point(space, origin, path, good, bad) -> int | None:
    """The point halfway, on a log scale of the estimate, between the deepest point within
    budget (or the path's origin) and the first one outside it (or the end); None when they
    are adjacent."""
    low = -1 if good is None else good
    high = len(path) if bad is None else bad
    if high - low <= 1:
        return None
    size_low = space.estimate(origin if low < 0 else path[low])
    if bad is None:
        size_high = space.estimate(path[-1]) / 2  # aim past the end: the end gets tried
    else:
        size_high = space.estimate(path[high])
    target = math.sqrt(max(size_low, 1.0) * max(size_high, 1.0))
    options = range(low + 1, high)
    return min(options, key=lambda i: abs(math.log(max(space.estimate(path[i]), 1.0))
                                          - math.log(target)))


def _level_text(level) -> str:
    return f"{level:.0%}" if isinstance(level, float) else str(level)


def _describe(levels: dict) -> str:
    """`conv2 90%, fc1 98%`: the dimensions that moved from their untouched level."""
    moved = [(p, v) for p, v in levels.items() if v not in (0.0, "float", "keep")]
    if not moved:
        return "no layer compressed"
    return ", ".join(f"{p} {_level_text(v)}" for p, v in moved)


def _loss(loss, y, outputs) -> float:
    return float(keras.ops.convert_to_numpy(loss(y, outputs)))
