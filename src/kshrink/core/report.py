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
class StepReport:
    """The outcome of one recipe step."""

    technique: str
    options: dict
    layers: tuple[LayerResult, ...]
    summary: str | None = None

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


@dataclasses.dataclass(frozen=True)
class CompressionReport:
    """Every step of a `kshrink.compress` run, with the weight totals before and after.

    The report holds no timings, so the same model and recipe give the same report on every
    backend.
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

    def tables(self) -> list[Table]:
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
        return [step.table() for step in self.steps] + [summary]

    def to_text(self) -> str:
        return "\n\n".join(t.to_text() for t in self.tables())

    def to_markdown(self) -> str:
        return "\n\n".join(t.to_markdown() for t in self.tables())

    def __str__(self) -> str:
        return self.to_text()

