"""The model as kshrink sees it: Sequential or functional, possibly nested, rebuilt from config."""

from __future__ import annotations

from collections.abc import Iterator

import keras

from kshrink.errors import UnsupportedModelError


def is_functional(model: keras.Model) -> bool:
    """True for models built with `keras.Model(inputs, outputs)` (Keras' Functional class)."""
    return any(
        cls.__name__ == "Functional" and cls.__module__.startswith("keras.")
        for cls in type(model).__mro__
    )


def ensure_supported(model) -> None:
    """Raises `UnsupportedModelError` unless `model` is a built Sequential or functional model."""
    if not isinstance(model, keras.Model):
        raise UnsupportedModelError(
            f"expected a keras.Model. Received: an object of type {type(model).__name__}"
        )
    if not (isinstance(model, keras.Sequential) or is_functional(model)):
        raise UnsupportedModelError(
            "kshrink works on Sequential and functional models (nested ones included); "
            f"received a subclassed model of class {type(model).__name__}. Rebuild it with "
            "keras.Sequential or keras.Model(inputs, outputs) and copy its weights over"
        )
    if not model.built:
        raise UnsupportedModelError(
            f"model {model.name!r} is not built: give it an Input or call it on data first"
        )
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            ensure_supported(layer)


def copy_model(model: keras.Model) -> keras.Model:
    """An independent copy of `model`: same config, same weights, no shared variables."""
    ensure_supported(model)
    # clone_model rebuilds each layer from its own class, so custom layers need no registration.
    copy = keras.models.clone_model(model, recursive=True)
    copy.set_weights(model.get_weights())
    return copy


def leaf_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    """Every layer of `model` that is not itself a model, depth first, nested models included.

    Input layers are left out: they hold no computation.
    """
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from leaf_layers(layer)
        elif not isinstance(layer, keras.layers.InputLayer):
            yield layer
