"""The `quantize` technique: int8/int4/float16/bfloat16 weights for every layer with kernels,
optional static 8-bit activations, post-training or quantization-aware, per-layer overrides.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kshrink.core.classes import is_user_class
from kshrink.core.data import model_inputs
from kshrink.core.graph import leaf_layers, owner_of, path_of, replace_layers
from kshrink.core.select import Select
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
from kshrink.core.batchnorm import fold, plan_folds
from kshrink.layers import (
    FLOAT_MODES,
    INTEGER_MODES,
    MODES,
    QuantizeAwareWrapper,
    keras_base,
    keras_quantizes,
    kernel_specs,
    kernel_weights,
    quantization,
    quantize_layer,
)
from kshrink.layers.specs import PER_CHANNEL, is_lookup, spec_for
from kshrink.layers.wrappers import hold_zeros, release_zeros
from kshrink.quantize.calibrate import METHODS, input_ranges
from kshrink.quantize.keras_native import (
    keras_quantize,
    outer_containers,
    record_quantized_sublayers,
    reloads_quantized,
)
from kshrink.quantize.reconstruct import adaround_scales, gptq_scales, stored_by_keras
from kshrink.layers.rows import matrix_axes

KEEP_FLOAT = "float"
ROUNDING = ("rtn", "gptq", "adaround")


@dataclasses.dataclass(frozen=True)
class Override(LayerOverride):
    """Different quantization for some layers: the first override that matches a layer wins.

    Args:
        layers: the layers this override applies to.
        mode: `"int8"`, `"int4"`, `"float16"`, `"bfloat16"`, or `"float"` to keep them as
            they are.
        group_size: int4 only (see `Quantize`).
    """

    name = "quantize override"

    mode: str = option("int8", "int8, int4, float16, bfloat16 or float",
                       OneOf(MODES + (KEEP_FLOAT,)))
    group_size: int | None = option(128, "int4 only: inputs per scale group",
                                    Int(low=1, allow_none=True))


@dataclasses.dataclass(frozen=True)
class _Plan:
    mode: str
    group_size: int | None


@dataclasses.dataclass
class QuantizeState:
    """What a quantize step carries from `prepare` to `finalize`, by layer path."""

    solver: str | None = None  # the calibration method's name, for the report
    plans: dict = dataclasses.field(default_factory=dict)  # mode and grid per layer
    ranges: dict = dataclasses.field(default_factory=dict)  # calibrated input ranges
    held: tuple = ()  # zeros held while QAT trains (preserve_sparsity)
    rounded: dict[str, str] = dataclasses.field(default_factory=dict)  # why not solved


class QuantizeHandler(Handler):
    """Runs `Quantize`: folds BatchNormalization, then rounds each chosen layer's kernels to
    integers (by its method) in kshrink's or Keras' quantized layers."""

    State = QuantizeState

    def trains_with(self, config: Quantize) -> bool:
        return config.qat

    # The size search: int8, or int4 (with a float scale per group of inputs), per layer.
    def size_levels(self, model, config: Quantize) -> dict:
        chosen = StepContext(original=model).choose_layers(
            model, config.layers, config.exclude, skip_reason, in_place=keras_quantizes)
        return {path_of(layer): ("int8", "int4") for layer in chosen}

    def size_bits(self, config: Quantize, level: str) -> float:
        return 8.0 if level == "int8" else 4.0 + (
            32.0 / config.group_size if config.group_size else 0.0)

    def memory_bits(self, config: Quantize, level: str) -> float:
        return 8.0 if level == "int8" else 4.0

    def size_step(self, config: Quantize, levels: dict, trains: bool) -> Quantize:
        int4 = tuple(sorted(path for path, mode in levels.items() if mode == "int4"))
        overrides = (Override(layers=Select(names=int4), mode="int4",
                              group_size=config.group_size),) if int4 else ()
        return dataclasses.replace(config, mode="int8", qat=trains, overrides=overrides,
                                   layers=Select(names=tuple(sorted(levels))), exclude=None)

    def prepare(self, model, config: Quantize, ctx: StepContext):
        if config.qat and ctx.train_steps is None:
            raise KshrinkError("quantize: qat=true trains the model: pass data=(x, y) and "
                               "fine_tune=FineTune(...)")
        if config.fold_batchnorm:
            model = _fold_batchnorm(model, ctx)
        # QAT wraps layers to train them; post-training, Keras quantizes its layers in place.
        chosen = ctx.choose_layers(model, config.layers, config.exclude, skip_reason,
                                   in_place=None if config.qat else keras_quantizes)
        plans = _plans(model, chosen, config, ctx)
        ranges = _calibrate(model, plans, config, ctx)
        solver = {"gptq": gptq_scales, "adaround": adaround_scales}.get(config.method)
        ctx.state.solver = {"gptq": "GPTQ", "adaround": "AdaRound"}.get(config.method)
        scales = solver(model, plans, config, ctx) if solver else {}
        ctx.state.plans, ctx.state.ranges = plans, ranges
        if not config.qat:
            return _quantize(model, plans, ranges, config, ctx, scales)
        integer = {name for name, plan in plans.items() if plan.mode in INTEGER_MODES}

        def wrap(layer):
            if path_of(layer) not in integer:
                return layer
            plan = plans[path_of(layer)]
            return QuantizeAwareWrapper(
                layer, mode=plan.mode, group_size=_group(plan),
                activation_bits=_activation_bits(layer, config),
                input_range=ranges.get(path_of(layer), (0.0, 1.0)))

        model = replace_layers(model, wrap)
        if config.preserve_sparsity:
            ctx.state.held = hold_zeros([w for layer in leaf_layers(model)
                                          if isinstance(layer, QuantizeAwareWrapper)
                                          for w in kernel_weights(layer.layer)])
        return model

    def finalize(self, model, config: Quantize, ctx: StepContext):
        if not config.qat:
            return model
        held = ctx.state.held
        release_zeros(held)
        if held:
            ctx.summary = (f"the zeros of {len(held)} pruned kernel(s) kept while training "
                           "(preserve_sparsity)")
        ranges = dict(ctx.state.ranges)
        for layer in leaf_layers(model):
            if isinstance(layer, QuantizeAwareWrapper) and layer.learned_range():
                ranges[path_of(layer.layer)] = layer.learned_range()
        model = replace_layers(
            model, lambda l: l.layer if isinstance(l, QuantizeAwareWrapper) else l)
        return _quantize(model, ctx.state.plans, ranges, config, ctx)


def _fold_batchnorm(model, ctx: StepContext):
    """BN folded into the kernels first, so the quantized kernels are the ones that run (and
    QAT trains those)."""
    plan = plan_folds(model, batchnorm=True, noops=False)
    for layer in leaf_layers(model):
        if layer.name in plan.folds:
            ctx.applied(layer, f"folded into {plan.folds[layer.name]} before quantizing")
    return fold(model, plan) if plan.folds else model


def skip_reason(layer) -> str | None:
    """Why `Quantize` leaves `layer` alone (already quantized, no kernel it can take), or
    None if it quantizes it."""
    if quantization(layer):
        return f"already quantized ({quantization(layer)})"
    if keras_base(layer) is not None or keras_quantizes(layer):
        return None
    name = type(layer).__name__
    if "Normalization" in name:
        return f"{name}: normalization layers stay in float"
    return f"{name}: no quantized version of this layer" + (
        "; build it from Dense or EinsumDense sublayers (created with "
        "dtype=self.dtype_policy), which Keras quantizes in place"
        if is_user_class(type(layer)) else "")


def _sensitive(everything: list) -> dict[int, str]:
    """The layers of a convolutional network that 4-bit weights hurt most and runtimes keep
    at 8 bits (`keep_int8`), by id, with why: the first and the last layer with a kernel, and
    depthwise convolutions (a 3x3 filter per channel has too few weights to absorb rounding;
    LiteRT runs int4 for CONV_2D and FULLY_CONNECTED only). None in a network without
    convolutions (an MLP, a transformer): there the first and last layers are most of it."""
    kernels = [l for l in everything if kernel_specs(l)]
    specs = {id(l): spec_for(l) for l in kernels}
    found = {key: "depthwise" for key, spec in specs.items()
             if spec is not None and spec.channels == PER_CHANNEL}
    if not found and not any(spec is not None and spec.width == "filters"
                             for spec in specs.values()):
        return {}  # no convolution
    if kernels:
        found[id(kernels[-1])] = "last layer"
        found[id(kernels[0])] = "first layer"
    return found


def _plans(model, chosen, config: Quantize, ctx: StepContext) -> dict[str, _Plan]:
    """The mode of every chosen layer: the first override that selects it, else the default
    (int8 for the sensitive layers of an int4 step, `keep_int8`)."""
    everything = list(leaf_layers(model))
    for override in config.overrides:
        override.layers.resolve(everything)  # each must name layers of the model
    sensitive = _sensitive(everything) if config.mode == "int4" and config.keep_int8 else {}
    plans, kept = {}, []
    for layer in chosen:
        mode, group_size = config.mode, config.group_size
        if id(layer) in sensitive:
            mode, group_size = "int8", None
        override = config.override_for(layer)
        if override is not None:
            mode, group_size = override.mode, override.group_size
        if mode == "int8" and id(layer) in sensitive:
            kept.append((layer, sensitive[id(layer)]))
        if mode == KEEP_FLOAT:
            ctx.skipped(layer, "kept in float by an override")
        elif mode in FLOAT_MODES and owner_of(layer):
            ctx.skipped(layer, f"{owner_of(layer)}: {mode} storage replaces the layer, and this "
                               "one can only change in place")
        else:
            plans[path_of(layer)] = _Plan(mode, group_size)
    _drop_unreloadable(model, plans, ctx)
    kept = [(layer, why) for layer, why in kept if path_of(layer) in plans]
    if kept:
        extra = sum(int(np.prod(v.shape)) for layer, _ in kept for v in kernel_weights(layer))
        names = ", ".join(f"{path_of(l)} ({why})" for l, why in kept[:4])
        more = f" and {len(kept) - 4} more" if len(kept) > 4 else ""
        note = (f"{len(kept)} layer{'s' if len(kept) > 1 else ''} kept at int8 (keep_int8): "
                f"{names}{more}; {extra // 2:,} bytes more than int4")
        ctx.note(note)
    return plans


def _drop_unreloadable(model, plans: dict, ctx: StepContext) -> None:
    """Leaves in float the planned sublayers of containers that would not rebuild them
    quantized from their config, so every quantized model saves and reloads."""
    for container in outer_containers(model):
        inner = [l for l in container._flatten_layers(include_self=False)
                 if path_of(l) in plans]
        if inner and not reloads_quantized(container, [l.path for l in inner]):
            for layer in inner:
                del plans[path_of(layer)]
                ctx.skipped(layer, f"{owner_of(layer)}, which does not pass its dtype policy "
                                   "to its sublayers: quantized, they would not reload; "
                                   "create them with dtype=self.dtype_policy and a name of "
                                   "their own (name=...)")


def _group(plan: _Plan) -> int | None:
    return plan.group_size if plan.mode == "int4" else None


def _activation_bits(layer, config: Quantize) -> int | None:
    # An embedding's inputs are indices; they are never quantized.
    if config.activation_bits and not is_lookup(layer):
        return config.activation_bits
    return None


def _keras_activation_bits(layer, plan: _Plan, config: Quantize) -> int | None:
    """A layer a container or model subclass builds reloads with Keras' defaults for its
    mode, as its own config is not saved: int8 quantizes its inputs on the fly, int4 does not.
    It gets those now, so the model that reloads is the one measured."""
    if owner_of(layer) and not is_lookup(layer):
        return 8 if plan.mode == "int8" else None
    return _activation_bits(layer, config)


def _calibrate(model, plans, config: Quantize, ctx: StepContext) -> dict:
    if not config.activation_bits:
        return {}
    if ctx.data is None:
        raise KshrinkError("quantize: activation_bits needs calibration data: pass "
                           "data=(x, y) to compress")
    # After training, Keras' layers quantize their inputs on the fly: only kshrink's layers
    # and QAT's fake quantization start from calibrated ranges.
    layers = [l for l in leaf_layers(model) if path_of(l) in plans
              and _activation_bits(l, config) and (config.qat or not keras_quantizes(l))]
    x = model_inputs(ctx.data, config.calibration_samples)
    return input_ranges(model, x, layers, method=config.calibration,
                        percentile=config.percentile, bits=config.activation_bits)


def _quantize(model, plans, ranges, config: Quantize, ctx: StepContext, scales=None):
    """Replaces planned layers by kshrink's quantized layers or has Keras quantize them.

    Layers whose grid GPTQ chose (`scales`) are always kshrink's: Keras would re-round them.
    """
    scales = scales or {}
    by_keras, ours, gridded = {}, {}, {}
    for layer in leaf_layers(model):
        key = path_of(layer)
        plan = plans.get(key)
        if plan is None:
            continue
        if plan.mode in INTEGER_MODES and keras_quantizes(layer) and key not in scales:
            how = (plan.mode, _group(plan), _keras_activation_bits(layer, plan, config))
            by_keras.setdefault(how, []).append(key)
        elif key in scales and stored_by_keras(layer):
            gridded[key] = plan  # Keras' own layer, on GPTQ's grid
        else:
            ours[key] = plan

    def replace(layer):
        key = path_of(layer)
        plan = ours.get(key)
        if plan is None:
            return layer
        bits = _activation_bits(layer, config) if plan.mode in INTEGER_MODES else None
        try:
            quantized = quantize_layer(layer, plan.mode, _group(plan), bits,
                                       ranges.get(key), scales.get(key))
        except ValueError as e:
            raise KshrinkError(f"quantize: {e}") from None
        ctx.applied(layer, _describe(plan, bits, ranges.get(key), _how(layer, ctx, scales)))
        return quantized

    model = replace_layers(model, replace)
    layers = {path_of(layer): layer for layer in leaf_layers(model)}
    for (mode, group_size, bits), names in by_keras.items():
        chosen = [layers[name] for name in names]
        for layer in chosen:
            ctx.applied(layer, _describe(_Plan(mode, group_size), bits, None,
                                         _how(layer, ctx, scales, "Keras")))
        keras_quantize(model, chosen, mode, group_size, bits)
    for key, plan in gridded.items():
        layer = layers[key]
        bits = _keras_activation_bits(layer, plan, config)
        ctx.applied(layer, _describe(plan, bits, None, _how(layer, ctx, scales, "Keras")))
        (name, grid), = scales[key].items()
        axes = matrix_axes(layer, next(spec for _, spec in kernel_specs(layer)
                                       if spec.name == name))
        keras_quantize(model, [layer], plan.mode, None, bits, grid=(grid, axes))
    record_quantized_sublayers(model)
    ctx.sort_results(ctx.original)  # the order the user knows, folded layers included
    return model


def _how(layer, ctx: StepContext, scales: dict, by: str = "kshrink") -> str:
    key = path_of(layer)
    method = ctx.state.solver or "GPTQ"
    if key in scales:
        return f"{by}, {method}"
    rounded = ctx.state.rounded
    if key in rounded:
        return f"{by}; rounded to nearest, as {method} does not take {rounded[key]}"
    if scales and is_lookup(layer):
        return f"{by}; rounded to nearest, as {method} does not take embeddings"
    return by


def _describe(plan: _Plan, activation_bits, input_range, by: str) -> str:
    if plan.mode in FLOAT_MODES:
        return f"{plan.mode} weights"
    scales = "per-channel scales"
    if plan.mode == "int4" and plan.group_size:
        scales = f"scales per group of {plan.group_size}"
    text = f"{plan.mode} weights, {scales} ({by})"
    if activation_bits and input_range:
        text += f"; {activation_bits}-bit inputs in [{input_range[0]:.3g}, {input_range[1]:.3g}]"
    elif activation_bits:
        text += "; int8 inputs, scaled per row on the fly"
    return text


@register_technique("quantize", handler=QuantizeHandler(), stage=Stage.QUANTIZE)
@dataclasses.dataclass(frozen=True)
class Quantize(Technique):
    """Quantizes the weights of every layer with kernels, optionally the activations too.

    Dense, EinsumDense and Embedding go to int8/int4 through Keras itself (`model.quantize`),
    in place, also inside custom layers such as keras-hub's transformer blocks (named by path,
    `transformer_layer_0/self_attention_layer/query`); their file reloads quantized.
    Convolutions (Conv1D/2D/3D, Depthwise, Separable, transposed) become kshrink's quantized
    layers, which keep their kernels int8 / packed int4 in memory and in the file. float16
    and bfloat16 store any of these layers' kernels at half width and compute in float32.
    Every other layer with weights stays float and is listed in the report with the reason.

    Args:
        mode: `"int8"`, `"int4"`, `"float16"` or `"bfloat16"`.
        method: how integer weights are chosen: `"rtn"` rounds each to the nearest level;
            `"gptq"` (Frantar et al. 2023) solves layer by layer on `calibration_samples`
            examples of `data`, in order, each layer seeing the inputs the quantized layers
            before it produce, and spreads every rounding error over the weights not yet
            rounded so the layer's output moves least. Dense and convolutions (Conv1D/2D/3D,
            grouped, Depthwise, Separable), and EinsumDense and the Dense layers inside
            custom layers, which Keras stores on GPTQ's grid (int8, or per-channel int4);
            other layers are rounded, and say so. `"adaround"` learns each weight's rounding
            (down or up) block by block on the same layers: each residual block, transformer
            layer or short chain of layers, fed what the quantized blocks before it produce,
            is fitted toward the original block's output by `iterations` optimizer steps
            (AdaRound, Nagel et al. 2020, over blocks as BRECQ, Li et al. 2021, fits them),
            biases alongside. Slower than GPTQ, closer on depthwise and stem convolutions.
        group_size: int4 only: one scale per this many inputs of each output channel; null
            for one scale per output channel.
        activation_bits: also quantize each layer's input to this many bits (8): static
            ranges from calibration data for kshrink's layers; Keras' Dense layers quantize
            their inputs on the fly. Needs `data`.
        calibration: how a calibrated range is chosen: `"minmax"`, `"percentile"` or `"mse"`.
        percentile: for `"percentile"` calibration.
        calibration_samples: examples of `data` used to calibrate.
        iterations: adaround: optimizer steps per block (batches of 32 examples).
        qat: quantization-aware training: fine-tune with fake-quantized weights (and inputs,
            with learned PACT clipping) before quantizing. Needs `data` and `fine_tune`.
        preserve_sparsity: with qat, weights that are exactly zero (from pruning) stay zero
            while training, so a pruned model keeps its sparsity.
        fold_batchnorm: first fold each BatchNormalization into the layer before it (as
            `fold` does), so the quantized kernels are the ones that run and BN's parameters
            are gone.
        keep_int8: with `mode="int4"`, in a network with convolutions, the first and the
            last layer with a kernel and the depthwise convolutions stay int8, as every
            published 4-bit CNN result keeps them
            and as LiteRT runs them (int4 kernels for CONV_2D and FULLY_CONNECTED only); the
            report names them and what they cost in bytes. An override still decides for
            the layers it selects; false: every layer int4.
        overrides: per-layer modes, the first matching override wins, e.g. keep the first
            convolution in float: `[{layers: {names: [conv1]}, mode: float}]`.
        layers: the layers to consider (default: all).
        exclude: layers to leave in float.

    Example:

    ```python
    model, report = kshrink.compress(model, kshrink.Quantize(mode="int8"))
    ```
    """

    mode: str = option("int8", "int8, int4, float16 or bfloat16 weights", OneOf(MODES))
    method: str = option("rtn", "rtn (round to nearest), gptq (layer-wise, needs data) or "
                                "adaround (block-wise learned rounding, needs data)",
                         OneOf(ROUNDING))
    group_size: int | None = option(
        128, "int4 only: inputs per scale group; null for per-channel scales",
        Int(low=1, allow_none=True))
    activation_bits: int | None = option(None, "quantize layer inputs to this many bits (8)",
                                         OneOf((None, 8)))
    calibration: str = option("percentile", "minmax, percentile or mse", OneOf(METHODS))
    percentile: float = option(99.99, "percentile kept by percentile calibration",
                               Number(50, 100))
    calibration_samples: int = calibration_option(512, "examples used to calibrate")
    iterations: int = option(500, "adaround: optimizer steps per block",
                             Int(low=1, high=1_000_000))
    qat: bool = option(False, "quantization-aware training (needs fine_tune)", Flag())
    preserve_sparsity: bool = option(True, "qat: zero weights (from pruning) stay zero", Flag())
    fold_batchnorm: bool = option(True, "fold BatchNorm into the layer before it first", Flag())
    keep_int8: bool = option(True, "int4 CNNs: the first and last layers and depthwise "
                                   "convolutions stay int8", Flag())
    overrides: tuple[Override, ...] = option((), "per-layer modes; first match wins",
                                             Overrides(Override))
    layers: Select | None = selection("layers to consider (default: all)")
    exclude: Select | None = selection("layers to leave in float")

    def __post_init__(self):
        super().__post_init__()
        if self.method != "rtn" and (self.qat or self.mode in FLOAT_MODES):
            raise RecipeError(f"{self.name}: method {self.method} chooses int8/int4 weights "
                              "after training; it takes neither qat nor float modes. "
                              f"Received: mode={self.mode!r}, qat={self.qat}")
        if self.qat and self.mode in FLOAT_MODES:
            raise RecipeError(f"{self.name}: qat applies to int8 and int4. "
                               f"Received: mode={self.mode!r}")
