"""The contract every registered technique passes, on every backend (KERAS_BACKEND).

A new technique is picked up here automatically; it only has to add its case below: a config
to apply to a small untrained CNN (with a little random calibration data), and how far that
may move the outputs.
"""

import keras
import numpy as np
import pytest

import kshrink
from kshrink.core.graph import leaf_layers
from kshrink.layers import kernel_weights

from kshrink.testing import (CHECKS, check_config_round_trip, compress_contract_model,
                             contract_data)

from conftest import small_cnn

pytestmark = pytest.mark.every_backend  # run on JAX and torch too

# (config, largest output change allowed relative to the largest output magnitude)
CASES = {
    "cluster": (kshrink.Cluster(clusters=16), 0.25),
    "depth_prune": (kshrink.DepthPrune(blocks=1), 2.0),  # random weights: half the signal goes
    "fold": (kshrink.Fold(), 1e-5),
    "low_rank": (kshrink.LowRank(rank=4), 1.0),  # random weights: no low-rank structure
    "quantize": (kshrink.Quantize(), 0.05),
    "prune": (kshrink.Prune(sparsity=0.2), 0.25),  # random weights: no fine-tuning to recover
    "structured_prune": (kshrink.StructuredPrune(ratio=0.25), 1.0),  # whole channels go
}

# Options other than the defaults, with a selection and an override where the technique has
# them: what a recipe round trip could lose.
NON_DEFAULT = {
    "cluster": kshrink.Cluster(clusters=8, granularity="channel", overrides=(
        kshrink.ClusterOverride(layers=kshrink.Select(names=("fc2",)), clusters=4),),
        exclude=kshrink.Select(types=("Conv2D",))),
    "depth_prune": kshrink.DepthPrune(blocks=2, calibration_samples=64,
                                      layers=kshrink.Select(pattern="add.*")),
    "fold": kshrink.Fold(noops=False, reestimate_batchnorm=False),
    "low_rank": kshrink.LowRank(tolerance=0.2, min_saving=0.1, exclude=kshrink.Select(
        names=("fc1",))),
    "prune": kshrink.Prune(sparsity=0.7, pattern="4x1", schedule="one_shot", overrides=(
        kshrink.prune.SparsityOverride(layers=kshrink.Select(names=("fc1",)),
                                       sparsity=0.5),)),
    "quantize": kshrink.Quantize(mode="int4", group_size=32, overrides=(
        kshrink.Override(layers=kshrink.Select(names=("fc2",)), mode="int8"),)),
    "structured_prune": kshrink.StructuredPrune(ratio=0.25, importance="l2", round_to=4,
                                                reestimate_batchnorm=True),
}
TECHNIQUES = kshrink.registered_techniques()
DATA = contract_data()
_RUNS = {}  # technique name -> its run on the contract model, shared by the checks below


@pytest.fixture(params=[cls.name for cls in TECHNIQUES])
def technique(request):
    return CASES[request.param][0]


@pytest.fixture
def run(technique):
    if technique.name not in _RUNS:
        _RUNS[technique.name] = compress_contract_model(*CASES[technique.name])
    return _RUNS[technique.name]


def outputs(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def test_every_technique_has_a_case():
    assert {cls.name for cls in TECHNIQUES} <= set(CASES)
    assert all(type(config).name == name for name, (config, _) in CASES.items())


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__[len("check_"):])
def test_contract(run, check):
    check(run)


def test_options_round_trip_through_recipes(technique):
    check_config_round_trip(technique)
    check_config_round_trip(NON_DEFAULT[technique.name])


def _kernels(model):
    return {layer.name: [keras.ops.convert_to_numpy(w.value) for w in kernel_weights(layer)]
            for layer in leaf_layers(model) if kernel_weights(layer)}


def _prune_reaches_its_target(model, small, step):
    values = np.concatenate([k.ravel() for ks in _kernels(small).values() for k in ks])
    return abs(np.mean(values == 0) - 0.2) <= 0.005


def _cluster_leaves_at_most_16_values_per_kernel(model, small, step):
    kernels = _kernels(small)
    return all(len(np.unique(k)) <= 16 for r in step.applied for k in kernels[r.layer])


def _quantize_leaves_integer_kernels(model, small, step):
    """Every layer with a kernel is int8; the BatchNormalization folded into them is gone."""
    layers = {l.name: l for l in leaf_layers(small)}
    folded = {l.name for l in leaf_layers(model) if isinstance(l, keras.layers.BatchNormalization)}
    quantized = [r.layer for r in step.applied if r.layer not in folded]
    integer = all(getattr(layers[name], "quantization_mode", None) == "int8"
                  or getattr(layers[name], "mode", None) == "int8" for name in quantized)
    return sorted(quantized) == ["conv1", "conv2", "fc1", "fc2"] and not folded & set(layers) \
        and integer


def _fold_removes_every_batchnorm(model, small, step):
    return not any(isinstance(l, keras.layers.BatchNormalization) for l in leaf_layers(small))


def _low_rank_factors_have_the_rank(model, small, step):
    firsts = [l for l in leaf_layers(small) if l.name.endswith("_lowrank")]
    return firsts and all(
        (l.units if isinstance(l, keras.layers.Dense) else l.filters) == 4 for l in firsts)


def _weights(model):
    return {l.name: [keras.ops.convert_to_numpy(w) for w in l.weights] for l in model.layers}


def _kept_columns(original, narrowed):
    """Which columns (last axis) of `original` the columns of `narrowed` are."""
    flat, kept = original.reshape(-1, original.shape[-1]), narrowed.reshape(-1, narrowed.shape[-1])
    return [int(np.argmin(np.abs(flat - column[:, None]).sum(0))) for column in kept.T]


def _structured_prune_narrows_by_the_ratio(model, small, step):
    """Without data (plain slicing), the narrowed model computes what the original computes
    with the removed channels and units zeroed."""
    small, _ = kshrink.compress(model, kshrink.StructuredPrune(ratio=0.25), verbose=False)
    before, after = _weights(model), _weights(small)
    channels = _kept_columns(before["conv1"][0], after["conv1"][0])
    rows = np.zeros((8, 8, 8), bool)
    rows[..., channels] = True
    units = _kept_columns(before["fc1"][0][rows.ravel()], after["fc1"][0])
    if (len(set(channels)), len(set(units))) != (6, 24):
        return False
    zeroed = {name: [w.copy() for w in ws] for name, ws in before.items()}
    gone = np.setdiff1d(np.arange(8), channels)
    zeroed["bn1"][0][gone] = zeroed["bn1"][1][gone] = 0  # gamma, beta: the channel is 0
    zeroed["conv2"][0][..., gone] = 0
    zeroed["conv2"][1][gone] = 0
    gone = np.setdiff1d(np.arange(32), units)
    zeroed["fc1"][0][:, gone] = 0
    zeroed["fc1"][1][gone] = 0
    reference = small_cnn()
    for layer in reference.layers:
        layer.set_weights(zeroed[layer.name])
    return np.allclose(outputs(small, DATA[0]), outputs(reference, DATA[0]), atol=1e-4)


def _depth_prune_removes_one_block(model, small, step):
    """The block's branch (conv2) goes: the original with that branch zeroed."""
    adds = lambda m: sum(isinstance(l, keras.layers.Add) for l in leaf_layers(m))
    reference = small_cnn()
    reference.set_weights(model.get_weights())
    conv2 = reference.get_layer("conv2")
    conv2.set_weights([np.zeros_like(w) for w in conv2.get_weights()])
    return adds(small) == adds(model) - 1 and np.allclose(
        outputs(small, DATA[0]), outputs(reference, DATA[0]), atol=1e-4)


# The exact property each technique promises on the contract model.
EXACT = {
    "prune": _prune_reaches_its_target,
    "cluster": _cluster_leaves_at_most_16_values_per_kernel,
    "quantize": _quantize_leaves_integer_kernels,
    "fold": _fold_removes_every_batchnorm,
    "low_rank": _low_rank_factors_have_the_rank,
    "structured_prune": _structured_prune_narrows_by_the_ratio,
    "depth_prune": _depth_prune_removes_one_block,
}


def test_every_technique_keeps_its_exact_promise(technique, run):
    assert technique.name in EXACT, "add the technique's exact property to EXACT"
    assert EXACT[technique.name](small_cnn(), run.small, run.report.steps[0])


def every_kind_model(seed=0) -> keras.Model:
    """Two inputs, and the layer kinds the contract model lacks: depthwise and separable
    convolutions (the latter a residual branch), an embedding, an einsum dense, a
    concatenation and a nested model."""
    keras.utils.set_random_seed(seed)
    image = keras.Input((8, 8, 1), name="image")
    tokens = keras.Input((6,), dtype="int32", name="tokens")
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(image)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
    y = keras.layers.SeparableConv2D(8, 3, padding="same", name="separable")(x)
    x = keras.layers.Add(name="add")([x, y])
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    t = keras.layers.Embedding(50, 8, name="embedding")(tokens)
    t = keras.layers.EinsumDense("abc,cd->abd", output_shape=(None, 8), name="einsum")(t)
    t = keras.layers.GlobalAveragePooling1D(name="token_pool")(t)
    both = keras.layers.Concatenate(name="concat")([x, t])
    block = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu",
                                                                     name="inner")],
                             name="block")
    outputs = keras.layers.Dense(10, name="head")(block(both))
    return keras.Model({"image": image, "tokens": tokens}, outputs, name="every_kind")


def every_kind_data(count=32):
    rng = np.random.default_rng(2)
    return ({"image": rng.normal(size=(count, 8, 8, 1)).astype("float32"),
             "tokens": rng.integers(0, 50, size=(count, 6)).astype("int32")},
            rng.integers(0, 10, size=count))


# Random weights, and every layer kind: how far each technique's case may move the outputs.
EVERY_KIND_TOLERANCE = {"cluster": 0.25, "depth_prune": 1.0, "fold": 1e-5, "low_rank": 1.0,
                        "quantize": 0.1, "prune": 0.5, "structured_prune": 1.5}


def test_contract_on_a_model_of_every_layer_kind(technique):
    run = compress_contract_model(technique, EVERY_KIND_TOLERANCE[technique.name],
                                  every_kind_model(), every_kind_data())
    for check in CHECKS:
        check(run)
