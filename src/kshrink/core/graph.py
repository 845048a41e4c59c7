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
    """An independent, uncompiled copy of `model`: same config and weights, no shared variables.

    Uncompiled on purpose: a compressed model is for inference and saving, and a compiled one
    would carry the original's optimizer into its file.
    """
    ensure_supported(model)
    # The classes in use resolve by name, so custom layers need no registration.
    classes = {type(layer).__name__: type(layer) for layer in _all_layers(model)}
    with keras.saving.CustomObjectScope(classes):
        copy = type(model).from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


def _all_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def leaf_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    """Every layer of `model` that is not itself a model, depth first, nested models included.

    Input layers are left out: they hold no computation.
    """
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from leaf_layers(layer)
        elif not isinstance(layer, keras.layers.InputLayer):
            yield layer


def replace_layers(model: keras.Model, replace) -> keras.Model:
    """The same graph with each layer `l` (nested models included) replaced by `replace(l)`.

    `replace` may return the layer itself, which is then shared, weights and all.
    """
    return keras.models.clone_model(model, clone_function=replace, recursive=True)
