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


def test_same_report_on_every_backend(tmp_path):
    model_path, recipe_path = tmp_path / "m.keras", tmp_path / "r.yaml"
    small_cnn().save(model_path)
    recipe_path.write_text("- quantize: {mode: int8}\n")
    results = {}
    for backend in ("tensorflow", "jax", "torch"):
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, model_path, recipe_path], capture_output=True,
            text=True, env=dict(os.environ, KERAS_BACKEND=backend), timeout=600)
        assert done.returncode == 0, f"{backend}: {done.stderr[-2000:]}"
        line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))
        results[backend] = json.loads(line[len("RESULT "):])
    reference = results["tensorflow"]
    assert reference["report"]["steps"][0]["layers"]
    for backend in ("jax", "torch"):
        assert results[backend]["report"] == reference["report"], backend
        np.testing.assert_allclose(results[backend]["outputs"], reference["outputs"],
                                   rtol=1e-4, atol=1e-4)
