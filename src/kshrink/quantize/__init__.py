"""Quantization techniques."""

from kshrink.quantize.keras_native import Quantize

__all__ = ["Quantize"]
