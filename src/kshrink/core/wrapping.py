"""Training-time layer wrappers that run a layer with some of its weights replaced.

Techniques that train (pruning masks, cluster centroids) keep their state as variables of a
`keras.layers.Wrapper` and compute the weights the wrapped layer sees in every forward pass,
through `layer.stateless_call`. State read this way is part of what each compiled step reads,
so updates take effect on every backend (a `Variable.constraint` is baked in under JAX jit).
"""

from __future__ import annotations

import keras


class SubstituteWrapper(keras.layers.Wrapper):
    """Base class: calls the wrapped layer with `substitutes()` in place of some variables."""

    def substitutes(self) -> dict:
        """Maps `id(variable)` of the wrapped layer to the tensor used instead of its value."""
        raise NotImplementedError

    def call(self, inputs, *args, **kwargs):
        replaced = self.substitutes()

        def value(variable):
            return replaced[id(variable)] if id(variable) in replaced else variable.value

        outputs, _ = self.layer.stateless_call(
            [value(v) for v in self.layer.trainable_variables],
            [value(v) for v in self.layer.non_trainable_variables],
            inputs, *args, **kwargs,
        )
        return outputs
