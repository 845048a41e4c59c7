import subprocess
import sys

import keras
import numpy as np
import pytest

import kshrink
from kshrink import Cluster, FineTune, Prune
from kshrink.cluster import ClusterWrapper, kmeans_1d
from kshrink.errors import RecipeError
from kshrink.layers import as_matrix, kernel_weights
from kshrink.measure import evaluate



def kernels(model):
    return {layer.name: keras.ops.convert_to_numpy(kernel_weights(layer)[0])
            for layer in model.layers if kernel_weights(layer)}


@pytest.mark.parametrize("init", ["linear", "density", "kmeans++"])
def test_kmeans_is_deterministic_and_reduces_error(init):
    values = np.random.default_rng(0).normal(size=5000)
    centroids, labels = kmeans_1d(values, 16, init)
    again, labels_again = kmeans_1d(values, 16, init)
    np.testing.assert_array_equal(centroids, again)
    np.testing.assert_array_equal(labels, labels_again)
    assert len(centroids) == 16 and np.all(np.diff(centroids) >= 0)
    error = np.mean((values - centroids[labels]) ** 2)
    assert error < np.var(values) / 100  # 16 levels: far below the variance
    # every value sits at its nearest centroid
    nearest = np.abs(values[:, None] - centroids[None]).argmin(1)
    np.testing.assert_array_equal(np.abs(values - centroids[labels]),
                                  np.abs(values - centroids[nearest]))


def test_kmeans_with_few_distinct_values_is_exact():
    values = np.array([0.5, -1.0, 0.5, 2.0])
    centroids, labels = kmeans_1d(values, 8)
    np.testing.assert_array_equal(centroids[labels], values.astype(np.float32))


@pytest.mark.every_backend
def test_kernels_hold_only_centroids_and_accuracy_holds(trained, digits):
    base = evaluate(trained, *digits.test)["accuracy"]
    small, report = kshrink.compress(trained, Cluster(clusters=8), data=digits.train,
                                     fine_tune=FineTune(epochs=2, batch_size=32, verbose=False))
    assert [r.layer for r in report.steps[0].applied] == ["conv1", "conv2", "fc1", "fc2"]
    for name, kernel in kernels(small).items():
        assert len(np.unique(kernel)) <= 8, name
    assert evaluate(small, *digits.test)["accuracy"] >= base - 0.03
    assert not any(isinstance(l, ClusterWrapper) for l in small.layers)


def test_centroids_are_trained(trained, digits):
    untrained, _ = kshrink.compress(trained, Cluster(clusters=8))
    tuned, _ = kshrink.compress(trained, Cluster(clusters=8), data=digits.train,
                                fine_tune=FineTune(epochs=1, batch_size=32, verbose=False))
    before, after = kernels(untrained)["fc1"], kernels(tuned)["fc1"]
    # same assignment of weights to clusters, moved centroid values
    assert len(np.unique(after)) <= 8
    assert not np.allclose(np.unique(before), np.unique(after))
    order_before = np.searchsorted(np.unique(before), before)
    order_after = np.searchsorted(np.unique(after), after)
    assert np.mean(order_before == order_after) > 0.9


def test_pruned_zeros_stay_zero_and_take_no_cluster(trained):
    pruned, _ = kshrink.compress(trained, Prune(sparsity=0.8, skip_first_last=False))
    small, _ = kshrink.compress(pruned, Cluster(clusters=4))
    for name, kernel in kernels(small).items():
        np.testing.assert_array_equal(kernel == 0, kernels(pruned)[name] == 0)
        assert len(np.unique(kernel[kernel != 0])) <= 4


@pytest.mark.parametrize("data", [False, True])  # k-means, and the GPTQ sweep on data
def test_overrides_give_layers_their_own_cluster_count(trained, digits, data):
    step = Cluster(clusters=16, overrides=[{"layers": {"names": ["fc1"]}, "clusters": 4},
                                           {"layers": ["fc1", "fc2"], "clusters": 8}])
    assert kshrink.Recipe.from_yaml(kshrink.Recipe([step]).to_yaml()).steps == (step,)
    small, report = kshrink.compress(trained, step, data=digits.train if data else None)
    counts = {name: len(np.unique(kernel)) for name, kernel in kernels(small).items()}
    assert counts["fc1"] <= 4 < counts["fc2"] <= 8 < counts["conv2"] <= 16  # first match wins
    assert "4 clusters per layer" in next(r.detail for r in report.steps[0].applied
                                          if r.layer == "fc1")


def test_channel_granularity_gives_a_codebook_per_output_channel(trained):
    small, _ = kshrink.compress(trained, Cluster(clusters=2, granularity="channel"))
    kernel = kernels(small)["fc1"]
    assert all(len(np.unique(kernel[:, c])) <= 2 for c in range(kernel.shape[1]))
    assert len(np.unique(kernel)) > 2


@pytest.mark.parametrize("layer", [
    keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="dw"),
    keras.layers.SeparableConv2D(6, 3, depth_multiplier=2, name="dw"),
    keras.layers.Conv2DTranspose(6, 3, name="dw"),
])
def test_channel_codebooks_follow_the_layers_output_channels(layer):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((9, 9, 4)), layer, keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    small, _ = kshrink.compress(model, Cluster(clusters=4, granularity="channel",
                                               layers=kshrink.Select(names=("dw",))))
    spec = kshrink.layers.spec_for(small.get_layer("dw"))
    for weight in spec.kernels:
        values = keras.ops.convert_to_numpy(
            next(v for v in small.get_layer("dw").weights if v.name == weight.name).value)
        columns = as_matrix(values, weight.output_axes).T  # one row per output channel
        assert len(columns) == np.prod([values.shape[a] for a in weight.output_axes]) > 1
        assert all(len(np.unique(c)) <= 4 for c in columns)
        codebooks = {tuple(np.unique(c)) for c in columns}
        assert len(codebooks) == len(columns)  # random weights: no two channels share one


def test_clustered_file_loads_without_kshrink(trained, tmp_path):
    small, _ = kshrink.compress(trained, Cluster(clusters=4))
    path = tmp_path / "clustered.keras"
    small.save(path)
    probe = ("import sys, keras, numpy as np; m = keras.saving.load_model(sys.argv[1]); "
             "print(len(np.unique(np.asarray(m.get_layer('fc1').kernel))), "
             "'kshrink' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe, path], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["4", "False"]


@pytest.mark.parametrize("options, message", [
    ({"clusters": 1}, r"clusters must be an integer in \[2, 4096\]. Received: clusters=1"),
    ({"clusters": 5000}, r"clusters must be an integer in \[2, 4096\]"),
    ({"init": "random"}, "init must be one of linear, density, kmeans\\+\\+"),
    ({"granularity": "block"}, "granularity must be one of layer, channel"),
    ({"overrides": [{"clusters": 4}]}, "cluster override: layers must be a selection"),
    ({"overrides": [{"layers": ["fc1"], "clusters": 1}]}, r"clusters must be an integer"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(RecipeError, match=message):
        Cluster.from_config(options)


def test_order_cluster_after_prune_before_quantize():
    kshrink.Recipe.from_yaml("- prune: {}\n- cluster: {}\n- quantize: {}\n")
    with pytest.raises(RecipeError, match="'cluster' cannot come after 'quantize'"):
        kshrink.Recipe.from_yaml("- quantize: {}\n- cluster: {}\n")
    with pytest.raises(RecipeError, match="'prune' cannot come after 'cluster'"):
        kshrink.Recipe.from_yaml("- cluster: {}\n- prune: {}\n")
