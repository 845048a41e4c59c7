"""Analyses that call `compress` to decide what to compress: above the API, never inside a
technique (e.g. `sensitivity`: which layers take low precision)."""

from kshrink.analysis.sensitivity import LayerSensitivity, SensitivityReport, sensitivity

__all__ = ["LayerSensitivity", "SensitivityReport", "sensitivity"]
