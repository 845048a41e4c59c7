"""The one table of facts about Keras layers that kshrink's techniques, storage and
measurement read: which weights are kernels and which of their axes index input and output
channels, what a channel analysis may assume, what a BatchNorm after the layer folds into,
how many multiply-accumulates it does, and whether kshrink has a quantized form of it.

A custom layer opts in by registering its own spec:

```python
kshrink.layers.register_spec(MyDense, kshrink.layers.LayerSpec(
    weights=(kshrink.layers.WeightSpec("kernel", input_axis=0, output_axes=(1,), kernel=True),
             kshrink.layers.WeightSpec("bias", output_axes=(0,))),
    channels=kshrink.layers.specs.PRODUCER, width="units", fold_into="kernel"))
```
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import keras
import numpy as np

# How a layer treats the channels (last axis) of its input, for structured pruning:
PRODUCER = "producer"  # computes new channels from all input channels (Conv, Dense)
PER_CHANNEL = "per_channel"  # output channel c from input channel c alone, with parameters
PASS_THROUGH = "pass_through"  # output channel c is input channel c, no parameters
MERGE = "merge"  # element-wise over several inputs of the same width (Add, Multiply...)
CONCATENATE = "concatenate"
FLATTEN = "flatten"


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One weight of a layer class, by the name Keras gives it.

    Attributes:
        name: the variable's name (`"kernel"`, `"pointwise_kernel"`, `"bias"`, `"gamma"`...).
        input_axis: the axis that indexes the layer's input channels, if any.
        output_axes: the axes that index the layer's output channels; several for a depthwise
            kernel (input channel x multiplier, in that order).
        kernel: True for the weights pruning, clustering and quantization work on (not
            biases, nor normalization parameters).
        attribute: the attribute the layer's `call` reads a kernel from (for quantized forms).
    """

    name: str
    input_axis: int | None = None
    output_axes: tuple[int, ...] = ()
    kernel: bool = False
    attribute: str | None = None


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What kshrink knows about one layer class (and, unless they register their own, its
    subclasses).

    Attributes:
        weights: the layer's weights that have channel axes.
        channels: how the layer maps input to output channels (`PRODUCER`, `PER_CHANNEL`, ...),
            or None if structured pruning must not see through it.
        width: the config key that sets the number of output channels (`"units"`, `"filters"`).
        fold_into: the kernel a following BatchNormalization folds into, or None.
        macs: `(config, input_shape, output_shape, layer) -> MACs per example`.
        kernel_size: `(config, input_shape) -> elements of its kernels`, from the config alone
            (before anything is built), so a file can be checked against what it declares.
        quantizable: kshrink has a quantized form (`kshrink.layers.quantized`).
        bias: the weight a folded BatchNorm's shift is added into (a layer whose config has
            `use_bias` gets one when folded into).
        identity: `(config) -> bool`: whether the layer returns its input unchanged at
            inference (Dropout, a linear Activation), so a rewrite may drop it.
        channel_check: `(layer, rank) -> str | None`: why channels cannot be followed through
            this layer as `channels` says (a grouped convolution, a softmax across channels),
            for tensors of `rank`; None if they can.
        lookup: the layer reads rows of its kernel by index (an embedding): its inputs are
            indices, never quantized, and solvers fitting a kernel to its inputs (GPTQ) do
            not take it.
    """

    weights: tuple[WeightSpec, ...] = ()
    channels: str | None = None
    width: str | None = None
    fold_into: str | None = None
    macs: Callable | None = None
    kernel_size: Callable | None = None
    quantizable: bool = False
    bias: str = "bias"
    identity: Callable | None = None
    channel_check: Callable | None = None
    lookup: bool = False

    @property
    def kernels(self) -> tuple[WeightSpec, ...]:
        return tuple(w for w in self.weights if w.kernel)

    def weight(self, name: str) -> WeightSpec | None:
        return next((w for w in self.weights if w.name == name), None)


_REGISTRY: dict[type, LayerSpec] = {}


def register_spec(cls: type, spec: LayerSpec) -> None:
    """Tells kshrink how the layer class `cls` (and its subclasses) works."""
    if not (isinstance(cls, type) and issubclass(cls, keras.layers.Layer)):
        raise TypeError(f"register_spec expects a Keras layer class. Received: {cls!r}")
    if not isinstance(spec, LayerSpec):
        raise TypeError(f"register_spec expects a LayerSpec. Received: {type(spec).__name__}")
    _REGISTRY[cls] = spec


def spec_for_class(cls: type) -> LayerSpec | None:
    """The spec registered for exactly `cls`, or None."""
    return _REGISTRY.get(cls)


def quantizable_classes() -> list[type]:
    """Keras' own layer classes that kshrink has a quantized form of."""
    return [cls for cls, spec in _REGISTRY.items()
            if spec.quantizable and cls.__module__.startswith("keras.")]


def spec_for(layer) -> LayerSpec | None:
    """The spec of `layer`'s class or its nearest registered base class, or None."""
    return spec_for_type(type(layer))


def spec_for_type(cls: type) -> LayerSpec | None:
    """The spec of the class `cls` or its nearest registered base class, or None."""
    return next((_REGISTRY[c] for c in cls.__mro__ if c in _REGISTRY), None)


def rewritable_spec(layer) -> LayerSpec | None:
    """The spec a graph rewrite (channel removal, BatchNorm folding) may rely on for `layer`:
    a Keras class's, or the one registered for the layer's own class. A user's subclass that
    only inherits a spec gets None: its `call` may compute something else."""
    cls = type(layer)
    if cls.__module__.split(".")[0] == "keras":
        return spec_for_type(cls)
    return spec_for_class(cls)


def is_identity(layer) -> bool:
    """Whether `layer` returns its input unchanged at inference (its spec says so)."""
    spec = rewritable_spec(layer)
    return bool(spec and spec.identity and spec.identity(layer.get_config()))


def is_add(layer) -> bool:
    """Whether `layer` is Keras' element-wise Add (what closes a residual block)."""
    return type(layer) is keras.layers.Add


def outputs_softmax(layer) -> bool:
    """Whether `layer` ends in a softmax (a Softmax layer, or a softmax activation)."""
    return isinstance(layer, keras.layers.Softmax) or \
        getattr(layer, "activation", None) is keras.activations.softmax


def is_lookup(layer) -> bool:
    """Whether `layer` reads rows of its kernel by index (its spec's `lookup`)."""
    spec = spec_for(layer)
    return bool(spec and spec.lookup)


def is_relu(layer) -> bool:
    """Whether `layer` is a plain ReLU (no cap, slope or threshold): applying it twice equals
    applying it once."""
    if isinstance(layer, keras.layers.ReLU):
        config = layer.get_config()
        return (config["max_value"] is None and not config["negative_slope"]
                and not config["threshold"])
    return isinstance(layer, keras.layers.Activation) and layer.get_config()["activation"] == "relu"


def outputs_relu(layer) -> bool:
    """Whether `layer`'s output has been through a plain ReLU already (a Keras layer only: a
    custom one's config may mean anything)."""
    if layer is None or type(layer).__module__.split(".")[0] != "keras":
        return False
    return is_relu(layer) or layer.get_config().get("activation") == "relu"


def kernel_specs(layer) -> list[tuple]:
    """`(variable, WeightSpec)` for each kernel that pruning and weight sharing work on.

    A custom layer without a spec opts in with `get_prunable_weights()` (output channels on
    the last axis). Quantized layers have none: their integer weights are final.
    """
    if getattr(layer, "quantization_mode", None) or getattr(layer, "is_quantized", False):
        return []
    if hasattr(layer, "get_prunable_weights"):
        return [(w, WeightSpec(w.name, output_axes=(-1,), kernel=True))
                for w in layer.get_prunable_weights()]
    spec = spec_for(layer)
    if spec is None:
        return []
    by_name = {v.name: v for v in layer.weights}
    return [(by_name[k.name], k) for k in spec.kernels if k.name in by_name]


def kernel_weights(layer) -> list:
    """The variables of `layer` that pruning and weight sharing work on; [] if none."""
    return [variable for variable, _ in kernel_specs(layer)]


def output_axes(layer, name: str) -> tuple[int, ...]:
    """The axes of weight `name` of `layer` that index output channels (default: the last)."""
    spec = spec_for(layer)
    weight = spec.weight(name) if spec else None
    return weight.output_axes if weight and weight.output_axes else (-1,)


# --- the (inputs, outputs) matrix view of a kernel ------------------------------------------

def matrix_shape(shape: tuple, axes: tuple[int, ...]) -> tuple[int, int]:
    """(rows, columns) of the matrix view of a kernel of `shape` with output `axes`."""
    columns = math.prod(shape[a] for a in axes)
    return math.prod(shape) // max(columns, 1), columns


def moved_axes(ndim: int, axes: tuple[int, ...]) -> tuple[list, list]:
    """Where `as_matrix` moves the output `axes` of an `ndim`-d kernel: (source, target)."""
    source = [a % ndim for a in axes]
    return source, list(range(ndim - len(source), ndim))


def as_matrix(values: np.ndarray, axes: tuple[int, ...] = (-1,)) -> np.ndarray:
    """The (inputs, outputs) view of a kernel: its output `axes` last and flattened into the
    columns, every other axis flattened into the rows."""
    values = np.asarray(values)
    if values.ndim < 2:
        return values.reshape(-1, 1)
    source, target = moved_axes(values.ndim, axes)
    return np.moveaxis(values, source, target).reshape(matrix_shape(values.shape, axes))


def from_matrix(matrix: np.ndarray, shape: tuple, axes: tuple[int, ...] = (-1,)) -> np.ndarray:
    """The inverse of `as_matrix`: a kernel of `shape` from its matrix view."""
    if len(shape) < 2:
        return np.asarray(matrix).reshape(shape)
    source, target = moved_axes(len(shape), axes)
    moved = [d for i, d in enumerate(shape) if i not in source] + [shape[i] for i in source]
    return np.moveaxis(np.asarray(matrix).reshape(moved), target, source)


def scale_output_channels(kernel: np.ndarray, scale: np.ndarray, axes: tuple[int, ...]):
    """`kernel` with output channel c multiplied by `scale[c]` (e.g. a folded BatchNorm)."""
    source = sorted(a % kernel.ndim for a in axes)
    shape = [1] * kernel.ndim
    for a in source:
        shape[a] = kernel.shape[a]
    return kernel * np.asarray(scale).reshape(shape)


def slice_channels(values: np.ndarray, weight: WeightSpec, drop_in: set, drop_out: set):
    """`values` of `weight` without the input channels `drop_in` and output channels
    `drop_out` (a per-channel layer passes the same set as both)."""
    def keep(array, axis, dropped):
        if not dropped:
            return array
        return np.delete(array, sorted(dropped), axis=axis)

    if weight.input_axis is not None:
        values = keep(values, weight.input_axis, drop_in)
    if len(weight.output_axes) == 1:
        out = weight.output_axes[0] % values.ndim
        if weight.input_axis is None or out != weight.input_axis % values.ndim:
            values = keep(values, out, drop_out)
    return values


# --- MACs ------------------------------------------------------------------------------------

def _channels(shape, config) -> int:
    return shape[1] if config.get("data_format") == "channels_first" else shape[-1]


def _spatial(shape, config) -> int:
    if config.get("data_format") == "channels_first":
        return math.prod(shape[2:])
    return math.prod(shape[1:-1])


def _dense_macs(config, input_shape, output_shape, layer):
    return input_shape[-1] * config["units"] * math.prod(output_shape[1:-1])


def _einsum_macs(config, input_shape, output_shape, layer):
    # Output elements times the kernel axes that are summed over (those not in the output).
    inputs, output = config["equation"].split("->")
    input_axes, kernel_axes = inputs.split(",")
    shape = tuple(layer.kernel.shape)
    summed = math.prod(shape[i] for i, axis in enumerate(kernel_axes) if axis not in output)
    per_example = output_shape[1:]
    if "..." not in output:  # an output axis the config leaves None has its input's size
        sizes = dict(zip(kernel_axes, shape)) | dict(zip(input_axes[1:], input_shape[1:]))
        per_example = [sizes.get(axis) for axis in output if axis != input_axes[0]]
    if any(d is None for d in per_example):
        return None
    return math.prod(per_example) * summed


def _conv_macs(config, input_shape, output_shape, layer):
    per_position = (_channels(input_shape, config) // config.get("groups", 1)
                    * config["filters"] * math.prod(config["kernel_size"]))
    return per_position * _spatial(output_shape, config)


def _transposed_macs(config, input_shape, output_shape, layer):
    per_position = (_channels(input_shape, config) * config["filters"]
                    * math.prod(config["kernel_size"]))
    return per_position * _spatial(input_shape, config)


def _depthwise_macs(config, input_shape, output_shape, layer):
    per_position = (_channels(input_shape, config) * config["depth_multiplier"]
                    * math.prod(config["kernel_size"]))
    return per_position * _spatial(output_shape, config)


def _separable_macs(config, input_shape, output_shape, layer):
    middle = _channels(input_shape, config) * config["depth_multiplier"]
    per_position = middle * (math.prod(config["kernel_size"]) + config["filters"])
    return per_position * _spatial(output_shape, config)


def layer_macs(layer, sequence_length: int | None = None) -> int | None:
    """MACs of one example through `layer`, or None for a layer kind that is not counted, or
    whose input has a dimension only known at run time and no `sequence_length` to take for
    it."""
    spec = spec_for(layer)
    build = layer.get_build_config() if layer.built else None
    if spec is None or spec.macs is None or not build or "input_shape" not in build:
        return None
    def known(shape):
        shape = tuple(shape)
        return shape[:1] + tuple(sequence_length if d is None else d for d in shape[1:])

    input_shape = known(build["input_shape"])
    if not all(isinstance(d, int) for d in input_shape[1:]):
        return None
    output_shape = known(layer.compute_output_shape(input_shape))
    count = spec.macs(layer.get_config(), input_shape, output_shape, layer)
    return None if count is None else int(count)


def _dense_kernel(config, input_shape):
    return input_shape[-1] * config["units"]


def _conv_kernel(config, input_shape):
    return (math.prod(config["kernel_size"]) * _channels(input_shape, config)
            // config.get("groups", 1) * config["filters"])


def _depthwise_kernel(config, input_shape):
    return (math.prod(config["kernel_size"]) * _channels(input_shape, config)
            * config["depth_multiplier"])


def _separable_kernel(config, input_shape):
    return _depthwise_kernel(config, input_shape) + (
        _channels(input_shape, config) * config["depth_multiplier"] * config["filters"])


def _embedding_kernel(config, input_shape):
    return config["input_dim"] * config["output_dim"]


def _einsum_kernel(config, input_shape):
    """Each kernel axis is sized by the input axis of the same letter, else by the output's
    (whose `output_shape` omits the batch axis, or whatever the ellipsis stands for)."""
    inputs, output = config["equation"].replace(" ", "").split("->")
    lhs, kernel = inputs.split(",")
    output_shape = config["output_shape"]
    output_shape = [output_shape] if isinstance(output_shape, int) else list(output_shape)
    sizes = dict(_einsum_sizes(lhs, input_shape))
    named = output.split("...")[-1] if "..." in output else output[1:]
    sizes.update((a, d) for a, d in zip(named, output_shape) if a not in sizes)
    return math.prod(int(sizes[axis]) for axis in kernel)


def _einsum_sizes(spec: str, shape):
    """(letter, size) for the letters of one einsum operand; an ellipsis takes the dims
    between the letters before and after it."""
    head, _, tail = spec.partition("...")
    pairs = list(zip(head, shape))
    if tail:
        pairs += list(zip(tail, shape[len(shape) - len(tail):]))
    return pairs


def implied_kernel_elements(config) -> int:
    """Kernel elements of every layer in a serialized model config whose spec can count them
    from its config and built input shape: what Keras would allocate, known before it does."""
    total = 0
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
            continue
        if not isinstance(item, dict):
            continue
        stack.extend(v for v in item.values() if isinstance(v, (dict, list)))
        build = item.get("build_config")
        shape = build.get("input_shape") if isinstance(build, dict) else None
        name = item.get("registered_name") or item.get("class_name")
        if not isinstance(name, str) or not isinstance(shape, list) or not shape:
            continue
        cls = keras.saving.get_registered_object(name) or getattr(keras.layers, name, None)
        spec = spec_for_type(cls) if isinstance(cls, type) else None
        if spec is None or spec.kernel_size is None:
            continue
        try:
            total += int(spec.kernel_size(item.get("config") or {}, shape))
        except (LookupError, TypeError, ValueError, ArithmeticError, AttributeError):
            continue  # not a config the formula understands; Keras will judge it
    return total


# --- Keras' own layers -----------------------------------------------------------------------

_BIAS = WeightSpec("bias", output_axes=(-1,))


def _last_axis(axis, rank: int) -> bool:
    return axis in (-1, [-1], rank - 1, [rank - 1])


def _grouped(layer, rank):
    return "a grouped convolution" if layer.groups != 1 else None


def _multiplied(layer, rank):
    return "depth_multiplier above 1" if layer.depth_multiplier != 1 else None


def _normalizes_another_axis(layer, rank):
    return None if _last_axis(layer.axis, rank) else "normalizes another axis"


def _softmax_across_channels(layer, rank):
    return "normalizes across channels" if _last_axis(layer.axis, rank) else None


def _activation_across_channels(layer, rank):
    softmax = layer.get_config()["activation"] == "softmax"
    return "normalizes across channels" if softmax else None


def _per_position(layer, rank):
    shape = layer.alpha.shape
    return "per-position parameters" if len(shape) != 1 and any(d != 1 for d in shape[:-1]) \
        else None


def _kernel(attribute: str, input_axis: int = -2, output_axes: tuple = (-1,), name="kernel"):
    return WeightSpec(name, input_axis, output_axes, kernel=True, attribute=attribute)


_L = keras.layers
_CONV = LayerSpec(weights=(_kernel("_kernel"), _BIAS), channels=PRODUCER, width="filters",
                  fold_into="kernel", macs=_conv_macs, kernel_size=_conv_kernel,
                  quantizable=True, channel_check=_grouped)
# Transposed kernels are (..., outputs, inputs).
_TRANSPOSED = LayerSpec(weights=(_kernel("kernel", -1, (-2,)), _BIAS), channels=PRODUCER,
                        width="filters", fold_into="kernel", macs=_transposed_macs,
                        kernel_size=_conv_kernel, quantizable=True)
# Depthwise kernels are (..., input channels, multiplier); output channel = in * mult + m.
_DEPTHWISE = LayerSpec(weights=(_kernel("kernel", -2, (-2, -1)), _BIAS), channels=PER_CHANNEL,
                       fold_into="kernel", macs=_depthwise_macs, kernel_size=_depthwise_kernel,
                       quantizable=True, channel_check=_multiplied)
_SEPARABLE = LayerSpec(
    weights=(_kernel("depthwise_kernel", -2, (-2, -1), name="depthwise_kernel"),
             _kernel("pointwise_kernel", -2, (-1,), name="pointwise_kernel"), _BIAS),
    channels=PRODUCER, width="filters", fold_into="pointwise_kernel", macs=_separable_macs,
    kernel_size=_separable_kernel, quantizable=True, channel_check=_multiplied)

for _cls in (_L.Conv1D, _L.Conv2D, _L.Conv3D):
    register_spec(_cls, _CONV)
for _cls in (_L.Conv1DTranspose, _L.Conv2DTranspose, _L.Conv3DTranspose):
    register_spec(_cls, _TRANSPOSED)
for _cls in (_L.DepthwiseConv1D, _L.DepthwiseConv2D):
    register_spec(_cls, _DEPTHWISE)
for _cls in (_L.SeparableConv1D, _L.SeparableConv2D):
    register_spec(_cls, _SEPARABLE)
register_spec(_L.Dense, LayerSpec(weights=(_kernel("_kernel", 0, (1,)), _BIAS),
                                  channels=PRODUCER, width="units", fold_into="kernel",
                                  macs=_dense_macs, kernel_size=_dense_kernel,
                                  quantizable=True))
# EinsumDense's axes depend on its equation; its matrix view takes the last kernel axis.
register_spec(_L.EinsumDense, LayerSpec(weights=(_kernel("_kernel", None, (-1,)),),
                                        macs=_einsum_macs, kernel_size=_einsum_kernel,
                                        quantizable=True))
register_spec(_L.Embedding, LayerSpec(
    weights=(WeightSpec("embeddings", None, (-1,), kernel=True, attribute="_embeddings"),),
    kernel_size=_embedding_kernel, quantizable=True, lookup=True))
register_spec(_L.BatchNormalization, LayerSpec(
    weights=tuple(WeightSpec(n, -1, (-1,)) for n in ("gamma", "beta", "moving_mean",
                                                     "moving_variance")),
    channels=PER_CHANNEL, channel_check=_normalizes_another_axis))

register_spec(_L.PReLU, LayerSpec(weights=(WeightSpec("alpha", -1, (-1,)),), channels=PER_CHANNEL,
                                  channel_check=_per_position))
for _cls in (_L.Dropout, _L.SpatialDropout1D, _L.SpatialDropout2D, _L.SpatialDropout3D,
             _L.GaussianNoise, _L.GaussianDropout, _L.AlphaDropout, _L.Identity):
    register_spec(_cls, LayerSpec(channels=PASS_THROUGH, identity=lambda config: True))
register_spec(_L.Activation, LayerSpec(
    channels=PASS_THROUGH, identity=lambda config: config["activation"] in ("linear", None),
    channel_check=_activation_across_channels))
register_spec(_L.Softmax, LayerSpec(channels=PASS_THROUGH, channel_check=_softmax_across_channels))
for _cls in (_L.ReLU, _L.LeakyReLU, _L.ELU, _L.MaxPooling1D,
             _L.MaxPooling2D, _L.MaxPooling3D, _L.AveragePooling1D, _L.AveragePooling2D,
             _L.AveragePooling3D, _L.GlobalMaxPooling1D, _L.GlobalMaxPooling2D,
             _L.GlobalMaxPooling3D, _L.GlobalAveragePooling1D, _L.GlobalAveragePooling2D,
             _L.GlobalAveragePooling3D, _L.ZeroPadding1D, _L.ZeroPadding2D, _L.ZeroPadding3D,
             _L.UpSampling1D, _L.UpSampling2D, _L.UpSampling3D, _L.Cropping1D, _L.Cropping2D,
             _L.Cropping3D):
    register_spec(_cls, LayerSpec(channels=PASS_THROUGH))
for _cls in (_L.Add, _L.Subtract, _L.Multiply, _L.Average, _L.Maximum, _L.Minimum):
    register_spec(_cls, LayerSpec(channels=MERGE))
register_spec(_L.Concatenate, LayerSpec(channels=CONCATENATE))
register_spec(_L.Flatten, LayerSpec(channels=FLATTEN))
del _cls
