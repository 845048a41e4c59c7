import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import safetensors.numpy

import kshrink
from kshrink.artifact import ArtifactError, load, save
from kshrink.artifact.encodings import compress

from conftest import small_cnn, small_mlp


@pytest.fixture(scope="module")
def compressed_cnn():
    """A pruned and clustered small CNN: every encoding has something to do."""
    small, _ = kshrink.compress(
        small_cnn(), [kshrink.Prune(sparsity=0.7, skip_first_last=False),
                      kshrink.Cluster(clusters=8)])
    return small


@pytest.fixture(scope="module")
def inputs():
    return np.random.default_rng(2).integers(0, 256, size=(16, 8, 8)).astype("float32")


def outputs(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def test_round_trip_is_bit_identical_and_deterministic(compressed_cnn, inputs, tmp_path):
    a, b = tmp_path / "a.kshrink", tmp_path / "b.kshrink"
    save(compressed_cnn, a)
    save(compressed_cnn, b)
    assert a.read_bytes() == b.read_bytes()
    loaded = load(a)
    np.testing.assert_array_equal(outputs(loaded, inputs), outputs(compressed_cnn, inputs))
    assert [l.name for l in loaded.layers] == [l.name for l in compressed_cnn.layers]
    compressed_cnn.save(tmp_path / "c.keras")
    assert a.stat().st_size < (tmp_path / "c.keras").stat().st_size / 4


def test_quantized_layers_stay_integer_in_memory(inputs, tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8)), keras.layers.Flatten(),
                              keras.layers.Dense(128, name="fc1"), keras.layers.Dense(10, name="fc2")])
    small, _ = kshrink.compress(model, [kshrink.Quantize(mode="int8")])
    save(small, tmp_path / "q.kshrink")
    loaded = load(tmp_path / "q.kshrink")
    assert loaded.get_layer("fc1").kernel.dtype == "int8"
    np.testing.assert_array_equal(outputs(loaded, inputs), outputs(small, inputs))


def test_nested_models_round_trip(inputs, tmp_path):
    inner = small_mlp()
    x = keras.Input((8, 8))
    model = keras.Model(x, keras.layers.Dense(3, name="head")(inner(x)))
    save(model, tmp_path / "n.kshrink")
    np.testing.assert_array_equal(outputs(load(tmp_path / "n.kshrink"), inputs),
                                  outputs(model, inputs))


def test_lambda_layers_need_safe_mode_off(tmp_path):
    x = keras.Input((4,))
    model = keras.Model(x, keras.layers.Lambda(lambda t: t * 2.0)(keras.layers.Dense(2)(x)))
    save(model, tmp_path / "l.kshrink")
    with pytest.raises(ArtifactError, match="Lambda layer.*safe_mode=False"):
        load(tmp_path / "l.kshrink")
    assert isinstance(load(tmp_path / "l.kshrink", safe_mode=False), keras.Model)


def test_unknown_classes_are_refused(tmp_path):
    class Twice(keras.layers.Layer):
        def call(self, t):
            return 2 * t

    x = keras.Input((4,))
    model = keras.Model(x, Twice(name="twice")(x))
    save(model, tmp_path / "u.kshrink")
    with pytest.raises(ArtifactError, match="unknown class 'Twice'"):
        load(tmp_path / "u.kshrink")


def test_loads_on_another_backend(compressed_cnn, inputs, tmp_path):
    """Saved on this backend, loaded on another: the file is backend-neutral."""
    path = tmp_path / "x.kshrink"
    save(compressed_cnn, path)
    np.save(tmp_path / "inputs.npy", inputs)
    np.save(tmp_path / "expected.npy", outputs(compressed_cnn, inputs))
    script = ("import sys, numpy as np, keras, kshrink; m = kshrink.load(sys.argv[1]); "
              "x = np.load(sys.argv[2]); e = np.load(sys.argv[3]); "
              "print(np.abs(keras.ops.convert_to_numpy(m(x)) - e).max())")
    other = "jax" if keras.backend.backend() != "jax" else "torch"
    done = subprocess.run([sys.executable, "-c", script, path, tmp_path / "inputs.npy",
                           tmp_path / "expected.npy"], capture_output=True, text=True,
                          env=dict(os.environ, KERAS_BACKEND=other))
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) < 1e-4


def test_bad_paths_and_other_files(tmp_path, compressed_cnn):
    with pytest.raises(ArtifactError, match="end in .kshrink"):
        save(compressed_cnn, tmp_path / "x.bin")
    with pytest.raises(ArtifactError, match="not found"):
        load(tmp_path / "missing.kshrink")
    junk = tmp_path / "junk.kshrink"
    junk.write_bytes(os.urandom(500))
    with pytest.raises(ArtifactError, match="not a kshrink file"):
        load(junk)
    plain = tmp_path / "plain.kshrink"
    plain.write_bytes(safetensors.numpy.save({"w": np.zeros(3, np.float32)}))
    with pytest.raises(ArtifactError, match="not a kshrink file"):
        load(plain)
    compressed_cnn.save(tmp_path / "model.keras")
    keras_bytes = tmp_path / "renamed.kshrink"
    keras_bytes.write_bytes((tmp_path / "model.keras").read_bytes())
    with pytest.raises(ArtifactError):
        load(keras_bytes)


def test_corruption_and_truncation_are_detected(compressed_cnn, tmp_path):
    path = tmp_path / "m.kshrink"
    save(compressed_cnn, path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        load(path)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ArtifactError):
        load(path)


def rewrite(path, edit):
    """Re-signs a file after `edit(header_dict, blobs)`: as a hostile writer would."""
    from kshrink.artifact.container import HEADER, _stamp
    from kshrink.artifact.encodings import decompress

    blobs = safetensors.numpy.load_file(str(path))
    header = json.loads(decompress(blobs[HEADER].tobytes(), 1 << 26))
    edit(header, blobs)
    blobs[HEADER] = np.frombuffer(compress(json.dumps(header).encode()), np.uint8)
    path.write_bytes(safetensors.numpy.save(blobs, metadata={"kshrink": _stamp(blobs)}))


@pytest.mark.parametrize("edit, message", [
    (lambda h, b: h["tensors"][0].update(shape=[1 << 40, 1 << 40]), "malformed tensor entry|more than"),
    (lambda h, b: h["tensors"][0].update(shape=[-1]), "malformed tensor entry"),
    (lambda h, b: h["tensors"][0].update(dtype="object"), "malformed tensor entry"),
    (lambda h, b: h["tensors"][0].update(blob="nope"), "malformed tensor entry"),
    (lambda h, b: h["tensors"][0].update(shape=[3, 3, 1, 9]), "expects"),
    (lambda h, b: h["tensors"].pop(), "do not match the model's variables"),
    (lambda h, b: h["config"]["config"]["layers"][-1]["config"].update(units=10**12),
     "larger than any"),
    (lambda h, b: h["tensors"][0]["encoding"].update(kind="mystery"), "unknown encoding"),
    (lambda h, b: h.update(format="other"), "not a kshrink file"),
])
def test_hostile_headers_are_refused_before_allocating(edit, message, compressed_cnn, tmp_path):
    path = tmp_path / "h.kshrink"
    save(compressed_cnn, path)
    rewrite(path, edit)
    with pytest.raises(ArtifactError, match=message):
        load(path)


def test_outputs_keep_the_mode_of_the_file_they_replace_or_the_umask(tmp_path):
    import os
    import stat

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    shared = tmp_path / "shared.kshrink"
    shared.write_bytes(b"old")
    os.chmod(shared, 0o644)
    kshrink.save(model, shared)
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o644
    umask = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.kshrink"
        kshrink.save(model, fresh)
        kshrink.save(model, tmp_path / "fresh.keras")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "fresh.keras").st_mode) == 0o644



def test_a_config_whose_sizes_multiply_past_the_file_is_refused_before_allocating(tmp_path):
    """Two Dense layers of 2^24 units each: every number is in bounds, their product (a 2^48
    kernel) is not. The kernels the config implies are counted before Keras builds."""
    import json

    from kshrink.artifact.container import FORMAT, HEADER, _stamp
    from kshrink.artifact.encodings import compress, decompress

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="a"),
                              keras.layers.Dense(2, name="b")])
    path = tmp_path / "m.kshrink"
    save(model, path)
    blobs = safetensors.numpy.load(path.read_bytes())
    header = json.loads(decompress(blobs[HEADER].tobytes(), 1 << 26).decode())
    big = 1 << 24
    text = json.dumps(header).replace('"units": 3', f'"units": {big}').replace(
        '"units": 2', f'"units": {big}').replace('"input_shape": [null, 3]',
                                                  f'"input_shape": [null, {big}]')
    blobs[HEADER] = np.frombuffer(compress(text.encode()), np.uint8)
    path.write_bytes(safetensors.numpy.save(blobs, metadata={FORMAT: _stamp(blobs)}))
    with pytest.raises(ArtifactError, match="implies 281,475,043,819,520 kernel values"):
        load(path)
