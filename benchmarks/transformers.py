"""Compressing keras-hub transformers: kshrink's `Quantize` against Keras' own
`model.quantize`, side by side on the same models in the same run, and kshrink's structured
pruning of attention heads and feed-forward units.

Models (offline; the two tools see the same weights):
- `minilm_pretrained`: the real all-MiniLM-L6-v2 sentence encoder, ported into a keras-hub
  `BertBackbone` (`pretrained.minilm`), on real sentences (standard-library docstrings,
  tokenized by its own tokenizer);
- `bert_minilm`: a `BertBackbone` of the same size built from config with random weights
  (6 layers, hidden 384, 12 heads, feed-forward 1536, vocabulary 30,522: 22.7M parameters);
- `encoder_classifier`: a plain functional model around keras-hub blocks
  (`TokenAndPositionEmbedding`, 4 `TransformerEncoder`s, a Dense head), as users write them.

Quantization rows: fp32 weight bytes over quantized weight bytes (as `kshrink.measure`
counts them), the `.keras` file size, mean cosine of the outputs against float on 64 token
sequences (for the pretrained encoder also of its sentence embeddings), whether the saved
file reloads with the same outputs, and the seconds taken. For kshrink's rows also the
compact `.kshrink` file, whether `kshrink.load` gives the same outputs, and the load time and
resident memory of both files (median of 3 fresh processes, over one that only imported
Keras).

Structured rows (`StructuredPrune(ratio=0.25)`: a quarter of the heads and of the
feed-forward units): MACs at 128 tokens, batch-32 latency against float (timed in alternating
rounds), cosine, and whether the `.keras` file loads in a fresh process importing only keras
and keras_hub with the same outputs. Calibrated rows on the pretrained encoder run the steps
that take calibration data as a dict of inputs (128 other sentences).

Export rows (`--export`, the pretrained encoder only): float, kshrink int8 weights and
kshrink int4 weights (GPTQ per channel, token embeddings int8) exported to LiteRT and ONNX
with `quantization='auto'`; each file's sentence embeddings against the Keras model it came
from on the 64 held-out sentences, its bytes, how many kernels it keeps code for code, and
batch-1 and batch-32 latency against Keras float (timed in alternating rounds).

Run: .venv/bin/python benchmarks/transformers.py [--models minilm_pretrained ...] [--export]
"""

import argparse
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import keras
import keras_hub
import numpy as np
import pretrained
from common import median, replace_rows, write_rows

import kshrink
from kshrink.core.graph import copy_model
from kshrink.measure import load_cost, macs, weight_stats
from kshrink.measure.latency import latency_in_turns

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


MODELS = {"minilm_pretrained": pretrained.minilm, "bert_minilm": bert_minilm,
          "encoder_classifier": encoder_classifier}


def inputs(name, model, n=64, seed=0):
    """`n` inputs: real sentences for the pretrained encoder (`seed` picks which), random
    tokens otherwise."""
    if name == "minilm_pretrained":
        texts = pretrained.sentences(n * (seed + 1))[n * seed:]
        return pretrained.tokenize(texts, SEQUENCE)
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


def sentence_cosine(name, model, small, x):
    if name != "minilm_pretrained":
        return {}
    embed = [pretrained.sentence_embeddings(m.predict(x, batch_size=16, verbose=0),
                                            x["padding_mask"]) for m in (model, small)]
    return {"sentence_cosine": float(np.mean(np.sum(embed[0] * embed[1], 1)))}


def row(name, tool, mode, model, small, x, reference, seconds):
    result = {"model": name, "tool": tool, "mode": mode, "seconds": round(seconds, 1),
              "weight_ratio": weight_stats(model).bytes / weight_stats(small).bytes}
    expected = outputs(small, x)
    result["cosine"] = cosine(reference, expected)
    result.update(sentence_cosine(name, model, small, x))
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
            result["kshrink_reload_max_diff"] = float(
                np.abs(outputs(kshrink.load(compact), x) - expected).max())
            for suffix, file, loader in (("keras", path, "keras"), ("kshrink", compact, "kshrink")):
                cost = load_cost(file, runs=3, loader=loader)
                result[f"{suffix}_load_s"] = round(cost.seconds, 3)
                result[f"{suffix}_load_mb"] = round(cost.resident_bytes / 1e6, 1)
    return result


# Loads a .keras file in a process that imports only keras and keras_hub, and saves its
# outputs on the saved inputs.
_PLAIN_LOAD = """
import sys, keras, keras_hub, numpy as np
model = keras.saving.load_model(sys.argv[1])
x = dict(np.load(sys.argv[2]))
x = x["x"] if list(x) == ["x"] else x
out = model.predict(x, batch_size=16, verbose=0)
np.savez(sys.argv[3], *keras.tree.flatten(out))
print("kshrink" in sys.modules)
"""


def plain_reload_diff(small, x, expected) -> float:
    """Max difference between `small`'s outputs and those of its `.keras` file loaded with
    keras and keras_hub alone (raises if kshrink was needed)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small.save(tmp / "model.keras")
        np.savez(tmp / "x.npz", **(x if isinstance(x, dict) else {"x": x}))
        done = subprocess.run([sys.executable, "-c", _PLAIN_LOAD, tmp / "model.keras",
                               tmp / "x.npz", tmp / "y.npz"], capture_output=True, text=True)
        if done.returncode != 0 or done.stdout.split()[-1:] != ["False"]:
            raise RuntimeError(f"plain load failed: {done.stderr[-300:]}")
        with np.load(tmp / "y.npz") as saved:
            got = np.concatenate([np.reshape(saved[k], (len(saved[k]), -1))
                                  for k in sorted(saved, key=lambda k: int(k.split("_")[1]))],
                                 axis=1)
    return float(np.abs(got - expected).max())


def structured_row(name, model, x, reference):
    start = time.perf_counter()
    small, _ = kshrink.compress(model, kshrink.StructuredPrune(ratio=0.25))
    seconds = time.perf_counter() - start
    expected = outputs(small, x)
    timings = [latency_in_turns([model, small], [x, x], batch_sizes=(32,), runs=10, rounds=5)
               for _ in range(3)]
    float_ms = median([t[0][0].median_ms for t in timings])
    small_ms = median([t[1][0].median_ms for t in timings])
    result = {"model": name, "tool": "kshrink", "mode": "heads+ffn 25%",
              "seconds": round(seconds, 1),
              "parameters_ratio": model.count_params() / small.count_params(),
              "macs_cut": 1 - macs(small, SEQUENCE).total / macs(model, SEQUENCE).total,
              "float_batch32_ms": round(float_ms, 1), "batch32_ms": round(small_ms, 1),
              "speedup_batch32": float_ms / small_ms, "cosine": cosine(reference, expected),
              "plain_reload_max_diff": plain_reload_diff(small, x, expected)}
    result.update(sentence_cosine(name, model, small, x))
    return result


EMBEDDINGS_INT8 = {"layers": {"types": ["Embedding"]}, "mode": "int8"}


def calibrated_rows(name, model, x, reference):
    """The steps that take calibration data, given as a dict of inputs."""
    calibration = inputs(name, model, n=128, seed=1)
    rows = []
    for mode, step in (("low rank, tolerance 0.2", kshrink.LowRank(tolerance=0.2)),
                       ("int8, 8-bit activations",
                        kshrink.Quantize(mode="int8", activation_bits=8)),
                       ("int4 per channel, GPTQ",
                        kshrink.Quantize(mode="int4", group_size=None, method="gptq")),
                       ("int4 per channel, AdaRound (300 steps a block)",
                        kshrink.Quantize(mode="int4", group_size=None, method="adaround",
                                         iterations=300)),
                       # the token embeddings (a third of MiniLM's weights) kept at int8
                       ("int4 per channel, GPTQ, embeddings int8",
                        kshrink.Quantize(mode="int4", group_size=None, method="gptq",
                                         overrides=[EMBEDDINGS_INT8])),
                       ("int4 per channel, AdaRound (300 steps a block), embeddings int8",
                        kshrink.Quantize(mode="int4", group_size=None, method="adaround",
                                         iterations=300, overrides=[EMBEDDINGS_INT8]))):
        start = time.perf_counter()
        small, report = kshrink.compress(model, step, data=calibration)
        rows.append({"model": name, "tool": "kshrink", "mode": mode,
                     "seconds": round(time.perf_counter() - start, 1),
                     "weight_ratio": weight_stats(model).bytes / weight_stats(small).bytes,
                     "cosine": cosine(reference, outputs(small, x)),
                     "summary": report.steps[0].summary or "",
                     **sentence_cosine(name, model, small, x)})
        print(rows[-1], flush=True)
    return rows


def export_rows():
    """The pretrained MiniLM and its int8 and int4 forms in LiteRT and ONNX Runtime."""
    from kshrink.deploy import Runtime, export

    name = "minilm_pretrained"
    keras.utils.set_random_seed(0)
    model = MODELS[name]()
    x, calibration = inputs(name, model), inputs(name, model, n=128, seed=1)
    sources = {
        "float": model,
        "kshrink int8 weights": kshrink.compress(model, kshrink.Quantize(mode="int8"))[0],
        "kshrink int4 weights": kshrink.compress(model, kshrink.Quantize(
            mode="int4", group_size=None, method="gptq", overrides=[EMBEDDINGS_INT8]),
            data=calibration)[0]}
    rows, runners = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for runtime, suffix in (("LiteRT", ".tflite"), ("ONNX Runtime", ".onnx")):
            for variant, source in sources.items():
                report = export(source, Path(tmp) / f"{variant.replace(' ', '_')}{suffix}",
                                data=calibration, samples=64)
                print(report, flush=True)
                runner = runners[(runtime, variant)] = Runtime(report.path)
                want = source.predict(x, batch_size=16, verbose=0)
                got = dict(zip(sorted(want), runner.run(x)))  # both by output name
                embeddings = [pretrained.sentence_embeddings(o, x["padding_mask"])
                              for o in (got, want)]
                kept = [w for w in report.weights.values() if w.startswith("int")]
                rows.append({"model": name, "runtime": runtime, "variant": variant,
                             "file_bytes": report.file_bytes,
                             "sentence_cosine_vs_keras": round(float(np.mean(np.sum(
                                 embeddings[0] * embeddings[1], 1))), 5),
                             "kernels_kept": f"{len(kept)} of {len(report.weights)}"
                                             if report.weights else None})
        timings = latency_in_turns([model, *runners.values()], [x] * (len(runners) + 1),
                                   runs=10, rounds=3)
    base = {t.batch_size: t.median_ms for t in timings[0]}
    for row, found in zip(rows, timings[1:]):
        times = {t.batch_size: t.median_ms for t in found}
        row.update({"latency_b1_ms": round(times[1], 2), "latency_b32_ms": round(times[32], 2),
                    "speedup_b1": round(base[1] / times[1], 2),
                    "speedup_b32": round(base[32] / times[32], 2)})
        print(row, flush=True)
    return rows


HELD_OUT = 256  # sentences the distillation rows score on; they train on the others
SHRINK = {
    "heads+ffn 25%": lambda: kshrink.StructuredPrune(ratio=0.25),
    "heads+ffn 50%": lambda: kshrink.StructuredPrune(ratio=0.5),
    "6 -> 3 layers": lambda: kshrink.DepthPrune(
        blocks=3, layers=kshrink.Select(pattern="transformer_layer_.*"),
        calibration_samples=512),
    "low rank, tolerance 0.1": lambda: kshrink.LowRank(tolerance=0.1),
}
RECOVERY = ("none", "outputs", "features")


def retrieval(original, small):
    """Share of sentences whose embedding by `small` is nearest (cosine) to the original
    model's embedding of the same sentence, among the original's embeddings of all."""
    return float(np.mean(np.argmax(small @ original.T, axis=1) == np.arange(len(small))))


def distill_rows(shrinks, recoveries, epochs, learning_rate, train_tokens=64,
                 freeze_tokens=False, train_sentences=None):
    """The pretrained MiniLM made smaller by each of `shrinks`, then recovered each way of
    `recoveries` (no training; distilling its outputs; distilling its blocks' outputs too)
    for `epochs` over the standard-library sentences not held out, cut or padded to
    `train_tokens` (the median sentence has 18, one in 20 more than 48), with the token table
    held as it is if `freeze_tokens`."""
    name = "minilm_pretrained"
    keras.utils.set_random_seed(0)
    model = MODELS[name]()
    texts = pretrained.sentences()
    texts = texts[:HELD_OUT + train_sentences] if train_sentences else texts
    held = pretrained.tokenize(texts[:HELD_OUT], SEQUENCE)
    data = kshrink.datasets.from_texts(
        texts[HELD_OUT:], lambda t: pretrained.tokenize(t, train_tokens), batch_size=32,
        validation_split=0.0)
    original = pretrained.sentence_embeddings(model.predict(held, batch_size=32, verbose=0),
                                              held["padding_mask"])
    rows = []
    for shrink in shrinks:
        for recovery in recoveries:
            tune = None if recovery == "none" else kshrink.FineTune(
                epochs=epochs, batch_size=32, learning_rate=learning_rate,
                distill=recovery, seed=0,
                freeze=kshrink.Select(names=("token_embedding",)) if freeze_tokens else None)
            start = time.perf_counter()
            small, report = kshrink.compress(model, SHRINK[shrink](), data=data.train,
                                             fine_tune=tune)
            seconds = time.perf_counter() - start
            embedded = pretrained.sentence_embeddings(
                small.predict(held, batch_size=32, verbose=0), held["padding_mask"])
            timings = [latency_in_turns([model, small], [held, held], batch_sizes=(32,),
                                        runs=5, rounds=3) for _ in range(3)]
            float_ms = median([t[0][0].median_ms for t in timings])
            small_ms = median([t[1][0].median_ms for t in timings])
            rows.append({
                "model": name, "shrink": shrink, "recovery": recovery,
                "epochs": epochs if tune else 0,
                "learning_rate": learning_rate if tune else None,
                "train_sentences": len(texts) - HELD_OUT,
                "train_tokens": train_tokens, "frozen_tokens": freeze_tokens,
                "held_out": HELD_OUT, "seconds": round(seconds, 1),
                "parameters_ratio": model.count_params() / small.count_params(),
                "sentence_cosine": round(float(np.mean(np.sum(original * embedded, 1))), 4),
                "retrieval_top1": round(retrieval(original, embedded), 4),
                "speedup_batch32": round(float_ms / small_ms, 2),
                "plain_reload_max_diff": plain_reload_diff(small, held, outputs(small, held)),
                "summary": report.steps[0].summary or ""})
            print(rows[-1], flush=True)
            same = {"shrink": None, "recovery": None, "epochs": None, "train_tokens": 64,
                    "frozen_tokens": False,
                    "learning_rate": 5e-4 if tune else None}  # a row's key; old rows' defaults
            replace_rows("transformers", rows[-1:], lambda r, last=rows[-1]: all(
                r.get(k, default) == last[k] for k, default in same.items()))
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--calibrated", action="store_true",
                        help="only the pretrained MiniLM's calibrated rows (replaces them)")
    parser.add_argument("--export", action="store_true",
                        help="only the pretrained MiniLM's export rows (replaces them)")
    parser.add_argument("--distill", nargs="+", choices=list(SHRINK),
                        help="only the pretrained MiniLM's distillation rows for these "
                             "(each row replaced as it is measured)")
    parser.add_argument("--recovery", nargs="+", choices=RECOVERY, default=list(RECOVERY))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--train-tokens", type=int, default=64,
                        help="tokens each training sentence is cut or padded to")
    parser.add_argument("--freeze-tokens", action="store_true",
                        help="hold the token table as it is while distilling")
    parser.add_argument("--train-sentences", type=int,
                        help="train on this many sentences only (a quick trial)")
    args = parser.parse_args()
    if args.distill:
        distill_rows(args.distill, args.recovery, args.epochs, args.learning_rate,
                     args.train_tokens, args.freeze_tokens, args.train_sentences)
        return
    if args.export:
        rows = export_rows()
        replace_rows("transformers", rows, lambda r: "runtime" in r)
        return
    if args.calibrated:
        name = "minilm_pretrained"
        keras.utils.set_random_seed(0)
        model = MODELS[name]()
        x = inputs(name, model)
        rows = calibrated_rows(name, model, x, outputs(model, x))
        replace_rows("transformers", rows, lambda r: r["model"] == name and "summary" in r)
        return
    rows = []
    for name in args.models:
        keras.utils.set_random_seed(0)
        model = MODELS[name]()
        x = inputs(name, model)
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
        rows.append(structured_row(name, model, x, reference))
        print(rows[-1], flush=True)
        if name == "minilm_pretrained":
            rows += calibrated_rows(name, model, x, reference)
    if set(args.models) == set(MODELS):
        write_rows("transformers", rows)
    else:
        replace_rows("transformers", rows, lambda r: r["model"] in args.models)


if __name__ == "__main__":
    main()
