"""The long fuzz run of the `.kshrink` loader: N mutated files (byte flips, truncations,
insertions, and re-signed edits of the header and payloads); every one must load or raise
`ArtifactError`, nothing else, and none may hang.

Run: .venv/bin/python benchmarks/fuzz_loader.py --runs 100000 [--workers 2]
"""

import argparse
import collections
import multiprocessing
import random
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


def work(args):
    data, seeds, folder = args
    counts, failures = collections.Counter(), []
    path = Path(folder) / f"fuzz-{seeds.start}.kshrink"
    for seed in seeds:
        kind, mutated = mutate(data, random.Random(seed))
        path.write_bytes(mutated)
        try:
            load(path)
            counts[(kind, "loaded")] += 1
        except ArtifactError:
            counts[(kind, "ArtifactError")] += 1
        except Exception:  # anything else is a bug
            counts[(kind, "other")] += 1
            failures.append({"seed": seed, "kind": kind, "error": traceback.format_exc(limit=3)})
    return counts, failures


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = valid_file(Path(tmp) / "valid.kshrink")
        step = -(-args.runs // (args.workers * 20))
        jobs = [(data, range(s, min(s + step, args.runs)), tmp) for s in range(0, args.runs, step)]
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
                 "seconds": round(seconds, 1), "other_exceptions": len(failures),
                 "failures": failures[:20]})
    write_rows("fuzz_loader", rows)


if __name__ == "__main__":
    main()
