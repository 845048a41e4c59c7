import fcntl
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from kshrink.testing import contract_model  # noqa: E402


def small_cnn(seed: int = 0) -> keras.Model:
    """A tiny functional model with the layer kinds techniques meet: conv, BN, residual, dense."""
    return contract_model(seed)


def small_mlp(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((8, 8)),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(64, activation="relu", name="fc1"),
        keras.layers.Dense(10, name="fc2"),
    ], name="small_mlp")


class Batches(keras.utils.PyDataset):
    """`(x, y)` in batches of `size`: a stream that is not a tf.data pipeline."""

    def __init__(self, x, y, size):
        super().__init__()
        self.x, self.y, self.size = x, y, size

    def __len__(self):
        return int(np.ceil(len(self.x) / self.size))

    def __getitem__(self, i):
        part = slice(i * self.size, (i + 1) * self.size)
        return self.x[part], self.y[part]


@pytest.fixture
def cnn():
    return small_cnn()


@pytest.fixture
def mlp():
    return small_mlp()


@pytest.fixture(scope="session")
def digits():
    from kshrink import datasets

    return datasets.load("digits")


@pytest.fixture(scope="session")
def trained(digits):
    """small_cnn trained briefly on the digits: weights worth pruning or clustering. Shared
    by every test of a worker: tests read it and compress copies of it, never change it.

    Where KSHRINK_TEST_CACHE names a folder (scripts/test.sh makes one per run), the first
    worker to get here trains and saves the weights there and every other worker, on every
    backend, loads them: one training per run instead of one per worker and backend."""
    cache = os.environ.get("KSHRINK_TEST_CACHE")
    if not cache:
        return _train(small_cnn(), digits)
    saved = Path(cache) / "trained.weights.h5"
    with open(Path(cache) / "trained.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not saved.exists():
            partial = saved.with_name("partial." + saved.name)
            _train(small_cnn(), digits).save_weights(partial)
            partial.replace(saved)
    model = small_cnn()
    model.load_weights(saved)  # before compiling: the file's optimizer state is not wanted
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _train(model, digits):
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(*digits.train, epochs=8, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="session")
def images():
    return np.random.default_rng(0).integers(0, 256, size=(64, 8, 8)).astype("float32")


def weights_of(model):
    return [np.array(w) for w in model.get_weights()]
