"""The `kshrink` command's entry point. It sits outside the `kshrink` package so that `--help`
and usage errors answer at once: `import kshrink` imports Keras (and its backend) to register
kshrink's layer classes, which takes seconds. The commands themselves are `kshrink.cli`.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EXIT_BAD_INPUT = 2


def _positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or len(text) > 12:
        raise argparse.ArgumentTypeError(f"must be a positive integer. Received: {text[:20]!r}")
    return value


def _whole(text: str) -> int:
    """An argparse type: an integer of at least 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0 or len(text) > 12:
        raise argparse.ArgumentTypeError(f"must be a whole number. Received: {text[:20]!r}")
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
    from kshrink import cli

    return cli.run(args)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kshrink", description="Compress and measure Keras 3 models.")
    parser.set_defaults(command=None)
    parser.add_argument("--max-parameters", type=_positive, default=None, metavar="N",
                        help="refuse input models whose config implies more kernel values "
                             "(default 2^31)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress on stderr (results and errors still print)")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an unexpected error")
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        metavar="MODULE",
                        help="import this module first: the custom layers, losses and "
                             "metrics it defines load by name (repeatable; found from the "
                             "current folder too)")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("compress", help="apply a recipe to a .keras model")
    p.add_argument("model", help="input .keras file")
    p.add_argument("--recipe", required=True,
                   help="a preset (int8, int4, int4-gptq, prune-50, ...: kshrink techniques "
                        "lists them) or a recipe file (.yaml, .yml or .json)")
    p.add_argument("-o", "--output", required=True,
                   help="output file: .keras (plain Keras) or .kshrink (compact)")
    p.add_argument("--data", help="mnist, fashion_mnist, digits, FILE.npz (x, y[, x_val, y_val], "
                                  "or one array per model input) or a folder of class "
                                  "subfolders of images (streamed)")
    p.add_argument("--format", choices=("text", "md", "json"), default="text")
    p.add_argument("--report", metavar="REPORT.html",
                   help="also write a self-contained HTML report with tables and plots")
    p.add_argument("--layers", action="store_true",
                   help="list every layer each step applied to or skipped (default: one line "
                        "per step, skip reasons grouped)")
    p.set_defaults(run="compress")

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
    p.add_argument("--epochs", type=_whole, default=2,
                   help="fine-tuning epochs per candidate step (0: post-training only)")
    p.add_argument("--batch-size", type=_positive, default=128, help="fine-tuning batch size")
    p.add_argument("--learning-rate", type=float, default=1e-3,
                   help="fine-tuning initial learning rate (cosine decay)")
    p.add_argument("--latency-batch-size", type=_positive,
                   help="latency: the batch size it is timed at (default 1)")
    p.add_argument("--latency-runtime", choices=("keras", "litert", "onnx"),
                   help="latency: timed in Keras (predict_on_batch, the default) or exported "
                        "(float) and timed in the deployment runtime, LiteRT or ONNX Runtime")
    p.add_argument("--techniques", metavar="LIST",
                   help="what the search may use, comma-separated (size: prune, cluster, "
                        "quantize; default prune,cluster; latency, macs: depth_prune, "
                        "structured_prune), or YAML with options, e.g. "
                        "'[{prune: {method: sparsegpt}}, cluster]'")
    p.add_argument("--channels", choices=("uniform", "per_layer"),
                   help="latency, macs: one channel ratio for every layer (uniform, the "
                        "default), or one per set of tied layers")
    p.add_argument("--rounds", type=_positive, default=6, help="candidates tried at most")
    p.add_argument("--probe-steps", type=_whole, default=100,
                   help="latency, macs: steps each block or channel probe is fine-tuned for "
                        "before its loss counts (0: at once)")
    p.add_argument("--seed", type=_whole, default=0, help="seeds every fine-tune")
    p.add_argument("-o", "--output", required=True,
                   help="output file: .keras (plain Keras) or .kshrink (compact)")
    p.add_argument("--recipe-out", metavar="RECIPE.yaml",
                   help="also write the chosen recipe (rerun it with kshrink compress)")
    p.add_argument("--report", metavar="REPORT.html",
                   help="also write a self-contained HTML report with the candidates' plot")
    p.add_argument("--format", choices=("text", "md", "json"), default="text")
    p.set_defaults(run="search")

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
    p.set_defaults(run="measure")

    p = sub.add_parser("convert", help="convert between .keras and the compact .kshrink")
    p.add_argument("model", help="input .keras or .kshrink file")
    p.add_argument("output", help="output .keras or .kshrink file")
    p.set_defaults(run="convert")

    p = sub.add_parser("sensitivity",
                       help="quantize one layer at a time and rank layers by what it costs")
    p.add_argument("model", help=".keras or .kshrink file (float)")
    p.add_argument("--data", required=True, help="mnist, fashion_mnist, digits or FILE.npz")
    p.add_argument("--mode", choices=("int8", "int4", "float16", "bfloat16"), default="int8")
    p.add_argument("--group-size", type=_positive, default=None,
                   help="int4: inputs per scale group (default: one scale per channel)")
    p.add_argument("--samples", type=_positive, default=2000, help="test examples used")
    p.add_argument("--seed", type=_whole, default=0, help="which examples are drawn")
    p.add_argument("--format", choices=("text", "md", "json"), default="text")
    p.set_defaults(run="sensitivity")

    p = sub.add_parser("export", help="write a model for LiteRT (.tflite) or ONNX (.onnx), "
                                      "checked against Keras")
    p.add_argument("model", help=".keras or .kshrink file")
    p.add_argument("output", help="output .tflite or .onnx file")
    p.add_argument("--quantization", choices=("auto", "none", "weights", "dynamic", "int8"),
                   default="auto",
                   help="auto: 'weights' if the model has integer layers, else 'none' (default); "
                        "weights: its int4/int8 codes as they are; int8: weights and "
                        "activations, calibrated on --data")
    p.add_argument("--data", help="mnist, fashion_mnist, digits or FILE.npz: calibration and "
                                  "check inputs (default for the check: random inputs)")
    p.add_argument("--samples", type=_positive, default=256,
                   help="examples to calibrate and check")
    p.set_defaults(run="export")

    p = sub.add_parser("techniques", help="list the registered techniques and their options")
    p.set_defaults(run="techniques")

    p = sub.add_parser("demo", help="compress LeNet-300-100 on MNIST and show before/after")
    p.add_argument("--output-dir", default="kshrink-demo", help="where the models are written")
    p.add_argument("--recipe", help="preset or recipe file (default: prune 92%%, 16 clusters, "
                                    "fine-tuned)")
    p.set_defaults(run="demo")
    return parser


if __name__ == "__main__":
    sys.exit(main())
