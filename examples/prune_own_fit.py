"""Gradual pruning inside your own `model.fit`, on any backend.

Run: .venv/bin/python examples/prune_own_fit.py
"""

import keras

import kshrink

model = kshrink.zoo.pretrained("lenet_300_100")
mnist = kshrink.datasets.load("mnist")

config = kshrink.Prune(sparsity=0.9, scope="global", end_step=1000, frequency=100)
pruned = kshrink.prune.wrap(model, config)  # a copy: masks as layer state, all ones at first
pruned.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy",
               metrics=["accuracy"])
pruned.fit(*mnist.train, batch_size=128, epochs=3,
           callbacks=[kshrink.prune.PruningCallback(pruned)])  # the schedule wrap set up

final = kshrink.prune.strip(pruned)  # stock Dense layers, zeros baked in
final.save("lenet-pruned.keras")  # loads with plain keras.saving.load_model
print(kshrink.measure.weight_stats(final).table().to_text())
print("test accuracy:", kshrink.measure.evaluate(final, *mnist.test)["accuracy"])
