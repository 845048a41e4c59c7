"""One self-contained HTML page for a compressed model: the measurements and the compression
report as tables, a table of every layer before and after, and plots (matplotlib, inlined as
SVG) of where the bytes are, per-layer sparsity and precision, latency by batch size and, for a
search, the accuracy-size front. Nothing in the page loads anything: it reads offline.
"""

from __future__ import annotations

import html as escape
import io
from pathlib import Path

import keras
import numpy as np

from kshrink.core.atomic import atomic_output
from kshrink.core.graph import leaf_layers, path_of
from kshrink.core.report import CompressionReport
from kshrink.layers.quantized import is_packed_int4, stored_kernels
from kshrink.layers.specs import layer_macs
from kshrink.measure.weights import _nonzero_nibbles
from kshrink.render import Table

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #1d232a; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.6em 0 1.4em; font-variant-numeric: tabular-nums; }
caption { text-align: left; font-weight: 600; padding: 0.3em 0; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #dde2e8; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f5f8; }
figure { margin: 1em 0; } svg { max-width: 100%; height: auto; }
details > summary { cursor: pointer; color: #2d5b8a; margin: 0.5em 0; }
"""


def html(path, compressed: keras.Model, original: keras.Model | None = None, *,
         comparison=None, report=None, front=None, title: str | None = None) -> Path:
    """Writes the page for `compressed` to `path` (whole or not at all) and returns the path.

    Args:
        path: the `.html` file to write.
        compressed: the model the page is about.
        original: the model it was compressed from, for before/after columns.
        comparison: a `kshrink.measure.Comparison` (or one model's `Measurement`), for the
            measurement table and the latency plot.
        report: the `CompressionReport` of `kshrink.compress`, shown step by step.
        front: candidates of a search, `(objective value, accuracy, chosen)` each, with the
            objective's name: `("file bytes", [(1.2e5, 0.981, False), ...])`.
        title: the page heading (default: the model's name).

    Raises:
        ImportError: matplotlib is not installed (`pip install kshrink[report]`).
    """
    import matplotlib

    matplotlib.use("Agg")
    # Layer names are data: `$...$` in one must not be read as mathtext.
    with matplotlib.rc_context({"text.parse_math": False}):
        layers = _layer_rows(compressed, original)
        parts = [f"<h1>{escape.escape(title or f'kshrink: {compressed.name}')}</h1>"]
        if comparison is not None and hasattr(comparison, "summary"):
            parts += ["<h2>Summary</h2>", _table(comparison.summary())]
        if isinstance(report, CompressionReport):
            parts += ["<h2>What was done</h2>"]
            parts += [_table(t) for t in report.tables(layers=False)]
            parts += [_details("Every layer, step by step",
                               "".join(_table(step.table()) for step in report.steps))]
        elif report is not None:  # a search's candidates and probes
            parts += ["<h2>What was done</h2>"] + [_table(t) for t in report.tables()]
        if comparison is not None:
            parts += ["<h2>Measured</h2>", _table(comparison.table())]
        parts += ["<h2>Where the bytes are</h2>", _figure(_bytes_plot(layers)),
                  _figure(_storage_plot(compressed, original)),
                  "<h2>Layer by layer</h2>", _figure(_layer_plot(layers)),
                  _details(f"All {len(layers)} layers, before and after",
                           _table(_layer_table(layers)))]
        latency = _latency_plot(comparison)
        if latency is not None:
            parts += ["<h2>Latency</h2>", _figure(latency)]
        if front is not None:
            parts += ["<h2>Candidates</h2>", _figure(_front_plot(*front))]
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape.escape(title or compressed.name)}</title><style>{STYLE}</style>"
            "</head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    path = Path(path)
    with atomic_output(path) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    return path


def _layer_rows(compressed, original) -> list[dict]:
    """One dict per layer with weights: its facts in `compressed`, and in `original` by path."""
    before = {path_of(layer): layer for layer in leaf_layers(original)} if original else {}
    rows = []
    for layer in leaf_layers(compressed):
        if not layer.weights:
            continue
        name = path_of(layer)
        row = {"layer": name, "type": type(layer).__name__, "after": _facts(layer)}
        if name in before:
            row["before"] = _facts(before[name])
        rows.append(row)
    return rows


def _facts(layer) -> dict:
    """A layer's kernels as stored (float, int8, packed int4): shape, sparsity, bits."""
    shapes, count, zeros, nbytes, dtypes, values = [], 0, 0, 0, set(), []
    for variable in stored_kernels(layer):
        stored = keras.ops.convert_to_numpy(variable.value)
        packed = is_packed_int4(layer, variable)
        shapes.append("x".join(map(str, stored.shape)) + (" (int4 pairs)" if packed else ""))
        size = 2 * stored.size if packed else stored.size
        count += size
        zeros += size - (_nonzero_nibbles(stored) if packed else np.count_nonzero(stored))
        nbytes += stored.nbytes
        dtypes.add("int4" if packed else str(stored.dtype))
        values.append(stored.ravel())
    distinct = None
    if values and count <= 1 << 22 and "int4" not in dtypes:
        distinct = int(np.unique(np.concatenate(values)).size)
    return {
        "shape": " + ".join(shapes) or "-",
        "bytes": sum(keras.ops.convert_to_numpy(w.value).nbytes for w in layer.weights),
        "sparsity": zeros / count if count else 0.0,
        "bits": 8 * nbytes / count if count else 0.0,
        "dtype": ", ".join(sorted(dtypes)) or "-",
        "distinct": distinct,
        "macs": layer_macs(layer),
    }


def _layer_table(rows) -> Table:
    def kind(facts):
        distinct = facts["distinct"]
        shared = f", {distinct} values" if distinct is not None and distinct <= 256 else ""
        return f"{facts['dtype']}{shared}"

    def pair(row, key, fmt):
        after = fmt(row["after"][key])
        return f"{fmt(row['before'][key])} → {after}" if "before" in row else after

    def macs(value):
        return "-" if value is None else f"{value:,}"

    return Table("every layer with weights (before → after)",
                 ("layer", "type", "kernel shape", "sparsity", "stored as", "bytes", "MACs"),
                 [(r["layer"], r["type"], pair(r, "shape", str),
                   pair(r, "sparsity", lambda v: f"{v:.1%}"), kind(r["after"]),
                   pair(r, "bytes", lambda v: f"{v:,}"), pair(r, "macs", macs))
                  for r in rows])


def _bytes_plot(rows):
    import matplotlib.pyplot as plt

    shown = sorted(rows, key=lambda r: -r.get("before", r["after"])["bytes"])[:24]
    names = [r["layer"] for r in shown][::-1]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(shown) + 1.4))
    y = np.arange(len(shown))
    if any("before" in r for r in shown):
        ax.barh(y + 0.2, [r.get("before", r["after"])["bytes"] for r in shown][::-1], 0.4,
                label="before", color="#b8c4d0")
    ax.barh(y - 0.2, [r["after"]["bytes"] for r in shown][::-1], 0.4, label="after",
            color="#2f6f9f")
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlabel("bytes held in memory")
    ax.set_title("weight bytes by layer" + (" (the 24 largest)" if len(rows) > 24 else ""))
    ax.legend(loc="lower right")
    return fig


def _storage_plot(compressed, original):
    import matplotlib.pyplot as plt

    from kshrink.measure.weights import weight_stats

    models = [("before", original), ("after", compressed)] if original else [
        ("model", compressed)]
    totals = []
    for _, model in models:
        by = {}
        for layer in weight_stats(model).layers:
            for dtype, count in layer.bytes_by_dtype.items():
                by[dtype] = by.get(dtype, 0) + count
        totals.append(by)
    kinds = sorted({k for by in totals for k in by})
    fig, ax = plt.subplots(figsize=(9, 1.0 + 0.6 * len(models)))
    left = np.zeros(len(models))
    colors = plt.get_cmap("tab10")
    for i, kind in enumerate(kinds):
        widths = np.array([by.get(kind, 0) for by in totals], dtype=float)
        ax.barh([label for label, _ in models], widths, left=left, label=kind,
                color=colors(i % 10))
        left += widths
    ax.set_xlabel("bytes held in memory")
    ax.set_title("weight bytes by storage type")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def _layer_plot(rows):
    import matplotlib.pyplot as plt

    names = [r["layer"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.2), sharex=True)
    x = np.arange(len(rows))
    top.bar(x, [100 * r["after"]["sparsity"] for r in rows], color="#2f6f9f")
    top.set_ylabel("zeros, %")
    top.set_ylim(0, 100)
    top.set_title("sparsity and bits per kernel value, after")
    bottom.bar(x, [r["after"]["bits"] for r in rows], color="#c4622d")
    bottom.set_ylabel("bits per value")
    bottom.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    return fig


def _latency_plot(comparison):
    if comparison is None:
        return None
    import matplotlib.pyplot as plt

    series = ([("before", comparison.original), ("after", comparison.compressed)]
              if hasattr(comparison, "compressed") else [("model", comparison)])
    if not any(m.latency for _, m in series):
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6))
    sizes = set()
    for label, measured in series:
        points = sorted((l.batch_size, l.median_ms) for l in measured.latency)
        sizes.update(size for size, _ in points)
        ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(sizes), [str(size) for size in sorted(sizes)])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("batch size")
    ax.set_ylabel("median ms per call")
    ax.set_title("latency on this machine")
    ax.legend()
    return fig


def _front_plot(objective: str, candidates):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for value, accuracy, chosen in candidates:
        ax.scatter(value, 100 * accuracy, s=60 if chosen else 24,
                   color="#c4622d" if chosen else "#2f6f9f", zorder=3 if chosen else 2)
    ax.set_xscale("log")
    ax.set_xlabel(objective)
    ax.set_ylabel("accuracy, %")
    ax.set_title("candidates evaluated (the chosen one larger)")
    return fig


def _figure(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    svg = buffer.getvalue()
    return f"<figure>{svg[svg.index('<svg'):]}</figure>"


def _table(table: Table) -> str:
    head = "".join(f"<th>{escape.escape(str(c))}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{escape.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in table.rows)
    return (f"<table><caption>{escape.escape(table.title)}</caption>"
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def _details(label: str, body: str) -> str:
    """A section folded by default: long per-layer tables."""
    return f"<details><summary>{escape.escape(label)}</summary>{body}</details>"
