"""Float vs kshrink's Keras-native int8/int4 on LeNet-300-100 and LeNet-5 (MNIST).

File size, weight bytes, test accuracy, and load time / memory as medians over fresh processes.
Run: .venv/bin/python benchmarks/quantize_keras_native.py [--load-runs 5]
"""

import argparse
import tempfile
from pathlib import Path

from common import write_rows

import kshrink
from kshrink.measure import evaluate, file_size, load_cost, weight_stats

VARIANTS = {
    "float32": None,
    "int8": kshrink.Quantize(mode="int8"),
    "int4": kshrink.Quantize(mode="int4"),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--load-runs", type=int, default=5)
    args = parser.parse_args()
    test = kshrink.datasets.load("mnist").test
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("lenet_300_100", "lenet5"):
            model = kshrink.zoo.pretrained(name)
            for variant, technique in VARIANTS.items():
                small = model if technique is None else kshrink.compress(model, technique)[0]
                path = Path(tmp) / f"{name}-{variant}.keras"
                small.save(path)
                size, load = file_size(path), load_cost(path, runs=args.load_runs)
                rows.append({
                    "model": name,
                    "variant": variant,
                    "weight_bytes": weight_stats(small).bytes,
                    "file_bytes": size.bytes,
                    "file_deflated_bytes": size.deflated,
                    "test_accuracy": evaluate(small, *test)["accuracy"],
                    "load_seconds_median": round(load.seconds, 4),
                    "load_peak_bytes_median": load.peak_bytes,
                    "load_runs": load.runs,
                })
                print(rows[-1])
    write_rows("quantize_keras_native", rows)


if __name__ == "__main__":
    main()
