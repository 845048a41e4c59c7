"""Data-parallel fine-tuning on two host devices (JAX) and two logical CPUs (TensorFlow): the
same recipe on one device and on two reaches the same masks and accuracy."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import kshrink
from kshrink.core.distribute import DataParallel
from kshrink.errors import KshrinkError, RecipeError

# It starts both backends itself, with two devices each, so one run is enough.
pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                reason="spawns JAX and TensorFlow with two devices itself")

SCRIPT = """
import json, os, sys
if os.environ["KERAS_BACKEND"] == "tensorflow":
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np, kshrink
from kshrink import datasets

digits = datasets.load("digits")
(x, y), (x_test, y_test) = digits.train, digits.test
x, y = x[:-1], y[:-1]  # an odd count: JAX needs batches that split over both devices
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((8, 8)), keras.layers.Flatten(),
                          keras.layers.Dense(128, activation="relu", name="fc1"),
                          keras.layers.Dense(64, activation="relu", name="fc2"),
                          keras.layers.Dense(10, name="out")])
model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(x, y, epochs=10, batch_size=32, verbose=0)
recipe = [kshrink.Prune(sparsity=0.9, scope="global"),
          kshrink.Quantize(mode="int8", activation_bits=8, qat=True)]
result = {}
for distribution in (None, "data_parallel"):
    keras.utils.set_random_seed(1)
    tune = kshrink.FineTune(epochs=3, batch_size=32, distill=True, verbose=False,
                            distribution=distribution, shuffle=False)
    said = []
    small, report = kshrink.compress(model, recipe, data=(x, y), validation_data=(x_test, y_test),
                                     fine_tune=tune, fidelity_samples=0, progress=said.append)
    masks = {}
    for name in ("fc1", "fc2", "out"):
        layer = small.get_layer(name)
        masks[name] = (np.asarray(keras.ops.convert_to_numpy(layer.kernel)) != 0).tolist()
    logits = np.asarray(keras.ops.convert_to_numpy(small.predict(x_test, verbose=0)))
    accuracy = float(np.mean(np.argmax(logits, -1) == y_test))
    result[str(distribution)] = {"masks": masks, "accuracy": accuracy,
                                 "logits": logits[:64].tolist(),
                                 "zeros": report.steps[0].summary, "said": said}
try:
    kshrink.compress(model, recipe, data=(x, y),
                     fine_tune=kshrink.FineTune(batch_size=33, distribution="data_parallel"))
except kshrink.KshrinkError as error:
    result["odd_batch"] = str(error)
print("RESULT " + json.dumps(result))
"""


@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_two_devices_reach_the_masks_and_accuracy_of_one(backend):
    env = dict(os.environ, KERAS_BACKEND=backend,
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    one, two = result["None"], result["data_parallel"]
    engine = "DataParallel" if backend == "jax" else "MirroredStrategy"
    assert f"prune: fine-tuning, data parallel over 2 device(s) ({engine})" in two["said"]

    for name, mask in one["masks"].items():
        same = np.mean(np.array(mask) == np.array(two["masks"][name]))
        assert same >= 0.98, f"{name}: {same:.3f} of the mask agrees"
    zeros = 1 - np.mean(np.concatenate([np.ravel(m) for m in two["masks"].values()]))
    assert zeros >= 0.895, two["zeros"]
    assert abs(one["accuracy"] - two["accuracy"]) <= 0.03, (one["accuracy"], two["accuracy"])
    assert two["accuracy"] > 0.7  # 90% of a small MLP in 3 epochs: it learns, and alike
    a, b = np.ravel(one["logits"]), np.ravel(two["logits"])
    cosine = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert cosine > 0.97, cosine  # the quantizer ranges and weights alike
    assert "multiple of 2" in result["odd_batch"]


def test_data_parallel_is_refused_clearly_where_it_does_not_run(monkeypatch):
    with pytest.raises(RecipeError, match="distribution must be one of data_parallel or null"):
        kshrink.FineTune(distribution="model_parallel")
    monkeypatch.setattr(keras.backend, "backend", lambda: "torch")
    with pytest.raises(KshrinkError, match="runs on the JAX backend .* the torch backend"):
        DataParallel()
