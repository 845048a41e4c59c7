"""Every technique reaches the layers inside keras-hub blocks: built from config (small, random
weights, offline), quantized in place, saved and reloaded with the same outputs."""

import warnings

import keras
import numpy as np
import pytest

import kshrink
from kshrink.core.graph import leaf_layers, path_of
from kshrink.measure import compare

keras_hub = pytest.importorskip("keras_hub")

SEQUENCE = 16
VOCABULARY = 300


def _tokens(n=8, seed=0):
    return np.random.default_rng(seed).integers(1, VOCABULARY, (n, SEQUENCE)).astype("int32")


def _encoder_classifier():
    """A plain functional model around keras-hub blocks, as a user would write one."""
    keras.utils.set_random_seed(0)
    tokens = keras.Input((SEQUENCE,), dtype="int32", name="tokens")
    h = keras_hub.layers.TokenAndPositionEmbedding(VOCABULARY, SEQUENCE, 32, name="embed")(tokens)
    h = keras_hub.layers.TransformerEncoder(64, num_heads=2, name="block")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(tokens, keras.layers.Dense(3, name="head")(h))


def _bert():
    keras.utils.set_random_seed(0)
    return keras_hub.models.BertBackbone(
        vocabulary_size=VOCABULARY, num_layers=2, num_heads=2, hidden_dim=32,
        intermediate_dim=64, max_sequence_length=SEQUENCE)


def _bert_inputs(n=8):
    return {"token_ids": _tokens(n), "segment_ids": np.zeros((n, SEQUENCE), "int32"),
            "padding_mask": np.ones((n, SEQUENCE), "int32")}


def _cosine(a, b):
    a, b = np.ravel(a).astype("float64"), np.ravel(b).astype("float64")
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _reload(model, tmp_path, name):
    model.save(tmp_path / f"{name}.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return keras.saving.load_model(tmp_path / f"{name}.keras")


def test_discovery_names_sublayers_by_path():
    model = _encoder_classifier()
    paths = [path_of(layer) for layer in leaf_layers(model) if layer.weights]
    assert "block/self_attention_layer/query" in paths
    assert "block/feedforward_output_dense" in paths
    assert "embed/token_embedding" in paths
    assert "head" in paths
    assert "block" not in paths  # a container: its sublayers stand for it


def test_selections_match_paths_and_bare_names():
    model = _encoder_classifier()
    layers = list(leaf_layers(model))
    by_path = kshrink.Select(names=["block/self_attention_layer/key"]).resolve(layers)
    assert [path_of(l) for l in by_path] == ["block/self_attention_layer/key"]
    by_pattern = kshrink.Select(pattern="block/self_attention_layer/.*").resolve(layers)
    assert {l.name for l in by_pattern} >= {"query", "key", "value", "attention_output"}
    inside = kshrink.Select(names=["block/self_attention_layer"]).resolve(layers)
    assert {l.name for l in inside if l.weights} == {"query", "key", "value", "attention_output"}
    with pytest.raises(kshrink.errors.SelectionError, match="do not exist"):
        kshrink.Select(names=["block/nothing"]).resolve(layers)


@pytest.mark.every_backend
@pytest.mark.parametrize("mode, min_ratio", [("int8", 2.5), ("int4", 3.5)])
def test_quantize_reaches_every_projection_and_the_file_reloads(tmp_path, mode, min_ratio):
    model = _encoder_classifier()
    small, report = kshrink.compress(model, kshrink.Quantize(mode=mode))
    applied = {r.layer for r in report.steps[0].applied}
    assert {"block/self_attention_layer/query", "block/self_attention_layer/value",
            "block/feedforward_intermediate_dense", "block/feedforward_output_dense",
            "embed/token_embedding", "head"} <= applied
    assert report.weight_bytes_before / report.weight_bytes_after >= min_ratio
    x = _tokens()
    expected = small.predict(x, verbose=0)
    assert _cosine(model.predict(x, verbose=0), expected) > 0.98
    # Keras' own model.quantize leaves this file unloadable; kshrink records the sublayers.
    reloaded = _reload(small, tmp_path, mode)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), expected, atol=1e-6)
    path = tmp_path / f"{mode}.kshrink"
    kshrink.save(small, path)
    np.testing.assert_allclose(kshrink.load(path).predict(x, verbose=0), expected, atol=1e-6)


@pytest.mark.every_backend
def test_a_backbone_keeps_its_class_and_reloads(tmp_path):
    model = _bert()
    small, report = kshrink.compress(model, kshrink.Quantize(mode="int8"))
    assert type(small) is type(model)
    assert "transformer_layer_1/self_attention_layer/query" in {
        r.layer for r in report.steps[0].applied}
    assert report.weight_bytes_before / report.weight_bytes_after > 3
    x = _bert_inputs()
    expected = small.predict(x, verbose=0)["sequence_output"]
    assert _cosine(model.predict(x, verbose=0)["sequence_output"], expected) > 0.99
    reloaded = _reload(small, tmp_path, "bert")
    assert type(reloaded) is type(model)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0)["sequence_output"], expected,
                               atol=1e-6)


def _zeros(layer):
    return float(np.mean(keras.ops.convert_to_numpy(layer.kernel) == 0))


def _inner(model, path):
    return next(l for l in leaf_layers(model) if path_of(l) == path)


def test_steps_that_wrap_layers_skip_sublayers_and_say_why():
    model = _encoder_classifier()
    rng = np.random.default_rng(0)
    data = (rng.integers(1, VOCABULARY, (32, SEQUENCE)).astype("int32"), rng.integers(0, 3, 32))
    small, report = kshrink.compress(model, kshrink.Cluster(clusters=8), data=data,
                                     fine_tune=kshrink.FineTune(epochs=1, verbose=False))
    skipped = {r.layer: r.detail for r in report.steps[0].skipped}
    assert "inside TransformerEncoder 'block'" in skipped["block/feedforward_output_dense"]
    assert "in place" in skipped["block/feedforward_output_dense"]
    assert isinstance(small.get_layer("block"), keras_hub.layers.TransformerEncoder)


def test_low_rank_rebuilds_an_encoder_to_factorize_its_feed_forward_layers():
    model = _encoder_classifier()
    small, report = kshrink.compress(model, kshrink.LowRank(rank=4))
    applied = {r.layer for r in report.steps[0].applied}
    assert {"block_feedforward_intermediate_dense", "block_feedforward_output_dense"} <= applied
    skipped = {r.layer: r.detail for r in report.steps[0].skipped}
    assert "EinsumDense" in skipped["block/self_attention_layer/query"]
    assert not any(isinstance(l, keras_hub.layers.TransformerEncoder) for l in small.layers)
    assert small.count_params() < model.count_params()


def test_pruning_reaches_sublayers_in_place_and_the_file_reloads(tmp_path):
    model = _encoder_classifier()
    small, report = kshrink.compress(model, kshrink.Prune(sparsity=0.5, schedule="one_shot",
                                                          skip_first_last=False))
    applied = {r.layer for r in report.steps[0].applied}
    assert {"block/self_attention_layer/query", "block/feedforward_output_dense"} <= applied
    for path in ("block/self_attention_layer/key", "block/feedforward_intermediate_dense"):
        assert abs(_zeros(_inner(small, path)) - 0.5) < 0.02
    assert abs(_zeros(_inner(model, "block/self_attention_layer/key")) - 0.5) > 0.4  # a copy
    x = _tokens()
    reloaded = _reload(small, tmp_path, "pruned")
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), small.predict(x, verbose=0),
                               atol=1e-6)


def test_fine_tuning_keeps_the_zeros_of_sublayers():
    model = _encoder_classifier()
    x, y = _tokens(64), np.random.default_rng(1).integers(0, 3, 64)
    small, _ = kshrink.compress(
        model, kshrink.Prune(sparsity=0.5, schedule="one_shot", skip_first_last=False),
        data=(x, y), fine_tune=kshrink.FineTune(epochs=2, batch_size=16, learning_rate=1e-2))
    for path in ("block/self_attention_layer/value", "block/feedforward_output_dense"):
        layer = _inner(small, path)
        assert _zeros(layer) >= 0.49
        assert layer.kernel.constraint is None  # the training-time hold is gone
    moved = np.abs(keras.ops.convert_to_numpy(_inner(small, "block/feedforward_output_dense")
                                               .kernel) - keras.ops.convert_to_numpy(
        _inner(model, "block/feedforward_output_dense").kernel))
    assert moved.max() > 1e-4  # it trained


def test_a_gradual_schedule_leaves_sublayers_dense_and_says_why():
    model = _encoder_classifier()
    x, y = _tokens(32), np.random.default_rng(1).integers(0, 3, 32)
    _, report = kshrink.compress(model, kshrink.Prune(sparsity=0.5), data=(x, y),
                                 fine_tune=kshrink.FineTune(epochs=1, batch_size=16))
    skipped = {r.layer: r.detail for r in report.steps[0].skipped}
    assert "inside TransformerEncoder 'block'" in skipped["block/self_attention_layer/query"]


def test_clustering_reaches_sublayers_in_place():
    model = _encoder_classifier()
    small, report = kshrink.compress(model, kshrink.Cluster(clusters=8))
    assert "block/self_attention_layer/query" in {r.layer for r in report.steps[0].applied}
    kernel = keras.ops.convert_to_numpy(_inner(small, "block/self_attention_layer/query").kernel)
    assert len(np.unique(kernel)) <= 8
    x = _tokens()
    assert _cosine(model.predict(x, verbose=0), small.predict(x, verbose=0)) > 0.9


class _Opaque(keras.layers.Layer):
    """A container that builds its Dense without passing on its dtype policy."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(8, name="inner")

    def build(self, input_shape):
        self.inner.build(input_shape)

    def call(self, x):
        return self.inner(x)


def test_a_container_that_would_not_reload_quantized_is_left_in_float(tmp_path):
    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(_Opaque(name="opaque")(
        inputs)))
    with keras.saving.CustomObjectScope({"_Opaque": _Opaque}):
        small, report = kshrink.compress(model, kshrink.Quantize(mode="int8"))
        skipped = {r.layer: r.detail for r in report.steps[0].skipped}
        assert "would not reload" in skipped["opaque/inner"]
        x = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")
        reloaded = _reload(small, tmp_path, "opaque")
        np.testing.assert_allclose(reloaded.predict(x, verbose=0), small.predict(x, verbose=0),
                                   atol=1e-6)


def test_compare_takes_dict_inputs_without_labels():
    model = _bert()
    small, _ = kshrink.compress(model, kshrink.Quantize(mode="int8"))
    result = compare(model, small, _bert_inputs(), load_runs=0, latency_runs=2)
    assert result.fidelity.top1_agreement is None  # an encoder: no classes to agree on
    assert result.fidelity.cosine > 0.99
    assert result.original.metrics is None
    assert "cosine similarity of outputs" in result.to_text()


def test_cli_compresses_a_multi_input_model_from_named_arrays(tmp_path, capsys):
    from kshrink.cli import main

    source, recipe, data = tmp_path / "bert.keras", tmp_path / "q.yaml", tmp_path / "d.npz"
    _bert().save(source)
    recipe.write_text("- quantize: {mode: int8}\n")
    np.savez(data, **_bert_inputs())  # one array per input, no labels
    code = main(["compress", str(source), "--recipe", str(recipe), "--data", str(data),
                 "-o", str(tmp_path / "small.keras"), "--layers"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "transformer_layer_0/self_attention_layer/query" in out
    cosine = float(out.split("output cosine ")[1].split(",")[0])  # not a classifier
    assert cosine > 0.99

    np.savez(data, token_ids=_tokens())  # two inputs missing
    code = main(["compress", str(source), "--recipe", str(recipe), "--data", str(data),
                 "-o", str(tmp_path / "other.keras")])
    out, err = capsys.readouterr()
    assert code == 2 and "takes the inputs padding_mask, segment_ids, token_ids" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "other.keras").exists()


def _one_block_encoder():
    """Token and position embedding, then one keras-hub TransformerEncoder named "block"."""
    keras.utils.set_random_seed(0)
    tokens = keras.Input((SEQUENCE,), dtype="int32")
    h = keras_hub.layers.TokenAndPositionEmbedding(VOCABULARY, SEQUENCE, 32, name="embed")(tokens)
    return keras.Model(tokens, keras_hub.layers.TransformerEncoder(128, 2, name="block")(h))


def test_gptq_reaches_the_dense_layers_inside_blocks(tmp_path):
    model = _one_block_encoder()
    calibration, held = _tokens(128, seed=1), _tokens(32, seed=2)
    reference = model.predict(held, verbose=0)

    def quantized(method, group_size=None):
        return kshrink.compress(model, kshrink.Quantize(mode="int4", group_size=group_size,
                                                        method=method, keep_int8=False,
                                                        exclude=kshrink.Select(names=["embed"])),
                                data=calibration, fidelity_samples=0)

    def error(small):
        return np.sum((small.predict(held, verbose=0) - reference) ** 2) / np.sum(reference ** 2)

    rounded, _ = quantized("rtn")
    solved, report = quantized("gptq")
    details = {r.layer: r.detail for r in report.steps[0].applied}
    assert "Keras, GPTQ" in details["block/feedforward_intermediate_dense"]
    assert "Keras, GPTQ" in details["block/self_attention_layer/query"]
    assert error(solved) < 0.6 * error(rounded)  # measured: 0.0013-0.0016 against 0.0032-0.0034
    reloaded = _reload(solved, tmp_path, "gptq")
    np.testing.assert_allclose(reloaded.predict(held, verbose=0), solved.predict(held, verbose=0),
                               atol=1e-5)
    _, grouped = quantized("gptq", group_size=16)
    details = {r.layer: r.detail for r in grouped.steps[0].applied}
    assert "grouped int4 of Dense inside custom layers" in details[
        "block/feedforward_output_dense"]


def test_adaround_fits_each_transformer_layer_as_a_block_and_the_file_reloads(tmp_path):
    model = _bert()
    calibration, held = _bert_inputs(64), _bert_inputs(16)
    held["token_ids"] = _tokens(16, seed=3)
    reference = model.predict(held, verbose=0)["sequence_output"]

    def quantized(method):
        # the embeddings are rounded either way (and would dominate the error): left float
        skip = kshrink.Select(types=["ReversibleEmbedding", "PositionEmbedding", "Embedding"])
        return kshrink.compress(model, kshrink.Quantize(mode="int4", group_size=None,
                                                        method=method, iterations=60,
                                                        calibration_samples=64, exclude=skip),
                                data=calibration, fidelity_samples=0)

    def error(small):
        out = small.predict(held, verbose=0)["sequence_output"]
        return np.sum((out - reference) ** 2) / np.sum(reference ** 2)

    rounded, _ = quantized("rtn")
    learned, report = quantized("adaround")
    step = report.steps[0]
    # one block a transformer layer (the padding mask, read by each, does not join them), and
    # the pooler
    assert "3 blocks fitted" in step.summary
    details = {r.layer: r.detail for r in step.applied}
    assert "Keras, AdaRound" in details["transformer_layer_1/feedforward_intermediate_dense"]
    assert error(learned) < 0.8 * error(rounded)
    reloaded = _reload(learned, tmp_path, "adaround")
    np.testing.assert_allclose(reloaded.predict(held, verbose=0)["sequence_output"],
                               learned.predict(held, verbose=0)["sequence_output"], atol=1e-5)


def test_refit_fits_the_weights_pruned_in_place_inside_blocks():
    model = _one_block_encoder()
    calibration, held = _tokens(64, seed=1), _tokens(32, seed=2)
    reference = model.predict(held, verbose=0)
    options = dict(sparsity=0.5, schedule="one_shot", skip_first_last=False, min_fan_in=0,
                   exclude=kshrink.Select(names=["embed"]))

    def error(small):
        return np.sum((small.predict(held, verbose=0) - reference) ** 2) / np.sum(reference ** 2)

    pruned, _ = kshrink.compress(model, kshrink.Prune(**options), data=calibration,
                                 fidelity_samples=0)
    refit, report = kshrink.compress(model, kshrink.Prune(**options, refit=True, iterations=60),
                                     data=calibration, fidelity_samples=0)
    assert "refit: 1 block fitted" in report.steps[0].summary
    assert error(refit) < 0.7 * error(pruned)  # measured: 0.031 against 0.066 (100 steps)
    for small in (pruned, refit):
        kernel = small.get_layer("block")._feedforward_intermediate_dense.kernel
        assert np.mean(keras.ops.convert_to_numpy(kernel) == 0) == 0.5


def test_gptq_solves_a_top_level_einsum_dense_and_its_file_reloads(tmp_path):
    inputs = keras.Input((6, 16))
    x = keras.layers.EinsumDense("abc,cde->abde", (6, 4, 8), name="heads")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(keras.layers.Flatten()(x)))
    data = np.random.default_rng(0).normal(size=(64, 6, 16)).astype("float32")
    reference = model.predict(data, verbose=0)
    errors = {}
    for method in ("rtn", "gptq"):
        small, report = kshrink.compress(model, kshrink.Quantize(mode="int4", group_size=None,
                                                                 method=method),
                                         data=data, fidelity_samples=0)
        errors[method] = 1 - _cosine(reference, small.predict(data, verbose=0))
    assert "Keras, GPTQ" in report.steps[0].applied[0].detail
    assert errors["gptq"] < 0.8 * errors["rtn"]
    reloaded = _reload(small, tmp_path, "einsum")
    np.testing.assert_allclose(reloaded.predict(data, verbose=0), small.predict(data, verbose=0),
                               atol=1e-6)


def test_sensitivity_ranks_the_layers_inside_blocks():
    report = kshrink.analysis.sensitivity(_bert(), _bert_inputs(16), mode="int4")
    ranked = [entry.layer for entry in report.layers]
    assert "transformer_layer_1/feedforward_output_dense" in ranked
    assert "transformer_layer_0/self_attention_layer/query" in ranked
    assert report.accuracy is None and all(e.accuracy_drop is None for e in report.layers)
    assert all(e.output_error > 0 for e in report.layers)
