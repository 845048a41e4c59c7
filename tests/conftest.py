import os

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
    by every test of a worker: tests read it and compress copies of it, never change it."""
    model = small_cnn()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(*digits.train, epochs=8, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="session")
def images():
    return np.random.default_rng(0).integers(0, 256, size=(64, 8, 8)).astype("float32")


def weights_of(model):
    return [np.array(w) for w in model.get_weights()]
