"""The example technique keeps kshrink's contract and its own promise."""

import numpy as np

from kshrink.layers import kernel_weights
from kshrink.testing import check_technique
from round_float16 import RoundFloat16


def test_keeps_the_contract_and_leaves_float16_values():
    run = check_technique(RoundFloat16(), tolerance=1e-3)
    kernels = [np.asarray(w) for layer in run.small.layers for w in kernel_weights(layer)]
    assert kernels
    for kernel in kernels:
        np.testing.assert_array_equal(kernel, kernel.astype(np.float16).astype(kernel.dtype))
