"""What `search` tried and what it chose: `Candidate` and `SearchReport`."""

from __future__ import annotations

import dataclasses

from kshrink.core.recipe import Recipe
from kshrink.deploy import RUNTIME_NAMES
from kshrink.render import Table


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One recipe the search compressed, fine-tuned and measured.

    Attributes:
        levels: the level each dimension was given, by name: a layer's path for its
            sparsity (or its bit width for `memory`), `path:weights` for its encoding (a
            cluster count, "int8", "int4" or "float"), a residual block's merge layer
            ("keep" or "remove"), `channels` (or `channels conv1+conv2`) for a ratio.
        recipe: the recipe that made it.
        objective: what it measured: file bytes for `size`, resident weight bytes for
            `memory`, microseconds per forward pass for `latency`, MACs per example for
            `macs`.
        accuracy: top-1 accuracy on the held-out examples.
        within_budget: whether it lost at most `max_accuracy_drop`.
        seconds: how long compressing it took.
    """

    levels: dict
    recipe: Recipe
    objective: int
    accuracy: float
    within_budget: bool
    seconds: float


@dataclasses.dataclass(frozen=True)
class SearchReport:
    """What `search` tried and what it chose.

    Attributes:
        objective: `"size"`, `"memory"`, `"latency"` or `"macs"`.
        max_accuracy_drop: the budget, in percentage points of held-out accuracy.
        accuracy: the original model's held-out accuracy.
        original_objective: the original's objective (its compact file's bytes for `size`,
            its latency unfolded for `latency`).
        float_bytes: the original's weight bytes.
        training_examples: how many examples of `data` the candidates were fine-tuned on
            (the first ones; the rest were held out unless `validation_data` was given).
        held_out_examples: how many examples judged the candidates.
        loss_rise: per layer (or block, or `channels`), `(level, loss rise)` for each level
            it could take, least compressed first: the held-out loss rise with it alone
            compressed so (after `probe_steps` of fine-tuning).
        candidates: every candidate, in the order they were tried.
        chosen: the index of the winner in `candidates`; None when none kept the budget.
    """

    objective: str
    max_accuracy_drop: float
    accuracy: float
    original_objective: int
    float_bytes: int
    training_examples: int
    held_out_examples: int
    loss_rise: dict
    candidates: tuple[Candidate, ...]
    chosen: int | None
    probe_steps: int = 0  # optimizer steps each probe was fine-tuned for before its loss
    latency_runtime: str = "keras"  # where `latency` was timed

    @property
    def best(self) -> Candidate | None:
        return None if self.chosen is None else self.candidates[self.chosen]

    @property
    def recipe(self) -> Recipe | None:
        """The winner's recipe (None when no candidate kept the budget)."""
        return None if self.best is None else self.best.recipe

    def front(self) -> list[Candidate]:
        """The candidates no other beats on both objective and accuracy, smallest first."""
        ordered = sorted(self.candidates, key=lambda c: (c.objective, -c.accuracy))
        front, best = [], -1.0
        for candidate in ordered:
            if candidate.accuracy > best:
                front.append(candidate)
                best = candidate.accuracy
        return front

    @property
    def objective_label(self) -> str:
        latency = "latency, us" + ("" if self.latency_runtime == "keras"
                                   else f" ({RUNTIME_NAMES[self.latency_runtime]})")
        return {"size": "file bytes (.kshrink)", "memory": "weight bytes in memory",
                "latency": latency, "macs": "MACs per example"}[self.objective]

    def plot_points(self) -> tuple[str, list]:
        """`(label, [(objective, accuracy, chosen), ...])`, as `kshrink.report.html(front=)`
        takes them; the original is the first point."""
        points = [(self.original_objective, self.accuracy, False)]
        points += [(c.objective, c.accuracy, i == self.chosen)
                   for i, c in enumerate(self.candidates)]
        return self.objective_label, points

    def table(self) -> Table:
        front = {id(c) for c in self.front()}
        rows = [("original", f"{self.original_objective:,}", "1.00x",
                 f"{100 * self.accuracy:.2f}%", "+0.00", "", "")]
        for i, c in enumerate(self.candidates):
            mark = "chosen" if i == self.chosen else ("front" if id(c) in front else "")
            rows.append((f"{i + 1}: {describe(c.levels)}", f"{c.objective:,}",
                         f"{self.original_objective / c.objective:.2f}x",
                         f"{100 * c.accuracy:.2f}%",
                         f"{100 * (c.accuracy - self.accuracy):+.2f}",
                         "yes" if c.within_budget else "no", mark))
        title = (f"search for {self.objective} within {self.max_accuracy_drop:g} pp, judged on "
                 f"{self.held_out_examples:,} held-out examples")
        return Table(title, ("candidate", self.objective_label, "gain", "accuracy",
                             "change (pp)", "in budget", ""), rows)

    def layer_table(self) -> Table:
        title = "held-out loss rise with one layer compressed alone, and the choice"
        if self.probe_steps:
            title = title.replace(" alone,", f" alone and fine-tuned {self.probe_steps} steps,")
        choices = {tuple(level for level, _ in pairs) for pairs in self.loss_rise.values()}
        rows = []
        for path, pairs in self.loss_rise.items():
            chosen = level_text(self.best.levels[path]) if self.best else "-"
            if len(choices) == 1:
                rows.append((path, chosen, *(f"{rise:+.4f}" for _, rise in pairs)))
            else:
                rows.append((path, chosen, ", ".join(f"{level_text(level)} {rise:+.4f}"
                                                     for level, rise in pairs)))
        if len(choices) == 1:
            return Table(title, ("layer", "chosen", *map(level_text, choices.pop())), rows)
        return Table(title, ("layer", "chosen", "loss rise by level"), rows)

    def tables(self) -> list[Table]:
        return [self.table(), self.layer_table()]

    def to_text(self) -> str:
        lines = [self.table().to_text(), "", self.layer_table().to_text()]
        if self.best is None:
            lines += ["", f"no candidate kept held-out accuracy within "
                          f"{self.max_accuracy_drop:g} pp: nothing is chosen"]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()

    def to_dict(self) -> dict:
        return {
            "objective": self.objective, "max_accuracy_drop": self.max_accuracy_drop,
            "accuracy": self.accuracy, "original_objective": self.original_objective,
            "float_bytes": self.float_bytes, "training_examples": self.training_examples,
            "held_out_examples": self.held_out_examples,
            "loss_rise": {k: [list(pair) for pair in v] for k, v in self.loss_rise.items()},
            "probe_steps": self.probe_steps, "latency_runtime": self.latency_runtime,
            "chosen": self.chosen,
            "candidates": [{"levels": c.levels, "recipe": c.recipe.to_data(),
                            "objective": c.objective, "accuracy": c.accuracy,
                            "within_budget": c.within_budget, "seconds": c.seconds}
                           for c in self.candidates],
        }


def level_text(level) -> str:
    """`90%` for a share, the level itself otherwise (`int4`, `16`, `remove`)."""
    return f"{level:.0%}" if isinstance(level, float) else str(level)


def describe(levels: dict) -> str:
    """`conv2 90%, fc1 98%`: the dimensions that moved from their untouched level."""
    moved = [(p, v) for p, v in levels.items() if v not in (0.0, "float", "keep")]
    if not moved:
        return "no layer compressed"
    return ", ".join(f"{p} {level_text(v)}" for p, v in moved)
