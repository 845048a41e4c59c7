"""The Python examples of README.md and of every docstring in kshrink name what exists: each
parses, every `kshrink.` name (and every name imported from kshrink) resolves, and every
keyword passed to a kshrink function or class is one it takes. (The quickstart runs whole in
tests/test_readme.py; these check the rest without running models.)"""

import ast
import importlib
import inspect
import pkgutil
import re
import textwrap
from pathlib import Path

import pytest

import kshrink

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
