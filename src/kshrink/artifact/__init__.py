"""The compact, safe model file: `save` / `load` of `.kshrink` files."""

from kshrink.artifact.container import SUFFIX, ArtifactError, load, save

__all__ = ["SUFFIX", "ArtifactError", "load", "save"]
