"""Sparsity vs test error on LeNet-300-100 and LeNet-5 (MNIST): kshrink, with and without
distillation, and tfmot 0.8.1 side by side, from the same baseline weights with the same
fine-tune budget (epochs, batch size, Adam with cosine decay, polynomial schedule ending at
two thirds of training).

Run: .venv/bin/python benchmarks/prune_lenet.py [--quick]
     .venv/bin/python benchmarks/make_report.py
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import replace_rows, write_rows
from peers import run as run_peer

import kshrink
from kshrink.measure import evaluate, file_size
from kshrink.layers import kernel_weights

PLAN = {  # model: (sparsities, fine-tune epochs)
    "lenet_300_100": ((0.8, 0.9, 0.92, 0.95, 0.97), 10),
    "lenet5": ((0.9, 0.92, 0.95), 6),
}
BATCH, LR, SEED = 128, 1e-3, 0


def weight_sparsity(model) -> float:
    kernels = [np.asarray(w) for layer in model.layers for w in kernel_weights(layer)]
    return sum(int(np.sum(k == 0)) for k in kernels) / sum(k.size for k in kernels)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="one sparsity, one epoch: a smoke run")
    parser.add_argument("--only", help="rerun just this variant (e.g. 'kshrink global + "
                        "distillation') and replace its rows in the results")
    args = parser.parse_args()
    mnist = kshrink.datasets.load("mnist")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_path = Path(tmp) / "mnist.npz"
        np.savez(data_path, x_train=mnist.x_train, y_train=mnist.y_train, x_test=mnist.x_test,
                 y_test=mnist.y_test)
        for name, (levels, epochs) in PLAN.items():
            if args.quick:
                levels, epochs = levels[-1:], 1
            base = kshrink.zoo.pretrained(name)
            base_path = Path(tmp) / f"{name}.keras"
            base.save(base_path)
            base_accuracy = evaluate(base, *mnist.test)["accuracy"]
            weights_path = Path(tmp) / f"{name}.npz"
            np.savez(weights_path, **{f"w{i}": w for i, w in enumerate(base.get_weights())})
            for sparsity in levels:
                variants = {
                    "kshrink layer": dict(scope="layer", distill=False),
                    "kshrink global": dict(scope="global", distill=False),
                    "kshrink global + distillation": dict(scope="global", distill=True),
                }
                for variant, v in variants.items():
                    if args.only and variant != args.only:
                        continue
                    start = time.perf_counter()
                    small, _ = kshrink.compress(
                        base, kshrink.Prune(sparsity=sparsity, scope=v["scope"],
                                            skip_first_last=False),
                        data=mnist.train,
                        fine_tune=kshrink.FineTune(epochs=epochs, batch_size=BATCH,
                                                   learning_rate=LR, distill=v["distill"],
                                                   verbose=False))
                    path = Path(tmp) / "pruned.keras"
                    small.save(path)
                    rows.append(row(name, variant, sparsity, epochs, base_accuracy,
                                    evaluate(small, *mnist.test)["accuracy"],
                                    weight_sparsity(small),
                                    file_size(path).deflated / file_size(base_path).deflated,
                                    time.perf_counter() - start))
                if args.only:
                    continue
                start = time.perf_counter()
                peer = run_peer("tfmot_prune.py", {
                    "model": name, "weights": str(weights_path), "data": str(data_path),
                    "sparsity": sparsity, "epochs": epochs, "batch_size": BATCH,
                    "learning_rate": LR, "seed": SEED})
                rows.append(row(name, "tfmot 0.8.1 (layer)", sparsity, epochs, base_accuracy,
                                peer["test_accuracy"], peer["weight_sparsity"], None,
                                time.perf_counter() - start))
    if args.only:
        replace_rows("prune_lenet", rows, lambda r: r["variant"] == args.only)
    else:
        write_rows("prune_lenet_quick" if args.quick else "prune_lenet", rows)


def row(model, variant, sparsity, epochs, base_accuracy, accuracy, achieved, deflate_ratio,
        seconds):
    result = {
        "model": model, "variant": variant, "target_sparsity": sparsity,
        "weight_sparsity": round(achieved, 4), "fine_tune_epochs": epochs,
        "baseline_error_pct": round(100 * (1 - base_accuracy), 2),
        "test_error_pct": round(100 * (1 - accuracy), 2),
        "deflated_size_vs_float": None if deflate_ratio is None else round(deflate_ratio, 4),
        "seconds": round(seconds, 1),
    }
    print(result, flush=True)
    return result


if __name__ == "__main__":
    main()
