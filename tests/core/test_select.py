import pytest

from kshrink import Select
from kshrink.core.graph import leaf_layers
from kshrink.errors import SelectionError


def names(layers):
    return [layer.name for layer in layers]


def test_select_by_pattern_names_and_types(cnn):
    layers = list(leaf_layers(cnn))
    assert names(Select(pattern="fc.").resolve(layers)) == ["fc1", "fc2"]
    assert names(Select(names=("conv2",)).resolve(layers)) == ["conv2"]
    assert names(Select(types=("Conv2D",)).resolve(layers)) == ["conv1", "conv2"]
    # criteria combine as a union, in model order
    assert names(Select(types=("Dense",), names=("conv1",)).resolve(layers)) == [
        "conv1", "fc1", "fc2"]


def test_pattern_must_match_whole_name(cnn):
    with pytest.raises(SelectionError, match="matches no layer"):
        Select(pattern="fc").resolve(leaf_layers(cnn))


def test_unknown_name_is_an_error_naming_it(cnn):
    with pytest.raises(SelectionError, match="do not exist: fc9"):
        Select(names=("fc1", "fc9")).resolve(leaf_layers(cnn))


def test_empty_or_invalid_selection_is_refused():
    with pytest.raises(SelectionError, match="at least one"):
        Select()
    with pytest.raises(SelectionError, match="not a valid regular expression"):
        Select(pattern="fc[")


@pytest.mark.parametrize("data, expected", [
    ("fc.*", Select(pattern="fc.*")),
    (["fc1", "fc2"], Select(names=("fc1", "fc2"))),
    ({"types": ["Dense"]}, Select(types=("Dense",))),
])
def test_from_config_forms(data, expected):
    assert Select.from_config(data) == expected
    assert Select.from_config(expected.get_config()) == expected


def test_from_config_rejects_unknown_keys():
    with pytest.raises(SelectionError, match="unknown selection key 'name'"):
        Select.from_config({"name": "fc1"})
