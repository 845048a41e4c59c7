"""Quantizing whole CNNs: LeNet-5 (MNIST) and the residual CNN (Fashion-MNIST).

Variants, each from the same trained float model:
- float32;
- Keras built-in int8 (`model.quantize("int8")`: Dense only, Conv stays float);
- the TFLite converter's full-integer post-training quantization (representative dataset of
  the same calibration images kshrink uses), evaluated with the TFLite interpreter;
- kshrink post-training int8 and int4 (weights only), and int8 with calibrated 8-bit
  activations (W8A8);
- kshrink quantization-aware training: int8 weights + 8-bit activations (PACT), and int4
  weights, each fine-tuned for `--qat-epochs` epochs.

Reports test accuracy, weight bytes, the `.keras` file size, and the memory still held after
loading the file in a fresh process (median of `--load-runs`).
Run: .venv/bin/python benchmarks/quantize_cnn.py [--qat-epochs 2] [--load-runs 3]
"""

import argparse
import tempfile
from pathlib import Path

import keras
import numpy as np
from common import write_rows

import kshrink
from kshrink.core.graph import copy_model
from kshrink.measure import evaluate, file_size, load_cost, weight_stats

MODELS = {"lenet5": "mnist", "resnet_fashion": "fashion_mnist"}
CALIBRATION = 512


def kshrink_variants(qat_epochs):
    tune = kshrink.FineTune(epochs=qat_epochs, learning_rate=1e-4, batch_size=128,
                            distill=True, verbose=False)
    return {
        "kshrink PTQ int8": (kshrink.Quantize(mode="int8"), None),
        "kshrink PTQ int8 W8A8": (kshrink.Quantize(mode="int8", activation_bits=8), None),
        "kshrink PTQ int4": (kshrink.Quantize(mode="int4", group_size=None, keep_int8=False),
                             None),
        "kshrink QAT int8 W8A8": (kshrink.Quantize(mode="int8", activation_bits=8, qat=True),
                                  tune),
        "kshrink QAT int4": (kshrink.Quantize(mode="int4", group_size=None, qat=True,
                                              keep_int8=False), tune),
    }


def tflite_int8(model, calibration, x_test, y_test, path):
    """Full-integer TFLite conversion and its test accuracy through the TFLite interpreter."""
    import tensorflow as tf

    def representative():
        for image in calibration:
            yield [image[None].astype("float32")]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    path.write_bytes(converter.convert())
    interpreter = tf.lite.Interpreter(model_path=str(path))
    batch = 500
    interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"],
                                    [batch, *x_test.shape[1:]])
    interpreter.allocate_tensors()
    (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
    predictions = []
    for start in range(0, len(x_test), batch):
        interpreter.set_tensor(source["index"], x_test[start:start + batch].astype("float32"))
        interpreter.invoke()
        predictions.append(interpreter.get_tensor(target["index"]).argmax(-1))
    return float(np.mean(np.concatenate(predictions) == y_test))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--load-runs", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="models to run (default: both)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, dataset in MODELS.items():
            if args.only and name not in args.only:
                continue
            data = kshrink.datasets.load(dataset)
            x_train, y_train = data.train
            x_test, y_test = data.test
            model = kshrink.zoo.pretrained(name)
            float_bytes = weight_stats(model).bytes

            def row(variant, small, accuracy=None, path=None):
                path = path or Path(tmp) / f"{name}-{len(rows)}.keras"
                if path.suffix == ".keras":
                    small.save(path)
                    resident = load_cost(path, runs=args.load_runs).resident_bytes
                    weights = weight_stats(small).bytes
                else:
                    resident, weights = None, None
                accuracy = evaluate(small, x_test, y_test)["accuracy"] if accuracy is None \
                    else accuracy
                rows.append({
                    "model": name, "variant": variant, "test_accuracy": accuracy,
                    "weight_bytes": weights,
                    "weight_ratio": None if weights is None else round(weights / float_bytes, 4),
                    "file_bytes": file_size(path).bytes, "loaded_resident_bytes": resident,
                })
                print(rows[-1], flush=True)

            row("float32", model)
            keras_int8 = copy_model(model)
            keras_int8.quantize("int8")
            row("Keras model.quantize int8", keras_int8)
            tflite_path = Path(tmp) / f"{name}.tflite"
            accuracy = tflite_int8(model, x_train[:CALIBRATION], x_test, y_test, tflite_path)
            row("TFLite converter int8", None, accuracy, tflite_path)
            for variant, (technique, tune) in kshrink_variants(args.qat_epochs).items():
                keras.utils.set_random_seed(0)
                small, _ = kshrink.compress(model, technique, data=(x_train, y_train),
                                            fine_tune=tune)
                row(variant, small)
    write_rows("quantize_cnn", rows)


if __name__ == "__main__":
    main()
