"""Facts about keras-hub's transformer blocks: which layer is one, and the stock Keras layers
it is made of (keras-hub 0.32)."""

from __future__ import annotations

ENCODER_PARTS = ("_self_attention_layer", "_self_attention_layer_norm",
                 "_self_attention_dropout", "_feedforward_layer_norm",
                 "_feedforward_intermediate_dense", "_feedforward_output_dense",
                 "_feedforward_dropout")


def is_encoder(layer) -> bool:
    """True for keras-hub's `TransformerEncoder` (its class, not a subclass, whose layout may
    differ)."""
    return type(layer).__name__ == "TransformerEncoder" and type(layer).__module__.startswith(
        "keras_hub.")
