"""Structured pruning: channel groups through residuals, concatenation, depthwise, BN, Flatten
and global pooling; exact when the removed channels were already zero."""

import keras
import numpy as np
import pytest

import kshrink
from kshrink.prune import StructuredPrune, channel_groups

layers = keras.layers


def graph_zoo() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((10, 10, 3))
    x = layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU()(x)
    y = layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    y = layers.Conv2D(8, 1, name="pw")(y)
    x = layers.Add(name="residual")([x, y])  # ties stem, pw (and dw, BN) channels
    a = layers.Conv2D(4, 3, padding="same", name="branch_a")(x)
    b = layers.SeparableConv2D(6, 3, padding="same", name="branch_b")(x)
    x = layers.Concatenate(name="concat")([a, b])  # channels 0-3 from a, 4-9 from b
    x = layers.MaxPooling2D(name="pool")(x)
    flat = layers.Flatten(name="flat")(x)
    pooled = layers.GlobalAveragePooling2D(name="gap")(x)
    f = layers.Dense(12, activation="relu", name="from_flat")(flat)
    g = layers.Dense(12, activation="relu", name="from_gap")(pooled)
    outputs = layers.Dense(5, name="head")(layers.Concatenate()([f, g]))
    return keras.Model(inputs, outputs)


def kill(model, layer_name, channels):
    """Makes output channels of a producer exactly zero (kernel column and bias)."""
    layer = model.get_layer(layer_name)
    kernel_var = layer.pointwise_kernel if hasattr(layer, "pointwise_kernel") else layer.kernel
    kernel = np.array(kernel_var)
    kernel[..., channels] = 0
    kernel_var.assign(kernel)
    bias = np.array(layer.bias)
    bias[channels] = 0
    layer.bias.assign(bias)


def outputs(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def test_groups_follow_the_graph():
    groups = channel_groups(graph_zoo())
    spaces = {g.space for g in groups}
    assert ("pw", "stem") in spaces  # the residual ties both producers' channels
    residual = [g for g in groups if g.space == ("pw", "stem")]
    assert len(residual) == 8
    names = {name for name, _ in residual[0].per_channel}
    assert names == {"stem_bn", "dw"}
    a_group = next(g for g in groups if g.space == ("branch_a",))
    flat_rows = [c for name, c in a_group.consumers if name == "from_flat"]
    assert len(flat_rows) == 5 * 5  # one row per position of that channel after Flatten
    assert all(c % 10 == flat_rows[0] % 10 for c in flat_rows)
    head = [g for g in groups if "head" in g.space]
    assert head and all(g.pinned_by == "a model output" for g in head)


def test_removing_dead_channels_is_exact(tmp_path):
    model = graph_zoo()
    kill(model, "branch_a", [1])
    kill(model, "branch_b", [0, 5])
    kill(model, "from_gap", [3, 7])
    # a residual channel is dead only if both producers write zero and BN keeps it zero
    kill(model, "stem", [2])
    kill(model, "pw", [2])
    bn = model.get_layer("stem_bn")
    beta = np.array(bn.beta)
    beta[2] = 0
    bn.beta.assign(beta)
    x = np.random.default_rng(0).normal(size=(4, 10, 10, 3)).astype("float32")
    small, report = kshrink.compress(model, StructuredPrune(ratio=0.0))
    reference = outputs(model, x)
    np.testing.assert_allclose(outputs(small, x), reference, rtol=1e-5,
                               atol=1e-5 * np.abs(reference).max())
    assert small.get_layer("branch_a").filters == 3
    assert small.get_layer("branch_b").filters == 4
    assert small.get_layer("from_gap").units == 10
    assert small.get_layer("stem").filters == 7 and small.get_layer("pw").filters == 7
    assert small.get_layer("from_flat").kernel.shape[0] == 5 * 5 * 7
    details = {r.layer: r.detail for r in report.steps[0].layers}
    assert details["branch_b"] == "6 -> 4 output channels"
    small.save(tmp_path / "narrow.keras")
    np.testing.assert_array_equal(
        outputs(keras.saving.load_model(tmp_path / "narrow.keras"), x), outputs(small, x))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_ratio_shrinks_layers_and_macs(scope):
    model = graph_zoo()
    small, report = kshrink.compress(model, StructuredPrune(ratio=0.5, scope=scope))
    assert kshrink.measure.macs(small).total < 0.6 * kshrink.measure.macs(model).total
    assert small.get_layer("head").units == 5  # the output stays
    x = np.ones((2, 10, 10, 3), "float32")
    assert outputs(small, x).shape == (2, 5)


def test_round_to_and_min_channels():
    small, _ = kshrink.compress(graph_zoo(), StructuredPrune(ratio=0.7, round_to=4,
                                                             min_channels=2))
    assert small.get_layer("stem").filters == 4  # 8 * 0.3 = 2.4, rounded up to 4
    assert small.get_layer("branch_a").filters == 4  # 4 * 0.3 -> 4 (a multiple of 4)
    assert small.get_layer("from_flat").units == 4


def test_unknown_layers_and_exclusions_pin_their_channels():
    inputs = keras.Input((6, 6, 2))
    x = layers.Conv2D(4, 3, name="conv")(inputs)
    x = layers.LayerNormalization(name="ln")(x)  # normalizes across channels: pins
    y = layers.Conv2D(4, 1, name="other")(x)
    outputs = layers.Dense(3, name="head")(layers.Flatten()(y))
    model = keras.Model(inputs, outputs)
    small, report = kshrink.compress(model, StructuredPrune(
        ratio=0.5, exclude=kshrink.Select(names=("other",))))
    details = {r.layer: (r.action, r.detail) for r in report.steps[0].layers}
    assert details["conv"] == ("skipped", "channels pinned by ln (LayerNormalization is not "
                                          "analysed)")
    assert details["other"][0] == "skipped"
    assert small.get_layer("conv").filters == 4 and small.get_layer("other").filters == 4


def test_sequential_models_prune_too(mlp):
    small, _ = kshrink.compress(mlp, StructuredPrune(ratio=0.5))
    assert small.get_layer("fc1").units == 32 and small.get_layer("fc2").units == 10


def test_taylor_importance_removes_channels_the_loss_does_not_see(mlp, digits):
    """fc1 units whose outgoing weights are zero cannot change the loss: Taylor scores them 0
    (their L1 norm is not) and removing them leaves the outputs exactly as they were."""
    kernel = np.array(mlp.get_layer("fc2").kernel)
    unseen = np.arange(0, 64, 2)
    kernel[unseen] = 0
    mlp.get_layer("fc2").kernel.assign(kernel)
    x, y = digits.train
    small, _ = kshrink.compress(mlp, StructuredPrune(ratio=0.5, importance="taylor",
                                                     method="remove"), data=(x, y))
    assert small.get_layer("fc1").units == 32
    np.testing.assert_allclose(outputs(small, x[:16]), outputs(mlp, x[:16]), rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(kshrink.KshrinkError, match="taylor importance needs data"):
        kshrink.compress(mlp, StructuredPrune(importance="taylor"))


def test_reconstruct_refits_what_reads_removed_channels(trained, digits):
    """Half of every layer's channels gone: the re-fitted layers (least squares on the
    calibration data) follow the original's outputs far more closely than plain removal, on
    examples the fit did not see; no BatchNorm re-estimation on either, to compare the fit."""
    x, _ = digits.train
    calibration, held = x[:256], digits.test[0][:200]
    plain, _ = kshrink.compress(trained, StructuredPrune(ratio=0.5, reestimate_batchnorm=False),
                                fidelity_samples=0)
    refit, report = kshrink.compress(
        trained, StructuredPrune(ratio=0.5, method="reconstruct", reestimate_batchnorm=False),
        data=calibration, fidelity_samples=0)
    assert "re-fitted by least squares on 256 examples" in report.steps[0].summary
    assert [l.get_config().get("filters") for l in refit.layers] == [
        l.get_config().get("filters") for l in plain.layers]  # the same channels removed
    reference = outputs(trained, held)

    def error(model):
        return np.sum((outputs(model, held) - reference) ** 2) / np.sum(reference ** 2)

    assert error(refit) < 0.25 * error(plain)  # measured: 0.03-0.06 against 0.67-0.70
    with pytest.raises(kshrink.KshrinkError, match="method reconstruct re-fits layers on data"):
        kshrink.compress(trained, StructuredPrune(method="reconstruct"))
