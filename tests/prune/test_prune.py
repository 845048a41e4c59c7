import subprocess
import sys

import keras
import numpy as np
import pytest

import kshrink
from kshrink import FineTune, Prune
from kshrink.layers import kernel_weights
from kshrink.errors import KshrinkError, RecipeError
from kshrink.measure import evaluate, file_size
from kshrink.prune import PruneWrapper, PruningCallback, strip, wrap

from conftest import small_cnn, weights_of


def kernel_sparsity(layer):
    values = np.concatenate([np.ravel(keras.ops.convert_to_numpy(w)) for w in kernel_weights(layer)])
    return float(np.mean(values == 0))


def overall_sparsity(model, names=None):
    """Zeros over the kernels of the named layers (default: every layer with kernels)."""
    layers = [model.get_layer(n) for n in names] if names else [
        l for l in model.layers if kernel_weights(l)]
    values = np.concatenate([np.ravel(keras.ops.convert_to_numpy(w))
                             for l in layers for w in kernel_weights(l)])
    return float(np.mean(values == 0))


@pytest.mark.every_backend
def test_gradual_pruning_with_fine_tuning_keeps_accuracy(trained, digits, tmp_path):
    base = evaluate(trained, *digits.test)["accuracy"]
    small, report = kshrink.compress(trained, Prune(sparsity=0.8), data=digits.train,
                                     fine_tune=FineTune(epochs=4, batch_size=32, verbose=False))
    # conv1 and fc2 hold 2.3% of the weights: kept dense, and the others prune further, so
    # the target holds over all four
    assert [r.layer for r in report.steps[0].applied] == ["conv2", "fc1"]
    assert overall_sparsity(small) == pytest.approx(0.8, abs=0.002)
    assert kernel_sparsity(small.get_layer("conv1")) == 0
    assert kernel_sparsity(small.get_layer("fc1")) == pytest.approx(0.8 * 17352 / 16960, abs=0.002)
    assert "target 0.800" in report.steps[0].summary
    assert evaluate(small, *digits.test)["accuracy"] >= base - 0.03
    # stock layers, same names
    assert [l.name for l in small.layers] == [l.name for l in trained.layers]
    assert not any(isinstance(l, PruneWrapper) for l in small.layers)


@pytest.mark.every_backend
def test_pruned_file_loads_without_kshrink_and_deflates(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(256, name="a"),
                              keras.layers.Dense(256, name="b"), keras.layers.Dense(256, name="c"),
                              keras.layers.Dense(10, name="d")])
    sparsity = 0.9
    small, _ = kshrink.compress(model, Prune(sparsity=sparsity, skip_first_last=False))
    dense_path, sparse_path = tmp_path / "dense.keras", tmp_path / "sparse.keras"
    model.save(dense_path)
    small.save(sparse_path)
    assert file_size(sparse_path).deflated <= (1 - sparsity + 0.05) * file_size(dense_path).deflated
    probe = ("import sys, keras, numpy as np; m = keras.saving.load_model(sys.argv[1]); "
             "print(round(float(np.mean(np.asarray(m.get_layer('b').kernel) == 0)), 3), "
             "'kshrink' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe, sparse_path], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0.9", "False"]


def test_global_scope_reaches_the_overall_target(trained):
    small, report = kshrink.compress(trained, Prune(sparsity=0.7, scope="global"))
    assert overall_sparsity(small) == pytest.approx(0.7, abs=0.002)
    assert "global threshold" in report.steps[0].applied[0].detail
    assert report.steps[0].summary.startswith("sparsity 0.70")


def lenet_300_100(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((784,)), keras.layers.Dense(300, name="fc1"),
                             keras.layers.Dense(100, name="fc2"),
                             keras.layers.Dense(10, name="fc3")])


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_sparsity_means_what_it_says_when_the_first_layer_holds_most_weights(scope):
    small, report = kshrink.compress(lenet_300_100(), Prune(sparsity=0.92, scope=scope,
                                                           schedule="one_shot"))
    assert overall_sparsity(small) >= 0.915  # fc1 holds 88%: pruned, not kept dense
    assert kernel_sparsity(small.get_layer("fc1")) > 0.9
    assert kernel_sparsity(small.get_layer("fc3")) == 0  # 0.4% of the weights: dense
    assert "fc3" in {r.layer for r in report.steps[0].skipped}


def test_own_fit_loop_with_callback_updates_masks_during_training(digits):
    model = small_cnn()
    config = Prune(sparsity=0.6, begin_step=0, end_step=20, frequency=5)
    pruned = wrap(model, config)
    assert sum(isinstance(l, PruneWrapper) for l in pruned.layers) == 2
    pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = PruningCallback(pruned, config)
    pruned.fit(*digits.train, epochs=1, batch_size=32, callbacks=[callback], verbose=0)
    assert callback.step == 44
    # the masks reached the target during fit, before any strip
    masks = [keras.ops.convert_to_numpy(m) for l in pruned.layers if isinstance(l, PruneWrapper)
             for m in l.masks]
    assert all(np.mean(m == 0) == pytest.approx(0.6, abs=0.01) for m in masks)
    final = strip(pruned)
    assert kernel_sparsity(final.get_layer("fc1")) == pytest.approx(0.6, abs=0.01)
    x = digits.x_test[:16].astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(final(x)),
                               keras.ops.convert_to_numpy(pruned(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer, shape", [
    (keras.layers.Dense(8), (6,)),
    (keras.layers.EinsumDense("ab,bc->ac", output_shape=8, bias_axes="c"), (6,)),
    (keras.layers.Conv1D(8, 3), (10, 4)),
    (keras.layers.Conv2D(8, 3), (10, 10, 4)),
    (keras.layers.Conv3D(8, 3), (6, 6, 6, 4)),
    (keras.layers.DepthwiseConv2D(3, depth_multiplier=2), (10, 10, 4)),
    (keras.layers.SeparableConv2D(8, 3), (10, 10, 4)),
    (keras.layers.Conv2DTranspose(8, 3), (10, 10, 4)),
    (keras.layers.Embedding(50, 8), None),
])
def test_every_supported_layer_is_pruned(layer, shape):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,), dtype="int32") if shape is None else keras.Input(shape)
    model = keras.Model(inputs, layer(inputs))
    small, report = kshrink.compress(model, Prune(sparsity=0.5, skip_first_last=False))
    assert [r.layer for r in report.steps[0].applied] == [layer.name]
    pruned = small.get_layer(layer.name)
    for w in kernel_weights(pruned):
        assert np.mean(keras.ops.convert_to_numpy(w) == 0) == pytest.approx(0.5, abs=0.05)
    # biases are left alone
    for w in pruned.weights:
        if "bias" in w.name:
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(w),
                                          keras.ops.convert_to_numpy(layer.bias))


def test_custom_layer_opts_in(tmp_path):
    class Scale(keras.layers.Layer):
        def build(self, input_shape):
            self.w = self.add_weight(shape=(input_shape[-1],), initializer="random_normal")

        def call(self, x):
            return x * self.w

        def get_prunable_weights(self):
            return [self.w]

    inputs = keras.Input((100,))
    model = keras.Model(inputs, Scale(name="scale")(inputs))
    small, report = kshrink.compress(model, Prune(sparsity=0.3, skip_first_last=False))
    assert [r.layer for r in report.steps[0].applied] == ["scale"]
    assert np.mean(keras.ops.convert_to_numpy(small.get_layer("scale").w) == 0) == 0.3


def test_unprunable_layers_are_reported_not_failed(trained):
    _, report = kshrink.compress(trained, Prune())
    reasons = {r.layer: r.detail for r in report.steps[0].skipped}
    assert reasons["bn1"] == "BatchNormalization: no prunable weights"
    assert "first prunable layer" in reasons["conv1"] and "last" in reasons["fc2"]


def test_block_pattern_that_does_not_divide_names_the_layer(trained):
    with pytest.raises(RecipeError, match=r"block 1x3 does not divide layer 'conv2' .*72x8"):
        kshrink.compress(trained, Prune(sparsity=0.5, pattern="1x3"))


def test_distillation_uses_the_original_as_teacher(trained, digits):
    base = evaluate(trained, *digits.test)["accuracy"]
    before = weights_of(trained)
    small, _ = kshrink.compress(
        trained, Prune(sparsity=0.7), data=digits.train,
        fine_tune=FineTune(epochs=3, batch_size=32, distill=True, temperature=2.0,
                           verbose=False))
    assert evaluate(small, *digits.test)["accuracy"] >= base - 0.05
    for a, b in zip(before, weights_of(trained)):
        np.testing.assert_array_equal(a, b)  # the teacher was copied, never trained


def test_fine_tune_needs_data(trained):
    with pytest.raises(KshrinkError, match="fine-tuning needs training data"):
        kshrink.compress(trained, Prune(), fine_tune=FineTune())


@pytest.mark.parametrize("options, message", [
    ({"sparsity": 1.0}, r"sparsity must be a number in \[0.0, 1.0\). Received: sparsity=1.0"),
    ({"sparsity": -0.1}, r"sparsity must be a number in \[0.0, 1.0\)"),
    ({"pattern": "4:4"}, "pattern N:M needs 0 < N < M"),
    ({"pattern": "2:4", "sparsity": 0.9}, "fixes sparsity at 0.5"),
    ({"begin_step": 100, "end_step": 50}, "end_step must not come before begin_step"),
    ({"scope": "model"}, "scope must be one of layer, global"),
    ({"frequency": 0}, "frequency must be an integer >= 1"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(RecipeError, match=message):
        Prune.from_config(options)


def test_recipe_with_fine_tune_round_trips():
    text = ("steps:\n  - prune: {sparsity: 0.9, scope: global}\n  - quantize: {mode: int8}\n"
            "fine_tune: {epochs: 2, distill: true}\n")
    recipe = kshrink.Recipe.from_yaml(text)
    assert recipe.fine_tune == FineTune(epochs=2, distill=True)
    assert recipe.steps[0] == Prune(sparsity=0.9, scope="global")
    assert kshrink.Recipe.from_yaml(recipe.to_yaml()) == recipe
    with pytest.raises(RecipeError, match="'prune' cannot come after 'quantize'"):
        kshrink.Recipe.from_yaml("- quantize: {}\n- prune: {}\n")
    with pytest.raises(RecipeError, match="fine_tune: unknown option 'epoch'"):
        kshrink.Recipe.from_yaml("steps: [prune]\nfine_tune: {epoch: 2}\n")


def test_nested_models_are_pruned_and_rebuilt_with_their_names():
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((32,)), keras.layers.Dense(64, name="inner_a"),
                              keras.layers.Dense(64, name="inner_b")], name="block")
    inputs = keras.Input((32,))
    outputs = keras.layers.Dense(4, name="head")(inner(inputs))
    model = keras.Model(inputs, outputs)
    small, report = kshrink.compress(model, Prune(sparsity=0.5, skip_first_last=False))
    assert [r.layer for r in report.steps[0].applied] == ["inner_a", "inner_b", "head"]
    nested = small.get_layer("block")
    assert isinstance(nested, keras.Sequential)
    assert kernel_sparsity(nested.get_layer("inner_b")) == 0.5
    assert not any(isinstance(l, PruneWrapper) for l in nested.layers)


def test_distillation_alone_pulls_the_student_toward_the_teacher(trained, digits):
    """With all weight on the distillation loss, only the teacher can drive training: if that
    loss were zero (as with Keras' default "kl_divergence" name in 3.15), nothing would move."""
    x = digits.x_test.astype("float32")
    config = Prune(sparsity=0.9, schedule="one_shot")
    untuned, _ = kshrink.compress(trained, config)
    tuned, _ = kshrink.compress(trained, config, data=digits.train,
                                fine_tune=FineTune(epochs=3, batch_size=32, distill=True,
                                                   distill_weight=1.0, verbose=False))
    teacher = trained.predict(x, verbose=0)
    before = kshrink.measure.fidelity(teacher, untuned.predict(x, verbose=0))
    after = kshrink.measure.fidelity(teacher, tuned.predict(x, verbose=0))
    assert after.mean_abs_diff < 0.7 * before.mean_abs_diff
    assert after.top1_agreement > before.top1_agreement


def test_the_module_docstring_example_prunes_as_it_says(digits):
    """The own-fit-loop example of `kshrink.prune.magnitude`, run as written: 90% at step 2000."""
    import kshrink.prune.magnitude as magnitude

    code = magnitude.__doc__.split("```python")[1].split("```")[0]
    x, y = (np.concatenate([part] * 45) for part in digits.train)  # 2,021 steps of 32
    namespace = {"kshrink": kshrink, "keras": keras, "model": small_cnn(), "x": x, "y": y}
    exec(code, namespace)
    assert overall_sparsity(namespace["model"]) == pytest.approx(0.9, abs=0.005)


@pytest.mark.parametrize("schedule", ["one_shot", "polynomial"])
def test_overrides_set_each_layers_sparsity(trained, digits, schedule):
    config = Prune.from_config({"sparsity": 0.6, "schedule": schedule, "overrides": [
        {"layers": {"names": ["fc1"]}, "sparsity": 0.95},
        {"layers": {"types": ["Conv2D"]}, "sparsity": 0.3},
        {"layers": {"names": ["conv1"]}, "sparsity": 0.9},  # conv1 is a Conv2D: never used
    ]})
    assert Prune.from_config(config.get_config()) == config
    small, report = kshrink.compress(trained, config, data=digits.train, verbose=False,
                                     fine_tune=FineTune(epochs=1, verbose=False))
    reached = {name: float(np.mean(keras.ops.convert_to_numpy(
        small.get_layer(name).kernel) == 0)) for name in ("conv1", "conv2", "fc1", "fc2")}
    assert reached["fc1"] == pytest.approx(0.95, abs=0.002)
    assert reached["conv1"] == pytest.approx(0.3, abs=0.02)  # the first match wins
    assert reached["conv2"] == pytest.approx(0.3, abs=0.005)
    assert reached["fc2"] == pytest.approx(0.6, abs=0.01)  # the step's target, not dense
    assert "3 override(s)" in report.steps[0].summary


def test_overrides_are_refused_where_they_cannot_hold(trained):
    with pytest.raises(RecipeError, match="take.? layer scope"):
        Prune(scope="global", overrides=[{"layers": {"names": ["fc1"]}, "sparsity": 0.9}])
    with pytest.raises(RecipeError, match="sparsity must be"):
        Prune(overrides=[{"layers": {"names": ["fc1"]}, "sparsity": 1.0}])
    with pytest.raises(kshrink.errors.SelectionError, match="nope"):
        kshrink.compress(trained, Prune(schedule="one_shot", overrides=[
            {"layers": {"names": ["nope"]}, "sparsity": 0.9}]), verbose=False)


def mobile_block(seed=0):
    """A stem, a 3x3 depthwise convolution (9 weights per output) and two pointwise ones."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12, 12, 8))
    x = keras.layers.Conv2D(40, 3, padding="same", name="stem")(inputs)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.Conv2D(32, 1, name="pw")(x)
    x = keras.layers.Conv2D(32, 1, name="pw2")(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


def test_depthwise_kernels_stay_dense_where_cheap_and_the_target_still_holds():
    model = mobile_block()
    small, report = kshrink.compress(model, Prune(sparsity=0.5, schedule="one_shot",
                                                  skip_first_last=False))
    assert kernel_sparsity(small.get_layer("dw")) == 0
    reason = next(r.detail for r in report.steps[0].skipped if r.layer == "dw")
    assert "9 weights per output" in reason and "min_fan_in" in reason
    assert overall_sparsity(small) == pytest.approx(0.5, abs=0.01)  # the others prune further
    pruned, _ = kshrink.compress(model, Prune(sparsity=0.5, schedule="one_shot",
                                              skip_first_last=False, min_fan_in=0))
    assert kernel_sparsity(pruned.get_layer("dw")) == pytest.approx(0.5, abs=0.01)


def test_two_of_four_skips_kernels_it_cannot_divide_by_default():
    model = mobile_block()
    small, _ = kshrink.compress(model, Prune(pattern="2:4", skip_first_last=False))
    assert kernel_sparsity(small.get_layer("dw")) == 0
    assert kernel_sparsity(small.get_layer("pw")) == 0.5
    with pytest.raises(KshrinkError, match="dw"):
        kshrink.compress(model, Prune(pattern="2:4", skip_first_last=False, min_fan_in=0))


@pytest.mark.parametrize("options, scope", [
    (dict(), "layer"), (dict(method="sparsegpt", schedule="one_shot"), "global"),
    (dict(method="wanda", schedule="one_shot"), "global"),
    (dict(method="sparsegpt", pattern="2:4"), "layer"),
    (dict(method="sparsegpt", schedule="one_shot", scope="layer"), "layer"),
    (dict(method="sparsegpt", schedule="one_shot",
          overrides=[{"layers": {"names": ["fc1"]}, "sparsity": 0.9}]), "layer")])
def test_calibration_methods_allocate_sparsity_globally_by_default(options, scope):
    config = Prune(**options)
    assert config.scope == scope
    assert Prune.from_config(config.get_config()).scope == scope


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_sensitivity_scope_meets_the_target_with_less_damage_than_a_uniform_one(
        trained, digits, method):
    x, y = digits.test
    reference = trained.predict(x, verbose=0)
    errors = {}
    for scope in ("layer", "sensitivity"):
        small, report = kshrink.compress(
            trained, Prune(sparsity=0.7, schedule="one_shot", scope=scope, skip_first_last=False,
                           min_fan_in=0, method=method), data=digits.train[0][:256])
        errors[scope] = float(np.sum((small.predict(x, verbose=0) - reference) ** 2))
    assert overall_sparsity(small) == pytest.approx(0.7, abs=0.002)
    layers = {e.layer: kernel_sparsity(small.get_layer(e.layer)) for e in report.steps[0].applied}
    assert max(layers.values()) - min(layers.values()) > 0.1  # not uniform
    assert all(0.5 - 1e-6 <= s <= 0.9 + 1e-6 for s in layers.values())  # within the spread
    assert all("from sensitivity: output error" in e.detail for e in report.steps[0].applied)
    assert f"sensitivity: 4 layers pruned alone ({method})" in report.steps[0].summary
    assert errors["sensitivity"] < errors["layer"]


def test_sensitivity_allocation_prunes_the_cheapest_weights_first():
    from kshrink.prune.allocate import _cheapest

    levels = np.array([0.3, 0.5, 0.7])
    flat, steep = np.array([0.0, 0.0, 0.0]), np.array([0.1, 1.0, 5.0])
    chosen = _cheapest([flat, steep], [100, 300], levels, needed=0.5 * 400)
    assert chosen[0] == pytest.approx(0.7)  # costs nothing: pruned as far as allowed
    assert 100 * chosen[0] + 300 * chosen[1] == pytest.approx(200)  # the target, exactly
    assert chosen[1] == pytest.approx(0.3 + (200 - 70 - 90) / 300)


def test_sensitivity_scope_needs_data_and_free_layer_sparsity(trained):
    with pytest.raises(RecipeError, match="scope sensitivity chooses it per layer"):
        Prune(pattern="2:4", scope="sensitivity")
    with pytest.raises(KshrinkError, match="scope sensitivity needs calibration data"):
        kshrink.compress(trained, Prune(schedule="one_shot", scope="sensitivity"))
