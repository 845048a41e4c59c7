"""Training-time layer wrappers that run a layer with some of its weights replaced.

Techniques that train (pruning masks, cluster centroids, fake-quantized kernels) keep their
state as variables of a `keras.layers.Wrapper` and compute the weights the wrapped layer sees
in every forward pass, through `layer.stateless_call`. State read this way is part of what
each compiled step reads, so updates take effect on every backend (a `Variable.constraint` is
baked in under JAX jit).
"""

from __future__ import annotations

import keras

from kshrink.layers.quantized import INTEGER_MODES, fake_quantize_kernel
from kshrink.layers.specs import kernel_weights, output_axes


class SubstituteWrapper(keras.layers.Wrapper):
    """Base class: calls the wrapped layer with `substitutes()` in place of some variables."""

    def substitutes(self) -> dict:
        """Maps `id(variable)` of the wrapped layer to the tensor used instead of its value."""
        raise NotImplementedError

    def call(self, inputs, *args, **kwargs):
        replaced = self.substitutes()

        def value(variable):
            return replaced[id(variable)] if id(variable) in replaced else variable.value

        outputs, _ = self.layer.stateless_call(
            [value(v) for v in self.layer.trainable_variables],
            [value(v) for v in self.layer.non_trainable_variables],
            inputs, *args, **kwargs,
        )
        return outputs


@keras.saving.register_keras_serializable(package="kshrink")
class PruneWrapper(SubstituteWrapper):
    """Wraps a layer and multiplies each prunable weight by its mask in the forward pass.

    Pruned weights therefore get zero gradient; the masks are non-trainable variables that
    `update_masks` rewrites on the schedule.
    """

    def __init__(self, layer, **kwargs):
        kwargs.setdefault("name", f"prune_{layer.name}")
        super().__init__(layer, **kwargs)

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        self.pruned = kernel_weights(self.layer)
        self.masks = [
            self.add_weight(shape=w.shape, initializer="ones", trainable=False,
                            name=f"{w.name}_mask", dtype=w.dtype)
            for w in self.pruned
        ]
        self.built = True

    def substitutes(self) -> dict:
        return {id(w): keras.ops.multiply(w.value, m.value)
                for w, m in zip(self.pruned, self.masks)}


@keras.saving.register_keras_serializable(package="kshrink")
class ClusterWrapper(SubstituteWrapper):
    """Wraps a layer whose kernels read their values from trainable centroids.

    Per kernel: `centroids` (groups x clusters, trainable), `assignment` (the flat centroid
    index of every weight) and `keep` (0 where a weight is held at zero).
    """

    def __init__(self, layer, clusters: int = 16, groups: tuple = (), **kwargs):
        kwargs.setdefault("name", f"cluster_{layer.name}")
        super().__init__(layer, **kwargs)
        self.clusters = clusters
        self.groups = tuple(groups)

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        self.kernels = kernel_weights(self.layer)
        groups = self.groups or (1,) * len(self.kernels)
        self.centroids, self.assignment, self.keep = [], [], []
        for kernel, count in zip(self.kernels, groups):
            self.centroids.append(self.add_weight(
                shape=(count, self.clusters), initializer="zeros", name=f"{kernel.name}_centroids",
                dtype=kernel.dtype))
            self.assignment.append(self.add_weight(
                shape=kernel.shape, initializer="zeros", trainable=False, dtype="int32",
                name=f"{kernel.name}_assignment"))
            self.keep.append(self.add_weight(
                shape=kernel.shape, initializer="ones", trainable=False, dtype=kernel.dtype,
                name=f"{kernel.name}_keep"))
        self.built = True

    def substitutes(self) -> dict:
        return {
            id(kernel): keras.ops.multiply(
                keras.ops.take(keras.ops.reshape(c.value, (-1,)), a.value), k.value)
            for kernel, c, a, k in zip(self.kernels, self.centroids, self.assignment, self.keep)
        }

    def get_config(self):
        return {**super().get_config(), "clusters": self.clusters, "groups": list(self.groups)}


@keras.saving.register_keras_serializable(package="kshrink")
class QuantizeAwareWrapper(SubstituteWrapper):
    """Wraps a layer for quantization-aware training: it trains through the rounding it
    will get.

    While the model fine-tunes, the kernels are fake-quantized to the integer grid that
    `QuantizedKernels.set_kernel` stores (per output channel, symmetric; straight-through
    gradients), and, with `activation_bits`, the input is fake-quantized per tensor and
    asymmetric between two trainable bounds. The bounds start at the calibrated range and learn
    their clipping as in PACT (Choi et al., 2018): the gradient of every clipped input flows
    into the bound that clipped it (`keras.quantizers.fake_quant_with_min_max_vars`).

    Args:
        layer: the float layer.
        mode: `"int8"` or `"int4"`: the grid of the kernels.
        group_size: int4 only: inputs per scale group.
        activation_bits: fake-quantize the input to this many bits (None: leave it float).
        input_range: `(low, high)` the input bounds start from.
    """

    def __init__(self, layer, mode="int8", group_size=None, activation_bits=None,
                 input_range=(0.0, 1.0), **kwargs):
        kwargs.setdefault("name", f"qat_{layer.name}")
        super().__init__(layer, **kwargs)
        self.mode = mode
        self.group_size = group_size
        self.activation_bits = activation_bits
        self.input_range = tuple(float(v) for v in input_range)

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        self.kernels = [(w, output_axes(self.layer, w.name)) for w in kernel_weights(self.layer)]
        if self.activation_bits:
            low, high = self.input_range
            self.input_min = self.add_weight(
                name="input_min", shape=(), initializer=keras.initializers.Constant(low))
            self.input_max = self.add_weight(
                name="input_max", shape=(), initializer=keras.initializers.Constant(high))
        self.built = True

    def substitutes(self) -> dict:
        qmax = INTEGER_MODES[self.mode]
        return {id(w): fake_quantize_kernel(w.value, axes, qmax, self.group_size)
                for w, axes in self.kernels}

    def call(self, inputs, *args, **kwargs):
        if self.activation_bits:
            inputs = keras.quantizers.fake_quant_with_min_max_vars(
                inputs, self.input_min, self.input_max, num_bits=self.activation_bits)
        return super().call(inputs, *args, **kwargs)

    def learned_range(self) -> tuple[float, float] | None:
        """The trained input bounds, or None without activation quantization."""
        if not self.activation_bits:
            return None
        low = float(keras.ops.convert_to_numpy(self.input_min.value))
        high = float(keras.ops.convert_to_numpy(self.input_max.value))
        return min(low, 0.0), max(high, low + 1e-8, 0.0)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "group_size": self.group_size,
                "activation_bits": self.activation_bits, "input_range": list(self.input_range)}


def hold_zeros(weights, masks=None) -> tuple:
    """Holds each weight at zero where its mask is 0 (default: where it is 0 now) through
    every optimizer step while fine-tuning, with a variable constraint applied after the one it
    had. The masks are fixed (JAX traces a constraint once). Returns what `release_zeros`
    takes to give the weights their own constraints back."""
    held = []
    for i, w in enumerate(weights):
        mask = (keras.ops.convert_to_numpy(w.value) != 0) if masks is None else masks[i]
        if masks is None and mask.all():
            continue  # nothing to hold
        held.append((w, w.constraint))
        w.constraint = _KeepZeros(mask, w.constraint)
    return tuple(held)


def release_zeros(held) -> None:
    """Undoes `hold_zeros`: each weight gets its constraint back."""
    for w, before in held:
        w.constraint = before


class _KeepZeros:
    def __init__(self, mask, before=None):
        self.mask, self.before = mask, before

    def __call__(self, value):
        value = self.before(value) if self.before is not None else value
        return keras.ops.multiply(value, keras.ops.cast(self.mask, value.dtype))
