"""Reports a person reads: `html` writes one self-contained page for a compressed model (its
measurements, what each step did, every layer before and after, and plots of where the bytes
are, per-layer sparsity and precision, latency and a search's candidates)."""

from kshrink.measure.html_report import html

__all__ = ["html"]
