"""Post-training reconstruction from calibration data, shared by the techniques: GPTQ-class
quantization and SparseGPT/Wanda pruning solved layer by layer, and BatchNorm re-estimation.

Backend-agnostic: the layers run through Keras, the solvers in NumPy.
"""

from kshrink.layers.rows import unsupported
from kshrink.reconstruct.sequential import (
    calibration_inputs,
    correct_batchnorm,
    input_energy,
    input_hessians,
    reconstruct,
    reestimate_batchnorm,
    solve_alone,
    stale_batchnorm,
)
from kshrink.reconstruct.solvers import choose_scales, gptq, sparsegpt, wanda

__all__ = ["calibration_inputs", "choose_scales", "correct_batchnorm", "gptq", "input_energy",
           "input_hessians", "reconstruct", "reestimate_batchnorm", "solve_alone", "sparsegpt",
           "stale_batchnorm", "unsupported", "wanda"]
