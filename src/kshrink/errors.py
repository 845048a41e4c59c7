"""Exceptions kshrink raises for input it cannot accept.

Every message is one line that names what is wrong and what is allowed, so the CLI can print it
as it is and exit with code 2.
"""

import reprlib

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxtuple = 3, 4, 6, 6
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 60, 60, 40


def short(value) -> str:
    """`repr(value)`, bounded: an error message never formats an unbounded value (a recipe
    whose aliases expand to a billion strings, a 5,000-digit number)."""
    return _SHORT.repr(value)


class KshrinkError(ValueError):
    """Bad input to kshrink: a model, recipe, option, dataset or file it cannot accept."""


class RecipeError(KshrinkError):
    """A recipe or technique option that is unknown or out of range."""


class SelectionError(KshrinkError):
    """A layer selection that matches nothing, or names a layer that does not exist."""


class UnsupportedModelError(KshrinkError):
    """A model kshrink cannot rebuild (e.g. a subclassed model)."""


class DatasetUnavailableError(KshrinkError):
    """A named dataset whose files are not installed."""


class ModelFileError(KshrinkError):
    """A path that is not a readable Keras model file, or an output path that is not allowed."""


class MeasurementError(KshrinkError):
    """A measurement that cannot be made: bad counts, a model file that fails to load in a
    fresh process, inputs that cannot be made up for the model."""
