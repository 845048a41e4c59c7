"""One small table type that every report and measurement renders through."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Table:
    """A titled table of strings, rendered as aligned text, Markdown, JSON or a rich table."""

    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[str]]

    def to_text(self) -> str:
        cells = [list(self.columns)] + [[str(c) for c in row] for row in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]

        def line(row):
            first, *rest = row
            return "  ".join(
                [first.ljust(widths[0])] + [c.rjust(w) for c, w in zip(rest, widths[1:])]
            ).rstrip()

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([self.title, line(cells[0]), rule] + [line(r) for r in cells[1:]])

    def to_markdown(self) -> str:
        def line(row):
            return "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"

        align = "|" + "|".join([" --- "] + [" ---: "] * (len(self.columns) - 1)) + "|"
        return "\n".join([f"**{self.title}**", "", line(self.columns), align]
                         + [line(r) for r in self.rows])

    def to_dict(self) -> dict:
        return {"title": self.title, "columns": list(self.columns),
                "rows": [list(map(str, r)) for r in self.rows]}

    def to_rich(self):
        import rich.table

        table = rich.table.Table(title=self.title, title_justify="left")
        for i, column in enumerate(self.columns):
            table.add_column(column, justify="left" if i == 0 else "right")
        for row in self.rows:
            table.add_row(*map(str, row))
        return table


def render(tables: Sequence[Table], fmt: str) -> str:
    """Renders tables as `"text"`, `"md"` or `"json"`."""
    if fmt == "json":
        return json.dumps([t.to_dict() for t in tables], indent=2)
    if fmt == "md":
        return "\n\n".join(t.to_markdown() for t in tables)
    return "\n\n".join(t.to_text() for t in tables)


def smaller(before: float, after: float) -> str:
    """"3.96x smaller" / "1.02x larger" for a before/after pair of sizes."""
    if before <= 0 or after <= 0:
        return "-"
    if before == after:
        return "same"
    return f"{before / after:.2f}x smaller" if before >= after else f"{after / before:.2f}x larger"


NO_CHANGE = "no measurable change"


def faster(before: float, after: float, before_spread=None, after_spread=None,
           least: float = 1.05) -> str:
    """"2.10x faster" / "1.15x slower" for a before/after pair of durations, or "no measurable
    change" when the ratio is under `least` or the two spreads ((low, high) each, e.g. the
    quartiles of repeated timings) overlap: a difference run-to-run noise can explain."""
    if before <= 0 or after <= 0:
        return "-"
    ratio = max(before, after) / min(before, after)
    overlap = (before_spread is not None and after_spread is not None
               and before_spread[0] <= after_spread[1] and after_spread[0] <= before_spread[1])
    if ratio < least or overlap:
        return NO_CHANGE
    return f"{ratio:.2f}x faster" if before >= after else f"{ratio:.2f}x slower"
