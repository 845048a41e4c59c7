"""Quantization: the `quantize` technique, kshrink's quantized layers, calibration, QAT.

Importing this package registers kshrink's quantized layer classes with Keras, so that
`keras.saving.load_model` can load a model that holds them.
"""

from kshrink.quantize import layers
from kshrink.quantize.calibrate import input_ranges
from kshrink.quantize.sensitivity import SensitivityReport, sensitivity
from kshrink.quantize.technique import Override, Quantize

__all__ = ["Override", "Quantize", "SensitivityReport", "input_ranges", "layers", "sensitivity"]
