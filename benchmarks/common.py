"""Shared by the benchmark runners: environment facts, JSON rows out, medians."""

from __future__ import annotations

import json
import os
import platform
import statistics
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).with_name("results")


def environment() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import keras

    versions = {}
    for package in ("keras", "tensorflow-cpu", "jax", "torch", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "backend": keras.backend.backend(),
        "versions": versions,
    }


def write_rows(name: str, rows: list[dict]) -> Path:
    """Writes `results/NAME.json` with the rows and the environment they were measured in."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def replace_rows(name: str, rows: list[dict], replaced, key=None) -> Path:
    """Rewrites `results/NAME.json` with the old rows for which `replaced(row)` is false plus
    `rows`: for rerunning part of a benchmark. A new row takes the place of the replaced row
    with the same `key(row)`, if any; the others go where the first replaced row stood, so
    tables keep their order. The environment is this run's."""
    path = RESULTS / f"{name}.json"
    old = json.loads(path.read_text())["rows"]
    matching = {key(r): r for r in rows} if key else {}
    gone = {key(r) for r in old if replaced(r)} if key else set()
    unmatched = [r for r in rows if not key or key(r) not in gone]
    merged = []
    for row in old:
        if not replaced(row):
            merged.append(row)
            continue
        merged += unmatched  # at the first replaced row
        unmatched = []
        if key and key(row) in matching:
            merged.append(matching.pop(key(row)))
    return write_rows(name, merged + unmatched)


def median(values) -> float:
    return float(statistics.median(values))
