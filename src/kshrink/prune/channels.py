"""Channel dependency groups on a Keras graph, and rebuilding the graph with channels removed.

Every channel of every tensor in the model is a node of a union-find; layers tie channels
together: a BatchNormalization's output channel c is its input channel c, a residual Add ties
channel c of every input to channel c of the output, Concatenate ties input channel i of its
k-th input to output channel offset_k + i, a Flatten ties each of its outputs to the channel it
came from. A *group* is a set of tied channels: removing one means removing all of them — the
output column of every Conv/Dense that produces one, the parameters of every BN on the way,
and the input rows of every layer that reads one.

A channel of a model input or output, or one a layer kshrink does not understand reads or
writes, is pinned: its group is never removed, and the report says which layer pinned it.
Only the channels-last layout is analysed (Keras' default).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import keras
import numpy as np

from kshrink.core.graph import graph_calls, is_functional
from kshrink.layers import specs

_KNOWN = (specs.PRODUCER, specs.PER_CHANNEL, specs.PASS_THROUGH, specs.MERGE,
          specs.CONCATENATE, specs.FLATTEN)


def _role(layer) -> str | None:
    spec = specs.spec_for(layer)
    return spec.channels if spec is not None else None


@dataclasses.dataclass
class Group:
    """Channels that are removed together.

    Attributes:
        producers: (layer name, output channel) of every layer that computes one of them.
        consumers: (layer name, input row) of every layer that reads one of them.
        per_channel: (layer name, channel) of every per-channel layer (BN, Depthwise) on the way.
        pinned_by: why the group must stay, or None.
    """

    producers: list = dataclasses.field(default_factory=list)
    consumers: list = dataclasses.field(default_factory=list)
    per_channel: list = dataclasses.field(default_factory=list)
    pinned_by: str | None = None

    @property
    def space(self) -> tuple[str, ...]:
        """The producer layers: groups with the same space are channels of one width."""
        return tuple(sorted({name for name, _ in self.producers}))


class _UnionFind:
    def __init__(self):
        self.parent = {}

    def find(self, item):
        self.parent.setdefault(item, item)
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a, b):
        self.parent[self.find(a)] = self.find(b)


def channel_groups(model: keras.Model) -> list[Group]:
    """The channel groups of `model` (top level; nested models pin their channels)."""
    if not (isinstance(model, keras.Sequential) or is_functional(model)):
        return []
    calls, inputs, outputs = graph_calls(model)
    uf = _UnionFind()
    pins = {}
    members = defaultdict(lambda: ([], [], []))  # element -> producers, consumers, per-channel

    def width(tensor):
        return tensor.shape[-1] if len(tensor.shape) >= 2 else None

    def elements(tensor):
        n = width(tensor)
        return [(id(tensor), c) for c in range(n)] if isinstance(n, int) else []

    def pin(tensor, why):
        for element in elements(tensor):
            pins.setdefault(element, why)

    for tensor in inputs:
        pin(tensor, "a model input")
    for tensor in outputs:
        pin(tensor, "a model output")
    for layer, ins, outs in calls:
        why = _cannot_see_through(layer, ins, outs)
        if why:
            for tensor in ins + outs:
                pin(tensor, f"{layer.name} ({why})")
            continue
        role = _role(layer)
        if role == specs.PRODUCER:
            (x,), (y,) = ins, outs
            for element in elements(x):
                members[element][1].append((layer.name, element[1]))
            for element in elements(y):
                members[element][0].append((layer.name, element[1]))
        elif role in (specs.PER_CHANNEL, specs.PASS_THROUGH):
            (x,), (y,) = ins, outs
            for a, b in zip(elements(x), elements(y)):
                uf.union(a, b)
                if role == specs.PER_CHANNEL:
                    members[a][2].append((layer.name, a[1]))
        elif role == specs.MERGE:
            for x in ins:
                for a, b in zip(elements(x), elements(outs[0])):
                    uf.union(a, b)
        elif role == specs.CONCATENATE:
            offset = 0
            for x in ins:
                for (_, c) in elements(x):
                    uf.union((id(x), c), (id(outs[0]), offset + c))
                offset += width(x)
        elif role == specs.FLATTEN:
            (x,), (y,) = ins, outs
            channels = width(x)
            for (_, j) in elements(y):
                uf.union((id(y), j), (id(x), j % channels))
    groups = defaultdict(Group)
    seen = set(members) | set(pins)
    for element in seen:
        group = groups[uf.find(element)]
        producers, consumers, per_channel = members.get(element, ([], [], []))
        group.producers += producers
        group.consumers += consumers
        group.per_channel += per_channel
        if element in pins and group.pinned_by is None:
            group.pinned_by = pins[element]
    for group in groups.values():
        for items in (group.producers, group.consumers, group.per_channel):
            items.sort()
    return [g for g in groups.values() if g.producers]


def _cannot_see_through(layer, ins, outs) -> str | None:
    """Why the analysis must pin everything `layer` touches, or None if it can follow it."""
    if isinstance(layer, keras.Model):
        return "a nested model"
    if type(layer).__module__.split(".")[0] != "keras" and specs.rewritable_spec(layer) is None:
        return "a custom layer (a LayerSpec registered for its class lets the analysis in)"
    role = _role(layer)
    if role not in _KNOWN:
        return f"{type(layer).__name__} is not analysed"
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return "channels_first"
    if any(len(t.shape) < 2 or not isinstance(t.shape[-1], int) for t in ins + outs):
        return "a tensor without a known channel axis"
    single = role in (specs.PRODUCER, specs.PER_CHANNEL, specs.PASS_THROUGH, specs.FLATTEN)
    if single and (len(ins) != 1 or len(outs) != 1):
        return "called with several inputs"
    if role == specs.MERGE and len({t.shape[-1] for t in ins + outs}) != 1:
        return "broadcasts over channels"
    if role == specs.CONCATENATE and layer.axis not in (-1, len(outs[0].shape) - 1):
        return "concatenates another axis"
    check = specs.rewritable_spec(layer).channel_check
    return check(layer, len(outs[0].shape)) if check else None


def dropped(remove: list[Group]) -> tuple[dict, dict, dict]:
    """`(output, input, per-channel)` channels each layer loses with the `remove` groups:
    `{layer name: set of channel indices}` each."""
    drop_out, drop_in, drop_per = defaultdict(set), defaultdict(set), defaultdict(set)
    for group in remove:
        for name, c in group.producers:
            drop_out[name].add(c)
        for name, c in group.consumers:
            drop_in[name].add(c)
        for name, c in group.per_channel:
            drop_per[name].add(c)
    return drop_out, drop_in, drop_per


def narrowed(model: keras.Model, remove: list[Group]) -> keras.Model:
    """A new model without the channels of the `remove` groups, weights sliced to match."""
    drop_out, drop_in, drop_per = dropped(remove)
    originals = {layer.name: layer for layer in model.layers}

    def clone(layer):
        config = layer.get_config()
        removed = len(drop_out.get(layer.name, ()))
        if removed:
            config[specs.spec_for(layer).width] -= removed
        return type(layer).from_config(config)

    rebuilt = keras.models.clone_model(model, clone_function=clone)
    for layer in rebuilt.layers:
        original = originals[layer.name]
        if not original.weights:
            continue
        values = [_slice(original, v, drop_in[layer.name], drop_out[layer.name],
                         drop_per[layer.name]) for v in original.weights]
        layer.set_weights(values)
    return rebuilt


def _slice(layer, variable, drop_in: set, drop_out: set, drop_per: set) -> np.ndarray:
    values = keras.ops.convert_to_numpy(variable.value)
    spec = specs.spec_for(layer)
    weight = spec.weight(variable.name) if spec is not None else None
    if weight is None:
        return values
    if spec.channels == specs.PER_CHANNEL:  # BN parameters, a depthwise kernel and its bias
        drop_in = drop_out = drop_per
    return specs.slice_channels(values, weight, drop_in, drop_out)
