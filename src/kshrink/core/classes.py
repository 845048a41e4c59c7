"""The user's own classes (custom layers, losses, metrics): finding them in a model, importing
them by module name, and telling a fresh process what to import to load a model that uses them.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

import keras

from kshrink.errors import KshrinkError

# Packages Keras or kshrink itself knows how to find classes in.
KNOWN_PACKAGES = ("keras", "keras_hub", "keras_nlp", "keras_cv", "kshrink", "tensorflow",
                  "tf_keras", "jax", "torch", "builtins")
# What a module may define that a saved model refers to by name.
SAVEABLE = (keras.layers.Layer, keras.losses.Loss, keras.metrics.Metric,
            keras.optimizers.Optimizer, keras.optimizers.schedules.LearningRateSchedule,
            keras.constraints.Constraint, keras.initializers.Initializer,
            keras.regularizers.Regularizer)


def is_user_class(cls: type) -> bool:
    """Whether `cls` comes from outside Keras, keras-hub and kshrink (the user's own)."""
    return cls.__module__.split(".")[0] not in KNOWN_PACKAGES


def model_classes(model: keras.Model) -> dict[str, type]:
    """The user's classes among `model` and its layers, at any depth, by class name."""
    found = {}
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if is_user_class(type(layer)):
            found[type(layer).__name__] = type(layer)
    return found


def import_modules(names) -> dict[str, type]:
    """Imports each module of `names` (dotted names, found from the current directory too)
    and returns the Keras-saveable classes it defines, by class name: the `custom_objects`
    that loading a model made of them needs.

    Raises:
        KshrinkError: a module cannot be imported (the message keeps Python's reason).
    """
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # as `python -m` does: modules beside the user
    found = {}
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception as e:
            raise KshrinkError(f"cannot import module {name!r} (--import): "
                               f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") \
                from None
        for value in vars(module).values():
            if (inspect.isclass(value) and issubclass(value, SAVEABLE)
                    and value.__module__ == module.__name__):
                found[value.__name__] = value
    return found


def probe_imports(classes) -> tuple[list[str], list[str], str | None]:
    """What a fresh Python process must do to find `classes`: `(modules to import, folders
    to put on its path, why it cannot)`. A class defined in `__main__` (a script or a
    notebook) cannot be imported by another process: then the reason names it."""
    modules, roots = [], []
    for cls in classes:
        module = sys.modules.get(cls.__module__)
        where = getattr(module, "__file__", None)
        if cls.__module__ == "__main__" or where is None:
            return [], [], (f"class {cls.__name__} is defined in {cls.__module__}, which "
                            "another process cannot import; move it to a module")
        if cls.__module__ not in modules:
            modules.append(cls.__module__)
        # The folder the top-level package sits in: pkg/sub/mod.py -> the parent of pkg.
        depth = cls.__module__.count(".") + (Path(where).stem == "__init__")
        root = str(Path(where).resolve().parents[depth])
        if root not in roots:
            roots.append(root)
    return modules, roots, None
