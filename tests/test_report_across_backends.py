"""The same model and recipe give the same report on TensorFlow, JAX and torch."""

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
small, report = kshrink.compress(model, kshrink.Recipe.from_file(sys.argv[2]))
x = np.random.default_rng(0).integers(0, 256, size=(16, 8, 8)).astype("float32")
out = keras.ops.convert_to_numpy(small(x, training=False))
print("RESULT " + json.dumps({"report": report.to_dict(), "outputs": out.tolist()}))
"""


def _on_every_backend(script: str, recipe: str, tmp_path) -> dict:
    """`{backend: what script printed after RESULT}`, run on the small CNN with `recipe`, each
    backend in a fresh process."""
    model_path, recipe_path = tmp_path / "m.keras", tmp_path / "r.yaml"
    small_cnn().save(model_path)
    recipe_path.write_text(recipe)
    results = {}
    for backend in ("tensorflow", "jax", "torch"):
        done = subprocess.run(
            [sys.executable, "-c", script, model_path, recipe_path], capture_output=True,
            text=True, env=dict(os.environ, KERAS_BACKEND=backend), timeout=600)
        assert done.returncode == 0, f"{backend}: {done.stderr[-2000:]}"
        line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))
        results[backend] = json.loads(line[len("RESULT "):])
    return results


def test_same_report_on_every_backend(tmp_path):
    results = _on_every_backend(SCRIPT, "- quantize: {mode: int8}\n", tmp_path)
    reference = results["tensorflow"]
    assert reference["report"]["steps"][0]["layers"]
    for backend in ("jax", "torch"):
        assert results[backend]["report"] == reference["report"], backend
        np.testing.assert_allclose(results[backend]["outputs"], reference["outputs"],
                                   rtol=1e-4, atol=1e-4)


CALIBRATED = """
import json, sys
import keras, numpy as np, kshrink
model = keras.saving.load_model(sys.argv[1])
x = np.random.default_rng(0).integers(0, 256, size=(64, 8, 8)).astype("float32")
small, report = kshrink.compress(model, kshrink.Recipe.from_file(sys.argv[2]), data=x)
zeros = {l.name: (keras.ops.convert_to_numpy(w) == 0).tolist() for l in small.layers
         for w in l.weights if w.name == "kernel"}
print("RESULT " + json.dumps({"outputs": keras.ops.convert_to_numpy(small(x)).tolist(),
                              "original": keras.ops.convert_to_numpy(model(x)).tolist(),
                              "zeros": zeros}))
"""


@pytest.mark.parametrize("recipe", [
    "- quantize: {mode: int4, group_size: null, keep_int8: false, method: adaround, "
    "iterations: 30}\n",
    "- prune: {sparsity: 0.5, schedule: one_shot, method: sparsegpt, refit: true, "
    "iterations: 60}\n"])
def test_block_reconstruction_gives_the_same_model_on_every_backend(tmp_path, recipe):
    results = _on_every_backend(CALIBRATED, recipe, tmp_path)

    def error(result):
        original = np.asarray(result["original"])
        return np.sum((np.asarray(result["outputs"]) - original) ** 2) / np.sum(original ** 2)

    reference = results["tensorflow"]
    scale = np.abs(reference["outputs"]).max()
    for backend in ("jax", "torch"):
        # The same steps on the same batches, up to float rounding. In learned rounding that
        # tips rounding variables that end near their threshold to the other side, and each
        # decision changes the next steps: the models are as far from the original, not the
        # same bit for bit.
        assert abs(error(results[backend]) - error(reference)) < 0.25 * error(reference)
        if "refit" in recipe:
            assert results[backend]["zeros"] == reference["zeros"]  # the same masks
            np.testing.assert_allclose(results[backend]["outputs"], reference["outputs"],
                                       atol=0.02 * scale)
