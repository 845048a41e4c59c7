"""Fine-tuning at scale: the same recipe fed from numpy arrays and from a `tf.data` pipeline,
on one device and on two (JAX `DataParallel`, TensorFlow `MirroredStrategy`), and streamed from
an image folder several times larger than the process's memory.

Recipe (the issue's acceptance): LeNet-300-100 on MNIST, `Prune(sparsity=0.9, scope=global)`
with 3 epochs of distillation, batch 128. Every row runs in a fresh process, so its peak
resident memory is its own. Two devices on this 2-core machine share the same two cores: the
rows check that data parallelism gives the same model, not that it is faster here.

The folder row writes `--folder-gb` of uncompressed 768x768 grey PNGs (Fashion-MNIST, scaled
up) in class folders to a temporary directory, then prunes a Fashion-MNIST CNN by half with one
epoch of fine-tuning streamed from it (`kshrink.datasets.from_directory`, images resized to
28x28 on the fly), and deletes the folder.

Run: .venv/bin/python benchmarks/fine_tune_at_scale.py [--rows NAME ...] [--folder-gb 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = {  # name: (backend, devices, feed, distribution)
    "numpy, TF, 1 device": ("tensorflow", 1, "numpy", None),
    "tf.data, TF, 1 device": ("tensorflow", 1, "tf.data", None),
    "numpy, TF, 2 devices (MirroredStrategy)": ("tensorflow", 2, "numpy", "data_parallel"),
    "numpy, JAX, 1 device": ("jax", 1, "numpy", None),
    "tf.data, JAX, 1 device": ("jax", 1, "tf.data", None),
    "numpy, JAX, 2 devices (DataParallel)": ("jax", 2, "numpy", "data_parallel"),
    "tf.data, JAX, 2 devices (DataParallel)": ("jax", 2, "tf.data", "data_parallel"),
    "image folder, TF, 1 device": ("tensorflow", 1, "folder", None),
}
EPOCHS, BATCH = 3, 128


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--folder-gb", type=float, default=8.0)
    parser.add_argument("--row", help=argparse.SUPPRESS)  # one row, in this process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print("ROW " + json.dumps(run_row(args.row, args.folder)))
        return
    rows = []
    for name in args.rows:
        backend, devices, feed, _ = ROWS[name]
        folder = None
        if feed == "folder":
            folder = tempfile.mkdtemp(prefix="kshrink-folder-")
            written = write_folder(Path(folder), args.folder_gb)
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   KSHRINK_DEVICES=str(devices))
        try:
            done = subprocess.run([sys.executable, __file__, "--row", name]
                                  + (["--folder", folder] if folder else []),
                                  capture_output=True, text=True, env=env, timeout=3600)
        finally:
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        row = json.loads(next(line for line in done.stdout.splitlines()
                              if line.startswith("ROW "))[4:])
        if folder:
            row.update(written)
            row["folder_over_peak_rss"] = row["folder_bytes"] / (row["peak_rss_mb"] * 2**20)
        print(json.dumps(row))
        rows.append(row)
    from common import replace_rows, write_rows

    names = {row["row"] for row in rows}
    path = Path(__file__).with_name("results") / "fine_tune_at_scale.json"
    if path.exists():
        replace_rows("fine_tune_at_scale", rows, lambda r: r["row"] in names)
    else:
        write_rows("fine_tune_at_scale", rows)


def write_folder(folder: Path, gigabytes: float) -> dict:
    """Fashion-MNIST training images scaled to 768x768, as uncompressed grey PNGs in one
    folder per class, until `gigabytes` are written."""
    import numpy as np
    import tensorflow as tf

    import kshrink

    x, y = kshrink.datasets.load("fashion_mnist").train
    side, written, count, started = 768, 0, 0, time.perf_counter()
    for label in range(10):
        (folder / f"class_{label}").mkdir(parents=True)
    while written < gigabytes * 2**30:
        i = count % len(x)
        image = np.kron(x[i], np.ones((side // 28, side // 28), np.uint8))[..., None]
        encoded = tf.io.encode_png(image, compression=0).numpy()
        (folder / f"class_{y[i]}" / f"{count:06d}.png").write_bytes(encoded)
        written += len(encoded)
        count += 1
    return {"folder_images": count, "folder_bytes": written,
            "folder_write_s": time.perf_counter() - started}


def run_row(name: str, folder: str | None) -> dict:
    backend, devices, feed, distribution = ROWS[name]
    if backend == "tensorflow" and devices > 1:
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
    import keras
    import numpy as np

    import kshrink

    keras.utils.set_random_seed(0)
    tune = kshrink.FineTune(epochs=1 if feed == "folder" else EPOCHS, batch_size=BATCH,
                            distill=True, verbose=False, distribution=distribution)
    if feed == "folder":
        model, recipe, data, test = _folder_case(folder)
    else:
        model = kshrink.zoo.pretrained("lenet_300_100")
        recipe = kshrink.Prune(sparsity=0.9, scope="global")
        mnist = kshrink.datasets.load("mnist")
        data, test = mnist.train, mnist.test
        if feed == "tf.data":
            import tensorflow as tf

            data = (tf.data.Dataset.from_tensor_slices(data).shuffle(60_000, seed=0)
                    .batch(BATCH).prefetch(2))
    started = time.perf_counter()
    small, report = kshrink.compress(model, recipe, data=data, fine_tune=tune,
                                     fidelity_samples=0, verbose=False)
    seconds = time.perf_counter() - started
    accuracy = kshrink.measure.evaluate_data(small, test)["accuracy"]
    baseline = kshrink.measure.evaluate_data(model, test)["accuracy"]
    kernels = [np.asarray(keras.ops.convert_to_numpy(w)) for w in small.weights
               if len(w.shape) >= 2]
    examples = tune.epochs * (int(data.cardinality()) * BATCH if feed == "folder" else 60_000)
    return {"row": name, "backend": backend, "devices": devices, "feed": feed,
            "accuracy": accuracy, "baseline_accuracy": baseline,
            "zeros": float(sum((k == 0).sum() for k in kernels) / sum(k.size for k in kernels)),
            "seconds": seconds, "examples_per_s": examples / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "summary": report.steps[0].summary}


def _folder_case(folder: str):
    """The zoo's Fashion-MNIST CNN behind a channel axis (image folders give (28, 28, 1)),
    pruned by half, fed from the folder."""
    import keras

    import kshrink

    inner = kshrink.zoo.pretrained("resnet_fashion")
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Reshape((28, 28)), inner])
    data = kshrink.datasets.from_directory(folder, (28, 28), channels=1, batch_size=BATCH,
                                           validation_split=0.2)
    return model, kshrink.Prune(sparsity=0.5), data.train, data.test


if __name__ == "__main__":
    main()
