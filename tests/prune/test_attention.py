"""Structured pruning of transformers: attention heads and feed-forward units of keras-hub
encoders and stock MultiHeadAttention layers removed whole, weights sliced (random weights,
built from config, offline)."""

import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest

import kshrink
from kshrink.measure import macs

keras_hub = pytest.importorskip("keras_hub")

SEQUENCE = 12
VOCABULARY = 200


def _tokens(n=8):
    return np.random.default_rng(0).integers(1, VOCABULARY, (n, SEQUENCE)).astype("int32")


def _kill(block, head, every=4):
    """Zeroes the output rows of one head and of every `every`-th feed-forward unit: what
    importance ranks last, and removing it must leave the outputs as they are."""
    attention = block if isinstance(block, keras.layers.MultiHeadAttention) else \
        block._self_attention_layer
    kernel = np.array(attention.output_dense.kernel)
    kernel[head] = 0
    attention.output_dense.kernel.assign(kernel)
    if attention is not block:
        dense = block._feedforward_output_dense
        kernel = np.array(dense.kernel)
        kernel[::every] = 0
        dense.kernel.assign(kernel)


def _encoders():
    keras.utils.set_random_seed(0)
    tokens = keras.Input((SEQUENCE,), dtype="int32", name="tokens")
    h = keras_hub.layers.TokenAndPositionEmbedding(VOCABULARY, SEQUENCE, 32, name="embed")(tokens)
    h = keras_hub.layers.TransformerEncoder(64, num_heads=4, name="post")(h)
    h = keras_hub.layers.TransformerEncoder(64, num_heads=4, normalize_first=True, name="pre")(h)
    h = keras.layers.MultiHeadAttention(4, 8, name="mha")(h, h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(tokens, keras.layers.Dense(3, name="head")(h))
    for name, head in (("post", 1), ("pre", 3), ("mha", 0)):
        _kill(model.get_layer(name), head)
    return model


def _heads(model):
    return {layer.name: layer.num_heads for layer in model.layers
            if isinstance(layer, keras.layers.MultiHeadAttention)}


def test_heads_and_units_go_exactly_and_the_file_reloads(tmp_path):
    model = _encoders()
    x = _tokens()
    small, report = kshrink.compress(model, kshrink.StructuredPrune(ratio=0.25))
    assert _heads(small) == {"post_self_attention_layer": 3, "pre_self_attention_layer": 3,
                             "mha": 3}
    assert small.get_layer("post_feedforward_intermediate_dense").units == 48
    # the dead heads and units went, so the outputs are the same
    np.testing.assert_allclose(small.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-5)
    assert macs(small).total <= 0.8 * macs(model).total
    detail = {r.layer: r.detail for r in report.steps[0].layers}
    assert detail["post/self_attention_layer/query"] == "4 -> 3 heads"
    assert detail["pre/feedforward_intermediate_dense"] == "64 -> 48 feed-forward units"
    assert "hidden size stays" in detail["post/feedforward_layer_norm"]

    small.save(tmp_path / "small.keras")
    probe = ("import sys, keras, numpy as np; m = keras.saving.load_model(sys.argv[1]); "
             "np.save(sys.argv[2], m.predict(np.load(sys.argv[3]), verbose=0)); "
             "print('kshrink' in sys.modules)")
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run([sys.executable, "-c", probe, tmp_path / "small.keras",
                           tmp_path / "y.npy", tmp_path / "x.npy"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), small.predict(x, verbose=0),
                               atol=1e-6)


def test_a_backbone_with_padding_becomes_a_functional_model_of_its_layers():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCABULARY, num_layers=2, num_heads=4, hidden_dim=32,
        intermediate_dim=64, max_sequence_length=SEQUENCE)
    for block in backbone.transformer_layers:
        _kill(block, 2)
    tokens = _tokens()
    x = {"token_ids": tokens, "segment_ids": np.zeros_like(tokens),
         "padding_mask": (np.arange(SEQUENCE) < 9).astype("int32")[None].repeat(len(tokens), 0)}
    small, report = kshrink.compress(backbone, kshrink.StructuredPrune(ratio=0.25))
    assert "BertBackbone became a functional model" in report.steps[0].summary
    assert set(_heads(small).values()) == {3}
    before, after = backbone.predict(x, verbose=0), small.predict(x, verbose=0)
    for key in ("sequence_output", "pooled_output"):
        np.testing.assert_allclose(after[key], before[key], atol=1e-5)
    assert macs(small, SEQUENCE).total <= 0.8 * macs(backbone, SEQUENCE).total


def test_blocks_left_out_keep_their_heads_and_say_why():
    model = _encoders()
    small, report = kshrink.compress(model, kshrink.StructuredPrune(
        ratio=0.5, exclude=kshrink.Select(names=["pre"])))
    assert small.get_layer("pre").num_heads == 4  # the keras-hub block itself, untouched
    assert _heads(small) == {"post_self_attention_layer": 2, "mha": 2}

    keras.utils.set_random_seed(0)
    tokens = keras.Input((SEQUENCE,), dtype="int32")
    h = keras_hub.layers.TokenAndPositionEmbedding(VOCABULARY, SEQUENCE, 32)(tokens)
    shared = keras_hub.layers.TransformerEncoder(64, num_heads=4, name="shared")
    h = shared(shared(h))
    twice = keras.Model(tokens, h)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same, report = kshrink.compress(twice, kshrink.StructuredPrune(ratio=0.5))
    assert same.get_layer("shared").num_heads == 4
    reasons = {r.layer: r.detail for r in report.steps[0].layers}
    assert "called more than once" in reasons["shared/self_attention_layer/query"]
