"""Layer-wise reconstruction over a whole model, in order: each layer is solved on the inputs
the layers before it, already compressed, now produce (as GPTQ and SparseGPT do), and
BatchNorm statistics re-estimated on calibration data.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import NamedTuple

import keras
import numpy as np

from kshrink.core.data import example_count, model_inputs
from kshrink.core.graph import graph_program
from kshrink.core.progress import Message
from kshrink.errors import KshrinkError
from kshrink.layers import as_matrix, from_matrix, kernel_specs
from kshrink.layers import rows as rowlib
from kshrink.layers.batchnorm import (
    channel_axis,
    inference,
    is_batchnorm,
    momentum,
    set_statistics,
    statistics,
)
from kshrink.measure.accuracy import predict, relative_error
from kshrink.reconstruct.solvers import energy_matrix, grouped, ungrouped

MIN_SAMPLES = 8  # calibration examples a layer-wise method needs at least


def calibration_inputs(data, samples: int, method: str):
    """The inputs of the first `samples` examples of `data` for a layer-wise `method` (e.g.
    "quantize: method gptq"): a one-line error when there is no data or too little."""
    if data is None:
        raise KshrinkError(f"{method} needs calibration data: pass data=(x, y) (or just x) "
                           "to compress")
    x = model_inputs(data, samples)
    if example_count(x) < MIN_SAMPLES:
        raise KshrinkError(f"{method} needs at least {MIN_SAMPLES} calibration examples. "
                           f"Received: {example_count(x)}")
    return x


# solve(layer, kernel name, grouped weights (G, r, c), Hessian (G, r, r)) -> new grouped weights
Solve = Callable[[keras.layers.Layer, str, np.ndarray, np.ndarray], np.ndarray]


def reconstruct(model: keras.Model, x, targets, solve: Solve, *,
                original: keras.Model | None = None, batch_size: int = 32,
                progress: Callable[[str], None] | None = None) -> None:
    """Replaces, in place and in graph order, every kernel of each target by what `solve`
    returns for it, given the Hessian of its input rows on `x`.

    With `original` (the model before compression: the same graph, layer for layer), that
    model runs alongside, and each layer of the top-level graph is solved toward what the
    original layer computed on the original inputs, not toward what it would compute on the
    inputs it now receives, so the error of the layers before it is corrected rather than
    carried on (the asymmetric calibration of GPTAQ, Li et al. 2025). Since
    `||X'Q - XW||^2 = ||X'(Q - W*)||^2 + const` with `W* = (X'^T X')^-1 X'^T X W`, that is
    `solve` on the target `W*`. A layer with a bias has it solved for as well (both sides
    centred, then the bias moved by the mean output's shift: empirical bias correction,
    Nagel et al. 2019, exact on the calibration data). Layers inside custom layers, and
    layers with several kernels, keep their own weights as the target.

    Args:
        model: the model, whose layers run as they are (masks, earlier solutions included).
        x: calibration inputs (an array or a dict of arrays).
        targets: `(graph layer, layer)` pairs: the layer as it appears in the model's graph
            (a wrapper, say) and the layer whose kernels are solved (what it wraps).
        solve: see `Solve`.
        original: see above.
    """
    solved = {id(g): layer for g, layer in targets}
    batches = list(_slices(x, batch_size))
    done = []

    def visit(graph_layer, inputs, original_inputs=None):
        layer = solved[id(graph_layer)]
        done.append(layer.name)
        if progress:
            progress(Message(f"layer {len(done)}/{len(solved)}: {layer.name}", "layers",
                             len(done) - 1, len(solved), layer.name))
        kernels = kernel_specs(layer)
        for variable, spec in kernels:
            try:
                mean, h = rowlib.moments(layer, spec.name, inputs)
            except ValueError as e:
                raise KshrinkError(f"reconstruction: {e}") from None
            g = rowlib.groups(layer, spec.name)
            axes = rowlib.matrix_axes(layer, spec)
            matrix = grouped(as_matrix(keras.ops.convert_to_numpy(variable.value), axes)
                             .astype("float64"), g)
            target, bias = matrix, None
            if original_inputs is not None and len(kernels) == 1:
                original_mean, cross = rowlib.cross_moment(layer, spec.name, inputs,
                                                           original_inputs)
                bias = getattr(layer, "bias", None)
                if bias is not None:  # centre both sides: the bias takes the mean
                    h = h - mean[:, :, None] * mean[:, None, :]
                    cross = cross - mean[:, :, None] * original_mean[:, None, :]
                target = _toward(matrix, h, cross)
            new = solve(layer, spec.name, target, h)
            _assign(variable, axes, new)
            if bias is not None:
                shift = ungrouped(np.matmul(original_mean[:, None, :], matrix)
                                  - np.matmul(mean[:, None, :], new))[0]
                bias.assign((keras.ops.convert_to_numpy(bias.value) + shift).astype(bias.dtype))

    run_layer_by_layer(model, batches, set(solved), visit, reference=original)


# Of the mean Hessian diagonal: how strongly a target is held to the weights it replaces.
# With a few dozen calibration images an unheld target fits them exactly and generalizes
# worse (EfficientNet-Lite0 int4: agreement 1.0 on its calibration crops, 0.65 on others).
TARGET_RIDGE = 0.1


def _toward(weights: np.ndarray, hessian: np.ndarray, cross: np.ndarray) -> np.ndarray:
    """`W*` per group (G, r, c): the weights that, on the inputs of `H`, best reproduce `W`
    on the inputs `C` pairs them with, held to `W` by a ridge `r` (`TARGET_RIDGE` times the
    mean of H's diagonal): `W* = (H + rI)^-1 (C W + r W)`. Inputs that are always zero keep
    their weights."""
    h = hessian.copy()
    diagonal = np.einsum("gii->gi", h)
    dead = diagonal <= 0
    r = h.shape[1]
    ridge = TARGET_RIDGE * np.maximum(diagonal.mean(axis=1, keepdims=True), 1e-12)
    h[:, np.arange(r), np.arange(r)] += np.where(dead, 1.0, 0.0) + ridge
    target = np.linalg.solve(h, np.matmul(cross, weights) + ridge[:, :, None] * weights)
    return np.where(dead[:, :, None], weights, target)


def _assign(variable, axes: tuple, weights: np.ndarray) -> None:
    variable.assign(from_matrix(ungrouped(weights), tuple(variable.shape), axes)
                    .astype(variable.dtype))


def input_hessians(model: keras.Model, x, layers, *, batch_size: int = 32) -> dict:
    """`{layer name: {kernel name: (groups, rows, rows)}}`: for each of `layers` that
    reconstruction takes, the second moment on `x` of the input rows each kernel multiplies
    (the Hessian of its layer-wise squared error), as the solvers take it."""
    taken = {id(l): l for l in layers if rowlib.unsupported(l) is None}
    found = {}

    def visit(layer, inputs):
        for _, spec in kernel_specs(layer):
            found.setdefault(layer.name, {})[spec.name] = rowlib.moments(layer, spec.name,
                                                                         inputs)[1]

    if taken:
        run_layer_by_layer(model, list(_slices(x, batch_size)), set(taken), visit)
    return found


def input_energy(model: keras.Model, x, layers, *, batch_size: int = 32) -> dict:
    """`{layer name: {kernel name: matrix}}`: for each of `layers` that reconstruction takes,
    the energy on `x` of the input each weight multiplies, in the kernel's matrix view."""
    layers = {l.name: l for l in layers}
    found = input_hessians(model, x, layers.values(), batch_size=batch_size)
    for name, kernels in found.items():
        layer = layers[name]
        for variable, spec in kernel_specs(layer):
            columns = as_matrix(np.empty(variable.shape, "int8"),
                                rowlib.matrix_axes(layer, spec)).shape[1]
            per_group = columns // rowlib.groups(layer, spec.name)
            kernels[spec.name] = energy_matrix(kernels[spec.name], per_group)
    return found


def solve_alone(layer, hessians: dict, solve: Callable[[np.ndarray, np.ndarray], np.ndarray]
                ) -> None:
    """Replaces, in place, each kernel of `layer` by `solve(grouped weights, Hessian)`, given
    its `input_hessians` entry (the kernels it lacks are left alone)."""
    for variable, spec in kernel_specs(layer):
        if spec.name in hessians:
            axes = rowlib.matrix_axes(layer, spec)
            weights = grouped(as_matrix(keras.ops.convert_to_numpy(variable.value), axes)
                              .astype("float64"), rowlib.groups(layer, spec.name))
            _assign(variable, axes, solve(weights, hessians[spec.name]))


def reestimate_batchnorm(model: keras.Model, x, *, reference: keras.Model | None = None,
                         batch_size: int = 32) -> list[str]:
    """Re-estimates every BatchNormalization's moving statistics on `x`, in graph order (each
    sees the statistics already re-estimated before it).

    Without `reference`, the statistics become those of each layer's input on `x`. With it
    (the model before compression), each layer keeps its statistics but moves them by the
    shift compression caused on `x`: the mean by `mean(x) - reference mean(x)`, the variance
    by the ratio of the two. A calibration set too small or too unlike the training data to
    estimate statistics from (a few dozen photos for an ImageNet model) still measures that
    shift well. Layers without a namesake of the same width in `reference` (channels
    removed) take the plain estimate.

    Returns:
        The names of the layers re-estimated.
    """
    layers = [l for l in _leaves(model) if is_batchnorm(l)]
    batches = list(_slices(x, batch_size))
    before = {}
    if reference is not None:
        named = {l.name: l for l in layers}
        counterparts = [l for l in _leaves(reference)
                        if is_batchnorm(l) and l.name in named]

        def record(layer, inputs):
            before[layer.name] = _moments(layer, inputs)

        if counterparts:
            run_layer_by_layer(reference, batches, {id(l) for l in counterparts}, record)

    def visit(layer, inputs):
        mean, variance = _moments(layer, inputs)
        if layer.name in before and before[layer.name][0].shape == mean.shape:
            old_mean, old_variance = before[layer.name]
            now = inference(layer)
            mean = now.mean + (mean - old_mean)
            variance = now.variance * ((variance + now.epsilon) / (old_variance + now.epsilon))
        set_statistics(layer, mean, variance)

    if layers:
        run_layer_by_layer(model, batches, {id(l) for l in layers}, visit)
    return [l.name for l in layers]


# Share of its statistics before a fine-tune that a BatchNorm's moving average may still hold
# after it before they count as stale (momentum ** steps): the weights moved, the statistics
# mostly did not.
STALE_SHARE = 0.1


def stale_batchnorm(model: keras.Model, steps: int) -> keras.layers.Layer | None:
    """The first BatchNormalization whose moving statistics `steps` training steps cannot have
    moved far from where they were (`momentum ** steps > STALE_SHARE`), or None.

    keras.applications models use momentum 0.999: a moving average of about 1,000 steps, so a
    fine-tune of a few dozen leaves statistics that no longer fit the weights (a MobileNetV2
    went from 90% to 12% so)."""
    for layer in _leaves(model):
        if is_batchnorm(layer) and momentum(layer) ** steps > STALE_SHARE:
            return layer
    return None


def correct_batchnorm(model: keras.Model, original: keras.Model, x, *,
                      only_if_closer: bool = True, trained: bool = False) -> str | None:
    """Re-estimates `model`'s BatchNorm statistics on `x` relative to `original` (see
    `reestimate_batchnorm`): a step that moved weights without training shifts every later
    layer's input statistics (one-shot pruning of a pretrained BN network otherwise loses
    nearly all agreement with it).

    Args:
        only_if_closer: keep the new statistics only if they bring the outputs on `x` closer
            to `original`'s; else restore the old ones.
        trained: the step fine-tuned the model, so its statistics are moving averages over
            training and no longer the original's: they are estimated anew on `x` (after a
            short fine-tune they still hold much of what they were before it: 0.99^100 of
            it after 100 steps at Keras' default momentum).

    Returns:
        One line for the report (None if the model has no BatchNormalization).
    """
    layers = [l for l in _leaves(model) if is_batchnorm(l)]
    if not layers:
        return None
    saved = [(v, keras.ops.convert_to_numpy(v.value)) for l in layers for v in statistics(l)]
    reference = predict(original, x)
    before = relative_error(reference, predict(model, x))
    reestimate_batchnorm(model, x, reference=None if trained else original)
    after = relative_error(reference, predict(model, x))
    count = f"{example_count(x)} examples, {len(layers)} layer{'s' if len(layers) > 1 else ''}"
    if only_if_closer and after >= before:
        for variable, value in saved:
            variable.assign(value)
        return (f"BatchNorm statistics kept: re-estimating them ({count}) did not bring the "
                "outputs closer to the original's")
    return (f"BatchNorm statistics re-estimated ({count}): output error vs the original "
            f"{before:.3g} -> {after:.3g}")




def _moments(layer, inputs) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and variance of a BatchNormalization's input batches."""
    axis = channel_axis(layer)
    if axis is None:
        raise KshrinkError(f"{layer.name}: normalizes over several axes {layer.axis}; its "
                           "statistics cannot be re-estimated (reestimate_batchnorm=False)")

    def rows(v):
        return np.moveaxis(v, axis, -1).reshape(-1, v.shape[axis])

    # Two passes, one batch at a time: never all batches at once in float64.
    count = sum(rows(v).shape[0] for v in inputs)
    mean = sum(rows(v).sum(axis=0, dtype="float64") for v in inputs) / count
    variance = sum(((rows(v) - mean) ** 2).sum(axis=0) for v in inputs) / count
    return mean, variance


def visit_inputs(model: keras.Model, x, wanted: set, visit, batch_size: int = 128) -> None:
    """`visit(layer, its input per batch as NumPy arrays)` for each layer of `model` (at any
    depth, inside custom layers too) whose id is in `wanted`, as `model` runs on `x` (an
    array, or a dict or list of arrays) in batches of `batch_size`. Only the tensors still
    needed are kept, in memory up to `STREAM_MEMORY` bytes and on disk past it (see
    `run_layer_by_layer`); the inputs are valid during the visit only. A layer called more
    than once (shared) is visited at each call."""
    run_layer_by_layer(model, list(_slices(x, batch_size)), wanted, visit, shared=True)


def run_layer_by_layer(model: keras.Model, batches: list, wanted: set, visit,
                       reference: keras.Model | None = None, shared: bool = False) -> None:
    """Runs `model` on each batch one layer call at a time, in graph order, every call once,
    until the last layer in `wanted` (ids, at any depth) has run. Before each call of a wanted
    layer, `visit(layer, its input per batch as NumPy arrays)` may change the layer's
    weights: the call, and so every later layer, then runs with the new ones. The inputs a
    visit receives are valid during the visit only.

    A wanted layer inside a custom layer (a transformer block) is visited when the block
    runs: the block runs once with the wanted sublayers' inputs recorded, each is visited in
    the order it was called, then the block runs again with the new weights (as Keras' own
    GPTQ does, block by block).

    With `reference` (a model of the same graph, layer for layer: the model before
    compression), it runs alongside on the same batches, and a wanted layer of the top-level
    graph is visited as `visit(layer, inputs, the reference layer's inputs)`.

    The values of the tensors still needed are held in memory up to `STREAM_MEMORY` bytes,
    and past it on disk. A wanted layer called more than once is refused (its weights would
    change between its calls), unless `shared`: then each call is visited."""
    calls, inputs, _ = graph_program(model)

    def holds(layer):
        return id(layer) in wanted or (isinstance(layer, keras.Model)
                                       and any(id(l) in wanted for l in _leaves(layer))) or (
            _inside(layer, wanted) != [])

    marked = [i for i, call in enumerate(calls) if holds(call.layer)]
    if not marked:
        return
    names = [t.name for t in model.inputs]
    with _Store(STREAM_MEMORY) as store:
        streams = [_Stream(calls, inputs, names, batches, store)]
        if reference is not None:
            twin = graph_program(reference)
            if [c.layer.name for c in twin[0]] == [c.layer.name for c in calls]:
                streams.append(_Stream(twin[0], twin[1], names, batches, store))
        visited = set()
        for i, call in enumerate(calls[:marked[-1] + 1]):
            layer = call.layer
            if id(layer) in wanted:
                if len(call.inputs) != 1 or (id(layer) in visited and not shared):
                    raise KshrinkError(f"reconstruction: layer {layer.name!r} must be called "
                                       "once, on one input")
                visited.add(id(layer))
                visit(layer, *[stream.inputs(i) for stream in streams])
            if isinstance(layer, keras.Model) and holds(layer):
                run_layer_by_layer(layer, [args[0] for args, _ in streams[0].arguments(i)],
                                   wanted, visit, shared=shared)
            elif not isinstance(layer, keras.Model) and id(layer) not in wanted:
                inner = _inside(layer, wanted)
                if inner:
                    for sublayer, recorded in _recorded(layer, inner, streams[0].arguments(i)):
                        visit(sublayer, recorded)
            if i == marked[-1]:
                break  # nothing after it is needed
            for stream in streams:
                stream.run(i)


# Bytes of tensor values `run_layer_by_layer` holds in memory before it writes further ones to
# disk: a 224x224 CNN's widest activation is 5 MB an image, 2.5 GB for 512 calibration images,
# and a step needs it for both the compressed and the original model (EfficientNet-Lite0, int4
# GPTQ on 512 images: 3.7 GB peak at this budget, 4.3 GB at 1 GB, 12.7 GB without a budget).
STREAM_MEMORY = 512 << 20


class _Store:
    """Values kept as they are (backend tensors) while they fit in `budget` bytes, and past it
    each as a NumPy file in a temporary folder, read back when used. A context manager: the
    folder goes on exit."""

    def __init__(self, budget: int):
        self.budget, self.held, self.files = budget, 0, 0
        self.folder = None

    def __enter__(self):
        return self

    def __exit__(self, *_):
        if self.folder is not None:
            self.folder.cleanup()

    def put(self, value):
        """A handle to `value` (a tensor or array)."""
        size = _bytes(value)
        if self.held + size <= self.budget:
            self.held += size
            return value
        if self.folder is None:
            self.folder = tempfile.TemporaryDirectory(prefix="kshrink-")
        self.files += 1
        path = os.path.join(self.folder.name, f"{self.files}.npy")
        np.save(path, keras.ops.convert_to_numpy(value))
        return _Spilled(path)

    def get(self, handle):
        return np.load(handle.path) if isinstance(handle, _Spilled) else handle

    def drop(self, handle) -> None:
        if isinstance(handle, _Spilled):
            os.remove(handle.path)
        else:
            self.held -= _bytes(handle)


class _Spilled(NamedTuple):
    path: str


def _bytes(value) -> int:
    itemsize = np.dtype(keras.backend.standardize_dtype(value.dtype)).itemsize
    return math.prod(value.shape) * itemsize


class _Batches(Sequence):
    """A tensor's value on every batch, each read from its store, as NumPy, when it is used."""

    def __init__(self, store: _Store, handles: list):
        self._store, self._handles = store, handles

    def __len__(self) -> int:
        return len(self._handles)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        return keras.ops.convert_to_numpy(self._store.get(self._handles[index]))


class _Stream:
    """The values of one graph's tensors on every batch, computed one call at a time."""

    def __init__(self, calls, inputs, names, batches, store: _Store):
        self.calls, self.store, self.batches = calls, store, len(batches)
        self.values = {id(t): [store.put(_bind(b, k, names, t.dtype)) for b in batches]
                       for k, t in enumerate(inputs)}
        self.last_use = {}
        for i, call in enumerate(calls):
            for tensor in call.inputs:
                self.last_use[id(tensor)] = i

    def inputs(self, i: int) -> _Batches:
        """Call `i`'s first input on every batch."""
        return _Batches(self.store, self.values[id(self.calls[i].inputs[0])])

    def arguments(self, i: int):
        """Call `i`'s `(args, kwargs)` on each batch in turn."""
        call = self.calls[i]
        for b in range(self.batches):
            yield keras.tree.map_structure(
                lambda t: (self.store.get(self.values[id(t)][b])
                           if isinstance(t, keras.KerasTensor) else t),
                (call.args, call.kwargs))

    def run(self, i: int) -> None:
        """Runs call `i` on every batch. An input no later call reads goes batch by batch as
        its outputs come: the call never holds both whole."""
        call = self.calls[i]
        mode = {"training": False} if isinstance(call.layer, keras.layers.Layer) else {}
        done = list({id(t): t for t in call.inputs if self.last_use.get(id(t)) == i}.values())
        outputs = [[] for _ in call.outputs]
        for b, (args, kwargs) in enumerate(self.arguments(i)):
            for j, value in enumerate(keras.tree.flatten(
                    call.layer(*args, **{**mode, **kwargs}))):
                outputs[j].append(self.store.put(value))
            del args, kwargs
            for tensor in done:
                handles = self.values[id(tensor)]
                self.store.drop(handles[b])
                handles[b] = None
        for tensor in done:
            del self.values[id(tensor)]
        for tensor, handles in zip(call.outputs, outputs):
            self.values[id(tensor)] = handles


def _inside(layer, wanted: set) -> list:
    """The sublayers of `layer` (a custom layer, not a model) whose ids are in `wanted`; none
    for an operation that is not a layer (a slice in a functional graph)."""
    if not isinstance(layer, keras.layers.Layer):
        return []
    return [l for l in layer._flatten_layers(include_self=False) if id(l) in wanted]


def _recorded(layer, inner: list, arguments: list) -> list:
    """`(sublayer, its first input per batch)` for each of `inner`, in the order `layer`
    calls them, from one run of `layer` on every batch of `arguments`."""
    seen = {id(l): [] for l in inner}
    order, batch = [], [0]

    def recorder(sublayer, call):
        def record(*args, **kwargs):
            if len(seen[id(sublayer)]) == batch[0]:  # its first call on this batch
                seen[id(sublayer)].append(keras.ops.convert_to_numpy(args[0]))
                if batch[0] == 0:
                    order.append(sublayer)
            return call(*args, **kwargs)

        return record

    originals = {id(l): l.call for l in inner}
    for sublayer in inner:  # Keras' own GPTQ patches each sublayer's call the same way
        sublayer.call = recorder(sublayer, originals[id(sublayer)])
    try:
        for args, kwargs in arguments:
            layer(*args, **{"training": False, **kwargs})
            batch[0] += 1
    finally:
        for sublayer in inner:
            sublayer.call = originals[id(sublayer)]
    return [(l, seen[id(l)]) for l in order]


def _bind(batch, index: int, names: list, dtype=None):
    """The part of one batch that model input `index` (named `names[index]`) takes, as that
    input's `dtype` when both are numbers (a model call converts its inputs so: uint8 pixels
    reach the first layer as float32)."""
    if isinstance(batch, dict):
        value = batch[names[index]]
    elif isinstance(batch, (list, tuple)):
        value = batch[index]
    else:
        value = batch
    # A tensor a layer computed (inputs of a nested model) may be torch's, holding gradients.
    value = value if isinstance(value, np.ndarray) else keras.ops.convert_to_numpy(value)
    if dtype is None or value.dtype == dtype or value.dtype.kind not in "biuf":
        return value
    return keras.ops.convert_to_numpy(keras.ops.cast(value, dtype))


def _leaves(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaves(layer)
        else:
            yield layer


def _slices(x, size: int):
    """`x` (an array, or a dict or list of arrays) in batches of `size` examples."""
    for start in range(0, example_count(x), size):
        yield keras.tree.map_structure(lambda v: v[start:start + size], x)
