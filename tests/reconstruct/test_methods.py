"""The calibration-based methods through `compress`, on a CNN trained here on real digits and
compressed without fine-tuning: closer to the float model than rounding / magnitude, files
that reload exactly, BatchNorm statistics that match the data, and one-line errors."""

import keras
import numpy as np
import pytest

import kshrink
from kshrink.reconstruct.sequential import visit_inputs
from kshrink.errors import KshrinkError, RecipeError

from conftest import small_cnn

CALIBRATION = 256


def cosine(model, small, x):
    a, b = (keras.ops.convert_to_numpy(m(x, training=False)) for m in (model, small))
    return float(np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


@pytest.mark.parametrize("group_size", [None, 16])
def test_gptq_int4_is_closer_to_float_than_rounding(trained, digits, group_size):
    x = digits.train[0][:CALIBRATION]
    results = {}
    for method in ("rtn", "gptq"):
        small, report = kshrink.compress(
            trained, kshrink.Quantize(mode="int4", group_size=group_size, method=method),
            data=x)
        results[method] = 1 - cosine(trained, small, digits.test[0])
    assert results["gptq"] < 0.5 * results["rtn"], results
    details = [r.detail for r in report.steps[0].applied]
    assert sum("GPTQ" in d for d in details) == 4  # conv1, conv2, fc1, fc2; bn1 folded


@pytest.mark.every_backend
def test_gptq_model_reloads_with_identical_outputs(trained, digits, tmp_path):
    small, _ = kshrink.compress(trained, kshrink.Quantize(mode="int4", method="gptq"),
                                data=digits.train[0][:CALIBRATION])
    x = digits.test[0][:64]
    expected = keras.ops.convert_to_numpy(small(x))
    small.save(tmp_path / "q.keras")
    kshrink.save(small, tmp_path / "q.kshrink")
    for loaded in (keras.saving.load_model(tmp_path / "q.keras"),
                   kshrink.load(tmp_path / "q.kshrink")):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x)), expected)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_is_closer_to_float_than_magnitude(trained, digits, pattern):
    x = digits.train[0][:CALIBRATION]
    options = dict(pattern=pattern, skip_first_last=False,
                   exclude=kshrink.Select(names=["conv1"]) if pattern == "2:4" else None)
    if pattern == "unstructured":
        options.update(sparsity=0.6, schedule="one_shot")
    errors, sparsity = {}, {}
    for method in ("magnitude", "sparsegpt", "wanda"):
        small, report = kshrink.compress(
            trained, kshrink.Prune(method=method, reestimate_batchnorm=False, **options),
            data=x)
        errors[method] = 1 - cosine(trained, small, digits.test[0])
        sparsity[method] = float(report.steps[0].summary.split()[1])
    assert errors["sparsegpt"] < 0.7 * errors["magnitude"], errors
    # Every method at the sparsity the magnitude masks set (wanda rounds per column).
    assert max(sparsity.values()) - min(sparsity.values()) < 0.005, sparsity


def test_batchnorm_statistics_move_by_the_shift_compression_caused(trained, digits):
    """The statistics keep what training set and move by what pruning changed on the data:
    the mean by the difference of the input means, the variance by their ratio."""
    x = digits.train[0][:CALIBRATION]
    small, report = kshrink.compress(
        trained, kshrink.Prune(sparsity=0.5, schedule="one_shot", reestimate_batchnorm=True),
        data=x)
    assert "BatchNorm statistics re-estimated (256 examples, 1 layer)" in report.steps[0].summary

    def bn_input(model):
        values = _inputs_of(model.get_layer("bn1"), model, x)
        return np.asarray(values, dtype="float64").reshape(-1, 8)

    before, after = bn_input(trained), bn_input(small)
    old, new = trained.get_layer("bn1"), small.get_layer("bn1")
    numpy = keras.ops.convert_to_numpy
    np.testing.assert_allclose(numpy(new.moving_mean),
                               numpy(old.moving_mean) + after.mean(0) - before.mean(0),
                               rtol=1e-3, atol=1e-3)
    eps = old.epsilon
    np.testing.assert_allclose(numpy(new.moving_variance), numpy(old.moving_variance) * (
        (after.var(0) + eps) / (before.var(0) + eps)), rtol=1e-3, atol=1e-4)
    off, report = kshrink.compress(
        trained, kshrink.Prune(sparsity=0.5, schedule="one_shot",
                                   reestimate_batchnorm=False), data=x)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(off.get_layer("bn1").moving_mean),
        keras.ops.convert_to_numpy(trained.get_layer("bn1").moving_mean))
    assert "BatchNorm" not in (report.steps[0].summary or "")


def test_after_a_fine_tune_statistics_are_estimated_anew(trained, digits):
    """A few steps of training leave BatchNorm's moving averages mostly where they were: the
    re-estimate is then the plain mean and variance of each layer's input on the data."""
    x, y = (part[:CALIBRATION] for part in digits.train)
    small, _ = kshrink.compress(
        trained, kshrink.Prune(sparsity=0.5, reestimate_batchnorm=True), data=(x, y),
        fine_tune=kshrink.FineTune(epochs=1, steps_per_epoch=3, learning_rate=1e-2,
                                   verbose=False, seed=0))
    values = _inputs_of(small.get_layer("bn1"), small, x)
    values = np.asarray(values, dtype="float64").reshape(-1, 8)
    bn = small.get_layer("bn1")
    numpy = keras.ops.convert_to_numpy
    np.testing.assert_allclose(numpy(bn.moving_mean), values.mean(0), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(numpy(bn.moving_variance), values.var(0), rtol=1e-3, atol=1e-4)


def test_by_default_new_statistics_are_kept_only_if_they_bring_outputs_closer(images):
    """An untrained model and noise: its BN statistics (0, 1) are far from those of the data,
    so re-estimating them moves the outputs away from the original's; auto keeps the old."""
    model = small_cnn()
    small, report = kshrink.compress(model, kshrink.Prune(sparsity=0.2, schedule="one_shot"),
                                     data=images)
    assert "BatchNorm statistics kept" in report.steps[0].summary
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(small.get_layer("bn1").moving_mean),
                                  keras.ops.convert_to_numpy(model.get_layer("bn1").moving_mean))


@pytest.mark.parametrize("config, data, message", [
    (kshrink.Quantize(mode="int4", method="gptq"), None, "method gptq needs calibration data"),
    (kshrink.Quantize(mode="int4", method="gptq"), "few", "needs at least 8 calibration"),
    (kshrink.Prune(schedule="one_shot", method="sparsegpt"), None,
     "method sparsegpt needs calibration data"),
    (kshrink.Cluster(method="gptq"), None, "cluster: method gptq needs calibration data"),
    (kshrink.Cluster(method="gptq"), "few", "needs at least 8 calibration"),
])
def test_methods_without_enough_data_fail_in_one_line(config, data, message, digits):
    x = digits.train[0][:4] if data == "few" else None
    with pytest.raises(KshrinkError, match=message) as caught:
        kshrink.compress(small_cnn(), config, data=x)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("options, message", [
    (dict(method="sparsegpt"), "use schedule one_shot"),
    (dict(method="wanda", pattern="1x4", schedule="one_shot"), "takes unstructured or N:M"),
    (dict(method="obs"), "method must be one of magnitude, wanda, sparsegpt"),
])
def test_prune_method_options_are_checked(options, message):
    with pytest.raises(RecipeError, match=message):
        kshrink.Prune(**options)


def test_gptq_refuses_qat_and_float_modes():
    with pytest.raises(RecipeError, match="takes neither qat nor float modes"):
        kshrink.Quantize(mode="float16", method="gptq")


def test_clustering_weighted_by_input_energy_moves_outputs_less(trained, digits):
    x = digits.train[0][:CALIBRATION]
    errors = {}
    for weighted in (False, True):
        small, report = kshrink.compress(
            trained, kshrink.Cluster(clusters=4, granularity="channel", weighted=weighted,
                                     method="kmeans", reestimate_batchnorm=False), data=x)
        errors[weighted] = 1 - cosine(trained, small, digits.test[0])
        assert all(("weighted by input energy" in r.detail) == weighted
                   for r in report.steps[0].applied)
    assert errors[True] < errors[False], errors


@pytest.mark.parametrize("granularity", ["channel", "layer"])
def test_clustering_by_reconstruction_moves_outputs_less_than_kmeans(trained, digits,
                                                                     granularity):
    x = digits.train[0][:CALIBRATION]
    errors = {}
    for method in ("kmeans", "gptq"):
        small, report = kshrink.compress(
            trained, kshrink.Cluster(clusters=4, granularity=granularity, method=method,
                                     reestimate_batchnorm=False), data=x)
        errors[method] = 1 - cosine(trained, small, digits.test[0])
    assert errors["gptq"] < 0.7 * errors["kmeans"], errors
    assert all("GPTQ sweep" in r.detail for r in report.steps[0].applied)
    default, _ = kshrink.compress(trained, kshrink.Cluster(  # with data and no fine-tuning
        clusters=4, granularity=granularity, reestimate_batchnorm=False), data=x)
    assert 1 - cosine(trained, default, digits.test[0]) == pytest.approx(errors["gptq"])
    prune = kshrink.Prune(sparsity=0.6, schedule="one_shot")
    pruned, _ = kshrink.compress(trained, prune, data=x)
    shared, _ = kshrink.compress(pruned, kshrink.Cluster(clusters=4, granularity=granularity),
                                 data=x)
    zeros = keras.ops.convert_to_numpy(pruned.get_layer("fc1").kernel) == 0
    kernel = keras.ops.convert_to_numpy(shared.get_layer("fc1").kernel)
    assert zeros.mean() > 0.5 and np.all(kernel[zeros] == 0)  # the pruned zeros stay
    if granularity == "channel":
        assert max(len(np.unique(kernel[:, c])) for c in range(kernel.shape[1])) <= 5
    else:
        assert len(np.unique(kernel)) <= 5  # 4 centroids and the zeros


def test_weighted_kmeans_puts_centroids_where_the_weight_is():
    from kshrink.cluster.kmeans import kmeans_1d

    values = np.array([0.0, 0.1, 1.0, 1.1])
    centroids, _ = kmeans_1d(values, 2, weights=np.array([1.0, 0.0, 0.0, 1.0]))
    np.testing.assert_allclose(centroids, [0.0, 1.1], atol=1e-6)


def two_input_model():
    """Named inputs (data as a dict), a nested Sequential and a residual Add."""
    keras.utils.set_random_seed(0)
    a, b = keras.Input((12,), name="left"), keras.Input((12,), name="right")
    inner = keras.Sequential([keras.Input((24,)), keras.layers.Dense(16, activation="relu",
                                                                     name="inner_fc")],
                             name="inner")
    x = inner(keras.layers.Concatenate(name="join")([a, b]))
    x = keras.layers.Add(name="skip")([x, keras.layers.Dense(16, name="side")(a)])
    return keras.Model({"left": a, "right": b}, keras.layers.Dense(4, name="head")(x))


@pytest.mark.parametrize("config", [kshrink.Quantize(mode="int4", method="gptq"),
                                    kshrink.Prune(schedule="one_shot", method="sparsegpt",
                                                  skip_first_last=False, min_fan_in=0),
                                    kshrink.Cluster(clusters=8, method="gptq")])
def test_methods_reach_nested_layers_with_dict_data(config):
    model = two_input_model()
    rng = np.random.default_rng(0)
    x = {"left": rng.normal(size=(64, 12)).astype("float32"),
         "right": rng.normal(size=(64, 12)).astype("float32")}
    small, report = kshrink.compress(model, config, data=x)
    applied = {r.layer: r.detail for r in report.steps[0].applied}
    assert set(applied) == {"inner_fc", "side", "head"}
    assert all(("sparsegpt" in d) if isinstance(config, kshrink.Prune) else ("GPTQ" in d)
               for d in applied.values()), applied
    out = keras.ops.convert_to_numpy(small(x))
    assert np.isfinite(out).all()


@pytest.mark.parametrize("config", [kshrink.Quantize(mode="int4", method="gptq"),
                                    kshrink.Prune(sparsity=0.5, schedule="one_shot",
                                                  method="sparsegpt")])
def test_activations_spilled_to_disk_give_the_same_model(trained, digits, config,
                                                         monkeypatch, tmp_path):
    """Past `STREAM_MEMORY` bytes the layer inputs live in files: same weights, and the
    files are gone afterwards."""
    from kshrink.reconstruct import sequential

    x = digits.train[0][:64]
    in_memory, _ = kshrink.compress(trained, config, data=x)
    monkeypatch.setattr(sequential, "STREAM_MEMORY", 0)
    monkeypatch.setattr(sequential.tempfile, "tempdir", str(tmp_path))
    written = []
    save = np.save
    monkeypatch.setattr(sequential.np, "save", lambda path, v: (written.append(path),
                                                                save(path, v)))
    spilled, _ = kshrink.compress(trained, config, data=x)
    assert written and all(str(p).startswith(str(tmp_path)) for p in written)
    assert list(tmp_path.iterdir()) == []
    for a, b in zip(in_memory.get_weights(), spilled.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_integer_pixels_reach_the_first_layer_as_the_model_input_type(digits):
    """A model without a Rescaling layer, given uint8 images: the layer-by-layer engine
    converts them as a model call does, and GPTQ solves the same model as on float32."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8)), keras.layers.Reshape((8, 8, 1)),
                              keras.layers.Conv2D(8, 3, name="conv"), keras.layers.Flatten(),
                              keras.layers.Dense(10, name="fc")])
    pixels = digits.train[0][:64]
    assert pixels.dtype == np.uint8
    recipe = kshrink.Quantize(mode="int4", group_size=None, method="gptq", keep_int8=False)
    small = [kshrink.compress(model, recipe, data=x, verbose=False)[0]
             for x in (pixels, pixels.astype("float32"))]
    x = digits.test[0][:32].astype("float32")
    np.testing.assert_array_equal(small[0].predict(x, verbose=0), small[1].predict(x, verbose=0))


def _inputs_of(layer, model, x):
    """`layer`'s input when `model` runs on `x`."""
    found = []
    visit_inputs(model, x, {id(layer)},
                 lambda _, batches: found.extend(np.asarray(b) for b in batches))
    return np.concatenate(found)
