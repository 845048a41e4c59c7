"""Techniques: a frozen config (what to do) plus a registered handler (how to do it).

A technique's config is a frozen dataclass deriving from `Technique`; its options are the
dataclass fields, each declaring its help and its check (`kshrink.core.options`). Its handler
derives from `Handler` and is registered for the config type with `register_technique`.
`kshrink.compress` looks the handler up by config type; recipes look the config class up by
registered name, so a recipe file can only ever name registered techniques.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.metadata
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import keras

from kshrink.core.graph import leaf_layers, owner_of, path_of
from kshrink.core.options import Flag, Options, Selection, option
from kshrink.core.report import APPLIED, SKIPPED, LayerResult, StepReport
from kshrink.core.select import Select
from kshrink.errors import KshrinkError, RecipeError, short


class Stage(enum.IntEnum):
    """Where a technique's steps go in a recipe: a step may not follow one of a later stage.
    A plugin may register any integer between them (e.g. `Stage.QUANTIZE - 5`: after
    sharing, before quantization)."""

    REWRITE = 20  # the graph changes: layers folded, factorized, narrowed or removed
    SPARSITY = 30  # weights set to zero
    SHARING = 40  # weights share values
    QUANTIZE = 90  # weights stored in fewer bits: last


@dataclasses.dataclass(frozen=True)
class Technique(Options):
    """Base class of technique configs.

    Subclasses are frozen dataclasses. `name` is set by `register_technique`; `stage` orders
    techniques inside a recipe (a step may not follow a step of a later stage: quantization
    comes last, clustering before it, and so on).
    """

    stage: ClassVar[int] = 0  # a `Stage`, or a plugin's integer between two

    # Keyword-only, so it follows every technique's own options: `Prune(0.9)` still works.
    reestimate_batchnorm: bool | None = option(
        None, "move BatchNorm statistics by the shift this step caused on data (estimate them "
              "anew after fine-tuning); default: with data, after a step that does not "
              "fine-tune or fine-tunes too few steps for the statistics' momentum to follow, "
              "kept only if the outputs get closer to the original",
        Flag(allow_none=True), kw_only=True)

    def override_for(self, layer) -> LayerOverride | None:
        """The first of the step's `overrides` that selects `layer`, or None."""
        return next((o for o in getattr(self, "overrides", ()) if o.layers.matches(layer)),
                    None)

    def reestimates_batchnorm(self, has_data: bool, trains: bool, stale: bool = False) -> bool:
        """Whether BatchNorm statistics are recomputed on calibration data after this step;
        `stale`: its fine-tune ran too few steps for the moving statistics to follow."""
        if self.reestimate_batchnorm is None:
            return has_data and (not trains or stale)
        return self.reestimate_batchnorm


@dataclasses.dataclass(frozen=True)
class LayerOverride(Options):
    """Other options for some layers of a step (the first override that matches a layer
    wins). A technique's override class derives from this and adds the options it changes;
    the technique declares `overrides: tuple[ItsOverride, ...] = option((), help,
    Overrides(ItsOverride))` and reads them with `Technique.override_for`.

    Args:
        layers: the layers this override applies to.
    """

    name = "override"

    layers: Select | None = option(None, "the layers this override applies to",
                                   Selection(required=True))


@dataclasses.dataclass
class StepContext:
    """What a handler may read and write during one recipe step.

    Attributes:
        original: the model as the user passed it (read only).
        data: training/calibration data as `(x, y)` or None.
        validation_data: held-out `(x, y)` or None.
        train_steps: optimizer steps the fine-tune phase of this step will run (None: no
            fine-tuning), for techniques whose schedules span the training.
        results: per-layer outcomes the handler records with `applied`/`skipped`.
        state: what the handler carries from `prepare` to `finalize`: a fresh instance of
            its `State` (a dataclass of its own, keyed by layer path), or a dict.
        summary: one line on the whole step, e.g. the sparsity reached against the target.
        progress: called with a short message as long work advances (a layer solved), or
            None.
    """

    original: keras.Model
    data: tuple | None = None
    validation_data: tuple | None = None
    train_steps: int | None = None
    results: list[LayerResult] = dataclasses.field(default_factory=list)
    state: Any = dataclasses.field(default_factory=dict)
    summary: str | None = None
    progress: Callable[[str], None] | None = None

    def applied(self, layer: keras.layers.Layer, detail: str) -> None:
        self.results.append(LayerResult(path_of(layer), type(layer).__name__, APPLIED, detail))

    def skipped(self, layer: keras.layers.Layer, reason: str) -> None:
        self.results.append(LayerResult(path_of(layer), type(layer).__name__, SKIPPED, reason))

    def note(self, line: str) -> None:
        """Adds `line` to the step's summary."""
        self.summary = f"{self.summary}; {line}" if self.summary else line

    def choose_layers(self, model: keras.Model, include: Select | None,
                      exclude: Select | None, skip_reason, in_place=None,
                      in_place_fix: str | None = None) -> list:
        """The layers with weights a technique works on, recording every other one as skipped.

        Args:
            model: the working model.
            include: the layers to consider (None: all).
            exclude: layers to leave alone (None: none).
            skip_reason: `layer -> str | None`, why the technique cannot take a layer.
            in_place: `layer -> bool`, whether the technique can change the layer where it
                stands; layers inside containers or built by a model subclass (`owner_of`)
                can only be changed so. None: it replaces layers, so it takes none of those.
            in_place_fix: how the user gets those layers changed in place (the options to
                set), ending their skip reason.
        """
        candidates = list(leaf_layers(model))
        if include is not None:
            candidates = include.resolve(candidates)
        excluded = set()
        if exclude is not None:
            excluded = {id(layer) for layer in exclude.resolve(leaf_layers(model))}
        chosen = []
        for layer in candidates:
            if not layer.weights:
                continue  # nothing to compress, nothing to report
            reason = "excluded by the recipe" if id(layer) in excluded else skip_reason(layer)
            owner = owner_of(layer)
            if not reason and owner and not (in_place and in_place(layer)):
                reason = f"{owner}: this step replaces layers, and this one can only change " \
                         "in place" + (f"; {in_place_fix}" if in_place_fix else "")
            if reason:
                self.skipped(layer, reason)
            else:
                chosen.append(layer)
        return chosen

    def nothing_left(self, technique: str, verb: str) -> KshrinkError:
        """The error for a step that found no layer to work on, with the first reason a layer
        was skipped for."""
        message = f"{technique}: no layer left to {verb} after selection and exclusions"
        skipped = [r for r in self.results if r.action == SKIPPED]
        if skipped:
            message += (f" ({len(skipped)} skipped; the first, {skipped[0].layer}: "
                        f"{skipped[0].detail})")
        return KshrinkError(message)

    def sort_results(self, model: keras.Model) -> None:
        """Orders the recorded results as the layers stand in `model`."""
        order = {path_of(layer): i for i, layer in enumerate(leaf_layers(model))}
        self.results.sort(key=lambda r: order.get(r.layer, len(order)))


class Handler:
    """How a technique is applied. Override `prepare` and/or `finalize`.

    `prepare` may wrap layers for training (masks, fake quantization); the shared fine-tune loop
    runs between the two; `finalize` must leave stock Keras layers or registered kshrink layers.
    Both get the working copy of the model and may modify it in place or return a new one.
    `trains` says whether fine-tuning between them helps this technique (`trains_with` when
    that depends on the options).
    """

    trains: bool = False
    # What `prepare` hands `finalize` through `ctx.state`: made anew for every step.
    State: ClassVar[type] = dict
    # Whether the layers this step compresses hold a pattern (zeros, shared values) that
    # training would undo: `compress` then keeps them frozen while later steps fine-tune,
    # unless a later step takes them itself.
    settles: bool = False

    def trains_with(self, config: Technique) -> bool:
        return self.trains

    def callbacks(self, model: keras.Model, config: Technique, ctx: StepContext) -> list:
        """Keras callbacks the fine-tune loop runs while this technique trains."""
        return []

    def prepare(self, model: keras.Model, config: Technique, ctx: StepContext) -> keras.Model:
        return model

    def finalize(self, model: keras.Model, config: Technique, ctx: StepContext) -> keras.Model:
        return model

    def report(self, model: keras.Model, config: Technique, ctx: StepContext) -> StepReport:
        return StepReport(config.name, config.get_config(), tuple(ctx.results), ctx.summary)

    # Options a search starts this technique from when it is named without options (the
    # search then sets its levels and layers), e.g. `{"schedule": "one_shot"}`.
    search_options: ClassVar[dict] = {}

    # The size search (`kshrink.Size`) gives each layer's weights an encoding: float, or a
    # level of a technique that implements the methods below (cluster counts, int8/int4, a
    # plugin's); a technique that `thins` (prune) removes a share of them instead, and its
    # levels combine with the encoding. A technique that implements them joins the search by
    # name. The memory search (`kshrink.Memory`) offers the levels that `memory_bits` prices.

    # Whether the size levels remove a share of a layer's weights (untouched level first)
    # rather than encode the weights (the search adds "float", the untouched encoding).
    thins: ClassVar[bool] = False

    def size_levels(self, model: keras.Model, config: Technique) -> dict[str, tuple]:
        """Layer path -> the levels `config` (the search's template) can give its weights,
        for the layers it would take. Levels are hashable, and distinct from every other
        technique's (the search tells them apart by value)."""
        return {}

    def size_bits(self, config: Technique, level) -> float:
        """About the bits a compact file spends on each kernel value kept at `level`: the
        value's own bits, or for a technique that `thins`, what marking it kept costs."""
        raise NotImplementedError

    def size_kept(self, config: Technique, level) -> float:
        """For a technique that `thins`: the share of a layer's kernel values `level` keeps."""
        raise NotImplementedError

    def size_table_bytes(self, config: Technique, level, channels: int) -> float:
        """Bytes a layer with `channels` output channels adds at `level` besides its values
        (e.g. a codebook)."""
        return 0.0

    def size_step(self, config: Technique, levels: dict, trains: bool) -> Technique:
        """`config` giving each layer of `levels` (path -> level; untouched layers left out)
        its level; `trains`: the step is fine-tuned (e.g. quantization-aware) rather than
        applied after training."""
        raise NotImplementedError

    def size_probe(self, config: Technique, trains: bool) -> Technique:
        """The config a size probe (never fine-tuned) applies, as the candidates will: they
        are fine-tuned when `trains`. Default: `config` itself."""
        return config

    def memory_bits(self, config: Technique, level) -> float | None:
        """The bits each weight of a layer takes in memory at a size `level`; None: the
        level leaves it a float in memory (shared values), so the memory search skips it."""
        return None

    def offers_size_levels(self) -> bool:
        """Whether this technique's handler implements the size-search levels."""
        return type(self).size_levels is not Handler.size_levels

    def offers_memory_levels(self) -> bool:
        """Whether this technique's handler prices its size levels in memory."""
        return type(self).memory_bits is not Handler.memory_bits

    # The structure searches (`kshrink.Latency`, `kshrink.Macs`) remove parts of the model
    # (residual blocks, channels) by a level of a technique that implements the methods
    # below; what a level saves is measured on the model its probe makes, never estimated.

    def structure_levels(self, model: keras.Model, config: Technique,
                         per_layer: bool) -> dict[str, tuple[tuple, tuple[str, ...]]]:
        """Dimension -> `(levels, layers)`: the levels a part of the model can take, the
        untouched one first (a residual block kept or removed, a share of channels), and the
        names of the layers it covers (none: the whole model). `per_layer`: one dimension
        per set of layers where the technique could also take one for the whole model."""
        return {}

    def structure_steps(self, config: Technique, levels: dict, layers: dict,
                        gone: set) -> tuple[list, set]:
        """The steps giving each dimension of `levels` (dimension -> level; untouched ones
        left out) its level, and the names of the layers they remove. `layers`: dimension ->
        the layers it covers; `gone`: the layers the steps before these removed."""
        raise NotImplementedError

    def offers_structure_levels(self) -> bool:
        """Whether this technique's handler implements the structure-search levels."""
        return type(self).structure_levels is not Handler.structure_levels


_BY_NAME: dict[str, type[Technique]] = {}
_HANDLERS: dict[type[Technique], Handler] = {}
# Techniques register when their modules are imported. A package (kshrink itself included)
# names those modules in this entry-point group of its metadata, e.g. in pyproject.toml:
#   [project.entry-points."kshrink.techniques"]
#   round_float16 = "my_package.round_float16"
# and lookups import them first, so recipes and the command line find them by name.
ENTRY_POINTS = "kshrink.techniques"
_loaded = False


def _load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for entry in importlib.metadata.entry_points(group=ENTRY_POINTS):
        try:
            entry.load()
        except Exception as e:  # one broken plugin leaves the other techniques usable
            warnings.warn(f"the technique module {entry.value} ({entry.name}, registered in "
                          f"{ENTRY_POINTS}) failed to import: {type(e).__name__}: {e}",
                          stacklevel=3)


def register_technique(name: str, handler: Handler, stage: int):
    """Class decorator: registers a `Technique` subclass under `name` with its handler, at
    `stage` (a `Stage`, or an integer between two) in a recipe's order."""

    def decorate(cls: type[Technique]) -> type[Technique]:
        if name in _BY_NAME and _BY_NAME[name] is not cls:
            raise ValueError(f"technique name {name!r} is already registered")
        cls.name = name
        cls.stage = stage
        _BY_NAME[name] = cls
        _HANDLERS[cls] = handler
        return cls

    return decorate


def technique_class(name: str) -> type[Technique]:
    """The registered config class named `name` (e.g. "prune"); a `RecipeError` listing the
    registered names otherwise."""
    _load_plugins()
    try:
        return _BY_NAME[name]
    except KeyError:
        known = ", ".join(sorted(_BY_NAME)) or (
            f"none (techniques register through the {ENTRY_POINTS} entry points of installed "
            "packages: is kshrink installed?)")
        raise RecipeError(f"unknown technique {short(name)}. Registered: {known}") from None


def handler_for(config: Technique | type[Technique]) -> Handler:
    """The handler registered for `config`'s class (or for `config`, a class)."""
    _load_plugins()
    cls = config if isinstance(config, type) else type(config)
    try:
        return _HANDLERS[cls]
    except KeyError:
        raise RecipeError(f"{cls.__name__} is not a registered technique config") from None


def registered_techniques() -> list[type[Technique]]:
    """Every registered technique config class, sorted by name."""
    _load_plugins()
    return [_BY_NAME[name] for name in sorted(_BY_NAME)]
