"""Options declare their own checks: a bad value is refused when the config is made, in one
line naming the technique and the option; plain forms (a selection as a list of names or a
mapping, overrides as mappings) are kept in their typed form and round-trip."""

import dataclasses

import pytest

import kshrink
from kshrink.core.options import Int, OneOf, Options, option, selection
from kshrink.errors import RecipeError


@pytest.mark.parametrize("make, message", [
    (lambda: kshrink.Prune(sparsity=1.5), "prune: sparsity must be a number in [0.0, 1.0)"),
    (lambda: kshrink.Prune(method="random"), "prune: method must be one of magnitude"),
    (lambda: kshrink.Prune(refit="yes"), "prune: refit must be true or false"),
    (lambda: kshrink.Quantize(calibration_samples=0),
     "quantize: calibration_samples must be an integer in [1, "),
    (lambda: kshrink.Cluster(clusters=1), "cluster: clusters must be an integer in [2, 4096]"),
    (lambda: kshrink.Fold(noops=1), "fold: noops must be true or false"),
    (lambda: kshrink.StructuredPrune(layers=5), "structured_prune: layers must be a selection"),
    (lambda: kshrink.LowRank(exclude={"nmes": ["fc1"]}), "low_rank: exclude must be a selection"),
    (lambda: kshrink.DepthPrune(reestimate_batchnorm="yes"),
     "depth_prune: reestimate_batchnorm must be true or false or null"),
    (lambda: kshrink.Cluster(overrides={"clusters": 8}), "cluster: overrides must be a list"),
    (lambda: kshrink.Quantize(overrides=[{"mode": "int4"}]),
     "quantize override: layers must be a selection"),
    (lambda: kshrink.FineTune(distill=1), "fine_tune: distill must be one of false, true"),
    (lambda: kshrink.FineTune(loss="no_such_loss"), "fine_tune: loss must be auto or a Keras"),
])
def test_a_bad_option_is_refused_where_the_config_is_made(make, message):
    with pytest.raises(RecipeError, match=None) as raised:
        make()
    assert str(raised.value).startswith(message), str(raised.value)
    assert "\n" not in str(raised.value)


def test_plain_forms_are_kept_typed_and_round_trip():
    step = kshrink.Prune(0.8, layers=["fc1", "fc2"], exclude="fc2",
                         overrides=[{"layers": {"names": ["fc1"]}, "sparsity": 0.9}])
    assert step.layers == kshrink.Select(names=("fc1", "fc2"))
    assert step.exclude == kshrink.Select(pattern="fc2")
    assert isinstance(step.overrides, tuple)
    assert step.overrides[0].layers == kshrink.Select(names=("fc1",))
    assert type(step).from_config(step.get_config()) == step
    # the recipe file's form and the Python form make the same config
    assert kshrink.Prune.from_config({"sparsity": 0.8, "layers": {"names": ["fc1", "fc2"]},
                                      "exclude": "fc2", "overrides": step.get_config()[
                                          "overrides"]}) == step


def test_a_check_of_ones_own_is_a_function_and_the_class_checks_the_rest():
    def even(owner, key, value):
        if value % 2:
            raise RecipeError(f"{owner}: {key} must be even. Received: {key}={value}")
        return value

    @dataclasses.dataclass(frozen=True)
    class Tiles(Options):
        name = "tiles"
        size: int = option(4, "tile edge", even)
        low: int = option(0, "least value", Int(low=0))
        high: int = option(8, "largest value", Int(low=0))
        kind: str = option("square", "square or hex", OneOf(("square", "hex")))
        layers: kshrink.Select | None = selection("layers tiled")

        def __post_init__(self):
            super().__post_init__()
            if self.high < self.low:
                raise RecipeError(f"{self.name}: high must not be below low")

    assert Tiles(size=6, layers=["a"]).layers == kshrink.Select(names=("a",))
    with pytest.raises(RecipeError, match="tiles: size must be even. Received: size=3"):
        Tiles(size=3)
    with pytest.raises(RecipeError, match="tiles: kind must be one of square, hex"):
        Tiles.from_config({"kind": "round"})
    with pytest.raises(RecipeError, match="tiles: high must not be below low"):
        Tiles(low=5, high=2)
    assert [row[0] for row in Tiles.options()] == ["size", "low", "high", "kind", "layers"]
