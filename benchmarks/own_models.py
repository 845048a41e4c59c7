"""A user's own keras.applications model after a short fine-tune: MobileNetV2 (96x96, 10
classes, weights=None) trained here on scikit-learn's digits scaled up to 96x96 RGB, then
compressed with one epoch of fine-tuning per step (12 optimizer steps at batch 128), against
the BatchNorm momentum of 0.999 keras.applications uses.

Rows: validation accuracy of the original and of each recipe with kshrink's defaults, with
BatchNorm re-estimation off (kshrink's behaviour before it re-estimated stale statistics by
default), and with distillation, plus the warnings of the median run. Fine-tuning on
TensorFlow's CPU kernels is not bit-reproducible, and a collapsed model's BatchNorm
statistics amplify the difference, so each recipe runs `--runs` times: the median accuracy
and every run's are reported.

    KERAS_BACKEND=tensorflow python benchmarks/own_models.py [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import keras
import numpy as np

import kshrink
from common import write_rows

CACHE = os.path.join(os.environ.get("KSHRINK_CACHE_DIR", os.path.expanduser("~/.cache/kshrink")),
                     "mobilenet_v2_digits96.keras")


def digits96():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images.astype("float32") / 16.0
    x = np.repeat(np.repeat(x, 12, 1), 12, 2)[..., None].repeat(3, -1)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], digits.target[order].astype("int64")
    return (x[:1437], y[:1437]), (x[1437:], y[1437:])


def mobilenet(train) -> keras.Model:
    """Trained here once (about 5 minutes on 2 cores), then cached."""
    if os.path.exists(CACHE):
        return keras.saving.load_model(CACHE)
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3), classes=10)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(*train, batch_size=64, epochs=15, verbose=2)
    # 345 steps at momentum 0.999 leave the moving statistics mostly at their initial values.
    kshrink.reconstruct.reestimate_batchnorm(model, train[0][:512])
    os.makedirs(os.path.dirname(CACHE), exist_ok=True)
    model.save(CACHE)
    return model


RECIPES = {
    "prune 50% + cluster 16": lambda **o: [kshrink.Prune(0.5, **o), kshrink.Cluster(16, **o)],
    "structured 25% + fold": lambda **o: [kshrink.StructuredPrune(0.25, **o), kshrink.Fold()],
}
VARIANTS = {
    "defaults": ({}, {}),
    "BatchNorm not re-estimated (before)": ({"reestimate_batchnorm": False}, {}),
    "distill": ({}, {"distill": True}),
}


def run(model, recipe, options, fine_tune, train, held_out):
    """(accuracy, seconds, warnings, summaries) of one compression."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small, report = kshrink.compress(
            model, recipe(**options), data=train, validation_data=held_out,
            fine_tune=kshrink.FineTune(epochs=1, **fine_tune), verbose=False)
    return (float(small.evaluate(*held_out, verbose=0)[1]), time.perf_counter() - start,
            [str(w.message) for w in caught if "lowered" in str(w.message)],
            [step.summary for step in report.steps])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3, help="compressions per recipe")
    args = parser.parse_args()
    train, held_out = digits96()
    model = mobilenet(train)
    original = float(model.evaluate(*held_out, verbose=0)[1])
    print(f"original: {original:.4f}")
    rows = [{"model": "MobileNetV2 96x96 digits", "recipe": "original", "variant": "",
             "accuracy": original}]
    for recipe, make in RECIPES.items():
        for variant, (options, fine_tune) in VARIANTS.items():
            if variant == "distill" and recipe != "prune 50% + cluster 16":
                continue
            runs = sorted(run(model, make, options, fine_tune, train, held_out)
                          for _ in range(args.runs))
            accuracy, seconds, said, summaries = runs[len(runs) // 2]
            row = {"model": "MobileNetV2 96x96 digits", "recipe": recipe, "variant": variant,
                   "accuracy": accuracy, "change_pp": round((accuracy - original) * 100, 2),
                   "runs": [r[0] for r in runs], "seconds": round(seconds, 1),
                   "warnings": said, "summaries": summaries}
            print(row, flush=True)
            rows.append(row)
    write_rows("own_models", rows)


if __name__ == "__main__":
    main()
