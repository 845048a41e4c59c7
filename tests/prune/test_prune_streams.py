"""Fine-tuning from a stream on every backend: a PyDataset everywhere, a torch DataLoader on
torch; the pruned model matches the one fine-tuned from arrays."""

import keras
import numpy as np
import pytest

import kshrink
from conftest import Batches


def _pruned(mlp, data, x_test, y_test):
    recipe = kshrink.Prune(sparsity=0.8, scope="global", skip_first_last=False)
    small, report = kshrink.compress(mlp, recipe, data=data, fidelity_samples=0, verbose=False,
                                     fine_tune=kshrink.FineTune(epochs=2, batch_size=64,
                                                                verbose=False))
    kernels = [np.asarray(keras.ops.convert_to_numpy(l.kernel)) for l in small.layers
               if hasattr(l, "kernel")]
    zeros = sum(int((k == 0).sum()) for k in kernels) / sum(k.size for k in kernels)
    return zeros, kshrink.measure.evaluate(small, x_test, y_test)["accuracy"]


def test_a_pydataset_or_dataloader_fine_tunes_like_arrays(mlp, digits):
    x, y = digits.train
    x = x.astype("float32")
    x_test, y_test = digits.test
    _, reference = _pruned(mlp, (x, y), x_test, y_test)
    streams = {"PyDataset": Batches(x, y, 64)}
    if keras.backend.backend() == "torch":
        import torch

        dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
        streams["DataLoader"] = torch.utils.data.DataLoader(dataset, batch_size=64,
                                                            shuffle=True)
    for name, stream in streams.items():
        zeros, accuracy = _pruned(mlp, stream, x_test, y_test)
        assert abs(zeros - 0.8) < 0.01, name
        assert accuracy > reference - 0.05, (name, accuracy, reference)


def test_a_generator_without_its_length_is_refused(mlp, digits):
    x, y = digits.train
    batches = ((x[i:i + 64].astype("float32"), y[i:i + 64]) for i in range(0, len(x), 64))
    with pytest.raises(kshrink.KshrinkError, match="steps_per_epoch"):
        _pruned(mlp, batches, *digits.test)
