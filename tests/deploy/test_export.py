"""Export to LiteRT and ONNX: the runtimes reproduce Keras, integer weights stay integer,
bad requests fail before anything is written."""

import keras
import numpy as np
import pytest

import kshrink
from kshrink.deploy import Runtime, export
from kshrink.measure import latency

on_tensorflow = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                   reason="the LiteRT converter runs on TensorFlow")


def needs_backend_for(suffix):
    backends = {".tflite": ("tensorflow",), ".onnx": ("tensorflow", "torch")}[suffix]
    if keras.backend.backend() not in backends:
        pytest.skip(f"{suffix} export runs on {backends}")


@pytest.fixture(scope="module")
def int8_model(trained):
    return kshrink.compress(trained, kshrink.Quantize(mode="int8"))[0]


@pytest.mark.parametrize("suffix", [".tflite", ".onnx"])
def test_float_export_reproduces_keras(trained, digits, tmp_path, suffix):
    needs_backend_for(suffix)
    report = export(trained, tmp_path / f"model{suffix}", data=digits.test)
    assert report.quantization == "none" and report.samples == min(256, len(digits.test[0]))
    scale = np.abs(trained.predict(digits.test[0][:256], verbose=0)).max()
    assert report.max_abs_diff <= 1e-4 * scale and report.agreement == 1.0
    assert report.path.stat().st_size == report.file_bytes
    assert [p.name for p in tmp_path.iterdir()] == [f"model{suffix}"]  # no temporary left
    runtime = Runtime(report.path)
    x = digits.test[0][:5].astype("float64")  # any batch size, converted to the input dtype
    np.testing.assert_allclose(runtime(x), trained.predict(x, verbose=0), atol=1e-4 * scale)
    assert all(t.median_ms > 0 for t in latency(runtime, x, runs=3))


@on_tensorflow
@pytest.mark.parametrize("suffix", [".tflite", ".onnx"])
def test_integer_weights_stay_integer(trained, int8_model, digits, tmp_path, suffix):
    float_file = export(trained, tmp_path / f"float{suffix}").file_bytes
    report = export(int8_model, tmp_path / f"int8{suffix}", data=digits.test)
    assert report.quantization == "dynamic"
    assert report.file_bytes < 0.4 * float_file
    assert report.agreement >= 0.97


@on_tensorflow
def test_litert_weights_land_on_kshrinks_grid(int8_model, digits, tmp_path):
    """LiteRT's per-channel int8 of kshrink's dequantized weights gives back the same
    integers, so the file computes what the Keras model computes."""
    report = export(int8_model, tmp_path / "int8.tflite", data=digits.test)
    scale = np.abs(int8_model.predict(digits.test[0][:256], verbose=0)).max()
    assert report.max_abs_diff <= 1e-4 * scale


@on_tensorflow
def test_full_integer_litert_from_a_float_model(trained, digits, tmp_path):
    float_file = export(trained, tmp_path / "float.tflite").file_bytes
    report = export(trained, tmp_path / "int8.tflite", quantization="int8", data=digits.train)
    assert report.file_bytes < 0.4 * float_file
    y = digits.train[1][:256]
    keras_accuracy = np.mean(trained.predict(digits.train[0][:256], verbose=0).argmax(1) == y)
    assert report.agreement >= 0.9 and keras_accuracy > 0.8


@on_tensorflow
@pytest.mark.parametrize("name, options, message", [
    ("model.pb", {}, "unknown file type '.pb'"),
    ("model.tflite", {"quantization": "int3"}, "quantization must be one of"),
    ("model.tflite", {"quantization": "int8"}, "calibrates activations on data"),
    ("model.onnx", {"quantization": "int8", "data": np.zeros((4, 8, 8))}, "for LiteRT"),
])
def test_bad_requests_leave_an_existing_file_alone(trained, tmp_path, name, options, message):
    target = tmp_path / name
    target.write_bytes(b"keep me")
    with pytest.raises(kshrink.KshrinkError, match=message):
        export(trained, target, **options)
    assert target.read_bytes() == b"keep me"


@on_tensorflow
def test_int8_of_an_already_integer_model_is_refused(int8_model, digits, tmp_path):
    with pytest.raises(kshrink.KshrinkError, match="export the float model"):
        export(int8_model, tmp_path / "m.tflite", quantization="int8", data=digits.train)


@pytest.mark.skipif(keras.backend.backend() == "tensorflow", reason="checks the other backends")
def test_other_backends_are_told_to_use_tensorflow(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    suffixes = [".tflite"] + ([".onnx"] if keras.backend.backend() == "jax" else [])
    for suffix in suffixes:
        with pytest.raises(kshrink.KshrinkError, match="KERAS_BACKEND=tensorflow"):
            export(model, tmp_path / f"m{suffix}")
    if keras.backend.backend() == "torch":  # float ONNX works there, integer layers do not
        model.quantize("int8")
        with pytest.raises(kshrink.KshrinkError, match="KERAS_BACKEND=tensorflow"):
            export(model, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())
