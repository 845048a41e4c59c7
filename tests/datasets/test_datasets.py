import numpy as np
import pytest

from kshrink import datasets, zoo
from kshrink.errors import KshrinkError


@pytest.mark.parametrize("name, train, test, side", [
    ("mnist", 60000, 10000, 28), ("fashion_mnist", 60000, 10000, 28), ("digits", 1400, 397, 8),
])
def test_named_datasets(name, train, test, side):
    data = datasets.load(name)
    assert data.x_train.shape == (train, side, side) and data.x_test.shape == (test, side, side)
    assert data.x_train.dtype == np.uint8
    assert data.y_train.shape == (train,) and set(np.unique(data.y_test)) == set(range(10))
    assert data.x_train.max() > 200  # pixel values, not [0, 1]


def test_mnist_pixels_are_exact_integers():
    x = datasets.load("mnist").x_train[:100]
    # the packaged floats are pixel/256; converted back they cover the full byte range
    assert x.max() == 255 and len(np.unique(x)) > 200


def test_unknown_dataset():
    with pytest.raises(KshrinkError, match="unknown dataset 'cifar'. Available: mnist"):
        datasets.load("cifar")


def test_npz(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((4, 8, 8)), y=np.arange(4))
    data = datasets.from_npz(path)
    assert data.x_test.shape == (4, 8, 8)  # no x_val: evaluation uses x
    np.savez(path, x=np.zeros((4, 8, 8)), y=np.arange(3))
    with pytest.raises(KshrinkError, match="differ in length"):
        datasets.from_npz(path)
    np.savez(path, y=np.arange(3))
    with pytest.raises(KshrinkError, match="has no input arrays"):
        datasets.from_npz(path)
    # A model with several inputs: one array per input, by name; no labels is fine.
    np.savez(path, tokens=np.ones((4, 6)), mask=np.ones((4, 6)), tokens_val=np.zeros((2, 6)),
             mask_val=np.zeros((2, 6)))
    data = datasets.from_npz(path)
    assert set(data.x_train) == {"tokens", "mask"} and data.y_train is None
    assert data.x_test["tokens"].shape == (2, 6) and data.x_test["mask"].shape == (2, 6)
    assert isinstance(data.train, dict)  # unlabelled: inputs only
    np.savez(path, tokens=np.ones((4, 6)), mask=np.ones((4, 6)), tokens_val=np.zeros((2, 6)))
    with pytest.raises(KshrinkError, match="add mask_val"):
        datasets.from_npz(path)
    path.write_bytes(b"garbage")
    with pytest.raises(KshrinkError, match="not a readable .npz"):
        datasets.from_npz(path)


def test_check_fits():
    model = zoo.build("lenet_300_100")
    datasets.check_fits(datasets.load("mnist"), model)
    with pytest.raises(KshrinkError, match=r"rows have shape \(8, 8\), the model expects \(28, 28\)"):
        datasets.check_fits(datasets.load("digits"), model)
