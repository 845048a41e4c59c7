"""Gradual pruning of the same tiny model for the same steps gives the same masks on every
backend (masks are computed on the host from magnitudes, and must take effect under jit)."""

import json
import os
import subprocess
import sys

import keras
import pytest

# It starts every backend itself, so one run (from the TensorFlow suite) is enough.
pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                reason="spawns all three backends itself")

SCRIPT = """
import json
import keras, numpy as np, kshrink
rng = np.random.default_rng(0)
model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu", name="a"),
                          keras.layers.Dense(32, activation="relu", name="b"),
                          keras.layers.Dense(4, name="c")])
model.set_weights([rng.normal(scale=0.3, size=w.shape).astype("float32")
                   for w in model.get_weights()])
x = rng.normal(size=(256, 16)).astype("float32")
y = (x[:, :4].argmax(1)).astype("int64")
small, _ = kshrink.compress(
    model, kshrink.Prune(sparsity=0.75, skip_first_last=False, frequency=4, end_step=24),
    data=(x, y),
    fine_tune=kshrink.FineTune(epochs=1, batch_size=8, optimizer="sgd", learning_rate=0.05,
                               lr_schedule="constant", shuffle=False,
                               verbose=False))
masks = {l.name: (np.asarray(keras.ops.convert_to_numpy(l.kernel)) != 0).astype(int).tolist()
         for l in small.layers}
print("MASKS " + json.dumps(masks))
"""


def test_same_masks_on_every_backend():
    masks = {}
    for backend in ("tensorflow", "jax", "torch"):
        env = dict(os.environ, KERAS_BACKEND=backend)
        done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                              env=env, timeout=600)
        assert done.returncode == 0, f"{backend}: {done.stderr[-2000:]}"
        line = next(l for l in done.stdout.splitlines() if l.startswith("MASKS "))
        masks[backend] = json.loads(line[len("MASKS "):])
    assert masks["jax"] == masks["tensorflow"]
    assert masks["torch"] == masks["tensorflow"]
