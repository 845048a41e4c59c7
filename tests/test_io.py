"""`.keras` inputs are judged from their config before Keras allocates anything."""

import zipfile

import keras
import numpy as np
import pytest

from kshrink.errors import ModelFileError
from kshrink.io import load


def rewritten(source, target, replace: dict):
    """A copy of a .keras file whose config.json has the given text replacements."""
    with zipfile.ZipFile(source) as z, zipfile.ZipFile(target, "w") as out:
        for name in z.namelist():
            data = z.read(name)
            if name == "config.json":
                text = data.decode()
                for old, new in replace.items():
                    text = text.replace(old, new)
                data = text.encode()
            out.writestr(name, data)
    return target


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "small.keras"
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]).save(path)
    return path


def test_a_config_implying_more_kernel_values_than_the_weights_file_holds_is_refused(
        small, tmp_path):
    # 2^28 values (1 GiB of float32): under max_parameters, far over the few KB stored.
    bad = rewritten(small, tmp_path / "bad.keras",
                    {'"units": 3': '"units": 16384', "[null, 4]": "[null, 16384]"})
    with pytest.raises(ModelFileError, match="implies 268,435,456 kernel values, its weights "
                                             "file holds"):
        load(bad)


def test_max_parameters_refuses_big_models_and_can_be_raised(tmp_path):
    path = tmp_path / "m.keras"
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64)])
    model.save(path)
    with pytest.raises(ModelFileError, match="more than max_parameters=1,000"):
        load(path, max_parameters=1000)
    loaded = load(path, max_parameters=64 * 64)
    x = np.ones((1, 64), "float32")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_a_config_json_that_is_not_json_is_one_error(small, tmp_path):
    bad = rewritten(small, tmp_path / "bad.keras", {'"class_name"': '"class_name" ]'})
    with pytest.raises(ModelFileError, match="config.json is not readable JSON"):
        load(bad)
