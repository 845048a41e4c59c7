"""The long fuzz run of the `.kshrink` loader: N mutated files (byte flips, truncations,
insertions, and re-signed edits of the header, payloads, gap lists and layer sizes); every one
must load or raise `ArtifactError`, nothing else, none may hang, and none may raise the
worker's peak memory by more than the ceiling.

Run: .venv/bin/python benchmarks/fuzz_loader.py --runs 100000 [--workers 2] [--ceiling-gb 1.5]
"""

import argparse
import collections
import multiprocessing
import random
import resource
import tempfile
import time
import traceback
from pathlib import Path

from common import write_rows

import kshrink
from kshrink.artifact import ArtifactError, load, save
from kshrink.artifact.fuzz import mutate


def valid_file(path: Path) -> bytes:
    model = kshrink.zoo.build("lenet5")
    small, _ = kshrink.compress(model, [kshrink.Prune(sparsity=0.9), kshrink.Cluster(clusters=16)])
    save(small, path)
    return path.read_bytes()


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def work(args):
    data, seeds, folder, ceiling = args
    counts, failures = collections.Counter(), []
    path = Path(folder) / f"fuzz-{seeds.start}.kshrink"
    for seed in seeds:
        kind, mutated = mutate(data, random.Random(seed))
        path.write_bytes(mutated)
        before = peak_bytes()  # the peak only grows: a case that adds more is caught here
        try:
            load(path)
            counts[(kind, "loaded")] += 1
        except ArtifactError:
            counts[(kind, "ArtifactError")] += 1
        except Exception:  # anything else is a bug
            counts[(kind, "other")] += 1
            failures.append({"seed": seed, "kind": kind, "error": traceback.format_exc(limit=3)})
        if peak_bytes() - before > ceiling:
            counts[(kind, "over memory ceiling")] += 1
            failures.append({"seed": seed, "kind": kind, "error": "over the memory ceiling",
                             "added_bytes": peak_bytes() - before})
    return counts, failures


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ceiling-gb", type=float, default=1.5,
                        help="peak memory one case may add")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = valid_file(Path(tmp) / "valid.kshrink")
        step = -(-args.runs // (args.workers * 20))
        ceiling = args.ceiling_gb * 1e9
        jobs = [(data, range(s, min(s + step, args.runs)), tmp, ceiling)
                for s in range(0, args.runs, step)]
        start = time.perf_counter()
        counts, failures = collections.Counter(), []
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            for c, f in pool.imap_unordered(work, jobs):
                counts.update(c)
                failures += f
                print(f"{sum(counts.values())} / {args.runs}", flush=True)
        seconds = time.perf_counter() - start
    rows = [{"mutation": kind, "outcome": outcome, "count": n}
            for (kind, outcome), n in sorted(counts.items())]
    rows.append({"mutation": "all", "outcome": "total", "count": sum(counts.values()),
                 "seconds": round(seconds, 1), "ceiling_gb": args.ceiling_gb,
                 "other_exceptions": sum(f["error"] != "over the memory ceiling"
                                         for f in failures),
                 "over_ceiling": sum(f["error"] == "over the memory ceiling"
                                     for f in failures),
                 "failures": failures[:20]})
    write_rows("fuzz_loader", rows)


if __name__ == "__main__":
    main()
