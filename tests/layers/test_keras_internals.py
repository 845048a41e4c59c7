"""Canaries: the private Keras attributes `kshrink.layers` reads, by the Keras class they
belong to. If Keras renames one, this fails before an export silently loses a layer's codes."""

import keras
import numpy as np

from kshrink.layers import integer_kernels


def test_keras_int8_einsum_dense_still_has_the_scale_layout_kshrink_reads():
    assert callable(getattr(keras.layers.EinsumDense, "_adjust_scale_for_dequant", None))
    inputs = keras.Input((3, 4))
    layer = keras.layers.EinsumDense("abc,cde->abde", (3, 2, 5))
    model = keras.Model(inputs, layer(inputs))
    x = np.random.default_rng(0).random((2, 3, 4), dtype="float32")
    kernel = keras.ops.convert_to_numpy(layer.kernel)
    model.quantize("int8")
    (found,) = integer_kernels(layer).values()
    np.testing.assert_allclose(found.values, kernel, atol=np.abs(kernel).max() / 100)
    assert found.codes.shape == kernel.shape and model.predict(x, verbose=0).shape == (2, 3, 2, 5)


def test_keras_int4_dense_in_groups_reads_as_codes_zero_points_and_scales():
    layer = keras.layers.Dense(6)
    model = keras.Sequential([keras.Input((64,)), layer])
    kernel = keras.ops.convert_to_numpy(layer.kernel)
    model.quantize(config=keras.quantizers.Int4QuantizationConfig(block_size=16))
    (found,) = integer_kernels(layer).values()
    assert found.group_size == 16 and found.zero is not None
    assert found.codes.min() >= -8 and found.codes.max() <= 7
    np.testing.assert_allclose(found.values, kernel, atol=np.abs(kernel).max() / 5)
