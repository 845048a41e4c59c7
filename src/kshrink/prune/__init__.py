"""Pruning: magnitude (per layer or global), schedules, block and N:M patterns, and structured
(channel) pruning over the model graph, and depth pruning (whole residual blocks)."""

from kshrink.prune.channels import Group, channel_groups, narrowed
from kshrink.prune.depth import Block, DepthPrune, residual_blocks
from kshrink.prune.magnitude import (Prune, PruningCallback, SparsityOverride, strip,
                                     update_masks, wrap)
from kshrink.prune.masks import Pattern
from kshrink.prune.schedule import Schedule
from kshrink.prune.structured import StructuredPrune
from kshrink.layers import PruneWrapper

__all__ = ["Block", "DepthPrune", "Group", "Pattern", "Prune", "PruneWrapper", "PruningCallback",
           "Schedule", "SparsityOverride", "StructuredPrune", "channel_groups", "narrowed", "residual_blocks", "strip",
           "update_masks", "wrap"]
