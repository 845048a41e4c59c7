import dataclasses
import json

import pytest

import kshrink
from kshrink import Quantize, Recipe, Select, Technique
from kshrink.errors import RecipeError


def test_yaml_and_json_round_trip():
    recipe = Recipe([Quantize(mode="int4", group_size=None, exclude=Select(names=("fc2",)))])
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert Recipe.from_json(recipe.to_json()) == recipe
    # only options that differ from the defaults are written
    assert json.loads(recipe.to_json()) == [
        {"quantize": {"mode": "int4", "group_size": None, "exclude": {"names": ["fc2"]}}}]


def test_steps_mapping_and_bare_names():
    assert Recipe.from_yaml("steps:\n  - quantize\n") == Recipe([Quantize()])
    assert Recipe.from_yaml("- quantize: {mode: int4}") == Recipe([Quantize(mode="int4")])


def test_recipe_file(tmp_path):
    path = tmp_path / "r.yml"
    path.write_text("- quantize: {mode: int8, layers: {pattern: 'fc.*'}}\n")
    assert Recipe.from_file(path) == Recipe([Quantize(layers=Select(pattern="fc.*"))])
    bad = tmp_path / "r.txt"
    bad.write_text("[]")
    with pytest.raises(RecipeError, match="must end in .json, .yaml or .yml"):
        Recipe.from_file(bad)


@pytest.mark.parametrize("text, message", [
    ("- quantise: {}", "unknown technique 'quantise'. Registered: .*quantize"),
    ("- quantize: {bits: 8}", "quantize: unknown option 'bits'. Allowed: mode, method, group_size"),
    ("- quantize: {mode: int3}", r"quantize: mode must be one of int8, int4, float16, bfloat16. Received: mode='int3'"),
    ("- quantize: {group_size: 0}", "group_size must be an integer >= 1"),
    ("- quantize: {mode: int8}\n  extra: 1", "one-key mapping"),
    ("[]", "at least one step"),
    ("{steps: [], fine: 1}", "unknown recipe key 'fine'"),
    ("- quantize: [1]", "options must be a mapping"),
    ("- quantize: {mode: [", "not valid YAML"),
])
def test_bad_recipes_are_refused_with_the_reason(text, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_yaml(text)


def test_order_is_validated():
    @dataclasses.dataclass(frozen=True)
    class Early(Technique):
        name = "early"
        stage = 10

    Recipe([Early(), Quantize()])  # fine
    with pytest.raises(RecipeError, match="'early' cannot come after 'quantize'"):
        Recipe([Quantize(), Early()])


def test_registry_lists_quantize_with_its_options():
    names = [cls.name for cls in kshrink.registered_techniques()]
    assert "quantize" in names
    options = {name: default for name, _, default, _ in Quantize.options()}
    assert options == {"mode": "int8", "method": "rtn", "group_size": 128,
                       "activation_bits": None,
                       "calibration": "percentile", "percentile": 99.99,
                       "calibration_samples": 512, "iterations": 500, "qat": False,
                       "preserve_sparsity": True,
                       "fold_batchnorm": True, "keep_int8": True,
                       "overrides": (),
                       "layers": None, "exclude": None, "reestimate_batchnorm": None}


def test_every_example_recipe_parses():
    from pathlib import Path

    examples = sorted(Path(__file__).parents[2].joinpath("examples").glob("*.yaml"))
    assert examples
    for path in examples:
        assert len(Recipe.from_file(path)) >= 1, path


BILLION_LAUGHS = "\n".join(
    ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]" for i in range(8)]
    + ["steps: *i"])


@pytest.mark.parametrize("text, message", [
    (BILLION_LAUGHS, "more than 100,000 values"),
    ("[" * 100_000 + "]" * 100_000, "nested"),
    ("- prune: {sparsity: " + "9" * 5000 + "}", "cannot be read"),
    ("- prune: {layers: {pattern: 5}}", "pattern must be a string"),
    ("- prune: {layers: {names: 5}}", "names must be a list of strings"),
    ("- prune: {layers: {types: 5}}", "types must be a list of strings"),
])
def test_hostile_recipes_end_in_one_short_recipe_error(text, message):
    with pytest.raises(kshrink.KshrinkError, match=message) as caught:
        kshrink.Recipe.from_yaml(text)
    assert len(str(caught.value)) < 400 and "\n" not in str(caught.value)


def test_deep_json_and_non_utf8_files_are_refused(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(kshrink.KshrinkError, match="nested"):
        kshrink.Recipe.from_file(deep)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("- prune: {sparsity: 0.5}  # caf\xe9".encode("latin-1"))
    with pytest.raises(kshrink.KshrinkError, match="not UTF-8"):
        kshrink.Recipe.from_file(latin)
    huge = tmp_path / "huge.yaml"
    huge.write_bytes(b"#" * (2 << 20))
    with pytest.raises(kshrink.KshrinkError, match="at most"):
        kshrink.Recipe.from_file(huge)
