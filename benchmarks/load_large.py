"""Load time and peak memory for ~25M-parameter models: `keras.saving.load_model` of the float
`.keras` against `kshrink.load` of the int8 compact file, each in fresh processes (median),
memory as the increase over a process that only imported Keras.

Models (random weights; loading does not care): a wide MLP (1024-4096-4096-1000) and a
ResNet-50-shaped CNN (keras.applications.ResNet50, weights=None). kshrink's int8 covers Dense
layers through Keras and Conv layers with its own quantized layers; both stay int8 in memory.
The int8 `.keras` file loaded by `keras.saving.load_model` is measured too.

Run: .venv/bin/python benchmarks/load_large.py [--runs 5]
"""

import argparse
import tempfile
from pathlib import Path

import keras
from common import write_rows

import kshrink
from kshrink.measure import file_size, load_cost, weight_stats


def wide_mlp():
    inputs = keras.Input((1024,))
    x = keras.layers.Dense(4096, activation="relu", name="fc1")(inputs)
    x = keras.layers.Dense(4096, activation="relu", name="fc2")(x)
    return keras.Model(inputs, keras.layers.Dense(1000, name="fc3")(x), name="wide_mlp")


def resnet50():
    return keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3), classes=1000)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for build in (wide_mlp, resnet50):
            keras.utils.set_random_seed(0)
            model = build()
            float_path = Path(tmp) / f"{model.name}.keras"
            model.save(float_path)
            small, _ = kshrink.compress(model, kshrink.Quantize(mode="int8"))
            compact_path = Path(tmp) / f"{model.name}-int8.kshrink"
            kshrink.save(small, compact_path)
            int8_path = Path(tmp) / f"{model.name}-int8.keras"
            small.save(int8_path)
            for label, path, loader, m in (("float .keras, keras.saving.load_model", float_path,
                                            "keras", model),
                                           ("int8 .keras, keras.saving.load_model", int8_path,
                                            "keras", small),
                                           ("int8 .kshrink, kshrink.load", compact_path,
                                            "kshrink", small)):
                cost = load_cost(path, runs=args.runs, loader=loader)
                rows.append({
                    "model": model.name, "parameters": model.count_params(), "file": label,
                    "file_bytes": file_size(path).bytes, "weight_bytes": weight_stats(m).bytes,
                    "load_seconds_median": round(cost.seconds, 3),
                    "load_peak_bytes_median": cost.peak_bytes,
                    "resident_bytes_median": cost.resident_bytes, "runs": cost.runs,
                })
                print(rows[-1], flush=True)
            del model, small
    write_rows("load_large", rows)


if __name__ == "__main__":
    main()
