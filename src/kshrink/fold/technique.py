"""The `fold` technique: BatchNorm folded into the layer before it, no-op layers removed."""

from __future__ import annotations

import dataclasses

from kshrink.core.graph import leaf_layers
from kshrink.core.options import Flag, option
from kshrink.core.technique import Handler, Stage, StepContext, Technique, register_technique
from kshrink.core.batchnorm import fold, plan_folds


class FoldHandler(Handler):
    """Runs `Fold`: merges each BatchNormalization into the layer before it."""

    def prepare(self, model, config: Fold, ctx: StepContext):
        plan = plan_folds(model, batchnorm=config.batchnorm, noops=config.noops)
        absorbed = {producer: bn for bn, producer in plan.folds.items()}
        for layer in leaf_layers(model):
            if layer.name in plan.folds:
                ctx.applied(layer, f"folded into {plan.folds[layer.name]}")
            elif layer.name in absorbed:
                ctx.applied(layer, f"absorbed {absorbed[layer.name]}")
            elif layer.name in plan.removed:
                ctx.applied(layer, "removed: does nothing at inference")
            elif layer.name in plan.refused:
                ctx.skipped(layer, plan.refused[layer.name])
            elif layer.weights:
                ctx.skipped(layer, "no BatchNormalization to fold")
        return fold(model, plan) if plan.folds or plan.removed else model


@register_technique("fold", handler=FoldHandler(), stage=Stage.REWRITE)
@dataclasses.dataclass(frozen=True)
class Fold(Technique):
    """The inference form of a model: fewer layers, same outputs (up to float rounding).

    Folds each BatchNormalization into the Conv/Dense/Depthwise layer right before it (which
    gains a bias if it had none) and removes layers that do nothing at inference (Dropout and
    its variants, Identity, linear Activation). A graph transform like `low_rank` and
    `structured_prune`: it comes before pruning, clustering and quantization. A BN that cannot be
    folded (after an activation, a shared output, a transposed convolution, a nested model)
    stays and is listed with the reason.

    Args:
        batchnorm: fold BatchNormalization layers.
        noops: remove no-op layers.

    Example:

    ```python
    model, report = kshrink.compress(model, [kshrink.Fold(), kshrink.Quantize()])
    ```
    """

    batchnorm: bool = option(True, "fold BatchNormalization into the layer before it", Flag())
    noops: bool = option(True, "remove Dropout, Identity and linear Activation layers", Flag())
