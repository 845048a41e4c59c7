"""The Python examples of README.md and of every docstring in kshrink name what exists: each
parses, every `kshrink.` name (and every name imported from kshrink) resolves, and every
keyword passed to a kshrink function or class is one it takes. Then they run: each against a
small residual CNN trained here on the digits, standing in for the `model`, `x`, `y`... an
example assumes (the quickstart runs whole in tests/test_readme.py; the few left out say
why)."""

import ast
import dataclasses
import importlib
import inspect
import pkgutil
import re
import textwrap
import types
from pathlib import Path

import keras
import numpy as np
import pytest

import kshrink
from kshrink.core.options import Int, option, selection

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)  # a block's text, indented as it stands


def _examples():
    """(where, code) of every python block of README.md and kshrink's docstrings."""
    yield from ((f"README.md block {i + 1}", textwrap.dedent(code))
                for i, code in enumerate(BLOCK.findall((ROOT / "README.md").read_text())))
    for info in pkgutil.walk_packages(kshrink.__path__, "kshrink."):
        if info.name.endswith("__main__"):
            continue  # runs the command line
        module = importlib.import_module(info.name)
        for where, doc in _docstrings(module):
            for i, code in enumerate(BLOCK.findall(doc)):
                yield f"{where} block {i + 1}", textwrap.dedent(code)


def _docstrings(module):
    if module.__doc__:
        yield module.__name__, module.__doc__
    for name, value in vars(module).items():
        if getattr(value, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(value) or inspect.isfunction(value):
            if value.__doc__:
                yield f"{module.__name__}.{name}", value.__doc__
        if inspect.isclass(value):
            for attribute, member in vars(value).items():
                if inspect.isfunction(member) and member.__doc__:
                    yield f"{module.__name__}.{name}.{attribute}", member.__doc__


EXAMPLES = list(_examples())


def _resolve(dotted: str):
    """The object `kshrink.a.b` names, importing submodules on the way; AttributeError if
    it names nothing."""
    parts = dotted.split(".")
    value = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        try:
            value = getattr(value, part)
        except AttributeError:
            value = importlib.import_module(".".join(parts[:i + 1]))
    return value


def _dotted(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return base and f"{base}.{node.attr}"
    return None


def test_there_are_examples_to_check():
    assert len(EXAMPLES) > 30, len(EXAMPLES)
    unused = [call for call in NOT_RUN if not any(call in code for _, code in EXAMPLES)]
    assert not unused, unused  # a reason to skip what no example calls any more


@pytest.mark.parametrize("where, code", EXAMPLES, ids=[w for w, _ in EXAMPLES])
def test_an_example_names_what_exists(where, code):
    tree = ast.parse(code, where)  # a syntax error fails here
    imported = {}  # a name an example imports from kshrink -> its dotted path
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kshrink"):
            for alias in node.names:
                imported[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("kshrink") and alias.asname:
                    imported[alias.asname] = alias.name
    problems = []
    for dotted in imported.values():
        try:
            _resolve(dotted)
        except (AttributeError, ImportError):
            problems.append(f"{dotted} does not exist")
    for node in ast.walk(tree):
        dotted = _dotted(node) if isinstance(node, (ast.Attribute, ast.Name)) else None
        if not dotted:
            continue
        head, _, rest = dotted.partition(".")
        if head in imported:
            dotted = imported[head] + (f".{rest}" if rest else "")
        elif head != "kshrink":
            continue
        try:
            _resolve(dotted)
        except (AttributeError, ImportError):
            problems.append(f"{dotted} does not exist")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        dotted = _dotted(node.func)
        head = dotted and dotted.partition(".")[0]
        if head not in imported and head != "kshrink":
            continue
        dotted = imported.get(head, head) + dotted[len(head):]
        try:
            parameters = inspect.signature(_resolve(dotted)).parameters
        except (AttributeError, ImportError, TypeError, ValueError):
            continue  # reported above, or not introspectable
        if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            continue
        problems += [f"{dotted}() takes no keyword {k.arg}" for k in node.keywords
                     if k.arg is not None and k.arg not in parameters]
    assert not problems, problems


# Examples that do not run here, by what they call, and why (the tests named run it)
NOT_RUN = {
    'kshrink.zoo.pretrained("lenet_300_100")': "the quickstart: tests/test_readme.py runs it",
    "BertBackbone(...)": "a keras-hub backbone elided with `...`: "
                         "tests/contract/test_transformers.py",
    "from_texts(": "a text encoder and its tokenizer: tests/core/test_distill.py and "
                   "tests/datasets/test_datasets.py",
    "kshrink.search(": "searches take minutes: tests/analysis/test_search.py",
    "kshrink.measure.compare(": "load probes in fresh processes: tests/test_readme.py",
}


def _not_run(code: str) -> str | None:
    """Why an example does not run here, or None."""
    return next((why for call, why in NOT_RUN.items() if call in code), None)


class Projection(keras.layers.Layer):
    """A user's dense layer with its own weight names (`w`, `b`)."""

    def __init__(self, units=8, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1], self.units), name="w")
        self.b = self.add_weight(shape=(self.units,), initializer="zeros", name="b")

    def call(self, inputs):
        return inputs @ self.w + self.b


class MyDense(Projection):
    """Another user's dense layer."""


@pytest.fixture(scope="module")
def namespace():
    """What the examples assume: a trained classifier and its data (the digits, 8x8), with a
    stem conv, a residual block closed by `s1_add`, BatchNorm, and Dense layers."""
    digits = kshrink.datasets.load("digits")
    x, y = digits.train[0].astype("float32"), digits.train[1]
    x_test, y_test = digits.test[0].astype("float32"), digits.test[1]
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8))
    h = keras.layers.Rescaling(1 / 16)(keras.layers.Reshape((8, 8, 1))(inputs))
    h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="stem_conv")(h)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
    r = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="s1_conv")(h)
    r = keras.layers.ReLU()(keras.layers.BatchNormalization()(r))
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.Add(name="s1_add")([h, r]))
    h = keras.layers.Dense(32, activation="relu", name="fc1")(h)
    model = keras.Model(inputs, keras.layers.Dense(10, name="logits")(h), name="digits_cnn")
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, epochs=8, batch_size=64, verbose=0)
    small, _ = kshrink.compress(model, "int8", verbose=False)
    # What the examples compress with: 640 examples, whole batches of 128 (a fit traces no
    # smaller last batch)
    x, y = x[:640], y[:640]
    digits = types.SimpleNamespace(train=(x, y), test=(x_test, y_test))
    return dict(kshrink=kshrink, keras=keras, np=np, dataclasses=dataclasses, model=model,
                classifier=model, small=small, x=x, y=y, x_train=x, x_test=x_test,
                y_test=y_test, x_val=x_test, y_val=y_test, data=(x, y), photos=x,
                mnist=digits, fashion=digits, Projection=Projection, MyDense=MyDense,
                Recipe=kshrink.Recipe, Select=kshrink.Select, Latency=kshrink.Latency,
                Int=Int, option=option, selection=selection)


@pytest.mark.parametrize("where, code", [
    pytest.param(where, code, marks=[pytest.mark.skip(_not_run(code))] if _not_run(code)
                 else []) for where, code in EXAMPLES], ids=[w for w, _ in EXAMPLES])
def test_an_example_runs(where, code, namespace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the files an example writes
    files = {node.value for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Constant)
             and re.fullmatch(r"[\w.-]+\.(keras|kshrink|tflite)", str(node.value))}
    loaded = {node.args[0].value for node in ast.walk(ast.parse(code))
              if isinstance(node, ast.Call) and (_dotted(node.func) or "").endswith("load")
              and node.args and isinstance(node.args[0], ast.Constant)}
    for name in loaded & files:  # a file the example reads: the compressed model
        kshrink.save(namespace["small"], name)
    copied = {**namespace, "model": kshrink.core.graph.copy_model(namespace["model"])}
    exec(compile(code, where, "exec"), copied)
    missing = [name for name in files if not (tmp_path / name).is_file()]
    assert not missing, f"{where} did not write {missing}"
