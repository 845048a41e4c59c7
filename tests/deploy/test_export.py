"""Export to LiteRT and ONNX: the runtimes reproduce Keras, integer weights stay integer,
bad requests fail before anything is written."""

from pathlib import Path

import keras
import numpy as np
import pytest

import kshrink
from kshrink.deploy import Runtime, export, in_runtime
from kshrink.errors import KshrinkError
from kshrink.measure import latency

pytestmark = pytest.mark.every_backend  # run on JAX and torch too

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


@pytest.mark.parametrize("runtime", ["litert", "onnx"])
def test_a_model_in_its_runtime_computes_what_keras_does_with_no_file_left(
        trained, digits, runtime, tmp_path, monkeypatch):
    if keras.backend.backend() not in {"litert": ("tensorflow",),
                                       "onnx": ("tensorflow", "torch")}[runtime]:
        with pytest.raises(KshrinkError, match=f"the {runtime} runtime needs an export"):
            in_runtime(trained, runtime)
        return
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    runner = in_runtime(trained, runtime, digits.test[0][:64])
    assert isinstance(runner, Runtime) and runner.format == runtime
    # The export went with its temporary folder (TensorFlow leaves autograph files there).
    assert [p for p in tmp_path.rglob("*") if p.suffix in (".tflite", ".onnx")] == []
    x = digits.test[0][:8]
    scale = np.abs(trained.predict(x, verbose=0)).max()
    np.testing.assert_allclose(runner.predict_on_batch(x), trained.predict(x, verbose=0),
                               atol=1e-4 * scale)


def test_onnx_runtime_leaves_no_telemetry_file(tmp_path):
    """ONNX Runtime's wheels write a telemetry session file to /tmp and try to upload events;
    kshrink turns that off (a user's own ORT_DISABLE_TELEMETRY still wins)."""
    import os
    import subprocess
    import sys

    needs_backend_for(".onnx")
    stray = Path("/tmp/.ses")
    before = stray.stat().st_mtime_ns if stray.exists() else None
    script = ("import keras, kshrink.deploy as d\n"
              "m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])\n"
              f"d.export(m, {str(tmp_path / 'm.onnx')!r})\n"
              f"d.Runtime({str(tmp_path / 'm.onnx')!r})\n")
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, capture_output=True)
    assert (stray.stat().st_mtime_ns if stray.exists() else None) == before


def test_keras_is_a_runtime_and_an_unknown_one_is_one_line(trained):
    assert in_runtime(trained, "keras") is trained
    with pytest.raises(KshrinkError, match="runtime must be one of keras, litert, onnx"):
        in_runtime(trained, "tvm")


@on_tensorflow
@pytest.mark.parametrize("suffix", [".tflite", ".onnx"])
def test_integer_weights_stay_integer(trained, int8_model, digits, tmp_path, suffix):
    float_file = export(trained, tmp_path / f"float{suffix}").file_bytes
    report = export(int8_model, tmp_path / f"int8{suffix}", data=digits.test)
    assert report.quantization == "weights"
    assert report.file_bytes < 0.4 * float_file
    assert report.agreement >= 0.97


@pytest.fixture(scope="module")
def int4_convnet():
    """Convolutions, a depthwise one and Dense layers, int4 per channel except one Dense in
    Keras' int4 groups of 32 (with zero points); weights are most of the file."""
    rng = np.random.default_rng(0)
    model = keras.Sequential([
        keras.Input((12, 12, 3)), keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.DepthwiseConv2D(3, name="depthwise"),
        keras.layers.Conv2D(64, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(256, activation="relu",
                                                                  name="grouped"),
        keras.layers.Dense(10)])
    x = rng.random((64, 12, 12, 3), dtype="float32")
    grouped = kshrink.Select(names=["grouped"])
    recipe = [kshrink.Quantize(mode="int4", group_size=32, keep_int8=False, layers=grouped),
              kshrink.Quantize(mode="int4", group_size=None, keep_int8=False, exclude=grouped)]
    return kshrink.compress(model, recipe, data=x)[0], x


@pytest.mark.parametrize("suffix", [".tflite", ".onnx"])
def test_int4_weights_are_the_models_code_for_code(int4_convnet, tmp_path, suffix):
    import dataclasses

    from kshrink.deploy import weights

    needs_backend_for(suffix)  # ONNX from torch too: the converter sees the float twin
    model, x = int4_convnet
    twin, _ = kshrink.deploy.float_twin(model)  # the same values in float32
    float_bytes = export(twin, tmp_path / f"float{suffix}").file_bytes
    report = export(model, tmp_path / f"int4{suffix}", data=x)
    assert report.quantization == "weights"
    stored = (weights.litert_codes if suffix == ".tflite" else weights.onnx_codes)(report.path)
    kernels = weights.model_kernels(model)
    as_codes = [dataclasses.replace(k, scale=np.ones_like(k.scale), zero=None) for k in kernels]
    found = weights.place(as_codes, {n: c.astype("float32") for n, c in stored.items()})
    kept = {k.key for k in found.values()}
    if suffix == ".onnx":  # int4 in blocks along one axis: ONNX has them
        assert kept == {k.key for k in kernels}
        assert report.weights["grouped"] == "int4 in blocks of 32"
        assert report.file_bytes < 0.25 * float_bytes
    else:  # LiteRT: one scale per channel, and no int4 depthwise op
        assert kept == {k.key for k in kernels} - {"grouped"}
        assert report.weights["grouped"].startswith("float32: LiteRT takes one symmetric")
        assert report.weights["depthwise"].startswith("int8 on the int4 grid")
        assert report.file_bytes < 0.7 * float_bytes  # half of the weights are "grouped"
    assert all(report.weights[k.key].startswith("int4 per channel") for k in kernels
               if k.key not in ("grouped", "depthwise"))
    scale = np.abs(model.predict(x, verbose=0)).max()
    # LiteRT computes in float from the same weights; ONNX Runtime's int4 MatMul quantizes
    # its input to int8 as it runs.
    assert report.max_abs_diff <= (1e-5 if suffix == ".tflite" else 2e-2) * scale
    assert "weights kept code for code" in str(report)


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
def test_qdq_onnx_from_a_float_model_runs_on_integer_kernels(trained, digits, tmp_path):
    report = export(trained, tmp_path / "int8.onnx", quantization="int8", data=digits.train)
    fused = _fused_ops(report.path)
    assert "QLinearConv" in fused and "Conv" not in fused
    assert report.agreement >= 0.9 and report.model_ranges == 0


@on_tensorflow
@pytest.mark.parametrize("name, options, message", [
    ("model.pb", {}, "unknown file type '.pb'"),
    ("model.tflite", {"quantization": "int3"}, "quantization must be one of"),
    ("model.tflite", {"quantization": "int8"}, "calibrates activations on data"),
])
def test_bad_requests_leave_an_existing_file_alone(trained, tmp_path, name, options, message):
    target = tmp_path / name
    target.write_bytes(b"keep me")
    with pytest.raises(kshrink.KshrinkError, match=message):
        export(trained, target, **options)
    assert target.read_bytes() == b"keep me"


def _integer_inputs(path):
    """`(op, input dtype, input scale)` of every CONV_2D and FULLY_CONNECTED in a LiteRT file."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    return [(op["op_name"], tensors[op["inputs"][0]]["dtype"],
             tensors[op["inputs"][0]]["quantization"][0])
            for op in interpreter._get_ops_details()
            if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED")]


@on_tensorflow
def test_a_qat_model_exports_as_full_integer_with_its_own_ranges(trained, digits, tmp_path):
    qat, _ = kshrink.compress(
        trained, kshrink.Quantize(mode="int8", activation_bits=8, qat=True), data=digits.train,
        fine_tune=kshrink.FineTune(epochs=1, batch_size=64, learning_rate=1e-4))
    float_file = export(trained, tmp_path / "float.tflite").file_bytes
    report = export(qat, tmp_path / "qat.tflite", quantization="int8", data=digits.train)
    ops = _integer_inputs(report.path)
    assert {op for op, _, _ in ops} == {"CONV_2D", "FULLY_CONNECTED"}
    assert all(dtype == np.int8 for _, dtype, _ in ops)
    conv1 = qat.get_layer("conv1")
    low, high = (float(keras.ops.convert_to_numpy(v)) for v in (conv1.input_min, conv1.input_max))
    assert ops[0][2] == pytest.approx((high - low) / 255, rel=1e-4)  # the model's own range
    assert report.model_ranges == 2  # both convolutions; Keras' Dense layers are calibrated
    assert report.agreement >= 0.98 and report.file_bytes <= 0.4 * float_file

    onnx_report = export(qat, tmp_path / "qat.onnx", quantization="int8", data=digits.train)
    fused = _fused_ops(onnx_report.path)
    assert fused.count("QLinearConv") == 2 and fused.count("QLinearMatMul") == 2
    assert onnx_report.agreement >= 0.98
    assert _input_scale(onnx_report.path, "QLinearConv") == pytest.approx((high - low) / 255,
                                                                          rel=1e-4)


def _fused_ops(path):
    """The ops ONNX Runtime runs after fusing the QDQ graph."""
    import onnx
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(path.with_suffix(".fused.onnx"))
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def _input_scale(path, op):
    """The input scale of the first `op` node in the fused graph."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(path.with_suffix(".fused.onnx")).graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    node = next(n for n in graph.node if n.op_type == op)
    return float(constants[node.input[1]])


@pytest.mark.skipif(keras.backend.backend() == "tensorflow", reason="checks the other backends")
def test_other_backends_are_told_to_use_tensorflow(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    suffixes = [".tflite"] + ([".onnx"] if keras.backend.backend() == "jax" else [])
    for suffix in suffixes:
        with pytest.raises(kshrink.KshrinkError, match="KERAS_BACKEND=tensorflow"):
            export(model, tmp_path / f"m{suffix}")
    if keras.backend.backend() == "torch":  # float ONNX works there, and integer weights
        model.quantize("int8")
        with pytest.raises(kshrink.KshrinkError, match="'weights' can.*KERAS_BACKEND="):
            export(model, tmp_path / "m.onnx", quantization="dynamic")
    assert not list(tmp_path.iterdir())


@on_tensorflow
def test_keras_integer_layers_in_a_layout_it_cannot_read_are_refused(tmp_path, monkeypatch):
    """A Keras release may quantize a layer in a layout kshrink does not know: refused in
    one line, nothing written (simulated: the reader finds no integer kernel)."""
    import kshrink.deploy as deploy

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    model.quantize("int8")
    monkeypatch.setattr(deploy, "integer_kernels", lambda layer: {})
    target = tmp_path / "m.tflite"
    with pytest.raises(kshrink.KshrinkError, match="Dense layers .* cannot be exported"):
        export(model, target, quantization="int8", data=np.ones((8, 4), "float32"))
    assert not target.exists()


@on_tensorflow
@pytest.mark.parametrize("suffix", [".tflite", ".onnx"])
def test_keras_int8_einsum_dense_goes_out_with_its_own_codes(tmp_path, suffix):
    """Keras' own int8 EinsumDense (keras-hub attention) keeps its integers in both formats
    (LiteRT's converter refused the layer itself)."""
    from kshrink.deploy import weights

    inputs = keras.Input((4, 8))
    model = keras.Model(inputs, keras.layers.EinsumDense("abc,cde->abde", (4, 2, 6))(inputs))
    model.quantize("int8")
    x = np.random.default_rng(0).random((16, 4, 8), dtype="float32")
    report = export(model, tmp_path / f"m{suffix}", data=x)
    assert list(report.weights.values()) == ["int8 per channel"]
    stored = (weights.litert_codes if suffix == ".tflite" else weights.onnx_codes)(report.path)
    (codes,) = [c for c in stored.values() if c.size == 8 * 2 * 6]
    expected = keras.ops.convert_to_numpy(model.layers[1]._kernel)
    assert sorted(codes.ravel()) == sorted(expected.ravel())
    # Keras quantizes the layer's input as it runs; the file keeps it float.
    assert report.max_abs_diff <= 0.05 * np.abs(model.predict(x, verbose=0)).max()


@on_tensorflow
def test_full_int8_keeps_int4_fully_connected_weights_a8w4(trained, digits, tmp_path):
    """LiteRT full int8 of an int4 model: its Dense layers get their own int4 codes and
    scales back (int8 activations, int4 weights), the convolutions int8; ONNX says int8."""
    import dataclasses

    from kshrink.deploy import weights

    int4, _ = kshrink.compress(trained, kshrink.Quantize(mode="int4", group_size=None,
                                                         keep_int8=False))
    report = export(int4, tmp_path / "int4.tflite", quantization="int8", data=digits.train)
    dense = [k.key for k in weights.model_kernels(int4)
             if isinstance(int4.get_layer(k.key), keras.layers.Dense)]
    assert dense and all(report.weights[key] == "int4 per channel, int8 activations"
                         for key in dense)
    stored = weights.litert_codes(report.path)
    as_codes = [dataclasses.replace(k, scale=np.ones_like(k.scale))
                for k in weights.model_kernels(int4) if k.key in dense]
    found = weights.place(as_codes, {n: c.astype("float32") for n, c in stored.items()})
    assert {k.key for k in found.values()} == set(dense)  # code for code
    reference = int4.predict(digits.train[0][:256], verbose=0).argmax(1)
    assert report.agreement >= 0.95 and len(reference) == report.samples
    if keras.backend.backend() == "tensorflow":
        onnx = export(int4, tmp_path / "int4.onnx", quantization="int8", data=digits.train)
        assert "int4 weights are written as int8" in str(onnx)


@pytest.mark.parametrize("suffix", [".tflite", ".onnx"])
@on_tensorflow  # torch's ONNX exporter cannot trace keras-hub's ReversibleEmbedding
def test_a_keras_hub_backbone_with_three_inputs_and_two_outputs_exports(tmp_path, suffix):
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(vocabulary_size=100, num_layers=1, num_heads=2,
                                             hidden_dim=16, intermediate_dim=32,
                                             max_sequence_length=16)
    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(0, 100, (8, 16)), "segment_ids": np.zeros((8, 16), int),
         "padding_mask": np.ones((8, 16), int)}
    report = export(backbone, tmp_path / f"bert{suffix}", data=x)
    expected = backbone.predict(x, verbose=0)
    assert report.max_abs_diff < 1e-4 and report.samples == 8
    pooled, sequence = Runtime(report.path).run(x)  # outputs by name
    np.testing.assert_allclose(pooled, expected["pooled_output"], atol=1e-4)
    np.testing.assert_allclose(sequence, expected["sequence_output"], atol=1e-4)
    with pytest.raises(KshrinkError, match="takes 3 inputs; pass a dict by name"):
        Runtime(report.path)(x["token_ids"])
    with pytest.raises(KshrinkError, match="takes models with one input"):
        export(backbone, tmp_path / f"int8{suffix}", data=x, quantization="int8")
    # Quantized (Keras' int8 EinsumDense, Dense, Embedding), it keeps its integers: the float
    # twin is rebuilt from the backbone's config, as it builds its layers itself.
    int8, _ = kshrink.compress(backbone, kshrink.Quantize(mode="int8"))
    report = export(int8, tmp_path / f"int8w{suffix}", data=x)
    kept = [what for what in report.weights.values() if what == "int8 per channel"]
    assert len(kept) >= 7  # four attention projections, two feed-forward, the pooler
    expected = int8.predict(x, verbose=0)["sequence_output"]
    got = Runtime(report.path).run(x)[1].reshape(expected.shape)
    cosine = np.sum(got * expected, -1) / (np.linalg.norm(got, axis=-1) *
                                           np.linalg.norm(expected, axis=-1))
    assert cosine.min() > 0.999


@pytest.mark.parametrize("suffix", [".tflite", ".onnx"])
def test_a_pruned_clustered_lenet_is_a_quarter_of_its_dense_file(tmp_path, suffix):
    """LeNet-300-100, 92% of its weights pruned and the rest shared among 16 values: LiteRT's
    sparse encoding and ONNX's sparse initializers keep only the nonzeros, and the file
    computes the same outputs."""
    needs_backend_for(suffix)
    dense = keras.Sequential([keras.Input((784,)), keras.layers.Dense(300, activation="relu"),
                              keras.layers.Dense(100, activation="relu"),
                              keras.layers.Dense(10)])
    x = np.random.default_rng(0).random((32, 784), dtype="float32")
    small, _ = kshrink.compress(dense, [kshrink.Prune(sparsity=0.92),
                                        kshrink.Cluster(clusters=16)])
    dense_bytes = export(dense, tmp_path / f"dense{suffix}", data=x).file_bytes
    report = export(small, tmp_path / f"sparse{suffix}", data=x)
    assert report.quantization == "none" and "stored sparse" in report.note
    assert report.file_bytes <= 0.25 * dense_bytes
    assert report.max_abs_diff <= 1e-5 * np.abs(small.predict(x, verbose=0)).max()


def test_a_normalization_layer_goes_to_onnx_as_weights_not_inputs(tmp_path):
    """Keras' Normalization computes its statistics into tensors at build, which tf2onnx made
    graph inputs: the file asked for three inputs."""
    needs_backend_for(".onnx")
    inputs = keras.Input((6, 6, 3))
    normalized = keras.layers.Normalization(mean=[1.0, 2.0, 3.0], variance=[4.0, 5.0, 6.0])
    model = keras.Model(inputs, keras.layers.Conv2D(2, 3)(normalized(inputs)))
    x = np.random.default_rng(0).random((8, 6, 6, 3), dtype="float32") * 4
    report = export(model, tmp_path / "m.onnx", data=x)
    assert report.max_abs_diff <= 1e-5 * np.abs(model.predict(x, verbose=0)).max()
    assert len(Runtime(report.path).run(x)) == 1


@on_tensorflow
def test_a_quantized_keras_hub_task_model_keeps_its_integers_in_litert(tmp_path):
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(vocabulary_size=100, num_layers=1, num_heads=2,
                                             hidden_dim=16, intermediate_dim=32,
                                             max_sequence_length=16)
    classifier = keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=3,
                                                     preprocessor=None)
    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(0, 100, (8, 16)), "segment_ids": np.zeros((8, 16), int),
         "padding_mask": np.ones((8, 16), int)}
    int8, _ = kshrink.compress(classifier, kshrink.Quantize(mode="int8"))
    report = export(int8, tmp_path / "classifier.tflite", data=x)
    assert sum(what == "int8 per channel" for what in report.weights.values()) == 8
    assert "GATHER" in report.weights["token_embedding"]  # LiteRT quantizes no lookups
    assert report.agreement == 1.0 and report.max_abs_diff < 1e-4
