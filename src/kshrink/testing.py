"""The contract every technique keeps: kshrink's own, and one registered from outside.

A technique applied to the contract model (a small untrained CNN with the layer kinds
techniques meet: convolutions, BatchNorm, a residual Add, Dense) with a little random
calibration data must:

- move the outputs no further than its declared tolerance;
- report every layer with weights exactly once, with a reason, and apply to some;
- leave the model it was given untouched;
- give a model whose `.keras` file and compact `.kshrink` file reload to the same outputs;
- round-trip its options through a recipe (JSON and YAML) to an equal config.

`check_technique` runs every check and raises `AssertionError` naming the first broken one.
Call it from a plugin's own tests:

```python
from kshrink.testing import check_technique

def test_my_technique_keeps_the_contract():
    check_technique(MyTechnique(strength=2), tolerance=0.01)
```

kshrink's test suite runs the same checks, one by one, for every built-in technique on every
backend.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import keras
import numpy as np

from kshrink.core.graph import leaf_layers
from kshrink.core.recipe import Recipe
from kshrink.core.report import CompressionReport
from kshrink.core.technique import Technique


def contract_model(seed: int = 0) -> keras.Model:
    """A tiny functional model with the layer kinds techniques meet: conv, BN, residual, dense.

    Inputs are 8x8 images of values in [0, 255]; outputs are 10 class scores.
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8), name="image")
    x = keras.layers.Rescaling(1 / 255, name="rescale")(inputs)
    x = keras.layers.Reshape((8, 8, 1), name="to_channels")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv1")(x)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    y = keras.layers.Conv2D(8, 3, padding="same", name="conv2")(x)
    x = keras.layers.Add(name="add")([x, y])
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(32, activation="relu", name="fc1")(x)
    outputs = keras.layers.Dense(10, name="fc2")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def contract_data(count: int = 32, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Random `(images, labels)` for `contract_model`: calibration data for the techniques
    that need some."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(count, 8, 8)).astype("float32"),
            rng.integers(0, 10, size=count))


@dataclasses.dataclass
class Compressed:
    """One run of a technique on the contract model, and what the checks compare."""

    config: Technique
    tolerance: float  # the largest output change allowed, relative to max |original output|
    model: keras.Model  # the model as it was after compression
    small: keras.Model
    report: CompressionReport
    weights_before: list  # the model's weights before compression
    inputs: np.ndarray | dict  # the calibration inputs the outputs are compared on
    reference: np.ndarray  # the model's outputs before compression


def compress_contract_model(config: Technique, tolerance: float, model=None,
                            data=None) -> Compressed:
    """Applies `config` to a fresh contract model with its calibration data, or to `model`
    with `data` (`(x, y)`)."""
    from kshrink.api import compress

    if not isinstance(config, Technique):
        raise TypeError(f"check a technique config, not {type(config).__name__}")
    if model is None:
        model, data = contract_model(), contract_data()
    weights = [np.array(w) for w in model.get_weights()]
    reference = outputs(model, data[0])
    small, report = compress(model, config, data=data, fidelity_samples=0, verbose=False)
    return Compressed(config, tolerance, model, small, report, weights, data[0], reference)


def outputs(model: keras.Model, x) -> np.ndarray:
    """`model`'s inference outputs on `x`, as a NumPy array."""
    return keras.ops.convert_to_numpy(model(x, training=False))


def _fail(message: str) -> None:
    raise AssertionError(message)


def check_outputs_within_tolerance(run: Compressed) -> None:
    """The result's outputs stay within the tolerance of the original's."""
    change = float(np.abs(outputs(run.small, run.inputs) - run.reference).max())
    allowed = run.tolerance * float(np.abs(run.reference).max())
    if not change <= allowed:
        _fail(f"{run.config.name}: outputs moved by {change:.4g}, more than the tolerance "
              f"allows ({run.tolerance} x max |output| = {allowed:.4g})")


def check_report_accounts_for_every_layer(run: Compressed) -> None:
    """The report names each layer with weights once, with a detail, applies to some, and
    counts parameters before and weight bytes after as the models hold them."""
    from kshrink.measure import weight_stats

    name = run.config.name
    if len(run.report.steps) != 1:
        _fail(f"{name}: one technique should make one report step, not "
              f"{len(run.report.steps)}")
    step = run.report.steps[0]
    # By name: a step may inline a nested model, and its layers' paths change with it.
    reported = sorted(r.layer.split("/")[-1] for r in step.layers)
    weighted = sorted(layer.name for layer in leaf_layers(run.model) if layer.weights)
    if reported != weighted:
        _fail(f"{name}: the report should name every layer with weights once. Reported "
              f"{reported}; layers with weights {weighted}")
    if not step.applied:
        _fail(f"{name}: its options applied to no layer of the contract model")
    if not all(r.detail for r in step.layers):
        _fail(f"{name}: every reported layer needs a detail (what was done, or why not)")
    if run.report.parameters_before != weight_stats(run.model).parameters:
        _fail(f"{name}: the report's parameters before differ from the model's")
    if run.report.weight_bytes_after != weight_stats(run.small).bytes:
        _fail(f"{name}: the report's weight bytes after differ from the result's")


def check_original_untouched(run: Compressed) -> None:
    """The model passed to `compress` keeps its weights and outputs."""
    after = run.model.get_weights()
    if len(after) != len(run.weights_before) or not all(
            np.array_equal(a, np.asarray(b)) for a, b in zip(run.weights_before, after)):
        _fail(f"{run.config.name}: the model passed to compress changed")
    if not np.array_equal(outputs(run.model, run.inputs), run.reference):
        _fail(f"{run.config.name}: the model passed to compress computes something else now")


def check_keras_file_round_trip(run: Compressed) -> None:
    """The result saved as `.keras` reloads with `keras.saving.load_model` to the same outputs."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "small.keras"
        run.small.save(path)
        loaded = keras.saving.load_model(path)
        if not np.array_equal(outputs(loaded, run.inputs), outputs(run.small, run.inputs)):
            _fail(f"{run.config.name}: the result saved as .keras reloads to other outputs")


def check_compact_file_round_trip(run: Compressed) -> None:
    """The result saved as `.kshrink` reloads to the same outputs."""
    from kshrink.io import load, save

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "small.kshrink"
        save(run.small, path)
        loaded = load(path)
        if not np.array_equal(outputs(loaded, run.inputs), outputs(run.small, run.inputs)):
            _fail(f"{run.config.name}: the result saved as .kshrink reloads to other outputs")


def check_config_round_trip(config: Technique) -> None:
    """The options survive a recipe file: by name, through JSON and YAML, to an equal config."""
    recipe = Recipe([config])
    for kind, text in (("JSON", recipe.to_json()), ("YAML", recipe.to_yaml())):
        again = (Recipe.from_json if kind == "JSON" else Recipe.from_yaml)(text)
        if list(again) != [config]:
            _fail(f"{config.name}: its options do not survive a {kind} recipe: {config!r} "
                  f"came back as {list(again)!r}")


CHECKS = (check_outputs_within_tolerance, check_report_accounts_for_every_layer,
          check_original_untouched, check_keras_file_round_trip, check_compact_file_round_trip)


def check_technique(config: Technique, tolerance: float, model: keras.Model | None = None,
                    data=None) -> Compressed:
    """Runs every contract check on `config`; raises `AssertionError` at the first broken one.

    Args:
        config: the technique, with the options to check (prefer non-default ones: they are
            the ones a recipe round trip can lose).
        tolerance: the largest output change allowed on the contract model, relative to its
            largest output magnitude (the model is untrained: no fine-tuning recovers).
        model, data: another model to check on (not changed), with `(x, y)` calibration
            data; default: `contract_model()` and `contract_data()`.

    Returns:
        The run, for checks of the technique's own promises (`run.small`, `run.report`).
    """
    check_config_round_trip(config)
    run = compress_contract_model(config, tolerance, model, data)
    for check in CHECKS:
        check(run)
    return run
