"""Quantize a trained LeNet-300-100 to int8 and compare it with the original.

Run: .venv/bin/python examples/quickstart.py
"""

import kshrink

model = kshrink.zoo.pretrained("lenet_300_100")  # trained once, then cached
mnist = kshrink.datasets.load("mnist")

small, report = kshrink.compress(model, [kshrink.Quantize(mode="int8")])
print(report)

small.save("lenet-int8.keras")  # a plain .keras file: loads without kshrink
print(kshrink.measure.compare(model, small, mnist.test, load_runs=3))
