"""Deep-Compression-class sizes: prune -> cluster (both fine-tuned, the original teaching) ->
compact file, on LeNet-300-100 and LeNet-5 (MNIST). Ratio = float32 parameter bytes / file
bytes, everything in the file included. tfmot's best pipeline (prune + sparsity-preserving
clustering, then gzip of its .h5 or of its TFLite file) runs in the same script on the same
baseline weights and epochs.

Run: .venv/bin/python benchmarks/deep_compression.py [--quick]
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import replace_rows, write_rows
from peers import run as run_peer

import kshrink
from kshrink.measure import evaluate

PLAN = {  # model: ([(sparsity, clusters)], fine-tune epochs per step)
    "lenet_300_100": ([(0.92, 16), (0.95, 8), (0.95, 16)], 8),
    "lenet5": ([(0.95, 16), (0.97, 16)], 5),
}
PEER_POINT = {"lenet_300_100": (0.92, 16), "lenet5": (0.95, 16)}
PUBLISHED = {"lenet_300_100": 40, "lenet5": 39}  # Han et al. 2016, Table 1
BATCH, LR, SEED = 128, 1e-3, 0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="one point, one epoch, no peer")
    parser.add_argument("--no-peers", action="store_true",
                        help="rerun kshrink's rows only, keeping the peer rows in the results")
    args = parser.parse_args()
    mnist = kshrink.datasets.load("mnist")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_path = Path(tmp) / "mnist.npz"
        np.savez(data_path, x_train=mnist.x_train, y_train=mnist.y_train,
                 x_test=mnist.x_test, y_test=mnist.y_test)
        for name, (points, epochs) in PLAN.items():
            if args.quick:
                points, epochs = points[:1], 1
            base = kshrink.zoo.pretrained(name)
            float_bytes = 4 * base.count_params()
            base_error = 100 * (1 - evaluate(base, *mnist.test)["accuracy"])
            for sparsity, clusters in points:
                start = time.perf_counter()
                small, _ = kshrink.compress(
                    base,
                    [kshrink.Prune(sparsity=sparsity, scope="global", skip_first_last=False),
                     kshrink.Cluster(clusters=clusters)],
                    data=mnist.train,
                    fine_tune=kshrink.FineTune(epochs=epochs, batch_size=BATCH, learning_rate=LR,
                                               distill=True, verbose=False))
                path = Path(tmp) / f"{name}.kshrink"
                kshrink.save(small, path)
                error = 100 * (1 - evaluate(kshrink.load(path), *mnist.test)["accuracy"])
                rows.append(row(name, "kshrink: prune + cluster -> .kshrink", sparsity, clusters,
                                epochs, base_error, error, float_bytes, os.path.getsize(path),
                                time.perf_counter() - start))
            if args.quick or args.no_peers:
                continue
            sparsity, clusters = PEER_POINT[name]
            weights_path = Path(tmp) / f"{name}.npz"
            np.savez(weights_path, **{f"w{i}": w for i, w in enumerate(base.get_weights())})
            start = time.perf_counter()
            peer = run_peer("tfmot_pipeline.py", {
                "model": name, "weights": str(weights_path), "data": str(data_path),
                "sparsity": sparsity, "clusters": clusters, "epochs": epochs,
                "batch_size": BATCH, "learning_rate": LR, "seed": SEED})
            best = min(peer["h5_gzip_bytes"], peer["tflite_gzip_bytes"])
            which = "h5" if best == peer["h5_gzip_bytes"] else "TFLite"
            rows.append(row(name, f"tfmot 0.8.1: prune + cluster -> gzip {which}", sparsity,
                            clusters, epochs, base_error, 100 * (1 - peer["test_accuracy"]),
                            float_bytes, best, time.perf_counter() - start))
    if args.no_peers and not args.quick:
        replace_rows("deep_compression", rows, lambda r: r["pipeline"].startswith("kshrink"))
    else:
        write_rows("deep_compression_quick" if args.quick else "deep_compression", rows)


def row(model, pipeline, sparsity, clusters, epochs, base_error, error, float_bytes, file_bytes,
        seconds):
    result = {
        "model": model, "pipeline": pipeline, "sparsity": sparsity, "clusters": clusters,
        "fine_tune_epochs_per_step": epochs, "baseline_error_pct": round(base_error, 2),
        "test_error_pct": round(error, 2), "float32_bytes": float_bytes,
        "file_bytes": file_bytes, "ratio": round(float_bytes / file_bytes, 1),
        "deep_compression_ratio": PUBLISHED[model], "seconds": round(seconds, 1),
    }
    print(result, flush=True)
    return result


if __name__ == "__main__":
    main()
