"""Pruning: magnitude (per layer or global), schedules, block and N:M patterns."""

from kshrink.prune.magnitude import Prune, PruningCallback, strip, update_masks, wrap
from kshrink.prune.masks import Pattern
from kshrink.prune.schedule import Schedule
from kshrink.prune.wrapper import PruneWrapper

__all__ = ["Pattern", "Prune", "PruneWrapper", "PruningCallback", "Schedule",
           "strip", "update_masks", "wrap"]
