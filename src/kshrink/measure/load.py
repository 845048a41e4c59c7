"""Load time and memory of a saved model, each run in a fresh process."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import keras

from kshrink.core.classes import probe_imports
from kshrink.errors import MeasurementError

_PROBE = Path(__file__).with_name("_load_probe.py")
MAX_WAVE = 4  # probes started at once (each holds a Keras backend: hundreds of MB)


@dataclasses.dataclass(frozen=True)
class LoadCost:
    """Medians over `runs` fresh processes.

    Attributes:
        seconds: time for the load call alone.
        peak_bytes: peak memory during the load, over a process that only imported Keras.
        resident_bytes: memory still held after the load, over the same baseline.
        runs: how many processes were measured.
        seconds_range: the fastest and slowest load: the run-to-run spread.
    """

    seconds: float
    peak_bytes: int
    resident_bytes: int
    runs: int
    seconds_range: tuple[float, float] = (0.0, 0.0)


def load_cost(path, *, runs: int = 3, loader: str = "keras", backend: str | None = None,
              timeout: float = 600, classes=()) -> LoadCost:
    """Measures loading `path` in `runs` fresh processes and returns the medians.

    Args:
        path: a `.keras` file (or a compact file with `loader="kshrink"`).
        runs: number of fresh processes; the median of each figure is reported.
        loader: `"keras"` (`keras.saving.load_model`, kshrink never imported) or `"kshrink"`.
        backend: Keras backend of the probe process (default: the current one).
        classes: the user's classes the model is made of (custom layers): each probe
            imports their modules first.
        timeout: seconds all the runs may take.

    Probes start a few at a time and import Keras side by side (most of their time); each
    then loads the file alone, the others waiting, so the load is timed on a quiet machine.

    Raises:
        MeasurementError: a probe failed, or a class of `classes` lives where another
            process cannot import it (`__main__`).
    """
    if loader not in ("keras", "kshrink"):
        raise MeasurementError(f"loader must be 'keras' or 'kshrink'. Received: loader={loader!r}")
    if not isinstance(runs, int) or runs < 1:
        raise MeasurementError(f"runs must be a positive integer. Received: runs={runs!r}")
    modules, roots, why_not = probe_imports(classes)
    if why_not:
        raise MeasurementError(f"cannot time loading {path} in a fresh process: {why_not}")
    env = dict(os.environ, KERAS_BACKEND=backend or keras.backend.backend(),
               TF_CPP_MIN_LOG_LEVEL="3")
    if roots:
        env["PYTHONPATH"] = os.pathsep.join(roots + [env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep)
    samples = []
    deadline = time.monotonic() + timeout
    while len(samples) < runs:
        # A wave of probes imports Keras side by side (most of each probe's time), then they
        # load the file one at a time: each load is timed alone
        wave = min(runs - len(samples), (os.cpu_count() or 1) + 1, MAX_WAVE)
        samples += _wave(wave, [sys.executable, str(_PROBE), str(path), loader, *modules],
                         env, path, deadline)
    return LoadCost(
        seconds=statistics.median(s["seconds"] for s in samples),
        peak_bytes=int(statistics.median(s["peak_bytes"] for s in samples)),
        resident_bytes=int(statistics.median(s["resident_bytes"] for s in samples)),
        runs=runs,
        seconds_range=(min(s["seconds"] for s in samples), max(s["seconds"] for s in samples)),
    )


def _wave(count: int, command: list, env: dict, path, deadline: float) -> list[dict]:
    """Runs `count` probes: started together, each let load once all have imported Keras,
    one after another. Their samples, or `MeasurementError`."""
    with tempfile.TemporaryDirectory(prefix="kshrink-load-") as folder:
        barriers = [str(Path(folder) / str(i)) for i in range(count)]
        probes = []
        try:
            for barrier in barriers:
                probes.append(subprocess.Popen(
                    command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    env=dict(env, KSHRINK_PROBE_BARRIER=barrier)))
            for barrier, probe in zip(barriers, probes):
                while not os.path.exists(barrier + ".ready") and probe.poll() is None:
                    if time.monotonic() > deadline:
                        raise MeasurementError(f"loading {path} in a fresh process timed out")
                    time.sleep(0.01)
            samples = []
            for barrier, probe in zip(barriers, probes):
                Path(barrier + ".go").touch()
                try:
                    out, err = probe.communicate(timeout=max(deadline - time.monotonic(), 1))
                except subprocess.TimeoutExpired:
                    raise MeasurementError(f"loading {path} in a fresh process timed out"
                                           ) from None
                lines = [l for l in out.splitlines() if l.startswith("KSHRINK_PROBE ")]
                if probe.returncode != 0 or not lines:
                    tail = (err.strip().splitlines() or ["no output"])[-1]
                    raise MeasurementError(f"loading {path} in a fresh process failed: {tail}")
                samples.append(json.loads(lines[-1].split(" ", 1)[1]))
            return samples
        finally:
            for probe in probes:
                if probe.poll() is None:
                    probe.kill()
                probe.wait()
