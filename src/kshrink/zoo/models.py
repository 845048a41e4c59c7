"""LeNet-300-100 and LeNet-5 for MNIST, a small residual CNN for Fashion-MNIST.

Each model starts with its own Rescaling layer and takes uint8 images of shape (28, 28) as the
datasets give them. `pretrained` trains a model once from a seed and caches the `.keras` file in
the user cache directory; later calls load it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

import keras
from keras import layers

from kshrink import datasets
from kshrink.core.graph import copy_model
from kshrink.errors import KshrinkError
from kshrink.io import save_model_atomic
from kshrink.layers.internals import build_for_fit

_ZOO_VERSION = 2


def lenet_300_100() -> keras.Model:
    """LeNet-300-100 (Deep Compression's MLP baseline): 266,610 parameters."""
    inputs = keras.Input((28, 28), name="image")
    x = layers.Rescaling(1 / 255, name="rescale")(inputs)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(300, activation="relu", name="fc1")(x)
    x = layers.Dense(100, activation="relu", name="fc2")(x)
    outputs = layers.Dense(10, activation="softmax", name="fc3")(x)
    return keras.Model(inputs, outputs, name="lenet_300_100")


def lenet5() -> keras.Model:
    """LeNet-5, Caffe variant (Deep Compression's CNN baseline): 431,080 parameters."""
    inputs = keras.Input((28, 28), name="image")
    x = layers.Rescaling(1 / 255, name="rescale")(inputs)
    x = layers.Reshape((28, 28, 1), name="to_channels")(x)
    x = layers.Conv2D(20, 5, name="conv1")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(50, 5, name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(500, activation="relu", name="fc1")(x)
    outputs = layers.Dense(10, activation="softmax", name="fc2")(x)
    return keras.Model(inputs, outputs, name="lenet5")


def resnet_fashion(widths=(16, 32, 64)) -> keras.Model:
    """A small residual CNN: Conv-BN-ReLU stem, one residual block per stage, global pooling."""
    inputs = keras.Input((28, 28), name="image")
    x = layers.Rescaling(1 / 255, name="rescale")(inputs)
    x = layers.Reshape((28, 28, 1), name="to_channels")(x)
    x = conv_bn_relu(x, widths[0], 3, 1, "stem")
    x = residual_stages(x, widths)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(10, activation="softmax", name="classifier")(x)
    return keras.Model(inputs, outputs, name="resnet_fashion")


def residual_stages(x, widths, blocks: int = 1):
    """ResNet basic blocks: `blocks` per stage, one stage per width, each stage after the
    first starting with stride 2; a 1x1 projection where the shortcut changes shape.

    Layers are named `s<stage>_...`, or `s<stage>b<block>_...` with several blocks per stage.
    """
    for stage, width in enumerate(widths, 1):
        for block in range(blocks):
            stride = 2 if stage > 1 and block == 0 else 1
            name = f"s{stage}" if blocks == 1 else f"s{stage}b{block}"
            shortcut = x
            y = conv_bn_relu(x, width, 3, stride, f"{name}_a")
            y = layers.Conv2D(width, 3, padding="same", use_bias=False,
                              name=f"{name}_b_conv")(y)
            y = layers.BatchNormalization(name=f"{name}_b_bn")(y)
            if stride != 1 or shortcut.shape[-1] != width:
                shortcut = layers.Conv2D(width, 1, strides=stride, use_bias=False,
                                         name=f"{name}_proj_conv")(shortcut)
                shortcut = layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
            x = layers.Add(name=f"{name}_add")([y, shortcut])
            x = layers.ReLU(name=f"{name}_out")(x)
    return x


def conv_bn_relu(x, width, kernel, stride, name):
    """Conv2D (no bias) -> BatchNormalization -> ReLU, named `<name>_conv/_bn/_relu`."""
    x = layers.Conv2D(width, kernel, strides=stride, padding="same", use_bias=False,
                      name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """How a reference model is built and trained."""

    builder: object
    dataset: str
    epochs: int
    batch_size: int = 128
    learning_rate: float = 1e-3


MODELS = {
    "lenet_300_100": ZooEntry(lenet_300_100, "mnist", epochs=20),
    "lenet5": ZooEntry(lenet5, "mnist", epochs=12),
    "resnet_fashion": ZooEntry(resnet_fashion, "fashion_mnist", epochs=8),
}


def build(name: str) -> keras.Model:
    """An untrained reference model."""
    return _entry(name).builder()


def cache_dir() -> Path:
    """`$KSHRINK_CACHE_DIR`, else `$XDG_CACHE_HOME/kshrink`, else `~/.cache/kshrink`."""
    if os.environ.get("KSHRINK_CACHE_DIR"):
        return Path(os.environ["KSHRINK_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kshrink"


def pretrained(name: str, *, seed: int = 0, epochs: int | None = None,
               verbose: bool = True) -> keras.Model:
    """A trained reference model: loaded from the cache, or trained from `seed` and cached.

    Args:
        name: one of `MODELS`.
        seed: random seed for initialization and shuffling.
        epochs: training epochs (default: the model's own); a different value is cached apart.
        verbose: show training progress.
    """
    entry = _entry(name)
    if epochs is not None:
        entry = dataclasses.replace(entry, epochs=epochs)
    key = json.dumps({"name": name, "seed": seed, "epochs": entry.epochs,
                      "batch_size": entry.batch_size, "lr": entry.learning_rate,
                      "version": _ZOO_VERSION}, sort_keys=True)
    path = cache_dir() / "zoo" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.keras"
    if path.is_file():
        return keras.saving.load_model(path)
    # Keep the inference model only: no optimizer state in the file, nothing compiled, so a
    # compressed copy is compared against the same kind of file.
    model = copy_model(_train(entry, seed, verbose))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model_atomic(model, path)
    return model


def _train(entry: ZooEntry, seed: int, verbose: bool) -> keras.Model:
    keras.utils.set_random_seed(seed)
    data = datasets.load(entry.dataset)
    model = entry.builder()
    steps = entry.epochs * -(-len(data.x_train) // entry.batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(entry.learning_rate, steps)
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    build_for_fit(model, (data.x_train, data.y_train))
    if verbose:
        print(f"training {model.name} on {entry.dataset} for {entry.epochs} epochs "
              f"(seed {seed}); cached for later runs", file=sys.stderr)
    model.fit(data.x_train, data.y_train, batch_size=entry.batch_size, epochs=entry.epochs,
              shuffle=True, verbose=(1 if sys.stderr.isatty() else 2) if verbose else 0)
    return model


def _entry(name: str) -> ZooEntry:
    if name not in MODELS:
        raise KshrinkError(f"unknown reference model {name!r}. Available: {', '.join(MODELS)}")
    return MODELS[name]
