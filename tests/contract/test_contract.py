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

from conftest import small_cnn, weights_of

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

TECHNIQUES = kshrink.registered_techniques()


@pytest.fixture(params=[cls.name for cls in TECHNIQUES])
def technique(request):
    return CASES[request.param][0]


# Calibration data for the techniques that need some (the others ignore it).
_rng = np.random.default_rng(1)
DATA = (_rng.integers(0, 256, size=(32, 8, 8)).astype("float32"), _rng.integers(0, 10, size=32))


@pytest.fixture(scope="module")
def inputs():
    return DATA[0]


def outputs(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def test_every_technique_has_a_case():
    assert {cls.name for cls in TECHNIQUES} <= set(CASES)
    assert all(type(config).name == name for name, (config, _) in CASES.items())


def test_outputs_stay_within_tolerance(technique, inputs):
    model = small_cnn()
    small, _ = kshrink.compress(model, technique, data=DATA)
    reference = outputs(model, inputs)
    diff = np.abs(outputs(small, inputs) - reference).max()
    assert diff <= CASES[technique.name][1] * np.abs(reference).max()


def test_report_accounts_for_every_layer_with_weights_once(technique):
    model = small_cnn()
    small, report = kshrink.compress(model, technique, data=DATA)
    (step,) = report.steps
    reported = [r.layer for r in step.layers]
    weighted = [layer.name for layer in leaf_layers(model) if layer.weights]
    assert sorted(reported) == sorted(weighted)
    assert step.applied, "the default options should apply to something in the test model"
    assert all(r.detail for r in step.layers)
    assert report.parameters_before == kshrink.measure.weight_stats(model).parameters
    assert report.weight_bytes_after == kshrink.measure.weight_stats(small).bytes


def test_keras_round_trip_gives_identical_outputs(technique, inputs, tmp_path):
    small, _ = kshrink.compress(small_cnn(), technique, data=DATA)
    path = tmp_path / "small.keras"
    small.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(outputs(loaded, inputs), outputs(small, inputs))


def test_input_model_is_untouched(technique, inputs):
    model = small_cnn()
    weights, reference = weights_of(model), outputs(model, inputs)
    kshrink.compress(model, technique, data=DATA)
    for a, b in zip(weights, weights_of(model)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(outputs(model, inputs), reference)


def test_compact_file_round_trip_gives_identical_outputs(technique, inputs, tmp_path):
    small, _ = kshrink.compress(small_cnn(), technique, data=DATA)
    path = tmp_path / "small.kshrink"
    kshrink.save(small, path)
    np.testing.assert_array_equal(outputs(kshrink.load(path), inputs), outputs(small, inputs))


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


def test_every_technique_keeps_its_exact_promise(technique):
    model = small_cnn()
    small, report = kshrink.compress(model, technique, data=DATA)
    assert technique.name in EXACT, "add the technique's exact property to EXACT"
    assert EXACT[technique.name](model, small, report.steps[0])
