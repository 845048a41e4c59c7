"""Quantization: the `quantize` technique, calibration and quantization-aware training.

kshrink's quantized layer classes live in `kshrink.layers` (registered by `import kshrink`).
"""

from kshrink.quantize.calibrate import input_ranges
from kshrink.quantize.technique import Override, Quantize

__all__ = ["Override", "Quantize", "input_ranges"]
