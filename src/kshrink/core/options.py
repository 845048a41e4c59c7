"""Options: frozen dataclasses that round-trip through plain JSON/YAML data, each field
declaring its help text and its own check.

```python
@dataclasses.dataclass(frozen=True)
class RoundFloat16(kshrink.Technique):
    mantissa_bits: int = option(10, "mantissa bits kept", Int(low=1, high=23))
    layers: kshrink.Select | None = selection("the layers to round (default: all)")
```

`Options.__post_init__` runs every field's check: the check raises `RecipeError` naming the
option and what it takes, or returns the value as kept (a selection written as a mapping
becomes a `Select`, a list of overrides a tuple of them). A class checks what involves two
options or more in its own `__post_init__`, after calling `super().__post_init__()`.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

from kshrink.core.select import Select
from kshrink.errors import KshrinkError, RecipeError, short

# Upper bounds of the integer options that count work or memory: past them a typo (1e20
# epochs) would run for ever or ask for terabytes, and is refused in one line instead.
MAX_EPOCHS = 100_000
MAX_BATCH = 1 << 20
MAX_STEPS = 1_000_000_000
MAX_SEED = 2**32 - 1


class Options:
    """A frozen dataclass of options that round-trips through plain JSON/YAML data.

    `name` prefixes every error message, so a user knows which part of a recipe is wrong.
    """

    name: ClassVar[str] = ""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            check = field.metadata.get("check")
            if check is not None:
                object.__setattr__(self, field.name,
                                   check(self.name, field.name, getattr(self, field.name)))

    @classmethod
    def _fields(cls) -> list:
        # The options a class declares first, shared keyword-only ones (of every technique)
        # last, as `__init__` orders them.
        fields = dataclasses.fields(cls)
        return [f for f in fields if not f.kw_only] + [f for f in fields if f.kw_only]

    def get_config(self) -> dict:
        """The options as plain JSON/YAML-friendly values."""
        config = {}
        for field in self._fields():
            value = getattr(self, field.name)
            if isinstance(value, Select):
                value = value.get_config()
            elif isinstance(value, tuple):
                value = [v.get_config() if isinstance(v, Options) else v for v in value]
            config[field.name] = value
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None):
        """Builds the config from options; unknown options raise `RecipeError`."""
        config = dict(config or {})
        allowed = [field.name for field in cls._fields()]
        for key in config:
            if key not in allowed:
                raise RecipeError(
                    f"{cls.name}: unknown option {short(key)}. Allowed: {', '.join(allowed)}"
                )
        try:
            return cls(**config)
        except TypeError as e:
            raise RecipeError(f"{cls.name}: {e}") from None

    @classmethod
    def options(cls) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, help) for each option, for `kshrink techniques`."""
        hints = typing.get_type_hints(cls)
        rows = []
        for field in cls._fields():
            default = field.default if field.default is not dataclasses.MISSING else None
            if isinstance(default, Select):
                default = default.get_config()
            rows.append((field.name, _type_name(hints[field.name]), default,
                         field.metadata.get("help", "")))
        return rows


def option(default, help: str, check=None, kw_only: bool = False):
    """A dataclass field with a help text (shown by `kshrink techniques`) and a check:
    `check(owner, key, value)` raises `RecipeError` for a value the option does not take
    and returns the value to keep (`Int`, `Number`, `OneOf`, `Flag`, `Selection`,
    `Overrides`, or a function of the same form)."""
    metadata = {"help": help} | ({"check": check} if check is not None else {})
    return dataclasses.field(default=default, metadata=metadata, kw_only=kw_only)


def selection(help: str, default=None):
    """A `layers`/`exclude`-like option: a `Select` (or its plain form: a mapping, a list of
    names, a pattern string), or None."""
    return option(default, help, Selection())


def calibration_option(default: int, help: str):
    """The number of examples of `data` a technique calibrates on: an integer >= 1."""
    return option(default, help, Int(low=1, high=MAX_BATCH))


@dataclasses.dataclass(frozen=True)
class Int:
    """An integer (not a bool) in `[low, high]`."""

    low: int | None = None
    high: int | None = None
    allow_none: bool = False

    def __call__(self, owner: str, key: str, value):
        check_int(owner, key, value, self.low, self.high, self.allow_none)
        return value


@dataclasses.dataclass(frozen=True)
class Number:
    """A number in `[low, high]` (`[low, high)` if `high_open`)."""

    low: float
    high: float
    high_open: bool = False
    allow_none: bool = False

    def __call__(self, owner: str, key: str, value):
        check_range(owner, key, value, self.low, self.high, self.high_open, self.allow_none)
        return value


@dataclasses.dataclass(frozen=True)
class OneOf:
    """One of `allowed`."""

    allowed: tuple
    allow_none: bool = False

    def __call__(self, owner: str, key: str, value):
        check_choice(owner, key, value, self.allowed, self.allow_none)
        return value


@dataclasses.dataclass(frozen=True)
class Flag:
    """True or False (not 0, 1 or a string)."""

    allow_none: bool = False

    def __call__(self, owner: str, key: str, value):
        if value is None and self.allow_none:
            return value
        if not isinstance(value, bool):
            raise RecipeError(f"{owner}: {key} must be true or false"
                              f"{' or null' if self.allow_none else ''}. "
                              f"Received: {key}={short(value)}")
        return value


@dataclasses.dataclass(frozen=True)
class Selection:
    """A `Select`, or its plain form (a mapping of names/pattern/types, a list of names, a
    pattern string), kept as a `Select`; None unless `required`."""

    required: bool = False

    def __call__(self, owner: str, key: str, value):
        if value is None and not self.required:
            return None
        try:
            return Select.from_config(value)
        except KshrinkError as e:
            raise RecipeError(f"{owner}: {key} must be a selection, e.g. {{names: [fc1]}} "
                              f"({e})") from None


@dataclasses.dataclass(frozen=True)
class Overrides:
    """A list of `kind` (a `LayerOverride` class), or of their options, kept as a tuple."""

    kind: type

    def __call__(self, owner: str, key: str, value):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{owner}: {key} must be a list. Received: {key}={short(value)}")
        return tuple(v if isinstance(v, self.kind) else self.kind.from_config(v)
                     for v in value)


def check_choice(owner: str, key: str, value, allowed, allow_none: bool = False) -> None:
    """`value` is one of `allowed` (or None if `allow_none`); the message lists them."""
    if value not in allowed and not (value is None and allow_none):
        raise RecipeError(
            f"{owner}: {key} must be one of {', '.join(map(str, allowed))}"
            f"{' or null' if allow_none else ''}. "
            f"Received: {key}={short(value)}"
        )


def check_range(owner: str, key: str, value, low: float, high: float,
                high_open: bool = False, allow_none: bool = False) -> None:
    """`low <= value <= high` (or `< high` if `high_open`); the message names the range."""
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value and (
        value < high if high_open else value <= high)
    if not ok:
        interval = f"[{low}, {high}{')' if high_open else ']'}"
        raise RecipeError(
            f"{owner}: {key} must be a number in {interval}. Received: {key}={short(value)}"
        )


def check_int(owner: str, key: str, value, low: int | None = None,
              high: int | None = None, allow_none: bool = False) -> None:
    """`value` is an integer (not a bool) in `[low, high]`; the message names the range."""
    if value is None and allow_none:
        return
    if (not isinstance(value, int) or isinstance(value, bool)
            or (low is not None and value < low) or (high is not None and value > high)):
        if high is not None:
            bound = f"an integer in [{low}, {high}]"
        else:
            bound = f"an integer >= {low}" if low is not None else "an integer"
        raise RecipeError(
            f"{owner}: {key} must be {bound}{' or null' if allow_none else ''}. "
            f"Received: {key}={short(value)}"
        )


def _type_name(hint) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:  # tuple[X, ...]: a list in a recipe
        return f"list of {_type_name(args[0])}"
    if args:
        return " | ".join("null" if a is type(None) else getattr(a, "__name__", str(a))
                          for a in args)
    return getattr(hint, "__name__", str(hint))
