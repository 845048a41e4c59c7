"""`kshrink.search` for size against the best uniform recipe at the same accuracy budget.

Models: a LeNet-5 (Caffe variant) defined and trained here with plain Keras (not kshrink's zoo:
its own seed and epochs), on MNIST; and the zoo's residual CNN on Fashion-MNIST. Both sides
fine-tune on the training split with the same budget (2 epochs per step, distilling from the
original, batch 128, seed 0) and are judged on the first half of the test split, which the
original never saw (held-out examples the original was trained on flatter it: measured, the
budget check then rejects candidates that keep test accuracy); the second half scores the
results.

- search: `kshrink.search(objective="size", epochs=2, rounds=6)`: per-layer sparsity
  and cluster counts (256 to 4 shared values) allocated from one-layer probes.
- uniform: `Prune(sparsity=s)` (every layer at s, the first and last kept dense where cheap)
  then `Cluster(clusters=16)`, for each s in UNIFORM; the best is the smallest file within
  the budget on the held-out examples.

Ratio = float32 weight bytes / `.kshrink` file bytes.

Latency (`--latency`, the residual CNN): `kshrink.search(objective="latency")` at batch 1,
within 1 pp, against `StructuredPrune(ratio=r, round_to=4)` + `Fold` for each r in RATIOS with
the same fine-tune; the best uniform is the fastest within the budget on the held-out
examples. The original, the search's model and every uniform one are then timed in turns
(`latency_in_turns`, TensorFlow `predict_on_batch`), TIMING_ROUNDS times; each figure is the
median.

Writes `results/search.json` (and `results/search_latency.json`) and the HTML report of each
search to `results/search-<model>[-latency].html`.

Run: .venv/bin/python benchmarks/search.py [--models lenet5 resnet_fashion] [--latency]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import keras
from common import RESULTS, replace_rows, write_rows

import kshrink
from kshrink import Cluster, FineTune, Fold, Prune, StructuredPrune, datasets, zoo
from kshrink.deploy import RUNTIMES, in_runtime
from kshrink.measure import predict, weight_stats
from kshrink.measure.accuracy import top1_accuracy
from kshrink.measure.latency import latency_in_turns

UNIFORM = (0.8, 0.9, 0.95, 0.97)
RATIOS = (0.125, 0.25, 0.375, 0.5, 0.75)
TIMING_ROUNDS = 7
BUDGETS = {"lenet5": 0.3, "resnet_fashion": 1.0}  # pp of held-out accuracy
DATASETS = {"lenet5": "mnist", "resnet_fashion": "fashion_mnist"}
EPOCHS, BATCH, SEED = 2, 128, 0
# Latency: channels and blocks removed recover faster at a higher rate (residual CNN, half
# the channels re-fitted, 4 epochs: -1.48 pp at 1e-3, -0.65 pp at 5e-3).
LATENCY_LR = 5e-3


def plain_lenet5() -> keras.Model:
    """LeNet-5 trained with model.fit alone: 8 epochs of Adam from seed 1, cached."""
    path = zoo.cache_dir() / "benchmarks" / "lenet5-plain-keras.keras"
    if path.is_file():
        return keras.saving.load_model(path)
    keras.utils.set_random_seed(1)
    inputs = keras.Input((28, 28))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Reshape((28, 28, 1))(x)
    x = keras.layers.Conv2D(20, 5, name="conv1")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(50, 5, name="conv2")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(500, activation="relu", name="fc1")(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="fc2")(x)
    model = keras.Model(inputs, outputs, name="lenet5")
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(*datasets.load("mnist").train, epochs=8, batch_size=128, verbose=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return keras.saving.load_model(path)


def splits(data):
    """`(train, held_out, test)`: the whole training split, which the original was trained
    on, to fine-tune; the test split's first half, which it never saw, to judge the budget
    by; its second half to score the results."""
    x, y = data.test
    half = len(x) // 2
    return data.train, (x[:half], y[:half]), (x[half:], y[half:])


def file_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as folder:
        return kshrink.save(model, Path(folder) / "m.kshrink").stat().st_size


def run(name: str) -> list[dict]:
    model = plain_lenet5() if name == "lenet5" else zoo.pretrained(name)
    data = datasets.load(DATASETS[name])
    train, held, test = splits(data)
    budget = BUDGETS[name]
    float_bytes = weight_stats(model).bytes
    base_held = top1_accuracy(predict(model, held[0]), held[1])
    base_test = top1_accuracy(predict(model, test[0]), test[1])

    def row(method, small, seconds, recipe, **extra):
        size = file_bytes(small)
        held_acc = top1_accuracy(predict(small, held[0]), held[1])
        test_acc = top1_accuracy(predict(small, test[0]), test[1])
        print(f"{name} {method}: {float_bytes / size:.1f}x, held-out "
              f"{100 * (held_acc - base_held):+.2f} pp, test {100 * (test_acc - base_test):+.2f}"
              f" pp, {seconds:.0f} s", flush=True)
        return dict(model=name, method=method, budget_pp=budget, float_bytes=float_bytes,
                    file_bytes=size, ratio=float_bytes / size, held_out_accuracy=held_acc,
                    baseline_held_out_accuracy=base_held, test_accuracy=test_acc,
                    baseline_test_accuracy=base_test,
                    within_budget=100 * (base_held - held_acc) <= budget + 1e-9,
                    seconds=seconds, recipe=recipe.to_data(), **extra)

    rows = []
    started = time.perf_counter()
    small, report = kshrink.search(model, train, validation_data=held, objective="size",
                                   max_accuracy_drop=budget,
                                   epochs=EPOCHS, batch_size=BATCH, seed=SEED, rounds=6,
                                   progress=print)
    seconds = time.perf_counter() - started
    print(report.to_text())
    if report.recipe is not None:
        rows.append(row("search", small, seconds, report.recipe,
                        candidates=len(report.candidates), levels=report.best.levels))
        kshrink.report.html(RESULTS / f"search-{name}.html", small, model, report=report,
                            front=report.plot_points(), title=f"kshrink search: {name}")
    fine_tune = FineTune(epochs=EPOCHS, batch_size=BATCH, distill=True, seed=SEED,
                         verbose=False)
    for sparsity in UNIFORM:
        recipe = kshrink.Recipe([Prune(sparsity=sparsity), Cluster(clusters=16)], fine_tune)
        started = time.perf_counter()
        small, _ = kshrink.compress(model, recipe, data=train, fidelity_samples=0,
                                    verbose=False)
        rows.append(row(f"uniform {sparsity:.0%}", small, time.perf_counter() - started,
                        recipe))
    return rows


def run_latency(name: str = "resnet_fashion", budget: float = 1.0,
                runtime: str = "keras") -> list[dict]:
    model = zoo.pretrained(name)
    data = datasets.load(DATASETS[name])
    train, held, test = splits(data)
    fine_tune = FineTune(epochs=EPOCHS, batch_size=BATCH, learning_rate=LATENCY_LR,
                         distill=True, seed=SEED, verbose=False)
    base_held = top1_accuracy(predict(model, held[0]), held[1])
    variants = {}  # method -> (model, seconds, recipe)
    started = time.perf_counter()
    small, report = kshrink.search(model, train, validation_data=held, objective="latency",
                                   max_accuracy_drop=budget, epochs=EPOCHS, batch_size=BATCH,
                                   learning_rate=LATENCY_LR, seed=SEED, rounds=8,
                                   latency_runtime=runtime, progress=print)
    print(report.to_text())
    tried = [dict(model=name, runtime=runtime, method=f"search candidate {i + 1}",
                  budget_pp=budget,
                  levels=c.levels, latency_us=c.objective, held_out_accuracy=c.accuracy,
                  baseline_held_out_accuracy=base_held, within_budget=c.within_budget,
                  seconds=c.seconds) for i, c in enumerate(report.candidates)]
    if report.recipe is not None:
        variants["search"] = (small, time.perf_counter() - started, report.recipe)
        suffix = "" if runtime == "keras" else f"-{runtime}"
        kshrink.report.html(RESULTS / f"search-{name}-latency{suffix}.html", small, model,
                            report=report, front=report.plot_points(),
                            title=f"kshrink search: {name}, latency ({runtime})")
    for ratio in RATIOS:
        recipe = kshrink.Recipe([StructuredPrune(ratio=ratio, round_to=4), Fold()], fine_tune)
        started = time.perf_counter()
        pruned, _ = kshrink.compress(model, recipe, data=train, fidelity_samples=0,
                                     verbose=False)
        variants[f"uniform {100 * ratio:g}% channels"] = (pruned, time.perf_counter() - started,
                                                    recipe)
    sample = test[0][:64]
    runners = [in_runtime(m, runtime, sample) for m in [model] + [v[0] for v in variants.values()]]
    timings = [latency_in_turns(runners, [sample] * len(runners), batch_sizes=(1, 32), runs=30)
               for _ in range(TIMING_ROUNDS)]

    def median_ms(index, batch):
        return statistics.median(t[index][batch].median_ms for t in timings)

    rows = []
    base_test = top1_accuracy(predict(model, test[0]), test[1])
    for index, (method, (variant, seconds, recipe)) in enumerate(
            [("original", (model, 0.0, None))] + list(variants.items())):
        held_acc = top1_accuracy(predict(variant, held[0]), held[1])
        test_acc = top1_accuracy(predict(variant, test[0]), test[1])
        rows.append(dict(
            model=name, runtime=runtime, method=method, budget_pp=budget,
            learning_rate=LATENCY_LR,
            batch1_ms=median_ms(index, 0),
            batch32_ms=median_ms(index, 1), held_out_accuracy=held_acc,
            baseline_held_out_accuracy=base_held, test_accuracy=test_acc,
            baseline_test_accuracy=base_test,
            within_budget=100 * (base_held - held_acc) <= budget + 1e-9, seconds=seconds,
            recipe=recipe.to_data() if recipe else None))
        print(f"{name} {method}: batch 1 {rows[-1]['batch1_ms']:.3f} ms, held-out "
              f"{100 * (held_acc - base_held):+.2f} pp", flush=True)
    return rows + tried  # the search's candidates, timed alone while it ran


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=tuple(BUDGETS), default=tuple(BUDGETS))
    parser.add_argument("--latency", action="store_true",
                        help="only the latency search on the residual CNN")
    parser.add_argument("--latency-runtime", choices=RUNTIMES, default="keras",
                        help="where --latency times: Keras, or exported to LiteRT or ONNX "
                             "Runtime (rows of other runtimes are kept)")
    args = parser.parse_args()
    if args.latency:
        rows = run_latency(runtime=args.latency_runtime)
        if (RESULTS / "search_latency.json").exists():
            replace_rows("search_latency", rows,
                         lambda r: r.get("runtime", "keras") == args.latency_runtime)
        else:
            write_rows("search_latency", rows)
        return
    rows = [r for name in args.models for r in run(name)]
    if (RESULTS / "search.json").exists():
        replace_rows("search", rows, lambda r: r["model"] in args.models,
                     key=lambda r: (r["model"], r["method"]))
    else:
        write_rows("search", rows)


if __name__ == "__main__":
    main()
