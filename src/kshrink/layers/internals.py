"""The private Keras attributes kshrink writes, in one place, each with a canary test
(`tests/layers/test_keras_internals.py`) that fails if Keras renames it."""

from __future__ import annotations

import keras


def set_variable_layout(variable: keras.Variable, layout) -> None:
    """Gives `variable` the device layout a distribution would have given it had it been made
    under one (JAX), or None: on one device. Keras keeps every later assignment to the
    variable in this layout; there is no public way to set it after creation."""
    variable._layout = layout


def own_dtype_policy(layer: keras.layers.Layer, policy) -> None:
    """Makes `policy` the layer's own dtype policy, replacing a `DTypePolicyMap` it was built
    from (the public setter writes into such a map instead)."""
    layer._dtype_policy = policy
