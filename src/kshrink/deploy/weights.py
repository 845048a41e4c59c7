"""The model's own integer weights in an exported file, code for code.

A converter sees kshrink's float twin of a quantized model (every integer kernel as the float
values its codes stand for) and writes those floats. Here the file's float weight tensors are
matched back to the Keras kernels they came from, by value, whatever layout the converter gave
them (ONNX's Conv weight is (out, in, h, w) where Keras' is (h, w, in, out)), and replaced by
the kernel's own codes and scales:

- ONNX: an INT4 or INT8 initializer feeding `DequantizeLinear` (per axis, or in blocks along
  one axis for grouped int4), the graph raised to opset 21, which first has INT4.
- LiteRT: ai-edge-quantizer's weight-only quantization of the op reading the tensor, given
  the kernel's own range per channel, so its scales are kshrink's and its codes the same.

Where a format cannot hold a kernel's grid, the kernel is widened (int4 codes as int8 on the
same scales where the op takes int8 only; else float) and the reason is recorded per layer.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path

import numpy as np

from kshrink.core.graph import leaf_layers, path_of
from kshrink.layers import integer_kernels


@dataclasses.dataclass
class Kernel:
    """One integer kernel of the Keras model: `(codes - zero) * scale` is its float value."""

    key: str  # in the report: the layer's path, or `path/kernel` for a layer with several
    codes: np.ndarray  # int8, in the Keras layout until placed
    scale: np.ndarray  # float32, one per element
    zero: np.ndarray | None  # int8 zero points, one per element, or None (symmetric)
    bits: int
    group_size: int | None

    @property
    def values(self) -> np.ndarray:
        codes = self.codes.astype("float32")
        return (codes if self.zero is None else codes - self.zero) * self.scale

    def label(self, layout=None) -> str:
        """`int4 per channel`, `int4 in blocks of 32`... for a placed kernel's `grid`."""
        axis, block, _ = layout or (0, None, None)
        how = f"in blocks of {block}" if block else "per tensor" if axis is None else (
            "per channel")
        return f"int{self.bits} {how}"


def model_kernels(model) -> list[Kernel]:
    """Every integer kernel of `model`'s layers, nested models included."""
    found = []
    for layer in leaf_layers(model):
        kernels = integer_kernels(layer)
        for name, kernel in kernels.items():
            key = path_of(layer) if len(kernels) == 1 else f"{path_of(layer)}/{name}"
            found.append(Kernel(key, kernel.codes, kernel.scale, kernel.zero, kernel.bits,
                                kernel.group_size))
    return found


def place(kernels: list[Kernel], tensors: dict[str, np.ndarray],
          within: dict[str, np.ndarray] | None = None) -> dict[str, Kernel]:
    """`{tensor name: kernel}` for each file tensor holding a kernel's float values in some
    transposition and reshape of its axes (to within `within[name]`, per element, for a
    tensor a converter re-quantized; else exactly); the kernel's codes and scales come back in
    the tensor's layout. Kernels found nowhere are left out."""
    by_size = {}
    for name, values in tensors.items():
        by_size.setdefault(values.size, []).append(name)
    placed = {}
    for kernel in kernels:
        values = kernel.values
        total = float(np.abs(values).sum())
        for name in by_size.get(values.size, []):
            tensor, margin = tensors[name], (within or {}).get(name)
            if name in placed or margin is None and not np.isclose(
                    float(np.abs(tensor).sum()), total, rtol=1e-5, atol=1e-30):
                continue
            order = _transposition(values, tensor, margin)
            if order is not None:
                def arrange(a):
                    return np.transpose(a, order).reshape(tensor.shape)

                placed[name] = dataclasses.replace(
                    kernel, codes=arrange(kernel.codes), scale=arrange(kernel.scale),
                    zero=None if kernel.zero is None else arrange(kernel.zero))
                break
    return placed


def _transposition(values: np.ndarray, tensor: np.ndarray, margin=None) -> tuple | None:
    """The order of `values`' axes that, reshaped, equals `tensor` (the identity first), to
    within `margin` per element if given."""
    for order in itertools.permutations(range(values.ndim)):
        candidate = np.transpose(values, order).reshape(tensor.shape)
        if (np.allclose(candidate, tensor, rtol=1e-6, atol=0) if margin is None
                else np.all(np.abs(candidate - tensor) <= margin)):
            return order
    return None


def grid(kernel: Kernel) -> tuple[int | None, int | None, callable] | None:
    """How a placed kernel's scales (and zero points) lie in its tensor: `(axis, block_size,
    reduce)` with `axis` None for one scale, `block_size` None for one scale per index of
    `axis`, and `reduce` taking a per-element array to the values the format stores; None
    when no one axis carries them (groups that span several of the file's axes)."""
    arrays = [a for a in (kernel.scale, kernel.zero) if a is not None]
    if all(np.all(a == a.flat[0]) for a in arrays):
        return None, None, lambda a: np.asarray(a.flat[0])
    for axis in range(kernel.scale.ndim):
        def per_index(a, axis=axis):
            return np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)[:, 0]

        if all(np.array_equal(np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1),
                              np.repeat(per_index(a)[:, None], a.size // a.shape[axis], 1))
               for a in arrays):
            return axis, None, per_index
    block = kernel.group_size
    for axis in range(kernel.scale.ndim) if block else ():
        size = kernel.scale.shape[axis]

        def per_block(a, axis=axis):
            return np.take(a, range(0, size, block), axis=axis)

        if all(np.array_equal(np.take(np.repeat(per_block(a), block, axis=axis), range(size),
                                      axis=axis), a) for a in arrays):
            return axis, block, per_block
    return None


# --- ONNX -------------------------------------------------------------------------------------

def keep_onnx(path: Path, kernels: list[Kernel]) -> dict[str, str]:
    """Rewrites the ONNX file at `path` so that each integer kernel found in it is stored as
    its codes and scales behind a `DequantizeLinear`. Returns `{kernel key: what the file
    keeps}` for every integer kernel."""
    import ml_dtypes
    import onnx
    from onnx import helper, numpy_helper, version_converter

    model = onnx.load(path)
    floats = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
              if t.data_type == onnx.TensorProto.FLOAT}
    placed = place(kernels, floats)
    kept = {k.key: "float32: not found in the file (the converter changed its values)"
            for k in kernels}
    if not placed:
        return kept
    model = version_converter.convert_version(model, 21)  # INT4 and blocks: opset 21
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    nodes = []
    for name, kernel in placed.items():
        layout = grid(kernel)
        if layout is None:
            kept[kernel.key] = (f"float32: its int{kernel.bits} groups do not lie along "
                                "one axis of the file's tensor")
            continue
        axis, block, reduce = layout
        bits = kernel.bits
        if kernel.zero is not None and not np.all((kernel.zero >= -8) & (kernel.zero <= 7)):
            bits = 8  # zero points beyond int4: the same codes as int8
        dtype = ml_dtypes.int4 if bits == 4 else np.int8
        graph.initializer.remove(initializers[name])
        inputs = [f"{name}/codes", f"{name}/scale"]
        graph.initializer.extend([
            numpy_helper.from_array(kernel.codes.astype(dtype), inputs[0]),
            numpy_helper.from_array(reduce(kernel.scale).astype("float32"), inputs[1])])
        if kernel.zero is not None:
            inputs.append(f"{name}/zero")
            graph.initializer.append(
                numpy_helper.from_array(reduce(kernel.zero).astype(dtype), inputs[2]))
        attributes = {} if axis is None else {"axis": axis}
        if block:
            attributes["block_size"] = block
        nodes.append(helper.make_node("DequantizeLinear", inputs, [name],
                                      name=f"{name}/dequantize", **attributes))
        kept[kernel.key] = kernel.label(layout)
    readers = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + readers)  # before every reader: topological order holds
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return kept


def sparse_onnx(path: Path) -> int:
    """Rewrites the ONNX file at `path` so that each float initializer stored smaller as its
    nonzeros and their int64 positions (under a third nonzero) becomes a sparse initializer,
    which ONNX Runtime densifies at load. Returns how many did."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(path)
    graph, count = model.graph, 0
    for tensor in list(graph.initializer):
        if tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        values = numpy_helper.to_array(tensor)
        where = np.flatnonzero(values)
        if where.size * 12 >= values.size * 4:  # a float and an int64 per nonzero
            continue
        graph.initializer.remove(tensor)
        graph.sparse_initializer.append(helper.make_sparse_tensor(
            numpy_helper.from_array(values.ravel()[where], tensor.name),
            numpy_helper.from_array(where.astype("int64"), f"{tensor.name}/indices"),
            values.shape))
        count += 1
    if count:
        onnx.save(model, path)
    return count


def onnx_codes(path: Path) -> dict[str, np.ndarray]:
    """The integer codes an ONNX file stores behind `DequantizeLinear`, by the name of the
    float tensor they stand for (for tests and inspection)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(path).graph
    stored = {t.name: t for t in graph.initializer}
    return {node.output[0]: numpy_helper.to_array(stored[node.input[0]]).astype("int8")
            for node in graph.node
            if node.op_type == "DequantizeLinear" and node.input[0] in stored}


# --- LiteRT -----------------------------------------------------------------------------------

# The op input holding weights, the axis of it that indexes output channels, and whether
# ai-edge-quantizer stores int4 for the op (else its int4 kernels go out as int8 codes).
LITERT_OPS = {"CONV_2D": (1, 0, True), "FULLY_CONNECTED": (1, 0, True),
              "DEPTHWISE_CONV_2D": (1, 3, False), "CONV_2D_TRANSPOSE": (1, 0, False)}
QMAX = {4: 7, 8: 127}


def keep_litert(path: Path, kernels: list[Kernel]) -> dict[str, str]:
    """Rewrites the float LiteRT file at `path` so that each integer kernel found in it is
    stored as its codes, with kshrink's scales, dequantized before its op (weight-only).
    Returns `{kernel key: what the file keeps}` for every integer kernel."""
    from ai_edge_quantizer import quantizer
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as flatbuffer

    model = flatbuffer.read_model(str(path))
    graph = model.subgraphs[0]
    names = [flatbuffer.get_tensor_name(t) for t in graph.tensors]
    floats = {}
    for tensor, name in zip(graph.tensors, names):
        if flatbuffer.TENSOR_CODE_TO_TYPE[tensor.type] == "FLOAT32":
            data = flatbuffer.get_tensor_data(tensor, model.buffers)
            if data is not None and data.size > 1:
                floats[name] = data
    readers = {}  # weight tensor -> (op name, op output tensor)
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex].builtinCode
        op_name = str(getattr(flatbuffer.TFL_OP_CODE_TO_NAME.get(code), "value", code))
        for position, index in enumerate(op.inputs):
            weight = op_name in LITERT_OPS and position == LITERT_OPS[op_name][0]
            if index >= 0 and len(op.outputs) and (weight or names[index] not in readers):
                readers[names[index]] = (op_name, names[op.outputs[0]])
    kept = {k.key: "float32: not found in the file (the converter changed its values)"
            for k in kernels}
    recipe = quantizer.Quantizer(str(path))
    ranges = {}
    for name, kernel in place(kernels, floats).items():
        op_name, output = readers.get(name, ("no op", None))
        if op_name not in LITERT_OPS:
            kept[kernel.key] = (f"float32: ai-edge-quantizer takes no weights of {op_name}, "
                                "which reads it")
            continue
        _, channel_axis, takes_int4 = LITERT_OPS[op_name]
        layout = grid(kernel)
        if kernel.zero is not None or layout is None or layout[1] is not None or (
                layout[0] not in (None, channel_axis)):
            kept[kernel.key] = (f"float32: LiteRT takes one symmetric scale per output "
                                f"channel; this int{kernel.bits} kernel has groups")
            continue
        bits = kernel.bits if takes_int4 else 8
        bound = kernel.scale.astype("float64") * QMAX[bits]  # exact: float32 times 7 or 127
        reduce = tuple(a for a in range(bound.ndim) if a != channel_axis)
        bound = bound.max(axis=reduce, keepdims=True)  # the channel's scale times qmax
        ranges[name] = {"min": -bound, "max": bound}
        recipe.add_weight_only_config(f"^{re.escape(output)};", op_name, num_bits=bits)
        kept[kernel.key] = kernel.label(layout) if bits == kernel.bits else (
            f"int8 on the int4 grid: LiteRT has no int4 {op_name}")
    if ranges:
        result = recipe.quantize(ranges, enable_progress_bar=False,
                                 enable_progress_report=False)
        Path(path).write_bytes(bytes(result.quantized_model))
    return kept


def int4_into_full_int8(path: Path, kernels: list[Kernel]) -> dict[str, str]:
    """In a full-integer LiteRT file, gives each FULLY_CONNECTED whose int8 weights stand for
    an int4 kernel of the model (per channel, symmetric) that kernel's own int4 codes and
    scales, its int32 bias re-scaled to match: int8 activations with int4 weights (a8w4),
    which XNNPACK runs. Returns `{kernel key: what the file keeps}` for the int4 kernels."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as flatbuffer

    model = flatbuffer.read_model(str(path))
    graph = model.subgraphs[0]
    weights, margins, biases = {}, {}, {}
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex].builtinCode
        if str(getattr(flatbuffer.TFL_OP_CODE_TO_NAME.get(code), "value", "")) != (
                "FULLY_CONNECTED"):
            continue
        tensor = graph.tensors[op.inputs[1]]
        scale = np.asarray(tensor.quantization.scale if tensor.quantization else [], "float64")
        data = model.buffers[tensor.buffer].data
        if flatbuffer.TENSOR_CODE_TO_TYPE[tensor.type] != "INT8" or data is None or (
                scale.size != tensor.shape[0]):
            continue
        codes = np.asarray(data).view("int8").reshape(tensor.shape)
        weights[op.inputs[1]] = codes * scale[:, None]
        margins[op.inputs[1]] = 0.51 * scale[:, None]  # the int8 rounding of an int4 grid
        biases[op.inputs[1]] = op.inputs[2] if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
    int4 = [k for k in kernels if k.bits == 4 and k.zero is None]
    kept = {k.key: "int8 on the converter's own grid: its integer kernel for this op takes "
                   "int8 weights" for k in int4}
    for index, kernel in place(int4, weights, margins).items():
        layout = grid(kernel)
        if layout is None or layout[1] is not None or layout[0] not in (None, 0):
            continue
        tensor = graph.tensors[index]
        old = np.asarray(tensor.quantization.scale, "float64")
        new = np.asarray(kernel.scale.max(axis=1), "float64")  # one per output channel
        flat = kernel.codes.astype("uint8").reshape(-1) & 15  # two a byte, the first low
        if flat.size % 2:
            flat = np.append(flat, 0)
        model.buffers[tensor.buffer].data = (flat[0::2] | (flat[1::2] << 4)).astype("uint8")
        tensor.type = flatbuffer.TENSOR_TYPE_TO_CODE["INT4"]
        tensor.quantization.scale = new.astype("float32").tolist()
        tensor.quantization.zeroPoint = [0] * new.size
        if biases[index] is not None:  # its value kept on the new scale (input x weight)
            bias, ratio = graph.tensors[biases[index]], old / new
            values = np.asarray(model.buffers[bias.buffer].data).view("int32")
            model.buffers[bias.buffer].data = np.round(values * ratio).astype("int32").view(
                "uint8")
            bias.quantization.scale = (np.asarray(bias.quantization.scale, "float64") / ratio
                                       ).astype("float32").tolist()
        kept[kernel.key] = "int4 per channel, int8 activations"
    flatbuffer.write_model(model, path)
    return kept


def litert_codes(path: Path) -> dict[str, np.ndarray]:
    """The int4 and int8 weight codes a LiteRT file stores, by tensor name, as int8 arrays of
    the tensor's shape (for tests and inspection)."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as flatbuffer

    model = flatbuffer.read_model(str(path))
    found = {}
    for tensor in model.subgraphs[0].tensors:
        kind = flatbuffer.TENSOR_CODE_TO_TYPE[tensor.type]
        data = model.buffers[tensor.buffer].data
        if kind not in ("INT4", "INT8") or data is None or not len(data):
            continue
        raw = np.frombuffer(bytes(data), dtype="uint8")
        if kind == "INT4":  # two per byte, the first in the low half
            raw = np.stack([raw & 15, raw >> 4], axis=-1).reshape(-1)[:np.prod(tensor.shape)]
            codes = np.where(raw > 7, raw.astype("int16") - 16, raw).astype("int8")
        else:
            codes = raw.view("int8")
        found[flatbuffer.get_tensor_name(tensor)] = codes.reshape(tensor.shape)
    return found
