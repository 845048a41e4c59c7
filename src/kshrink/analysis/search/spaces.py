"""Search spaces: for one objective, the levels each layer (or block, or set of tied
channels) can take, what a level is estimated to save, and the recipe that reaches a set
of levels. The levels, what they cost and the steps that reach them come from the
techniques (`Handler.size_levels`, `Handler.structure_levels` and their kin): no
technique is named here."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from kshrink.api import compress
from kshrink.artifact import save as save_compact
from kshrink.core.graph import leaf_layers, path_of
from kshrink.core.technique import Technique, handler_for, technique_class
from kshrink.deploy import in_runtime
from kshrink.errors import KshrinkError
from kshrink.fold import Fold
from kshrink.layers import quantization
from kshrink.layers.specs import kernel_weights
from kshrink.measure.latency import latency, latency_in_turns
from kshrink.measure.macs import macs
from kshrink.measure.weights import weight_stats

LATENCY_RUNS = 30  # timed calls per latency measurement (the median counts)
FLOAT = "float"  # the untouched encoding of a layer's weights
FLOAT_BITS = 32.0


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


class Encodings:
    """The encodings the templates offer each layer: float, or a level of one of them; each
    level is owned by one technique, which makes the steps that reach it."""

    def __init__(self, model, templates: dict, layers, in_memory: bool = False):
        """`layers`: the paths that may take an encoding; `in_memory`: only the levels that
        hold weights in fewer bits in memory (`Handler.memory_bits`)."""
        self.templates, self.owner, self.offered = templates, {}, {}
        for name, template in _in_stage_order(templates):
            handler = handler_for(template)
            if handler.thins:
                continue
            for path, levels in handler.size_levels(model, template).items():
                for level in levels:
                    if self.owner.setdefault(level, name) != name:
                        raise KshrinkError(f"search: {self.owner[level]} and {name} both offer "
                                           f"level {level!r}; levels must tell them apart")
                if path in layers:
                    self.offered.setdefault(path, []).extend(
                        level for level in levels
                        if not in_memory or handler.memory_bits(template, level) is not None)

    def choices(self, path, cost) -> tuple:
        """Float and the levels offered `path`, dearest (by `cost(level)`) first."""
        return tuple(sorted([FLOAT, *self.offered[path]], key=cost, reverse=True))

    def handler(self, level):
        """The template owning `level` and its handler."""
        template = self.templates[self.owner[level]]
        return template, handler_for(template)

    def steps(self, encodings: dict, trains: bool) -> list:
        """The steps giving each layer of `encodings` (path -> level) its level, in recipe
        order; only the first is fine-tuned (`trains`), so the later ones keep what it made
        (int8 over shared values stays shared)."""
        encodings = {path: level for path, level in encodings.items() if level != FLOAT}
        steps = []
        for name in sorted({self.owner[level] for level in encodings.values()},
                           key=lambda name: self.templates[name].stage):
            levels = {path: level for path, level in encodings.items()
                      if self.owner[level] == name}
            template = self.templates[name]
            steps.append(handler_for(template).size_step(template, levels,
                                                         trains and not steps))
        return steps


class SizeSpace(Space):
    """Per layer, an encoding of its weights (float, or a level of a technique: a cluster
    count, int8, int4) and, from a technique that thins them (prune), a share of them
    removed. What the compact file stores is about the values kept at the bits their
    encoding takes."""

    def __init__(self, model, templates, trains: bool = False):
        self.templates = templates
        probing = {name: handler_for(template).size_probe(template, trains)
                   for name, template in templates.items()}
        kernels = [layer for layer in leaf_layers(model)
                   if kernel_weights(layer) and not quantization(layer)]
        self.weights = {path_of(layer): sum(int(np.prod(w.shape)) for w in kernel_weights(layer))
                        for layer in kernels}
        self.channels = {path_of(layer): int(kernel_weights(layer)[0].shape[-1])
                         for layer in kernels}
        self.choices, self.layer_of, self.thinner = {}, {}, {}
        for name, template in _in_stage_order(templates):
            if handler_for(template).thins:
                for path, levels in handler_for(template).size_levels(model, template).items():
                    if path in self.thinner:
                        raise KshrinkError(f"search: {self.thinner[path]} and {name} both "
                                           f"remove weights of {path}; search one of them")
                    if path in self.weights:
                        self.choices[path], self.layer_of[path] = tuple(levels), path
                        self.thinner[path] = name
        self.encodings = Encodings(model, templates, self.weights)
        self.probing = Encodings(model, probing, self.weights)
        for path in self.encodings.offered:
            key = self.encoding_of(path)
            self.choices[key] = self.encodings.choices(
                path, lambda level, p=path: self.layer_bytes(p, None, level))
            self.layer_of[key] = path

    @staticmethod
    def encoding_of(path) -> str:
        """The dimension that holds a layer's encoding."""
        return f"{path}:weights"

    def _thinning(self, templates, levels: dict, trains: bool) -> list:
        """The steps removing the share of each layer's weights `levels` gives it."""
        steps = []
        for name in dict.fromkeys(self.thinner.values()):
            mine = {path: level for path, level in levels.items()
                    if self.thinner.get(path) == name and level != self.choices[path][0]}
            if mine:
                steps.append(handler_for(templates[name]).size_step(templates[name], mine,
                                                                    trains))
        return steps

    def probe(self, dimension, level):
        path = self.layer_of[dimension]
        if dimension == path:
            return self._thinning(self.probing.templates, {path: level}, False) or None
        return self.probing.steps({path: level}, False) or None

    def layer_bytes(self, path, thinning, encoding) -> float:
        """Estimated bytes of a layer's kernels at a thinning level (None: none) and an
        encoding."""
        if encoding == FLOAT:
            bits, table = FLOAT_BITS, 0.0
        else:
            template, handler = self.encodings.handler(encoding)
            bits = handler.size_bits(template, encoding)
            table = handler.size_table_bytes(template, encoding, self.channels[path])
        kept = 1.0
        if thinning is not None:
            template = self.templates[self.thinner[path]]
            kept = handler_for(template).size_kept(template, thinning)
            bits += handler_for(template).size_bits(template, thinning)
        return self.weights[path] * kept * bits / 8 + table

    def layer_levels(self, levels, path) -> tuple:
        return levels.get(path), levels.get(self.encoding_of(path), FLOAT)

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
        encodings = {self.layer_of[d]: v for d, v in levels.items() if self.layer_of[d] != d}
        return (self._thinning(self.templates, levels, trains)
                + self.encodings.steps(encodings, trains))


class MemorySpace(Space):
    """Per layer, float weights or a level that holds them in fewer bits in memory (int8,
    int4): the bytes of the weights held in memory."""

    def __init__(self, model, templates):
        self.encodings = Encodings(model, templates,
                                   {path_of(layer) for layer in leaf_layers(model)},
                                   in_memory=True)
        self.weights = {path_of(layer): sum(int(np.prod(w.shape)) for w in layer.weights)
                        for layer in leaf_layers(model) if path_of(layer) in
                        self.encodings.offered}
        self.choices = {path: self.encodings.choices(path, self.bits) for path in self.weights}

    def bits(self, level) -> float:
        if level == FLOAT:
            return FLOAT_BITS
        template, handler = self.encodings.handler(level)
        return handler.memory_bits(template, level)

    def probe(self, path, level):
        return self.encodings.steps({path: level}, False) or None

    def cost(self, path, level) -> float:
        return self.weights[path] * self.bits(level) / 8

    def estimate_text(self, levels) -> str:
        return f"kernels about {self.estimate(levels):,.0f} bytes"

    def measure(self, model) -> int:
        return weight_stats(model).bytes

    def recipe(self, levels, trains: bool) -> list:
        return self.encodings.steps(levels, trains)


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
            cls = technique_class(name)
            template = cls.from_config({**cls().get_config(),
                                        **handler_for(cls).search_options, **(options or {})})
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
