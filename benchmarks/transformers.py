"""Quantizing keras-hub transformers: kshrink's `Quantize` against Keras' own `model.quantize`,
side by side on the same models in the same run.

Models (built from config, random weights, offline; the two tools see the same weights):
- `bert_minilm`: a `BertBackbone` the size of a MiniLM-L6 sentence encoder (6 layers, hidden
  384, 12 heads, feed-forward 1536, vocabulary 30,522: 22.7M parameters);
- `encoder_classifier`: a plain functional model around keras-hub blocks
  (`TokenAndPositionEmbedding`, 4 `TransformerEncoder`s, a Dense head), as users write them.

For each: fp32 weight bytes over quantized weight bytes (as `kshrink.measure` counts them),
the `.keras` file size, mean cosine of the outputs against float on 64 random token
sequences, whether the saved file reloads with the same outputs, and the seconds taken. For
kshrink's rows also the compact `.kshrink` file, and the load time and resident memory of
both files (median of 3 fresh processes, over a process that only imported Keras).

Run: .venv/bin/python benchmarks/transformers.py
"""

import tempfile
import time
import warnings
from pathlib import Path

import keras
import keras_hub
import numpy as np
from common import write_rows

import kshrink
from kshrink.core.graph import copy_model
from kshrink.measure import load_cost, weight_stats

SEQUENCE = 128
VOCABULARY = 30522


def bert_minilm():
    return keras_hub.models.BertBackbone(
        vocabulary_size=VOCABULARY, num_layers=6, num_heads=12, hidden_dim=384,
        intermediate_dim=1536, max_sequence_length=512)


def encoder_classifier():
    tokens = keras.Input((SEQUENCE,), dtype="int32")
    h = keras_hub.layers.TokenAndPositionEmbedding(VOCABULARY, SEQUENCE, 256)(tokens)
    for _ in range(4):
        h = keras_hub.layers.TransformerEncoder(1024, num_heads=8)(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(tokens, keras.layers.Dense(4)(h))


MODELS = {"bert_minilm": bert_minilm, "encoder_classifier": encoder_classifier}


def inputs(model, n=64, seed=0):
    tokens = np.random.default_rng(seed).integers(1, VOCABULARY, (n, SEQUENCE)).astype("int32")
    if len(model.inputs) == 1:
        return tokens
    return {"token_ids": tokens, "segment_ids": np.zeros_like(tokens),
            "padding_mask": np.ones_like(tokens)}


def outputs(model, x):
    return np.concatenate([np.reshape(o, (len(o), -1)) for o in keras.tree.flatten(
        model.predict(x, batch_size=16, verbose=0))], axis=1).astype("float64")


def cosine(a, b):
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1)
                                            * np.linalg.norm(b, axis=1))))


def by_keras(model, mode):
    model = copy_model(model)  # model.quantize works in place
    config = (keras.quantizers.Int8QuantizationConfig() if mode == "int8"
              else keras.quantizers.Int4QuantizationConfig(block_size=128))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.quantize(config=config)
    return model


def by_kshrink(model, mode):
    return kshrink.compress(model, kshrink.Quantize(mode=mode))[0]


def row(name, tool, mode, model, small, x, reference, seconds):
    result = {"model": name, "tool": tool, "mode": mode, "seconds": round(seconds, 1),
              "weight_ratio": weight_stats(model).bytes / weight_stats(small).bytes}
    expected = outputs(small, x)
    result["cosine"] = cosine(reference, expected)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.keras"
        small.save(path)
        result["file_mb"] = path.stat().st_size / 1e6
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reloaded = keras.saving.load_model(path)
            result["reload_max_diff"] = float(np.abs(outputs(reloaded, x) - expected).max())
        except Exception as e:  # noqa: BLE001 - Keras' own file may not reload: a result
            result["reload_error"] = " ".join(str(e).split())[:160]
        if tool == "kshrink":
            compact = Path(tmp) / "model.kshrink"
            kshrink.save(small, compact)
            result["kshrink_file_mb"] = compact.stat().st_size / 1e6
            for suffix, file, loader in (("keras", path, "keras"), ("kshrink", compact, "kshrink")):
                cost = load_cost(file, runs=3, loader=loader)
                result[f"{suffix}_load_s"] = round(cost.seconds, 3)
                result[f"{suffix}_load_mb"] = round(cost.resident_bytes / 1e6, 1)
    return result


def main():
    rows = []
    for name, build in MODELS.items():
        keras.utils.set_random_seed(0)
        model = build()
        x = inputs(model)
        reference = outputs(model, x)
        with tempfile.TemporaryDirectory() as tmp:
            model.save(Path(tmp) / "float.keras")
            float_mb = (Path(tmp) / "float.keras").stat().st_size / 1e6
        rows.append({"model": name, "tool": "float", "mode": "float32",
                     "parameters": model.count_params(), "file_mb": float_mb})
        print(rows[-1], flush=True)
        for mode in ("int8", "int4"):
            for tool, quantize in (("keras", by_keras), ("kshrink", by_kshrink)):
                start = time.perf_counter()
                small = quantize(model, mode)
                rows.append(row(name, tool, mode, model, small, x, reference,
                                time.perf_counter() - start))
                print(rows[-1], flush=True)
    write_rows("transformers", rows)


if __name__ == "__main__":
    main()
