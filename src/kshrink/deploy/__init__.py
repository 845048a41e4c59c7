"""Export to deployment runtimes: LiteRT (`.tflite`) and ONNX (`.onnx`), checked on export.

Keras writes the file (`model.export`: LiteRT on the TensorFlow backend, ONNX on TensorFlow
or torch); kshrink chooses the converter
options, writes through a temporary file (an existing file is replaced only by a finished
export), then runs the file in its own runtime (LiteRT's interpreter, ONNX Runtime) on sample
inputs and reports its size and how far its outputs are from Keras'.

Quantization:
- `"none"`: float weights and activations.
- `"weights"`: the model's own integer weights, code for code, with float activations: each
  int4 or int8 kernel of a quantized model is stored as its codes and kshrink's scales, and
  dequantized before its op (ONNX: `DequantizeLinear`, opset 21; LiteRT: ai-edge-quantizer's
  weight-only quantization). Every other weight stays float. Where a format cannot hold a
  kernel's grid, it is widened (int4 codes as int8 on the same scales, or float) and the
  report says which and why (`kshrink.deploy.weights`). The smallest file that keeps the
  model's results; storage only: on x86 the runtimes dequantize and compute in float.
- `"dynamic"`: int8 weights, float activations (LiteRT's dynamic range quantization, ONNX
  Runtime's `quantize_dynamic`). Integer weights of a model kshrink quantized land on the
  same per-channel grid, so they stay what they were. Small files, but the hybrid kernels run
  slower than float on CPU (benchmarks/export.py).
- `"int8"`: int8 weights and activations: small and fast. LiteRT: a full-integer file. ONNX:
  QDQ (per-channel int8 weights, per-tensor int8 activations) through ONNX Runtime's static
  quantization, which ONNX Runtime runs as QLinearConv / QLinearMatMul. For a model kshrink
  quantized, the converter sees the float layers its integers stand for, on the same
  per-channel grid, and at the input of every layer with static 8-bit activation ranges
  (`Quantize(activation_bits=8)`, calibrated or learned in QAT) those ranges, which the file
  then uses. Every other range is calibrated on `data`: by the LiteRT converter, and for ONNX
  as the min/max of each kernel layer's input (ONNX Runtime fuses a layer into an integer
  kernel only where its input has a range of its own). The int4 kernels of a model kshrink
  quantized go into a LiteRT file's FULLY_CONNECTED ops as their own int4 codes and scales
  (int8 activations, int4 weights: XNNPACK runs it, at half the bytes of int8); other int4
  kernels, and ONNX's, are written as int8.
- `"auto"` (default): `"weights"` for a model with integer-quantized layers, else `"none"`.

A file of float weights stores pruned kernels sparse: LiteRT in its sparse encoding
(`Optimize.EXPERIMENTAL_SPARSITY`, for kernels at least half zeros), ONNX as sparse
initializers (where under a third is nonzero). A 92%-sparse LeNet-300-100 is 0.12x its dense
LiteRT file and 0.24x its dense ONNX file, bit-exact. Storage only: XNNPACK runs sparse
kernels on ARM alone, and ONNX Runtime makes them dense as it loads the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path

import keras
import numpy as np

from kshrink._stderr import quiet_stderr
from kshrink.core.atomic import atomic_output
from kshrink.core.data import (
    check_data,
    example_inputs,
    model_inputs,
    split_labels,
)
from kshrink.core.graph import graph_calls, is_plain, leaf_layers, rewrite
from kshrink.deploy import weights
from kshrink.errors import KshrinkError
from kshrink.layers import QuantizedKernels, integer_kernels, kernel_specs, kernel_weights
from kshrink.layers import quantization as layer_quantization
from kshrink.reconstruct.sequential import visit_inputs

FORMATS = {".tflite": "litert", ".onnx": "onnx"}
# Where Keras can write each format with what is installed (JAX's ONNX path needs jax2onnx).
BACKENDS = {"litert": ("tensorflow",), "onnx": ("tensorflow", "torch")}
QUANTIZATIONS = ("auto", "none", "weights", "dynamic", "int8")
SPARSE = 0.5  # a kernel this share zeros goes to LiteRT in its sparse encoding
MAX_SAMPLES = 65_536  # calibration and check inputs: a few hundred is plenty
RANGE_BATCH = 32  # examples a batch while layer input ranges are measured
RUNTIMES = ("keras", *BACKENDS)  # where a model can be timed: Keras itself, or an export
RUNTIME_NAMES = {"keras": "Keras", "litert": "LiteRT", "onnx": "ONNX Runtime"}
# ONNX Runtime's wheels (1.30 on) send telemetry on Linux and macOS and leave its session file
# (`.ses`) in the temp dir; kshrink works offline. The user's own setting wins.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
# What LiteRT prints as it starts an interpreter.
RUNTIME_NOISE = re.compile(r"Created TensorFlow Lite XNNPACK delegate")
# What ai-edge-quantizer prints as it rewrites a file (a progress bar it always shows).
QUANTIZER_NOISE = re.compile(r"Created TensorFlow Lite XNNPACK delegate|Applying Transformations"
                             r"|Generating Quantization Parameters|^\s*$")


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What `export` wrote and how closely the runtime follows Keras on the check inputs.

    Attributes:
        path: the file written.
        format: `"litert"` or `"onnx"`.
        quantization: `"none"`, `"weights"`, `"dynamic"` or `"int8"`.
        file_bytes: its size.
        samples: check inputs run through both Keras and the runtime.
        max_abs_diff: largest absolute output difference from Keras.
        agreement: share of samples whose arg-max output agrees with Keras (None for a
            single output value per sample).
        model_ranges: for `"int8"` of a model kshrink quantized, how many layers' input
            ranges came from the model itself rather than from calibration.
        note: one line on what the file could not keep (int4 weights written as int8), or
            None.
        weights: what the file keeps of each integer kernel, by layer path, for `"weights"`
            and for `"int8"` of a LiteRT file with int4 kernels (`"int4 per channel"`, or
            `"float32: ..."` with the reason it was widened).
    """

    path: Path
    format: str
    quantization: str
    file_bytes: int
    samples: int
    max_abs_diff: float
    agreement: float | None
    model_ranges: int = 0
    note: str | None = None
    weights: dict = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        agreement = "" if self.agreement is None else f", top-1 agreement {self.agreement:.2%}"
        if self.model_ranges:
            agreement += (f"; the input ranges of {self.model_ranges} layers are the model's, "
                          "the rest calibrated on data")
        if self.note:
            agreement += f"\n{self.note}"
        if self.weights:
            agreement += "\n" + _kept_summary(self.weights)
        hint = ""
        if self.quantization in ("dynamic", "weights"):
            hint = ("\ninteger weights with float activations: a small file, not a faster one "
                    "on CPU; for speed, export the float model with quantization 'int8'")
        return (f"wrote {self.path} ({self.format}, quantization {self.quantization}): "
                f"{self.file_bytes:,} bytes; on {self.samples} samples the outputs differ from "
                f"Keras' by at most {self.max_abs_diff:.3g}{agreement}{hint}")


def export(model: keras.Model, path, *, quantization: str = "auto", data=None,
           samples: int = 256) -> ExportReport:
    """Writes `model` for a deployment runtime, chosen by the suffix of `path`, and checks it.

    Args:
        model: a Keras model (kshrink's quantized layers included).
        path: `.tflite` (LiteRT) or `.onnx` (ONNX).
        quantization: `"auto"`, `"none"`, `"weights"`, `"dynamic"` or `"int8"` (see the
            module doc).
        data: example inputs `x` or `(x, y)`: calibration for `"int8"` and the check inputs
            (default for the check: random inputs shaped like the model's).
        samples: how many examples calibrate and check.

    Returns:
        An `ExportReport`.

    Raises:
        KshrinkError: an unknown suffix or quantization, `"int8"` without data or for ONNX,
            a backend other than TensorFlow, or "int8" for a model with several inputs.
    """
    path = Path(path)
    fmt = FORMATS.get(path.suffix)  # as written: Keras' exporters take lowercase only
    if fmt is None:
        raise KshrinkError(f"export: unknown file type {path.suffix!r}; use "
                           f"{' or '.join(FORMATS)}. Received: {path}")
    if not isinstance(samples, int) or isinstance(samples, bool) or not (
            1 <= samples <= MAX_SAMPLES):
        raise KshrinkError(f"export: samples must be an integer in [1, {MAX_SAMPLES:,}]. "
                           f"Received: samples={str(samples)[:20]}")
    data = split_labels(data, model)
    check_data(data, model)
    if quantization not in QUANTIZATIONS:
        raise KshrinkError(f"export: quantization must be one of {', '.join(QUANTIZATIONS)}. "
                           f"Received: {quantization!r}")
    if keras.backend.backend() not in BACKENDS[fmt]:
        raise KshrinkError(
            f"export to {path.suffix} runs on the {' or '.join(BACKENDS[fmt])} backend: set "
            f"KERAS_BACKEND=tensorflow (a .keras file saved under any backend loads there)")
    x = _inputs(model, data, samples)
    integer = _has_integer_layers(model)
    if quantization == "auto":
        quantization = "weights" if integer else "none"
    if quantization == "int8" and data is None:
        raise KshrinkError("export: quantization='int8' calibrates activations on data: pass "
                           "data (or use 'dynamic')")
    if quantization == "int8" and not isinstance(x, np.ndarray):
        raise KshrinkError(f"export: quantization='int8' takes models with one input; "
                           f"{model.name!r} has {len(model.inputs)} (use 'dynamic')")
    if integer and quantization != "weights" and keras.backend.backend() != "tensorflow":
        raise KshrinkError(f"export: quantization={quantization!r} of a model with integer "
                           "layers runs on the tensorflow backend (torch's ONNX exporter cannot "
                           "trace them; 'weights' can): set KERAS_BACKEND=tensorflow")
    given, carried, note, kernels = model, [], None, []
    if quantization == "int8" and any(layer_quantization(layer) == "int4"
                                        for layer in leaf_layers(model)):
        if fmt == "litert":  # int4 back into the fully connected ops: a8w4
            kernels = weights.model_kernels(model)
        else:
            note = ("int4 weights are written as int8: the integer kernels of this export "
                    "take int8 weights (the int4 grid lies on the int8 one within rounding)")
    if quantization == "int8" and (integer or fmt == "onnx"):
        model, carried = float_twin(model, x if fmt == "onnx" else None)
    if quantization == "none" and (sparse := sparse_kernels(model)):
        runtime = ("XNNPACK runs sparse kernels on ARM alone" if fmt == "litert" else
                   "ONNX Runtime makes them dense as it loads the file")
        note = (f"{len(sparse)} layer{'s' * (len(sparse) > 1)} with kernels at least half "
                f"zeros stored sparse where that is smaller (storage only: {runtime})")
    if quantization == "weights":
        kernels = weights.model_kernels(model)
        if integer:
            model, _ = float_twin(model)
    if fmt == "onnx":
        model = _constants_as_weights(model)
    # The outputs of the model as given; the torch exporter wants the model it traces called.
    expected = [np.asarray(o) for o in
                keras.tree.flatten(given.predict(x, batch_size=256, verbose=0))]
    if model is not given:
        model.predict(keras.tree.map_structure(lambda v: v[:1], x), verbose=0)
    if not path.parent.is_dir():
        raise KshrinkError(f"export: output directory does not exist: {path.parent}")
    if path.is_dir():
        raise KshrinkError(f"export: output {path} is a directory; name a file")
    with atomic_output(path) as temporary:
        if fmt == "litert":
            _write_litert(model, temporary, quantization, x)
        else:
            _write_onnx(model, temporary, quantization, x)
        kept = {}
        if kernels and quantization == "int8":
            kept = weights.int4_into_full_int8(temporary, kernels)
        elif kernels:
            with _quiet_quantizer(), quiet_stderr(QUANTIZER_NOISE):
                keep = weights.keep_litert if fmt == "litert" else weights.keep_onnx
                kept = keep(temporary, kernels)
        outputs = Runtime(temporary).run(x)  # renamed into place only once it has run
        if len(outputs) != len(expected):
            raise KshrinkError(f"export: the {fmt} file has {len(outputs)} outputs; the "
                               f"model {len(expected)}")
    outputs = [o.reshape(e.shape) for o, e in zip(outputs, expected)]
    agreement = None
    if len(expected) == 1 and expected[0].ndim == 2 and expected[0].shape[1] > 1:
        agreement = float(np.mean(outputs[0].argmax(1) == expected[0].argmax(1)))
    difference = max(float(np.max(np.abs(o - e))) for o, e in zip(outputs, expected))
    return ExportReport(path, fmt, quantization, path.stat().st_size,
                        len(keras.tree.flatten(x)[0]), difference, agreement, len(carried),
                        note, kept)


def _kept_summary(kept: dict) -> str:
    """One line for the kernels kept as they were, one per layer widened (and why)."""
    counts = {}
    for what in kept.values():
        if not what.startswith(("float32", "int8 on")):
            counts[what] = counts.get(what, 0) + 1
    lines = ["weights kept code for code: " + (", ".join(
        f"{n} kernel{'s' * (n > 1)} {what}" for what, n in sorted(counts.items())) or "none")]
    lines += [f"  {layer}: {what}" for layer, what in kept.items()
              if what.startswith(("float32", "int8 on"))]
    return "\n".join(lines)


def check_runtime(caller: str, runtime: str) -> None:
    """A one-line error, before any work, for a runtime that is unknown or that this backend
    cannot export to."""
    if runtime not in RUNTIMES:
        raise KshrinkError(f"{caller}: runtime must be one of {', '.join(RUNTIMES)}. "
                           f"Received: {runtime!r}")
    if runtime != "keras" and keras.backend.backend() not in BACKENDS[runtime]:
        raise KshrinkError(f"{caller}: the {runtime} runtime needs an export, which runs on "
                           f"the {' or '.join(BACKENDS[runtime])} backend: set KERAS_BACKEND="
                           f"tensorflow")


def in_runtime(model: keras.Model, runtime: str, data=None):
    """`model` as `runtime` runs it: the model itself for `"keras"`; else its float export
    (through a temporary file) loaded as a `Runtime`, which `kshrink.measure.latency` times
    like a Keras model. `data`: check inputs for the export, as `export` takes them."""
    check_runtime("in_runtime", runtime)
    if runtime == "keras":
        return model
    suffix = next(s for s, fmt in FORMATS.items() if fmt == runtime)
    with tempfile.TemporaryDirectory() as work:
        report = export(model, Path(work) / f"model{suffix}", quantization="none",
                        data=data, samples=64)
        return Runtime(report.path)  # holds the file in memory: it may go


def _inputs(model, data, samples: int):
    """The check (and calibration) inputs: `samples` examples of `data`, else random ones,
    each as its model input's dtype; an array, or a dict or list for several inputs."""
    if data is None:
        return example_inputs(model, samples)
    x = model_inputs(data)
    specs = model.inputs
    if isinstance(x, dict):
        return {t.name: np.asarray(x[t.name][:samples], dtype=t.dtype or "float32")
                for t in specs}
    if isinstance(x, (list, tuple)):
        return [np.asarray(v[:samples], dtype=t.dtype or "float32") for v, t in zip(x, specs)]
    return np.asarray(x[:samples], dtype=specs[0].dtype or "float32")


def float_twin(model: keras.Model, calibration=None) -> tuple[keras.Model, list[str]]:
    """`model` with every integer layer as its float Keras class, holding the float weights
    its integers stand for, and TensorFlow's FakeQuant op with the model's own range on the
    input of each kshrink layer that quantizes its input statically: the LiteRT converter
    makes that range the tensor's int8 scale. Returns the model and the names of those layers.

    The FakeQuant goes right after the layer producing that input, so every reader of the
    tensor (a residual Add beside the convolution) sees one scale, as an integer runtime needs;
    readers with different ranges share the union of them.

    With `calibration` (example inputs), every other layer with kernels gets a FakeQuant on
    its input too, with the range its input takes on them: ONNX Runtime fuses a layer into an
    integer kernel only where its input has one.
    """
    if not is_plain(model):
        if calibration is not None or any(getattr(layer, "activation_bits", None)
                                          for layer in leaf_layers(model)):
            raise KshrinkError(f"export: quantization='int8' of {type(model).__name__} "
                               "(a model that builds its layers itself) is not supported yet")
        return _rebuilt_float(model), []
    calls, _, _ = graph_calls(model)
    producer = {id(t): layer for layer, _, outputs in calls for t in outputs}
    ranges, carried = {}, []
    for layer, inputs, _ in calls:
        if getattr(layer, "activation_bits", None) and len(inputs) == 1:
            ranges[id(layer)] = tuple(float(keras.ops.convert_to_numpy(v))
                                      for v in (layer.input_min, layer.input_max))
            carried.append(layer.name)
    if calibration is not None:
        wanted = {id(layer) for layer, inputs, _ in calls if id(layer) not in ranges
                  and len(inputs) == 1 and kernel_specs(layer)}

        def widen(layer, batches):
            for values in batches:
                low, high = ranges.get(id(layer), (0.0, 0.0))
                ranges[id(layer)] = (min(float(np.min(values)), low),
                                     max(float(np.max(values)), high))

        visit_inputs(model, calibration, wanted, widen, RANGE_BATCH)
    after, before = {}, {}
    for layer, inputs, _ in calls:
        if id(layer) not in ranges:
            continue
        low, high = ranges[id(layer)]
        source = producer.get(id(inputs[0]))
        if source is None or isinstance(source, keras.Model):
            before[id(layer)] = (low, high, 8)
        else:
            known = after.get(id(source), (low, high, 8))
            after[id(source)] = (min(low, known[0]), max(high, known[1]), 8)

    def replace(layer):
        new = _as_float(layer) or layer
        chain = [new]
        if id(layer) in before:
            chain.insert(0, _FakeQuant(*before[id(layer)], name=f"{layer.name}_input"))
        if id(layer) in after:
            chain.append(_FakeQuant(*after[id(layer)], name=f"{layer.name}_output"))
        return chain if len(chain) > 1 else new

    originals = {layer.name: layer for layer in model.layers}
    twin = rewrite(model, replace)
    for layer in twin.layers:
        source = originals.get(layer.name)
        if source is not None and source is not layer and layer.weights:
            layer.set_weights(_float_weights(source, layer))
    return twin, carried


def _rebuilt_float(model: keras.Model) -> keras.Model:
    """The float twin of a model that builds its layers in its constructor (a keras-hub
    backbone or task): rebuilt from its config with every quantized dtype policy replaced by
    its float source, then given, layer by layer (by path), the float weights of each."""
    def floating(config):
        if isinstance(config, dict):
            if config.get("class_name") == "DTypePolicyMap":
                return floating(config["config"]["default_policy"])
            if config.get("module", "").startswith("keras") and "source_name" in config.get(
                    "config", {}):
                return config["config"]["source_name"]  # a quantized policy's float one
            return {key: floating(value) for key, value in config.items()}
        return [floating(v) for v in config] if isinstance(config, list) else config

    twin = type(model).from_config(floating(model.get_config()))
    sources = {layer.path: layer for layer in model._flatten_layers(include_self=False)}
    for layer in twin._flatten_layers(include_self=False):
        source = sources.get(layer.path)
        if source is None or not layer.weights or list(
                layer._flatten_layers(include_self=False)):
            continue  # a container: its sublayers carry the weights
        if getattr(source, "quantization_mode", None) and not integer_kernels(source):
            # A rebuilt model cannot keep the layer as it is, as a rewritten one does.
            raise KshrinkError(f"export: Keras' own {source.quantization_mode} "
                               f"{type(source).__name__} layers ({source.path!r}) cannot be "
                               "exported with their float values yet")
        layer.set_weights(_float_weights(source, layer) if integer_kernels(source)
                          else source.get_weights())
    return twin


def _as_float(layer):
    """A float copy of an integer layer (not built), or None for other layers."""
    config = layer.get_config()
    if isinstance(layer, QuantizedKernels) and layer.mode in ("int8", "int4"):
        base = next(c for c in type(layer).__mro__[1:] if c.__module__.startswith("keras."))
        for key in ("mode", "group_size", "activation_bits"):
            config.pop(key, None)
        return base.from_config(config)
    if getattr(layer, "quantization_mode", None) in ("int8", "int4"):
        if not integer_kernels(layer):  # a layout of Keras' that kshrink does not know
            raise KshrinkError(
                f"export: Keras' own {layer.quantization_mode} {type(layer).__name__} layers "
                f"({layer.name!r}) cannot be exported with their float values yet; export "
                "the model before quantizing it")
        config.pop("quantization_config", None)
        config["dtype"] = layer.dtype_policy.variable_dtype
        return type(layer).from_config(config)  # Keras' Dense, EinsumDense, Embedding
    return None


def _float_weights(source, layer) -> list:
    """The float weights of `source` in the order `layer` (its float twin) holds them."""
    if isinstance(source, QuantizedKernels):
        stored = {v.name: v for v in source.weights}
        return [keras.ops.convert_to_numpy(source.dequantized(v.name)) if v.name in
                source.KERNELS else keras.ops.convert_to_numpy(stored[v.name].value)
                for v in layer.weights]
    values = {name: kernel.values for name, kernel in integer_kernels(source).items()}
    if getattr(source, "bias", None) is not None:
        values["bias"] = keras.ops.convert_to_numpy(source.bias)
    return [values[v.name] for v in layer.weights]


class _FakeQuant(keras.layers.Layer):
    """TensorFlow's FakeQuant with fixed bounds, which the LiteRT converter reads as a
    tensor's quantization range (export only; never saved)."""

    def __init__(self, low: float, high: float, bits: int, **kwargs):
        super().__init__(**kwargs)
        self.low, self.high, self.bits = low, high, bits

    def call(self, x):
        import tensorflow as tf

        return tf.quantization.fake_quant_with_min_max_args(x, min=self.low, max=self.high,
                                                            num_bits=self.bits)


def sparse_kernels(model) -> list[str]:
    """The layers of `model` with a kernel of which at least `SPARSE` are zeros."""
    return [layer.name for layer in leaf_layers(model)
            if any(np.mean(keras.ops.convert_to_numpy(v.value) == 0) >= SPARSE
                   for v in kernel_weights(layer))]


def _has_integer_layers(model) -> bool:
    return any(layer_quantization(layer) in ("int8", "int4") for layer in leaf_layers(model))


def _write_litert(model, path, quantization, x) -> None:
    import tensorflow as tf

    options = {}
    if quantization in ("dynamic", "int8"):  # "weights" starts from the float file
        options["optimizations"] = [tf.lite.Optimize.DEFAULT]
    elif quantization == "none" and sparse_kernels(model):
        # XNNPACK refuses sparse kernels with integer weights: float files only.
        options["optimizations"] = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    if quantization == "int8":
        def representative():
            for i in range(len(x)):
                yield [x[i:i + 1]]

        options["representative_dataset"] = representative
    try:
        model.export(path, format="litert", verbose=False, **options)
    except Exception as e:  # TensorFlow's ConverterError is not public API
        if type(e).__name__ != "ConverterError":
            raise
        # e.g. Keras' int8 EinsumDense (keras-hub attention): a squeeze the converter refuses
        first = next((line for line in str(e).splitlines() if "error:" in line), str(e))
        raise KshrinkError("export: the LiteRT converter cannot convert this model: "
                           f"{first.rsplit('error:', 1)[-1].strip()[:200]}") from None


def _constants_as_weights(model: keras.Model) -> keras.Model:
    """`model` with each `Normalization` as a layer that holds its mean and scale as weights:
    tf2onnx turns the tensors Keras' layer computes them into (at build, not in the graph)
    into graph inputs, and an EfficientNet's file then asks for three inputs."""
    if not is_plain(model) or not any(type(layer) is keras.layers.Normalization
                                      for layer in model.layers):
        return model

    def replace(layer):
        if type(layer) is not keras.layers.Normalization:
            return layer
        mean, variance = (np.asarray(keras.ops.convert_to_numpy(v), "float32")
                          for v in (layer.mean, layer.variance))
        spread = np.maximum(np.sqrt(variance), keras.config.epsilon())
        return _Standardize(mean, spread, layer.invert, name=layer.name)

    return rewrite(model, replace)


class _Standardize(keras.layers.Layer):
    """`Normalization` with its statistics as weights (export only; never saved)."""

    def __init__(self, mean, spread, invert: bool, **kwargs):
        super().__init__(**kwargs)
        self.invert = invert
        self.center = self.add_weight(shape=mean.shape, trainable=False, name="mean",
                                      initializer=keras.initializers.Constant(mean))
        self.spread = self.add_weight(shape=spread.shape, trainable=False, name="spread",
                                      initializer=keras.initializers.Constant(spread))

    def call(self, x):
        if self.invert:
            return x * self.spread + self.center
        return (x - self.center) / self.spread


def _write_onnx(model, path, quantization, x) -> None:
    if quantization in ("none", "weights"):
        model.export(path, format="onnx", verbose=False)
        if quantization == "none":
            weights.sparse_onnx(path)
        return
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    with tempfile.TemporaryDirectory() as work, _quiet_quantizer():
        float_path = Path(work) / "float.onnx"
        model.export(float_path, format="onnx", verbose=False)
        if quantization == "dynamic":
            quantize_dynamic(float_path, path, weight_type=QuantType.QInt8)
            return
        ranges = _fake_quant_ranges(float_path)
        quantize_static(float_path, path, _Calibration(float_path, x),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        extra_options={"TensorQuantOverrides": ranges,
                                       "CalibMaxIntermediateOutputs": _flush_every(len(x))})


@contextlib.contextmanager
def _quiet_quantizer():
    """ONNX Runtime's quantizer logs advice on the root logger ("consider pre-processing"),
    tf2onnx's NumPy use a FutureWarning, ai-edge-quantizer a debugging warning: none is the
    user's to act on."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # ai-edge-quantizer's own check runs an interpreter that keeps every tensor
            warnings.filterwarnings("ignore", "Warning: Enabling `experimental_preserve_all")
            yield
    finally:
        root.setLevel(level)


def _fake_quant_ranges(path: Path) -> dict:
    """ONNX Runtime's tensor overrides (int8 scale and zero point) that make its static
    quantization use the ranges of the model's own FakeQuant ops, which the exporter wrote
    as QuantizeLinear/DequantizeLinear pairs: the same grid on both sides of each pair, so
    re-quantizing there changes nothing (and the pairs still fuse into integer kernels)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(path).graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    readers = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    overrides = {}
    for node in graph.node:
        pair = readers.get(node.output[0], []) if node.op_type == "QuantizeLinear" else []
        if len(pair) != 1 or pair[0].op_type != "DequantizeLinear":
            continue
        zero = constants[node.input[2]] if len(node.input) > 2 else np.uint8(0)
        shift = 128 if zero.dtype == np.uint8 else 0  # the same grid in int8
        grid = [{"scale": np.array(float(constants[node.input[1]]), dtype="float32"),
                 "zero_point": np.array(int(zero) - shift, dtype="int8")}]
        overrides[node.input[0]] = overrides[pair[0].output[0]] = grid
    return overrides


def _flush_every(examples: int) -> int:
    """How many examples ONNX Runtime's calibrator holds the tensors of before it reduces them
    to ranges (by default it keeps all of them: GBs). About `RANGE_BATCH`, but never a divisor
    of `examples`: ORT 1.31 fails ("No data is collected") when the last flush leaves none."""
    return next(k for k in range(RANGE_BATCH, 1, -1) if examples % k)


class _Calibration:
    """ONNX Runtime's calibration reader over the export's sample inputs, one at a time."""

    def __init__(self, path: Path, x: np.ndarray):
        import onnx

        (source,) = onnx.load(path).graph.input
        self._name = source.name
        self._rows = iter(range(len(x)))
        self._x = x.astype("float32", copy=False)

    def get_next(self):
        i = next(self._rows, None)
        return None if i is None else {self._name: self._x[i:i + 1]}

    def rewind(self):
        self._rows = iter(range(len(self._x)))


# ONNX Runtime's input type names -> NumPy dtypes.
_ONNX_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64",
               "tensor(float16)": "float16", "tensor(int64)": "int64", "tensor(int32)": "int32",
               "tensor(uint8)": "uint8", "tensor(int8)": "int8", "tensor(bool)": "bool"}


class Runtime:
    """An exported file loaded in its runtime: `runtime(x)` returns the first output as NumPy,
    `runtime.run(x)` every output (by name: a dict output's keys, in `keras.tree.flatten`
    order). `x` is an array, or a dict of arrays by input name for a model with several
    inputs. `predict_on_batch` is the same call, so `kshrink.measure.latency(runtime, x)`
    times it like a Keras model.
    """

    def __init__(self, path):
        self.path = Path(path)
        fmt = FORMATS.get(self.path.suffix.lower())
        if fmt == "litert":
            from ai_edge_litert.interpreter import Interpreter

            self._interpreter = Interpreter(model_content=self.path.read_bytes())
            inputs = self._interpreter.get_input_details()
            self._single = len(inputs) == 1 and len(self._interpreter.get_output_details()) == 1
            if self._single:
                (self._input,) = inputs
                (self._output,) = self._interpreter.get_output_details()
                self._shape = None
            else:  # by name, through the model's signature
                self._runner = self._interpreter.get_signature_runner()
                self._dtypes = {name: d["dtype"] for name, d in
                                self._runner.get_input_details().items()}
        elif fmt == "onnx":
            import onnxruntime

            self._session = onnxruntime.InferenceSession(str(self.path),
                                                         providers=["CPUExecutionProvider"])
            self._dtypes = {i.name: _ONNX_TYPES.get(i.type, "float32")
                            for i in self._session.get_inputs()}
            self._names = sorted(o.name for o in self._session.get_outputs())
        else:
            raise KshrinkError(f"Runtime: unknown file type {self.path.suffix!r}; use "
                               f"{' or '.join(FORMATS)}")
        self.format = fmt

    def __call__(self, x) -> np.ndarray:
        return self.run(x)[0]

    predict_on_batch = __call__

    def run(self, x) -> list[np.ndarray]:
        """Every output of the file on `x`, ordered by output name."""
        if self.format == "onnx":
            outputs = self._session.run(self._names, self._feeds(x))
            return [np.asarray(o) for o in outputs]
        if not self._single:
            outputs = self._runner(**self._feeds(x))
            return [np.array(outputs[name]) for name in sorted(outputs)]
        x = np.asarray(x).astype(self._input["dtype"], copy=False)
        if x.shape != self._shape:
            self._interpreter.resize_tensor_input(self._input["index"], x.shape)
            with quiet_stderr(RUNTIME_NOISE):  # where LiteRT applies its delegate
                self._interpreter.allocate_tensors()
            self._shape = x.shape
        self._interpreter.set_tensor(self._input["index"], x)
        self._interpreter.invoke()
        return [np.array(self._interpreter.get_tensor(self._output["index"]))]

    def _feeds(self, x) -> dict:
        """`x` by input name, each in its input's dtype."""
        if not isinstance(x, dict):
            if len(self._dtypes) != 1:
                raise KshrinkError(f"Runtime: {self.path.name} takes {len(self._dtypes)} "
                                   f"inputs; pass a dict by name: {', '.join(self._dtypes)}")
            x = {next(iter(self._dtypes)): x}
        missing = set(self._dtypes) - set(x)
        if missing:
            raise KshrinkError(f"Runtime: {self.path.name} needs inputs "
                               f"{', '.join(sorted(missing))}")
        return {name: np.asarray(x[name]).astype(dtype, copy=False)
                for name, dtype in self._dtypes.items()}
