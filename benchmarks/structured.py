"""Physically smaller models: structured channel pruning + BatchNorm folding, and low-rank.

1. The residual Fashion-MNIST CNN (trained): original, BN folded, structured pruning at
   each `--ratios` (fine-tuned `--epochs` epochs with distillation, then BN folded), and depth
   pruning: the first residual block (the 28x28 stage, whose convolutions cost the most at
   batch 1) removed, then `--depth-ratio` of the channels, `--depth-epochs` of fine-tuning
   after each of the two steps.
2. A ResNet-style CNN with four residual stages (random weights: speed only), same variants
   without fine-tuning (the depth variant removes the first block of the first stage).
3. LeNet-300-100 low-rank at several output-error tolerances (the 10-way output layer left
   alone), fine-tuned: parameters vs error.
4. What one 3x3 convolution costs at batch 1 by resolution and width (chains of 1 and 9
   convolutions, the difference over 8): where batch-1 time goes in small CNNs.

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


def timed(models: dict, x, rounds: int, runs: int, batch_sizes=(1, 32)) -> dict:
    """{variant: {batch: median ms}}, variants timed in turns."""
    samples = {name: {b: [] for b in batch_sizes} for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            for t in latency(model, x, batch_sizes=batch_sizes, runs=runs):
                samples[name][t.batch_size].append(t.median_ms)
    return {name: {b: median(v) for b, v in by.items()} for name, by in samples.items()}


def rows_for(label, models: dict, x, accuracy: dict, args, epochs: dict) -> list:
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
            "fine_tune_epochs": epochs.get(name) or None,
            "layers": len(model.layers),
        })
        print(rows[-1], flush=True)
    return rows


def conv_costs(rounds: int, runs: int) -> list:
    """Batch-1 microseconds per 3x3 Conv2D (with ReLU) at each resolution and width."""
    def chain(size, width, length):
        inputs = x = keras.Input((size, size, width))
        for _ in range(length):
            x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(x)
        return keras.Model(inputs, x)

    rows = []
    for size, widths in ((28, (4, 8, 16, 32)), (14, (4, 8, 16, 32, 64)), (7, (8, 16, 32, 64))):
        for width in widths:
            models = {length: chain(size, width, length) for length in (1, 9)}
            x = np.random.default_rng(0).random((1, size, size, width), dtype=np.float32)
            times = timed(models, x, rounds, runs, batch_sizes=(1,))
            rows.append({"model": "3x3 conv chain", "size": size, "channels": width,
                         "macs": size * size * width * width * 9,
                         "us_per_conv": round((times[9][1] - times[1][1]) / 8 * 1e3, 1)})
            print(rows[-1], flush=True)
    return rows


def structured_variants(model, ratios, data, epochs, depth, train=True):
    """(variants, fine-tuning epochs of each): the original, BN folded, each channel ratio,
    and `depth`: (residual block to remove, channel ratio, fine-tuning epochs after each of
    the two pruning steps). Fine-tuned with distillation when `train`, else `data` only
    calibrates."""
    def tune(epochs):
        return kshrink.FineTune(epochs=epochs, learning_rate=1e-3, distill=True,
                                verbose=False) if train else None

    variants = {"original": model, "BN folded": kshrink.compress(model, kshrink.Fold())[0]}
    trained = {}
    for ratio in ratios:
        keras.utils.set_random_seed(0)
        small, _ = kshrink.compress(
            model, [kshrink.StructuredPrune(ratio=ratio, round_to=4), kshrink.Fold()],
            data=data, fine_tune=tune(epochs))
        name = f"{int(ratio * 100)}% channels removed + BN folded"
        variants[name], trained[name] = small, epochs if train else 0
    block, ratio, depth_epochs = depth
    keras.utils.set_random_seed(0)
    recipe = [kshrink.DepthPrune(blocks=1, layers=kshrink.Select(names=(block,))),
              kshrink.StructuredPrune(ratio=ratio, round_to=4), kshrink.Fold()]
    small, _ = kshrink.compress(model, recipe, data=data, fine_tune=tune(depth_epochs))
    name = f"block {block} + {int(ratio * 100)}% channels removed + BN folded"
    variants[name], trained[name] = small, 2 * depth_epochs if train else 0
    return variants, trained


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.5, 0.7])
    parser.add_argument("--epochs", type=int, default=10,
                        help="fine-tuning epochs (low rank uses at most 4)")
    parser.add_argument("--depth-ratio", type=float, default=0.5,
                        help="channel ratio removed along with the first residual block")
    parser.add_argument("--depth-epochs", type=int, default=15,
                        help="depth variant: fine-tuning epochs after each pruning step")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--tolerances", type=float, nargs="*", default=[0.2, 0.3, 0.4])
    parser.add_argument("--only", nargs="*",
                        help="resnet_fashion, resnet_style, low_rank, conv_cost")
    args = parser.parse_args()
    rows = []
    if not args.only or "resnet_fashion" in args.only:
        fashion = kshrink.datasets.load("fashion_mnist")
        model = kshrink.zoo.pretrained("resnet_fashion")
        variants, epochs = structured_variants(model, args.ratios, fashion.train, args.epochs,
                                               ("s1_add", args.depth_ratio, args.depth_epochs))
        accuracy = {n: evaluate(m, *fashion.test)["accuracy"] for n, m in variants.items()}
        rows += rows_for("resnet_fashion", variants, fashion.test[0][:64], accuracy, args,
                         epochs)
    if not args.only or "resnet_style" in args.only:
        keras.utils.set_random_seed(0)
        model = resnet_style()
        x = np.random.default_rng(0).random((64, 64, 64, 3), dtype=np.float32)
        calibration = (x, np.zeros(len(x), "int64"))  # depth pruning compares outputs on x
        variants, _ = structured_variants(model, args.ratios, calibration, 0,
                                          ("s1b0_add", args.depth_ratio, 0), train=False)
        rows += rows_for("resnet_style (random weights)", variants, x, {}, args, {})
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
    if not args.only or "conv_cost" in args.only:
        rows += conv_costs(args.rounds, args.runs)
    if args.only:  # keep the other models' rows from the last full run
        rerun = {row["model"] for row in rows}
        replace_rows("structured", rows, lambda row: row["model"] in rerun)
    else:
        write_rows("structured", rows)


if __name__ == "__main__":
    main()
