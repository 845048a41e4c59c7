"""Physically smaller models: structured channel pruning + BatchNorm folding, and low-rank.

1. The residual Fashion-MNIST CNN (trained): original, BN folded, structured pruning at
   each `--ratios`, and depth pruning (one residual block) with `--depth-ratio` of the
   channels, each fine-tuned `--epochs` epochs in all with distillation, then BN folded.
2. A ResNet-style CNN with four residual stages (random weights: speed only), same variants
   without fine-tuning.
3. LeNet-300-100 low-rank at several output-error tolerances (the 10-way output layer left
   alone), fine-tuned: parameters vs error.

Latency is Keras on the current backend, `predict_on_batch` at batch 1 and 32: the variants of
a model are timed in turns (`--rounds` rounds of `--runs` calls each) and each figure is the
median over rounds, so a slow moment of the machine hits every variant alike.
Run: .venv/bin/python benchmarks/structured.py [--ratios 0.5 0.7] [--epochs 10]
"""

import argparse

import keras
import numpy as np
from common import median, replace_rows, write_rows

import kshrink
from kshrink.measure import evaluate, latency, macs, weight_stats
from kshrink.zoo.models import conv_bn_relu, residual_stages


def resnet_style(widths=(32, 64, 128, 256), blocks=2, size=64, classes=100):
    """A ResNet-18-like network: stem, then `blocks` basic blocks per stage."""
    inputs = keras.Input((size, size, 3))
    x = residual_stages(conv_bn_relu(inputs, widths[0], 3, 1, "stem"), widths, blocks)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(classes, name="classifier")(x)
    return keras.Model(inputs, outputs, name="resnet_style")


def timed(models: dict, x, rounds: int, runs: int) -> dict:
    """{variant: {batch: median ms}}, variants timed in turns."""
    samples = {name: {1: [], 32: []} for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            for t in latency(model, x, runs=runs):
                samples[name][t.batch_size].append(t.median_ms)
    return {name: {b: median(v) for b, v in by.items()} for name, by in samples.items()}


def rows_for(label, models: dict, x, accuracy: dict, args, epochs=None) -> list:
    times = timed(models, x, args.rounds, args.runs)
    base = times["original"]
    rows = []
    for name, model in models.items():
        rows.append({
            "model": label, "variant": name,
            "parameters": weight_stats(model).parameters, "macs": macs(model).total,
            "latency_b1_ms": round(times[name][1], 3), "latency_b32_ms": round(times[name][32], 3),
            "speedup_b1": round(base[1] / times[name][1], 3),
            "speedup_b32": round(base[32] / times[name][32], 3),
            "test_accuracy": accuracy.get(name),
            "fine_tune_epochs": epochs if "removed" in name else None,
            "layers": len(model.layers),
        })
        print(rows[-1], flush=True)
    return rows


def structured_variants(model, ratios, data, epochs, depth_ratio, train=True):
    """The original, BN folded, each channel ratio, and one residual block removed plus
    `depth_ratio` of the channels. With `train`, fine-tuned `epochs` epochs in all (the depth
    variant trains after each of its two pruning steps, half the epochs each)."""
    def tune(epochs):
        return kshrink.FineTune(epochs=epochs, learning_rate=1e-3, distill=True,
                                verbose=False) if train else None

    variants = {"original": model, "BN folded": kshrink.compress(model, kshrink.Fold())[0]}
    for ratio in ratios:
        keras.utils.set_random_seed(0)
        small, _ = kshrink.compress(
            model, [kshrink.StructuredPrune(ratio=ratio, round_to=4), kshrink.Fold()],
            data=data, fine_tune=tune(epochs))
        variants[f"{int(ratio * 100)}% channels removed + BN folded"] = small
    keras.utils.set_random_seed(0)
    recipe = [kshrink.DepthPrune(blocks=1),
              kshrink.StructuredPrune(ratio=depth_ratio, round_to=4), kshrink.Fold()]
    small, report = kshrink.compress(model, recipe, data=data,
                                     fine_tune=tune(max(1, epochs // 2)))
    print(report.steps[0])
    variants[f"1 block + {int(depth_ratio * 100)}% channels removed + BN folded"] = small
    return variants


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.5, 0.7])
    parser.add_argument("--epochs", type=int, default=10,
                        help="fine-tuning epochs (low rank uses at most 4)")
    parser.add_argument("--depth-ratio", type=float, default=0.5,
                        help="channel ratio removed along with one residual block")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--tolerances", type=float, nargs="*", default=[0.2, 0.3, 0.4])
    parser.add_argument("--only", nargs="*", help="resnet_fashion, resnet_style, low_rank")
    args = parser.parse_args()
    rows = []
    if not args.only or "resnet_fashion" in args.only:
        fashion = kshrink.datasets.load("fashion_mnist")
        model = kshrink.zoo.pretrained("resnet_fashion")
        variants = structured_variants(model, args.ratios, fashion.train, args.epochs,
                                       args.depth_ratio)
        accuracy = {n: evaluate(m, *fashion.test)["accuracy"] for n, m in variants.items()}
        rows += rows_for("resnet_fashion", variants, fashion.test[0][:64], accuracy, args,
                         epochs=args.epochs)
    if not args.only or "resnet_style" in args.only:
        keras.utils.set_random_seed(0)
        model = resnet_style()
        x = np.random.default_rng(0).random((64, 64, 64, 3), dtype=np.float32)
        calibration = (x, np.zeros(len(x), "int64"))  # depth pruning compares outputs on x
        rows += rows_for("resnet_style (random weights)",
                         structured_variants(model, args.ratios, calibration, 0, args.depth_ratio,
                                             train=False), x, {}, args)
    if not args.only or "low_rank" in args.only:
        mnist = kshrink.datasets.load("mnist")
        model = kshrink.zoo.pretrained("lenet_300_100")
        base = evaluate(model, *mnist.test)["accuracy"]
        rows.append({"model": "lenet_300_100", "variant": "original",
                     "parameters": weight_stats(model).parameters, "macs": macs(model).total,
                     "test_accuracy": base})
        for tolerance in args.tolerances:
            keras.utils.set_random_seed(0)
            small, _ = kshrink.compress(
                model, kshrink.LowRank(tolerance=tolerance,
                                       exclude=kshrink.Select(names=("fc3",))),
                data=mnist.train,
                fine_tune=kshrink.FineTune(epochs=min(args.epochs, 4), learning_rate=5e-4,
                                           distill=True, verbose=False))
            rows.append({"model": "lenet_300_100", "variant": f"low rank, tolerance {tolerance}",
                         "parameters": weight_stats(small).parameters, "macs": macs(small).total,
                         "test_accuracy": evaluate(small, *mnist.test)["accuracy"],
                         "fine_tune_epochs": min(args.epochs, 4)})
            print(rows[-1], flush=True)
    if args.only:  # keep the other models' rows from the last full run
        rerun = {row["model"] for row in rows}
        replace_rows("structured", rows, lambda row: row["model"] in rerun)
    else:
        write_rows("structured", rows)


if __name__ == "__main__":
    main()
