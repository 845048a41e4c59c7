import keras
import numpy as np
import pytest

import kshrink
import kshrink.core.graph
from kshrink.measure import (compare, fidelity, file_size, latency, load_cost, top1_accuracy)

from conftest import small_mlp


def test_file_size_deflates_redundant_files(tmp_path):
    path = tmp_path / "zeros.bin"
    path.write_bytes(bytes(1 << 20))
    size = file_size(path)
    assert size.bytes == 1 << 20
    assert size.deflated < size.bytes / 100
    noise = tmp_path / "noise.bin"
    noise.write_bytes(np.random.default_rng(0).bytes(1 << 16))
    assert file_size(noise).deflated >= (1 << 16)


def test_fidelity_and_accuracy():
    a = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], dtype=np.float32)
    same = fidelity(a, a)
    assert (same.top1_agreement, same.max_abs_diff, same.mean_abs_diff) == (1.0, 0.0, 0.0)
    assert same.cosine == pytest.approx(1.0)
    b = a.copy()
    b[2] = [0.3, 0.7]
    other = fidelity(a, b)
    assert other.top1_agreement == pytest.approx(2 / 3)
    assert other.max_abs_diff == pytest.approx(0.3)
    assert top1_accuracy(a, np.array([0, 1, 1])) == pytest.approx(2 / 3)
    assert top1_accuracy(a, np.eye(2)[[0, 1, 0]]) == 1.0


def test_latency_statistics_are_consistent(mlp, images):
    results = latency(mlp, images, batch_sizes=(1, 8), warmup=2, runs=10)
    assert [r.batch_size for r in results] == [1, 8]
    for r in results:
        assert 0 < r.median_ms <= r.p95_ms
        assert r.throughput == pytest.approx(r.batch_size / (r.median_ms / 1e3))


def test_load_cost_grows_with_the_model(tmp_path):
    keras.utils.set_random_seed(0)
    big = keras.Sequential([keras.Input((1000,)), keras.layers.Dense(4000)])  # 16 MB of float32
    small = small_mlp()
    big.save(tmp_path / "big.keras")
    small.save(tmp_path / "small.keras")
    big_cost = load_cost(tmp_path / "big.keras", runs=2)  # two probes, loading in turn
    small_cost = load_cost(tmp_path / "small.keras", runs=1)
    assert big_cost.runs == 2 and big_cost.seconds_range[0] <= big_cost.seconds_range[1]
    assert big_cost.seconds > 0 and small_cost.seconds > 0
    assert big_cost.resident_bytes > small_cost.resident_bytes + 8e6
    assert big_cost.peak_bytes >= big_cost.resident_bytes


def test_load_cost_reports_a_bad_file(tmp_path):
    path = tmp_path / "broken.keras"
    path.write_bytes(b"not a zip")
    with pytest.raises(kshrink.KshrinkError, match="fresh process failed"):
        load_cost(path, runs=3)  # the first failure ends the wave


def test_compare_puts_both_models_side_by_side(mlp, digits):
    small, _ = kshrink.compress(mlp, kshrink.Quantize())
    messages = []
    result = compare(mlp, small, digits.test, load_runs=1, latency_runs=5,
                     progress=messages.append)
    labels = [row[0] for row in result.table().rows]
    for label in ("parameters", "weight bytes", "file size", "load time", "load memory, peak",
                  "latency, batch 1 (median)", "latency, batch 32 (median)", "accuracy",
                  "top-1 agreement with original"):
        assert label in labels
    assert result.compressed.weights.bytes < result.original.weights.bytes
    assert result.compressed.file.bytes < result.original.file.bytes
    assert 0 <= result.fidelity.top1_agreement <= 1
    assert messages and "accuracy" in messages
    assert '"fidelity"' in result.to_json()


def test_a_change_inside_the_spread_is_no_measurable_change():
    from kshrink.render import NO_CHANGE, faster

    assert faster(2.0, 1.0, (1.9, 2.1), (0.9, 1.1)) == "2.00x faster"
    assert faster(2.0, 1.0, (1.2, 2.5), (0.9, 1.3)) == NO_CHANGE  # the spreads overlap
    assert faster(1.0, 1.03) == NO_CHANGE  # under 5%
    assert faster(1.0, 1.5) == "1.50x slower"


def test_comparing_a_model_with_its_copy_claims_no_speed_up(mlp, images):
    """The same model twice: no speed-up claimed. The other test worker shares the two cores,
    so one of three runs may catch a slow spell; the claim must not hold in all of them."""
    copy = kshrink.core.graph.copy_model(mlp)
    texts = []
    for _ in range(3):
        text = compare(mlp, copy, load_runs=1, latency_runs=30).to_text()
        rows = [line for line in text.splitlines() if "latency" in line or "load time" in line]
        assert rows and "no measurable change" in text
        texts.append(text)
        if all("faster" not in r and "slower" not in r for r in rows):
            return
    raise AssertionError("a copy was claimed faster or slower in 3 runs:\n" + texts[-1])


def test_measuring_batches_hold_a_bounded_size_of_inputs():
    from kshrink.measure.accuracy import BATCH_BYTES, BATCH_EXAMPLES, batch_size_for

    assert batch_size_for(np.zeros((1000, 28, 28), "float32")) == BATCH_EXAMPLES
    images = np.zeros((600, 224, 224, 3), "float32")
    size = batch_size_for(images)
    assert size * images[0].nbytes <= BATCH_BYTES < (size + 1) * images[0].nbytes
    both = {"a": images, "b": images}
    assert batch_size_for(both) == BATCH_BYTES // (2 * images[0].nbytes)
    assert batch_size_for(np.zeros((10, 4096, 4096), "float32")) == 1
