"""Compress a pretrained CNN with only a calibration set: 512 unlabeled images, no training.

Int4 weights by GPTQ and by AdaRound (rounding learned block by block), then 75% of the
weights pruned by SparseGPT with BatchNorm statistics re-estimated, the sparsity of each layer
from one global threshold or from its measured sensitivity; each against round-to-nearest /
magnitude on the same model.

Run: .venv/bin/python examples/post_training.py   (trains the reference model once, ~10 min)
"""

import kshrink

model = kshrink.zoo.pretrained("resnet_fashion")
fashion = kshrink.datasets.load("fashion_mnist")
calibration = fashion.train[0][:512]  # inputs only: no labels are needed

recipes = {
    "int4, round to nearest": kshrink.Quantize(mode="int4", group_size=None),
    "int4, GPTQ": kshrink.Quantize(mode="int4", group_size=None, method="gptq"),
    "int4, AdaRound": kshrink.Quantize(mode="int4", group_size=None, method="adaround"),
    "75% pruned by magnitude": kshrink.Prune(sparsity=0.75, schedule="one_shot"),
    "75% pruned by SparseGPT": kshrink.Prune(sparsity=0.75, schedule="one_shot",
                                            method="sparsegpt"),
    "75% pruned by SparseGPT, sparsity per layer by sensitivity": kshrink.Prune(
        sparsity=0.75, schedule="one_shot", method="sparsegpt", scope="sensitivity"),
}
before = kshrink.measure.evaluate(model, *fashion.test)["accuracy"]
print(f"float: test accuracy {before:.4f}")
for name, recipe in recipes.items():
    small, report = kshrink.compress(model, recipe, data=calibration)
    after = kshrink.measure.evaluate(small, *fashion.test)["accuracy"]
    print(f"{name}: test accuracy {after:.4f} ({(after - before) * 100:+.2f} pp)")
    if report.steps[0].summary:
        print(f"  {report.steps[0].summary}")
