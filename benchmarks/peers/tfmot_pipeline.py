"""Runs in the peer environment: tfmot's best size pipeline on a LeNet from given weights.

Prune (polynomial schedule) -> strip -> sparsity-preserving clustering (linear init) ->
fine-tune -> strip -> sizes of the gzipped .h5 and of the gzipped TFLite file. Prints
`RESULT {json}`.
"""

import gzip
import json
import os
import sys
import tempfile

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras

sys.path.insert(0, os.path.dirname(__file__))
from tfmot_prune import load_job  # noqa: E402


def fit(model, data, job, callbacks=()):
    steps = job["epochs"] * -(-len(data["x_train"]) // job["batch_size"])
    model.compile(optimizer=keras.optimizers.Adam(
        keras.optimizers.schedules.CosineDecay(job["learning_rate"], steps)),
        loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(data["x_train"], data["y_train"], batch_size=job["batch_size"],
              epochs=job["epochs"], shuffle=True, verbose=0, callbacks=list(callbacks))
    return steps


def gzip_size(path):
    with open(path, "rb") as f:
        return len(gzip.compress(f.read(), 9))


def main(job):
    data, model = load_job(job)
    steps = job["epochs"] * -(-len(data["x_train"]) // job["batch_size"])
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, job["sparsity"], 0, (2 * steps) // 3, 100)
    kinds = (keras.layers.Dense, keras.layers.Conv2D)
    pruned = keras.models.clone_model(model, clone_function=lambda l: (
        tfmot.sparsity.keras.prune_low_magnitude(l, pruning_schedule=schedule)
        if isinstance(l, kinds) else l))
    fit(pruned, data, job, [tfmot.sparsity.keras.UpdatePruningStep()])
    model = tfmot.sparsity.keras.strip_pruning(pruned)
    clustered = keras.models.clone_model(model, clone_function=lambda l: (
        tfmot.clustering.keras.cluster_weights(
            l, number_of_clusters=job["clusters"], preserve_sparsity=True,
            cluster_centroids_init=tfmot.clustering.keras.CentroidInitialization.LINEAR)
        if isinstance(l, kinds) else l))
    fit(clustered, data, job)
    final = tfmot.clustering.keras.strip_clustering(clustered)
    predictions = final.predict(data["x_test"], batch_size=512, verbose=0)
    accuracy = float(np.mean(predictions.argmax(1) == data["y_test"]))
    with tempfile.TemporaryDirectory() as tmp:
        h5 = os.path.join(tmp, "m.h5")
        final.save(h5, include_optimizer=False)
        tflite = os.path.join(tmp, "m.tflite")
        with open(tflite, "wb") as f:
            f.write(tf.lite.TFLiteConverter.from_keras_model(final).convert())
        sizes = {"h5_gzip_bytes": gzip_size(h5), "tflite_gzip_bytes": gzip_size(tflite)}
    print("RESULT " + json.dumps({"test_accuracy": accuracy, **sizes}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
