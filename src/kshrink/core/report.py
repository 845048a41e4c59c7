"""What a compression run did, layer by layer: data that renders as text, Markdown or JSON."""

from __future__ import annotations

import dataclasses
import json

from kshrink.render import Table, smaller

APPLIED = "applied"
SKIPPED = "skipped"


@dataclasses.dataclass(frozen=True)
class LayerResult:
    """What one technique did to one layer.

    Attributes:
        layer: the layer's name, or its path inside a custom layer (`block/query`).
        layer_type: its class name.
        action: `"applied"` or `"skipped"`.
        detail: what was done (e.g. "int8 weights, per-channel scales") or why it was skipped.
    """

    layer: str
    layer_type: str
    action: str
    detail: str


@dataclasses.dataclass(frozen=True)
class StepFidelity:
    """How closely the model after a step follows the original, on examples of the data.

    Attributes:
        examples: how many examples it was measured on.
        held_back: whether those examples are disjoint from the ones calibration used.
        cosine: mean cosine similarity of the outputs.
        agreement: top-1 agreement (None unless the model is a classifier).
        warning: one line when the step lost more than the tolerance, naming the layers
            whose weights moved most; else None.
    """

    examples: int
    held_back: bool
    cosine: float
    agreement: float | None = None
    warning: str | None = None

    @property
    def score(self) -> float:
        """Agreement for a classifier, else cosine: what the tolerance is checked against."""
        return self.cosine if self.agreement is None else self.agreement


@dataclasses.dataclass(frozen=True)
class StepReport:
    """The outcome of one recipe step, with its fidelity to the original when data was
    given."""

    technique: str
    options: dict
    layers: tuple[LayerResult, ...]
    summary: str | None = None
    fidelity: StepFidelity | None = None

    @property
    def applied(self) -> tuple[LayerResult, ...]:
        return tuple(r for r in self.layers if r.action == APPLIED)

    @property
    def skipped(self) -> tuple[LayerResult, ...]:
        return tuple(r for r in self.layers if r.action == SKIPPED)

    def table(self) -> Table:
        title = f"{self.technique}: {len(self.applied)} applied, {len(self.skipped)} skipped"
        return Table(
            title=title + (f"; {self.summary}" if self.summary else ""),
            columns=("layer", "type", "action", "detail"),
            rows=[(r.layer, r.layer_type, r.action, r.detail) for r in self.layers],
        )


def _some(names: list, shown: int = 3) -> str:
    """`a, b, c and 5 more`."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


@dataclasses.dataclass(frozen=True)
class CompressionReport:
    """Every step of a `kshrink.compress` run, with the weight totals before and after.

    The report holds no timings, so the same model and recipe give the same report on every
    backend (with data, up to float rounding in the fidelity figures).
    """

    steps: tuple[StepReport, ...]
    parameters_before: int
    parameters_after: int
    weight_bytes_before: int
    weight_bytes_after: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def tables(self, layers: bool = True) -> list[Table]:
        """The report as tables: each step's layers (with `layers`; else one line per step
        and the skip reasons grouped), the weights before and after, and the outputs against
        the original after each step."""
        summary = Table(
            title="weights",
            columns=("", "before", "after", "ratio"),
            rows=[
                ("parameters", f"{self.parameters_before:,}", f"{self.parameters_after:,}",
                 smaller(self.parameters_before, self.parameters_after)),
                ("weight bytes", f"{self.weight_bytes_before:,}", f"{self.weight_bytes_after:,}",
                 smaller(self.weight_bytes_before, self.weight_bytes_after)),
            ],
        )
        tables = ([step.table() for step in self.steps] if layers else self._overview()) + [
            summary]
        measured = [step for step in self.steps if step.fidelity is not None]
        if measured:
            f = measured[0].fidelity
            which = "held-back examples" if f.held_back else "examples also used to calibrate"
            tables.append(Table(
                title=f"outputs against the original, after each step, on {f.examples} {which}",
                columns=("step", "top-1 agreement", "cosine", ""),
                rows=[(step.technique,
                       "-" if step.fidelity.agreement is None else f"{step.fidelity.agreement:.4f}",
                       f"{step.fidelity.cosine:.4f}", step.fidelity.warning or "")
                      for step in measured]))
        return tables

    def _overview(self) -> list[Table]:
        steps = Table("steps", ("step", "applied", "skipped", ""),
                      [(s.technique, str(len(s.applied)), str(len(s.skipped)), s.summary or "")
                       for s in self.steps])
        reasons: dict = {}
        for s in self.steps:
            for r in s.skipped:
                reasons.setdefault((s.technique, r.detail), []).append(r.layer)
        if not reasons:
            return [steps]
        skipped = Table("skipped layers, by reason", ("step", "layers", "reason"),
                        [(step, _some(names), reason)
                         for (step, reason), names in reasons.items()])
        return [steps, skipped]

    def to_text(self, layers: bool = True) -> str:
        """Aligned text; `layers=False` leaves out the per-layer rows (`tables`)."""
        return "\n\n".join(t.to_text() for t in self.tables(layers))

    def to_markdown(self, layers: bool = True) -> str:
        return "\n\n".join(t.to_markdown() for t in self.tables(layers))

    def __str__(self) -> str:
        return self.to_text()

