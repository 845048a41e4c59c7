"""Magnitude pruning: the `prune` technique, its training callback, and wrap/strip helpers.

Use it through `kshrink.compress` (the shared fine-tune loop runs the schedule), or in your own
training loop:

```python
pruned = kshrink.prune.wrap(model, kshrink.Prune(sparsity=0.9, end_step=2000))
pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
pruned.fit(x, y, callbacks=[kshrink.prune.PruningCallback(pruned)])  # 90% from step 2000
model = kshrink.prune.strip(pruned)  # stock layers, zeros baked in, same layer names
```
"""

from __future__ import annotations

import dataclasses
import weakref

import keras
import numpy as np

from kshrink.core.classes import is_user_class
from kshrink.core.data import example_count, take
from kshrink.core.graph import copy_model, leaf_layers, owner_of, path_of, replace_layers
from kshrink.core.progress import within
from kshrink.layers import (
    PruneWrapper,
    as_matrix,
    from_matrix,
    kernel_weights,
    output_axes,
    quantization,
)
from kshrink.layers.specs import matrix_shape
from kshrink.layers.wrappers import hold_zeros, release_zeros
from kshrink.core.select import Select, shared_level
from kshrink.core.options import (
    Flag,
    Int,
    Number,
    OneOf,
    Overrides,
    calibration_option,
    option,
    selection,
)
from kshrink.core.technique import (
    Handler,
    LayerOverride,
    Stage,
    StepContext,
    Technique,
    register_technique,
)
from kshrink.errors import KshrinkError, RecipeError
from kshrink.prune import masks as masklib
from kshrink.prune.allocate import PROBE_SAMPLES, allocate
from kshrink.prune.reconstruct import prune_from_calibration, pruned_alone, refit_blocks, unmasked
from kshrink.reconstruct import calibration_inputs
from kshrink.prune.schedule import SCHEDULES, Schedule

SCOPES = ("layer", "global", "sensitivity")
METHODS = ("magnitude", "wanda", "sparsegpt")
DEFAULT_SPARSITY = 0.5
# What the size search offers each layer; about what a compact file's compressed bitmap costs
# each value a sparse layer keeps
SEARCH_SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98)
POSITION_BITS = 2.0


@dataclasses.dataclass
class PruneState:
    """What a prune step carries from `prepare` to `finalize`, by layer path."""

    config: Prune | None = None  # the options in effect (targets rescaled for dense layers)
    schedule: object = None  # the sparsity schedule over the fine-tune's steps
    counted: set[str] = dataclasses.field(default_factory=set)  # in the summary's total
    pruned: set[str] = dataclasses.field(default_factory=set)
    allocation: dict = dataclasses.field(default_factory=dict)  # scope "sensitivity"
    methods: dict[str, str] = dataclasses.field(default_factory=dict)  # where not `method`


class PruneHandler(Handler):
    """Runs `Prune`: wraps the chosen layers, sets masks (at once or along the schedule while
    fine-tuning), bakes the zeros into stock layers at the end."""

    trains = True
    State = PruneState
    settles = True
    search_options = {"schedule": "one_shot"}
    thins = True

    def size_levels(self, model, config: Prune) -> dict:
        if config.pattern_spec.is_n_of_m:
            raise KshrinkError(f"search: pattern {config.pattern} fixes each layer's sparsity, "
                               "and the search chooses it: give prune an unstructured or block "
                               "pattern")
        chosen = StepContext(original=model).choose_layers(
            model, config.layers, config.exclude, _skip_reason, in_place=lambda layer: True)
        return {path_of(layer): SEARCH_SPARSITIES for layer in chosen}

    def size_kept(self, config: Prune, level: float) -> float:
        return 1 - level

    def size_bits(self, config: Prune, level: float) -> float:
        return POSITION_BITS if level else 0.0

    def size_step(self, config: Prune, levels: dict, trains: bool) -> Prune:
        # The sparsity most layers share is the step's, the others are overrides; fine-tuned,
        # magnitude pruning follows a gradual schedule.
        main, others = shared_level(levels)
        gradual = trains and config.method == "magnitude"
        return dataclasses.replace(
            config, sparsity=main, scope="layer", skip_first_last=False,
            overrides=tuple(SparsityOverride(layers=layers, sparsity=s) for s, layers in others),
            schedule=(config.schedule if config.schedule != "one_shot" else "polynomial")
            if gradual else "one_shot",
            layers=Select(names=tuple(sorted(levels))), exclude=None)

    def prepare(self, model, config: Prune, ctx: StepContext):
        chosen, effective = _choose_layers(model, config, ctx)
        if config.scope == "sensitivity":
            effective = _measured_targets(model, chosen, effective, ctx)
        solved = config.method != "magnitude"
        dense = {id(v): keras.ops.convert_to_numpy(v.value) for layer in chosen
                 for v in kernel_weights(layer)} if solved or config.refit else {}
        wrapped = wrap(model, effective, layers=chosen, copy=False)
        ctx.state.config = effective
        ctx.state.schedule = effective.schedule_for(ctx.train_steps)
        if dense:
            # The magnitude masks set each layer's sparsity; the solver picks the weights, and
            # refit fits them toward the unpruned model.
            for layer in chosen:
                for v in kernel_weights(layer):
                    v.assign(dense[id(v)])
            unpruned = unmasked(wrapped)
            if solved:
                prune_from_calibration(wrapped, effective, ctx, unpruned)
            for handle in _IN_PLACE.get(wrapped, ()):  # the solver sees the graph's layers
                if solved:
                    ctx.state.methods[path_of(handle.layer)] = (
                        f"magnitude: {config.method} does not reach layers inside custom "
                        "layers yet")
                for w, mask in zip(handle.pruned, handle.masks):
                    w.assign(_apply(keras.ops.convert_to_numpy(w.value),
                                    keras.ops.convert_to_numpy(mask.value)))
            if config.refit:
                refit_blocks(wrapped, effective, ctx, unpruned, _IN_PLACE.get(wrapped, ()))
        if ctx.train_steps is not None:
            for handle in _IN_PLACE.get(wrapped, ()):
                handle.hold()  # fixed masks (see _choose_layers): kept while training
        return wrapped

    def callbacks(self, model, config: Prune, ctx: StepContext):
        if config.method != "magnitude":
            return []  # the masks are the solver's; fine-tuning trains the weights it kept
        return [PruningCallback(model, ctx.state.config, schedule=ctx.state.schedule)]

    def finalize(self, model, config: Prune, ctx: StepContext):
        fixed = config.method != "magnitude"
        state: PruneState = ctx.state
        stripped = strip(model, None if fixed else state.config)
        zeros_total = size_total = 0
        for layer in leaf_layers(stripped):
            if path_of(layer) in state.counted:
                weights = [np.asarray(keras.ops.convert_to_numpy(w.value))
                           for w in kernel_weights(layer)]
                size = sum(w.size for w in weights)
                zeros = sum(int(np.sum(w == 0)) for w in weights)
                zeros_total, size_total = zeros_total + zeros, size_total + size
                if path_of(layer) in state.pruned:
                    target = ("global threshold" if config.scope == "global" else
                              f"target {state.config.sparsity_for(layer):.3f}")
                    if allocated := state.allocation.get(path_of(layer)):
                        target += (f" from sensitivity: output error {allocated.error:.2g} "
                                   "with it alone pruned")
                    how = state.methods.get(path_of(layer), config.method)
                    ctx.applied(layer, f"sparsity {zeros / size:.3f} ({target}, "
                                       f"{config.pattern}, {how})")
        ctx.sort_results(stripped)
        overridden = (f", {len(config.overrides)} override(s)" if config.overrides else "")
        reached = (f"sparsity {zeros_total / size_total:.3f} over the {size_total:,} "
                   f"weights of {len(state.counted)} layers "
                   f"(target {config.target_sparsity:.3f}, {config.scope} scope{overridden})")
        ctx.summary = f"{reached}; {ctx.summary}" if ctx.summary else reached
        return stripped


def _skip_reason(layer) -> str | None:
    if quantization(layer):
        return "quantized layers are not pruned; prune before quantize"
    if not kernel_weights(layer):
        return f"{type(layer).__name__}: no prunable weights" + (
            "; give the class get_prunable_weights() returning its kernels, or register a "
            "LayerSpec (kshrink.layers.register_spec)" if is_user_class(type(layer)) else "")
    return None


def _choose_layers(model, config: Prune, ctx: StepContext) -> tuple[list, Prune]:
    """The layers to prune, and the options that make the target hold over every weight the
    step may touch: when the first/last layers stay dense, the others prune further."""
    everything = [l for l in leaf_layers(model) if kernel_weights(l)]
    # A layer built by its container is pruned where it stands, with no wrapper, so its mask
    # cannot follow a schedule while training: there it takes fixed masks only.
    fixed = (config.schedule == "one_shot" or config.pattern_spec.is_n_of_m
             or config.method != "magnitude")
    in_place = (lambda layer: True) if fixed or ctx.train_steps is None else None
    chosen = ctx.choose_layers(model, config.layers, config.exclude, _skip_reason, in_place,
                               "schedule: one_shot prunes it where it stands")
    ctx.state.counted = {path_of(l) for l in chosen}
    for override in config.overrides:
        override.layers.resolve(chosen)  # each must match a layer the step prunes
    # Layers an override names prune to its sparsity; the target holds over the others.
    free = [l for l in chosen if config.override_for(l) is None]
    effective = config
    if config.layers is None:
        kept = _kept_dense(free, everything, config)
        total = sum(map(_size, free))
        for layer, why in kept:
            ctx.skipped(layer, f"{why} kept dense (it holds {_size(layer) / total:.1%} of the "
                               "weights)")
        dense = {id(layer) for layer, _ in kept}
        chosen = [l for l in chosen if id(l) not in dense]
        free = [l for l in free if id(l) not in dense]
        if kept and free and not config.pattern_spec.is_n_of_m:
            scale = total / sum(map(_size, free))
            sparsity = config.target_sparsity * scale
            effective = dataclasses.replace(
                config, sparsity=sparsity,
                initial_sparsity=min(config.initial_sparsity * scale, sparsity))
    if not chosen:
        raise ctx.nothing_left("prune", "prune")
    for layer in chosen:
        for w in kernel_weights(layer):
            masklib.check_fits(config.pattern_spec, tuple(w.shape), output_axes(layer, w.name),
                               f"layer {path_of(layer)!r} ({w.name} {tuple(w.shape)})")
    ctx.state.pruned = {path_of(l) for l in chosen}
    return chosen, effective


def _measured_targets(model, chosen: list, config: Prune, ctx: StepContext) -> Prune:
    """`config` at layer scope with one override per chosen layer: the sparsity `allocate`
    gives it from its measured effect on the model's outputs."""
    x = calibration_inputs(ctx.data, config.calibration_samples, "prune: scope sensitivity")
    probe = take(x, PROBE_SAMPLES)
    allocation = allocate(model, chosen, config.target_sparsity, probe,
                          cap=config.max_layer_sparsity,
                          prune=pruned_alone(model, chosen, config, x),
                          progress=within(ctx.progress, "prune, sensitivity"))
    ctx.state.allocation = allocation
    spread = sorted(allocation.values(), key=lambda a: a.sparsity)
    ctx.note(f"sensitivity: {len(allocation)} layers pruned alone ({config.method}) and "
             f"measured on {example_count(probe)} examples; sparsity from "
             f"{spread[0].sparsity:.2f} to {spread[-1].sparsity:.2f}")
    overrides = tuple(SparsityOverride(layers=Select(names=(path,)), sparsity=a.sparsity)
                      for path, a in allocation.items())
    return dataclasses.replace(config, scope="layer", overrides=overrides)


def _size(layer) -> int:
    return sum(int(np.prod(w.shape)) for w in kernel_weights(layer))


def _fan_in(layer) -> int:
    """How many weights each output of `layer` is computed from (the fewest over its
    kernels): 9 for a 3x3 depthwise convolution, 27 for a 3x3 convolution of RGB."""
    return min(matrix_shape(tuple(w.shape), output_axes(layer, w.name))[0]
               for w in kernel_weights(layer))


def _kept_dense(chosen: list, everything: list, config: Prune) -> list:
    """`(layer, why)` for the chosen layers that stay dense while the others reach the
    target at a sensible sparsity: pruned no further than a quarter of the way from the
    target to 1 (so they keep at least 3/4 of the density the target allows).

    Candidates, in this order: the model's first and last prunable layers
    (`skip_first_last`), then, smallest first, the layers whose outputs each see fewer than
    `min_fan_in` weights (depthwise convolutions): with so few weights per output, the
    ones left cannot make up for the ones pruned. A candidate holding much of the weights
    (LeNet-300-100's fc1: 88%) is pruned. Under an N:M pattern every candidate stays dense."""
    total = sum(map(_size, chosen))
    target = config.target_sparsity
    ceiling = min(target + (1 - target) / 4, config.max_layer_sparsity)
    chosen_ids = {id(layer) for layer in chosen}
    candidates = []
    if config.skip_first_last and len(everything) > 2:
        candidates += [(everything[0], "first prunable layer (skip_first_last)"),
                       (everything[-1], "last prunable layer (skip_first_last)")]
    narrow = sorted((l for l in chosen if _fan_in(l) < config.min_fan_in), key=_size)
    candidates += [(l, f"{type(l).__name__} with {_fan_in(l)} weights per output "
                       f"(min_fan_in {config.min_fan_in})") for l in narrow]
    kept, dense = [], 0
    for layer, why in candidates:
        if id(layer) not in chosen_ids or any(layer is k for k, _ in kept):
            continue
        needed = target * total / max(total - dense - _size(layer), 1)
        if config.pattern_spec.is_n_of_m or needed <= ceiling:
            kept.append((layer, why))
            dense += _size(layer)
    return kept


def wrap(model: keras.Model, config: Prune, *, layers=None, copy: bool = True) -> keras.Model:
    """A model whose chosen layers are `PruneWrapper`s (masks all ones, or at the target for
    a one-shot schedule). The input model is copied first unless `copy=False`.

    Args:
        model: a Sequential or functional model.
        config: the pruning options.
        layers: the layers to wrap (default: every layer with prunable weights that
            `config.layers`/`exclude`/`skip_first_last` allow; the others then prune further
            where the first/last layers stay dense, so the target holds over all of them).

    Layers a custom layer builds (keras-hub blocks) cannot be wrapped: they are pruned in
    place, and their zeros hold through training only inside `compress` (which fixes their
    masks); in your own loop, `strip` prunes them again at the end.
    """
    if copy:
        model = copy_model(model)
    if layers is None:
        ctx = StepContext(original=model, state=PruneState())
        layers, config = _choose_layers(model, config, ctx)
    ids = {id(l) for l in layers if not owner_of(l)}
    wrapped = replace_layers(model, lambda l: PruneWrapper(l) if id(l) in ids else l)
    _OPTIONS[wrapped] = config  # what PruningCallback and strip use by default
    _IN_PLACE[wrapped] = [InPlaceMasks(l) for l in layers if owner_of(l)]
    if config.schedule == "one_shot" or config.pattern_spec.is_n_of_m:
        update_masks(_wrappers(wrapped), config.target_sparsity, config)
    return wrapped


def strip(model: keras.Model, config: Prune | None = None) -> keras.Model:
    """Stock layers again: masks baked into the weights, wrappers removed, names unchanged.

    With `config`, masks are first brought to its final sparsity, so the target is met even if
    training stopped before the schedule ended.
    """
    wrappers = _wrappers(model)
    if config is not None:
        update_masks(wrappers, config.target_sparsity, config)
    for wrapper in wrappers:
        for weight, mask in zip(wrapper.pruned, wrapper.masks):
            weight.assign(_apply(keras.ops.convert_to_numpy(weight.value),
                                 keras.ops.convert_to_numpy(mask.value)))
        if isinstance(wrapper, InPlaceMasks):
            wrapper.release()
    return replace_layers(model, lambda l: l.layer if isinstance(l, PruneWrapper) else l)


def update_masks(wrappers, sparsity: float, config: Prune) -> None:
    """Recomputes every mask at `sparsity` from current magnitudes and zeroes pruned weights."""
    entries = [(w, mask, output_axes(wrapper.layer, w.name))
               for wrapper in wrappers for w, mask in zip(wrapper.pruned, wrapper.masks)]
    if not entries:
        return
    matrices = [as_matrix(keras.ops.convert_to_numpy(w.value), axis)
                for w, _, axis in entries]
    previous = [as_matrix(keras.ops.convert_to_numpy(m.value), axis)
                for _, m, axis in entries]
    if config.overrides:  # each layer along the schedule, in proportion to its own target
        progress = sparsity / config.target_sparsity if config.target_sparsity else 1.0
        sparsity = [config.sparsity_for(wrapper.layer) * progress
                    for wrapper in wrappers for _ in wrapper.pruned]
    new = masklib.magnitude_masks(matrices, previous, sparsity, config.pattern_spec,
                                  config.scope, config.max_layer_sparsity)
    for (w, mask, axis), matrix in zip(entries, new):
        values = from_matrix(matrix, tuple(w.shape), axis)
        mask.assign(values)
        w.assign(_apply(keras.ops.convert_to_numpy(w.value), values))


def _apply(weights: np.ndarray, mask: np.ndarray) -> np.ndarray:
    # Not weights * mask: that turns pruned negative weights into -0.0, whose set sign bit
    # breaks the zero runs that make a pruned file compress (deflate: 0.19 vs 0.14 at 90%).
    return np.where(mask > 0, weights, np.zeros_like(weights))


class InPlaceMasks:
    """The masks of a layer that cannot be wrapped (one a container or a model subclass
    builds), with `PruneWrapper`'s `layer`, `pruned` and `masks`: pruning zeroes its weights
    in place. While training, `hold` keeps the zeros through each optimizer step with a
    variable constraint; the mask is then fixed, as a constraint is traced once under JAX.
    """

    def __init__(self, layer):
        self.layer = layer
        self.pruned = kernel_weights(layer)
        self.masks = [keras.Variable(np.ones(w.shape, dtype="float32"), trainable=False,
                                     name=f"{w.name}_mask") for w in self.pruned]
        self._held = ()

    def hold(self) -> None:
        self._held = hold_zeros(self.pruned, [keras.ops.convert_to_numpy(m.value)
                                              for m in self.masks])

    def release(self) -> None:
        release_zeros(self._held)
        self._held = ()


# The in-place masks of each model `wrap` made, beside its wrappers.
_IN_PLACE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_OPTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # wrapped model -> Prune


def _wrappers(model) -> list:
    return ([l for l in leaf_layers(model) if isinstance(l, PruneWrapper)]
            + _IN_PLACE.get(model, []))


class PruningCallback(keras.callbacks.Callback):
    """Updates the masks of a wrapped model on its schedule while `fit` runs.

    Args:
        model: the model returned by `wrap` (the one being trained, or a Distiller's student).
        config: the pruning options (default: the ones `wrap` pruned with).
        schedule: an explicit `Schedule` (default: `config.schedule_for(None)`).
    """

    def __init__(self, model: keras.Model, config: Prune | None = None,
                 schedule: Schedule | None = None):
        super().__init__()
        self._wrappers = _wrappers(model)
        if not self._wrappers:
            raise KshrinkError("PruningCallback: the model has no pruned layers; "
                               "wrap it with kshrink.prune.wrap first")
        self._config = config or _OPTIONS.get(model)
        if self._config is None:
            raise KshrinkError("PruningCallback: pass config=kshrink.Prune(...); the model was "
                               "not made by kshrink.prune.wrap")
        self._schedule = schedule or self._config.schedule_for(None)
        self.step = 0

    def on_train_batch_begin(self, batch, logs=None):
        if self._schedule.updates_at(self.step):
            # Touching self.model makes the JAX trainer write its training state back into
            # the variables, and read them (with the new masks) before the next step.
            _ = self.model
            update_masks(self._wrappers, self._schedule.sparsity_at(self.step), self._config)
        self.step += 1


@dataclasses.dataclass(frozen=True)
class SparsityOverride(LayerOverride):
    """A different sparsity for some layers of a `Prune` step (the first match wins).

    Args:
        layers: the layers this override applies to.
        sparsity: the fraction of zeros they reach, in [0, 1).
    """

    name = "prune override"

    sparsity: float = option(0.5, "fraction of zeros these layers reach",
                             Number(0.0, 1.0, high_open=True))


@register_technique("prune", handler=PruneHandler(), stage=Stage.SPARSITY)
@dataclasses.dataclass(frozen=True)
class Prune(Technique):
    """Pruning: zero the least important weights, gradually while fine-tuning or at once.

    Masks live in layer state during training and are baked into stock layers at the end;
    the pruned `.keras` file loads with plain Keras and keeps every layer name.

    `sparsity` is what the step reaches over the kernels of every layer it may touch. By
    default (`skip_first_last`) the first and last prunable layers stay dense where that is
    cheap: they see the raw input and produce the classes, so pruning them costs the most
    accuracy for the least saving (LeNet-5: 2% of the weights); the other layers then prune
    further so the target still holds. A first or last layer that holds much of the weights
    (LeNet-300-100's first: 88%) is pruned after all: kept dense, it would push the others more
    than a quarter of the way from the target to 1. Likewise, where cheap, layers whose outputs
    each see fewer than `min_fan_in` weights (a 3x3 depthwise convolution: 9) stay dense: the
    few weights left could not make up for the ones pruned.

    Args:
        sparsity: target fraction of zeros in [0, 1) (default 0.5); implied by an N:M pattern.
        pattern: `"unstructured"`, a block `"RxC"` over (inputs x outputs), e.g. `"1x4"`, or
            `"N:M"`, e.g. `"2:4"`: keep N of every M consecutive weights along the input axis.
        scope: `"layer"` (every layer reaches the target), `"global"` (one magnitude
            threshold across the chosen layers; no layer above `max_layer_sparsity`) or
            `"sensitivity"` (needs data: each layer is pruned alone at a few levels and the
            model's outputs on 64 calibration examples measured; each layer then gets the
            sparsity that reaches the target at the least summed output error, as SPDY
            allocates; the report gives each layer's sparsity and measured error).
            Default: `"global"` for wanda and sparsegpt (large layers pruned further than
            small ones: EfficientNet-Lite0 at 50% from 56 crops, agreement 0.72 -> 0.81),
            `"layer"` for magnitude, overrides and N:M patterns.
        schedule: `"polynomial"` (Zhu & Gupta: from `initial_sparsity` at `begin_step` to the
            target at `end_step`), `"constant"` or `"one_shot"` (prune at once, then fine-tune).
        initial_sparsity, begin_step, end_step, frequency: schedule settings; `end_step`
            defaults to two thirds of the fine-tune steps, `frequency` (steps between mask
            updates) to a tenth of the ramp from `begin_step` to `end_step`, at most 100, so
            a short fine-tune still prunes in ten steps rather than at once.
        max_layer_sparsity: the per-layer ceiling for global scope.
        skip_first_last: keep the first and last prunable layers dense where the target can
            still be met (see above).
        min_fan_in: keep layers with fewer weights per output dense where the target can
            still be met (see above); 0 prunes them too.
        method: which weights go: `"magnitude"` (the smallest); from `calibration_samples`
            examples of `data`, at once (`schedule: one_shot`, or an N:M pattern), `"wanda"`
            (the smallest |weight| x input norm, Sun et al. 2024) or `"sparsegpt"` (Frantar &
            Alistarh 2023: layer by layer, in order, each layer seeing the inputs of the
            pruned layers before it, the kept weights updated to make up for the pruned
            ones). The magnitude masks still set each layer's sparsity (so `scope` and
            `skip_first_last` hold); Dense and convolutions, other layers by magnitude.
        calibration_samples: examples of `data` that wanda, sparsegpt and refit use.
        refit: once the masks are chosen (one-shot or N:M), fit the kept weights and biases
            of the pruned layers block by block (residual blocks, transformer layers, short
            chains) toward the unpruned model's block outputs on calibration data, by
            gradient descent (AdaPrune, Hubara et al. 2021; blocks as in BRECQ). Needs data.
        iterations: refit: optimizer steps per block.
        overrides: per-layer sparsity (layer scope): `[{layers: {names: [fc1]}, sparsity:
            0.95}]`; the first override that matches a layer wins, and `sparsity` is then
            what the other layers reach (`skip_first_last` keeps only those dense).
        layers, exclude: selections of layers to consider / to leave dense.

    Example:

    ```python
    small, report = kshrink.compress(model, kshrink.Prune(sparsity=0.9, scope="global"),
                                     data=(x, y), fine_tune=kshrink.FineTune(epochs=3))
    ```
    """

    sparsity: float | None = option(None, "fraction of zeros in [0, 1); default 0.5",
                                    Number(0.0, 1.0, high_open=True, allow_none=True))
    pattern: str = option("unstructured", "unstructured, block RxC (e.g. 1x4) or N:M (e.g. 2:4)")
    scope: str | None = option(None, "layer, global or sensitivity (measured, needs data); "
                                     "default: global for wanda/sparsegpt",
                               OneOf(SCOPES, allow_none=True))
    schedule: str = option("polynomial", "polynomial, constant or one_shot", OneOf(SCHEDULES))
    initial_sparsity: float = option(0.0, "polynomial: sparsity at begin_step",
                                     Number(0.0, 1.0, high_open=True))
    begin_step: int = option(0, "first step that prunes", Int(low=0))
    end_step: int | None = option(None, "step the target is reached (default: 2/3 of training)",
                                  Int(low=0, allow_none=True))
    frequency: int | None = option(None, "steps between mask updates (default: ramp/10, <= 100)",
                                   Int(low=1, allow_none=True))
    max_layer_sparsity: float = option(0.99, "global scope: no layer sparser than this",
                                       Number(0.0, 1.0, high_open=True))
    skip_first_last: bool = option(True, "keep the first/last prunable layers dense where cheap",
                                   Flag())
    min_fan_in: int = option(32, "layers with fewer weights per output stay dense where cheap",
                             Int(low=0))
    method: str = option("magnitude", "magnitude, wanda or sparsegpt (one-shot, needs data)",
                         OneOf(METHODS))
    calibration_samples: int = calibration_option(256, "wanda/sparsegpt/refit: examples of "
                                                       "data used")
    refit: bool = option(False, "fit the kept weights block by block on data (one-shot)", Flag())
    iterations: int = option(500, "refit: optimizer steps per block", Int(low=1, high=1_000_000))
    overrides: tuple[SparsityOverride, ...] = option(
        (), "per-layer sparsity; first match wins", Overrides(SparsityOverride))
    layers: Select | None = selection("layers to consider (default: all prunable)")
    exclude: Select | None = selection("layers to leave dense")

    def __post_init__(self):
        super().__post_init__()
        n = self.name
        pattern = masklib.Pattern.parse(self.pattern)
        if pattern.is_n_of_m and self.sparsity is not None and not np.isclose(
                self.sparsity, 1 - pattern.n / pattern.m):
            raise RecipeError(
                f"{n}: pattern {pattern} fixes sparsity at {1 - pattern.n / pattern.m:g}; leave "
                f"sparsity out. Received: sparsity={self.sparsity!r}")
        if self.scope is None:
            layer_wise = self.method == "magnitude" or self.overrides or pattern.is_n_of_m
            object.__setattr__(self, "scope", "layer" if layer_wise else "global")
        if self.end_step is not None and self.end_step < self.begin_step:
            raise RecipeError(
                f"{n}: end_step must not come before begin_step ({self.begin_step}). "
                f"Received: end_step={self.end_step}")
        if self.refit and self.schedule != "one_shot" and not pattern.is_n_of_m:
            raise RecipeError(f"{n}: refit fits the weights kept by masks chosen at once: use "
                              f"schedule one_shot (or an N:M pattern). Received: "
                              f"schedule={self.schedule!r}")
        if self.scope == "sensitivity" and pattern.is_n_of_m:
            raise RecipeError(f"{n}: pattern {pattern} fixes every layer's sparsity; scope "
                              f"sensitivity chooses it per layer. Use one or the other")
        if self.overrides and (self.scope != "layer" or pattern.is_n_of_m):
            raise RecipeError(f"{n}: overrides set per-layer sparsity, which takes layer "
                              f"scope and no N:M pattern. Received: scope={self.scope!r}, "
                              f"pattern={self.pattern!r}")
        if self.method != "magnitude":
            if not (pattern.is_n_of_m or pattern.block == (1, 1)):
                raise RecipeError(f"{n}: method {self.method} takes unstructured or N:M "
                                  f"patterns. Received: pattern={self.pattern!r}")
            if self.schedule != "one_shot" and not pattern.is_n_of_m:
                raise RecipeError(f"{n}: method {self.method} prunes at once from calibration "
                                  f"data: use schedule one_shot. Received: "
                                  f"schedule={self.schedule!r}")

    def sparsity_for(self, layer) -> float:
        """What `layer` reaches: its override's sparsity, else the step's target."""
        override = self.override_for(layer)
        return self.target_sparsity if override is None else override.sparsity

    @property
    def pattern_spec(self) -> masklib.Pattern:
        return masklib.Pattern.parse(self.pattern)

    @property
    def target_sparsity(self) -> float:
        spec = self.pattern_spec
        if spec.is_n_of_m:
            return 1 - spec.n / spec.m
        return DEFAULT_SPARSITY if self.sparsity is None else self.sparsity

    def schedule_for(self, train_steps: int | None) -> Schedule:
        """The schedule over a fine-tune run of `train_steps` steps (None: unknown)."""
        end = self.end_step
        if end is None:
            end = max(self.begin_step, (2 * train_steps) // 3) if train_steps else self.begin_step
        kind = "one_shot" if self.pattern_spec.is_n_of_m else self.schedule
        frequency = self.frequency or min(100, max(1, (end - self.begin_step) // 10))
        return Schedule(kind, self.target_sparsity, self.initial_sparsity, self.begin_step,
                        end, frequency)
