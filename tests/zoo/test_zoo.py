import numpy as np
import pytest

from kshrink import datasets, zoo
from kshrink.errors import KshrinkError
from kshrink.measure import evaluate


@pytest.mark.parametrize("name, params", [
    ("lenet_300_100", 266_610), ("lenet5", 431_080),
])
def test_reference_architectures(name, params):
    assert zoo.build(name).count_params() == params


def test_resnet_has_residual_adds_batchnorm_and_global_pooling():
    kinds = {type(layer).__name__ for layer in zoo.build("resnet_fashion").layers}
    assert {"Add", "BatchNormalization", "GlobalAveragePooling2D", "Conv2D"} <= kinds


def test_pretrained_trains_once_then_loads_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KSHRINK_CACHE_DIR", str(tmp_path))
    model = zoo.pretrained("lenet_300_100", epochs=1, verbose=False)
    assert not model.compiled  # an inference model: no optimizer state in the cached file
    cached = list((tmp_path / "zoo").glob("lenet_300_100-*.keras"))
    assert len(cached) == 1
    again = zoo.pretrained("lenet_300_100", epochs=1, verbose=False)
    for a, b in zip(model.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert evaluate(again, *datasets.load("mnist").test)["accuracy"] > 0.95


def test_unknown_model():
    with pytest.raises(KshrinkError, match="unknown reference model"):
        zoo.build("vgg")
