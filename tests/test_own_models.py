"""The models users bring, start to finish: keras.applications models after a short fine-tune,
keras-hub task models, a model with custom layers of its own through the command line and
`measure`, presets, and what the user sees (compiled results, quiet runs, messages that name
the fix). None of these models is built by kshrink."""

import os
import re
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest

import kshrink
from kshrink.cli import main
from kshrink.errors import RecipeError
from kshrink.reconstruct import stale_batchnorm

CUSTOM_LAYERS = '''
import keras


class SqueezeExcite(keras.layers.Layer):
    """Channel attention built from two Dense sublayers."""

    def __init__(self, ratio=4, **kwargs):
        super().__init__(**kwargs)
        self.ratio = ratio

    def build(self, input_shape):
        channels = input_shape[-1]
        self.squeeze = keras.layers.Dense(channels // self.ratio, activation="relu",
                                          dtype=self.dtype_policy, name="squeeze")
        self.excite = keras.layers.Dense(channels, activation="sigmoid",
                                         dtype=self.dtype_policy, name="excite")
        self.squeeze.build((None, channels))
        self.excite.build((None, channels // self.ratio))

    def call(self, x):
        weights = self.excite(self.squeeze(keras.ops.mean(x, axis=(1, 2))))
        return x * weights[:, None, None, :]

    def get_config(self):
        return {**super().get_config(), "ratio": self.ratio}


class MyDense(keras.layers.Layer):
    """A dense layer with a kernel of its own."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units), name="kernel")
        self.bias = self.add_weight(shape=(self.units,), initializer="zeros", name="bias")

    def call(self, x):
        return x @ self.kernel + self.bias

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def build():
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    y = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.Add()([x, SqueezeExcite(name="squeeze_excite")(y)])
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10)(MyDense(32, name="my_dense")(x))
    return keras.Model(inputs, outputs)
'''


def _digits(size: int):
    """scikit-learn's 8x8 digits scaled up to `size` x `size` RGB images in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    scale = size // 8
    x = digits.images.astype("float32") / 16.0
    x = np.repeat(np.repeat(x, scale, 1), scale, 2)[..., None].repeat(3, -1)
    # 1,280 training examples: whole batches of 64 and 128, so that no fit traces MobileNetV2
    # again for a last, smaller batch (7 s each on TensorFlow)
    return x[:1280], digits.target[:1280], x[1280:], digits.target[1280:]


@pytest.fixture(scope="module")
def mobilenet():
    """keras.applications' MobileNetV2 (its BatchNorm momentum is 0.999), trained here."""
    xt, yt, xv, yv = _digits(32)
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10,
                                           alpha=0.35)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(xt, yt, batch_size=64, epochs=6, verbose=0)
    kshrink.reconstruct.reestimate_batchnorm(model, xt[:512])  # stale after 120 steps too
    return model, (xt, yt), (xv, yv)


def test_a_short_fine_tune_of_mobilenet_v2_reestimates_its_stale_batchnorm(mobilenet):
    model, train, held_out = mobilenet
    whole = len(held_out[0])  # evaluated in one batch: one trace
    original = model.evaluate(*held_out, batch_size=whole, verbose=0)[1]
    results = {}
    for option in (None, False):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            small, report = kshrink.compress(
                model, kshrink.Prune(0.5, reestimate_batchnorm=option), data=train,
                validation_data=held_out, fine_tune=kshrink.FineTune(epochs=1), verbose=False)
        results[option] = (small.evaluate(*held_out, batch_size=whole, verbose=0)[1],
                           report.steps[0].summary,
                           [str(w.message) for w in caught])
    default, stale = results[None], results[False]
    assert original > 0.5
    # 10 steps at momentum 0.999 leave 99% of the old statistics: the default estimates them
    # anew and says why; left stale, the model collapses and the warning names the option.
    assert "too few for momentum 0.999" in default[1]
    assert default[0] > stale[0] + 0.15
    assert any("reestimate_batchnorm=True" in w for w in stale[2]), stale[2]


@pytest.mark.parametrize("build", [
    lambda: keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35),
    lambda: keras.applications.EfficientNetB0(weights=None, input_shape=(32, 32, 3)),
    lambda: keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3)),
])
def test_batchnorm_counts_as_stale_until_enough_steps_for_its_momentum(build):
    model = build()
    assert stale_batchnorm(model, 12) is not None
    assert stale_batchnorm(model, 5_000) is None


def _bert_classifier():
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.BertBackbone(vocabulary_size=200, num_layers=2, num_heads=2,
                                             hidden_dim=32, intermediate_dim=64,
                                             max_sequence_length=16)
    inputs = {"token_ids": np.random.default_rng(0).integers(0, 200, (8, 16)),
              "segment_ids": np.zeros((8, 16), "int32"),
              "padding_mask": np.ones((8, 16), "int32")}
    return keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=3,
                                               preprocessor=None), inputs


def test_a_keras_hub_task_model_quantizes_and_reloads_with_its_head(tmp_path):
    task, x = _bert_classifier()
    np.savez(tmp_path / "x.npz", **x)
    for preset in ("int8", "int4"):
        small, report = kshrink.compress(task, preset, verbose=False)
        assert type(small) is type(task) and small.compiled
        assert "logits" in {r.layer for r in report.steps[0].applied}
        small.save(tmp_path / f"{preset}.keras")
        np.save(tmp_path / f"{preset}.npy", small.predict(x, verbose=0))
    check = textwrap.dedent(f"""
        import numpy as np, keras, keras_hub, kshrink
        x = dict(np.load({str(tmp_path / "x.npz")!r}))
        for preset in ("int8", "int4"):
            model = keras.saving.load_model({str(tmp_path)!r} + f"/{{preset}}.keras")
            assert model.get_layer("logits").quantization_mode == preset
            expected = np.load({str(tmp_path)!r} + f"/{{preset}}.npy")
            np.testing.assert_allclose(model.predict(x, verbose=0), expected, atol=1e-5)
        """)
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_cli_compresses_a_saved_keras_hub_task(tmp_path):
    task, _ = _bert_classifier()
    task.save(tmp_path / "task.keras")
    assert main(["-q", "compress", str(tmp_path / "task.keras"), "--recipe", "int8",
                 "-o", str(tmp_path / "small.keras")]) == 0
    assert keras.saving.load_model(tmp_path / "small.keras").get_layer(
        "logits").quantization_mode == "int8"


def test_as_functional_lets_every_technique_reach_an_image_task_model():
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 64],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(32, 32, 3))
    task = keras_hub.models.ResNetImageClassifier(backbone=backbone, num_classes=4,
                                                  preprocessor=None)
    _, report = kshrink.compress(task, "int8", verbose=False)
    skipped = report.steps[0].skipped
    assert skipped and "kshrink.as_functional(model)" in skipped[0].detail
    flat = kshrink.as_functional(task)
    x = np.random.default_rng(0).random((4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(flat.predict(x, verbose=0), task.predict(x, verbose=0),
                               atol=1e-6)
    small, report = kshrink.compress(flat, [kshrink.StructuredPrune(0.25), kshrink.Fold(),
                                           kshrink.Quantize(mode="int8")], verbose=False)
    assert [len(step.applied) > 0 for step in report.steps] == [True, True, True]


@pytest.fixture()
def custom_model(tmp_path, monkeypatch):
    """A saved model with two custom layers, defined in a module of the user's folder."""
    module = "userlayers_" + re.sub(r"\W", "_", tmp_path.name)  # one per test: a fresh import
    (tmp_path / f"{module}.py").write_text(CUSTOM_LAYERS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = __import__(module).build()
    model.save(tmp_path / "custom.keras")
    return module, model


def test_custom_layers_through_the_command_line(custom_model, tmp_path, capsys):
    module, _ = custom_model
    assert main(["compress", "custom.keras", "--recipe", "int8", "-o", "x.keras"]) == 2
    error = capsys.readouterr().err
    assert "Could not locate class" in error and f"kshrink --import {module}" in error
    assert not (tmp_path / "x.keras").exists()

    assert main(["-q", "--import", module, "compress", "custom.keras", "--recipe", "int8",
                 "-o", "x.keras", "--data", "mnist"]) == 0
    assert f"import {module}" in capsys.readouterr().err  # what loading it needs
    assert main(["-q", "--import", module, "measure", "x.keras", "--baseline", "custom.keras",
                 "--html", "r.html", "--load-runs", "1", "--latency-runs", "3"]) == 0
    out = capsys.readouterr().out
    assert "load time" in out and "accuracy" not in out
    assert "squeeze_excite" in (tmp_path / "r.html").read_text()


def test_skip_reasons_name_the_fix_for_a_custom_layer(custom_model):
    _, model = custom_model
    _, report = kshrink.compress(model, [kshrink.Prune(0.5, schedule="one_shot"),
                                         kshrink.Quantize(mode="int8")], verbose=False)
    pruned, quantized = ({r.layer: r.detail for r in step.skipped} for step in report.steps)
    assert "get_prunable_weights()" in pruned["my_dense"]
    assert "Dense or EinsumDense sublayers" in quantized["my_dense"]
    # SqueezeExcite passes its dtype policy on: its Dense sublayers quantize and reload.
    assert "squeeze_excite/squeeze" in {r.layer for r in report.steps[1].applied}


def test_load_is_not_timed_for_a_class_another_process_cannot_import():
    layer = type("Scale", (keras.layers.Layer,), {"__module__": "__main__",
                                                   "call": lambda self, x: 2 * x})
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), layer()])
    with pytest.warns(UserWarning, match="Scale is defined in __main__"):
        result = kshrink.measure.measure(model, latency_runs=3)
    assert result.load is None and "load time" not in result.table().to_text()


def test_help_answers_without_importing_keras():
    check = ("import sys, kshrink_cli\n"
             "try:\n    kshrink_cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
             "assert 'keras' not in sys.modules and 'kshrink' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "compress" in done.stdout


def test_presets_by_name():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dense(4)])
    by_name, _ = kshrink.compress(model, "int8", verbose=False)
    by_config, _ = kshrink.compress(model, kshrink.Quantize(mode="int8"), verbose=False)
    for a, b in zip(by_name.weights, by_config.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a),
                                      keras.ops.convert_to_numpy(b))
    with pytest.raises(RecipeError, match="neither a preset .*int8.*int4-gptq"):
        kshrink.compress(model, "int9")


def test_quiet_compress_prints_nothing_while_it_fine_tunes(capfd):
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16),
                              keras.layers.Dense(4)])
    x = np.random.default_rng(0).random((64, 8)).astype("float32")
    y = np.arange(64) % 4
    capfd.readouterr()
    kshrink.compress(model, kshrink.Prune(0.5), data=(x, y), fine_tune=kshrink.FineTune(),
                     fidelity_samples=0, verbose=False)
    out, err = capfd.readouterr()
    assert out == "" and "Epoch" not in err


@pytest.mark.parametrize("options, message", [
    ({"loss": {"a": 1}}, "loss must be auto or a Keras loss name"),
    ({"loss": "no_such_loss"}, "loss must be auto or a Keras loss name"),
])
def test_a_fine_tune_loss_keras_does_not_know_is_refused_at_once(options, message):
    with pytest.raises(RecipeError, match=message):
        kshrink.FineTune.from_config(options)


def test_export_refuses_what_keras_would_refuse_later(tmp_path):
    pytest.importorskip("ai_edge_litert")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(kshrink.KshrinkError, match=r"unknown file type '\.TFLITE'"):
        kshrink.export(model, tmp_path / "m.TFLITE")
    with pytest.raises(kshrink.KshrinkError, match=r"samples must be an integer in \[1, 65,536\]"):
        kshrink.export(model, tmp_path / "m.tflite", samples=999_999_999_999)
    assert list(tmp_path.iterdir()) == []
