"""Choosing layers: by name, by regex pattern or by layer type."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

import keras

from kshrink.core.graph import path_of
from kshrink.errors import SelectionError, short


@dataclasses.dataclass(frozen=True)
class Select:
    """A set of layers, chosen by name, regex pattern or layer class name.

    A layer is selected when it matches any of the given criteria. Names must exist in the
    model, and a selection that matches no layer at all raises `SelectionError`: a typo never
    silently turns a technique into a no-op.

    Args:
        names: exact layer names or paths. Layers inside custom layers are named by their
            path (`transformer_layer_0/self_attention_layer/query`); a bare name matches every
            layer of that name (`query`: the query projection of every block), and a custom
            layer's name or path every layer inside it (`transformer_layer_0`).
        pattern: a regular expression that must match the whole layer name or path.
        types: layer class names, e.g. `("Dense", "Conv2D")`.

    Example:

    ```python
    Select(pattern="dense_.*")
    Select(types=("Conv2D", "DepthwiseConv2D"), names=("head",))
    ```
    """

    names: tuple[str, ...] = ()
    pattern: str | None = None
    types: tuple[str, ...] = ()

    def __post_init__(self):
        for field in ("names", "types"):
            value = getattr(self, field)
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise SelectionError(f"selection {field} must be a list of strings. "
                                     f"Received: {field}={short(value)}")
            object.__setattr__(self, field, tuple(value))
        if self.pattern is not None and not isinstance(self.pattern, str):
            raise SelectionError(f"selection pattern must be a string (a regular expression). "
                                 f"Received: pattern={short(self.pattern)}")
        if not (self.names or self.pattern or self.types):
            raise SelectionError(
                "a selection needs at least one of names, pattern or types. Received: nothing"
            )
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise SelectionError(
                    f"selection pattern is not a valid regular expression ({e}). "
                    f"Received: pattern={short(self.pattern)}"
                ) from None

    def matches(self, layer: keras.layers.Layer) -> bool:
        """Whether `layer` is in this selection."""
        keys = {layer.name, *_prefixes(path_of(layer))}
        if keys & set(self.names):
            return True
        if self.pattern is not None and any(re.fullmatch(self.pattern, k) for k in keys):
            return True
        return any(cls.__name__ in self.types for cls in type(layer).__mro__)

    def resolve(self, layers: Iterable[keras.layers.Layer]) -> list[keras.layers.Layer]:
        """The layers in `layers` this selection matches, in order.

        Raises:
            SelectionError: a name that is not among `layers`, or no match at all.
        """
        layers = list(layers)
        known = {k for layer in layers for k in (layer.name, *_prefixes(path_of(layer)))}
        missing = [name for name in self.names if name not in known]
        if missing:
            raise SelectionError(
                f"selection names layers that do not exist: {', '.join(missing)}. "
                f"Layers are: {_short_list(sorted(known))}"
            )
        chosen = [layer for layer in layers if self.matches(layer)]
        if not chosen:
            raise SelectionError(
                f"selection {self.describe()} matches no layer. "
                f"Layers are: {_short_list(path_of(layer) for layer in layers)}"
            )
        return chosen

    def describe(self) -> str:
        parts = []
        if self.names:
            parts.append(f"names={list(self.names)}")
        if self.pattern is not None:
            parts.append(f"pattern={self.pattern!r}")
        if self.types:
            parts.append(f"types={list(self.types)}")
        return "(" + ", ".join(parts) + ")"

    def get_config(self) -> dict:
        config = {}
        if self.names:
            config["names"] = list(self.names)
        if self.pattern is not None:
            config["pattern"] = self.pattern
        if self.types:
            config["types"] = list(self.types)
        return config

    @classmethod
    def from_config(cls, config) -> Select:
        """Builds a selection from a mapping, a pattern string or a list of names."""
        if isinstance(config, Select):
            return config
        if isinstance(config, str):
            return cls(pattern=config)
        if isinstance(config, (list, tuple)):
            return cls(names=tuple(str(name) for name in config))
        if isinstance(config, Mapping):
            unknown = sorted(set(config) - {"names", "pattern", "types"})
            if unknown:
                raise SelectionError(
                    f"unknown selection key {short(unknown[0])}. Allowed: names, pattern, types"
                )
            return cls(**config)
        raise SelectionError(
            "a selection is a pattern string, a list of layer names, or a mapping with "
            f"names/pattern/types. Received: {short(config)}"
        )


def shared_level(levels: Mapping, depth: Callable = lambda level: level) -> tuple:
    """`(main, [(level, Select), ...])`: the level most paths of `levels` (path -> level)
    share, the deepest on a tie, and a selection of the paths at each other level, deepest
    first; `depth` orders levels (deeper: more compressed), e.g. sparsities as they are,
    cluster counts negated."""
    counts = Counter(levels.values())
    main = max(counts, key=lambda v: (counts[v], depth(v)))
    return main, [(v, Select(names=tuple(sorted(p for p, w in levels.items() if w == v))))
                  for v in sorted(counts, key=depth, reverse=True) if v != main]


def _prefixes(path: str) -> list[str]:
    """A path and the paths of the custom layers around it: `a/b/c`, `a/b`, `a`."""
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _short_list(names: Iterable[str], limit: int = 12) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
