"""Depth pruning: whole residual blocks removed, `Add([branch(x), shortcut(x)])` -> `shortcut(x)`,
and whole transformer encoder layers, `encoder(x)` -> `x`.

Fewer channels cut the arithmetic, but at batch 1 on a CPU a small network's time goes mostly
to fixed per-operation costs, which only fewer layers remove. A residual block can go as a
whole because the shortcut alone already carries a usable signal: the blocks whose removal
changes the model's outputs least on calibration data go first, then fine-tuning recovers.

A block is an `Add` of two inputs of equal shape where one input (the branch) is computed by
layers that feed nothing but that Add. In a projection block both inputs qualify; the branch
is the one with more MACs and the projection stays. A keras-hub `TransformerEncoder` is a
residual block in one layer (its output has its input's shape): it goes whole and its input
passes on.
"""

from __future__ import annotations

import dataclasses

import keras

from kshrink.core.data import model_inputs
from kshrink.core.graph import (
    Bypass,
    graph_calls,
    is_plain,
    leaf_layers,
    path_of,
    rewrite,
)
from kshrink.core.progress import counting
from kshrink.core.select import Select
from kshrink.core.options import Int, calibration_option, option, selection
from kshrink.core.technique import Handler, Stage, StepContext, Technique, register_technique
from kshrink.errors import KshrinkError
from kshrink.layers.specs import is_add, layer_macs
from kshrink.layers.transformer import is_encoder
from kshrink.measure.accuracy import predict, relative_error


@dataclasses.dataclass(frozen=True)
class Block:
    """A removable residual block: the layer it ends at (its `Add`, or a transformer encoder),
    the operand of that layer that stays, the layers of the branch that goes (in graph order)
    and the branch's MACs per example."""

    merge: str
    kept: int
    branch: tuple[str, ...]
    macs: int


def residual_blocks(model: keras.Model) -> list[Block]:
    """The residual blocks of `model`'s top-level graph that can be removed, in graph order."""
    if isinstance(model, keras.Sequential):
        return []
    calls, _, outputs = graph_calls(model)
    producer = {id(t): i for i, (_, _, outs) in enumerate(calls) for t in outs}
    readers: dict[int, set[int]] = {}
    for i, (_, ins, _) in enumerate(calls):
        for t in ins:
            readers.setdefault(id(t), set()).add(i)
    model_outputs = {id(t) for t in outputs}

    def ancestors(tensor) -> set[int]:
        seen, stack = set(), [tensor]
        while stack:
            i = producer.get(id(stack.pop()))
            if i is not None and i not in seen:
                seen.add(i)
                stack.extend(calls[i][1])
        return seen

    def feeds_only(branch: set[int], merge: int) -> bool:
        return all(id(t) not in model_outputs and readers.get(id(t), set()) <= branch | {merge}
                   for i in branch for t in calls[i][2])

    blocks = []
    for index, (layer, ins, outs) in enumerate(calls):
        if is_encoder(layer) and tuple(ins[0].shape) == tuple(outs[0].shape):
            cost = sum(layer_macs(part) or 0 for part in layer._flatten_layers())
            blocks.append(Block(layer.name, 0, (layer.name,), cost))
            continue
        if (not is_add(layer) or len(ins) != 2
                or any(tuple(t.shape) != tuple(outs[0].shape) for t in ins)):
            continue
        found = []
        for removed in (0, 1):
            branch = ancestors(ins[removed]) - ancestors(ins[1 - removed])
            if branch and feeds_only(branch, index):
                order = sorted(branch)
                cost = sum(layer_macs(calls[i][0]) or 0 for i in order)
                names = tuple(calls[i][0].name for i in order)
                found.append(Block(layer.name, 1 - removed, names, cost))
        if found:
            blocks.append(max(found, key=lambda block: block.macs))
    return blocks


def without(model: keras.Model, blocks) -> keras.Model:
    """`model` with `blocks` removed; the remaining layers are shared, weights and all."""
    kept = {block.merge: Bypass(block.kept) for block in blocks}
    if blocks and not is_plain(model):  # a keras-hub Backbone: its graph, as a plain model
        model = keras.Model(model.input, model.output, name=model.name)
    return rewrite(model, lambda layer: kept.get(layer.name, layer))


def output_change(model: keras.Model, x, reference) -> float:
    """Relative L2 change of `model`'s outputs on `x` from `reference` (`predict`'s)."""
    return relative_error(reference, predict(model, x))


class DepthPruneHandler(Handler):
    """Runs `DepthPrune`: removes the residual blocks that matter least to the outputs."""

    trains = True

    def structure_levels(self, model, config: DepthPrune, per_layer: bool) -> dict:
        # A block is named by its merge (its Add, or the transformer layer)
        return {block.merge: (("keep", "remove"), tuple(sorted({block.merge, *block.branch})))
                for block in _selected(model, residual_blocks(model), config)}

    def structure_steps(self, config: DepthPrune, levels: dict, layers: dict, gone: set):
        removed = tuple(sorted(d for d, level in levels.items() if level == "remove"))
        if not removed:
            return [], set()
        step = dataclasses.replace(config, blocks=len(removed), layers=Select(names=removed),
                                   exclude=None)
        return [step], set().union(*(layers[d] for d in removed))

    def prepare(self, model, config: DepthPrune, ctx: StepContext):
        candidates = _selected(model, residual_blocks(model), config)
        if config.blocks > len(candidates):
            names = ", ".join(block.merge for block in candidates) or "none"
            chosen = " selected" if config.layers or config.exclude else ""
            raise KshrinkError(
                f"depth_prune: blocks={config.blocks}, but {model.name!r} has "
                f"{len(candidates)}{chosen} removable residual blocks (named by their Add or "
                f"transformer layer: "
                f"{names})")
        if ctx.data is None:
            raise KshrinkError("depth_prune ranks blocks by how much removing them changes "
                               "the outputs on data: pass data=(x, y) to compress")
        x = model_inputs(ctx.data, config.calibration_samples)
        reference = predict(model, x)
        removed, scores = [], {}
        for round in range(config.blocks):  # greedy: rescore the rest after each removal
            stage = f"depth_prune: scoring blocks for removal {round + 1}/{config.blocks}"
            for block in counting(ctx.progress, stage, candidates, lambda b: b.merge):
                scores[block.merge] = output_change(without(model, removed + [block]), x,
                                                    reference)
            best = min(candidates, key=lambda block: scores[block.merge])
            removed.append(best)
            candidates.remove(best)
        _report(model, removed, candidates, scores, ctx)
        ctx.note(f"removed, in this order: {', '.join(block.merge for block in removed)}; the "
                 f"outputs changed by {scores[removed[-1].merge]:.2%} with all gone")
        return without(model, removed)


def _report(model, removed, kept, scores, ctx: StepContext) -> None:
    """One line per layer with weights: removed with its block, kept with its block's score,
    or outside any removable block. A transformer layer's sublayers belong to it by path."""
    outcome = {}
    for block in removed:
        cost = f"{block.macs:,} MACs; " if block.macs else ""
        for name in block.branch:
            outcome[name] = (True, f"removed with {_kind(block)} {block.merge!r} ({cost}"
                                   f"outputs changed by {scores[block.merge]:.2%})")
    for block in kept:
        for name in block.branch:
            outcome[name] = (False, f"{_kind(block)} {block.merge!r} kept: removing it changes "
                                    f"the outputs by {scores[block.merge]:.2%}")
    for layer in leaf_layers(model):
        if not layer.weights:
            continue
        top = path_of(layer).split("/")[0]
        applied, detail = outcome.get(layer.name, outcome.get(
            top, (False, "not in a removable residual block")))
        (ctx.applied if applied else ctx.skipped)(layer, detail)


def _kind(block: Block) -> str:
    return "residual block" if block.branch != (block.merge,) else "transformer layer"


def _selected(model, blocks, config) -> list[Block]:
    """The blocks with a layer (their Add or a branch layer) chosen by `config.layers` and
    none chosen by `config.exclude`."""
    def names(select):  # a layer inside a transformer layer names that layer too
        chosen = select.resolve(leaf_layers(model))
        return {layer.name for layer in chosen} | {path_of(l).split("/")[0] for l in chosen}

    include = names(config.layers) if config.layers is not None else None
    exclude = names(config.exclude) if config.exclude is not None else set()
    chosen = []
    for block in blocks:
        members = {block.merge, *block.branch}
        if (include is None or members & include) and not members & exclude:
            chosen.append(block)
    return chosen


@register_technique("depth_prune", handler=DepthPruneHandler(), stage=Stage.REWRITE)
@dataclasses.dataclass(frozen=True)
class DepthPrune(Technique):
    """Removes whole residual blocks or transformer layers: fewer layers, which is what batch-1
    CPU latency needs.

    Every `Add` of a branch and a shortcut of the same shape, whose branch layers feed nothing
    else, is a candidate, and so is every keras-hub `TransformerEncoder` (its input passes on). The `blocks` candidates whose removal changes the model's outputs
    least (relative L2 change on `calibration_samples` of `data`) go, chosen greedily (the rest
    are rescored after each removal); the Add then passes its shortcut on. Fine-tune
    afterwards, ideally with distillation. Combine with `structured_prune` for fewer channels
    in the layers that stay, and end with `fold`: it also drops the ReLU left applied to a
    ReLU's output.

    The output change does not know what a block costs in time. At batch 1 on a CPU the
    blocks at the highest resolution cost the most per layer; to remove those, name them with
    `layers`.

    Args:
        blocks: how many residual blocks (or transformer layers) to remove.
        calibration_samples: examples of `data` the output change is measured on.
        layers: blocks to consider, by any of their layers (default: all).
        exclude: blocks to keep, by any of their layers.

    Example:

    ```python
    small, report = kshrink.compress(
        model, [kshrink.DepthPrune(blocks=1), kshrink.StructuredPrune(ratio=0.5)],
        data=(x, y), fine_tune=kshrink.FineTune(epochs=10, distill=True))
    ```
    """

    blocks: int = option(1, "how many residual blocks to remove", Int(low=1))
    calibration_samples: int = calibration_option(2048, "examples the output change is "
                                                        "measured on")
    layers: Select | None = selection("blocks to consider, by any of their layers")
    exclude: Select | None = selection("blocks to keep, by any of their layers")
