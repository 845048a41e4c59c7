"""Quantize a residual CNN: find the sensitive layers, then int4 with quantization-aware
training, keeping the sensitive ones at int8.

Run: .venv/bin/python examples/quantize_cnn.py   (trains the reference model once, ~10 min)
"""

import kshrink

model = kshrink.zoo.pretrained("resnet_fashion")
fashion = kshrink.datasets.load("fashion_mnist")

# Which layers suffer most at int4? Quantize one at a time and measure.
sensitivity = kshrink.analysis.sensitivity(model, fashion.test, mode="int4", group_size=None)
print(sensitivity.table().to_text())
keep_at_int8 = sensitivity.most_sensitive(2)

small, report = kshrink.compress(
    model,
    kshrink.Quantize(
        mode="int4", group_size=None, activation_bits=8, qat=True,
        overrides=[{"layers": {"names": keep_at_int8}, "mode": "int8"}],
    ),
    data=fashion.train,
    fine_tune=kshrink.FineTune(epochs=2, learning_rate=1e-4, distill=True),
)
print(report)
small.save("resnet-int4.keras")  # load it with `import kshrink.quantize; keras.saving.load_model`
print(kshrink.measure.compare(model, small, fashion.test, load_runs=3))
