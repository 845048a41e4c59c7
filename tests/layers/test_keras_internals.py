"""Canaries: the private Keras attributes `kshrink.layers` reads and writes, by the Keras class they
belong to. If Keras renames one, this fails before an export silently loses a layer's codes."""

import gc

import keras
import numpy as np
import pytest

from kshrink.layers import integer_kernels
from kshrink.layers.internals import (build_for_fit, one_garbage_collection, own_dtype_policy,
                                      set_variable_layout)

pytestmark = pytest.mark.every_backend  # run on JAX and torch too


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


def test_keras_int4_einsum_dense_reads_back_to_its_float_kernel():
    for config in (keras.quantizers.Int4QuantizationConfig(),
                   keras.quantizers.Int4QuantizationConfig(block_size=8)):
        inputs = keras.Input((3, 16))
        layer = keras.layers.EinsumDense("abc,cde->abde", (3, 4, 5))
        model = keras.Model(inputs, layer(inputs))
        kernel = keras.ops.convert_to_numpy(layer.kernel)
        model.quantize(config=config)
        (found,) = integer_kernels(layer).values()
        assert found.codes.shape == kernel.shape and found.bits == 4
        np.testing.assert_allclose(found.values, kernel, atol=np.abs(kernel).max() / 5)
        # what Keras itself computes with
        x = np.random.default_rng(0).random((2, 3, 16), dtype="float32")
        np.testing.assert_allclose(model.predict(x, verbose=0),
                                   np.einsum("abc,cde->abde", x, found.values), atol=1e-4)


def test_keras_quantized_embeddings_read_back_to_their_rows():
    for mode, config in (("int8", None), ("int4", None),
                         ("int4", keras.quantizers.Int4QuantizationConfig(block_size=4))):
        layer = keras.layers.Embedding(12, 10)
        model = keras.Sequential([keras.Input((3,), dtype="int32"), layer])
        table = keras.ops.convert_to_numpy(layer.embeddings)
        model.quantize(mode, config=config) if config is None else model.quantize(config=config)
        (found,) = integer_kernels(layer).values()
        assert found.codes.shape == table.shape and found.bits == int(mode[3:])
        tokens = np.array([[0, 5, 11]])
        np.testing.assert_allclose(model.predict(tokens, verbose=0)[0], found.values[[0, 5, 11]],
                                   atol=1e-5)


def test_keras_variables_still_keep_their_layout_where_kshrink_sets_it():
    variable = keras.Variable(np.ones(3, "float32"))
    assert hasattr(variable, "_layout")
    set_variable_layout(variable, None)
    variable.assign(np.zeros(3, "float32"))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable.value), 0)


def test_a_layer_still_answers_its_dtype_policy_from_where_kshrink_sets_it():
    policy_map = keras.dtype_policies.DTypePolicyMap()
    layer = keras.layers.Dense(2, dtype=policy_map, name="fc")
    own = keras.dtype_policies.DTypePolicy("float16")
    own_dtype_policy(layer, own)
    assert layer.dtype_policy is own and layer.compute_dtype == "float16"


def test_keras_still_collects_garbage_for_each_variable_a_quantize_drops(monkeypatch):
    """`one_garbage_collection` works around Keras' `Layer.__delattr__`: if Keras stops
    collecting there, the workaround can go."""
    calls = []

    def counting(generation=2):
        calls.append(generation)
        return 0

    monkeypatch.setattr(gc, "collect", counting)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    model.quantize("int8")
    assert len(calls) >= 2
    calls.clear()
    with one_garbage_collection():
        model_b = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4),
                                    keras.layers.Dense(2)])
        model_b.quantize("int8")
        assert not calls
    assert len(calls) == 1  # one, at the end
    assert gc.collect is counting and model_b.layers[0].quantization_mode == "int8"


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="JAX and torch build a model's training state in fit, before tracing")
def test_a_model_built_for_fit_traces_its_first_step_once(monkeypatch):
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    traces = []
    step = TensorFlowTrainer.train_step
    monkeypatch.setattr(TensorFlowTrainer, "train_step",
                        lambda self, data: traces.append(1) or step(self, data))
    x = np.random.default_rng(0).random((64, 4), dtype="float32")
    y = np.arange(64) % 3
    for ahead, expected in ((False, 2), (True, 1)):  # a step that makes variables: traced twice
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        if ahead:
            build_for_fit(model, (x, y))
            assert model.optimizer.built
        traces.clear()
        model.fit(x, y, batch_size=32, epochs=2, verbose=0)
        assert len(traces) == expected, (ahead, len(traces))
