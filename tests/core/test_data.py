"""Data without labels for a model with several inputs: `[x1, x2]` is its inputs, not `(x, y)`.

A pair of plain arrays cannot be `(x, y)` for a two-input model (its `x` would be a list or a
dict), so kshrink reads it as the inputs alone, everywhere data enters.
"""

import keras
import numpy as np
import pytest

import kshrink
from kshrink.analysis import sensitivity
from kshrink.core.data import labels_of, model_inputs, split_labels
from kshrink.errors import KshrinkError
from kshrink.measure import measure


@pytest.fixture(scope="module")
def two_inputs():
    a, b = keras.Input((6,), name="a"), keras.Input((4,), name="b")
    joined = keras.layers.Concatenate()([keras.layers.Dense(8, name="da")(a),
                                         keras.layers.Dense(8, name="db")(b)])
    model = keras.Model([a, b], keras.layers.Dense(3, name="head")(joined))
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(64, 6)).astype("float32"), rng.normal(size=(64, 4)).astype("float32")]
    y = rng.integers(0, 3, 64)
    return model, x, y


def test_a_list_of_one_array_per_input_is_inputs_without_labels(two_inputs):
    model, x, y = two_inputs
    for inputs_only in (x, tuple(x)):
        data = split_labels(inputs_only, model)
        assert labels_of(data) is None
        assert [v.shape for v in model_inputs(data)] == [(64, 6), (64, 4)]
    assert labels_of(split_labels((x, y), model)) is y
    # A single-input model's pair is (x, y), as before.
    single = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    assert labels_of(split_labels((x[0], y), single)) is y


def test_measure_and_compress_read_the_inputs_of_both_branches(two_inputs):
    model, x, _ = two_inputs
    measured = measure(model, x, load_runs=0, latency_runs=1)
    assert not measured.metrics  # no labels, no accuracy
    recipe = [{"quantize": {"mode": "int4", "method": "gptq", "calibration_samples": 64}}]
    compressed, _ = kshrink.compress(model, recipe, data=x)
    explicit, _ = kshrink.compress(model, recipe, data=(x, None))
    for a, b in zip(compressed.weights, explicit.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a.value),
                                      keras.ops.convert_to_numpy(b.value))
    expected = model.predict(x, verbose=0)
    error = np.abs(compressed.predict(x, verbose=0) - expected)
    assert np.max(error) < 0.2 * np.max(np.abs(expected))


def test_search_and_sensitivity_say_labels_are_missing(two_inputs):
    model, x, _ = two_inputs
    with pytest.raises(KshrinkError, match="inputs only"):
        kshrink.search(model, x)
    report = sensitivity(model, x, mode="int8")
    assert report.accuracy is None
    assert {entry.layer for entry in report.layers} == {"da", "db", "head"}
