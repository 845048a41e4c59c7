"""TensorFlow, JAX and torch give the same result for the same model, recipe and data: the
same report for post-training int8, the same distance from the original after block
reconstruction (learned rounding; sparsegpt with refit, and its masks), and the same masks
from gradual pruning (computed on the host from magnitudes, and taking effect under jit).

One process per backend runs every case: starting a backend costs seconds."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import small_cnn

# It starts every backend itself, so one run (from the TensorFlow suite) is enough.
pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                reason="spawns all three backends itself")

SCRIPT = """
import json, sys
import keras, numpy as np, kshrink
model = keras.saving.load_model(sys.argv[1])

def plain(recipe):
    small, report = kshrink.compress(model, kshrink.Recipe.from_yaml(recipe))
    x = np.random.default_rng(0).integers(0, 256, size=(16, 8, 8)).astype("float32")
    out = keras.ops.convert_to_numpy(small(x, training=False))
    return {"report": report.to_dict(), "outputs": out.tolist()}

def calibrated(recipe):
    x = np.random.default_rng(0).integers(0, 256, size=(64, 8, 8)).astype("float32")
    small, _ = kshrink.compress(model, kshrink.Recipe.from_yaml(recipe), data=x)
    zeros = {l.name: (keras.ops.convert_to_numpy(w) == 0).tolist() for l in small.layers
             for w in l.weights if w.name == "kernel"}
    return {"outputs": keras.ops.convert_to_numpy(small(x)).tolist(),
            "original": keras.ops.convert_to_numpy(model(x)).tolist(), "zeros": zeros}

def gradual(_):
    rng = np.random.default_rng(0)
    mlp = keras.Sequential([keras.Input((16,)),
                            keras.layers.Dense(32, activation="relu", name="a"),
                            keras.layers.Dense(32, activation="relu", name="b"),
                            keras.layers.Dense(4, name="c")])
    mlp.set_weights([rng.normal(scale=0.3, size=w.shape).astype("float32")
                     for w in mlp.get_weights()])
    x = rng.normal(size=(256, 16)).astype("float32")
    y = (x[:, :4].argmax(1)).astype("int64")
    small, _ = kshrink.compress(
        mlp, kshrink.Prune(sparsity=0.75, skip_first_last=False, frequency=4, end_step=24),
        data=(x, y),
        fine_tune=kshrink.FineTune(epochs=1, batch_size=8, optimizer="sgd",
                                   learning_rate=0.05, lr_schedule="constant",
                                   shuffle=False, verbose=False))
    return {l.name: (np.asarray(keras.ops.convert_to_numpy(l.kernel)) != 0).astype(int).tolist()
            for l in small.layers}

results = [globals()[kind](recipe) for kind, recipe in json.loads(sys.argv[2])]
print("RESULT " + json.dumps(results))
"""

INT8 = "- quantize: {mode: int8}\n"
ADAROUND = ("- quantize: {mode: int4, group_size: null, keep_int8: false, method: adaround, "
            "iterations: 30}\n")
SPARSEGPT = ("- prune: {sparsity: 0.5, schedule: one_shot, method: sparsegpt, refit: true, "
             "iterations: 60}\n")
CASES = [("plain", INT8), ("calibrated", ADAROUND), ("calibrated", SPARSEGPT),
         ("gradual", None)]


def _on_every_backend(folder) -> dict:
    """`{backend: [the result of each of CASES]}`, on the small CNN, each backend in a fresh
    process."""
    small_cnn().save(folder / "m.keras")
    results = {}
    for backend in ("tensorflow", "jax", "torch"):
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, folder / "m.keras", json.dumps(CASES)],
            capture_output=True, text=True, env=dict(os.environ, KERAS_BACKEND=backend),
            timeout=900)
        assert done.returncode == 0, f"{backend}: {done.stderr[-2000:]}"
        line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))
        results[backend] = json.loads(line[len("RESULT "):])
    return results


def test_the_same_models_on_every_backend(tmp_path):
    results = _on_every_backend(tmp_path)
    # Post-training int8: the same report, the same outputs up to float rounding.
    reference = results["tensorflow"][0]
    assert reference["report"]["steps"][0]["layers"]
    for backend in ("jax", "torch"):
        assert results[backend][0]["report"] == reference["report"], backend
        np.testing.assert_allclose(results[backend][0]["outputs"], reference["outputs"],
                                   rtol=1e-4, atol=1e-4)

    # Block reconstruction: the same steps on the same batches, up to float rounding. In
    # learned rounding that tips rounding variables that end near their threshold to the
    # other side, and each decision changes the next steps: the models are as far from the
    # original, not the same bit for bit. Refit after sparsegpt keeps the same masks.
    def error(result):
        original = np.asarray(result["original"])
        return np.sum((np.asarray(result["outputs"]) - original) ** 2) / np.sum(original ** 2)

    for case in (1, 2):
        reference = results["tensorflow"][case]
        scale = np.abs(reference["outputs"]).max()
        for backend in ("jax", "torch"):
            result = results[backend][case]
            assert abs(error(result) - error(reference)) < 0.25 * error(reference), \
                (backend, CASES[case])
            if CASES[case][1] == SPARSEGPT:
                assert result["zeros"] == reference["zeros"], backend
                np.testing.assert_allclose(result["outputs"], reference["outputs"],
                                           atol=0.02 * scale)

    # Gradual magnitude pruning: the same masks.
    for backend in ("jax", "torch"):
        assert results[backend][3] == results["tensorflow"][3], backend
