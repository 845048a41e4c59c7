"""Reference models, trained here from a seed and cached, since no pretrained weights are offline."""

from kshrink.zoo.models import MODELS, build, cache_dir, pretrained

__all__ = ["MODELS", "build", "cache_dir", "pretrained"]
