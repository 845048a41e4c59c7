"""Every LayerSpec says the truth about its layer's computation: what it calls output channel c
of a kernel makes exactly channel c of the output, and what it calls input channel i of a
kernel reads exactly channel i of the input."""

import keras
import numpy as np
import pytest

from kshrink.layers import as_matrix, from_matrix, spec_for
from kshrink.layers.specs import slice_channels

L = keras.layers
# name -> (layer factory, input shape)
LAYERS = {
    "Conv1D": (lambda: L.Conv1D(6, 3, padding="causal"), (2, 9, 4)),
    "Conv2D": (lambda: L.Conv2D(6, 3, padding="same"), (2, 7, 7, 4)),
    "Conv3D": (lambda: L.Conv3D(5, 2), (2, 5, 5, 5, 3)),
    "Conv1DTranspose": (lambda: L.Conv1DTranspose(5, 3, strides=2), (2, 6, 4)),
    "Conv2DTranspose": (lambda: L.Conv2DTranspose(5, 3, strides=2), (2, 5, 5, 4)),
    "Conv3DTranspose": (lambda: L.Conv3DTranspose(3, 2), (2, 4, 4, 4, 3)),
    "DepthwiseConv1D": (lambda: L.DepthwiseConv1D(3, depth_multiplier=2), (2, 9, 4)),
    "DepthwiseConv2D": (lambda: L.DepthwiseConv2D(3, depth_multiplier=2), (2, 7, 7, 4)),
    "SeparableConv1D": (lambda: L.SeparableConv1D(6, 3, depth_multiplier=2), (2, 9, 4)),
    "SeparableConv2D": (lambda: L.SeparableConv2D(6, 3), (2, 7, 7, 4)),
    "Dense": (lambda: L.Dense(6), (3, 5)),
    "EinsumDense": (lambda: L.EinsumDense("ab,bc->ac", output_shape=6), (3, 5)),
}


def numpy(tensor):
    return keras.ops.convert_to_numpy(tensor)


def built(name):
    keras.utils.set_random_seed(0)
    make, shape = LAYERS[name]
    layer = make()
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    layer(x)
    for variable in layer.weights:  # non-zero biases, so a channel is zero only if zeroed
        variable.assign(np.random.default_rng(1).normal(size=variable.shape).astype("float32"))
    return layer, x


@pytest.mark.parametrize("name", list(LAYERS))
def test_output_channel_of_the_spec_is_the_output_channel_of_the_layer(name):
    for c in (0, -1):
        layer, x = built(name)
        weight = spec_for(layer).kernels[-1]  # a Separable's pointwise kernel makes its outputs
        variable = next(v for v in layer.weights if v.name == weight.name)
        original = numpy(variable.value)
        matrix = as_matrix(original, weight.output_axes)
        channels = matrix.shape[1]
        assert channels == layer.compute_output_shape(x.shape)[-1]
        c %= channels
        zeroed = matrix.copy()
        zeroed[:, c] = 0
        variable.assign(from_matrix(zeroed, original.shape, weight.output_axes))
        if getattr(layer, "bias", None) is not None:
            bias = numpy(layer.bias.value)
            layer.bias.assign(np.where(np.arange(channels) == c, 0, bias).astype("float32"))
        out = numpy(layer(x))
        assert np.all(out[..., c] == 0)
        others = np.delete(out, c, axis=-1)
        assert np.all(np.abs(others).max(axis=tuple(range(others.ndim - 1))) > 0)


@pytest.mark.parametrize("name", [n for n in LAYERS if n != "EinsumDense"])
def test_input_channel_of_the_spec_is_the_input_channel_of_the_layer(name):
    layer, x = built(name)
    i = x.shape[-1] - 1
    blank = x.copy()
    blank[..., i] = 0
    expected = numpy(layer(blank))
    first = spec_for(layer).kernels[0]  # the kernel that reads the input
    variable = next(v for v in layer.weights if v.name == first.name)
    values = numpy(variable.value)
    index = [slice(None)] * values.ndim
    index[first.input_axis] = i
    values[tuple(index)] = 0
    variable.assign(values)
    np.testing.assert_allclose(numpy(layer(x)), expected, rtol=1e-5, atol=1e-5)


def test_slicing_a_dense_kernel_by_the_spec_removes_rows_and_columns():
    layer, _ = built("Dense")
    weight = spec_for(layer).weight("kernel")
    kernel = numpy(layer.kernel.value)
    sliced = slice_channels(kernel, weight, drop_in={1}, drop_out={0, 5})
    np.testing.assert_array_equal(sliced, kernel[[0, 2, 3, 4]][:, 1:5])


EINSUM = [("ab,bc->ac", 6, (3, 5)), ("abc,cde->abde", (None, 3, 4), (2, 7, 6)),
          ("...b,bc->...c", 8, (2, 3, 5)), ("abc,cd->abd", (None, 9), (2, 5, 4)),
          ("abcd,cde->abe", (None, 7), (2, 3, 2, 6))]
KERNEL_LAYERS = list(LAYERS) + [f"einsum:{eq}" for eq, _, _ in EINSUM] + ["Embedding"]


@pytest.mark.parametrize("name", KERNEL_LAYERS)
def test_kernel_size_counts_from_the_config_what_keras_allocates(name):
    """The loaders refuse a file whose config implies far more kernel values than it stores;
    the count must match what Keras builds, before it builds it."""
    from kshrink.layers.specs import implied_kernel_elements

    if name.startswith("einsum:"):
        equation, output_shape, shape = next(e for e in EINSUM if e[0] == name[7:])
        layer = L.EinsumDense(equation, output_shape=output_shape)
        layer.build(shape)
    elif name == "Embedding":
        layer, shape = L.Embedding(11, 4), (2, 3)
        layer.build(shape)
    else:
        layer, _ = built(name)
        shape = LAYERS[name][1]
    config = {"class_name": type(layer).__name__, "config": layer.get_config(),
              "build_config": {"input_shape": list(shape)}}
    kernels = sum(int(np.prod(w.shape)) for w in layer.weights if "bias" not in w.path)
    assert implied_kernel_elements([config]) == kernels


def test_a_config_the_formula_cannot_take_is_not_counted():
    """Hostile configs (found by the loader fuzz run: `groups: 0`) are left to Keras to
    refuse, never an arithmetic error in the count."""
    from kshrink.layers.specs import implied_kernel_elements

    layer, _ = built("Conv2D")
    config = {"class_name": "Conv2D", "config": {**layer.get_config(), "groups": 0},
              "build_config": {"input_shape": [None, 7, 7, 4]}}
    assert implied_kernel_elements(config) == 0
