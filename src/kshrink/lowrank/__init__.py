"""Low-rank factorization of Dense and Conv2D layers."""

from kshrink.lowrank.technique import LowRank

__all__ = ["LowRank"]
