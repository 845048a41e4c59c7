"""Pruning: magnitude (per layer or global), schedules, block and N:M patterns, and structured
(channel) pruning over the model graph."""

from kshrink.prune.channels import Group, channel_groups, narrowed
from kshrink.prune.magnitude import Prune, PruningCallback, strip, update_masks, wrap
from kshrink.prune.masks import Pattern
from kshrink.prune.schedule import Schedule
from kshrink.prune.structured import StructuredPrune
from kshrink.prune.wrapper import PruneWrapper

__all__ = ["Group", "Pattern", "Prune", "PruneWrapper", "PruningCallback", "Schedule",
           "StructuredPrune", "channel_groups", "narrowed", "strip", "update_masks", "wrap"]
