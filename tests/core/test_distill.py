"""Layer-wise (feature) distillation: which blocks are matched, the masked loss, a learned map
where widths differ, and that feature distillation brings a pruned encoder's blocks back to the
original's, from inputs alone (random weights, built from config, offline)."""

import subprocess
import sys

import keras
import numpy as np
import pytest

import kshrink
from kshrink.core.distill import LayerwiseDistiller, matched_blocks, squared_error
from kshrink.errors import KshrinkError, RecipeError

keras_hub = pytest.importorskip("keras_hub")

SEQUENCE = 16


def _bert(layers=4, seed=0):
    """A small BERT whose blocks matter: its kernels are scaled up from keras-hub's
    initialization (std 0.02), under which each block barely moves the residual stream and
    pruning one changes nothing."""
    keras.utils.set_random_seed(seed)
    model = keras_hub.models.BertBackbone(vocabulary_size=300, num_layers=layers, num_heads=4,
                                          hidden_dim=32, intermediate_dim=64,
                                          max_sequence_length=SEQUENCE)
    for variable in model.weights:
        if variable.path.startswith("transformer_layer") and variable.name == "kernel":
            variable.assign(variable * 8.0)
    return model


def _tokens(n, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 300, (n, SEQUENCE)).astype("int32")
    lengths = rng.integers(4, SEQUENCE + 1, n)
    mask = (np.arange(SEQUENCE)[None] < lengths[:, None]).astype("int32")
    return {"token_ids": ids * mask, "segment_ids": np.zeros_like(ids), "padding_mask": mask}


def _block_errors(teacher, student, x):
    """Mean squared error of each student transformer block from the teacher's, on real
    tokens."""
    def outputs(model):
        names = [f"transformer_layer_{i}" for i in range(4)]
        probe = LayerwiseDistiller(teacher, model, [(n, n) for n in names])
        return probe.predict(x, verbose=0)[2:]

    mask = x["padding_mask"][..., None]
    return [float(((s - t) ** 2 * mask).sum() / (mask.sum() * s.shape[-1]))
            for s, t in zip(outputs(student), outputs(teacher))]


def test_blocks_removed_by_depth_pruning_are_bridged_by_the_block_before_them(tmp_path):
    teacher = _bert(layers=6)
    kept = {f"transformer_layer_{i}" for i in (0, 2, 3)}
    student, report = kshrink.compress(teacher, kshrink.DepthPrune(
        blocks=3, layers=kshrink.Select(names=sorted(
            {f"transformer_layer_{i}" for i in range(6)} - kept))), data=_tokens(32))
    summary = report.steps[0].summary
    assert all(f"transformer_layer_{i}" in summary for i in (1, 4, 5)), summary
    assert matched_blocks(teacher, student) == [
        ("embeddings_add", "embeddings_add"), ("transformer_layer_0", "transformer_layer_1"),
        ("transformer_layer_2", "transformer_layer_2"),
        ("transformer_layer_3", "transformer_layer_5")]
    # the shallower model is a plain functional model that keras and keras_hub reload
    x = _tokens(4)
    student.save(tmp_path / "small.keras")
    np.savez(tmp_path / "x.npz", **x)
    probe = ("import sys, keras, keras_hub, numpy as np; "
             "m = keras.saving.load_model(sys.argv[1]); x = dict(np.load(sys.argv[2])); "
             "np.save(sys.argv[3], m.predict(x, verbose=0)['sequence_output']); "
             "print('kshrink' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe, tmp_path / "small.keras",
                           tmp_path / "x.npz", tmp_path / "y.npy"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.split() == ["False"], done.stderr[-500:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"),
                               student.predict(x, verbose=0)["sequence_output"], atol=1e-5)


def test_the_loss_ignores_padded_positions():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(2, 5, 3)).astype("float32")
    value = target + rng.normal(size=target.shape).astype("float32")
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], "float32")
    changed = value.copy()
    changed[0, 3:] += 100.0
    changed[1, 4] -= 100.0
    loss = float(squared_error(target, value, mask))
    assert float(squared_error(target, changed, mask)) == pytest.approx(loss, rel=1e-6)
    real = mask.astype(bool)
    assert loss == pytest.approx(float(((value - target)[real] ** 2).mean()), rel=1e-5)


def test_feature_distillation_restores_the_blocks_of_a_pruned_encoder_from_inputs_alone():
    teacher = _bert()
    x, held = _tokens(256), _tokens(64, seed=1)
    pruned = kshrink.compress(teacher, kshrink.StructuredPrune(ratio=0.5))[0]
    tune = dict(epochs=4, batch_size=32, learning_rate=1e-3, verbose=False, seed=0)
    features = kshrink.compress(teacher, kshrink.StructuredPrune(ratio=0.5), data=x,
                                fine_tune=kshrink.FineTune(distill="features", **tune))[0]
    outputs = kshrink.compress(teacher, kshrink.StructuredPrune(ratio=0.5), data=x,
                               fine_tune=kshrink.FineTune(distill="outputs", **tune))[0]
    before = _block_errors(teacher, pruned, held)
    after = _block_errors(teacher, features, held)
    # the blocks' error from their teacher blocks at least halves
    assert sum(after) < 0.5 * sum(before), (before, after)
    # and closer than distilling the final output alone gets the blocks below it
    assert sum(after[:-1]) < sum(_block_errors(teacher, outputs, held)[:-1])


def test_a_narrower_student_block_is_widened_by_a_learned_map():
    def model(width, seed):
        keras.utils.set_random_seed(seed)
        x = keras.Input((6,))
        h = keras.layers.Dense(width, activation="relu", name="a")(x)
        h = keras.layers.Add(name="merge")([h, keras.layers.Dense(width, name="b")(h)])
        return keras.Model(x, keras.layers.Dense(2, name="out")(h))

    teacher, student = model(16, 0), model(8, 1)
    distiller = LayerwiseDistiller(teacher, student, matched_blocks(teacher, student))
    assert [m.units if m else None for m in distiller.maps] == [16]
    x = np.random.default_rng(0).normal(size=(256, 6)).astype("float32")
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = distiller.fit(x, epochs=30, batch_size=64, verbose=0).history["loss"]
    assert history[-1] < 0.5 * history[0]


def test_inputs_without_labels_need_distillation_and_distill_takes_known_values():
    teacher = _bert(layers=2)
    with pytest.raises(KshrinkError, match="fine-tuning needs labels"):
        kshrink.compress(teacher, kshrink.StructuredPrune(ratio=0.5), data=_tokens(8),
                         fine_tune=kshrink.FineTune(epochs=1, verbose=False))
    for bad in ("layers", 1, None):
        with pytest.raises(RecipeError, match="distill must be one of"):
            kshrink.FineTune(distill=bad)
    assert kshrink.FineTune(distill=True).distillation == "outputs"


def _word_ids(texts, length=SEQUENCE):
    """A toy tokenizer: a number per word (from its letters), right-padded."""
    ids = np.zeros((len(texts), length), "int32")
    for row, text in enumerate(texts):
        words = [1 + sum(map(ord, w)) % 299 for w in text.lower().split()][:length]
        ids[row, :len(words)] = words
    return {"token_ids": ids, "segment_ids": np.zeros_like(ids),
            "padding_mask": (ids > 0).astype("int32")}


def test_an_encoder_distills_from_sentences_tokenized_as_training_reads_them():
    teacher = _bert(layers=2)
    words = "the a model layer weight small fast keras file runs loads on data".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, rng.integers(3, 14))) for _ in range(192)]
    data = kshrink.datasets.from_texts(texts, _word_ids, batch_size=32, validation_split=0.25)
    assert len(data.train) == 5 and len(data.test["token_ids"]) == 48
    tune = kshrink.FineTune(epochs=3, learning_rate=1e-3, distill="features", verbose=False,
                            seed=0)
    pruned = kshrink.compress(teacher, kshrink.StructuredPrune(ratio=0.5))[0]
    tuned = kshrink.compress(teacher, kshrink.StructuredPrune(ratio=0.5), data=data.train,
                             fine_tune=tune)[0]
    names = ["transformer_layer_0", "transformer_layer_1"]

    def error(model):
        probe = LayerwiseDistiller(teacher, model, [(n, n) for n in names])
        values = probe.predict(data.test, verbose=0)
        reference = LayerwiseDistiller(teacher, teacher, [(n, n) for n in names]).predict(
            data.test, verbose=0)
        mask = data.test["padding_mask"][..., None]
        return sum(float(((v - r) ** 2 * mask).sum()) for v, r in zip(values[2:], reference[2:]))

    assert error(tuned) < 0.7 * error(pruned)
    with pytest.raises(KshrinkError, match="list of strings"):
        kshrink.datasets.from_texts("one sentence", _word_ids)


@pytest.mark.every_backend
def test_a_depth_pruned_classifier_recovers_with_labels_and_features(digits):
    """With labels, the outputs are distilled as logits next to the label loss, and each
    residual merge the student keeps learns the teacher's (the one before the removed block
    learns the removed block's output)."""
    (x, y), (x_test, y_test) = digits.train, digits.test
    x, x_test = x.reshape(len(x), -1) / 16.0, x_test.reshape(len(x_test), -1) / 16.0
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    h = keras.layers.Dense(32, activation="relu", name="stem")(inputs)
    for i in range(3):
        branch = keras.layers.Dense(32, activation="relu", name=f"branch_{i}")(h)
        h = keras.layers.Add(name=f"merge_{i}")([h, branch])
    teacher = keras.Model(inputs, keras.layers.Dense(10, name="head")(h))
    teacher.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=["accuracy"])
    teacher.fit(x, y, epochs=20, batch_size=64, verbose=0)
    accuracy = teacher.evaluate(x_test, y_test, verbose=0)[1]

    small, report = kshrink.compress(
        teacher, kshrink.DepthPrune(blocks=1, layers=kshrink.Select(names=("merge_1",))),
        data=(x, y), fine_tune=kshrink.FineTune(epochs=10, batch_size=64, distill="features",
                                                verbose=False, seed=0))
    assert matched_blocks(teacher, small) == [("merge_0", "merge_1"), ("merge_2", "merge_2")]
    predicted = np.argmax(small.predict(x_test, verbose=0), axis=1)
    assert np.mean(predicted == y_test) >= accuracy - 0.03


def test_frozen_layers_keep_their_weights_while_the_rest_learns():
    teacher = _bert(layers=2)
    freeze = kshrink.Select(types=("ReversibleEmbedding",))
    small = kshrink.compress(
        teacher, kshrink.StructuredPrune(ratio=0.5), data=_tokens(64),
        fine_tune=kshrink.FineTune(epochs=1, batch_size=32, distill="features", freeze=freeze,
                                   verbose=False))[0]

    def weights(model, name):
        return [np.asarray(w) for w in model.get_layer(name).weights]

    for a, b in zip(weights(teacher, "token_embedding"), weights(small, "token_embedding")):
        np.testing.assert_array_equal(a, b)
    assert all(layer.trainable for layer in small.layers)  # frozen only while training
    assert not np.allclose(weights(teacher, "position_embedding")[0],
                           weights(small, "position_embedding")[0])
    recipe = kshrink.Recipe.from_yaml(
        "steps: [fold]\nfine_tune: {distill: features, freeze: {types: [Embedding]}}\n")
    assert recipe.fine_tune.freeze == kshrink.Select(types=("Embedding",))
    assert kshrink.FineTune(freeze="embeddings").freeze == kshrink.Select(pattern="embeddings")
    with pytest.raises(RecipeError, match="fine_tune: freeze must be a selection"):
        kshrink.FineTune(freeze=5)
