"""A user's own layer class, made known with `register_spec`, goes through every technique: its
kernel is pruned, narrowed, folded into, clustered and searched like a Dense kernel, and
quantization leaves it in float with its reason (it has no quantized form) while quantizing
the rest. On every backend (KERAS_BACKEND)."""

import keras
import numpy as np
import pytest

import kshrink
from kshrink.analysis import search
from kshrink.layers import LayerSpec, WeightSpec, register_spec
from kshrink.layers.specs import PRODUCER

pytestmark = pytest.mark.every_backend  # run on JAX and torch too


@keras.saving.register_keras_serializable("kshrink_tests")
class Projection(keras.layers.Layer):
    """y = x @ w + b, written from scratch (no Keras Dense inside)."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.w = self.add_weight(name="w", shape=(input_shape[-1], self.units),
                                 initializer="glorot_uniform")
        self.b = self.add_weight(name="b", shape=(self.units,), initializer="random_normal")

    def call(self, x):
        return keras.ops.matmul(x, self.w) + self.b

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


register_spec(Projection, LayerSpec(
    weights=(WeightSpec("w", input_axis=0, output_axes=(1,), kernel=True, attribute="w"),
             WeightSpec("b", output_axes=(-1,))),
    channels=PRODUCER, width="units", fold_into="w", bias="b"))


def projector(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16,), name="features")
    x = Projection(32, name="proj1")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = Projection(32, name="proj2")(x)
    x = keras.layers.ReLU(name="relu2")(x)
    outputs = keras.layers.Dense(4, name="head")(x)
    model = keras.Model(inputs, outputs, name="projector")
    rng = np.random.default_rng(seed)
    bn = model.get_layer("bn")  # statistics that are not the identity, so folding shows
    bn.set_weights([rng.uniform(0.5, 2, 32), rng.normal(size=32), rng.normal(size=32),
                    rng.uniform(0.5, 2, 32)])
    return model


@pytest.fixture(scope="module")
def data():
    """A 4-class problem the projector learns in a few epochs."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 16)).astype("float32")
    y = np.argmax(x[:, :4] + 0.5 * x[:, 4:8], axis=1)
    return x, y


@pytest.fixture(scope="module")
def trained(data):
    model = projector()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(*data, epochs=15, batch_size=32, verbose=0)
    return model


def out(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def kernel(model, name):
    return keras.ops.convert_to_numpy(model.get_layer(name).w)


def applied(report):
    return sorted(r.layer for r in report.steps[0].applied)


def test_prune_reaches_the_sparsity_in_its_kernel(data):
    small, report = kshrink.compress(projector(), kshrink.Prune(
        sparsity=0.5, skip_first_last=False, min_fan_in=1), verbose=False)
    assert applied(report) == ["head", "proj1", "proj2"]
    for name in ("proj1", "proj2"):
        assert np.mean(kernel(small, name) == 0) == pytest.approx(0.5, abs=0.01)


def test_structured_prune_narrows_it_exactly(data):
    model = projector()
    small, report = kshrink.compress(model, kshrink.StructuredPrune(ratio=0.25), verbose=False)
    assert {"proj1", "proj2"} <= set(applied(report))
    assert small.get_layer("proj1").units == 24 and kernel(small, "proj2").shape == (24, 24)
    # The kept units compute what they computed: the original with the others zeroed.
    original = kernel(model, "proj1")
    kept = [int(np.argmin(np.abs(original - column[:, None]).sum(0)))
            for column in kernel(small, "proj1").T]
    gone = np.setdiff1d(np.arange(32), kept)
    reference = projector()
    weights = {layer.name: layer.get_weights() for layer in model.layers}
    weights["bn"][0][gone] = weights["bn"][1][gone] = 0  # gamma, beta: the unit gives 0
    weights["proj2"][0][gone] = 0
    kept2 = [int(np.argmin(np.abs(weights["proj2"][0][kept] - column[:, None]).sum(0)))
             for column in kernel(small, "proj2").T]
    gone2 = np.setdiff1d(np.arange(32), kept2)
    weights["proj2"][0][:, gone2] = weights["proj2"][1][gone2] = 0
    weights["head"][0][gone2] = 0
    for layer in reference.layers:
        layer.set_weights(weights[layer.name])
    x = data[0][:64]
    np.testing.assert_allclose(out(small, x), out(reference, x), atol=1e-4)


def test_fold_merges_the_batchnorm_into_its_kernel(data):
    model = projector()
    small, report = kshrink.compress(model, kshrink.Fold(), verbose=False)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in small.layers)
    x = data[0][:64]
    np.testing.assert_allclose(out(small, x), out(model, x), atol=1e-4)


def test_cluster_shares_its_values(data):
    small, report = kshrink.compress(projector(), kshrink.Cluster(clusters=8), verbose=False)
    assert {"proj1", "proj2"} <= set(applied(report))
    for name in ("proj1", "proj2"):
        assert len(np.unique(kernel(small, name))) <= 8


def test_quantize_keeps_it_in_float_saying_why_and_quantizes_the_rest(data, tmp_path):
    small, report = kshrink.compress(projector(), kshrink.Quantize(), verbose=False)
    reasons = {r.layer: r.detail for r in report.steps[0].skipped}
    assert "Projection: no quantized version of this layer" in reasons["proj1"]
    assert applied(report) == ["bn", "head"]  # the BatchNorm folded into proj1 first
    kshrink.save(small, tmp_path / "small.kshrink")
    np.testing.assert_array_equal(out(kshrink.load(tmp_path / "small.kshrink"), data[0][:8]),
                                  out(small, data[0][:8]))


def test_size_search_gives_it_levels_and_keeps_the_budget(trained, data):
    small, report = search(trained, data, objective="size", epochs=0, rounds=3,
                           max_accuracy_drop=2.0)
    dimensions = set(report.loss_rise)
    assert {"proj1", "proj2", "proj1:weights", "proj2:weights"} <= dimensions
    assert report.best is not None and report.best.within_budget
    moved = {d for d, level in report.best.levels.items() if level not in (0.0, "float")}
    assert moved & {"proj1", "proj2", "proj1:weights", "proj2:weights"}
