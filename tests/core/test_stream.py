"""Data as a stream: tf.data (batched or not), PyDataset and generators feed fine-tuning,
and calibration reads only their first examples."""

import itertools

import keras
import numpy as np
import pytest

import kshrink
from conftest import Batches
from kshrink.core.stream import as_stream

tf = pytest.importorskip("tensorflow")
pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                reason="tf.data pipelines")


def _sparsity(model):
    kernels = [keras.ops.convert_to_numpy(l.kernel) for l in model.layers
               if hasattr(l, "kernel")]
    return sum(int(np.sum(k == 0)) for k in kernels) / sum(k.size for k in kernels)


def _prune(mlp, data, **fine_tune):
    recipe = kshrink.Prune(sparsity=0.8, scope="global", skip_first_last=False)
    return kshrink.compress(mlp, recipe, data=data, fidelity_samples=0,
                            fine_tune=kshrink.FineTune(epochs=2, batch_size=64, verbose=False,
                                                       **fine_tune))[0]


def test_fine_tuning_from_streams_matches_arrays(mlp, digits):
    x, y = digits.train
    x = x.astype("float32")
    x_test, y_test = digits.test

    def accuracy(model):
        return kshrink.measure.evaluate(model, x_test, y_test)["accuracy"]

    reference = accuracy(_prune(mlp, (x, y)))
    streams = {
        "tf.data batched": tf.data.Dataset.from_tensor_slices((x, y)).shuffle(2000, seed=0)
        .batch(64),
        "tf.data unbatched": tf.data.Dataset.from_tensor_slices((x, y)),
        "PyDataset": Batches(x, y, 64),
    }
    distilled = _prune(mlp, streams["tf.data batched"], distill=True)
    assert accuracy(distilled) > reference - 0.05
    for name, stream in streams.items():
        pruned = _prune(mlp, stream)
        assert abs(_sparsity(pruned) - 0.8) < 0.01, name
        assert accuracy(pruned) > reference - 0.05, name


def test_a_generator_needs_its_length_and_loses_no_batch(mlp, digits):
    x, y = digits.train
    batches = [(x[i:i + 64].astype("float32"), y[i:i + 64]) for i in range(0, len(x), 64)]
    with pytest.raises(kshrink.KshrinkError, match="steps_per_epoch"):
        _prune(mlp, iter(batches))
    pruned = _prune(mlp, itertools.cycle(batches).__iter__(), steps_per_epoch=len(batches))
    assert abs(_sparsity(pruned) - 0.8) < 0.01
    stream = as_stream(iter(batches), steps_per_epoch=len(batches))
    head_x, _ = stream.head(100)  # draws two batches of 64
    np.testing.assert_array_equal(head_x, x[:100])
    source, steps = stream.for_fit(64)
    given = list(itertools.islice(source, 3))
    assert steps == len(batches) and [len(b[0]) for b in given] == [64, 64, 64]
    np.testing.assert_array_equal(given[0][0], batches[0][0])  # what head read comes back
    np.testing.assert_array_equal(given[2][0], batches[2][0])


def test_batches_that_do_not_split_over_the_devices_are_left_out(digits):
    x, y = digits.train
    sizes = [64, 33, 64]
    batches = [(x[:n], y[:n]) for n in sizes]
    source, _ = as_stream(iter(batches), steps_per_epoch=3).for_fit(64, split_over=2)
    assert [len(b[0]) for b in source] == [64, 64]
    dataset = tf.data.Dataset.from_tensor_slices((x[:161], y[:161])).batch(32)  # last: 1
    source, steps = as_stream(dataset).for_fit(32, split_over=2)
    assert [len(b[0]) for b in source] == [32] * 5 and steps is None  # it ends by itself


def test_calibration_reads_only_the_first_examples_of_a_stream(trained, digits):
    x = digits.train[0].astype("float32")
    endless = tf.data.Dataset.from_tensor_slices(x).repeat().batch(32)  # never ends
    small, report = kshrink.compress(trained, kshrink.Quantize(mode="int4", method="gptq"),
                                     data=endless, fidelity_samples=64)
    assert any("GPTQ" in r.detail for r in report.steps[0].applied)
    assert report.steps[0].fidelity.examples == 64
    stream = as_stream(endless, trained)
    assert len(stream.head(100)) == 100


def test_measurement_reads_datasets_and_refuses_generators(trained, digits):
    x, y = digits.test
    small, _ = kshrink.compress(trained, kshrink.Quantize(mode="int8"))
    dataset = tf.data.Dataset.from_tensor_slices((x.astype("float32"), y)).batch(50)
    streamed = kshrink.measure.compare(trained, small, dataset, load_runs=0, latency_runs=2)
    arrays = kshrink.measure.compare(trained, small, (x, y), load_runs=0, latency_runs=2)
    assert streamed.compressed.metrics["accuracy"] == pytest.approx(
        arrays.compressed.metrics["accuracy"], abs=1e-6)
    assert streamed.fidelity.top1_agreement == pytest.approx(arrays.fidelity.top1_agreement)
    with pytest.raises(kshrink.errors.MeasurementError, match="generator"):
        kshrink.measure.measure(small, iter([(x, y)]), load_runs=1, latency_runs=2)


def test_sensitivity_reads_the_first_examples_of_a_stream(trained, digits):
    from kshrink.analysis import sensitivity

    x, y = digits.test
    arrays = sensitivity(trained, (x[:96], y[:96]), samples=None)
    dataset = tf.data.Dataset.from_tensor_slices((x.astype("float32"), y)).batch(32)
    streamed = sensitivity(trained, dataset, samples=96)
    assert streamed.accuracy == pytest.approx(arrays.accuracy)
    assert [(e.layer, round(e.output_error, 5)) for e in streamed.layers] == [
        (e.layer, round(e.output_error, 5)) for e in arrays.layers]
