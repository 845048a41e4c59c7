"""What a kernel multiplies: each kernel's input rows, in the row order of its matrix view.

Layer-wise reconstruction minimizes `||X W - X W'||` for a kernel's (inputs, outputs) matrix
view `W` (see `kshrink.layers.as_matrix`) and the rows `X` that multiply it: the features of a
Dense layer, the patches a convolution sees (im2col, laid out like the kernel's rows: spatial
offsets, then input channels). Grouped and depthwise convolutions multiply each block of output
columns by rows of their own input channels, so rows come in `G` groups: group `g` multiplies
the `g`-th of `G` equal, contiguous blocks of the matrix's columns.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from kshrink.layers.specs import kernel_specs

L = keras.layers
_CONV = (L.Conv1D, L.Conv2D, L.Conv3D)
_DEPTHWISE = (L.DepthwiseConv1D, L.DepthwiseConv2D)
_SEPARABLE = (L.SeparableConv1D, L.SeparableConv2D)
_CHUNK = 1 << 24  # patch values built at once, to bound temporary memory
# Rows of X used per example: plenty for a Hessian of a few thousand inputs, and what keeps
# early, high-resolution layers (12,544 positions an image at 112x112) from dominating.
ROWS_PER_EXAMPLE = 1024


def unsupported(layer, einsum: bool = False) -> str | None:
    """Why the rows of `layer`'s kernels cannot be formed, or None if they can.

    EinsumDense only with `einsum`: its rows fit the matrix view of `matrix_axes`, not its
    layer spec's, so only a caller using that view (GPTQ) may take it."""
    kind = type(layer)
    if kind is L.Dense:
        return None
    if kind is L.EinsumDense and einsum:
        return None if _einsum_rows(layer) else (
            f"EinsumDense {layer.equation!r}: a kernel axis is neither summed over nor kept")
    if kind in _CONV + _DEPTHWISE + _SEPARABLE:
        if layer.data_format != "channels_last":
            return f"{kind.__name__} with data_format={layer.data_format!r}"
        return None
    return f"{kind.__name__}: layer-wise reconstruction takes Dense and convolutions"


def refittable(layer) -> str | None:
    """Why `layer`'s kernel cannot be solved for whole by least squares on its rows (after
    channel removal), or None: Dense and ungrouped convolutions can."""
    kind = type(layer)
    if kind is not L.Dense and kind not in _CONV:
        return f"{kind.__name__} is not re-fitted (Dense and convolutions are)"
    if getattr(layer, "groups", 1) != 1:
        return "a grouped convolution is not re-fitted"
    return unsupported(layer)


def groups(layer, name: str) -> int:
    """How many row groups kernel `name` of `layer` has (see the module docstring)."""
    if type(layer) in _DEPTHWISE or (type(layer) in _SEPARABLE and name == "depthwise_kernel"):
        return _channels(layer, name)
    return getattr(layer, "groups", 1) if type(layer) in _CONV else 1


def kernel_rows(layer, name: str, x: np.ndarray, per_example: int | None = None,
                rng: np.random.Generator | None = None):
    """Yields chunks of the rows that kernel `name` of `layer` multiplies when `layer` runs
    on the batch `x`: arrays of shape (G, rows in chunk, kernel matrix rows). With
    `per_example`, at most that many rows (positions) of each example, drawn with `rng`."""
    x = np.asarray(x, dtype="float32")
    kind = type(layer)
    if kind is L.EinsumDense:  # the input's summed axes, in the kernel's order, per row
        inputs, summed = _einsum_rows(layer)
        kept = [i for i, c in enumerate(inputs) if c not in summed]
        moved = np.transpose(x, kept + [inputs.index(c) for c in summed])
        rows = moved.reshape(1, -1, math.prod(x.shape[inputs.index(c)] for c in summed))
        yield _subsample(rows, len(x), per_example, rng)
        return
    if kind is L.Dense or (kind in _SEPARABLE and name == "pointwise_kernel"):
        if kind is not L.Dense:
            # The pointwise kernel multiplies the depthwise output, computed with the
            # depthwise kernel as it is now (already reconstructed, when that ran first).
            x = keras.ops.convert_to_numpy(keras.ops.depthwise_conv(
                x, layer.depthwise_kernel, strides=layer.strides, padding=layer.padding,
                data_format=layer.data_format, dilation_rate=layer.dilation_rate))
        yield _subsample(x.reshape(1, -1, x.shape[-1]), len(x), per_example, rng)
        return
    g = groups(layer, name)
    for examples, patches in _patches(x, layer.kernel_size, layer.strides, layer.padding,
                                      layer.dilation_rate):
        rows, offsets, channels = patches.shape
        if kind in _CONV:  # (rows, offsets, G, C/G) -> (G, rows, offsets * C/G)
            per_group = patches.reshape(rows, offsets, g, channels // g)
            chunk = per_group.transpose(2, 0, 1, 3).reshape(g, rows, -1)
        else:  # depthwise: one group per input channel, its offsets as the rows
            chunk = patches.transpose(2, 0, 1)
        yield _subsample(chunk, examples, per_example, rng)


def by_equation(layer) -> bool:
    """Whether reconstruction views `layer`'s kernel through its einsum equation
    (`matrix_axes`) rather than its layer spec: an EinsumDense."""
    return type(layer) is L.EinsumDense


def matrix_axes(layer, spec) -> tuple:
    """The output axes of the matrix view reconstruction uses for kernel `spec` of `layer`:
    the layer spec's, except for EinsumDense, whose outputs are the kernel axes its equation
    keeps (its spec takes the last axis alone)."""
    if by_equation(layer) and _einsum_rows(layer):
        operands, output = layer.equation.split("->")
        return tuple(i for i, c in enumerate(operands.split(",")[1]) if c in output)
    return spec.output_axes


def _einsum_rows(layer):
    """`(input axes, summed axes in kernel order)` of an EinsumDense whose kernel axes are each
    summed over with the input or kept in the output only (so the rows of its matrix view
    are what the input holds along the summed axes), else None."""
    operands, output = layer.equation.split("->")
    inputs, kernel = operands.split(",")
    summed = [c for c in kernel if c not in output]
    if "." in layer.equation or not summed or any(c not in inputs for c in summed) or any(
            c in inputs for c in kernel if c in output):
        return None
    return inputs, summed


def _subsample(rows: np.ndarray, examples: int, per_example: int | None, rng) -> np.ndarray:
    limit = None if per_example is None else per_example * examples
    if limit is None or rows.shape[1] <= limit:
        return rows
    return rows[:, np.sort(rng.choice(rows.shape[1], limit, replace=False))]


def _channels(layer, name: str) -> int:
    shape = next(v.shape for v, spec in kernel_specs(layer) if spec.name == name)
    return int(shape[-2])


def _patches(x: np.ndarray, kernel_size, strides, padding: str, dilation):
    """im2col for channels-last `x` of shape (N, *spatial, C): chunks of shape
    (examples in the chunk, array of (output positions, kernel offsets, C)), in Keras'
    padding conventions."""
    spatial = x.shape[1:-1]
    nd = len(spatial)
    windows = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
    pads = []
    for size, window, stride in zip(spatial, windows, strides):
        if padding == "same":
            total = max((math.ceil(size / stride) - 1) * stride + window - size, 0)
            pads.append((total // 2, total - total // 2))
        elif padding == "causal":
            pads.append((window - 1, 0))
        else:
            pads.append((0, 0))
    per_example = math.prod(kernel_size) * x.shape[-1] * math.prod(
        math.ceil(max(s + sum(p) - w + 1, 0) / st)
        for s, p, w, st in zip(spatial, pads, windows, strides))
    step = max(1, _CHUNK // max(per_example, 1))
    for start in range(0, len(x), step):
        part = np.pad(x[start:start + step], [(0, 0)] + pads + [(0, 0)])
        view = np.lib.stride_tricks.sliding_window_view(part, windows, axis=tuple(range(1, nd + 1)))
        # view: (N, *positions, C, *window); keep every stride-th position, dilation-th offset
        view = view[(slice(None),) + tuple(slice(None, None, s) for s in strides) + (slice(None),)
                    + tuple(slice(None, None, d) for d in dilation)]
        view = np.moveaxis(view, 1 + nd, -1)  # (N, *positions, *kernel, C)
        yield len(part), np.ascontiguousarray(view).reshape(-1, math.prod(kernel_size),
                                                             x.shape[-1])


def moments(layer, name: str, batches, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`(mean row (G, r), mean of x x^T over rows (G, r, r))` of the rows kernel `name` of
    `layer` multiplies on every batch, in float64: the Hessian of the layer-wise problem,
    up to a factor.

    Of an example's output positions, at most `ROWS_PER_EXAMPLE` (a fixed random subset, by
    `seed`) are counted.

    Raises:
        ValueError: no rows at all.
    """
    rng = np.random.default_rng(seed)
    first = second = None
    count = 0
    for x in batches:
        for rows in kernel_rows(layer, name, x, ROWS_PER_EXAMPLE, rng):
            product = np.matmul(rows.transpose(0, 2, 1), rows).astype("float64")
            sums = rows.sum(axis=1, dtype="float64")
            first = sums if first is None else first + sums
            second = product if second is None else second + product
            count += rows.shape[1]
    if count == 0:
        raise ValueError(f"no calibration rows reach layer {layer.name!r}")
    return first / count, second / count


def cross_moment(layer, name: str, batches, reference_batches,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`(mean of r (G, r), mean of x r^T (G, r, r))` over rows: `x` the rows kernel `name` of
    `layer` multiplies on `batches`, `r` those it would multiply on `reference_batches` (the
    same examples as the uncompressed model feeds them), at the positions `moments` counts."""
    rngs = np.random.default_rng(seed), np.random.default_rng(seed)
    first = second = None
    count = 0
    for x, r in zip(batches, reference_batches):
        for rows, ref in zip(kernel_rows(layer, name, x, ROWS_PER_EXAMPLE, rngs[0]),
                             kernel_rows(layer, name, r, ROWS_PER_EXAMPLE, rngs[1])):
            product = np.matmul(rows.transpose(0, 2, 1), ref).astype("float64")
            sums = ref.sum(axis=1, dtype="float64")
            first = sums if first is None else first + sums
            second = product if second is None else second + product
            count += rows.shape[1]
    return first / count, second / count
