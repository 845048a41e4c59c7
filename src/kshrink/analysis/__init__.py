"""Analyses that call `compress` to decide what to compress: above the API, never inside a
technique (`sensitivity`: which layers take low precision; `search`: the per-layer recipe that
compresses most within an accuracy budget)."""

from kshrink.analysis.search import (Candidate, Latency, Macs, Memory, Objective, SearchReport,
                                     Size, search)
from kshrink.analysis.sensitivity import LayerSensitivity, SensitivityReport, sensitivity

__all__ = ["Candidate", "LayerSensitivity", "Latency", "Macs", "Memory", "Objective",
           "SearchReport", "SensitivityReport", "Size", "search", "sensitivity"]
