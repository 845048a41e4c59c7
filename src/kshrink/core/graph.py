"""The model as kshrink sees it: Sequential or functional, possibly nested, rebuilt from config."""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
import weakref
from collections.abc import Callable, Iterator

import keras

from kshrink.errors import UnsupportedModelError
from kshrink.layers.internals import own_dtype_policy
from kshrink.layers.transformer import ENCODER_PARTS, encoder_call, is_encoder


def is_functional(model: keras.Model) -> bool:
    """True for models built with `keras.Model(inputs, outputs)` (Keras' Functional class)."""
    return any(
        cls.__name__ == "Functional" and cls.__module__.startswith("keras.")
        for cls in type(model).__mro__
    )


def ensure_supported(model) -> None:
    """Raises `UnsupportedModelError` unless `model` is a built Sequential or functional model."""
    if not isinstance(model, keras.Model):
        raise UnsupportedModelError(
            f"expected a keras.Model. Received: an object of type {type(model).__name__}"
        )
    if not (isinstance(model, keras.Sequential) or is_functional(model)):
        raise UnsupportedModelError(
            "kshrink works on Sequential and functional models (nested ones included); "
            f"received a subclassed model of class {type(model).__name__}. Rebuild it with "
            "keras.Sequential or keras.Model(inputs, outputs) and copy its weights over"
        )
    if not model.built:
        raise UnsupportedModelError(
            f"model {model.name!r} is not built: give it an Input or call it on data first"
        )
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            ensure_supported(layer)


def copy_model(model: keras.Model, renames: dict[str, str] | None = None) -> keras.Model:
    """An independent, uncompiled copy of `model`: same config and weights, no shared variables;
    with `renames`, the model and layers named by its keys take its values as names.

    Uncompiled on purpose: a compressed model is for inference and saving, and a compiled one
    would carry the original's optimizer into its file.
    """
    ensure_supported(model)
    keep_layer_policies(model)
    config = model.get_config()
    if renames:
        config = _renamed(config, renames)
    # The classes in use resolve by name, so custom layers need no registration.
    classes = {type(layer).__name__: type(layer) for layer in _all_layers(model)}
    with keras.saving.CustomObjectScope(classes):
        copy = type(model).from_config(config)
    keep_layer_policies(copy)
    copy.set_weights(model.get_weights())
    return copy


# The names TensorFlow takes for the name scopes Keras opens around models, layers and their
# variables (some of them root scopes), which also name the graph's nodes.
_SCOPE = re.compile(r"[A-Za-z0-9.][A-Za-z0-9_.>-]*")


def runnable_names(model: keras.Model) -> tuple[keras.Model, dict[str, str]]:
    """`(model, {})`, or on TensorFlow, if the name of the model or of a layer is one
    TensorFlow refuses as a name scope (`'my model'`, `'a$b'`: Keras then cannot run the
    model in a graph, so neither predict, fit nor export work), a copy with those names made
    runnable (`'my_model'`, `'a_b'`), and the renames."""
    if keras.backend.backend() != "tensorflow" or not isinstance(model, keras.Model):
        return model, {}
    taken = {model.name} | {layer.name for layer in _all_layers(model)}
    renames = {}
    for name in sorted(taken):
        if _SCOPE.fullmatch(name):
            continue
        new = re.sub(r"[^A-Za-z0-9_.>-]", "_", name)
        new = new if _SCOPE.fullmatch(new) else f"x{new}"
        base, count = new, 1
        while new in taken:
            count += 1
            new = f"{base}_{count}"
        renames[name] = new
        taken.add(new)
    if not renames:
        return model, {}
    shown = ", ".join(f"{old!r} -> {new!r}" for old, new in list(renames.items())[:3])
    more = f" and {len(renames) - 3} more" if len(renames) > 3 else ""
    warnings.warn(f"names TensorFlow cannot run a model with were replaced: {shown}{more}",
                  stacklevel=2)
    return copy_model(model, renames), renames


def _renamed(config, renames: dict[str, str]):
    """`config` with every string that is a key of `renames` (the model's and layers' names,
    and the references to them: inbound nodes, inputs, outputs) replaced by its value."""
    if isinstance(config, dict):
        return {k: _renamed(v, renames) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return type(config)(_renamed(v, renames) for v in config)
    return renames.get(config, config) if isinstance(config, str) else config


def keep_layer_policies(model: keras.Model) -> None:
    """Makes a keras-hub task model's config carry the dtype policy of every quantized layer,
    and gives every layer its own policy rather than a `DTypePolicyMap`.

    A task (`BertTextClassifier`, `ImageClassifier`) rebuilds from its backbone's config and
    builds its own head layers with the backbone's dtype policy; a backbone saves the policies
    of its own quantized layers only. Recording the head's there too, as a `DTypePolicyMap` by
    layer path, lets a copy, a saved file and its reload keep a quantized head. A layer built
    from such a map keeps the map as its policy, and Keras 3.15's quantized `Embedding` then
    fails to save ("Invalid dtype: object": it asks the map, not its entry, for the mode), so
    each layer without sublayers gets its entry (a block keeps its map: it builds its
    sublayers from it).
    """
    policies = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        policy = layer.dtype_policy
        if isinstance(layer, keras.Model) or not layer.path:
            continue
        if isinstance(policy, keras.dtype_policies.DTypePolicyMap) and not _children(layer):
            policy = policy[layer.path]
            own_dtype_policy(layer, policy)
        if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
            continue
        if policy.quantization_mode is not None:
            policies[layer.path] = policy
    backbone = getattr(model, "backbone", None)
    if is_plain(model) or not isinstance(backbone, keras.Model) or not policies:
        return
    current = backbone.dtype_policy
    if isinstance(current, keras.dtype_policies.DTypePolicyMap):
        for path, policy in policies.items():
            if path not in current:
                current[path] = policy
    else:
        backbone.dtype_policy = keras.dtype_policies.DTypePolicyMap(
            default_policy=current, policy_map=policies)


def _all_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


# The path of every layer discovery reached inside a container, by layer. A path belongs to the
# layer: a container creates its sublayers and never shares them, so one table serves all.
_PATHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# For layers that can only be changed in place: the container (or model) that builds them.
_OWNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def path_of(layer: keras.layers.Layer) -> str:
    """How kshrink names a layer: its name, or for a layer inside a custom or composite layer
    the path through it, e.g. `transformer_layer_0/self_attention_layer/query`."""
    return _PATHS.get(layer, layer.name)


def owner_of(layer: keras.layers.Layer) -> str | None:
    """For a layer that `clone_model` cannot replace, a phrase naming what builds it (a custom
    layer, or a model class whose constructor makes its layers); None for other layers."""
    return _OWNERS.get(layer)


def is_container(layer: keras.layers.Layer) -> bool:
    """True for a custom or composite layer whose weights all live in its sublayers (keras-hub
    `TransformerEncoder`, `MultiHeadAttention`): discovery reaches those sublayers instead.

    Models, wrappers and layers with weights of their own stay whole."""
    if isinstance(layer, (keras.Model, keras.layers.Wrapper)):
        return False
    children = _children(layer)
    if not children:
        return False
    inner = {id(v) for child in children for v in child.weights}
    return all(id(v) in inner for v in layer.weights)


def _children(layer: keras.layers.Layer) -> list:
    return list(layer._flatten_layers(include_self=False, recursive=False))


def is_plain(model: keras.Model) -> bool:
    """Sequential or functional exactly: `clone_model` can rebuild it with other layers. A
    subclass (a keras-hub Backbone) rebuilds its layers in its constructor instead."""
    return type(model) is keras.Sequential or (
        is_functional(model) and type(model).__module__.startswith("keras.src."))


def leaf_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    """Every layer of `model` that computes, depth first: the layers of nested models and the
    sublayers of containers (`is_container`) included, each once.

    Input layers are left out: they hold no computation. `path_of` names each layer found.
    """
    seen = set()

    def walk(layer, prefix, owner):
        if id(layer) in seen or isinstance(layer, keras.layers.InputLayer):
            return
        seen.add(id(layer))
        if isinstance(layer, keras.Model):
            inner = owner if is_plain(layer) else owner or (
                f"part of {type(layer).__name__} {layer.name!r}, whose constructor builds "
                "its layers (kshrink.as_functional(model) makes them replaceable)")
            for child in layer.layers:
                yield from walk(child, "", inner)
            return
        path = f"{prefix}{layer.name}"
        if is_container(layer):
            inner = owner or f"inside {type(layer).__name__} {path!r}"
            for child in _children(layer):
                yield from walk(child, f"{path}/", inner)
            return
        if prefix:
            _PATHS[layer] = path
        if owner:
            _OWNERS[layer] = owner
        else:
            _OWNERS.pop(layer, None)
        yield layer

    yield from walk(model, "", None)


def replace_layers(model: keras.Model, replace) -> keras.Model:
    """The same graph with each layer `l` (nested models included) replaced by `replace(l)`.

    `replace` may return the layer itself, which is then shared, weights and all; when it does
    for every layer, `model` itself is returned, its class kept. Layers inside containers and
    layers of model subclasses (`owner_of`) cannot be replaced, only changed in place.
    """
    replaced = {}
    for layer in _all_layers(model):
        if not isinstance(layer, keras.Model) and (new := replace(layer)) is not layer:
            replaced[id(layer)] = new
    if not replaced:
        return model
    _check_rebuildable(model)
    return keras.models.clone_model(model, clone_function=lambda l: replaced.get(id(l), l),
                                    recursive=True)


def as_functional(model: keras.Model) -> keras.Model:
    """`model` as one flat functional model of the same layers (shared, weights and all): the
    layers of every model inside it (a keras-hub task's backbone) called in its own graph.

    A model subclass builds its layers in its constructor, so kshrink can change them only in
    place; techniques that replace layers or rewrite the graph (int8/int4 convolutions,
    structured and depth pruning, low rank, BatchNorm folding) need the plain graph this
    returns. The result is no longer of the subclass (a `ResNetImageClassifier` becomes a
    `Functional`) and saves as such. Meant for models made of stock layers (CNN
    classifiers): a transformer task is best compressed as it is, its blocks changed in place.

    Example:

    ```python
    small, report = kshrink.compress(kshrink.as_functional(classifier), "int8")
    ```
    """
    ensure_supported(model)
    if is_plain(model) and not any(isinstance(l, keras.Model) for l in model.layers):
        return model
    plain = keras.Model(model.input, model.output, name=model.name)

    def inline(layer):
        if not isinstance(layer, keras.Model):
            return layer
        inner = as_functional(layer)
        if isinstance(inner, keras.Sequential):  # its layers, called one after the other
            return Inline(lambda x, **kwargs: functools.reduce(
                lambda tensor, sublayer: sublayer(tensor), inner.layers, x))
        # The inner graph called anew on the outer tensors: its layers join the outer graph.
        return Inline(lambda *args, **kwargs: keras.models.clone_model(
            inner, input_tensors=args[0], clone_function=lambda l: l).output)

    return rewrite(plain, inline)


def _check_rebuildable(model: keras.Model, nested: bool = True) -> None:
    """Raises unless `model` (and, if `nested`, the models in it) is plain (`is_plain`): a
    rebuilt model subclass would silently come back as a plain functional model."""
    fixed = [m for m in [model, *(_all_layers(model) if nested else ())]
             if isinstance(m, keras.Model) and not is_plain(m)]
    if fixed:
        raise ValueError(f"{type(fixed[0]).__name__} builds its layers in its constructor; "
                         "they can only be changed in place")


@dataclasses.dataclass(frozen=True)
class Bypass:
    """For `rewrite`: the layer is removed and its input number `operand` passed on instead,
    e.g. a residual Add reduced to its shortcut."""

    operand: int = 0


@dataclasses.dataclass(frozen=True)
class Inline:
    """For `rewrite`: the layer is replaced by `build(*args, **kwargs)`, called on the layer's
    own (symbolic) arguments; it calls other layers and returns their outputs, e.g. a custom
    block rebuilt as the stock layers it is made of."""

    build: Callable


def rewrite(model: keras.Model, replace) -> keras.Model:
    """The same graph with each top-level layer `l` replaced by `replace(l)`:

    - `l` itself: kept (shared, weights and all);
    - another layer: used instead (it must take the same inputs);
    - a list of layers: applied in a chain, e.g. a factorized Dense as two Dense layers;
    - an empty list: removed, its input passed on (a single-input layer only);
    - `Bypass(i)`: removed, its i-th input passed on. Layers that then feed nothing drop out;
    - `Inline(build)`: replaced by the layers `build` calls (functional models only).

    Works on Sequential and functional models through public Keras API (`clone_model` with a
    `call_function`), without tracing. Nested models are kept as they are.
    """
    replacements = {id(layer): replace(layer) for layer in model.layers}
    if all(replacements[id(layer)] is layer for layer in model.layers):
        return model
    _check_rebuildable(model, nested=False)  # nested models are kept as they are

    def chain(layer):
        found = replacements.get(id(layer), layer)
        if isinstance(found, (Bypass, Inline)):
            return found
        return found if isinstance(found, list) else [found]

    if isinstance(model, keras.Sequential):
        if any(isinstance(found, (Bypass, Inline)) for found in replacements.values()):
            raise ValueError("Bypass and Inline apply to functional models only")
        layers = [new for layer in model.layers for new in chain(layer)]
        source = model.inputs[0]
        return keras.Sequential([keras.Input(source.shape[1:], dtype=source.dtype)] + layers,
                                name=model.name)

    def call(layer, *args, **kwargs):
        layers = chain(layer)
        if isinstance(layers, Bypass):
            return keras.tree.flatten((args, kwargs))[layers.operand]
        if isinstance(layers, Inline):
            return layers.build(*args, **kwargs)
        if not layers:
            return args[0]
        outputs = layers[0](*args, **kwargs)
        for later in layers[1:]:
            outputs = later(outputs)
        return outputs

    # clone_model wants one layer back per layer; `call` applies the chain.
    return keras.models.clone_model(model, clone_function=lambda layer: layer,
                                    call_function=call)


def encoder_reasons(model: keras.Model) -> dict[int, str | None]:
    """For each top-level keras-hub encoder of `model` (by id): None if `inline_encoders` can
    rebuild it, else why not."""
    counts, reasons = {}, {}
    for call in graph_program(model)[0]:
        layer = call.layer
        counts[id(layer)] = counts.get(id(layer), 0) + 1
        if not is_encoder(layer):
            continue
        extra = [k for k, v in call.kwargs.items()
                 if k != "padding_mask" and v not in (None, False)]
        if extra:
            reasons[id(layer)] = f"called with {extra[0]}, which the rebuild does not take"
        elif not all(hasattr(layer, part) for part in ENCODER_PARTS):
            reasons[id(layer)] = "its layers are not the ones of keras-hub 0.32"
        elif layer.dtype_policy.quantization_mode or any(
                getattr(part, "quantization_mode", None)
                for part in layer._flatten_layers(include_self=False)):
            reasons[id(layer)] = "already quantized"
        else:
            reasons[id(layer)] = None
    for key in reasons:
        if counts[key] != 1:
            reasons[key] = "called more than once (shared weights)"
    return reasons


def inline_encoders(model: keras.Model, parts_of) -> keras.Model:
    """`model` with each top-level keras-hub encoder `block` for which `parts_of(block)`
    returns stock parts (`kshrink.layers.transformer.stock_parts`) rebuilt as those parts,
    called where the block stood. The parts are built, not filled: copy weights into them
    after. A keras-hub Backbone comes back as a plain functional model of the same layers (its
    class has one configuration for all blocks)."""
    plain = model if is_plain(model) else keras.Model(model.input, model.output,
                                                       name=model.name)

    def replace(layer):
        parts = parts_of(layer) if is_encoder(layer) else None
        if parts is None:
            return layer
        return Inline(lambda *args, **kwargs: encoder_call(layer, parts, *args, **kwargs))

    return rewrite(plain, replace)


@dataclasses.dataclass(frozen=True)
class Call:
    """One layer call in a model's graph: the layer, its arguments as passed (symbolic tensors
    inside), and the tensors it returned."""

    layer: keras.layers.Layer
    args: tuple
    kwargs: dict
    outputs: list

    @property
    def inputs(self) -> list:
        return [t for t in keras.tree.flatten((self.args, self.kwargs))
                if isinstance(t, keras.KerasTensor)]


def graph_program(model: keras.Model) -> tuple[list[Call], list, list]:
    """`(calls, inputs, outputs)` of this model's own graph, with fresh symbolic tensors,
    `calls` in execution order.

    The layers are called anew on symbolic inputs because a layer may also belong to earlier
    versions of the model, whose nodes `layer.input` / `layer.output` would return.
    """
    calls = []
    if isinstance(model, keras.Sequential):
        source = model.inputs[0]
        x = inputs = keras.Input(source.shape[1:], dtype=source.dtype)
        for layer in model.layers:
            y = layer(x)
            calls.append(Call(layer, (x,), {}, [y]))
            x = y
        return calls, [inputs], [x]

    def record(layer, *args, **kwargs):
        outputs = layer(*args, **kwargs)
        calls.append(Call(layer, args, kwargs, keras.tree.flatten(outputs)))
        return outputs

    rebuilt = keras.models.clone_model(model, clone_function=lambda layer: layer,
                                       call_function=record)
    return calls, list(rebuilt.inputs), list(rebuilt.outputs)


def graph_calls(model: keras.Model) -> tuple[list, list, list]:
    """`(calls, inputs, outputs)` as `graph_program` gives them, each call as `(layer, input
    tensors, output tensors)`."""
    calls, inputs, outputs = graph_program(model)
    return [(c.layer, c.inputs, c.outputs) for c in calls], inputs, outputs

