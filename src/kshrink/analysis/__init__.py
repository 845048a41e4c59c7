"""Analyses that call `compress` to decide what to compress: above the API, never inside a
technique (`sensitivity`: which layers take low precision; `search`: the per-layer recipe that
compresses most within an accuracy budget)."""

from kshrink.analysis.search import Candidate, SearchReport, search
from kshrink.analysis.sensitivity import LayerSensitivity, SensitivityReport, sensitivity

__all__ = ["Candidate", "LayerSensitivity", "SearchReport", "SensitivityReport", "search",
           "sensitivity"]
