"""The rows `kernel_rows` forms are what each kernel multiplies: summed over groups, rows @
kernel matrix reproduces the layer's own output (bias off, linear activation)."""

import keras
import numpy as np
import pytest

from kshrink.layers import as_matrix, kernel_specs
from kshrink.layers.rows import groups, kernel_rows, unsupported
from kshrink.reconstruct.solvers import grouped

L = keras.layers
LAYERS = {
    "Dense": (lambda: L.Dense(5, use_bias=False), (3, 4, 6)),
    "Conv1D causal dilated": (lambda: L.Conv1D(4, 3, padding="causal", dilation_rate=2,
                                                use_bias=False), (2, 11, 3)),
    "Conv2D same strided": (lambda: L.Conv2D(6, 3, strides=2, padding="same",
                                              use_bias=False), (2, 9, 8, 4)),
    "Conv2D valid 5x3": (lambda: L.Conv2D(3, (5, 3), use_bias=False), (2, 9, 7, 2)),
    "Conv2D grouped": (lambda: L.Conv2D(6, 3, groups=2, padding="same", use_bias=False),
                       (2, 6, 6, 4)),
    "Conv3D": (lambda: L.Conv3D(3, 2, use_bias=False), (2, 4, 5, 4, 2)),
    "DepthwiseConv2D": (lambda: L.DepthwiseConv2D(3, depth_multiplier=2, strides=2,
                                                  padding="same", use_bias=False),
                        (2, 7, 7, 3)),
    "DepthwiseConv1D": (lambda: L.DepthwiseConv1D(3, use_bias=False), (2, 8, 3)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_rows_times_kernel_is_the_layer_output(name):
    make, shape = LAYERS[name]
    layer = make()
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    expected = keras.ops.convert_to_numpy(layer(x))
    assert unsupported(layer) is None
    (variable, spec), = kernel_specs(layer)
    matrix = as_matrix(keras.ops.convert_to_numpy(variable.value), spec.output_axes)
    w = grouped(matrix, groups(layer, spec.name))
    rows = np.concatenate(list(kernel_rows(layer, spec.name, x)), axis=1)
    out = np.matmul(rows, w)  # (G, positions, columns per group)
    out = out.transpose(1, 0, 2).reshape(-1, matrix.shape[1])
    np.testing.assert_allclose(out, expected.reshape(-1, matrix.shape[1]), atol=1e-4)


def test_separable_pointwise_rows_are_the_depthwise_output():
    layer = L.SeparableConv2D(5, 3, padding="same", use_bias=False)
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    expected = keras.ops.convert_to_numpy(layer(x)).reshape(-1, 5)
    rows = np.concatenate(list(kernel_rows(layer, "pointwise_kernel", x)), axis=1)[0]
    pointwise = keras.ops.convert_to_numpy(layer.pointwise_kernel).reshape(-1, 5)
    np.testing.assert_allclose(rows @ pointwise, expected, atol=1e-4)


def test_layers_without_rows_say_why():
    assert "reconstruction takes Dense and convolutions" in unsupported(L.Conv2DTranspose(2, 3))
    assert "channels_first" in unsupported(L.Conv2D(2, 3, data_format="channels_first"))
