"""Recipes: an ordered list of techniques, stored as JSON or YAML data (never code)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import yaml

from kshrink.core.technique import Technique, technique_class
from kshrink.errors import RecipeError, short


class Recipe:
    """An ordered list of technique configs, applied one after the other by `compress`.

    The order is validated: a step may not come after a step of a later stage (e.g. `prune`
    after `quantize`), since a later stage would undo or block the earlier one.

    Example:

    ```python
    recipe = Recipe([kshrink.Quantize(mode="int8")])
    recipe = Recipe.from_yaml("- quantize: {mode: int8}")
    ```
    """

    def __init__(self, steps: Iterable[Technique], fine_tune=None):
        steps = tuple(steps)
        if not steps:
            raise RecipeError("a recipe needs at least one step. Received: an empty list")
        for i, step in enumerate(steps, 1):
            if not isinstance(step, Technique):
                raise RecipeError(
                    f"recipe step {i} is not a technique config. Received: {step!r}"
                )
        for earlier, later in zip(steps, steps[1:]):
            if later.stage < earlier.stage:
                raise RecipeError(
                    f"recipe order: {later.name!r} cannot come after {earlier.name!r}; "
                    f"order steps as {_stage_order()}"
                )
        self.steps = steps
        self.fine_tune = fine_tune

    def __iter__(self) -> Iterator[Technique]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __eq__(self, other) -> bool:
        return (isinstance(other, Recipe) and self.steps == other.steps
                and self.fine_tune == other.fine_tune)

    def __repr__(self) -> str:
        return f"Recipe({list(self.steps)!r}, fine_tune={self.fine_tune!r})"

    def to_data(self) -> list | dict:
        """The data form; each step lists only the options that differ from their defaults."""
        steps = [{step.name: _changed_options(step)} for step in self.steps]
        if self.fine_tune is None:
            return steps
        return {"steps": steps, "fine_tune": _changed_options(self.fine_tune)}

    def to_json(self) -> str:
        return json.dumps(self.to_data(), indent=2)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_data(), sort_keys=False)

    @classmethod
    def from_data(cls, data) -> Recipe:
        """From the data form: a list of `{technique: options}`, or a mapping
        `{"steps": [...], "fine_tune": {...}}`."""
        from kshrink.core.training import FineTune

        _check_size(data)
        fine_tune = None
        if isinstance(data, Mapping):
            unknown = sorted(set(data) - {"steps", "fine_tune"})
            if unknown:
                raise RecipeError(
                    f"unknown recipe key {short(unknown[0])}. Allowed: steps, fine_tune")
            if "fine_tune" in data:
                options = data["fine_tune"]
                if options is not None and not isinstance(options, Mapping):
                    raise RecipeError(f"fine_tune must be a mapping. Received: {short(options)}")
                fine_tune = FineTune.from_config(options)
            data = data.get("steps")
        if not isinstance(data, list):
            raise RecipeError(
                "a recipe is a list of steps, each {technique: {options}}. "
                f"Received: {type(data).__name__}"
            )
        steps = []
        for i, entry in enumerate(data, 1):
            if isinstance(entry, str):
                entry = {entry: {}}
            if not isinstance(entry, Mapping) or len(entry) != 1:
                raise RecipeError(
                    f"recipe step {i} must be a one-key mapping {{technique: {{options}}}}. "
                    f"Received: {short(entry)}"
                )
            (name, options), = entry.items()
            if options is not None and not isinstance(options, Mapping):
                raise RecipeError(
                    f"recipe step {i} ({short(name)}): options must be a mapping. "
                    f"Received: {short(options)}"
                )
            steps.append(technique_class(str(name)).from_config(options))
        return cls(steps, fine_tune)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        return cls.from_data(_parse(text, "JSON", json.loads, json.JSONDecodeError))

    @classmethod
    def from_yaml(cls, text: str) -> Recipe:
        return cls.from_data(_parse(text, "YAML", yaml.safe_load, yaml.YAMLError))


    @classmethod
    def from_file(cls, path) -> Recipe:
        """Reads a `.json`, `.yaml` or `.yml` recipe file."""
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"recipe file {path.name} is {path.stat().st_size:,} bytes; a "
                              f"recipe is at most {MAX_RECIPE_BYTES:,}")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecipeError(f"recipe file {path.name} is not UTF-8 text (byte {e.start})") \
                from None
        if path.suffix.lower() == ".json":
            return cls.from_json(text)
        if path.suffix.lower() in (".yaml", ".yml"):
            return cls.from_yaml(text)
        raise RecipeError(
            f"recipe file must end in .json, .yaml or .yml. Received: {path.name}"
        )

    @classmethod
    def named(cls, name) -> Recipe:
        """A preset by name (`PRESETS`: "int8", "int4-gptq", "prune-50"...), else the recipe
        file at that path."""
        if isinstance(name, str) and name in PRESETS:
            return cls.from_data(PRESETS[name][0])
        path = Path(name)
        if not path.exists() and path.suffix.lower() not in (".json", ".yaml", ".yml"):
            raise RecipeError(f"unknown recipe {short(str(name))}: neither a preset "
                              f"({', '.join(PRESETS)}) nor a recipe file")
        return cls.from_file(path)

    @classmethod
    def coerce(cls, recipe) -> Recipe:
        """Accepts a Recipe, a technique, a list of techniques or data, a preset's name
        (`PRESETS`) or a recipe file's path."""
        if isinstance(recipe, Recipe):
            return recipe
        if isinstance(recipe, Technique):
            return cls([recipe])
        if isinstance(recipe, (str, Path)):
            return cls.named(recipe)
        if isinstance(recipe, list) and all(isinstance(s, Technique) for s in recipe):
            return cls(recipe)
        return cls.from_data(recipe)


# Ready-made recipes, by name: (recipe data, what it does). The CLI's --recipe and
# `compress(model, "int8")` take these names; README lists them.
PRESETS = {
    "int8": ([{"quantize": {"mode": "int8"}}],
             "int8 weights, every layer that has a quantized form (4x smaller)"),
    "int4": ([{"quantize": {"mode": "int4"}}],
             "int4 weights in groups of 128 inputs, round to nearest (8x smaller)"),
    "int4-gptq": ([{"quantize": {"mode": "int4", "method": "gptq"}}],
                  "int4 weights solved layer by layer with GPTQ (needs data)"),
    "int4-adaround": ([{"quantize": {"mode": "int4", "method": "adaround"}}],
                      "int4 weights with rounding learned block by block (needs data; "
                      "slower than GPTQ, closer on CNNs)"),
    "float16": ([{"quantize": {"mode": "float16"}}], "float16 weights (2x smaller)"),
    "prune-50": ([{"prune": {"sparsity": 0.5}}],
                 "50% of weights zeroed by magnitude (gradual with fine-tuning)"),
    "prune-90": ([{"prune": {"sparsity": 0.9, "scope": "global"}}],
                 "90% of weights zeroed, one threshold over the model; fine-tune it"),
    "prune-2:4": ([{"prune": {"pattern": "2:4"}}], "2 of every 4 weights zeroed (N:M)"),
    "sparsegpt-50": ([{"prune": {"sparsity": 0.5, "method": "sparsegpt"}}],
                     "50% sparsity solved layer by layer with SparseGPT (needs data)"),
    "cluster-16": ([{"cluster": {"clusters": 16}}], "16 shared values per layer"),
    "fold": ([{"fold": {}}], "BatchNorm folded into the layer before it (same outputs)"),
    "deep-compression": ([{"prune": {"sparsity": 0.8, "scope": "global"}},
                          {"cluster": {"clusters": 16}}],
                         "80% sparse, then 16 shared values per layer: smallest as a "
                         ".kshrink file; fine-tune it"),
}


def read_yaml(text: str, what: str):
    """YAML from the command line (`--techniques`), read within a recipe's limits (size,
    depth, alias expansion, integer digits): every way it is wrong is one `RecipeError`
    naming `what`."""
    try:
        data = _parse(text, "YAML", yaml.safe_load, yaml.YAMLError)
        _check_size(data)
    except RecipeError as e:
        raise RecipeError(f"{what}: {e}") from None
    return data


def _stage_order() -> str:
    from kshrink.core.technique import registered_techniques

    ordered = sorted(registered_techniques(), key=lambda cls: (cls.stage, cls.name))
    return " -> ".join(cls.name for cls in ordered)


def _changed_options(options) -> dict:
    defaults = type(options)().get_config()
    return {k: v for k, v in options.get_config().items() if v != defaults[k]}


MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_NODES = 100_000  # values in the recipe, counting every use of a YAML alias
MAX_RECIPE_DEPTH = 64


def _parse(text: str, kind: str, load, syntax_error):
    """`load(text)`, with every way the text can be wrong or too big as one `RecipeError`."""
    if len(text) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe is {len(text):,} characters; at most {MAX_RECIPE_BYTES:,}")
    try:
        return load(text)
    except syntax_error as e:
        detail = " ".join(str(e).split())[:300]
        raise RecipeError(f"recipe is not valid {kind}: {detail}") from None
    except RecursionError:
        raise RecipeError(f"recipe {kind} is nested too deeply (at most "
                          f"{MAX_RECIPE_DEPTH} levels)") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise RecipeError(f"recipe {kind} holds a value that cannot be read: "
                          f"{' '.join(str(e).split())[:200]}") from None


def _check_size(data) -> None:
    """Refuses recipe data deeper than `MAX_RECIPE_DEPTH` or with more than
    `MAX_RECIPE_NODES` values once YAML aliases are expanded, before anything formats it."""
    count = 0
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_RECIPE_NODES:
            raise RecipeError(f"recipe holds more than {MAX_RECIPE_NODES:,} values (YAML "
                              "aliases counted each time they are used)")
        if depth > MAX_RECIPE_DEPTH:
            raise RecipeError(f"recipe is nested more than {MAX_RECIPE_DEPTH} levels deep")
        if isinstance(value, Mapping):
            stack.extend((item, depth + 1) for pair in value.items() for item in pair)
        elif isinstance(value, (list, tuple)):
            stack.extend((item, depth + 1) for item in value)
