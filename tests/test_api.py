import keras
import numpy as np
import pytest

import kshrink
from kshrink import Quantize, Select
from kshrink.errors import SelectionError, UnsupportedModelError

from conftest import small_mlp, weights_of


def test_input_model_is_never_modified(cnn, images):
    before = weights_of(cnn)
    out_before = keras.ops.convert_to_numpy(cnn(images))
    small, _ = kshrink.compress(cnn, Quantize())
    assert small is not cnn
    assert all(getattr(l, "quantization_mode", None) is None for l in cnn.layers)
    for a, b in zip(before, weights_of(cnn)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(out_before, keras.ops.convert_to_numpy(cnn(images)))


def test_report_lists_applied_and_skipped_layers_with_reasons(cnn):
    small, report = kshrink.compress(cnn, [Quantize(mode="int8")])
    (step,) = report.steps
    assert [r.layer for r in step.applied] == ["conv1", "bn1", "conv2", "fc1", "fc2"]
    assert [r.detail for r in step.layers if r.layer == "bn1"] == [
        "folded into conv1 before quantizing"]
    assert not step.skipped
    assert small.get_layer("fc1").kernel.dtype == "int8"
    assert small.get_layer("conv1").stored_kernel("kernel").dtype == "int8"
    assert report.weight_bytes_after < report.weight_bytes_before
    assert "fc1" in report.to_text() and "| conv1 |" in report.to_markdown()


def test_int4_holds_half_the_bytes_of_int8(mlp):
    _, r8 = kshrink.compress(mlp, Quantize(mode="int8"))
    _, r4 = kshrink.compress(mlp, Quantize(mode="int4", group_size=None))
    kernel_params = 64 * 64 + 64 * 10
    # int4 saves half a byte per kernel weight; scales and biases stay the same
    assert r8.weight_bytes_after - r4.weight_bytes_after == kernel_params // 2


def test_layer_selection_and_exclusion(mlp):
    _, report = kshrink.compress(mlp, Quantize(layers=Select(names=("fc2",))))
    assert [r.layer for r in report.steps[0].applied] == ["fc2"]
    _, report = kshrink.compress(mlp, Quantize(exclude=Select(pattern="fc1")))
    assert [r.layer for r in report.steps[0].applied] == ["fc2"]
    with pytest.raises(SelectionError, match="matches no layer"):
        kshrink.compress(mlp, Quantize(layers=Select(types=("Conv2D",))))


def test_nested_and_sequential_models(images):
    inner = small_mlp()
    inputs = keras.Input((8, 8))
    outputs = keras.layers.Dense(3, name="head")(inner(inputs))
    outer = keras.Model(inputs, outputs)
    small, report = kshrink.compress(outer, Quantize())
    assert [r.layer for r in report.steps[0].applied] == ["fc1", "fc2", "head"]
    diff = np.abs(keras.ops.convert_to_numpy(small(images) - outer(images)))
    assert diff.max() < 0.05 * np.abs(keras.ops.convert_to_numpy(outer(images))).max()


def test_already_quantized_layers_are_skipped(mlp):
    once, _ = kshrink.compress(mlp, Quantize())
    _, report = kshrink.compress(once, Quantize(mode="int4"))
    assert {r.detail for r in report.steps[0].skipped} == {"already quantized (int8)"}
    assert not report.steps[0].applied


def test_embedding_is_quantized():
    model = keras.Sequential([keras.Input((5,), dtype="int32"),
                              keras.layers.Embedding(100, 16, name="emb")])
    small, report = kshrink.compress(model, Quantize())
    assert [r.layer for r in report.steps[0].applied] == ["emb"]
    ids = np.arange(10).reshape(2, 5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(small(ids)),
                               keras.ops.convert_to_numpy(model(ids)), atol=1e-3)


def test_subclassed_and_unbuilt_models_are_refused():
    class Custom(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    model = Custom()
    model(np.zeros((1, 3)))
    with pytest.raises(UnsupportedModelError, match="subclassed model of class Custom"):
        kshrink.compress(model, Quantize())
    with pytest.raises(UnsupportedModelError, match="not built"):
        kshrink.compress(keras.Sequential([keras.layers.Dense(2)]), Quantize())
    with pytest.raises(UnsupportedModelError, match="expected a keras.Model"):
        kshrink.compress("model.keras", Quantize())


def test_compressed_model_is_compiled_like_the_original_without_its_optimizer_state(
        digits, tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8)), keras.layers.Flatten(),
                              keras.layers.Dense(256, name="fc1"), keras.layers.Dense(10, name="fc2")])
    model.compile(keras.optimizers.Adam(3e-4),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseTopKCategoricalAccuracy(k=3)])
    model.fit(*digits.train, epochs=1, verbose=0)  # builds Adam's slots: 2 more weight copies
    small, _ = kshrink.compress(model, Quantize(layers=Select(names=("fc2",))))
    assert small.compiled
    assert isinstance(small.optimizer, keras.optimizers.Adam)
    assert small.optimizer is not model.optimizer and int(small.optimizer.iterations) == 0
    assert float(small.optimizer.learning_rate) == pytest.approx(3e-4)
    before = model.evaluate(*digits.test, verbose=0, return_dict=True)
    after = small.evaluate(*digits.test, verbose=0, return_dict=True)
    assert set(after) == set(before) == {"loss", "sparse_top_k_categorical_accuracy"}
    assert after["loss"] == pytest.approx(before["loss"], rel=0.05)
    trained_path, small_path = tmp_path / "trained.keras", tmp_path / "small.keras"
    model.save(trained_path)
    small.save(small_path)
    weights, overhead = 4 * model.count_params(), 20_000  # config, HDF5 structure
    assert small_path.stat().st_size < weights + overhead < trained_path.stat().st_size


def _xy(n=32, classes=10):
    rng = np.random.default_rng(0)
    return rng.random((n, 8, 8)).astype("float32"), rng.integers(0, classes, n)


@pytest.mark.parametrize("make, message", [
    (lambda x, y: (np.where(np.arange(x.size).reshape(x.shape) == 70, np.nan, x), y),
     r"data x holds NaN or Inf: the first at index \(1, 0, 6\)"),
    (lambda x, y: (x, np.where(np.arange(len(y)) == 3, 1000, y)), "class label 1000"),
    (lambda x, y: (x, np.where(np.arange(len(y)) == 3, -5, y)), "class label -5"),
    (lambda x, y: (np.float32(1.0), y), "0-d"),
    (lambda x, y: (x[:0], y[:0]), "no examples"),
    (lambda x, y: (x, y[:5]), "differ in length"),
])
def test_unusable_data_is_refused_with_one_line(make, message):
    from conftest import small_cnn

    data = make(*_xy())
    with pytest.raises(kshrink.KshrinkError, match=message):
        kshrink.compress(small_cnn(), kshrink.Prune(), data=data,
                         fine_tune=kshrink.FineTune(epochs=1))


@pytest.mark.parametrize("technique", [kshrink.Prune(), kshrink.Cluster(), kshrink.Fold(),
                                       kshrink.LowRank(rank=2)])
def test_a_model_with_non_finite_weights_is_refused_by_every_technique(technique):
    from conftest import small_cnn

    model = small_cnn()
    kernel = keras.ops.convert_to_numpy(model.get_layer("fc1").kernel)
    kernel[0, 0] = np.inf
    model.get_layer("fc1").kernel.assign(kernel)
    with pytest.raises(kshrink.KshrinkError, match="layer 'fc1': weight 'kernel' holds NaN or Inf"):
        kshrink.compress(model, technique)


def test_a_diverging_fine_tune_stops_and_keeps_nothing():
    x, y = _xy(64)
    with pytest.raises(kshrink.KshrinkError, match="diverged.*NaN or Inf"):
        kshrink.compress(small_mlp(), kshrink.Prune(), data=(x * 1e30, y),
                         fine_tune=kshrink.FineTune(epochs=2, learning_rate=10.0,
                                                    optimizer="sgd", verbose=False))


def test_each_step_reports_its_fidelity_and_warns_when_it_loses_much(trained, digits):
    recipe = [kshrink.Prune(sparsity=0.95, schedule="one_shot", skip_first_last=False,
                            reestimate_batchnorm=False),
              Quantize(mode="int8")]
    with pytest.warns(UserWarning, match="prune lowered top-1 agreement with the original"):
        _, report = kshrink.compress(trained, recipe, data=digits.train,
                                     validation_data=digits.test, fidelity_samples=100)
    prune, quantize = (step.fidelity for step in report.steps)
    assert prune.examples == 100 and prune.held_back
    assert prune.agreement < 0.9 and "weights moved most in" in prune.warning
    moved = prune.warning.split("weights moved most in ")[1]
    assert moved.split(" (")[0] in {"conv1", "conv2", "fc1", "fc2"}
    assert quantize.warning is None  # int8 after pruning loses little more
    assert abs(quantize.agreement - prune.agreement) < 0.05
    assert "outputs against the original, after each step" in report.to_text()


def test_fidelity_can_be_turned_off_and_is_checked(trained, digits):
    _, report = kshrink.compress(trained, Quantize(mode="int8"), data=digits.train,
                                 fidelity_samples=0)
    assert report.steps[0].fidelity is None
    with pytest.raises(kshrink.KshrinkError, match="fidelity_samples"):
        kshrink.compress(trained, Quantize(), data=digits.train, fidelity_samples=-1)


def test_progress_names_each_step_and_each_layer_solved(trained, digits):
    messages = []
    kshrink.compress(trained, Quantize(mode="int4", method="gptq"), data=digits.train,
                     progress=messages.append, fidelity_samples=0)
    assert messages[0] == "quantize"
    solved = [m for m in messages if m.startswith("quantize, GPTQ: layer ")]
    assert len(solved) >= 3 and solved[-1].split(":")[1].strip().startswith(
        f"layer {len(solved)}/{len(solved)}")


def test_a_fine_tuned_model_comes_back_without_its_optimizer(trained, digits, tmp_path):
    import zipfile

    small, _ = kshrink.compress(trained, kshrink.Prune(sparsity=0.5), data=digits.train,
                                fine_tune=kshrink.FineTune(epochs=1, verbose=False))
    assert small.compiled == trained.compiled
    small.save(tmp_path / "pruned.keras")
    with zipfile.ZipFile(tmp_path / "pruned.keras") as archive:
        import h5py

        with archive.open("model.weights.h5") as f, h5py.File(f) as weights:
            # A fresh optimizer: its step count and learning rate, no slot per weight.
            assert len(weights.get("optimizer/vars", {})) <= 2


def test_gradient_clipping_bounds_each_step(trained, digits):
    """SGD at learning rate 1 moves the weights far, unless every gradient value is clipped
    to 1e-6: then no weight can move by more than steps x lr x 1e-6 x 10 (momentum 0.9)."""
    recipe = kshrink.Prune(sparsity=0.1, schedule="one_shot", skip_first_last=False,
                           reestimate_batchnorm=False)
    x, y = digits.train

    def moved(**options):
        small, _ = kshrink.compress(trained, recipe, data=(x, y), fidelity_samples=0,
                                    fine_tune=kshrink.FineTune(
                                        epochs=1, batch_size=256, learning_rate=1.0,
                                        optimizer="sgd", verbose=False, **options))
        before = np.asarray(trained.get_layer("fc2").kernel)
        after = np.asarray(small.get_layer("fc2").kernel)
        return np.abs(after - before)[after != 0].max()

    steps = int(np.ceil(len(x) / 256))
    assert moved(clipvalue=1e-6) <= steps * 1e-6 * 10 + 1e-7
    assert moved() > 1e-2
    with pytest.raises(kshrink.errors.RecipeError, match="clipnorm"):
        kshrink.FineTune(clipnorm=-1)


def test_a_later_step_that_trains_keeps_what_earlier_steps_left_in_other_layers(
        trained, digits):
    """fc1 is pruned, fc2 shared, then conv2 clustered with a fine-tune: training that step
    must neither refill fc1's zeros nor split fc2's shared values."""
    select = kshrink.Select
    recipe = [kshrink.Prune(sparsity=0.8, skip_first_last=False, layers=select(names=("fc1",))),
              kshrink.Cluster(clusters=4, layers=select(names=("fc2",))),
              kshrink.Cluster(clusters=8, layers=select(names=("conv2",)))]
    small, _ = kshrink.compress(trained, recipe, data=digits.train,
                                fine_tune=kshrink.FineTune(epochs=1, verbose=False))
    kernel = {name: np.asarray(small.get_layer(name).kernel) for name in ("fc1", "fc2", "conv2")}
    assert np.mean(kernel["fc1"] == 0) >= 0.79
    assert len(np.unique(kernel["fc2"])) <= 4
    assert len(np.unique(kernel["conv2"])) <= 8
    # Frozen only while later steps train: every layer comes back trainable.
    assert all(layer.trainable for layer in small.layers)
