"""Deployment runtimes: the same models in Keras, LiteRT and ONNX Runtime.

For LeNet-5 (MNIST) and the residual CNN (Fashion-MNIST), from the trained float model:
- Keras float32 (`predict_on_batch`, TensorFlow backend): the reference;
- LiteRT float, LiteRT with kshrink's int8 weights kept (export quantization "auto", which is
  "weights", of a `Quantize(mode="int8")` model), with kshrink's int4 weights kept (GPTQ, one
  scale per channel, first and last layers int8), LiteRT full int8 (calibrated on
  `--calibration` training images), and full int8 of the int4 model, whose Dense layers
  keep their int4 weights (int8 activations);
- Keras QAT: `Quantize(mode="int8", activation_bits=8, qat=True)` fine-tuned `--qat-epochs`
  epochs, and its LiteRT full int8 export, which uses the QAT model's own input ranges;
- ONNX Runtime float, with kshrink's int8 and int4 weights (DequantizeLinear), and QDQ int8
  (static: from the float model calibrated on the training images, and from the QAT
  model with its own ranges).

Reports file size, test accuracy (the whole test set through the runtime) and latency at batch
1 and 32: the variants of a model are timed in turns (`--rounds` rounds of `--runs` calls),
each figure the median over rounds, with ratios against Keras float in the same run.

`--pretrained`: the real EfficientNet-Lite0 (ImageNet weights from a package) instead: float,
kshrink int8 weights, kshrink int4 weights (GPTQ on 54 photo crops, one scale per channel;
first, last and depthwise layers int8, and with `keep_int8=False` every layer int4) and full
int8, in both runtimes; each file against the Keras model
it came from on 200 views of 20 ImageNet photos: mean cosine of the logits, top-1 agreement,
the largest difference, how many kernels the file keeps code for code.
`--sparse`: LeNet-300-100 (MNIST) pruned to 92% and shared among 16 values (one epoch of
fine-tuning), its float LiteRT and ONNX files (pruned kernels stored sparse) against the dense
model's, and its `.kshrink` and `.keras` files; test accuracy through each.
Run: .venv/bin/python benchmarks/export.py [--rounds 5] [--runs 50] [--pretrained | --sparse]
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
from common import median, replace_rows

import kshrink
from kshrink.deploy import Runtime, export
from kshrink.measure import evaluate, file_size, latency
from kshrink.measure.latency import latency_in_turns

MODELS = {"lenet5": "mnist", "resnet_fashion": "fashion_mnist"}


def accuracy(runtime, x, y, batch=500) -> float:
    predictions = np.concatenate([runtime(x[i:i + batch]) for i in range(0, len(x), batch)])
    return float(np.mean(predictions.argmax(1) == y))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--qat-epochs", type=int, default=1)
    parser.add_argument("--pretrained", action="store_true")
    parser.add_argument("--sparse", action="store_true")
    args = parser.parse_args()
    if args.sparse:
        replace_rows("export", sparse_rows(), lambda row: row["model"] == "lenet_300_100")
        return
    if args.pretrained:
        rows = efficientnet_rows(args)
        replace_rows("export", rows, lambda row: row["model"] == "efficientnet_lite0")
        return
    rows = []
    for name, dataset in MODELS.items():
        data = kshrink.datasets.load(dataset)
        model = kshrink.zoo.pretrained(name)
        int8, _ = kshrink.compress(model, kshrink.Quantize(mode="int8"))
        int4, _ = kshrink.compress(model, kshrink.Quantize(mode="int4", group_size=None,
                                                           method="gptq"), data=data.train)
        qat, _ = kshrink.compress(
            model, kshrink.Quantize(mode="int8", activation_bits=8, qat=True), data=data.train,
            fine_tune=kshrink.FineTune(epochs=args.qat_epochs, learning_rate=1e-4))
        x_test, y_test = data.test
        with tempfile.TemporaryDirectory() as tmp:
            exports = {
                "LiteRT float": (model, "float.tflite", "none"),
                "LiteRT, kshrink int8 weights": (int8, "int8w.tflite", "auto"),
                "LiteRT, kshrink int4 weights": (int4, "int4w.tflite", "auto"),
                "LiteRT full int8": (model, "int8.tflite", "int8"),
                "LiteRT full int8, from the QAT model": (qat, "qat.tflite", "int8"),
                "LiteRT full int8, from the int4 model (int4 Dense)": (int4, "a8w4.tflite",
                                                                       "int8"),
                "ONNX Runtime float": (model, "float.onnx", "none"),
                "ONNX Runtime, kshrink int8 weights": (int8, "int8w.onnx", "auto"),
                "ONNX Runtime, kshrink int4 weights": (int4, "int4w.onnx", "auto"),
                "ONNX Runtime QDQ int8": (model, "int8.onnx", "int8"),
                "ONNX Runtime QDQ int8, from the QAT model": (qat, "qat.onnx", "int8"),
            }
            model.save(Path(tmp) / "float.keras")
            qat.save(Path(tmp) / "qat.keras")
            runners, reports = {"Keras float": model, "Keras QAT int8": qat}, {}
            sizes = {"Keras float": file_size(Path(tmp) / "float.keras").bytes,
                     "Keras QAT int8": file_size(Path(tmp) / "qat.keras").bytes}
            for variant, (source, file, quantization) in exports.items():
                report = export(source, Path(tmp) / file, quantization=quantization,
                                data=data.train, samples=args.calibration)
                print(report, flush=True)
                runners[variant], sizes[variant] = Runtime(report.path), report.file_bytes
                reports[variant] = report
            samples = {variant: {1: [], 32: []} for variant in runners}
            for _ in range(args.rounds):
                for variant, runner in runners.items():
                    for t in latency(runner, x_test[:64], runs=args.runs):
                        samples[variant][t.batch_size].append(t.median_ms)
            times = {v: {b: median(s) for b, s in by.items()} for v, by in samples.items()}
            base = times["Keras float"]
            for variant, runner in runners.items():
                if variant.startswith("Keras"):
                    acc = evaluate(runner, x_test, y_test)["accuracy"]
                else:
                    acc = accuracy(runner, x_test, y_test)
                rows.append({
                    "model": name, "variant": variant,
                    "file_bytes": sizes[variant],
                    "quantization": reports[variant].quantization if variant in reports else None,
                    "test_accuracy": acc,
                    "latency_b1_ms": round(times[variant][1], 4),
                    "latency_b32_ms": round(times[variant][32], 4),
                    "speedup_b1": round(base[1] / times[variant][1], 2),
                    "speedup_b32": round(base[32] / times[variant][32], 2),
                })
                print(rows[-1], flush=True)
    replace_rows("export", rows, lambda row: row["model"] in MODELS)


def sparse_rows() -> list[dict]:
    data = kshrink.datasets.load("mnist")
    dense = kshrink.zoo.pretrained("lenet_300_100")
    small, _ = kshrink.compress(dense, [kshrink.Prune(sparsity=0.92),
                                        kshrink.Cluster(clusters=16)],
                                data=data.train, fine_tune=kshrink.FineTune(epochs=1))
    x_test, y_test = data.test
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant, model in (("dense", dense), ("92% sparse, 16 clusters", small)):
            files = {".keras": Path(tmp) / "m.keras", ".kshrink": Path(tmp) / "m.kshrink"}
            model.save(files[".keras"])
            kshrink.save(model, files[".kshrink"])
            sizes = {suffix: file_size(path).bytes for suffix, path in files.items()}
            accuracy_of = {"Keras": evaluate(model, x_test, y_test)["accuracy"]}
            for suffix, runtime in ((".tflite", "LiteRT"), (".onnx", "ONNX Runtime")):
                report = export(model, Path(tmp) / f"m{suffix}", data=x_test)
                print(report, flush=True)
                sizes[suffix] = report.file_bytes
                accuracy_of[runtime] = accuracy(Runtime(report.path), x_test, y_test)
            rows.append({"model": "lenet_300_100", "variant": variant, **{
                f"{suffix[1:]}_bytes": size for suffix, size in sizes.items()},
                **{f"accuracy_{name}": acc for name, acc in accuracy_of.items()}})
            print(rows[-1], flush=True)
    return rows


def efficientnet_rows(args) -> list[dict]:
    from post_training import load

    model, calibration, (x, _), _ = load("efficientnet_lite0")
    int8, _ = kshrink.compress(model, kshrink.Quantize(mode="int8"))
    int4, _ = kshrink.compress(model, kshrink.Quantize(mode="int4", group_size=None,
                                                       method="gptq"), data=calibration)
    every, _ = kshrink.compress(model, kshrink.Quantize(
        mode="int4", group_size=None, method="gptq", keep_int8=False), data=calibration)
    sources = {"float": model, "kshrink int8 weights": int8, "kshrink int4 weights": int4,
               "kshrink int4 weights, every layer": every, "full int8": model}
    quantizations = {"float": "none", "full int8": "int8"}
    rows, runners = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for runtime, suffix in (("LiteRT", ".tflite"), ("ONNX Runtime", ".onnx")):
            for variant, source in sources.items():
                path = Path(tmp) / f"{variant.replace(' ', '_')}{suffix}"
                report = export(source, path, quantization=quantizations.get(variant, "auto"),
                                data=calibration, samples=len(calibration))
                print(report, flush=True)
                runner = runners[f"{runtime} {variant}"] = Runtime(report.path)
                got = np.concatenate([runner(x[i:i + 50]) for i in range(0, len(x), 50)])
                want = source.predict(x, batch_size=50, verbose=0)
                cosine = np.sum(got * want, 1) / (np.linalg.norm(got, axis=1) *
                                                  np.linalg.norm(want, axis=1))
                kept = [what for what in report.weights.values() if what.startswith("int")]
                rows.append({
                    "model": "efficientnet_lite0", "variant": f"{runtime} {variant}",
                    "quantization": report.quantization, "file_bytes": report.file_bytes,
                    "cosine_vs_keras": round(float(np.mean(cosine)), 5),
                    "agreement_vs_keras": float(np.mean(got.argmax(1) == want.argmax(1))),
                    "max_abs_diff": float(np.max(np.abs(got - want))),
                    "kernels_kept": f"{len(kept)} of {len(report.weights)}"
                                    if report.weights else None})
        names = ["Keras float", *runners]
        timings = latency_in_turns([model, *runners.values()], [x[:64]] * len(names),
                                   runs=args.runs, rounds=args.rounds)
    base = {t.batch_size: t.median_ms for t in timings[0]}
    by_variant = {name: {t.batch_size: t.median_ms for t in found}
                  for name, found in zip(names, timings)}
    for row in rows:
        times = by_variant[row["variant"]]
        row.update({"latency_b1_ms": round(times[1], 3), "latency_b32_ms": round(times[32], 3),
                    "speedup_b1": round(base[1] / times[1], 2),
                    "speedup_b32": round(base[32] / times[32], 2)})
        print(row, flush=True)
    return rows


if __name__ == "__main__":
    main()
