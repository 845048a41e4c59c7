"""Search spaces: for one objective, the levels each layer (or block, or set of tied
channels) can take, what a level is estimated to save, and the recipe that reaches a set
of levels. The levels come from the techniques themselves (`Handler.size_levels`,
`Handler.structure_levels`); sparsity and float/int8/int4 memory are still spelled here."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np

from kshrink.api import compress
from kshrink.artifact import save as save_compact
from kshrink.cluster import Cluster
from kshrink.core.graph import leaf_layers, path_of
from kshrink.core.select import Select, shared_level
from kshrink.core.technique import Technique, handler_for, technique_class
from kshrink.deploy import in_runtime
from kshrink.errors import KshrinkError
from kshrink.fold import Fold
from kshrink.layers import quantization
from kshrink.layers.specs import kernel_weights
from kshrink.measure.latency import latency, latency_in_turns
from kshrink.measure.macs import macs
from kshrink.measure.weights import weight_stats
from kshrink.prune import DepthPrune, Prune, SparsityOverride, StructuredPrune
from kshrink.quantize import Quantize

SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98)
BIT_WIDTHS = ("float", "int8", "int4")
LATENCY_RUNS = 30  # timed calls per latency measurement (the median counts)
# What a technique named without options starts from (the search sets its level and layers)
DEFAULT_TEMPLATES = {"prune": Prune(schedule="one_shot"), "cluster": Cluster(),
                     "quantize": Quantize(), "depth_prune": DepthPrune(),
                     "structured_prune": StructuredPrune(round_to=4)}


class Space:
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


class SizeSpace(Space):
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
    every = list(leaf_layers(model))
    chosen = template.layers.resolve(every) if template.layers is not None else every
    excluded = template.exclude.resolve(every) if template.exclude is not None else []
    chosen, excluded = set(map(path_of, chosen)), set(map(path_of, excluded))
    return [path for path in map(path_of, layers) if path in chosen and path not in excluded]


class MemorySpace(Space):
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


class LatencySpace(Space):
    """The parts of the model the structure techniques can remove, at their levels (e.g.
    `depth_prune`: each residual block kept or removed; `structured_prune`: a share of the
    channels, one for every layer or, `per_layer`, one per set of layers whose channels are
    tied), then BatchNorm folded: what a forward pass at the given batch size takes on this
    machine, in Keras or, exported, in the runtime named.

    What each level saves is timed once, on the model a probe made (NetAdapt's measured
    table); a candidate's estimate adds those savings, and each candidate is timed whole.
    """

    probes_recover = True

    def __init__(self, model, templates, x, batch_size: int, runtime: str = "keras",
                 per_layer: bool = False):
        self.templates, self.x, self.batch_size, self.runtime = templates, x, batch_size, runtime
        self.choices, self.layers, self.owner = {}, {}, {}
        for name, template in _in_stage_order(templates):
            for dimension, (levels, layers) in handler_for(template).structure_levels(
                    model, template, per_layer).items():
                if dimension in self.choices:
                    raise KshrinkError(f"search: {self.owner[dimension]} and {name} both "
                                       f"offer a dimension named {dimension!r}")
                self.choices[dimension], self.layers[dimension] = tuple(levels), layers
                self.owner[dimension] = name
        folded, _ = compress(model, Fold(), verbose=False)
        self.folded = self.runner(folded)
        self.base = self.timed(self.folded)
        self.saved = {}

    def probe(self, dimension, level):
        if level == self.choices[dimension][0]:
            return None
        return self.recipe({dimension: level}, trains=False)

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
        """Each technique's steps for its dimensions (in stage order, each told the layers
        the ones before removed), then BatchNorm folded."""
        steps, gone = [], set()
        for name, template in _in_stage_order(self.templates):
            mine = {d: level for d, level in levels.items()
                    if self.owner[d] == name and level != self.choices[d][0]}
            if mine:
                made, removed = handler_for(template).structure_steps(
                    template, mine, self.layers, gone)
                steps += made
                gone |= removed
        return steps + [Fold()]


def _in_stage_order(templates: dict) -> list:
    """`(name, template)` of `templates` by stage, as given within a stage."""
    return sorted(templates.items(), key=lambda item: item[1].stage)


class MacsSpace(LatencySpace):
    """The latency space's dimensions, counted in multiply-accumulates per example
    (`kshrink.measure.macs`) instead of timed: exact and the same on every machine."""

    def __init__(self, model, templates, per_layer: bool = False):
        super().__init__(model, templates, None, 1, per_layer=per_layer)

    def estimate_text(self, levels) -> str:
        return f"about {self.estimate(levels):,.0f} MACs"

    def timed(self, model) -> int:
        return macs(model).total

    def saving(self, model) -> float:
        return self.base - self.measure(model)


def templates_for(objective, techniques) -> dict:
    """`techniques` (names, `{name: options}` or configured techniques; None: the
    objective's defaults) as name -> the technique config the search varies the level of;
    `objective`: an `Objective`."""
    allowed = objective.allowed()
    if techniques is None:
        techniques = objective.default_techniques
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
            raise KshrinkError(f"search: objective {objective.name!r} searches "
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
        raise KshrinkError(f"search: techniques is empty; objective {objective.name!r} "
                           f"searches {', '.join(allowed)}")
    objective.check_templates(templates)
    return templates


def _names(techniques) -> str:
    return "[" + ", ".join(t.name if isinstance(t, Technique) else
                           next(iter(t)) if isinstance(t, dict) and t else str(t)
                           for t in techniques) + "]"
