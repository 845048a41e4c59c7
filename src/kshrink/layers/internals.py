"""The private Keras attributes kshrink writes, in one place, each with a canary test
(`tests/layers/test_keras_internals.py`) that fails if Keras renames it."""

from __future__ import annotations

import contextlib
import gc

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


@contextlib.contextmanager
def one_garbage_collection():
    """Within it, Keras' `Layer.__delattr__`, which runs a full `gc.collect()` for every
    variable it drops (`quantize` drops each float kernel), does not: one collection runs at
    the end instead. Each full collection walks the whole heap: int8 quantization of a
    two-layer BERT takes 5.9 s in a fresh process, 2.0 s with one collection, and far more in
    a process holding other models (a notebook, a test run). Other threads calling
    `gc.collect` meanwhile are not served."""
    collect = gc.collect
    gc.collect = lambda generation=2: 0
    try:
        yield
    finally:
        gc.collect = collect
        gc.collect()
