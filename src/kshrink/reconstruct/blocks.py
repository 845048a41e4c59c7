"""Block reconstruction: the model cut into blocks (residual blocks, transformer layers, short
chains of layers), and the compressed kernels of each block fitted by gradient descent so that
the block, fed what the already-compressed blocks before it produce, reproduces what the
original model's block computes on the original inputs (BRECQ, Li et al. 2021).

How a kernel is fitted is a `Fit`: learned rounding onto a fixed integer grid (`Rounding`:
AdaRound, Nagel et al. 2020), the kept weights of a pruned kernel (`Masked`: AdaPrune, Hubara
et al. 2021), or a free float tensor such as a bias (`Free`).

Keras does the optimisation (`fit` of a small model around the block, its kernels replaced by
their fitted forms through a `keras.StatelessScope`), so it runs on every backend with no
backend import here.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import keras
import numpy as np

from kshrink.core.graph import Call, graph_program
from kshrink.core.progress import Message
from kshrink.errors import KshrinkError
from kshrink.layers.internals import build_for_fit

# A chain of single-input layers (VGG-like, or the first block of each stage of a MobileNet)
# has a cut after every layer: a block of it closes once it holds this many fitted layers.
CHAIN_LAYERS = 3
BATCH = 32  # examples per fitting step
# Adam's step. AdaRound and BRECQ take 1e-3 over 10,000-20,000 steps a block; a few hundred
# steps (what 2 CPU cores allow) need a larger one to move the rounding variables far enough.
LEARNING_RATE = 0.3
WARMUP = 0.2  # share of the steps fitted before the rounding regulariser starts (BRECQ)


class Fit:
    """How one variable of a block is fitted: the trainable variables it adds, the value the
    block computes with while fitting, a penalty, and the value it is given at the end."""

    def __init__(self, variable):
        self.variable = variable
        self.original = keras.ops.convert_to_numpy(variable.value).astype("float32")

    def create(self, model: keras.Model, name: str) -> None:
        """Adds this fit's trainable variables to `model`."""
        raise NotImplementedError

    def value(self):
        """The variable's value while fitting, in Keras ops of the trainable variables."""
        raise NotImplementedError

    def penalty(self, progress):
        """A loss term summed over the variable at `progress` (0 to 1 of the steps), or
        None."""
        return None

    def result(self) -> np.ndarray:
        """The variable's value once fitted."""
        return keras.ops.convert_to_numpy(self.value())

    def start(self) -> np.ndarray:
        """The variable's value without fitting (what the block is measured with first)."""
        return self.original


class Free(Fit):
    """Any float value (a bias), moved in steps relative to its own size so that one
    learning rate suits it and the rounding variables alike."""

    STEP = 0.01  # of the value's root mean square

    def create(self, model, name):
        self.unit = self.STEP * max(float(np.sqrt(np.mean(self.original ** 2))), 1e-6)
        self.moved = model.add_weight(shape=self.original.shape, name=name,
                                      initializer="zeros")

    def value(self):
        return keras.ops.add(self.original, self.unit * self.moved.value)


class Masked(Free):
    """The kept weights of a pruned kernel, fitted; the pruned ones stay zero."""

    def __init__(self, variable, mask: np.ndarray):
        super().__init__(variable)
        self.mask = np.asarray(mask, dtype="float32")

    def value(self):
        return keras.ops.multiply(super().value(), self.mask)

    def start(self):
        return self.original * self.mask


# The rectified sigmoid of AdaRound: stretched to (GAMMA, ZETA), then clipped to [0, 1], so the
# rounding can reach 0 and 1 exactly with a finite gradient on the way.
GAMMA, ZETA = -0.1, 1.1
# Weight of the rounding regulariser per weight, against the squared error relative to the
# output's energy. (AdaRound and BRECQ weigh its sum over the weights by 0.01 against the
# plain squared error, which makes the balance depend on the block's size and scale.)
REGULARISER = 1.0
# Its exponent, annealed from the first to the second between the warm-up and ANNEAL_END of
# the steps (AdaRound: 20 to 2 over all of them), so that with a few hundred steps the last
# fifth still pushes every rounding variable to 0 or 1 and the rounded kernel is the fitted one.
BETA = (10.0, 2.0)
ANNEAL_END = 0.8


class Rounding(Fit):
    """Learned rounding onto a fixed symmetric grid (AdaRound): each weight goes to
    `scale * (floor(w / scale) + h)`, `h` in [0, 1] learned and pushed to 0 or 1 by a
    regulariser whose exponent anneals, then rounded: the result is on the grid, codes in
    [-qmax, qmax].

    Args:
        variable: the kernel.
        scale: the grid step of each weight, broadcastable to the kernel's shape.
        qmax: the largest code.
    """

    def __init__(self, variable, scale: np.ndarray, qmax: int):
        super().__init__(variable)
        self.scale = np.broadcast_to(scale, self.original.shape).astype("float32")
        self.qmax = qmax
        self.floor = np.floor(self.original / self.scale).astype("float32")

    def create(self, model, name):
        rest = self.original / self.scale - self.floor  # in [0, 1): start where w is
        start = -np.log((ZETA - GAMMA) / (np.clip(rest, 0.01, 0.99) - GAMMA) - 1.0)
        self.logits = model.add_weight(shape=self.original.shape, name=name,
                                       initializer=keras.initializers.Constant(start))

    def _soft(self):
        ops = keras.ops
        return ops.clip(ops.sigmoid(self.logits.value) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def value(self):
        codes = keras.ops.clip(keras.ops.add(self.floor, self._soft()), -self.qmax, self.qmax)
        return keras.ops.multiply(codes, self.scale)

    def penalty(self, progress):
        ops = keras.ops
        late = ops.clip((progress - WARMUP) / (ANNEAL_END - WARMUP), 0.0, 1.0)
        beta = BETA[0] + (BETA[1] - BETA[0]) * late
        term = ops.sum(1.0 - ops.power(ops.abs(2.0 * self._soft() - 1.0), beta))
        return ops.where(progress < WARMUP, 0.0, term)

    def start(self):
        nearest = np.round(self.original / self.scale)
        return np.clip(nearest, -self.qmax, self.qmax) * self.scale

    def result(self):
        up = keras.ops.convert_to_numpy(self.logits.value) >= 0.0  # h >= 1/2
        return np.clip(self.floor + up, -self.qmax, self.qmax) * self.scale


@dataclasses.dataclass
class Block:
    """A contiguous run of a graph's calls: the tensors it reads that were made before it, and
    those it makes that are read after it (or are the model's outputs)."""

    calls: list[Call]
    inputs: list
    outputs: list
    fitted: int  # fitted layers it holds

    @property
    def name(self) -> str:
        return self.calls[-1].layer.name


def find_blocks(model: keras.Model,
                fitted: Callable[[keras.layers.Layer], int]) -> tuple[list[Block], list]:
    """The model's top-level graph cut into blocks, in order, and the graph's input tensors.

    A cut may fall after a call where at most one tensor that a fitted layer computed (or
    that was computed from one) is alive, made and still to be read: never inside a residual
    block, whose input stays alive until its Add. Tensors computed from the inputs alone (a
    transformer's padding mask, read by every layer) do not count: they are read by the
    blocks as inputs. A block closes at the first cut after a merge (an Add, a Concatenate)
    or after `CHAIN_LAYERS` fitted layers; a run of calls with nothing fitted closes at the
    first cut.

    Args:
        fitted: how many of the layers to fit a call's layer is or holds.
    """
    calls, inputs, outputs = graph_program(model)
    counts = [fitted(call.layer) for call in calls]
    last = {id(t): len(calls) for t in outputs}
    for i, call in enumerate(calls):
        for t in call.inputs:
            last[id(t)] = max(last.get(id(t), -1), i)
    heavy, alive, sizes = set(), set(), []
    for i, call in enumerate(calls):
        if counts[i] or any(id(t) in heavy for t in call.inputs):
            heavy |= {id(t) for t in call.outputs}
        alive = {t for t in alive if last[t] > i} | {
            id(t) for t in call.outputs if id(t) in heavy and last.get(id(t), -1) > i}
        sizes.append(len(alive))
    blocks, start, count = [], 0, 0
    for i, call in enumerate(calls):
        count += counts[i]
        if i == len(calls) - 1 or (sizes[i] <= 1 and (count == 0 or len(call.inputs) > 1
                                                      or count >= CHAIN_LAYERS)):
            part = calls[start:i + 1]
            made = {id(t) for c in part for t in c.outputs}
            read = _unique(t for c in part for t in c.inputs if id(t) not in made)
            kept = _unique(t for c in part for t in c.outputs if last.get(id(t), -1) > i)
            blocks.append(Block(part, read, kept, count))
            start, count = i + 1, 0
    return blocks, inputs


def _unique(tensors) -> list:
    return list({id(t): t for t in tensors}.values())


def run_block(block: Block, inputs: list) -> list:
    """The block's outputs on `inputs` (values of `block.inputs`), in inference mode."""
    values = {id(t): v for t, v in zip(block.inputs, inputs)}
    for call in block.calls:
        args, kwargs = keras.tree.map_structure(
            lambda t: values[id(t)] if isinstance(t, keras.KerasTensor) else t,
            (call.args, call.kwargs))
        mode = {"training": False} if isinstance(call.layer, keras.layers.Layer) else {}
        for tensor, value in zip(call.outputs, keras.tree.flatten(
                call.layer(*args, **{**mode, **kwargs}))):
            values[id(tensor)] = value
    return [values[id(t)] for t in block.outputs]


class _Hidden:
    """Holds a value out of Keras' attribute tracking (the block's layers are not the fitting
    model's to train)."""

    def __init__(self, value):
        self.value = value


class _Fitting(keras.Model):
    """A block whose fitted variables take their fitted forms; `fit` trains those alone."""

    def __init__(self, block: Block, fits: list[Fit], steps: int):
        super().__init__(name="kshrink_block_fit")
        self._block = _Hidden(block)
        self._fits = _Hidden(fits)
        self._steps = float(steps)
        self._size = float(sum(fit.original.size for fit in fits))
        for k, fit in enumerate(fits):
            fit.create(self, f"fit_{k}")
        self.step = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                    name="step")

    def call(self, inputs, training=False):
        fits = self._fits.value
        values = [(fit.variable, fit.value()) for fit in fits]
        if training:
            progress = self.step.value / self._steps
            penalties = [p for p in (fit.penalty(progress) for fit in fits) if p is not None]
            if penalties:  # per weight, so the same weight suits every block
                self.add_loss(REGULARISER * sum(penalties) / self._size)
            self.step.assign_add(1.0)
        with keras.StatelessScope(state_mapping=values):
            return run_block(self._block.value, keras.tree.flatten(inputs))


def _relative_error(energy: float):
    """Squared error summed over an example (as AdaRound and BRECQ weigh it), relative to the
    mean energy of the block's output: the same regulariser weight suits every block."""

    def loss(target, output):
        error = keras.ops.square(output - target)
        flat = keras.ops.reshape(error, (keras.ops.shape(error)[0], -1))
        return keras.ops.sum(flat, axis=-1) / energy

    return loss


class _Samples(keras.utils.PyDataset):
    """`steps` random batches of (block inputs, block targets), drawn from the calibration
    examples."""

    def __init__(self, inputs: list, targets: list, steps: int, seed: int):
        super().__init__()
        self.inputs, self.targets, self.steps = inputs, targets, steps
        self.count = len(inputs[0])
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return self.steps

    def __getitem__(self, index):
        chosen = np.sort(self.rng.choice(self.count, min(BATCH, self.count), replace=False))
        return (tuple(v[chosen] for v in self.inputs), tuple(v[chosen] for v in self.targets))


class _Report(keras.callbacks.Callback):
    def __init__(self, say: Callable[[int], None], every: int):
        super().__init__()
        self.say, self.every = say, every

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % self.every == 0:
            self.say(batch + 1)


def reconstruct_blocks(model: keras.Model, original: keras.Model, x,
                       fits: Callable[[keras.layers.Layer], list[Fit]], *, steps: int,
                       batch_size: int = BATCH, seed: int = 0,
                       progress: Callable[[str], None] | None = None) -> list[dict]:
    """Fits, block by block in graph order and in place, the variables that `fits` names for
    each layer of `model`, so that each block, fed the outputs of the blocks before it as
    fitted, reproduces `original`'s block on `original`'s inputs (the same graph, layer for
    layer: the model before compression).

    Memory: the values of the tensors between blocks on every calibration example, for both
    models, and one block's targets (a 224x224 CNN on 256 examples: about 1 GB at its widest
    cut); the activations inside a block are computed per batch.

    Args:
        model: the model whose variables are fitted.
        original: the model before compression.
        x: calibration inputs (an array, or a list or dict of arrays).
        fits: the `Fit`s of a leaf layer's variables, or [] for a layer that is not fitted.
        steps: optimizer steps per block.
        progress: told per block, with an estimate of the time left.

    Returns:
        One row per fitted block: its name, layers, and the squared error of its output on
        the calibration examples relative to the output's energy, with each variable's
        `Fit.start` value and fitted. A block that fitting left worse than it started (too
        few steps) keeps its start, and its row says so (`kept_start`).
    """
    found = {}  # leaf layer id -> its fits

    def fitted(layer) -> int:
        count = 0
        for leaf in _leaves_of(layer):
            if id(leaf) not in found:
                found[id(leaf)] = fits(leaf)
            count += bool(found[id(leaf)])
        return count

    counts = {}

    def counted(layer) -> int:
        counts[layer.name] = fitted(layer)
        return counts[layer.name]

    blocks, inputs = find_blocks(model, counted)
    twins, twin_inputs = find_blocks(original, lambda layer: counts.get(layer.name, 0))
    if [b.name for b in blocks] != [b.name for b in twins]:
        raise KshrinkError("block reconstruction: the original model's graph differs from the "
                           "compressed one's")
    given = _as_list(x, [t.name for t in model.inputs])
    current = {id(t): v for t, v in zip(inputs, given)}
    reference = {id(t): v for t, v in zip(twin_inputs, given)}
    rows, total = [], sum(1 for b in blocks if b.fitted)
    started, done = time.perf_counter(), 0
    for block, twin in zip(blocks, twins):
        inputs = [current[id(t)] for t in block.inputs]
        targets = _run(twin, [reference[id(t)] for t in twin.inputs], batch_size)
        if block.fitted:
            block_fits = [f for c in block.calls for leaf in _leaves_of(c.layer)
                          for f in found.get(id(leaf), [])]
            done += 1

            def say(step, done=done, block=block):
                if progress is None:
                    return
                spent = time.perf_counter() - started
                share = (done - 1 + step / steps) / total
                left = spent / share * (1 - share) if share > 0 else 0.0
                where = f"{block.name}, step {step}/{steps}, about {_duration(left)} left"
                progress(Message(f"block {done}/{total}: {where}", "blocks", done - 1, total,
                                 where))

            say(0)
            for fit in block_fits:
                fit.variable.assign(fit.start().astype(fit.variable.dtype))
            started_at = _run(block, inputs, batch_size)
            before = _error(started_at, targets)
            _fit(block, block_fits, inputs, targets, steps, seed, say)
            outputs = _run(block, inputs, batch_size)
            after = _error(outputs, targets)
            if after > before:  # too few steps to settle: never worse than where it started
                for fit in block_fits:
                    fit.variable.assign(fit.start().astype(fit.variable.dtype))
                outputs, after = started_at, before
            rows.append({"block": block.name, "layers": block.fitted, "error_before": before,
                         "error_after": after, "kept_start": after == before})
        else:
            outputs = _run(block, inputs, batch_size)
        for t, v in zip(block.outputs, outputs):
            current[id(t)] = v
        for t, v in zip(twin.outputs, targets):
            reference[id(t)] = v
        _forget(current, blocks, block)
        _forget(reference, twins, twin)
    return rows


def _fit(block, fits, inputs, targets, steps, seed, say) -> None:
    model = _Fitting(block, fits, steps)
    energy = sum(float(np.mean(np.sum(t.reshape(len(t), -1).astype("float64") ** 2, 1)))
                 for t in targets)
    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE),
                  loss=[_relative_error(max(energy, 1e-30))] * len(targets))
    layers = {id(l): l for c in block.calls for l in _leaves_of(c.layer)}
    trainable = {key: l.trainable for key, l in layers.items()}
    for layer in layers.values():  # only the fits train (torch: no gradients for the rest)
        layer.trainable = False
    build_for_fit(model, (tuple(inputs), tuple(targets)))
    try:
        model.fit(_Samples(inputs, targets, steps, seed), epochs=1, verbose=0,
                  callbacks=[_Report(say, max(1, steps // 10))])
    finally:
        for key, layer in layers.items():
            layer.trainable = trainable[key]
    for fit in fits:
        fit.variable.assign(fit.result().astype(fit.variable.dtype))


def _leaves_of(layer) -> list:
    """The layers that compute in a graph call: the layer, or its sublayers that hold no
    others; none for an operation that is not a layer (a slice in a functional graph)."""
    if not isinstance(layer, keras.layers.Layer):
        return []
    inner = layer._flatten_layers(include_self=False)
    return [layer] if not inner else [l for l in inner if not l._flatten_layers(include_self=False)]


def _as_list(x, names):
    if isinstance(x, dict):
        return [np.asarray(x[n]) for n in names]
    if isinstance(x, (list, tuple)):
        return [np.asarray(v) for v in x]
    return [np.asarray(x)]


def _forget(values: dict, blocks: list[Block], done: Block) -> None:
    """Drops the values no block after `done` reads."""
    later = blocks[blocks.index(done) + 1:]
    needed = {id(t) for b in later for t in b.inputs}
    for key in [k for k in values if k not in needed]:
        del values[key]


def _run(block: Block, inputs: list, batch_size: int) -> list:
    count = len(inputs[0])
    parts = [[] for _ in block.outputs]
    for start in range(0, count, batch_size):
        outputs = run_block(block, [v[start:start + batch_size] for v in inputs])
        for part, value in zip(parts, outputs):
            part.append(keras.ops.convert_to_numpy(value))
    return [np.concatenate(p) for p in parts]


def _error(outputs: list, targets: list) -> float:
    error = sum(float(np.sum((o.astype("float64") - t) ** 2)) for o, t in zip(outputs, targets))
    energy = sum(float(np.sum(t.astype("float64") ** 2)) for t in targets)
    return error / max(energy, 1e-30)


def describe(rows: list[dict], steps: int, start: str, end: str) -> str:
    """One line for the report on what `reconstruct_blocks` returned; `start` and `end` name
    the values measured before and after fitting ("rounded to nearest", "learned")."""
    if not rows:
        return "no block to fit"
    before = float(np.median([r["error_before"] for r in rows]))
    after = float(np.median([r["error_after"] for r in rows]))
    kept = sum(r["kept_start"] for r in rows)
    unchanged = (f" ({kept} kept as they started: fitting did not improve them in {steps} "
                 "steps; try more iterations)") if kept else ""
    return (f"{len(rows)} block{'s' if len(rows) > 1 else ''} fitted, {steps} steps each; "
            f"median block output error {before:.3g} ({start}) -> {after:.3g} ({end})"
            f"{unchanged}")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    return f"{math.ceil(seconds / 60)} min"
