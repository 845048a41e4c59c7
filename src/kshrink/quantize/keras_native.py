"""The adapter to Keras' own quantization: int8/int4 Dense, EinsumDense and Embedding.

Keras quantizes these layers in place (`model.quantize`), stores the integer weights in the
`.keras` file and keeps them as integers in memory; kshrink only chooses the layers.
"""

from __future__ import annotations

import contextlib
import warnings

import keras
import numpy as np

from kshrink.core.graph import is_container, is_plain
from kshrink.layers import INTEGER_MODES, from_matrix
from kshrink.layers.internals import one_garbage_collection


def keras_quantize(model: keras.Model, layers, mode: str, group_size: int | None,
                   activation_bits: int | None, grid=None) -> None:
    """Quantizes `layers` of `model` in place with `model.quantize`.

    With `activation_bits`, Keras also quantizes each input to int8 on the fly (one scale per
    row, from its absolute maximum), so the matrix product itself runs on integers. With
    `grid`, `(scales, output axes)` of one layer's kernel as GPTQ chose them (one scale per
    column of the kernel's matrix view with those output axes), the kernel lands on that grid
    instead of Keras' own.
    """
    if not layers:
        return
    weights = None if grid is None else _OnGrid(grid, INTEGER_MODES[mode])
    ids = {id(layer) for layer in layers}
    with warnings.catch_warnings(), one_garbage_collection():
        # Keras warns for every layer without a `quantize` method; the filter skips those.
        warnings.simplefilter("ignore", UserWarning)
        model.quantize(config=_config(mode, group_size, activation_bits, weights),
                       filters=lambda layer: id(layer) in ids)
    if weights is not None:
        # The grid only chose the stored integers; the layer's config (saved with it) keeps
        # Keras' own quantizer, which loading never runs.
        for layer in layers:
            layer.quantization_config = _config(mode, None, activation_bits)


def _config(mode: str, group_size, activation_bits, weights=None):
    activations = keras.quantizers.AbsMaxQuantizer() if activation_bits else None
    if mode == "int8":
        return keras.quantizers.Int8QuantizationConfig(weight_quantizer=weights,
                                                       activation_quantizer=activations)
    return keras.quantizers.Int4QuantizationConfig(
        weight_quantizer=weights, activation_quantizer=activations,
        block_size=None if weights is not None else group_size)


class _OnGrid(keras.quantizers.Quantizer):
    """A kernel's quantizer for Keras' `quantize`: integers on a given per-output-channel grid
    (`w = q * scale`) instead of each channel's absolute maximum, returned in Keras' form (the
    integers, and the reciprocal scales shaped like the kernel with every summed axis 1)."""

    def __init__(self, grid, qmax: int):
        super().__init__(output_dtype="int8")
        scale, self.axes = grid
        self.scale = np.asarray(scale, dtype="float32").reshape(1, -1)
        self.qmax = qmax
        # What Keras' configs check: int4 kernels take values in [-8, 7] (GPTQ's in [-7, 7]).
        self.value_range = (-8, 7) if qmax == 7 else (-qmax, qmax)

    def __call__(self, x, axis=None, to_numpy=False, **kwargs):
        x = keras.ops.convert_to_numpy(x)
        rows = x.size // self.scale.size
        full = from_matrix(np.broadcast_to(self.scale, (rows, self.scale.size)), x.shape,
                           self.axes)
        values = np.clip(np.round(x / full), -self.qmax, self.qmax).astype("int8")
        summed = tuple(i for i in range(x.ndim) if i not in self.axes)
        first = full[tuple(slice(0, 1) if i in summed else slice(None) for i in range(x.ndim))]
        return values, (1.0 / first).astype("float32")

    def get_config(self):
        return {"scale": self.scale.tolist(), "axes": list(self.axes), "qmax": self.qmax}


def outer_containers(model: keras.Model) -> list:
    """The outermost containers (`is_container`) among the layers of `model` and of the plain
    models nested in it: the layers whose config must carry their sublayers' quantization."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            if is_plain(layer):
                found.extend(outer_containers(layer))
        elif is_container(layer):
            found.append(layer)
    return found


def reloads_quantized(container, paths) -> bool:
    """Whether `container`, rebuilt from its config with a quantized policy for the sublayers
    at `paths`, builds those sublayers quantized: true for containers that pass their dtype
    policy on to their sublayers, as keras-hub's and Keras' own do. Otherwise a quantized
    sublayer would not reload, and it is left in float."""
    policy = keras.dtype_policies.DTypePolicyMap(default_policy=container.dtype_policy)
    quantized = keras.dtype_policies.get(f"int8_from_{container.dtype_policy.name}")
    for path in paths:
        policy[path] = quantized
    parent = container.path.rpartition("/")[0] if container.path else ""
    try:
        with warnings.catch_warnings(), (keras.name_scope(parent) if parent
                                                   else contextlib.nullcontext()):
            warnings.simplefilter("ignore")
            copy = type(container).from_config({**container.get_config(), "dtype": policy})
            copy.build_from_config(container.get_build_config())
    except Exception:  # noqa: BLE001 - any failure means the file would not reload
        return False
    built = {layer.path: layer for layer in copy._flatten_layers(include_self=False)}
    return all(path in built and built[path].quantization_mode for path in paths)


def record_quantized_sublayers(model: keras.Model) -> None:
    """Gives each outer container of `model` a `DTypePolicyMap` of its quantized sublayers, so
    its config rebuilds them quantized when the `.keras` file loads (Keras' own
    `model.quantize` leaves containers in plain models without one, and their files do not
    reload). Model subclasses such as keras-hub's Backbones record theirs in `get_config`."""
    for container in outer_containers(model):
        inner = [layer for layer in container._flatten_layers(include_self=False)
                 if layer.quantization_mode]
        if not inner:
            continue
        policy = keras.dtype_policies.DTypePolicyMap(default_policy=container.dtype_policy)
        for layer in inner:
            policy[layer.path] = layer.dtype_policy
        container.dtype_policy = policy
