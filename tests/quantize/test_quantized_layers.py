"""kshrink's quantized layers: every Keras convolution kind, every mode, edge cases."""

import keras
import numpy as np
import pytest

import kshrink
from kshrink.layers import QUANTIZED_CLASSES, quantize_layer, quantize_matrix

pytestmark = pytest.mark.every_backend  # run on JAX and torch too

LAYERS = {
    "Conv1D": (lambda: keras.layers.Conv1D(6, 3, padding="causal"), (2, 9, 4)),
    "Conv2D": (lambda: keras.layers.Conv2D(8, 3, padding="same"), (2, 9, 9, 4)),
    "Conv2D_groups": (lambda: keras.layers.Conv2D(8, 3, groups=2), (2, 9, 9, 4)),
    "Conv3D": (lambda: keras.layers.Conv3D(4, 2), (2, 5, 5, 5, 3)),
    "DepthwiseConv2D": (lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2), (2, 9, 9, 4)),
    "SeparableConv2D": (lambda: keras.layers.SeparableConv2D(5, 3), (2, 9, 9, 4)),
    "Conv2DTranspose": (lambda: keras.layers.Conv2DTranspose(6, 3, strides=2), (2, 5, 5, 4)),
    "Dense": (lambda: keras.layers.Dense(7), (3, 40)),
    "Conv1DTranspose": (lambda: keras.layers.Conv1DTranspose(5, 3, strides=2), (2, 6, 4)),
    "Conv3DTranspose": (lambda: keras.layers.Conv3DTranspose(3, 2), (2, 4, 4, 4, 3)),
    "DepthwiseConv1D": (lambda: keras.layers.DepthwiseConv1D(3, depth_multiplier=2), (2, 9, 4)),
    "SeparableConv1D": (lambda: keras.layers.SeparableConv1D(5, 3), (2, 9, 4)),
    "EinsumDense": (lambda: keras.layers.EinsumDense("abc,cd->abd", (5, 6), bias_axes="d"),
                    (2, 5, 8)),
    "Embedding": (lambda: keras.layers.Embedding(20, 6), (2, 7)),
}
# Largest output error relative to the largest output, random weights and inputs.
TOLERANCE = {"int8": 0.02, "int4": 0.25, "float16": 1e-3, "bfloat16": 1e-2}


def built(name, seed=0):
    keras.utils.set_random_seed(seed)
    make, shape = LAYERS[name]
    layer = make()
    rng = np.random.default_rng(seed)
    x = (rng.integers(0, 20, shape).astype("int32") if isinstance(layer, keras.layers.Embedding)
         else rng.normal(size=shape).astype("float32"))
    return layer, x, keras.ops.convert_to_numpy(layer(x))


def test_every_quantized_class_is_checked_against_its_keras_layer():
    """The canary for the private attribute each quantized class overrides (Conv's `_kernel`,
    Dense's `_kernel`...): if Keras renamed one, the layer would compute with a zero kernel
    and `test_quantized_layer_follows_its_float_layer` would fail for it."""
    checked = {type(LAYERS[name][0]()) for name in LAYERS}
    assert set(QUANTIZED_CLASSES) <= checked


def numpy(tensor):
    return keras.ops.convert_to_numpy(tensor)


@pytest.mark.parametrize("mode", list(TOLERANCE))
@pytest.mark.parametrize("name", list(LAYERS))
def test_quantized_layer_follows_its_float_layer(name, mode):
    layer, x, reference = built(name)
    if name in ("Dense", "EinsumDense", "Embedding") and mode in ("int8", "int4"):
        pytest.skip("Keras quantizes these to integers itself")
    quantized = quantize_layer(layer, mode, group_size=8 if mode == "int4" else None)
    assert type(quantized) is QUANTIZED_CLASSES[type(layer)]
    error = np.abs(numpy(quantized(x)) - reference).max() / np.abs(reference).max()
    assert error <= TOLERANCE[mode]
    stored = [v for v in quantized.weights if v.name in quantized.KERNELS]
    assert {v.dtype for v in stored} == {"int8" if mode.startswith("int") else mode}
    float_bytes = sum(4 * np.prod(v.shape) for v in layer.weights if v.name in quantized.KERNELS)
    held = sum(numpy(v.value).nbytes for v in stored)
    assert held <= float_bytes * {"int8": 0.25, "int4": 0.125 + 0.05}.get(mode, 0.5) + 8


@pytest.mark.parametrize("name", ["Conv2D", "DepthwiseConv2D", "Conv2DTranspose",
                                  "SeparableConv2D"])
def test_int8_equals_per_channel_rounding_exactly(name):
    """The dequantized kernel is exactly round(w / s) * s with s = max|w| / 127 per channel."""
    layer, _, _ = built(name)
    quantized = quantize_layer(layer, "int8")
    for kernel_name, (_, axes) in quantized.KERNELS.items():
        w = numpy(getattr(layer, kernel_name))
        reduce = tuple(i for i in range(w.ndim) if i - w.ndim not in axes)
        scale = np.abs(w).max(axis=reduce, keepdims=True) / 127
        expected = np.round(w / scale) * scale
        np.testing.assert_allclose(numpy(quantized.dequantized(kernel_name)), expected,
                                   rtol=1e-6, atol=1e-7)


def test_all_zero_kernel_and_constant_channels_are_exact():
    layer, x, _ = built("Conv2D")
    kernel = np.zeros(layer.kernel.shape, "float32")
    kernel[..., 3] = 0.25  # a constant channel
    layer.kernel.assign(kernel)
    for mode in ("int8", "int4"):
        quantized = quantize_layer(layer, mode)
        np.testing.assert_array_equal(numpy(quantized.dequantized("kernel")), kernel)
        assert np.isfinite(numpy(quantized(x))).all()


def test_an_outlier_costs_only_its_own_channel_or_group():
    matrix = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    matrix[5, 1] = 1000.0
    q, scale = quantize_matrix(matrix, 127, None)
    error = np.abs(q * scale - matrix).max(axis=0)
    assert error[1] > 1.0  # the outlier's channel is coarse...
    assert (np.delete(error, 1) < np.abs(matrix).max() / 127).all()  # ...the others are not
    q, scale = quantize_matrix(matrix, 7, 16)  # int4 groups: only the outlier's group suffers
    error = np.abs(q * np.repeat(scale, 16, axis=0) - matrix)[:, 1]
    assert error[:16].max() > 1.0 and error[16:].max() < 0.5


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_weights_are_refused_naming_the_layer(cnn, bad):
    kernel = np.array(cnn.get_layer("conv2").kernel)
    good = kernel.copy()
    kernel[0, 0, 0, 0] = bad
    cnn.get_layer("conv2").kernel.assign(kernel)
    with pytest.raises(kshrink.KshrinkError, match="layer 'conv2'.*NaN or Inf"):
        kshrink.compress(cnn, kshrink.Quantize(exclude=kshrink.Select(names=("conv2",))))
    with pytest.raises(ValueError, match="layer 'conv2'.*NaN or Inf"):
        quantize_layer(cnn.get_layer("conv2"), "int8")
    cnn.get_layer("conv2").kernel.assign(good)
    dense = np.array(cnn.get_layer("fc1").kernel)
    dense[0, 0] = bad
    cnn.get_layer("fc1").kernel.assign(dense)
    with pytest.raises(kshrink.KshrinkError, match="layer 'fc1'.*NaN or Inf"):
        kshrink.compress(cnn, kshrink.Quantize())


@pytest.mark.parametrize("mode", ["int8", "int4", "float16"])
def test_saved_and_reloaded_outputs_are_bit_identical(cnn, images, mode, tmp_path):
    small, _ = kshrink.compress(cnn, kshrink.Quantize(mode=mode))
    expected = numpy(small(images))
    small.save(tmp_path / "q.keras")
    kshrink.save(small, tmp_path / "q.kshrink")
    for loaded in (keras.saving.load_model(tmp_path / "q.keras"),
                   kshrink.load(tmp_path / "q.kshrink")):
        np.testing.assert_array_equal(numpy(loaded(images)), expected)
        assert loaded.get_layer("conv1").stored_kernel("kernel").dtype == small.get_layer(
            "conv1").stored_kernel("kernel").dtype


def test_weight_stats_count_packed_int4_as_half_a_byte(cnn):
    small, _ = kshrink.compress(cnn, kshrink.Quantize(mode="int4", group_size=None))
    conv2 = next(l for l in kshrink.measure.weight_stats(small).layers if l.name == "conv2")
    assert conv2.bytes_by_dtype["int4"] == 3 * 3 * 8 * 8 // 2
    assert conv2.parameters >= 3 * 3 * 8 * 8


def test_import_kshrink_is_enough_to_load_a_quantized_file(cnn, images, tmp_path):
    """A fresh process, as a user writes it: `import kshrink, keras`, then Keras' own loader."""
    import os
    import subprocess
    import sys

    small, _ = kshrink.compress(cnn, kshrink.Quantize(mode="int8"))
    path = tmp_path / "int8-cnn.keras"
    small.save(path)
    np.save(tmp_path / "x.npy", images)
    probe = ("import sys, numpy as np, kshrink, keras\n"
             "model = keras.saving.load_model(sys.argv[1])\n"
             "print(type(model.get_layer('conv1')).__name__)\n"
             "np.save(sys.argv[2], keras.ops.convert_to_numpy(model(np.load(sys.argv[3]))))\n")
    done = subprocess.run([sys.executable, "-c", probe, str(path), str(tmp_path / "y.npy"),
                           str(tmp_path / "x.npy")], capture_output=True, text=True,
                          env={**os.environ, "KERAS_BACKEND": keras.backend.backend()})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "QuantizedConv2D"
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), numpy(small(images)))
