"""The training-time form of a pruned layer: masks as layer state, applied in the forward pass."""

from __future__ import annotations

import keras

from kshrink.core.kernels import kernel_weights
from kshrink.core.wrapping import SubstituteWrapper

@keras.saving.register_keras_serializable(package="kshrink")
class PruneWrapper(SubstituteWrapper):
    """Wraps a layer and multiplies each prunable weight by its mask in the forward pass.

    Pruned weights therefore get zero gradient; the masks are non-trainable variables that
    `update_masks` rewrites on the schedule.
    """

    def __init__(self, layer, **kwargs):
        kwargs.setdefault("name", f"prune_{layer.name}")
        super().__init__(layer, **kwargs)

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)
        self.pruned = kernel_weights(self.layer)
        self.masks = [
            self.add_weight(shape=w.shape, initializer="ones", trainable=False,
                            name=f"{w.name}_mask", dtype=w.dtype)
            for w in self.pruned
        ]
        self.built = True

    def substitutes(self) -> dict:
        return {id(w): keras.ops.multiply(w.value, m.value) for w, m in zip(self.pruned, self.masks)}
