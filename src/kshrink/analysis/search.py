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
```
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

from kshrink.api import compress
from kshrink.artifact import save as save_compact
from kshrink.cluster import Cluster
from kshrink.core.data import check_data, example_count, labels_of, model_inputs, split_labels
from kshrink.core.graph import copy_model, leaf_layers, path_of
from kshrink.core.progress import Message, Progress, counting, within
from kshrink.core.recipe import Recipe
from kshrink.core.select import Select, shared_level
from kshrink.core.technique import (MAX_BATCH, MAX_EPOCHS, MAX_SEED, MAX_STEPS, Technique,
                                    check_choice, check_int, check_range, handler_for,
                                    registered_techniques, technique_class)
from kshrink.core.training import FineTune, task_loss
from kshrink.deploy import RUNTIME_NAMES, check_runtime, in_runtime
from kshrink.errors import KshrinkError
from kshrink.fold import Fold
from kshrink.layers import quantization
from kshrink.layers.specs import kernel_weights
from kshrink.measure.accuracy import is_classifier, predict, top1_accuracy
from kshrink.measure.latency import latency, latency_in_turns
from kshrink.measure.macs import macs
from kshrink.measure.weights import weight_stats
from kshrink.prune import DepthPrune, Prune, SparsityOverride, StructuredPrune, residual_blocks
from kshrink.prune.channels import channel_groups
from kshrink.quantize import Quantize
from kshrink.render import Table

OBJECTIVES = ("size", "memory", "latency", "macs")
UNITS = {"size": "bytes", "memory": "bytes", "latency": "us", "macs": "MACs"}
SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98)
BIT_WIDTHS = ("float", "int8", "int4")
CHANNEL_RATIOS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.75)  # share of each layer's channels removed
LATENCY_RUNS = 30  # timed calls per latency measurement (the median counts)
TECHNIQUES = {  # what each objective can search besides ones that offer size levels (below)
    "size": ("prune",), "memory": ("quantize",),
    "latency": ("depth_prune", "structured_prune"), "macs": ("depth_prune", "structured_prune"),
}
DEFAULT_TECHNIQUES = {"size": ("prune", "cluster"), "memory": ("quantize",),
                      "latency": ("depth_prune", "structured_prune"),
                      "macs": ("depth_prune", "structured_prune")}
CHANNEL_SCOPES = ("uniform", "per_layer")
# What a technique named without options starts from (the search sets its level and layers)
DEFAULT_TEMPLATES = {"prune": Prune(schedule="one_shot"), "cluster": Cluster(),
                     "quantize": Quantize(), "depth_prune": DepthPrune(),
                     "structured_prune": StructuredPrune(round_to=4)}
HELD_OUT = 0.1  # share of `data` held out when no validation_data is given
_FREE = 1e-6  # the loss a move that costs nothing is taken to cost, so it goes first


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One recipe the search compressed, fine-tuned and measured.

    Attributes:
        levels: the level each dimension was given, by name: a layer's path for its
            sparsity (or its bit width for `memory`), `path:weights` for its encoding (a
            cluster count, "int8", "int4" or "float"), a residual block's merge layer
            ("keep" or "remove"), `channels` (or `channels conv1+conv2`) for a ratio.
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
           techniques=None, channels: str = "uniform", progress: Progress | None = None):
    """Searches per-layer compression levels for the smallest (or fastest) model within an
    accuracy budget.

    Args:
        model: the float model (not modified).
        data: `(x, y)` arrays (`x` may be a dict by input name), with class labels.
        objective: `"size"`: bytes of the compact `.kshrink` file, searched over per-layer
            sparsity (`prune`, 0 to 98%) and per-layer weight encoding: float, or 256 to 4
            shared values (`cluster`), or int8/int4 (`quantize`); `"memory"`: bytes of the
            weights held in memory, searched over float/int8/int4 per layer (int4 in groups
            of 128 inputs; quantization-aware training when `epochs` > 0); `"latency"`: the
            median time of a forward pass at `latency_batch_size` on this machine, searched
            over removing each residual block (`depth_prune`) and a share of the channels
            (`structured_prune`, 0 to 75%), BatchNorm folded; `"macs"`: the same space,
            counted in multiply-accumulates per example.
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
        techniques: what the search may use, each a name, `{name: options}` or a
            technique config, e.g. `["prune", "cluster", "quantize"]` or
            `[kshrink.Prune(method="sparsegpt", schedule="one_shot"), "cluster"]`. The
            search sets each one's level (prune's sparsity, cluster's clusters, quantize's
            mode, structured_prune's ratio, depth_prune's blocks), its layers and its
            schedule; every other option is the one given (the layers it `exclude`s, or
            leaves out of its `layers`, are not searched). Default: `prune` and `cluster`
            for size, `quantize` for memory, `depth_prune` and `structured_prune` (keeping
            multiples of 4 channels) for latency and macs.
        channels: `structured_prune`'s ratio: `"uniform"`, one for every layer, or
            `"per_layer"`, one per set of layers whose channels are tied (e.g. by residual
            Adds): more probes, a finer choice.
        progress: told of each probe and each round, e.g. `print` or
            `kshrink.core.progress.Console()`.

    Returns:
        `(model, SearchReport)`: the chosen candidate's model (the original, copied, when
        none kept the budget: `report.chosen` is then None) and the report.
    """
    check_choice("search", "objective", objective, OBJECTIVES)
    check_range("search", "max_accuracy_drop", max_accuracy_drop, 0.0, 100.0)
    check_int("search", "epochs", epochs, low=0, high=MAX_EPOCHS)
    check_int("search", "batch_size", batch_size, low=1, high=MAX_BATCH)
    check_range("search", "learning_rate", learning_rate, 1e-9, 10.0)
    check_int("search", "rounds", rounds, low=1, high=MAX_EPOCHS)
    check_int("search", "probe_samples", probe_samples, low=1, high=MAX_BATCH)
    check_int("search", "probe_steps", probe_steps, low=0, high=MAX_STEPS)
    check_int("search", "seed", seed, low=0, high=MAX_SEED)
    check_int("search", "latency_batch_size", latency_batch_size, low=1, high=MAX_BATCH)
    if latency_runtime != "keras" and objective != "latency":
        raise KshrinkError(f"search: latency_runtime times the latency objective; objective "
                           f"{objective!r} is not timed. Received: "
                           f"latency_runtime={latency_runtime!r}")
    check_runtime("search", latency_runtime)
    check_choice("search", "channels", channels, CHANNEL_SCOPES)
    templates = _templates(objective, techniques)
    if channels != "uniform" and "structured_prune" not in templates:
        raise KshrinkError(f"search: channels={channels!r} sets how structured_prune's ratio "
                           f"is searched, and objective {objective!r} with techniques "
                           f"{', '.join(templates)} removes no channels")
    train, held = _split(model, data, validation_data)
    x_held, y_held = held
    reference = predict(model, x_held)
    if not is_classifier(reference):
        raise KshrinkError("search keeps a top-1 accuracy budget, so the model must output "
                           f"class scores. Received: outputs of shape {np.shape(reference)}")
    if objective == "size":
        space = _SizeSpace(model, templates, trains=bool(epochs))
    elif objective == "memory":
        space = _MemorySpace(model, templates)
    elif objective == "macs":
        space = _MacsSpace(model, templates, channels)
    else:
        space = _LatencySpace(model, templates, x_held, latency_batch_size, latency_runtime,
                              channels)
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

    probes_recover = False  # whether a probe is fine-tuned before its loss is measured
    choices: dict  # dimension -> its levels

    def start(self) -> dict:
        return {p: levels[0] for p, levels in self.choices.items()}

    def estimate(self, levels) -> float:
        return sum(self.cost(p, v) for p, v in levels.items())

    def move_saving(self, levels, dimension, level) -> float:
        """What moving `dimension` from its level in `levels` to `level` saves, estimated."""
        return self.cost(dimension, levels[dimension]) - self.cost(dimension, level)

    def observe(self, path, level, model) -> None:
        """Sees the model a probe made (the latency space times it)."""


class _SizeSpace(_Space):
    """Per layer, a sparsity (`prune`) and an encoding of the weights left: float, or a
    cluster count (`cluster`: shared values, an index of log2(count) bits each), or int8 /
    int4 (`quantize`). What the compact file stores is about the non-zero weights at the
    bits their encoding takes."""

    FLOAT_BITS = 32.0
    POSITION_BITS = 2.0  # about what the compressed bitmap of a sparse layer costs a non-zero

    def __init__(self, model, templates, trains: bool = False):
        self.templates = self.probing = templates
        cluster = templates.get("cluster")
        if trains and cluster is not None and cluster.method is None:
            # Probes are not fine-tuned, but cluster as the fine-tuned candidates do (their
            # method follows from whether fine-tuning comes after): k-means, not gptq.
            self.probing = {**templates, "cluster": dataclasses.replace(cluster, method="kmeans")}
        kernels = [layer for layer in leaf_layers(model)
                   if kernel_weights(layer) and not quantization(layer)]
        self.weights = {path_of(layer): sum(int(np.prod(w.shape)) for w in kernel_weights(layer))
                        for layer in kernels}
        self.channels = {path_of(layer): int(kernel_weights(layer)[0].shape[-1])
                         for layer in kernels}
        self.choices, self.layer_of = {}, {}
        if "prune" in templates:
            for path in _selected(model, templates["prune"], kernels):
                self.choices[path] = SPARSITIES
                self.layer_of[path] = path
        # Encodings: the levels of every other technique, each level owned by one of them.
        self.owner = {}  # level -> technique name
        offered = {}  # layer path -> its levels
        encoders = [name for name in templates if name != "prune"]
        for name in sorted(encoders, key=lambda name: templates[name].stage):
            for path, levels in handler_for(templates[name]).size_levels(
                    model, templates[name]).items():
                for level in levels:
                    if self.owner.setdefault(level, name) != name:
                        raise KshrinkError(f"search: {self.owner[level]} and {name} both offer "
                                           f"level {level!r}; levels must tell them apart")
                if path in self.weights:
                    offered.setdefault(path, []).extend(levels)
        for path, levels in offered.items():
            key = self.encoding_of(path)
            self.choices[key] = tuple(sorted(
                ["float", *levels], key=lambda level, p=path: self.layer_bytes(p, 0.0, level),
                reverse=True))
            self.layer_of[key] = path

    @staticmethod
    def encoding_of(path) -> str:
        """The dimension that holds a layer's encoding."""
        return f"{path}:weights"

    def probe(self, dimension, level):
        path = self.layer_of[dimension]
        if dimension == path:
            return [_prune_step(self.probing["prune"], {path: level}, False)] if level else None
        return _encoding_steps(self.probing, self.owner, {path: level}, False) or None

    def layer_bytes(self, path, sparsity, encoding) -> float:
        """Estimated bytes of a layer's kernels at a sparsity and an encoding."""
        if encoding == "float":
            bits, table = self.FLOAT_BITS, 0.0
        else:
            template = self.templates[self.owner[encoding]]
            handler = handler_for(template)
            bits = handler.size_bits(template, encoding)
            table = handler.size_table_bytes(template, encoding, self.channels[path])
        bits += self.POSITION_BITS if sparsity else 0.0
        return self.weights[path] * (1 - sparsity) * bits / 8 + table

    def layer_levels(self, levels, path) -> tuple:
        return levels.get(path, 0.0), levels.get(self.encoding_of(path), "float")

    def estimate(self, levels) -> float:
        return sum(self.layer_bytes(path, *self.layer_levels(levels, path))
                   for path in self.weights)

    def move_saving(self, levels, dimension, level) -> float:
        path = self.layer_of[dimension]
        moved = {**levels, dimension: level}
        return (self.layer_bytes(path, *self.layer_levels(levels, path))
                - self.layer_bytes(path, *self.layer_levels(moved, path)))

    def estimate_text(self, levels) -> str:
        return f"kernels about {self.estimate(levels):,.0f} bytes"

    def measure(self, model) -> int:
        with tempfile.TemporaryDirectory() as folder:
            return save_compact(model, Path(folder) / "candidate.kshrink").stat().st_size

    def recipe(self, levels, trains: bool) -> list:
        pruned = {p: s for p, s in levels.items() if self.layer_of[p] == p and s > 0}
        encodings = {self.layer_of[d]: v for d, v in levels.items() if self.layer_of[d] != d}
        steps = [_prune_step(self.templates["prune"], pruned, trains)] if pruned else []
        return steps + _encoding_steps(self.templates, self.owner, encodings, trains)


def _prune_step(template: Prune, sparsities: dict, trains: bool) -> Prune:
    """The template pruning each layer of `sparsities` (path -> sparsity) to its own: the
    sparsity most layers share is the step's, the others are overrides."""
    main, overrides = shared_level(sparsities)
    overrides = tuple(SparsityOverride(layers=layers, sparsity=s) for s, layers in overrides)
    gradual = trains and template.method == "magnitude"
    return dataclasses.replace(
        template, sparsity=main, scope="layer", skip_first_last=False, overrides=overrides,
        schedule=(template.schedule if template.schedule != "one_shot" else "polynomial")
        if gradual else "one_shot",
        layers=Select(names=tuple(sorted(sparsities))), exclude=None)


def _encoding_steps(templates: dict, owner: dict, encodings: dict, trains: bool) -> list:
    """The steps giving each layer of `encodings` (path -> a level of the technique `owner`
    names for it) its encoding, in recipe order; only the first is fine-tuned (`trains`), so
    the later ones keep what it made (int8 over shared values stays shared)."""
    encodings = {path: level for path, level in encodings.items() if level != "float"}
    steps = []
    for name in sorted({owner[level] for level in encodings.values()},
                       key=lambda name: templates[name].stage):
        levels = {path: level for path, level in encodings.items() if owner[level] == name}
        template = templates[name]
        steps.append(handler_for(template).size_step(template, levels, trains and not steps))
    return steps


def _quantize_step(template: Quantize, modes: dict, trains: bool) -> Quantize:
    """The template quantizing each layer of `modes` (path -> "int8" or "int4"; others are
    left alone) to its mode."""
    return handler_for(template).size_step(
        template, {path: mode for path, mode in modes.items() if mode != "float"}, trains)


def _selected(model, template, layers) -> list[str]:
    """The paths of `layers` that the template's own `layers` and `exclude` leave to it."""
    chosen, excluded = _chosen_and_excluded(model, template)
    return [path for path in map(path_of, layers) if path in chosen and path not in excluded]


def _chosen_and_excluded(model, template) -> tuple[set, set]:
    """The paths of the layers the template's `layers` name (all: None) and of those its
    `exclude` names."""
    every = list(leaf_layers(model))
    chosen = template.layers.resolve(every) if template.layers is not None else every
    excluded = template.exclude.resolve(every) if template.exclude is not None else []
    return set(map(path_of, chosen)), set(map(path_of, excluded))


class _MemorySpace(_Space):
    """float, int8 or int4 weights per layer: the bytes held in memory."""

    BYTES = {"float": 4.0, "int8": 1.0, "int4": 0.5}

    def __init__(self, model, templates):
        self.template = templates["quantize"]
        quantizable = set(handler_for(self.template).size_levels(model, self.template))
        self.weights = {path_of(layer): sum(int(np.prod(w.shape)) for w in layer.weights)
                        for layer in leaf_layers(model) if path_of(layer) in quantizable}
        self.choices = {path: BIT_WIDTHS for path in self.weights}

    def probe(self, path, mode):
        return None if mode == "float" else [_quantize_step(self.template, {path: mode}, False)]

    def cost(self, path, mode) -> float:
        return self.weights[path] * self.BYTES[mode]

    def estimate_text(self, levels) -> str:
        return f"kernels about {self.estimate(levels):,.0f} bytes"

    def measure(self, model) -> int:
        return weight_stats(model).bytes

    def recipe(self, levels, trains: bool) -> list:
        return [_quantize_step(self.template, levels, trains)]


class _LatencySpace(_Space):
    """Residual blocks kept or removed (`depth_prune`), and a share of the channels removed
    (`structured_prune`): one ratio for every layer, or one per layer (`per_layer`: per set
    of layers whose channels are tied, e.g. by residual Adds), then BatchNorm folded: what a
    forward pass at the given batch size takes on this machine, in Keras or, exported, in the
    runtime named.

    What each level saves is timed once, on the model a probe made (NetAdapt's measured
    table); a candidate's estimate adds those savings, and each candidate is timed whole.
    """

    probes_recover = True
    CHANNELS = "channels"

    def __init__(self, model, templates, x, batch_size: int, runtime: str = "keras",
                 channels: str = "uniform"):
        self.templates, self.x, self.batch_size, self.runtime = templates, x, batch_size, runtime
        self.choices, self.units, self.blocks = {}, {}, {}
        if "depth_prune" in templates:
            chosen, excluded = _chosen_and_excluded(model, templates["depth_prune"])
            for block in residual_blocks(model):
                names = {block.merge, *block.branch}
                if names & chosen and not names & excluded:
                    self.choices[block.merge] = ("keep", "remove")
                    self.blocks[block.merge] = names
        if "structured_prune" in templates and channels == "uniform":
            self.choices[self.CHANNELS] = CHANNEL_RATIOS
        elif "structured_prune" in templates:
            chosen, excluded = _chosen_and_excluded(model, templates["structured_prune"])
            spaces = {g.space for g in channel_groups(model) if g.pinned_by is None}
            for space in sorted(spaces):
                if set(space) <= chosen and not set(space) & excluded:
                    key = f"{self.CHANNELS} {'+'.join(space)}"
                    self.choices[key], self.units[key] = CHANNEL_RATIOS, space
        folded, _ = compress(model, Fold(), verbose=False)
        self.folded = self.runner(folded)
        self.base = self.timed(self.folded)
        self.saved = {}

    def probe(self, path, level):
        if level in ("keep", 0.0):
            return None
        if path in self.blocks:
            first = dataclasses.replace(self.templates["depth_prune"], blocks=1,
                                        layers=Select(names=(path,)), exclude=None)
        else:
            first = self.channel_step(level, self.units.get(path))
        return [first, Fold()]

    def channel_step(self, ratio, names=None) -> StructuredPrune:
        """The template removing `ratio` of the channels of the layers `names` (all: None)."""
        return dataclasses.replace(self.templates["structured_prune"], ratio=ratio,
                                   **({"layers": Select(names=tuple(names)), "exclude": None}
                                      if names else {}))

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
        steps = [dataclasses.replace(self.templates["depth_prune"], blocks=len(removed),
                                     layers=Select(names=removed), exclude=None)
                 ] if removed else []
        if levels.get(self.CHANNELS):
            steps.append(self.channel_step(levels[self.CHANNELS]))
        gone = set().union(*(self.blocks[p] for p in removed))
        ratios = {key: levels[key] for key in self.units if levels[key]}
        for ratio in sorted(set(ratios.values()), reverse=True):
            names = sorted({name for key, r in ratios.items() if r == ratio
                            for name in self.units[key] if name not in gone})
            if names:
                steps.append(self.channel_step(ratio, names))
        return steps + [Fold()]


class _MacsSpace(_LatencySpace):
    """The latency space's dimensions, counted in multiply-accumulates per example
    (`kshrink.measure.macs`) instead of timed: exact and the same on every machine."""

    def __init__(self, model, templates, channels: str = "uniform"):
        super().__init__(model, templates, None, 1, channels=channels)

    def estimate_text(self, levels) -> str:
        return f"about {self.estimate(levels):,.0f} MACs"

    def timed(self, model) -> int:
        return macs(model).total

    def saving(self, model) -> float:
        return self.base - self.measure(model)


def _templates(objective: str, techniques) -> dict:
    """`techniques` (names, `{name: options}` or configured techniques; None: the
    objective's defaults) as name -> the technique config the search varies the level of."""
    allowed = TECHNIQUES[objective] + (tuple(
        cls.name for cls in registered_techniques()
        if handler_for(cls).offers_size_levels()) if objective == "size" else ())
    if techniques is None:
        techniques = DEFAULT_TECHNIQUES[objective]
    elif isinstance(techniques, (str, Technique, dict)):
        techniques = [techniques]
    templates = {}
    for entry in techniques:
        if isinstance(entry, Technique):
            name, template = entry.name, entry
        else:  # a name, or {name: options}: the options go on top of the search's defaults
            name, options = (entry, None) if isinstance(entry, str) else (
                next(iter(entry.items())) if isinstance(entry, dict) and len(entry) == 1
                else (None, None))
            if not isinstance(name, str) or not isinstance(options, (dict, type(None))):
                raise KshrinkError("search: each technique is a name, {name: {options}} or a "
                                   f"technique config. Received: {entry!r}")
            technique_class(name)  # an unknown name is one line naming the known ones
        if name not in allowed:
            raise KshrinkError(f"search: objective {objective!r} searches "
                               f"{', '.join(allowed)}; not {name}. Received: "
                               f"techniques={_names(techniques)}")
        if name in templates:
            raise KshrinkError(f"search: {name} is named twice. Received: "
                               f"techniques={_names(techniques)}")
        if not isinstance(entry, Technique):
            base = DEFAULT_TEMPLATES.get(name) or technique_class(name)()
            template = type(base).from_config({**base.get_config(), **(options or {})})
        templates[name] = template
    if not templates:
        raise KshrinkError(f"search: techniques is empty; objective {objective!r} searches "
                           f"{', '.join(allowed)}")
    prune = templates.get("prune")
    if prune is not None and prune.pattern_spec.is_n_of_m:
        raise KshrinkError(f"search: pattern {prune.pattern} fixes each layer's sparsity, and "
                           "the search chooses it: give prune an unstructured or block pattern")
    return templates


def _names(techniques) -> str:
    return "[" + ", ".join(t.name if isinstance(t, Technique) else
                           next(iter(t)) if isinstance(t, dict) and t else str(t)
                           for t in techniques) + "]"


def _split(model, data, validation_data):
    """`(train, held_out)`, each `(x, y)`: the held-out part is `validation_data`, or else the
    last tenth of `data`."""
    data, validation_data = split_labels(data, model), split_labels(validation_data, model)
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


def _loss_rises(model, space, probe, progress, train, recover=None) -> dict:
    """Per dimension, the held-out loss rise at each level with that one alone compressed
    (calibrated on as many examples of `train` as `probe` holds; or fine-tuned on `train`
    with `recover`, a `FineTune`, if given), made non-decreasing along the levels (a deeper
    level never counts as cheaper)."""
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
        data = train if recover else _subset(train, example_count(x))
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
        levels = {layer: space.choices[layer][k] for layer, k in index.items()}
        for layer, k in index.items():
            choices = space.choices[layer]
            for j in range(k + 1, caps.get(layer, len(choices) - 1) + 1):
                saving = space.move_saving(levels, layer, choices[j])
                if saving < 0:  # e.g. int4's scales outweigh 16 clusters' codebook
                    continue
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
