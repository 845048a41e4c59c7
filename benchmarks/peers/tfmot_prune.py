"""Runs in the peer environment: tfmot magnitude pruning of a LeNet with given baseline weights.

Job (JSON argument): model name, weights .npz (arrays w0..wN in get_weights order), data .npz
(x_train, y_train, x_test, y_test as uint8 images/int labels), sparsity, epochs, batch_size,
learning_rate, seed, output path for the pruned weights. Prints `RESULT {json}`.
"""

import json
import sys

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras
from tf_keras import layers


def build(name):
    inputs = keras.Input((28, 28))
    x = layers.Rescaling(1 / 255)(inputs)
    if name == "lenet_300_100":
        x = layers.Flatten()(x)
        x = layers.Dense(300, activation="relu")(x)
        x = layers.Dense(100, activation="relu")(x)
        outputs = layers.Dense(10, activation="softmax")(x)
    else:
        x = layers.Reshape((28, 28, 1))(x)
        x = layers.Conv2D(20, 5)(x)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Conv2D(50, 5)(x)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Flatten()(x)
        x = layers.Dense(500, activation="relu")(x)
        outputs = layers.Dense(10, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def load_job(job):
    """(data, model with the baseline weights) for a job; seeds everything first."""
    tf.keras.utils.set_random_seed(job["seed"])
    data = np.load(job["data"])
    weights = np.load(job["weights"])
    model = build(job["model"])
    model.set_weights([weights[f"w{i}"] for i in range(len(weights.files))])
    return data, model


def main(job):
    data, model = load_job(job)
    steps = job["epochs"] * -(-len(data["x_train"]) // job["batch_size"])
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=job["sparsity"], begin_step=0,
        end_step=(2 * steps) // 3, frequency=100)
    # tfmot refuses layers it has no rule for (Rescaling): wrap the Dense/Conv layers only,
    # every one of them, as its guide shows.
    def wrap(layer):
        if isinstance(layer, (layers.Dense, layers.Conv2D)):
            return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
        return layer

    pruned = keras.models.clone_model(model, clone_function=wrap)
    pruned.compile(optimizer=keras.optimizers.Adam(
        keras.optimizers.schedules.CosineDecay(job["learning_rate"], steps)),
        loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    pruned.fit(data["x_train"], data["y_train"], batch_size=job["batch_size"],
               epochs=job["epochs"], shuffle=True, verbose=0,
               callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    final = tfmot.sparsity.keras.strip_pruning(pruned)
    predictions = final.predict(data["x_test"], batch_size=512, verbose=0)
    accuracy = float(np.mean(predictions.argmax(1) == data["y_test"]))
    kernels = [w for layer in final.layers for w in layer.get_weights()[:1] if layer.get_weights()]
    zeros = sum(int(np.sum(k == 0)) for k in kernels)
    total = sum(k.size for k in kernels)
    print("RESULT " + json.dumps({"test_accuracy": accuracy, "weight_sparsity": zeros / total}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
