"""Sparsity over training steps: one-shot, constant, and polynomial decay (Zhu & Gupta, 2017)."""

from __future__ import annotations

import dataclasses

SCHEDULES = ("one_shot", "constant", "polynomial")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When masks are updated and to what sparsity.

    Attributes:
        kind: `"one_shot"` (prune to the target before fine-tuning, masks then fixed),
            `"constant"` (the target from `begin_step`, masks refreshed every `frequency`
            steps) or `"polynomial"` (from `initial_sparsity` at `begin_step` to the target at
            `end_step`: s_t = s_f + (s_i - s_f) * (1 - progress)^power).
        target: final sparsity.
        initial_sparsity, begin_step, end_step, frequency, power: as above.
    """

    kind: str
    target: float
    initial_sparsity: float = 0.0
    begin_step: int = 0
    end_step: int = 0
    frequency: int = 100
    power: float = 3.0

    def sparsity_at(self, step: int) -> float:
        if self.kind != "polynomial" or step >= self.end_step:
            return self.target
        progress = max(0.0, (step - self.begin_step) / max(1, self.end_step - self.begin_step))
        return self.target + (self.initial_sparsity - self.target) * (1 - progress) ** self.power

    def updates_at(self, step: int) -> bool:
        """Whether masks are recomputed before training step `step` (counted from 0)."""
        if self.kind == "one_shot" or step < self.begin_step:
            return False
        if self.kind == "polynomial" and step > self.end_step:
            return False
        return (step - self.begin_step) % self.frequency == 0 or step == self.end_step
