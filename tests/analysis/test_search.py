"""`kshrink.search`: the budget holds on the held-out examples, the recipe repeats the model,
the front is a front, and bad input is one line."""

import keras
import numpy as np
import pytest

import kshrink
from kshrink.analysis import search
from kshrink.analysis.search.planner import Plan, greedy_path
from kshrink.prune.magnitude import SEARCH_SPARSITIES
from kshrink.prune.structured import SEARCH_RATIOS
from kshrink.analysis.search.spaces import Space as SearchSpace
from kshrink.cluster.sharing import SIZE_LEVELS as CLUSTER_COUNTS
from kshrink.errors import KshrinkError
from kshrink.measure import predict, weight_stats
from kshrink.measure.accuracy import top1_accuracy

from conftest import weights_of


@pytest.fixture(scope="module")
def classifier(digits):
    """An MLP trained to about 95% on the digits (pixels 0-255), ending in logits."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8)),
        keras.layers.Rescaling(1 / 255, name="rescale"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(128, activation="relu", name="fc1"),
        keras.layers.Dense(64, activation="relu", name="fc2"),
        keras.layers.Dense(10, name="fc3"),
    ], name="digits_mlp")
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(*digits.train, epochs=30, batch_size=32, verbose=0)
    return model


def held_out(data):
    """The last tenth of `data`, which search holds out when no validation_data is given."""
    x, y = data
    cut = len(x) - round(len(x) * 0.1)
    return x[:cut], y[:cut], x[cut:], y[cut:]


def test_size_search_keeps_the_budget_shrinks_the_file_and_its_recipe_repeats(
        classifier, digits, tmp_path):
    small, report = search(classifier, digits.train, objective="size", max_accuracy_drop=2.0,
                           epochs=1, batch_size=64, rounds=4)
    x_train, y_train, x_held, y_held = held_out(digits.train)
    assert report.chosen is not None and report.training_examples == len(x_train)
    best = report.best
    # The budget, checked again here on the held-out examples the search judged by.
    before = top1_accuracy(predict(classifier, x_held), y_held)
    after = top1_accuracy(predict(small, x_held), y_held)
    assert after == pytest.approx(best.accuracy) and 100 * (before - after) <= 2.0
    # Its objective is the compact file's bytes, and the search shrank it.
    size = kshrink.save(small, tmp_path / "small.kshrink").stat().st_size
    assert size == best.objective
    assert weight_stats(classifier).bytes / size >= 5
    # Pruned and shared as the levels say, in every layer the levels name.
    for dimension, level in best.levels.items():
        path, _, encoding = dimension.partition(":")
        kernel = np.asarray(small.get_layer(path).kernel)
        if not encoding:
            assert np.mean(kernel == 0) >= level - 0.01, path
        elif isinstance(level, int):
            assert len(np.unique(kernel[kernel != 0])) <= level, dimension
    assert {level for d, level in best.levels.items() if d.endswith(":weights")} <= {
        "float", *CLUSTER_COUNTS}
    # The recipe alone, on the same training examples, gives the same weights.
    again, _ = kshrink.compress(classifier, report.recipe, data=(x_train, y_train),
                                verbose=False)
    for a, b in zip(weights_of(small), weights_of(again)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert kshrink.Recipe.from_yaml(report.recipe.to_yaml()) == report.recipe
    # No candidate on the front is beaten on both counts by another candidate.
    for c in report.front():
        assert not any(o.objective < c.objective and o.accuracy > c.accuracy
                       for o in report.candidates)
    assert "chosen" in report.to_text() and len(report.plot_points()[1]) == \
        len(report.candidates) + 1


def test_memory_search_chooses_bit_widths_post_training(classifier, digits):
    validation = digits.test
    small, report = search(classifier, digits.train, objective="memory", epochs=0,
                           max_accuracy_drop=1.0, validation_data=validation, rounds=4)
    assert report.chosen is not None
    assert report.training_examples == len(digits.train[0])
    assert set(report.best.levels.values()) <= {"float", "int8", "int4"}
    assert weight_stats(small).bytes == report.best.objective
    assert report.best.objective <= report.float_bytes / 3.5  # int8 at least, per layer
    accuracy = top1_accuracy(predict(small, validation[0]), validation[1])
    assert 100 * (report.accuracy - accuracy) <= 1.0


class _Space(SearchSpace):
    """Two layers: `big` costs nothing to prune to 90%, `small` costs at once."""

    weights = {"big": 1000, "small": 10}
    choices = {"big": (0.0, 0.5, 0.9), "small": (0.0, 0.5, 0.9)}

    def cost(self, path, level):
        return self.weights[path] * (1 - level)


def test_greedy_path_takes_the_cheapest_saving_first_and_ends_fully_compressed():
    rises = {"big": [0.0, 0.0, 0.0], "small": [0.0, 0.5, 1.0]}
    path = greedy_path(_Space(), rises)
    assert path[0] == {"big": 0.9, "small": 0.0}  # straight to the free deepest level
    assert path[-1] == {"big": 0.9, "small": 0.9}
    sizes = [_Space().estimate(levels) for levels in path]
    assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("call, message", [
    (dict(objective="speed"), "objective"),
    (dict(max_accuracy_drop=-1), "max_accuracy_drop"),
    (dict(epochs=-1), "epochs"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(fine_tune=kshrink.FineTune(), epochs=3), "set epochs on it"),
    (dict(fine_tune={"epochs": 3}), "fine_tune must be a kshrink.FineTune"),
    (dict(data="inputs only"), "class labels"),
    (dict(data="a stream of inputs only"), "class labels"),
    (dict(objective="latency", latency_runtime="tvm"), "runtime must be one of"),
    (dict(latency_runtime="onnx"), "objective 'size' is not timed"),
    (dict(techniques=["structured_prune"]), "searches cluster, prune, quantize.*; not "
                                            "structured_prune"),
    (dict(techniques=["prune", {"prune": {"method": "wanda"}}]), "prune is named twice"),
    (dict(techniques=[]), "techniques is empty"),
    (dict(techniques=["distill"]), "unknown technique"),
    (dict(techniques=[{"prune": {"pattern": "2:4"}}]), "fixes each layer's sparsity"),
    (dict(techniques=[{"cluster": {"clusters": 1}}]), "clusters must be an integer"),
    (dict(channels="per_layer"), "removes no channels"),
    (dict(objective="macs", channels="per_stage"), "channels must be one of"),
    (dict(objective=kshrink.Latency(), latency_runtime="onnx"), "set runtime on it"),
    (dict(objective="memory", latency_batch_size=8), "memory' is not timed"),
    (dict(objective=kshrink.Size(), techniques=["depth_prune"]), "not depth_prune"),
    (dict(objective=lambda: kshrink.Latency(batch_size=0)), "latency: batch_size must be"),
])
def test_bad_input_is_one_line(classifier, digits, call, message):
    options = dict(call)
    data = {None: digits.train, "inputs only": digits.train[0],
            "a stream of inputs only": (x for x in np.array_split(digits.train[0], 4))}[
        options.pop("data", None)]
    with pytest.raises(KshrinkError, match=message):
        if callable(options.get("objective")):
            options["objective"] = options["objective"]()
        search(classifier, data, **options)


def test_an_objective_by_name_and_keywords_is_its_config():
    from kshrink.analysis.search.objectives import objective_from

    assert objective_from("latency", 4, "keras", "per_layer") == kshrink.Latency(
        batch_size=4, channels="per_layer")
    assert objective_from("macs") == kshrink.Macs()
    assert objective_from(kshrink.Size()) == kshrink.Size()
    assert kshrink.Latency.from_config(kshrink.Latency(batch_size=8).get_config()).batch_size == 8


def test_a_stream_is_searched_on_its_first_examples(classifier, digits):
    from conftest import Batches

    x, y = digits.train
    options = dict(objective="size", epochs=0, rounds=1, max_accuracy_drop=2.0)
    _, from_arrays = search(classifier, (x, y), **options)
    _, from_stream = search(classifier, Batches(x, y, 100), **options)
    assert from_stream.training_examples == from_arrays.training_examples
    assert from_stream.best.levels == from_arrays.best.levels


def test_a_model_without_class_scores_is_refused(digits):
    inputs = keras.Input((8, 8))
    regression = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Flatten()(inputs)))
    with pytest.raises(KshrinkError, match="class scores"):
        search(regression, digits.train)


def test_levels_are_the_documented_ones():
    assert SEARCH_SPARSITIES[0] == 0.0 and max(SEARCH_SPARSITIES) < 1


@pytest.fixture(scope="module")
def cnn(digits):
    """The test suite's small residual CNN, trained on the digits."""
    from conftest import small_cnn

    model = small_cnn()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(*digits.train, epochs=6, batch_size=32, verbose=0)
    return model


@pytest.mark.parametrize("objective", ["latency", "macs"])
def test_latency_and_macs_searches_remove_blocks_or_channels(cnn, digits, objective):
    from kshrink.measure import macs

    model = cnn
    small, report = search(model, digits.train, objective=objective, max_accuracy_drop=5.0,
                           epochs=1, batch_size=64, rounds=2)
    if objective == "macs":
        assert report.best.objective == macs(small).total < macs(model).total
    # The residual block and the channel ratio are the dimensions, probed at every level.
    assert dict(report.loss_rise["add"]).keys() == {"keep", "remove"}
    assert [level for level, _ in report.loss_rise["channels"]] == [0.0, 0.125, 0.25, 0.375, 0.5, 0.75]
    assert all(c.objective > 0 for c in report.candidates)
    assert report.chosen is not None, report.to_text()
    names = [step.name for step in report.recipe]
    assert names[-1] == "fold" and len(names) >= 2
    # The chosen model is what its levels say: narrower layers, or the block gone.
    levels = report.best.levels
    layer_names = {layer.name for layer in small.layers}
    assert ("conv2" in layer_names) == (levels["add"] == "keep")
    if levels["channels"]:
        assert small.get_layer("fc1").units < 32
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in small.layers)


def test_a_latency_search_times_every_model_in_the_runtime_it_names(cnn, digits, monkeypatch):
    if keras.backend.backend() not in ("tensorflow", "torch"):
        with pytest.raises(KshrinkError, match="KERAS_BACKEND=tensorflow"):
            search(cnn, digits.train, objective="latency", latency_runtime="onnx")
        return
    import importlib

    from kshrink.deploy import Runtime

    module = importlib.import_module("kshrink.analysis.search.spaces")

    timed, exported = [], module.in_runtime

    def in_runtime(*args):
        timed.append(exported(*args))
        return timed[-1]

    monkeypatch.setattr(module, "in_runtime", in_runtime)
    _, report = search(cnn, digits.train, objective="latency", max_accuracy_drop=5.0,
                       epochs=1, batch_size=64, rounds=1, probe_steps=0,
                       latency_runtime="onnx")
    assert report.latency_runtime == "onnx" and "ONNX Runtime" in report.objective_label
    # The folded original, one model per probe, the candidate and the original: all exported.
    probes = sum(len(levels) - 1 for levels in (("keep", "remove"), SEARCH_RATIOS))
    assert len(timed) == 1 + probes + 1 + 1
    assert all(isinstance(runner, Runtime) and runner.format == "onnx" for runner in timed)
    assert report.original_objective > 0 and report.candidates[0].objective > 0


def test_structural_probes_are_fine_tuned_before_their_loss_counts(cnn, digits):
    def probed(steps, data=digits.train):
        # The fine-tune as a config, as compress takes it: the probes follow it too (with
        # no steps, probes measure at once whatever the fine-tune: the candidate skips it)
        fine_tune = dict(fine_tune=kshrink.FineTune(epochs=1, batch_size=64, distill=True)) \
            if steps else dict(epochs=0)
        _, report = search(cnn, data, objective="macs", max_accuracy_drop=5.0, rounds=1,
                           probe_steps=steps, **fine_tune)
        return report

    at_once, tuned = probed(0), probed(8)
    assert (at_once.probe_steps, tuned.probe_steps) == (0, 8)
    assert "fine-tuned 8 steps" in tuned.layer_table().title
    # Three quarters of the channels cost less once training has had a few steps.
    deepest = {report.probe_steps: dict(report.loss_rise["channels"])[0.75]
               for report in (at_once, tuned)}
    assert deepest[8] < 0.9 * deepest[0], deepest
    # At most one epoch of steps (of 300 examples: 270 train, 5 steps).
    few = tuple(part[:300] for part in digits.train)
    assert probed(1000, few).probe_steps == -(-len(held_out(few)[0]) // 64) == 5


def test_a_capped_dimension_stops_short_of_its_cap_on_a_new_path():
    rises = {"big": [0.0, 0.0, 0.0], "small": [0.0, 0.5, 1.0]}
    path = greedy_path(_Space(), rises, caps={"big": 1})
    assert path[0] == {"big": 0.5, "small": 0.0}
    assert all(levels["big"] <= 0.5 for levels in path)
    assert greedy_path(_Space(), rises, caps={"big": 0, "small": 0}) == []


def test_a_path_planned_from_a_point_moves_on_from_it():
    rises = {"big": [0.0, 0.0, 0.0], "small": [0.0, 0.5, 1.0]}
    path = greedy_path(_Space(), rises, caps={"big": 1}, start={"big": 0.5, "small": 0.0})
    assert path == [{"big": 0.5, "small": 0.5}, {"big": 0.5, "small": 0.9}]


def tried(within_budget, rounds=6):
    """The levels a plan over `_Space` tries, each judged by `within_budget(levels)`."""
    plan, seen = Plan(_Space(), {"big": [0.0, 0.0, 0.0], "small": [0.0, 0.5, 1.0]}), []
    for _ in range(rounds):
        levels = plan.next()
        if levels is None:
            return seen
        seen.append(levels)
        plan.tell(within_budget(levels))
    return seen


def test_a_misjudged_first_move_is_ruled_out_and_the_path_planned_again():
    # The probes call `big` free at 90%; it keeps the budget only up to 50%.
    assert tried(lambda levels: levels["big"] <= 0.5) == [
        {"big": 0.9, "small": 0.0},  # the first move, outside
        {"big": 0.5, "small": 0.0},  # the new path's first move, within
        {"big": 0.5, "small": 0.9},  # the end of the new path, within: nothing is left
    ]


def test_a_misjudged_move_past_a_good_point_is_ruled_out_from_there():
    assert tried(lambda levels: levels["small"] <= 0.5) == [
        {"big": 0.9, "small": 0.0},  # within
        {"big": 0.9, "small": 0.9},  # outside
        {"big": 0.9, "small": 0.5},  # within, next to the one outside: no move is left
    ]


def test_techniques_name_the_space_and_configure_how_each_level_is_reached(classifier, digits):
    # SparseGPT instead of magnitude pruning, int8/int4 instead of clusters, post-training.
    small, report = search(classifier, digits.train, objective="size", epochs=0, rounds=3,
                           max_accuracy_drop=2.0, validation_data=digits.test,
                           techniques=[{"prune": {"method": "sparsegpt"}}, "quantize"])
    assert report.chosen is not None, report.to_text()
    encodings = {d: level for d, level in report.loss_rise.items() if d.endswith(":weights")}
    assert encodings and all([lv for lv, _ in pairs] == ["float", "int8", "int4"]
                             for pairs in encodings.values())
    steps = {step.name: step for step in report.recipe}
    assert set(steps) <= {"prune", "quantize"} and steps, report.recipe
    if "prune" in steps:
        assert steps["prune"].method == "sparsegpt" and steps["prune"].schedule == "one_shot"
    # The recipe, rerun post-training on the same examples, makes the same file.
    again, _ = kshrink.compress(classifier, report.recipe, data=digits.train, verbose=False)
    for a, b in zip(weights_of(small), weights_of(again)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # A configured technique is a template too: a layer it excludes is not searched.
    _, report = search(classifier, digits.train, objective="size", epochs=0, rounds=1,
                       techniques=[kshrink.Cluster(exclude=kshrink.Select(names=("fc3",)))])
    assert set(report.loss_rise) == {"fc1:weights", "fc2:weights"}


def test_per_layer_channel_ratios_are_searched_per_set_of_tied_layers(cnn, digits):
    small, report = search(cnn, digits.train, objective="macs", max_accuracy_drop=8.0,
                           epochs=1, batch_size=64, rounds=3, probe_steps=0,
                           techniques=["structured_prune"], channels="per_layer")
    # conv1 and conv2 meet at the residual Add: their channels go together; fc1's alone.
    assert set(report.loss_rise) == {"channels conv1+conv2", "channels fc1"}
    assert report.chosen is not None, report.to_text()
    levels = report.best.levels
    widths = {"channels conv1+conv2": small.get_layer("conv1").filters,
              "channels fc1": small.get_layer("fc1").units}
    for dimension, full in (("channels conv1+conv2", 8), ("channels fc1", 32)):
        assert (widths[dimension] < full) == (levels[dimension] > 0), (dimension, widths)
