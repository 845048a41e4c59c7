"""The `kshrink` command: compress, measure, convert, sensitivity, export, techniques, demo.

`kshrink_cli` parses the arguments (without importing Keras); this module runs the commands.
Bad input exits with code 2 and one line on stderr; existing files are never touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

from kshrink_cli import EXIT_BAD_INPUT

# Prune 92% of LeNet-300-100's weights, then share the rest among 16 values per layer, each
# step fine-tuned with the original model as teacher; the compact file stores what is left.
DEMO_RECIPE = """
steps:
  - prune: {sparsity: 0.92, scope: global, skip_first_last: false}
  - cluster: {clusters: 16}
fine_tune: {epochs: 4, distill: true}
"""


class _Terminated(BaseException):
    """SIGTERM, raised where the program stands so that context managers clean up."""


def _terminate(signum, frame):
    raise _Terminated


def main(argv=None) -> int:
    """Runs the `kshrink` command with `argv` (default: the process's arguments)."""
    from kshrink_cli import main as launch

    return launch(argv)


def run(args) -> int:
    """Runs the command `kshrink_cli` parsed: bad input exits 2 with one line."""
    from kshrink import _start_keras_quietly
    from kshrink.errors import KshrinkError

    _start_keras_quietly(run_op=True)
    # A warning is one line on the terminal, like an error: not the source line that raised it.
    warnings.formatwarning = lambda message, *_, **__: f"kshrink: warning: {message}\n"
    # Compressing and measuring many models in one process makes TensorFlow warn that its
    # functions retrace, which is expected here and nothing a user can act on.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)

    # SIGTERM unwinds like Ctrl-C: every temporary file and folder the run made goes with it.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        from kshrink.core.classes import import_modules

        args.custom_objects = import_modules(args.imports)
        return COMMANDS[args.run](args) or 0
    except KshrinkError as e:
        print(f"kshrink: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except _Terminated:
        print("kshrink: terminated; nothing is written", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("kshrink: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("kshrink: error: out of memory; nothing is written", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # what no check foresaw: still one line, unless --debug
        if args.debug:
            raise
        reason = " ".join(str(e).split())[:300]
        print(f"kshrink: error: {type(e).__name__}: {reason} (nothing is written; --debug "
              "shows where)", file=sys.stderr)
        return EXIT_BAD_INPUT


def _compress(args) -> int:
    from kshrink import Recipe, compress
    from kshrink.errors import KshrinkError
    from kshrink.io import save

    source, target = Path(args.model), Path(args.output)
    _check_output(target, source)
    _check_html(args.report, source)
    recipe = Recipe.named(args.recipe)
    if recipe.fine_tune is not None and not args.data:
        raise KshrinkError("the recipe fine-tunes (it has fine_tune), so it needs --data")
    model = _load(args, source)
    data = _data(args.data, model, streamed=True) if args.data else None
    fine_tune = recipe.fine_tune and (dataclasses.replace(recipe.fine_tune, verbose=False)
                                      if args.quiet else recipe.fine_tune)
    with _progress(args) as say:
        small, report = compress(model, recipe, data=data and data.train,
                                 validation_data=data and data.test, fine_tune=fine_tune,
                                 progress=say)
    save(small, target)
    comparison = None
    if args.report or args.format != "json":
        from kshrink.core.progress import within
        from kshrink.measure import compare

        # Load cost takes fresh processes: only for the page, which has room for it.
        with _progress(args) as say:
            comparison = compare(model, small, data and data.test, original_path=source,
                                 compressed_path=target, load_runs=1 if args.report else 0,
                                 latency_runs=20, progress=within(say, "measuring"),
                                 custom_objects=args.custom_objects)
    if args.report:
        _write_html(args, args.report, small, model, report=report, comparison=comparison)
    if args.format == "json":
        print(report.to_json())
    else:
        summary = comparison.summary()
        print(summary.to_markdown() if args.format == "md" else summary.to_text())
        print()
        print(report.to_markdown(layers=args.layers) if args.format == "md"
              else report.to_text(layers=args.layers))
    print(f"\n{_wrote(small, target)}", file=sys.stderr)
    return 0


def _techniques_option(text: str | None):
    """`--techniques`: comma-separated names, or YAML (a list of names and {name: options})."""
    if text is None:
        return None
    if not text.lstrip().startswith(("[", "{", "-")):
        return [name.strip() for name in text.split(",") if name.strip()]
    from kshrink.core.recipe import read_yaml

    value = read_yaml(text, "--techniques")  # within the recipe limits
    return value if isinstance(value, list) else [value]


def _search(args) -> int:
    from kshrink.analysis import search
    from kshrink.errors import KshrinkError
    from kshrink.io import save

    source, target = Path(args.model), Path(args.output)
    _check_output(target, source)
    _check_html(args.report, source)
    _check_side_output(args.recipe_out, source, "recipe", (".yaml", ".yml", ".json"))
    techniques = _techniques_option(args.techniques)  # read before any work
    model = _load(args, source)
    data = _data(args.data, model)
    with _progress(args) as say:
        small, report = search(model, data.train, objective=args.objective,
                               max_accuracy_drop=args.max_accuracy_drop, epochs=args.epochs,
                               batch_size=args.batch_size, learning_rate=args.learning_rate,
                               rounds=args.rounds, probe_steps=args.probe_steps,
                               seed=args.seed, latency_batch_size=args.latency_batch_size,
                               latency_runtime=args.latency_runtime,
                               techniques=techniques,
                               channels=args.channels, progress=say)
    if args.format == "json":
        import json

        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.table().to_markdown() if args.format == "md" else report.to_text())
    if report.recipe is None:
        raise KshrinkError(f"no candidate kept held-out accuracy within "
                           f"{args.max_accuracy_drop:g} pp; nothing is written. Allow a larger "
                           "drop, more --epochs or more --rounds")
    save(small, target)
    if args.recipe_out:
        from kshrink.core.atomic import atomic_output

        text = (report.recipe.to_json() if Path(args.recipe_out).suffix.lower() == ".json"
                else report.recipe.to_yaml())
        with atomic_output(Path(args.recipe_out)) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")
    if args.report:
        _write_html(args, args.report, small, model, report=report, front=report.plot_points(),
                    title=f"kshrink search: {model.name}, {args.objective}")
    if args.format != "json":
        with _progress(args) as say:
            say("evaluating")
            line = _before_after(model, small, data)
        how = (f"it fine-tunes on the first {report.training_examples:,} training examples"
               if report.recipe.fine_tune is not None else "no fine-tuning")
        print(f"\n{line}\n\nchosen recipe (kshrink compress --recipe; {how}):\n"
              f"{report.recipe.to_yaml()}")
    print(_wrote(small, target), file=sys.stderr)
    return 0


def _wrote(model, target: Path) -> str:
    """The line that says a model file was written, and what its reader needs."""
    from kshrink.io import loading_needs

    needs = loading_needs(model, target)
    return f"wrote {target}" + (f" (to load it: {needs})" if needs else "")


def _before_after(model, small, data) -> str:
    """Accuracy before and after on the test split; for unlabelled data or a model that is
    not a classifier, how closely the compressed model's outputs follow the original's."""
    from kshrink.core.data import model_inputs
    from kshrink.core.stream import as_stream
    from kshrink.measure import evaluate_data, fidelity, predict

    before = evaluate_data(model, data.test).get("accuracy")
    if before is not None:
        after = evaluate_data(small, data.test)["accuracy"]
        return (f"accuracy on {data.name} test: {before:.4f} -> {after:.4f} "
                f"({(after - before) * 100:+.2f} pp)")
    stream = as_stream(data.test, model)
    x = model_inputs(stream.head() if stream is not None else data.test)
    f = fidelity(predict(model, x), predict(small, x))
    return (f"outputs on {data.name} test against the original: cosine {f.cosine:.6f}, "
            f"max |difference| {f.max_abs_diff:.3g}")


def _measure(args) -> int:
    from kshrink.core.progress import within
    from kshrink.measure import compare, measure

    _check_html(args.html, Path(args.model))
    model = _load(args, args.model)
    baseline = _load(args, args.baseline) if args.baseline else None
    data = _data(args.data, model, streamed=True).test if args.data else None
    runs = dict(load_runs=args.load_runs, latency_runs=args.latency_runs)
    with _progress(args) as say:
        progress = within(say, "measuring")
        runs["custom_objects"] = args.custom_objects
        if baseline is not None:
            result = compare(baseline, model, data, original_path=args.baseline,
                             compressed_path=args.model, progress=progress, **runs)
        else:
            result = measure(model, data, path=args.model, progress=progress, **runs)
    if args.html:
        _write_html(args, args.html, model, baseline, comparison=result)
    _print(result, args.format)
    return 0


def _convert(args) -> int:
    from kshrink.io import save
    from kshrink.measure import file_size

    source, target = Path(args.model), Path(args.output)
    _check_output(target, source)
    model = _load(args, source)
    save(model, target)
    before, after = file_size(source).bytes, file_size(target).bytes
    change = (f"{before / after:.2f}x smaller" if after < before
              else f"{after / before:.2f}x larger" if after > before else "the same size")
    print(f"{_wrote(model, target)}: {after:,} bytes, {change} than {source.name} "
          f"({before:,} bytes)")
    return 0


def _sensitivity(args) -> int:
    from kshrink.analysis import sensitivity

    model = _load(args, args.model)
    data = _data(args.data, model)
    with _progress(args) as say:
        report = sensitivity(model, data.test, mode=args.mode, group_size=args.group_size,
                             samples=args.samples, seed=args.seed, progress=say)
    _print(report, args.format)
    return 0


def _export(args) -> int:
    from kshrink.deploy import export
    from kshrink.errors import KshrinkError

    source, target = Path(args.model), Path(args.output)
    if target.exists() and source.exists() and target.samefile(source):
        raise KshrinkError(f"output {target} would overwrite the input; choose another path")
    model = _load(args, source)
    data = _data(args.data, model).train if args.data else None
    with _progress(args) as say:
        say(f"exporting to {target.suffix}")
        report = export(model, target, quantization=args.quantization, data=data,
                        samples=args.samples)
    print(report)
    return 0


def _load(args, path):
    from kshrink.io import MAX_PARAMETERS, load

    return load(path, max_parameters=args.max_parameters or MAX_PARAMETERS,
                           custom_objects=args.custom_objects)


def _techniques(args) -> int:
    from kshrink import FineTune, registered_techniques
    from kshrink.core.recipe import PRESETS

    print("presets (--recipe NAME, or compress(model, NAME)):")
    for name, (_, what) in PRESETS.items():
        print(f"  {name:<17} {what}")
    print()
    for cls in registered_techniques() + [FineTune]:
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        where = "recipe key" if cls is FineTune else f"step, stage {int(cls.stage)}"
        print(f"{cls.name}  ({where})  {summary}")
        for name, kind, default, help_text in cls.options():
            print(f"  {name}: {kind} = {default!r}  {help_text}")
        print()
    return 0


def _demo(args) -> int:
    from kshrink import Recipe, compress, datasets, zoo
    from kshrink.core.progress import within
    from kshrink.io import save
    from kshrink.measure import compare

    recipe = Recipe.named(args.recipe) if args.recipe else Recipe.from_yaml(DEMO_RECIPE)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print("kshrink demo: LeNet-300-100 on MNIST, compressed with this recipe:\n")
    print(recipe.to_yaml())
    model = zoo.pretrained("lenet_300_100")
    data = datasets.load("mnist")
    with _progress(args) as say:
        small, report = compress(model, recipe, data=data.train, validation_data=data.test,
                                 progress=say)
    print("\n" + report.to_text() + "\n")
    original_path = save(model, out / "original.keras")
    save(small, out / "compressed.keras")
    compressed_path = save(small, out / "compressed.kshrink")
    with _progress(args) as say:
        result = compare(model, small, data.test, original_path=original_path,
                         compressed_path=compressed_path, progress=within(say, "measuring"))
    print(result.to_text())
    print(f"\nmodels written to {out}/: original.keras, compressed.keras (plain Keras) and "
          "compressed.kshrink (compact; kshrink.load)")
    return 0


def _print(result, fmt: str) -> None:
    """Prints anything with `to_dict()` and `table()` as JSON, Markdown or text."""
    if fmt == "json":
        import json

        print(json.dumps(result.to_dict(), indent=2))
    else:
        table = result.table()
        print(table.to_markdown() if fmt == "md" else table.to_text())


def _check_output(target: Path, source: Path) -> None:
    from kshrink.errors import ModelFileError
    from kshrink.io import check_output_path

    check_output_path(target)
    if target.resolve() == source.resolve() or (
            target.exists() and source.exists() and target.samefile(source)):
        raise ModelFileError(f"output {target} would overwrite the input; choose another path")


def _check_html(path, source: Path) -> None:
    _check_side_output(path, source, "report", (".html", ".htm"))


def _check_side_output(path, source: Path, what: str, suffixes: tuple) -> None:
    """Checks a file written beside the model (`--report`, `--recipe-out`) before any work,
    so that no run ends with the model written and this one refused."""
    from kshrink.errors import KshrinkError

    if path is None:
        return
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise KshrinkError(f"{what} {path}: name it {' or '.join(suffixes)}")
    if path.is_dir() or not path.parent.is_dir():
        raise KshrinkError(f"{what} {path}: name a file in an existing folder")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise KshrinkError(f"{what} {path}: its folder is not writable")
    if path.exists() and source.exists() and path.samefile(source):
        raise KshrinkError(f"{what} {path} would overwrite the input; choose another path")


def _write_html(args, path, model, original=None, **parts) -> None:
    from kshrink.report import html

    with _progress(args) as say:
        say("writing the HTML report")
        html(path, model, original, **parts)
    print(f"wrote {path}", file=sys.stderr)


def _data(spec: str, model, streamed: bool = False):
    """The dataset `--data` names. A folder of class subfolders of images streams when the
    command can take a stream (`streamed`); otherwise its first examples are read."""
    from kshrink import datasets
    from kshrink.core.stream import as_stream
    from kshrink.errors import KshrinkError

    if spec.endswith(".npz"):
        data = datasets.from_npz(spec)
    elif Path(spec).is_dir():
        image = tuple(model.inputs[0].shape[1:])
        if len(model.inputs) != 1 or len(image) != 3 or not all(
                isinstance(d, int) for d in image):
            raise KshrinkError(f"--data {spec}: a folder of images feeds a model with one "
                               "image input of fixed height, width and channels")
        data = datasets.from_directory(spec, image[:2], channels=image[2])
        if not streamed:
            head = [as_stream(part).head() for part in (data.train, data.test)]
            data = datasets.Dataset(data.name, *head[0], *head[1])
    else:
        data = datasets.shaped_for(datasets.load(spec), model)
    datasets.check_fits(data, model)
    return data


def _progress(args):
    """Progress on stderr while work runs: a bar for counted work on a terminal, one line per
    stage otherwise; nothing with --quiet."""
    from kshrink.core.progress import Console

    return contextlib.nullcontext(lambda message: None) if args.quiet else Console()


COMMANDS = {"compress": _compress, "search": _search, "measure": _measure, "convert": _convert,
            "sensitivity": _sensitivity, "export": _export, "techniques": _techniques,
            "demo": _demo}

if __name__ == "__main__":
    sys.exit(main())
