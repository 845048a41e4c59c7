"""The `structured_prune` technique: remove whole channels, filters and units, so the model
is physically smaller and faster (see `prune.channels` for how channels are tied together)."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import keras
import numpy as np

from kshrink.core.data import example_count, model_inputs
from kshrink.core.graph import (as_functional, copy_model, is_plain, leaf_layers, path_of,
                                replace_layers)
from kshrink.core.select import Select
from kshrink.core.options import Int, Number, OneOf, calibration_option, option, selection
from kshrink.core.technique import Handler, Stage, StepContext, Technique, register_technique
from kshrink.core.training import task_loss
from kshrink.errors import KshrinkError
from kshrink.layers.batchnorm import inference, is_batchnorm
from kshrink.layers.internals import build_for_fit
from kshrink.layers.specs import as_matrix, spec_for
from kshrink.layers.transformer import PROJECTIONS
from kshrink.prune import attention
from kshrink.prune.channels import Group, channel_groups, dropped, narrowed
from kshrink.reconstruct.refit import refit

IMPORTANCES = ("l1", "l2", "bn_gamma", "taylor")
METHODS = ("remove", "reconstruct")
REFIT_SAMPLES = 512  # at most this many examples of data are held while re-fitting
_GATE_STEP = 1e-3  # SGD step on the channel gates; small enough to leave the model as it is
SCOPES = ("layer", "global")
# The structure searches' levels: the share of channels removed
SEARCH_RATIOS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.75)
SEARCH_DIMENSION = "channels"


class StructuredPruneHandler(Handler):
    """Runs `StructuredPrune`: removes whole channels and rebuilds narrower layers."""

    trains = True
    search_options = {"round_to": 4}  # channel counts that vectorize

    def structure_levels(self, model, config: StructuredPrune, per_layer: bool) -> dict:
        # One ratio for the model, or one per set of layers whose channels are tied (by
        # residual Adds and the like): `channels conv1+conv2`
        if not per_layer:
            return {SEARCH_DIMENSION: (SEARCH_RATIOS, ())}
        chosen = {layer.name for layer in _chosen(model, config)}
        spaces = {group.space for group in channel_groups(model) if group.pinned_by is None}
        return {f"{SEARCH_DIMENSION} {'+'.join(space)}": (SEARCH_RATIOS, space)
                for space in sorted(spaces) if set(space) <= chosen}

    def structure_steps(self, config: StructuredPrune, levels: dict, layers: dict,
                        gone: set):
        steps = []
        for ratio in sorted({level for level in levels.values() if level}, reverse=True):
            dimensions = [d for d, level in levels.items() if level == ratio]
            if any(not layers[d] for d in dimensions):  # the model's one ratio
                steps.append(dataclasses.replace(config, ratio=ratio))
                continue
            names = tuple(sorted({name for d in dimensions for name in layers[d]} - gone))
            if names:
                steps.append(dataclasses.replace(config, ratio=ratio,
                                                 layers=Select(names=names), exclude=None))
        return steps, set()

    def prepare(self, model, config: StructuredPrune, ctx: StepContext):
        model = _inline_nested(model, ctx)
        layers = {layer.name: layer for layer in model.layers}
        groups = channel_groups(model)
        chosen = {l.name for l in _chosen(model, config)}
        for group in groups:
            if group.pinned_by is None and any(n not in chosen for n in group.space):
                group.pinned_by = "a layer the recipe leaves alone"
        free = [g for g in groups if g.pinned_by is None]
        taylor = None
        if config.importance == "taylor":
            if ctx.data is None:
                raise KshrinkError("structured_prune: taylor importance needs data: pass "
                                   "data=(x, y) to compress")
            producers = {name for g in free for name in g.space}
            x, y = (part[:config.calibration_samples] for part in ctx.data)
            taylor = taylor_scores(model, producers, x, y)
        scores = {id(g): _importance(g, layers, config.importance, taylor) for g in free}
        dead = {id(g) for g in free if _is_dead(g, layers)}
        remove = _choose(free, scores, dead, config)
        _report(model, groups, remove, ctx)
        if remove:
            pruned = narrowed(model, remove)
            if _method(config, ctx) == "reconstruct":
                _refit(model, pruned, remove, config, ctx)
            model = pruned
        return _cut_blocks(model, config, ctx)


def _inline_nested(model, ctx: StepContext):
    """`model` with the functional or Sequential models nested in it (a pretrained base under
    a new head) inlined, so that channels flow through them; as it is when none is, or when
    one is a subclass (its graph is not plain)."""
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if not nested or not is_plain(model) or not all(is_plain(m) for m in nested):
        return model
    try:
        flat = as_functional(model)
    except ValueError:  # e.g. a name used inside and outside: left nested, its channels pinned
        return model
    ctx.note(f"nested model{'s' if len(nested) > 1 else ''} "
             f"{', '.join(m.name for m in nested)} inlined")
    return flat


def _cut_blocks(model, config, ctx: StepContext):
    """Removes attention heads and feed-forward units of the transformer blocks the recipe
    selects (all of a block's layers), at the step's ratio (`prune.attention`)."""
    found, why = attention.blocks(model)
    if not found and not why:
        return model
    inside = defaultdict(list)
    for layer in leaf_layers(model):
        if layer.weights:
            inside[path_of(layer).split("/")[0]].append(layer)
    chosen = {id(layer) for layer in _chosen(model, config)}
    order = 1 if config.importance == "l1" else 2
    cuts = [attention.plan(block, config.ratio, order,
                           lambda width: _keep_count(width, config.ratio, config))
            for block in found if all(id(l) in chosen for l in inside[block.name])]
    reported = {path_of(l) for c in cuts for l in inside[c.layer.name]}
    reported |= {path_of(l) for block in model.layers if id(block) in why
                 for l in inside[block.name]}
    ctx.results = [r for r in ctx.results if r.layer not in reported]
    for block in model.layers:
        if id(block) in why:
            for layer in inside[block.name]:
                ctx.skipped(layer, f"heads stay: {type(block).__name__} {block.name!r} is "
                                   f"{why[id(block)]}")
    for c in cuts:
        _report_cut(c, inside[c.layer.name], ctx)
    pruned = attention.cut(model, cuts)
    if pruned is not model:
        notes = [f"{len(cuts)} transformer block{'s' if len(cuts) != 1 else ''} narrowed "
                 "(heads and feed-forward units ranked by weight norms)"]
        if not is_plain(model):
            notes.append(f"the {type(model).__name__} became a functional model of its layers")
        if config.method == "reconstruct":
            notes.append("heads and units are removed, not re-fitted")
        ctx.summary = "; ".join(([ctx.summary] if ctx.summary else []) + notes)
    return pruned


def _report_cut(c: attention.Cut, layers: list, ctx: StepContext) -> None:
    heads = f"{c.attention.num_heads} -> {len(c.heads)} heads"
    units = c.feedforward
    for layer in layers:
        if units is not None and layer is units[0]:
            ctx.applied(layer, f"{layer.units} -> {len(c.units)} feed-forward units")
        elif units is not None and layer is units[1]:
            ctx.applied(layer, "follows the feed-forward units removed before it")
        elif any(layer is getattr(c.attention, part) for part in PROJECTIONS):
            ctx.applied(layer, heads)
        else:
            ctx.skipped(layer, "the hidden size stays: LayerNormalization and the residual "
                               "Adds read it")


def _method(config, ctx: StepContext) -> str:
    """The method asked for; by default re-fit when there is data to re-fit on."""
    if config.method is not None:
        return config.method
    return "remove" if ctx.data is None else "reconstruct"


def _refit(model, pruned, remove, config, ctx: StepContext) -> None:
    """Re-fits the layers that read removed channels (`reconstruct.refit`)."""
    if ctx.data is None:
        raise KshrinkError("structured_prune: method reconstruct re-fits layers on data: pass "
                           "data=(x, y) (or just x) to compress")
    drop_out, drop_in, _ = dropped(remove)
    kept = {}
    for layer in model.layers:
        spec = spec_for(layer)
        if layer.name in drop_in and spec is not None and spec.width:
            width = layer.get_config()[spec.width]
            kept[layer.name] = [c for c in range(width) if c not in drop_out.get(layer.name, ())]
    x = model_inputs(ctx.data, min(config.calibration_samples, REFIT_SAMPLES))
    done = refit(model, pruned, x, kept)
    note = (f"{len(done)} layer{'s' if len(done) != 1 else ''} re-fitted by least squares on "
            f"{example_count(x)} examples")
    ctx.summary = f"{ctx.summary}; {note}" if ctx.summary else note


def _chosen(model, config) -> list:
    """The layers the recipe's `layers` and `exclude` leave to this step."""
    candidates = list(leaf_layers(model))
    chosen = config.layers.resolve(candidates) if config.layers else candidates
    if config.exclude is not None:
        excluded = {id(l) for l in config.exclude.resolve(candidates)}
        chosen = [l for l in chosen if id(l) not in excluded]
    return chosen


def _column(layer, c: int) -> np.ndarray:
    """The weights that compute output channel `c` of a producer (a Separable's pointwise
    kernel: its depthwise kernel computes no new channels)."""
    weight = next(w for w in spec_for(layer).kernels if len(w.output_axes) == 1)
    variable = next(v for v in layer.weights if v.name == weight.name)
    return as_matrix(keras.ops.convert_to_numpy(variable.value), weight.output_axes)[:, c]


def _importance(group: Group, layers: dict, kind: str, taylor: dict | None = None) -> float:
    if kind == "taylor":
        return float(sum(taylor[name][c] for name, c in group.producers))
    if kind == "bn_gamma":
        gammas = []
        for name, c in group.per_channel:
            gamma = inference(layers[name]).gamma if is_batchnorm(layers[name]) else None
            if gamma is not None:
                gammas.append(abs(float(gamma[c])))
        if gammas:
            return sum(gammas)
    order = 1 if kind == "l1" else 2
    return float(sum(np.linalg.norm(_column(layers[name], c), order)
                     for name, c in group.producers))


class _ChannelGate(keras.layers.Wrapper):
    """Multiplies a layer's output channels by trainable gates, all 1: the gradient of the
    loss with respect to gate c is the sum of activation x gradient over channel c."""

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        channels = self.layer.compute_output_shape(input_shape)[-1]
        self.gate = self.add_weight(name="gate", shape=(channels,), initializer="ones")
        self.built = True

    def call(self, inputs):
        return self.layer(inputs) * self.gate


def taylor_scores(model, producers: set[str], x, y) -> dict[str, np.ndarray]:
    """First-order Taylor importance (Molchanov et al., 2017) of every output channel of the
    `producers`: |sum of activation x gradient of the loss| over `x`.

    Computed without backend code: a copy of the model gets a gate on each producer's output,
    only the gates train, one epoch of plain SGD with a tiny step moves each gate by the step
    times the accumulated gradient, and the move is read back.
    """
    gated = replace_layers(copy_model(model),
                           lambda l: _ChannelGate(l) if l.name in producers else l)
    for layer in leaf_layers(gated):
        layer.trainable = isinstance(layer, _ChannelGate)
    gated.compile(optimizer=keras.optimizers.SGD(_GATE_STEP), loss=task_loss(model, y))
    build_for_fit(gated, (x, y))
    gated.fit(x, y, batch_size=128, epochs=1, shuffle=False, verbose=0)
    return {layer.layer.name: np.abs(1 - keras.ops.convert_to_numpy(layer.gate)) / _GATE_STEP
            for layer in leaf_layers(gated) if isinstance(layer, _ChannelGate)}


def _is_dead(group: Group, layers: dict) -> bool:
    """True if every channel of the group is zero whatever the input: removing it is exact."""
    numpy = keras.ops.convert_to_numpy
    for name, c in group.producers:
        layer = layers[name]
        if np.any(_column(layer, c)) or (layer.use_bias and numpy(layer.bias)[c] != 0):
            return False
    for name, c in group.per_channel:
        layer = layers[name]
        if is_batchnorm(layer):
            if inference(layer).shift[c] != 0:
                return False
        elif getattr(layer, "use_bias", False) and numpy(layer.bias)[c] != 0:
            return False
    return True


def _choose(free: list[Group], scores: dict, dead: set, config) -> list[Group]:
    """The groups to remove: dead ones always, then the least important up to the ratio."""
    spaces = defaultdict(list)
    for group in free:
        spaces[group.space].append(group)
    remove = []
    if config.scope == "layer":
        for members in spaces.values():
            keep = _keep_count(len(members), config.ratio, config)
            ordered = sorted(members, key=lambda g: (id(g) not in dead, scores[id(g)]))
            removable = len(members) - keep
            extra_dead = [g for g in ordered[removable:] if id(g) in dead]
            remove += ordered[:removable] + extra_dead[:max(0, keep - config.min_channels)]
        return remove
    # global: importance relative to its own layer's mean, so wide and narrow layers compare
    relative = {}
    for members in spaces.values():
        mean = np.mean([scores[id(g)] for g in members]) or 1.0
        relative.update({id(g): scores[id(g)] / mean for g in members})
    budget = int(config.ratio * len(free))
    ordered = sorted(free, key=lambda g: (id(g) not in dead, relative[id(g)]))
    taken = defaultdict(int)
    for group in ordered:
        members = spaces[group.space]
        floor = max(config.min_channels, 1)
        if len(members) - taken[group.space] <= floor:
            continue
        if id(group) not in dead and sum(taken.values()) >= budget:
            continue
        taken[group.space] += 1
        remove.append(group)
    # round each layer's kept width up to a multiple of round_to by giving back the best
    kept_back = set()
    for space, members in spaces.items():
        width = len(members) - taken[space]
        target = min(len(members), math.ceil(width / config.round_to) * config.round_to)
        removed_here = sorted((g for g in remove if g.space == space and id(g) not in dead),
                              key=lambda g: -relative[id(g)])
        kept_back.update(id(g) for g in removed_here[:target - width])
    return [g for g in remove if id(g) not in kept_back]


def _keep_count(width: int, ratio: float, config) -> int:
    keep = math.ceil(width * (1 - ratio) / config.round_to) * config.round_to
    return min(width, max(keep, config.min_channels))


def _report(model, groups, remove, ctx: StepContext) -> None:
    before, after, pinned = defaultdict(int), defaultdict(int), {}
    removed = {id(g) for g in remove}
    for group in groups:
        names = {name for name, _ in group.producers + group.per_channel}
        names |= {name for name, _ in group.consumers}
        for name in {n for n, _ in group.producers}:
            before[name] += 1
            after[name] += id(group) not in removed
        if group.pinned_by:
            for name in names:
                pinned.setdefault(name, group.pinned_by)
    shrunk_inputs = {name for g in remove for name, _ in g.consumers + g.per_channel}
    for layer in leaf_layers(model):
        if not layer.weights:
            continue
        if before.get(layer.name, 0) != after.get(layer.name, 0):
            ctx.applied(layer, f"{before[layer.name]} -> {after[layer.name]} output channels")
        elif layer.name in shrunk_inputs:
            ctx.applied(layer, "follows the channels removed before it")
        elif layer.name in pinned:
            ctx.skipped(layer, f"channels pinned by {pinned[layer.name]}")
        else:
            ctx.skipped(layer, "no channel removed")


@register_technique("structured_prune", handler=StructuredPruneHandler(), stage=Stage.REWRITE)
@dataclasses.dataclass(frozen=True)
class StructuredPrune(Technique):
    """Removes whole channels (Conv filters, Dense units) so the model really shrinks.

    Channels tied together by the graph (a residual Add, a Concatenate, BatchNorm, Depthwise,
    pooling, Flatten into a Dense) are removed together, with every weight that reads or
    writes them; channels the analysis cannot follow (model inputs and outputs, unknown or
    custom layers, nested models) are kept and reported. Channels that are zero whatever the
    input (dead units, e.g. after unstructured pruning) are always removed: that is exact.
    The result is stock Keras layers, narrower.

    Transformers lose attention heads and feed-forward units at the same ratio: a stock
    `MultiHeadAttention` is rebuilt with fewer heads; a keras-hub `TransformerEncoder` is
    rebuilt as the stock layers it is made of, with fewer heads and units (its own config
    cannot hold heads narrower than `hidden_dim // num_heads`). A keras-hub Backbone comes
    back as a functional model of its layers. Heads rank by the norms of their value and
    output kernels, units by their two kernels (`l1` or `l2`). The hidden size stays:
    LayerNormalization and the residual Adds read it. A block is narrowed when all of its
    layers are selected.

    Args:
        ratio: share of the channels to remove: of each layer's (`scope: layer`) or of all
            prunable channels, least important first (`scope: global`, importance relative to
            the layer's mean).
        importance: `"l1"` or `"l2"` norm of the weights computing a channel, `"bn_gamma"`
            (|gamma| of the BatchNorm after it; l2 where there is none), or `"taylor"`:
            |activation x gradient| of the loss on `calibration_samples` of `data`.
        scope: `"layer"` or `"global"`.
        round_to: keep a multiple of this many channels per layer (e.g. 8 for fast kernels).
        min_channels: never keep fewer channels than this in a layer.
        method: `"remove"` the channels, or `"reconstruct"`: then re-fit each Dense or
            convolution that read removed channels by least squares on (at most 512 of the
            first `calibration_samples`) examples of `data`, so it computes what it did from
            what it still receives (He et al. 2017; ThiNet). BatchNorm statistics are
            re-estimated after the step as usual. Default (null): reconstruct when `compress`
            has data, remove otherwise.
        calibration_samples: examples of `data` used by taylor importance and reconstruct.
        layers: the layers whose output channels may be removed (default: all).
        exclude: layers whose output channels stay.

    For gradual pruning, list the step several times in a recipe with fine-tuning between.

    Example:

    ```python
    small, report = kshrink.compress(model, kshrink.StructuredPrune(ratio=0.5), data=(x, y),
                                     fine_tune=kshrink.FineTune(epochs=3))
    ```
    """

    ratio: float = option(0.5, "share of channels to remove", Number(0.0, 1.0, high_open=True))
    importance: str = option("l1", "l1, l2, bn_gamma or taylor", OneOf(IMPORTANCES))
    method: str | None = option(None, "remove, or reconstruct: re-fit the layers reading "
                                      "removed channels on data (default: reconstruct with "
                                      "data)", OneOf(METHODS, allow_none=True))
    scope: str = option("layer", "layer or global", OneOf(SCOPES))
    round_to: int = option(1, "keep a multiple of this many channels per layer", Int(low=1))
    min_channels: int = option(1, "fewest channels a layer keeps", Int(low=1))
    calibration_samples: int = calibration_option(2048, "examples used by taylor importance")
    layers: Select | None = selection("layers whose channels may be removed (default: all)")
    exclude: Select | None = selection("layers whose channels stay")
