"""A kshrink technique from outside kshrink: round kernel values to float16 steps.

Every kernel value becomes the nearest value a float16 can hold (the model still computes in
float32). The compact `.kshrink` file then stores those kernels in 16 bits: half the bytes,
outputs within about 1e-3 relative. It is the smallest whole technique:

- a config: a frozen dataclass deriving from `kshrink.Technique`, its options as fields;
- a handler: `finalize` changes the working copy of the model and reports each layer;
- its size-search levels: `kshrink.search(objective="size", techniques=["prune",
  "round_float16"])` may then give any layer float16 weights;
- registration: `@kshrink.register_technique`, run when this module is imported. Installed
  with `pip install .` (see pyproject.toml: the `kshrink.techniques` entry point), recipes
  and the command line find it by name without an import;
- its contract: `test_round_float16.py` runs `kshrink.testing.check_technique`.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

import kshrink
from kshrink.core.graph import path_of
from kshrink.core.options import selection
from kshrink.layers import kernel_weights, quantization

FLOAT16_MAX = float(np.finfo(np.float16).max)


def skip_reason(layer) -> str | None:
    """Why the technique leaves `layer` alone, or None if it rounds it."""
    if quantization(layer):
        return f"already quantized ({quantization(layer)})"
    if not kernel_weights(layer):
        return f"{type(layer).__name__}: no kernel"
    largest = max(float(np.abs(keras.ops.convert_to_numpy(w)).max())
                  for w in kernel_weights(layer))
    if largest > FLOAT16_MAX:
        return f"a kernel value ({largest:.3g}) is beyond float16's range"
    return None


class RoundFloat16Handler(kshrink.Handler):
    """Rounds the chosen layers' kernels where they stand; no training."""

    def finalize(self, model, config: RoundFloat16, ctx: kshrink.StepContext):
        chosen = ctx.choose_layers(model, config.layers, config.exclude, skip_reason,
                                   in_place=lambda layer: True)
        if not chosen:
            raise ctx.nothing_left(config.name, "round")
        for layer in chosen:
            change = 0.0
            for weight in kernel_weights(layer):
                value = keras.ops.convert_to_numpy(weight)
                rounded = value.astype(np.float16).astype(value.dtype)
                weight.assign(rounded)
                change = max(change, float(np.abs(rounded - value).max()))
            ctx.applied(layer, f"kernel in float16 steps (largest change {change:.2g})")
        return model

    # The size search: one level, "float16", at 16 bits a value.
    def size_levels(self, model, config: RoundFloat16) -> dict:
        chosen = kshrink.StepContext(original=model).choose_layers(
            model, config.layers, config.exclude, skip_reason, in_place=lambda layer: True)
        return {path_of(layer): ("float16",) for layer in chosen}

    def size_bits(self, config: RoundFloat16, level: str) -> float:
        return 16.0

    def size_step(self, config: RoundFloat16, levels: dict, trains: bool) -> RoundFloat16:
        return dataclasses.replace(config, layers=kshrink.Select(names=tuple(sorted(levels))),
                                   exclude=None)


@kshrink.register_technique("round_float16", handler=RoundFloat16Handler(), stage=kshrink.Stage.QUANTIZE - 5)
@dataclasses.dataclass(frozen=True)
class RoundFloat16(kshrink.Technique):
    """Rounds kernel values to float16 steps: a compact file stores them in half the bytes.

    Args:
        layers, exclude: selections of layers to consider / to leave alone.

    Example:

    ```python
    small, report = kshrink.compress(model, [kshrink.Prune(sparsity=0.8), RoundFloat16()],
                                     data=(x, y))
    ```
    """

    layers: kshrink.Select | None = selection("the layers to round (default: all)")
    exclude: kshrink.Select | None = selection("layers to leave alone")
