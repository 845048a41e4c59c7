"""Test accuracy of the reference models, trained here from seed 0 (or loaded from the cache).

Run: .venv/bin/python benchmarks/zoo_baselines.py && .venv/bin/python benchmarks/make_report.py
"""

import time

from common import write_rows

import kshrink

PUBLISHED_ERROR = {"lenet_300_100": 1.64, "lenet5": 0.80}  # Han et al., Deep Compression


def main():
    rows = []
    for name, entry in kshrink.zoo.MODELS.items():
        start = time.perf_counter()
        model = kshrink.zoo.pretrained(name)
        seconds = time.perf_counter() - start
        accuracy = kshrink.measure.evaluate(model, *kshrink.datasets.load(entry.dataset).test)
        rows.append({
            "model": name,
            "dataset": entry.dataset,
            "epochs": entry.epochs,
            "parameters": model.count_params(),
            "test_accuracy": accuracy["accuracy"],
            "test_error_pct": round(100 * (1 - accuracy["accuracy"]), 2),
            "deep_compression_error_pct": PUBLISHED_ERROR.get(name),
            "load_or_train_seconds": round(seconds, 1),
        })
        print(rows[-1])
    write_rows("zoo_baselines", rows)


if __name__ == "__main__":
    main()
