import numpy as np

import kshrink
from kshrink import Quantize
from kshrink.measure import weight_stats


def test_float_counts_match_keras(cnn):
    stats = weight_stats(cnn)
    assert stats.parameters == cnn.count_params()
    assert stats.bytes == 4 * cnn.count_params()
    assert stats.bytes_by_dtype == {"float32": stats.bytes}
    assert [l.name for l in stats.layers] == ["conv1", "bn1", "conv2", "fc1", "fc2"]


def test_nonzeros_follow_the_weights(mlp):
    kernel = mlp.get_layer("fc1").kernel
    values = np.array(kernel)
    values[:, :32] = 0
    kernel.assign(values)
    stats = weight_stats(mlp)
    fc1 = next(l for l in stats.layers if l.name == "fc1")
    assert fc1.parameters - fc1.nonzeros == 64 * 32 + np.sum(np.array(mlp.get_layer("fc1").bias) == 0)


def test_quantized_storage_by_dtype(mlp):
    int8, _ = kshrink.compress(mlp, Quantize(mode="int8"))
    int4, _ = kshrink.compress(mlp, Quantize(mode="int4", group_size=None))
    s8, s4 = weight_stats(int8), weight_stats(int4)
    kernels = 64 * 64 + 64 * 10
    assert s8.bytes_by_dtype["int8"] == kernels
    assert s4.bytes_by_dtype["int4"] == kernels // 2
    # a packed int4 byte holds two parameters
    fc2 = next(l for l in s4.layers if l.name == "fc2")
    assert fc2.parameters >= 64 * 10
    assert s4.table().rows[-1][0] == "total"
