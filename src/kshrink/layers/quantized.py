"""kshrink's quantized layers: Keras layers whose kernels stay int8, packed int4, float16 or
bfloat16 in memory and are turned back into float inside `call`.

Keras quantizes Dense, EinsumDense and Embedding to int8/int4 itself; it has no quantized
convolutions and no float16 *storage* (a float16 dtype policy also computes in float16). Each
class here derives from the Keras layer it replaces and keeps all of its behaviour: Keras builds
it as usual, except that every kernel `add_weight` would create is created in its stored form
(plus its scales), and the attribute Keras reads the kernel from returns the dequantized value.

Integer kernels are stored in their (inputs, outputs) matrix view: one symmetric scale per
output channel (int8, int4), or per group of `group_size` inputs and output channel (int4).
With `activation_bits`, the layer also fake-quantizes its input to that many bits between a
calibrated (or learned) `input_min` and `input_max`: a W8A8 simulation in plain Keras.

The classes are registered as `kshrink>Quantized<Keras class>`: after `import kshrink`,
`keras.saving.load_model` loads a model that holds them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from kshrink.layers.specs import (
    as_matrix,
    from_matrix,
    kernel_weights,
    matrix_shape,
    moved_axes,
    quantizable_classes,
    spec_for_class,
)

INTEGER_MODES = {"int8": 127, "int4": 7}  # mode -> largest stored magnitude
INTEGER_BITS = {"int8": 8, "int4": 4}
FLOAT_MODES = ("float16", "bfloat16")
MODES = tuple(INTEGER_MODES) + FLOAT_MODES


class QuantizedKernels:
    """Mixin for a Keras layer class: stores its kernels quantized, dequantizes in `call`.

    Subclasses set `KERNELS`: the weight name Keras gives each kernel -> (the attribute Keras
    assigns it to, the kernel axes that index output channels).
    """

    KERNELS: dict[str, tuple[str, tuple[int, ...]]] = {}
    is_quantized = True  # pruning and clustering leave these kernels alone

    def __init__(self, *args, mode="int8", group_size=None, activation_bits=None, **kwargs):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}. Received: mode={mode!r}")
        if group_size is not None and mode != "int4":
            raise ValueError(f"group_size applies to int4 only. Received: mode={mode!r}, "
                             f"group_size={group_size}")
        super().__init__(*args, **kwargs)
        self.mode = mode
        self.group_size = group_size
        self.activation_bits = activation_bits
        self._kernel_shapes = {}

    # Keras' build calls this for every weight: kernels are created in their stored form.
    def add_weight(self, *args, name=None, shape=None, **kwargs):
        if name not in self.KERNELS:
            return super().add_weight(*args, name=name, shape=shape, **kwargs)
        shape = tuple(int(d) for d in shape)
        self._kernel_shapes[name] = shape
        if self.mode in FLOAT_MODES:
            return super().add_weight(name=name, shape=shape, dtype=self.mode,
                                      initializer="zeros", trainable=False)
        rows, columns = matrix_shape(shape, self.KERNELS[name][1])
        stored_rows = (rows + 1) // 2 if self.mode == "int4" else rows
        groups = math.ceil(rows / self.group_size) if self.group_size else 1
        stored = super().add_weight(name=name, shape=(stored_rows, columns), dtype="int8",
                                    initializer="zeros", trainable=False)
        super().add_weight(name=f"{name}_scale", shape=(groups, columns), dtype="float32",
                           initializer="ones", trainable=False)
        return stored

    def build(self, input_shape):
        super().build(input_shape)
        if self.activation_bits:
            self.input_min = super().add_weight(name="input_min", shape=(),
                                                initializer="zeros", trainable=False)
            self.input_max = super().add_weight(name="input_max", shape=(),
                                                initializer="ones", trainable=False)

    def call(self, inputs, *args, **kwargs):
        if self.activation_bits:
            inputs = keras.quantizers.fake_quant_with_min_max_vars(
                inputs, self.input_min, self.input_max, num_bits=self.activation_bits)
        return super().call(inputs, *args, **kwargs)

    def stored_kernel(self, name: str):
        """The variable holding kernel `name` as stored (int8, packed int4, float16...)."""
        return next(v for v in self.weights if v.name == name)

    def kernel_scale(self, name: str):
        """The float32 scales of an integer kernel, shape (groups, output channels)."""
        return next(v for v in self.weights if v.name == f"{name}_scale")

    def packed_int4_variables(self) -> list:
        """The variables that hold two int4 values per byte (for weight accounting)."""
        return [self.stored_kernel(n) for n in self.KERNELS] if self.mode == "int4" else []

    def dequantized(self, name: str):
        """Kernel `name` as a float tensor of the layer's compute dtype."""
        shape = self._kernel_shapes[name]
        stored = self.stored_kernel(name).value
        if self.mode in FLOAT_MODES:
            return ops.cast(stored, self.compute_dtype)
        rows, columns = matrix_shape(shape, self.KERNELS[name][1])
        if self.mode == "int4":
            stored = keras.quantizers.unpack_int4(stored, rows, axis=0)
        matrix = ops.cast(stored, "float32")
        scale = self.kernel_scale(name).value
        if self.group_size:
            padded = scale.shape[0] * self.group_size
            matrix = ops.pad(matrix, [(0, padded - rows), (0, 0)])
            matrix = ops.reshape(matrix, (scale.shape[0], self.group_size, columns))
            matrix = ops.reshape(matrix * scale[:, None, :], (padded, columns))[:rows]
        else:
            matrix = matrix * scale
        return ops.cast(_from_matrix(matrix, shape, self.KERNELS[name][1]), self.compute_dtype)

    def set_kernel(self, name: str, values: np.ndarray, scale: np.ndarray | None = None) -> None:
        """Quantizes the float kernel `values` into this layer's storage for kernel `name`,
        on the grid of `scale` (groups, output channels) if given (from a solver that chose
        it), else of each channel's or group's largest magnitude."""
        values = np.asarray(values, dtype="float32")
        if values.shape != self._kernel_shapes[name]:
            raise ValueError(f"{self.name}: kernel {name!r} has shape "
                             f"{self._kernel_shapes[name]}. Received: {values.shape}")
        if self.mode in FLOAT_MODES:
            self.stored_kernel(name).assign(values)
            return
        stored, scale = quantize_matrix(as_matrix(values, self.KERNELS[name][1]),
                                        INTEGER_MODES[self.mode], self.group_size, scale)
        if self.mode == "int4":
            stored = keras.ops.convert_to_numpy(keras.quantizers.pack_int4(stored, axis=0)[0])
        self.stored_kernel(name).assign(stored)
        self.kernel_scale(name).assign(scale)

    # Keras' convolutions save `[kernel, bias]` by attribute; ours save every variable.
    def save_own_variables(self, store):
        keras.layers.Layer.save_own_variables(self, store)

    def load_own_variables(self, store):
        keras.layers.Layer.load_own_variables(self, store)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "group_size": self.group_size,
                "activation_bits": self.activation_bits}


def quantize_matrix(matrix: np.ndarray, qmax: int, group_size: int | None,
                    scale: np.ndarray | None = None):
    """Symmetric quantization of an (inputs, outputs) matrix to integers in [-qmax, qmax], on
    the given `scale` grid or, without it, each group's largest magnitude over `qmax`.

    Returns:
        `(int8 matrix, float32 scales)` with scales of shape (groups, outputs): one group
        without `group_size`, else one per `group_size` rows (the last may be shorter).
        An all-zero channel or group gets scale 1 and stays zero.
    """
    rows, columns = matrix.shape
    size = group_size or rows
    groups = math.ceil(rows / size)
    padded = np.zeros((groups * size, columns), dtype="float32")
    padded[:rows] = matrix
    blocks = padded.reshape(groups, size, columns)
    if scale is None:
        largest = np.abs(blocks).max(axis=1)
        scale = np.where(largest > 0, largest / qmax, 1.0)
    scale = np.asarray(scale, dtype="float32").reshape(groups, columns)
    q = np.clip(np.round(blocks / scale[:, None, :]), -qmax, qmax).astype("int8")
    return q.reshape(groups * size, columns)[:rows], scale


def fake_quantize_kernel(kernel, output_axes: tuple, qmax: int, group_size: int | None):
    """`kernel` rounded to the integer grid `set_kernel` would store, as floats, for
    quantization-aware training: the gradient passes straight through the rounding."""
    shape = tuple(kernel.shape)
    kernel = ops.reshape(kernel, shape)  # a tensor, also when given a variable's value
    source, target = moved_axes(len(shape), output_axes)
    rows, columns = matrix_shape(shape, output_axes)
    matrix = ops.reshape(ops.moveaxis(kernel, source, target), (rows, columns))
    size = group_size or rows
    groups = math.ceil(rows / size)
    blocks = ops.reshape(ops.pad(matrix, [(0, groups * size - rows), (0, 0)]),
                         (groups, size, columns))
    largest = ops.max(ops.abs(blocks), axis=1, keepdims=True)
    scale = ops.stop_gradient(ops.where(largest > 0, largest / qmax, 1.0))
    rounded = ops.clip(ops.round(blocks / scale), -qmax, qmax) * scale
    blocks = blocks + ops.stop_gradient(rounded - blocks)
    matrix = ops.reshape(blocks, (groups * size, columns))[:rows]
    return _from_matrix(matrix, shape, output_axes)


def _from_matrix(matrix, shape: tuple, output_axes: tuple):
    """`specs.from_matrix` in keras.ops, for tensors inside `call`."""
    source, target = moved_axes(len(shape), output_axes)
    moved_shape = [d for i, d in enumerate(shape) if i not in source] + [shape[i] for i in source]
    moved = ops.reshape(matrix, moved_shape)
    return ops.moveaxis(moved, target, source) if source != target else moved


def _stored_attribute(name: str) -> property:
    # The attribute Keras reads the kernel from: the dequantized kernel. Keras' build assigns
    # it the stored variable, which `add_weight` has already tracked; nothing more to keep.
    def get(self):
        return self.dequantized(name)

    def set(self, value):
        pass

    return property(get, set, doc=f"The dequantized {name}.")


# Keras quantizes these to int8/int4 itself; kshrink only adds float16/bfloat16 storage.
KERAS_INTEGER_LAYERS = (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Embedding)


def quantization(layer) -> str | None:
    """How `layer`'s kernels are stored, whoever quantized them: kshrink's mode (`"int8"`,
    `"int4"`, `"float16"`, `"bfloat16"`), Keras' own (`"int8"`, `"int4"`, `"float8"`,
    `"gptq"`...), or None for a float layer."""
    if isinstance(layer, QuantizedKernels):
        return layer.mode
    mode = getattr(layer, "quantization_mode", None)
    return mode.split("/")[0] if isinstance(mode, str) and mode else None


def keras_quantizes(layer) -> bool:
    """Whether Keras' own `quantize` takes `layer` in place: its Dense, EinsumDense and
    Embedding, and subclasses from Keras or keras-hub (`ReversibleEmbedding`), which keep the
    quantized call paths. Other subclasses may override `call` and bypass them."""
    cls = type(layer)
    return issubclass(cls, KERAS_INTEGER_LAYERS) and (
        cls in KERAS_INTEGER_LAYERS or cls.__module__.startswith(("keras.", "keras_hub.")))


# The variables Keras' own quantized layers store their kernels in (int4: two values a byte).
_KERAS_STORED_KERNELS = ("kernel", "embeddings")


def stored_kernels(layer) -> list:
    """The variables holding `layer`'s kernels as stored (float, float16, int8 or packed int4):
    a float layer's by its spec, kshrink's quantized layers' and Keras' own."""
    if isinstance(layer, QuantizedKernels):
        return [layer.stored_kernel(name) for name in layer.KERNELS]
    if quantization(layer):
        return [v for v in layer.weights if v.name in _KERAS_STORED_KERNELS]
    return kernel_weights(layer)


def is_packed_int4(layer, variable) -> bool:
    """Whether `variable` of `layer` holds two int4 values in each byte."""
    if isinstance(layer, QuantizedKernels):
        return any(variable is v for v in layer.packed_int4_variables())
    return (quantization(layer) == "int4" and variable.name in _KERAS_STORED_KERNELS
            and variable.dtype == "int8")


def computed_kernels(layer) -> list:
    """The float kernels `layer` computes with, in its spec's order (kshrink's quantized
    layers dequantized); [] for a layer without a spec and Keras' own quantized layers."""
    if isinstance(layer, QuantizedKernels):
        return [layer.dequantized(name) for name in layer.KERNELS]
    return [variable.value for variable in kernel_weights(layer)]


class IntegerKernel(NamedTuple):
    """An integer kernel in the kernel's own (Keras) layout, one value per element: the float
    kernel a layer computes with is `(codes - zero) * scale` (`zero` None: symmetric)."""

    codes: np.ndarray  # int8 (int4 codes unpacked)
    scale: np.ndarray  # float32
    zero: np.ndarray | None  # int8, or None
    bits: int  # 4 or 8
    group_size: int | None = None  # inputs per scale, or None: one per output channel

    @property
    def values(self) -> np.ndarray:
        codes = self.codes.astype("float32")
        return (codes if self.zero is None else codes - self.zero) * self.scale


def integer_kernels(layer) -> dict[str, IntegerKernel]:
    """The integer kernels of a quantized layer by weight name: kshrink's int8/int4 layers,
    Keras' own int8/int4 `Dense` and `EinsumDense` (per channel, or int4 in groups with zero
    points) and `Embedding`; `{}` for any other layer (float, float16 storage, not
    quantized, Keras' other modes)."""
    if isinstance(layer, QuantizedKernels):
        return _kshrink_kernels(layer) if layer.mode in INTEGER_MODES else {}
    mode = getattr(layer, "quantization_mode", None)
    if mode not in INTEGER_MODES:
        return {}
    stored = {v.name: keras.ops.convert_to_numpy(v.value) for v in layer.weights}
    if type(layer) is keras.layers.Dense:
        return {"kernel": _keras_dense(layer, mode, stored)}
    if type(layer) is keras.layers.EinsumDense:
        return {"kernel": _keras_einsum(layer, mode, stored)}
    if isinstance(layer, keras.layers.Embedding) and set(stored) in (
            {"embeddings", "embeddings_scale"},  # keras-hub's tied ReversibleEmbedding too
            {"embeddings", "embeddings_scale", "embeddings_zero", "g_idx"}):
        return {"embeddings": _keras_embedding(layer, mode, stored)}
    return {}


def _kshrink_kernels(layer) -> dict[str, IntegerKernel]:
    found = {}
    for name, (_, axes) in layer.KERNELS.items():
        shape = layer._kernel_shapes[name]
        rows, _ = matrix_shape(shape, axes)
        codes = keras.ops.convert_to_numpy(layer.stored_kernel(name).value)
        if layer.mode == "int4":
            codes = keras.ops.convert_to_numpy(keras.quantizers.unpack_int4(codes, rows, axis=0))
        scale = keras.ops.convert_to_numpy(layer.kernel_scale(name).value)
        scale = np.repeat(scale, layer.group_size or rows, axis=0)[:rows]
        found[name] = IntegerKernel(from_matrix(codes.astype("int8"), shape, axes),
                                    from_matrix(scale, shape, axes), None,
                                    INTEGER_BITS[layer.mode], layer.group_size)
    return found


def _grouped(codes, scale, zero, groups, axis: int) -> IntegerKernel:
    """Keras' int4 in groups: asymmetric, `(codes - zero) * scale`, each group's scale and
    zero point picked by `groups` (the group of each index along `axis`)."""
    groups = groups.astype("int64")
    return IntegerKernel(codes, np.take(scale, groups, axis=axis).astype("float32"),
                         np.take(zero, groups, axis=axis).astype("int8"), 4,
                         int(np.sum(groups == 0)))


def _divided(codes, scale, bits: int) -> IntegerKernel:
    """Keras' per-channel layout: the float value is the code divided by its `scale`."""
    return IntegerKernel(codes, np.array(np.broadcast_to(1.0 / scale.astype("float32"),
                                                         codes.shape)), None, bits)


def _keras_dense(layer, mode: str, stored: dict) -> IntegerKernel:
    codes = stored["kernel"]
    if mode == "int4":  # packed along the outputs
        codes = keras.ops.convert_to_numpy(keras.quantizers.unpack_int4(codes, layer.units,
                                                                        axis=-1))
    codes = codes.astype("int8")
    if "g_idx" in stored:  # groups of inputs
        return _grouped(codes, stored["kernel_scale"], stored["kernel_zero"], stored["g_idx"],
                        axis=0)
    return _divided(codes, stored["kernel_scale"].reshape(1, -1), INTEGER_BITS[mode])


def _keras_einsum(layer, mode: str, stored: dict) -> IntegerKernel:
    if mode == "int8":
        # The kernel as built; its scales in a layout of Keras' own, which this (private)
        # method turns back (tests/layers: a canary if Keras renames it).
        scale = keras.ops.convert_to_numpy(
            layer._adjust_scale_for_dequant(stored["kernel_scale"]))
        return _divided(stored["kernel"].astype("int8"), scale, 8)
    # int4: the kernel as a (summed axes, other axes) matrix packed along its columns,
    # reshaped to the kernel's shape after dequantizing.
    shape = tuple(layer.original_kernel_shape)
    matrix = keras.ops.convert_to_numpy(keras.quantizers.unpack_int4(
        stored["kernel"], stored["kernel_scale"].shape[-1], axis=-1, dtype="int8"))
    if "g_idx" in stored:
        found = _grouped(matrix.astype("int8"), stored["kernel_scale"], stored["kernel_zero"],
                         stored["g_idx"], axis=0)
    else:
        found = _divided(matrix.astype("int8"), stored["kernel_scale"], 4)
    return found._replace(codes=found.codes.reshape(shape), scale=found.scale.reshape(shape),
                          zero=None if found.zero is None else found.zero.reshape(shape))


def _keras_embedding(layer, mode: str, stored: dict) -> IntegerKernel:
    codes = stored["embeddings"]  # a row per token (int4: packed along the row)
    if mode == "int4":
        codes = keras.ops.convert_to_numpy(keras.quantizers.unpack_int4(
            codes, layer.output_dim, axis=-1, dtype="int8"))
    codes = codes.astype("int8")
    if "g_idx" in stored:  # groups along the row
        return _grouped(codes, stored["embeddings_scale"], stored["embeddings_zero"],
                        stored["g_idx"], axis=1)
    return _divided(codes, stored["embeddings_scale"][:, None], INTEGER_BITS[mode])


def _quantized_class(base: type) -> type:
    kernels = {k.name: (k.attribute, k.output_axes) for k in spec_for_class(base).kernels}
    namespace = {
        "KERNELS": kernels,
        "__module__": __name__,
        "__doc__": f"`keras.layers.{base.__name__}` with quantized kernels "
                   "(see `kshrink.layers.quantized`).",
        **{attribute: _stored_attribute(name) for name, (attribute, _) in kernels.items()},
    }
    cls = type(f"Quantized{base.__name__}", (QuantizedKernels, base), namespace)
    return keras.saving.register_keras_serializable(package="kshrink")(cls)


QUANTIZED_CLASSES = {base: _quantized_class(base) for base in quantizable_classes()}
globals().update({cls.__name__: cls for cls in QUANTIZED_CLASSES.values()})


def keras_base(layer) -> type | None:
    """The Keras class with a quantized form that `layer` is exactly an instance of, or None."""
    return type(layer) if type(layer) in QUANTIZED_CLASSES else None


def quantize_layer(layer, mode: str, group_size: int | None = None,
                   activation_bits: int | None = None, input_range=None, scales=None):
    """A built quantized copy of the built Keras layer `layer`, same name and config.

    Args:
        layer: an instance of one of the Keras classes kshrink quantizes.
        mode: `"int8"`, `"int4"`, `"float16"` or `"bfloat16"`.
        group_size: int4 only: inputs per scale group (None: one scale per output channel).
        activation_bits: fake-quantize the layer's input to this many bits.
        input_range: `(min, max)` of the input, required with `activation_bits`.
        scales: `{kernel name: scales (groups, output channels)}` for integer kernels whose
            grid a solver chose (GPTQ): their values are already on it.
    """
    cls = QUANTIZED_CLASSES[keras_base(layer)]
    for variable in layer.weights:
        values = keras.ops.convert_to_numpy(variable.value)
        if not np.isfinite(values).all():
            raise ValueError(f"layer {layer.name!r}: weight {variable.name!r} holds NaN or "
                             "Inf values, which cannot be quantized")
    config = {**layer.get_config(), "mode": mode,
              "group_size": group_size if mode == "int4" else None,
              "activation_bits": activation_bits}
    quantized = cls.from_config(config)
    quantized.build_from_config(layer.get_build_config())
    originals = {v.name: keras.ops.convert_to_numpy(v.value) for v in layer.weights}
    for name in cls.KERNELS:
        quantized.set_kernel(name, originals.pop(name), (scales or {}).get(name))
    for variable in quantized.weights:
        if variable.name in originals:
            variable.assign(originals[variable.name])
    if activation_bits:
        low, high = input_range
        quantized.input_min.assign(low)
        quantized.input_max.assign(high)
    return quantized
