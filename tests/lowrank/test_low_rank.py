"""Low-rank factorization: exact at full rank, fewer parameters and MACs when truncated."""

import subprocess
import sys

import keras
import numpy as np
import pytest

import kshrink
from kshrink.errors import RecipeError


def outputs(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def low_rank_mlp(rank=6, seed=0):
    """A Dense layer whose kernel has rank `rank` exactly, then a classifier."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((8, 8)), keras.layers.Flatten(name="flatten"),
                              keras.layers.Dense(48, activation="relu", name="fc1"),
                              keras.layers.Dense(10, name="fc2")])
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(64, rank)) @ rng.normal(size=(rank, 48)) / 8
    model.get_layer("fc1").kernel.assign(kernel.astype("float32"))
    return model


def test_a_rank_deficient_kernel_factorizes_exactly(images):
    model = low_rank_mlp(rank=6)
    small, report = kshrink.compress(model, kshrink.LowRank(energy=0.999999))
    details = {r.layer: r.detail for r in report.steps[0].layers}
    assert details["fc1"].startswith("rank 6 of 48")
    assert [l.name for l in small.layers] == ["flatten", "fc1_lowrank", "fc1", "fc2"]
    np.testing.assert_allclose(outputs(small, images), outputs(model, images),
                               rtol=1e-4, atol=1e-4 * np.abs(outputs(model, images)).max())
    assert report.parameters_after < report.parameters_before
    assert kshrink.measure.macs(small).total < kshrink.measure.macs(model).total


def test_tolerance_bounds_each_layer_output_error(cnn, images):
    config = kshrink.LowRank(tolerance=0.3, min_saving=0.0,
                             layers=kshrink.Select(names=("fc1",)))
    small, report = kshrink.compress(cnn, config, data=(images, np.zeros(len(images))))
    (result,) = [r for r in report.steps[0].layers if r.layer == "fc1"]
    assert result.action == "applied" and "output error <= 0.3" in result.detail
    probe = keras.Model(cnn.inputs, cnn.get_layer("fc1").output)
    probe_small = keras.Model(small.inputs, small.get_layer("fc1").output)
    reference, approximate = outputs(probe, images), outputs(probe_small, images)
    assert np.linalg.norm(approximate - reference) <= 0.3 * np.linalg.norm(reference) + 1e-6


def test_conv2d_factorizes_into_a_thin_conv_and_a_1x1(cnn, images, tmp_path):
    rng = np.random.default_rng(0)
    kernel = (rng.normal(size=(72, 3)) @ rng.normal(size=(3, 8))).reshape(3, 3, 8, 8) / 10
    cnn.get_layer("conv2").kernel.assign(kernel.astype("float32"))
    small, report = kshrink.compress(cnn, kshrink.LowRank(energy=0.999999, layers=kshrink.Select(
        names=("conv2",))))
    assert small.get_layer("conv2_lowrank").kernel.shape == (3, 3, 8, 3)
    assert small.get_layer("conv2").kernel.shape == (1, 1, 3, 8)
    reference = outputs(cnn, images)
    np.testing.assert_allclose(outputs(small, images), reference, rtol=1e-4,
                               atol=1e-4 * np.abs(reference).max())
    small.save(tmp_path / "lr.keras")
    np.testing.assert_array_equal(
        outputs(keras.saving.load_model(tmp_path / "lr.keras"), images), outputs(small, images))


def test_no_saving_means_no_change(mlp):
    small, report = kshrink.compress(mlp, kshrink.LowRank(energy=1.0))
    assert not report.steps[0].applied
    assert all("would save less than 25% of the kernel" in r.detail
               for r in report.steps[0].skipped)
    assert [l.name for l in small.layers] == [l.name for l in mlp.layers]


def test_bad_options_and_missing_data_are_refused(cnn):
    with pytest.raises(RecipeError, match="energy"):
        kshrink.LowRank(energy=1.5)
    with pytest.raises(RecipeError, match="rank"):
        kshrink.LowRank(rank=0)
    with pytest.raises(kshrink.KshrinkError, match="pass data"):
        kshrink.compress(cnn, kshrink.LowRank(tolerance=0.1))


def _truncated(kernel, rank):
    u, s, vt = np.linalg.svd(np.asarray(kernel, "float64"), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vt[:rank]).astype("float32")


def test_feed_forward_layers_inside_keras_hub_encoders_factorize(tmp_path):
    """The Dense layers of each encoder's feed-forward network are factorized (the encoder is
    rebuilt as the stock layers it is made of); the result computes what the original does
    with those kernels truncated to the rank, and loads with keras and keras_hub alone."""
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    model = keras_hub.models.BertBackbone(vocabulary_size=300, num_layers=2, num_heads=4,
                                          hidden_dim=32, intermediate_dim=128,
                                          max_sequence_length=16)
    ids = np.random.default_rng(0).integers(1, 300, (16, 16)).astype("int32")
    x = {"token_ids": ids, "segment_ids": np.zeros_like(ids),
         "padding_mask": (np.arange(16) < 10).astype("int32")[None].repeat(16, 0)}
    small, report = kshrink.compress(model, kshrink.LowRank(rank=8), verbose=False)
    applied = {r.layer for r in report.steps[0].layers if r.action == "applied"}
    assert applied == {f"transformer_layer_{i}_feedforward_{kind}_dense"
                       for i in (0, 1) for kind in ("intermediate", "output")} | {"pooled_dense"}
    skipped = {r.layer: r.detail for r in report.steps[0].layers if r.action == "skipped"}
    assert "EinsumDense" in skipped["transformer_layer_0/self_attention_layer/query"]
    assert small.count_params() < model.count_params()

    for block in ("transformer_layer_0", "transformer_layer_1"):
        for kind in ("intermediate", "output"):
            dense = getattr(model.get_layer(block), f"_feedforward_{kind}_dense")
            dense.kernel.assign(_truncated(dense.kernel, 8))
    pooled = model.get_layer("pooled_dense")
    pooled.kernel.assign(_truncated(pooled.kernel, 8))
    expected, got = model.predict(x, verbose=0), small.predict(x, verbose=0)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], atol=2e-5)

    small.save(tmp_path / "small.keras")
    np.save(tmp_path / "ids.npy", ids)
    probe = ("import sys, keras, keras_hub, numpy as np; "
             "m = keras.saving.load_model(sys.argv[1]); ids = np.load(sys.argv[2]); "
             "x = {'token_ids': ids, 'segment_ids': np.zeros_like(ids), "
             "'padding_mask': (np.arange(16) < 10).astype('int32')[None].repeat(16, 0)}; "
             "np.save(sys.argv[3], m.predict(x, verbose=0)['sequence_output']); "
             "print('kshrink' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe, tmp_path / "small.keras",
                           tmp_path / "ids.npy", tmp_path / "y.npy"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), got["sequence_output"], atol=1e-5)
