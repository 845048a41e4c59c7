"""Compressing pretrained models with only a calibration set, no fine-tuning: round-to-nearest
and magnitude pruning against the calibration-based methods (GPTQ, Wanda, SparseGPT, and block
reconstruction: AdaRound and SparseGPT with refit) and BatchNorm re-estimation.

Models: EfficientNet-Lite0 with its real ImageNet weights (ported, see `pretrained.py`),
calibrated on 54 crops of 18 photos of objects and scored on 200 views of 20 other photos, the
ImageNet validation images foolbox ships (top-1 agreement with the float model, cosine of the
logits, top-1 accuracy against their labels); and the zoo's residual CNN on Fashion-MNIST,
calibrated on 512 training images, scored on the test set.
Two residual CNN rows then fine-tune 4 epochs with distillation on the training set (`TUNE`):
half of the channels removed, re-fitted from calibration data or not, then trained.

`--at-scale` times the acceptance configurations on EfficientNet-Lite0 (4.7M parameters) with
512 calibration crops, each in a fresh process whose peak resident memory is recorded.
`--images DIR` does the same on an ImageNet-style folder you have: calibrated on 256 of its
photos, scored on the others (agreement on 1,000 photos has a standard error near 1 pp; on the
20 foolbox photos, near 5 pp).

Run: .venv/bin/python benchmarks/post_training.py [--models efficientnet_lite0 resnet_fashion]
     [--variants NAME ...] [--replace] [--at-scale | --images DIR]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import replace_rows

import kshrink

PRUNE = dict(sparsity=0.5, schedule="one_shot", skip_first_last=False, min_fan_in=0)  # every layer
VIEWS = 10  # scored views of each photo
VARIANTS = {
    "int8 rtn": [kshrink.Quantize(mode="int8")],
    # every layer int4 (keep_int8=False), as these rows measured before keep_int8 existed
    "int4 rtn": [kshrink.Quantize(mode="int4", group_size=None, keep_int8=False)],
    "int4 gptq": [kshrink.Quantize(mode="int4", group_size=None, method="gptq",
                                   keep_int8=False)],
    "int4/g128 gptq": [kshrink.Quantize(mode="int4", method="gptq", keep_int8=False)],
    "int4/g32 rtn": [kshrink.Quantize(mode="int4", group_size=32, keep_int8=False)],
    "int4/g32 gptq": [kshrink.Quantize(mode="int4", group_size=32, method="gptq",
                                       keep_int8=False)],
    # the defaults: the first and last layers and the depthwise convolutions stay int8
    "int4 rtn, keep_int8": [kshrink.Quantize(mode="int4", group_size=None)],
    "int4 gptq, keep_int8": [kshrink.Quantize(mode="int4", group_size=None, method="gptq")],
    "int4/g128 gptq, keep_int8": [kshrink.Quantize(mode="int4", method="gptq")],
    # block reconstruction: rounding learned block by block (500 steps a block)
    "int4 adaround": [kshrink.Quantize(mode="int4", group_size=None, method="adaround",
                                       keep_int8=False)],
    "int4 adaround, keep_int8": [kshrink.Quantize(mode="int4", group_size=None,
                                                  method="adaround")],
    "prune 50% magnitude": [kshrink.Prune(**PRUNE, reestimate_batchnorm=False)],
    "prune 50% magnitude + BN": [kshrink.Prune(**PRUNE)],
    "prune 50% wanda + BN": [kshrink.Prune(**PRUNE, method="wanda")],
    "prune 50% sparsegpt + BN": [kshrink.Prune(**PRUNE, method="sparsegpt")],
    # the defaults: global scope; the first and last layers, and the depthwise ones, stay dense
    "prune 50% sparsegpt + BN, defaults": [kshrink.Prune(sparsity=0.5, schedule="one_shot",
                                                         method="sparsegpt")],
    "prune 50% sparsegpt + refit + BN, defaults": [
        kshrink.Prune(sparsity=0.5, schedule="one_shot", method="sparsegpt", refit=True)],
    # each layer's sparsity from its measured effect on the outputs (SPDY-like allocation)
    "prune 50% sparsegpt + BN, sensitivity": [
        kshrink.Prune(sparsity=0.5, schedule="one_shot", method="sparsegpt",
                      scope="sensitivity")],
    "prune 50% sparsegpt + refit + BN, sensitivity": [
        kshrink.Prune(sparsity=0.5, schedule="one_shot", method="sparsegpt",
                      scope="sensitivity", refit=True)],
    "prune 75% sparsegpt + BN, defaults": [kshrink.Prune(sparsity=0.75, schedule="one_shot",
                                                         method="sparsegpt")],
    "prune 75% sparsegpt + BN, sensitivity": [
        kshrink.Prune(sparsity=0.75, schedule="one_shot", method="sparsegpt",
                      scope="sensitivity")],
    "prune 50% sparsegpt + BN, defaults, layer scope": [
        kshrink.Prune(sparsity=0.5, schedule="one_shot", method="sparsegpt", scope="layer")],
    # 2:4 needs a multiple of 4 inputs: the depthwise 3x3 (9) and RGB stem (27) stay dense
    "prune 2:4 magnitude + BN": [kshrink.Prune(pattern="2:4", skip_first_last=False)],
    "prune 2:4 sparsegpt + BN": [kshrink.Prune(pattern="2:4", skip_first_last=False,
                                               method="sparsegpt")],
    "cluster 16/channel": [kshrink.Cluster(clusters=16, granularity="channel", weighted=False,
                                           method="kmeans", reestimate_batchnorm=False)],
    "cluster 16/channel + BN": [kshrink.Cluster(clusters=16, granularity="channel",
                                                weighted=False, method="kmeans")],
    "cluster 16/channel weighted + BN": [kshrink.Cluster(clusters=16, granularity="channel",
                                                         method="kmeans")],
    # the defaults with data: codebooks by GPTQ sweep, toward the original
    "cluster 16/channel gptq + BN": [kshrink.Cluster(clusters=16, granularity="channel")],
    "channels 50% removed + BN": [kshrink.StructuredPrune(ratio=0.5)],
    "channels 50% reconstruct + BN": [kshrink.StructuredPrune(ratio=0.5, method="reconstruct")],
}

# Calibration, then a short fine-tune with distillation on the training set (residual CNN only).
TUNE = kshrink.FineTune(epochs=4, learning_rate=5e-3, distill=True, seed=0, verbose=False)
FINE_TUNED = {
    "channels 50% removed + 4 epochs": [kshrink.StructuredPrune(ratio=0.5, round_to=4),
                                        kshrink.Fold()],
    "channels 50% reconstruct + 4 epochs": [
        kshrink.StructuredPrune(ratio=0.5, round_to=4, method="reconstruct"), kshrink.Fold()],
}


# The configurations, timed with the calibration set a user with more images would pass.
AT_SCALE = ("int4/g128 gptq", "prune 50% sparsegpt + BN, defaults",
            "cluster 16/channel gptq + BN")
SCALE_CALIBRATION = 512
# --images: the acceptance configurations, calibrated on the first 256 photos of the folder
# (in a fixed random order) and scored on all the others.
ON_IMAGES = ("int8 rtn", "int4 rtn, keep_int8", "int4 gptq, keep_int8",
             "int4 adaround, keep_int8", "prune 50% sparsegpt + BN, defaults",
             "prune 50% sparsegpt + refit + BN, defaults",
             "prune 50% sparsegpt + refit + BN, sensitivity")
FOLDER_CALIBRATION = 256


def load(name, images: str | None = None):
    """(model, calibration inputs, (scored inputs, labels), training set or None); with
    `images` (EfficientNet-Lite0), both sets from that ImageNet-style folder."""
    if name == "efficientnet_lite0":
        import pretrained

        if images:
            x, y, _ = pretrained.image_folder(images)
            order = np.random.default_rng(0).permutation(len(x))
            if len(x) <= FOLDER_CALIBRATION + 1:
                raise SystemExit(f"{images}: {len(x)} images; more than "
                                 f"{FOLDER_CALIBRATION} are needed (the first calibrate)")
            calibration, scored = order[:FOLDER_CALIBRATION], order[FOLDER_CALIBRATION:]
            return pretrained.efficientnet_lite0(), x[calibration], (x[scored], y[scored]), None
        imagenet, labels = pretrained.imagenet_samples()
        x = pretrained.crops(imagenet, VIEWS, seed=2, smallest=0.7)
        y = np.repeat([labels[n] for n in imagenet], VIEWS)
        calibration = pretrained.crops(pretrained.object_photos(), 3, seed=0)
        return pretrained.efficientnet_lite0(), calibration, (x, y), None
    data = kshrink.datasets.load("fashion_mnist")
    model = kshrink.zoo.pretrained(name)
    return model, data.train[0][:512], data.test, data.train


def scores(reference, outputs, labels):
    """Top-1 agreement with the float model, cosine of the logits and top-1 accuracy."""
    cosine = np.sum(reference * outputs, 1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(outputs, axis=1))
    return {"agreement": float(np.mean(reference.argmax(1) == outputs.argmax(1))),
            "cosine": float(np.mean(cosine)),
            "accuracy": float(np.mean(outputs.argmax(1) == labels))}


def compress_timed(model, variant, data, x, y, reference) -> dict:
    """One row: `variant` given `data` (calibration examples, or the training set for the
    fine-tuned variants), timed, scored on `x`."""
    start = time.perf_counter()
    try:
        if variant in FINE_TUNED:
            small, _ = kshrink.compress(model, FINE_TUNED[variant], fine_tune=TUNE, data=data)
        else:
            small, _ = kshrink.compress(model, VARIANTS[variant], data=data)
    except kshrink.KshrinkError as e:
        return {"variant": variant, "error": str(e)}
    seconds = time.perf_counter() - start
    outputs = small.predict(x, batch_size=32, verbose=0)
    steps = [getattr(s, "iterations") for s in VARIANTS.get(variant, ())
             if getattr(s, "method", None) == "adaround" or getattr(s, "refit", False)]
    return {"variant": variant, "examples": len(data[0] if isinstance(data, tuple) else data),
            **({"steps_per_block": steps[0]} if steps else {}),
            "seconds": round(seconds, 1), **scores(reference, outputs, y)}


def child(variant: str, images: str | None) -> None:
    """Runs in a fresh process: prints the EfficientNet-Lite0 row of `variant`, calibrated on
    `SCALE_CALIBRATION` object crops, or on photos of the folder `images`."""
    import pretrained

    model, calibration, (x, y), _ = load("efficientnet_lite0", images)
    if not images:
        photos = pretrained.object_photos()
        per_photo = -(-SCALE_CALIBRATION // len(photos))
        calibration = pretrained.crops(photos, per_photo, seed=0)[:SCALE_CALIBRATION]
    reference = model.predict(x, batch_size=32, verbose=0)
    print(json.dumps({**compress_timed(model, variant, calibration, x, y, reference),
                      "scored": len(x)}))


def in_children(variants, images: str | None = None) -> list[dict]:
    """The EfficientNet-Lite0 row of each of `variants`, each in its own process, with the
    process's peak resident memory (Keras, TensorFlow, the model and its copies included)."""
    rows = []
    for variant in variants:
        command = [sys.executable, __file__, "--child", variant] + (
            ["--images", images] if images else [])
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        output = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        if status != 0:
            raise SystemExit(f"{variant}: the child process failed ({status})")
        row = json.loads(output.strip().splitlines()[-1])
        where = f"{Path(images).name} folder" if images else f"{SCALE_CALIBRATION} images"
        rows.append({"model": "efficientnet_lite0", **row, "variant": f"{variant}, {where}",
                     "peak_memory_mb": round(usage.ru_maxrss / 1024)})
        print(rows[-1], flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "resnet_fashion"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS) + list(FINE_TUNED))
    parser.add_argument("--replace", action="store_true",
                        help="replace only these models' and variants' rows in the results")
    parser.add_argument("--at-scale", action="store_true",
                        help=f"only time {', '.join(AT_SCALE)} with {SCALE_CALIBRATION} "
                             "calibration crops (replaces those rows)")
    parser.add_argument("--images", metavar="DIR",
                        help="an ImageNet-style folder (a subfolder per class, named by wnid, "
                             f"index or name): EfficientNet-Lite0 calibrated on "
                             f"{FOLDER_CALIBRATION} of its photos and scored on the others, "
                             f"{', '.join(ON_IMAGES)} (or --variants)")
    parser.add_argument("--child", metavar="VARIANT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.images)
    if args.at_scale or args.images:
        variants = AT_SCALE if args.at_scale else (
            args.variants if "--variants" in sys.argv else ON_IMAGES)
        rows = in_children(variants, args.images)
        replace_rows("post_training", rows, lambda r: any(r["variant"] == n["variant"]
                                                          for n in rows))
        return
    rows = []
    for name in args.models:
        model, calibration, (x, y), train = load(name)
        reference = model.predict(x, batch_size=32, verbose=0)
        rows.append({"model": name, "variant": "float", **scores(reference, reference, y)})
        print(rows[-1], flush=True)
        for variant in args.variants:
            if variant in FINE_TUNED and train is None:
                continue
            data = train if variant in FINE_TUNED else calibration
            rows.append({"model": name, **compress_timed(model, variant, data, x, y, reference)})
            print(rows[-1], flush=True)
    if args.replace:
        replace_rows("post_training", rows, lambda r: r["model"] in args.models
                     and r["variant"] in args.variants + ["float"],
                     key=lambda r: (r["model"], r["variant"]))
    else:  # everything but the --at-scale rows, which stay
        replace_rows("post_training", rows, lambda r: "peak_memory_mb" not in r)


if __name__ == "__main__":
    main()
