"""The quantize technique: overrides, calibration, static activations, QAT, sensitivity."""

import keras
import numpy as np
import pytest

import kshrink
from kshrink import Override, Quantize, Select
from kshrink.errors import RecipeError, SelectionError
from kshrink.quantize.calibrate import clip_range, fake_quantize
from kshrink.layers import QuantizeAwareWrapper


def numpy(tensor):
    return keras.ops.convert_to_numpy(tensor)


def test_first_matching_override_wins(cnn):
    config = Quantize.from_config({"mode": "int8", "overrides": [
        {"layers": {"names": ["conv1"]}, "mode": "float"},
        {"layers": {"types": ["Conv2D"]}, "mode": "int4", "group_size": None},
        {"layers": {"names": ["fc1", "conv2"]}, "mode": "float16"},
    ]})
    small, report = kshrink.compress(cnn, config)
    details = {r.layer: (r.action, r.detail) for r in report.steps[0].layers}
    assert details["conv1"] == ("skipped", "kept in float by an override")
    assert small.get_layer("conv1").kernel.dtype == "float32"
    assert small.get_layer("conv2").mode == "int4"  # the Conv2D override came first
    assert small.get_layer("fc1").mode == "float16"
    assert small.get_layer("fc2").kernel.dtype == "int8"  # no override: the default, by Keras
    assert Quantize.from_config(config.get_config()) == config


def test_an_override_that_selects_nothing_is_an_error(cnn):
    config = Quantize(overrides=[{"layers": {"names": ["nope"]}, "mode": "int4"}])
    with pytest.raises(SelectionError, match="nope"):
        kshrink.compress(cnn, config)
    with pytest.raises(RecipeError, match="mode must be one of"):
        Override(layers=Select(names=("fc1",)), mode="int2")


def test_activation_quantization_needs_data_and_qat_needs_training(cnn, images):
    with pytest.raises(kshrink.KshrinkError, match="activation_bits needs calibration data"):
        kshrink.compress(cnn, Quantize(activation_bits=8))
    with pytest.raises(kshrink.KshrinkError, match="qat=true trains the model"):
        kshrink.compress(cnn, Quantize(qat=True), data=(images, np.zeros(len(images))))
    with pytest.raises(RecipeError, match="activation_bits must be one of"):
        Quantize(activation_bits=5)


def test_calibration_methods_clip_outliers_differently():
    values = np.random.default_rng(0).normal(size=100_000).astype("float32")
    values[0] = 60.0
    low, high = clip_range(values, "minmax")
    assert high == 60.0
    p_low, p_high = clip_range(values, "percentile", percentile=99.9)
    assert 2.5 < p_high < 4 and -4 < p_low < -2.5
    m_low, m_high = clip_range(values, "mse")
    assert m_high < high
    mse = lambda lo, hi: np.mean((fake_quantize(values, lo, hi) - values) ** 2)  # noqa: E731
    assert mse(m_low, m_high) < mse(low, high)
    assert clip_range(np.maximum(values, 0), "minmax")[0] == 0.0  # zero stays in range


def test_static_activations_use_calibrated_input_ranges(trained, digits):
    x, y = digits.train
    small, report = kshrink.compress(trained, Quantize(activation_bits=8, calibration="minmax"),
                                     data=(x, y))
    conv1 = small.get_layer("conv1")
    assert float(numpy(conv1.input_min)) == 0.0 and float(numpy(conv1.input_max)) == 1.0
    detail = {r.layer: r.detail for r in report.steps[0].layers}
    assert "8-bit inputs in [0, 1]" in detail["conv1"]
    accuracy = lambda m: np.mean(numpy(m.predict(digits.test[0], verbose=0)).argmax(1)  # noqa
                                 == digits.test[1])
    assert accuracy(small) >= accuracy(trained) - 0.02


@pytest.mark.every_backend
def test_qat_folds_batchnorm_trains_ranges_and_ends_in_quantized_layers(trained, digits):
    x, y = digits.train
    config = Quantize(mode="int4", group_size=None, activation_bits=8, qat=True)
    tune = kshrink.FineTune(epochs=2, batch_size=64, learning_rate=5e-4, verbose=False)
    small, report = kshrink.compress(trained, config, data=(x, y), fine_tune=tune)
    names = [layer.name for layer in small.layers]
    assert "bn1" not in names and not any("qat" in n for n in names)
    details = {r.layer: r.detail for r in report.steps[0].layers}
    assert details["bn1"] == "folded into conv1 before quantizing"
    conv2 = small.get_layer("conv2")
    assert conv2.mode == "int4" and conv2.activation_bits == 8
    x_test, y_test = digits.test
    qat_accuracy = np.mean(numpy(small.predict(x_test, verbose=0)).argmax(1) == y_test)
    ptq, _ = kshrink.compress(trained, Quantize(mode="int4", group_size=None))
    ptq_accuracy = np.mean(numpy(ptq.predict(x_test, verbose=0)).argmax(1) == y_test)
    assert qat_accuracy >= ptq_accuracy - 0.01
    assert qat_accuracy > 0.85


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_qat_trains_in_mixed_precision_and_the_result_computes_in_float32(trained, digits,
                                                                        policy):
    x, y = digits.train
    config = Quantize(mode="int8", activation_bits=8, qat=True)
    tune = kshrink.FineTune(epochs=2, batch_size=64, learning_rate=5e-4, verbose=False,
                            clipnorm=1.0, mixed_precision=policy)
    small, _ = kshrink.compress(trained, config, data=(x, y), fine_tune=tune)
    computes = {layer.name: layer.dtype_policy.compute_dtype for layer in small.layers}
    assert set(computes.values()) == {"float32"}, computes
    conv2 = small.get_layer("conv2")
    assert conv2.mode == "int8" and numpy(conv2.input_max) > numpy(conv2.input_min)
    x_test, y_test = digits.test
    logits = numpy(small.predict(x_test, verbose=0))
    assert logits.dtype == np.float32
    assert np.mean(logits.argmax(1) == y_test) > 0.85


def test_qat_wrapper_rounds_kernels_to_the_deployed_grid(cnn, images):
    layer = cnn.get_layer("conv2")
    wrapper = QuantizeAwareWrapper(layer, mode="int8")
    wrapper.build(layer.input.shape)
    (fake,) = wrapper.substitutes().values()
    from kshrink.layers import quantize_layer

    deployed = quantize_layer(layer, "int8")
    np.testing.assert_allclose(numpy(fake), numpy(deployed.dequantized("kernel")), atol=1e-7)


def test_sensitivity_ranks_layers_reproducibly(trained, digits):
    first = kshrink.analysis.sensitivity(trained, digits.test, mode="int4", group_size=None,
                                         samples=200, seed=3)
    again = kshrink.analysis.sensitivity(trained, digits.test, mode="int4", group_size=None,
                                         samples=200, seed=3)
    assert first == again
    assert sorted(e.layer for e in first.layers) == ["conv1", "conv2", "fc1", "fc2"]
    drops = [e.accuracy_drop for e in first.layers]
    assert drops == sorted(drops, reverse=True)
    assert all(e.output_error > 0 for e in first.layers)
    assert "accuracy drop" in first.table().to_text()


def test_qat_keeps_the_zeros_of_a_pruned_model(trained, digits):
    x, y = digits.train
    recipe = [kshrink.Prune(sparsity=0.8, schedule="one_shot"),
              Quantize(mode="int8", activation_bits=8, qat=True)]
    tune = kshrink.FineTune(epochs=1, batch_size=64, verbose=False)
    small, report = kshrink.compress(trained, recipe, data=(x, y), fine_tune=tune,
                                     verbose=False)
    fc1 = numpy(small.get_layer("fc1").kernel)  # Keras' int8 kernel: zeros stay zero
    assert np.mean(fc1 == 0) >= 0.8  # 0.818: the dense first and last layers add to it
    assert "zeros of 2 pruned kernel(s) kept" in report.steps[1].summary
    kept, _ = kshrink.compress(trained, recipe[:1] + [Quantize(
        mode="int8", activation_bits=8, qat=True, preserve_sparsity=False)], data=(x, y),
        fine_tune=tune, verbose=False)
    assert np.mean(numpy(kept.get_layer("fc1").kernel) == 0) < 0.5  # training regrows them


def _mobile_block():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, name="stem")(inputs)
    x = keras.layers.DepthwiseConv2D(3, name="depthwise")(x)
    x = keras.layers.Conv2D(16, 1, name="pointwise")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="classifier")(x))


def test_int4_keeps_the_first_last_and_depthwise_layers_at_int8_unless_told():
    model = _mobile_block()
    small, report = kshrink.compress(model, Quantize(mode="int4", group_size=None),
                                     verbose=False)
    modes = {name: small.get_layer(name).quantization_mode or small.get_layer(name).mode
             for name in ("stem", "depthwise", "pointwise", "classifier")}
    assert modes == {"stem": "int8", "depthwise": "int8", "pointwise": "int4",
                     "classifier": "int8"}
    # what the three cost over int4: half a byte per weight
    extra = (3 * 3 * 3 * 8 + 3 * 3 * 8 + 16 * 10) // 2
    assert "3 layers kept at int8 (keep_int8)" in report.steps[0].summary
    assert f"{extra:,} bytes more than int4" in report.steps[0].summary

    every, _ = kshrink.compress(model, Quantize(mode="int4", group_size=None, keep_int8=False),
                                verbose=False)
    assert {every.get_layer(n).quantization_mode or every.get_layer(n).mode
            for n in modes} == {"int4"}
    told, _ = kshrink.compress(model, Quantize(mode="int4", group_size=None, overrides=[
        {"layers": {"names": ["stem"]}, "mode": "int4", "group_size": None}]), verbose=False)
    assert told.get_layer("stem").mode == "int4" and told.get_layer("depthwise").mode == "int8"
