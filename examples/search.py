"""Let kshrink find how far to prune each layer of LeNet-5 for the smallest file within 0.3
points of accuracy, then rerun the recipe it chose and write the HTML report.

Run: .venv/bin/python examples/search.py   (about 8 minutes on 2 cores)
"""

import kshrink

model = kshrink.zoo.pretrained("lenet5")  # trained once, then cached
mnist = kshrink.datasets.load("mnist")

small, report = kshrink.search(model, mnist.train, objective="size", max_accuracy_drop=0.3,
                               epochs=2, progress=print)
print(report)
print(report.recipe.to_yaml())

kshrink.save(small, "lenet5-searched.kshrink")
kshrink.report.html("lenet5-searched.html", small, model, report=report,
                    front=report.plot_points())
print(kshrink.measure.compare(model, small, mnist.test, load_runs=1))

# The recipe is plain data: on the same training examples it gives the same weights.
x, y = mnist.train
again, _ = kshrink.compress(model, report.recipe, data=(x[:report.training_examples],
                                                        y[:report.training_examples]))
