"""The `kshrink` command: compress, measure, convert, sensitivity, export, techniques, demo.

Bad input exits with code 2 and one line on stderr; existing files are never touched.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EXIT_BAD_INPUT = 2

# Prune 92% of LeNet-300-100's weights, then share the rest among 16 values per layer, each
# step fine-tuned with the original model as teacher; the compact file stores what is left.
DEMO_RECIPE = """
steps:
  - prune: {sparsity: 0.92, scope: global, skip_first_last: false}
  - cluster: {clusters: 16}
fine_tune: {epochs: 4, distill: true}
"""

def _positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or len(text) > 12:
        raise argparse.ArgumentTypeError(f"must be a positive integer. Received: {text[:20]!r}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as for every other bad input
        raise _UsageError(f"{self.prog}: {message}")


class _UsageError(Exception):
    pass


def main(argv=None) -> int:
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    from kshrink import _start_keras_quietly
    from kshrink.errors import KshrinkError

    _start_keras_quietly(run_op=True)
    # Compressing and measuring many models in one process makes TensorFlow warn that its
    # functions retrace, which is expected here and nothing a user can act on.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)

    try:
        return args.run(args) or 0
    except KshrinkError as e:
        print(f"kshrink: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("kshrink: interrupted", file=sys.stderr)
        return 130


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kshrink", description="Compress and measure Keras 3 models.")
    parser.set_defaults(command=None)
    parser.add_argument("--max-parameters", type=_positive, default=None, metavar="N",
                        help="refuse input models whose config implies more kernel values "
                             "(default 2^31)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress on stderr (results and errors still print)")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("compress", help="apply a recipe to a .keras model")
    p.add_argument("model", help="input .keras file")
    p.add_argument("--recipe", required=True, help="recipe file (.yaml, .yml or .json)")
    p.add_argument("-o", "--output", required=True,
                   help="output file: .keras (plain Keras) or .kshrink (compact)")
    p.add_argument("--data", help="mnist, fashion_mnist, digits, FILE.npz (x, y[, x_val, y_val], "
                                  "or one array per model input) or a folder of class "
                                  "subfolders of images (streamed)")
    p.add_argument("--format", choices=("text", "md", "json"), default="text")
    p.add_argument("--report", metavar="REPORT.html",
                   help="also write a self-contained HTML report with tables and plots")
    p.set_defaults(run=_compress)

    p = sub.add_parser("search", help="find the per-layer recipe that compresses a .keras "
                                      "model most within an accuracy budget")
    p.add_argument("model", help="input .keras file (float)")
    p.add_argument("--data", required=True,
                   help="mnist, fashion_mnist, digits or FILE.npz (x, y[, x_val, y_val]); the "
                        "search fine-tunes on the training split less its last 10%%, judges "
                        "candidates on that 10%%, and the test split scores the result")
    p.add_argument("--objective", choices=("size", "memory", "latency", "macs"),
                   default="size",
                   help="size: bytes of the .kshrink file (per-layer sparsity and clusters); "
                        "memory: weight bytes held (float/int8/int4 per layer); latency: "
                        "time per forward pass here (residual blocks and channels removed); "
                        "macs: multiply-accumulates per example (the same space)")
    p.add_argument("--max-accuracy-drop", type=float, required=True, metavar="PP",
                   help="held-out top-1 accuracy the result may lose, in percentage points")
    p.add_argument("--epochs", type=int, default=2,
                   help="fine-tuning epochs per candidate step (0: post-training only)")
    p.add_argument("--batch-size", type=_positive, default=128, help="fine-tuning batch size")
    p.add_argument("--learning-rate", type=float, default=1e-3,
                   help="fine-tuning initial learning rate (cosine decay)")
    p.add_argument("--latency-batch-size", type=_positive, default=1,
                   help="latency: the batch size it is timed at")
    p.add_argument("--latency-runtime", choices=("keras", "litert", "onnx"), default="keras",
                   help="latency: timed in Keras (predict_on_batch) or exported (float) and "
                        "timed in the deployment runtime, LiteRT or ONNX Runtime")
    p.add_argument("--techniques", metavar="LIST",
                   help="what the search may use, comma-separated (size: prune, cluster, "
                        "quantize; default prune,cluster; latency, macs: depth_prune, "
                        "structured_prune), or YAML with options, e.g. "
                        "'[{prune: {method: sparsegpt}}, cluster]'")
    p.add_argument("--channels", choices=("uniform", "per_layer"), default="uniform",
                   help="latency, macs: one channel ratio for every layer, or one per set of "
                        "tied layers")
    p.add_argument("--rounds", type=_positive, default=6, help="candidates tried at most")
    p.add_argument("--probe-steps", type=int, default=100,
                   help="latency, macs: steps each block or channel probe is fine-tuned for "
                        "before its loss counts (0: at once)")
    p.add_argument("--seed", type=int, default=0, help="seeds every fine-tune")
    p.add_argument("-o", "--output", required=True,
                   help="output file: .keras (plain Keras) or .kshrink (compact)")
    p.add_argument("--recipe-out", metavar="RECIPE.yaml",
                   help="also write the chosen recipe (rerun it with kshrink compress)")
    p.add_argument("--report", metavar="REPORT.html",
                   help="also write a self-contained HTML report with the candidates' plot")
    p.add_argument("--format", choices=("text", "md", "json"), default="text")
    p.set_defaults(run=_search)

    p = sub.add_parser("measure", help="measure a model, optionally against a baseline")
    p.add_argument("model", help=".keras or .kshrink file")
    p.add_argument("--baseline", help="the original model file to compare against")
    p.add_argument("--data", help="mnist, fashion_mnist, digits, FILE.npz or a folder of "
                                  "class subfolders of images")
    p.add_argument("--format", choices=("text", "md", "json"), default="text")
    p.add_argument("--html", metavar="REPORT.html",
                   help="also write a self-contained HTML report with tables and plots")
    p.add_argument("--load-runs", type=_positive, default=3,
                   help="fresh processes for load figures")
    p.add_argument("--latency-runs", type=_positive, default=50,
                   help="timed calls per batch size")
    p.set_defaults(run=_measure)

    p = sub.add_parser("convert", help="convert between .keras and the compact .kshrink")
    p.add_argument("model", help="input .keras or .kshrink file")
    p.add_argument("output", help="output .keras or .kshrink file")
    p.set_defaults(run=_convert)

    p = sub.add_parser("sensitivity",
                       help="quantize one layer at a time and rank layers by what it costs")
    p.add_argument("model", help=".keras or .kshrink file (float)")
    p.add_argument("--data", required=True, help="mnist, fashion_mnist, digits or FILE.npz")
    p.add_argument("--mode", choices=("int8", "int4", "float16", "bfloat16"), default="int8")
    p.add_argument("--group-size", type=_positive, default=None,
                   help="int4: inputs per scale group (default: one scale per channel)")
    p.add_argument("--samples", type=_positive, default=2000, help="test examples used")
    p.add_argument("--seed", type=int, default=0, help="which examples are drawn")
    p.add_argument("--format", choices=("text", "md", "json"), default="text")
    p.set_defaults(run=_sensitivity)

    p = sub.add_parser("export", help="write a model for LiteRT (.tflite) or ONNX (.onnx), "
                                      "checked against Keras")
    p.add_argument("model", help=".keras or .kshrink file")
    p.add_argument("output", help="output .tflite or .onnx file")
    p.add_argument("--quantization", choices=("auto", "none", "dynamic", "int8"), default="auto",
                   help="auto: int8 weights if the model has integer layers (default); "
                        "int8: weights and activations, calibrated on --data (LiteRT)")
    p.add_argument("--data", help="mnist, fashion_mnist, digits or FILE.npz: calibration and "
                                  "check inputs (default for the check: random inputs)")
    p.add_argument("--samples", type=_positive, default=256,
                   help="examples to calibrate and check")
    p.set_defaults(run=_export)

    p = sub.add_parser("techniques", help="list the registered techniques and their options")
    p.set_defaults(run=_techniques)

    p = sub.add_parser("demo", help="compress LeNet-300-100 on MNIST and show before/after")
    p.add_argument("--output-dir", default="kshrink-demo", help="where the models are written")
    p.add_argument("--recipe", help="recipe file (default: prune 92%%, 16 clusters, fine-tuned)")
    p.set_defaults(run=_demo)
    return parser


def _compress(args) -> int:
    from kshrink import Recipe, compress
    from kshrink.errors import KshrinkError
    from kshrink.io import save_model_file

    source, target = Path(args.model), Path(args.output)
    _check_output(target, source)
    _check_html(args.report, source)
    recipe = Recipe.from_file(args.recipe)
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
    save_model_file(small, target)
    if args.report:
        _write_html(args, args.report, small, model, report=report)
    if args.format == "json":
        print(report.to_json())
    else:
        print(report.to_markdown() if args.format == "md" else report.to_text())
    if data is not None and args.format != "json":
        with _progress(args) as say:
            say("evaluating")
            line = _before_after(model, small, data)
        print(f"\n{line}")
    print(f"\nwrote {target}", file=sys.stderr)
    return 0


def _techniques_option(text: str | None):
    """`--techniques`: comma-separated names, or YAML (a list of names and {name: options})."""
    if text is None:
        return None
    if not text.lstrip().startswith(("[", "{", "-")):
        return [name.strip() for name in text.split(",") if name.strip()]
    import yaml

    from kshrink.errors import KshrinkError

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise KshrinkError(f"--techniques is not valid YAML: {' '.join(str(e).split())[:200]}") \
            from None
    return value if isinstance(value, list) else [value]


def _search(args) -> int:
    from kshrink.analysis import search
    from kshrink.errors import KshrinkError
    from kshrink.io import save_model_file

    source, target = Path(args.model), Path(args.output)
    _check_output(target, source)
    _check_html(args.report, source)
    if args.recipe_out and Path(args.recipe_out).suffix.lower() not in (".yaml", ".yml",
                                                                         ".json"):
        raise KshrinkError("the recipe is written as YAML or JSON: name it .yaml, .yml or "
                           f".json. Received: {args.recipe_out}")
    model = _load(args, source)
    data = _data(args.data, model)
    with _progress(args) as say:
        small, report = search(model, data.train, objective=args.objective,
                               max_accuracy_drop=args.max_accuracy_drop, epochs=args.epochs,
                               batch_size=args.batch_size, learning_rate=args.learning_rate,
                               rounds=args.rounds, probe_steps=args.probe_steps,
                               seed=args.seed, latency_batch_size=args.latency_batch_size,
                               latency_runtime=args.latency_runtime,
                               techniques=_techniques_option(args.techniques),
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
    save_model_file(small, target)
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
        print(f"\n{line}\n\nchosen recipe (kshrink compress --recipe; it fine-tunes on the "
              f"first {report.training_examples:,} training examples):\n"
              f"{report.recipe.to_yaml()}")
    print(f"wrote {target}", file=sys.stderr)
    return 0


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
    from kshrink.io import save_model_file
    from kshrink.measure import file_size

    source, target = Path(args.model), Path(args.output)
    _check_output(target, source)
    model = _load(args, source)
    save_model_file(model, target)
    before, after = file_size(source).bytes, file_size(target).bytes
    print(f"wrote {target}: {after:,} bytes ({before:,} before, {before / after:.2f}x)")
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
    from kshrink.io import MAX_PARAMETERS, load_model_file

    return load_model_file(path, max_parameters=args.max_parameters or MAX_PARAMETERS)


def _techniques(args) -> int:
    from kshrink import FineTune, registered_techniques

    for cls in registered_techniques() + [FineTune]:
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        where = "recipe key" if cls is FineTune else f"step, stage {cls.stage}"
        print(f"{cls.name}  ({where})  {summary}")
        for name, kind, default, help_text in cls.options():
            print(f"  {name}: {kind} = {default!r}  {help_text}")
        print()
    return 0


def _demo(args) -> int:
    from kshrink import Recipe, compress, datasets, zoo
    from kshrink.core.progress import within
    from kshrink.io import save_model_file
    from kshrink.measure import compare

    recipe = Recipe.from_file(args.recipe) if args.recipe else Recipe.from_yaml(DEMO_RECIPE)
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
    original_path = save_model_file(model, out / "original.keras")
    save_model_file(small, out / "compressed.keras")
    compressed_path = save_model_file(small, out / "compressed.kshrink")
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
    from kshrink.errors import KshrinkError

    if path is None:
        return
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise KshrinkError(f"the report is an HTML page: name it .html. Received: {path}")
    if path.is_dir() or not path.parent.is_dir():
        raise KshrinkError(f"report {path}: name a file in an existing folder")
    if path.exists() and source.exists() and path.samefile(source):
        raise KshrinkError(f"report {path} would overwrite the input; choose another path")


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
        data = datasets.load(spec)
    datasets.check_fits(data, model)
    return data


def _progress(args):
    """Progress on stderr while work runs: a bar for counted work on a terminal, one line per
    stage otherwise; nothing with --quiet."""
    from kshrink.core.progress import Console

    return contextlib.nullcontext(lambda message: None) if args.quiet else Console()


if __name__ == "__main__":
    sys.exit(main())
