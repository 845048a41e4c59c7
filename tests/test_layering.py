"""The package's layering (DESIGN.md): arrows only point down.

cli/analysis -> api -> techniques -> core -> layers; artifact, measure and deploy read models
and `layers`, never a technique. Read from the source with `ast`, imports inside functions
included, so a lazy import cannot hide an upward arrow.
"""

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "kshrink"
TECHNIQUES = {"prune", "quantize", "cluster", "lowrank", "fold"}
ABOVE_TECHNIQUES = {"api", "analysis", "cli", "testing"}


def _unit(module: str) -> str:
    """`kshrink.prune.masks` -> `prune`; `kshrink.io` -> `io`; `kshrink` -> `kshrink`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "kshrink"


def _imports() -> dict[str, set[str]]:
    """Module name -> the kshrink modules it imports."""
    found = {}
    for path in SOURCE.rglob("*.py"):
        relative = path.relative_to(SOURCE.parent).with_suffix("")
        parts = list(relative.parts)
        if parts[-1] == "__init__":
            parts.pop()
        module = ".".join(parts)
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("kshrink")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.startswith("kshrink"):
                    targets.add(node.module)
                    if node.module == "kshrink":  # `from kshrink import layers`
                        targets |= {f"kshrink.{a.name}" for a in node.names}
        found[module] = targets
    return found


IMPORTS = _imports()


def _unit_imports(unit: str) -> set[str]:
    return {_unit(t) for m, targets in IMPORTS.items() if _unit(m) == unit
            for t in targets} - {unit}


def test_layers_is_a_leaf():
    assert _unit_imports("layers") == set()
    for module, targets in IMPORTS.items():
        if _unit(module) == "layers":
            assert all(t.startswith("kshrink.layers") for t in targets), module


@pytest.mark.parametrize("unit", ["artifact", "measure", "deploy", "io", "core", "reconstruct"])
def test_storage_measurement_and_core_never_import_a_technique(unit):
    wrong = _unit_imports(unit) & (TECHNIQUES | ABOVE_TECHNIQUES)
    assert not wrong, f"{unit} imports {sorted(wrong)}"


@pytest.mark.parametrize("unit", sorted(TECHNIQUES))
def test_no_technique_imports_what_sits_above_it(unit):
    wrong = _unit_imports(unit) & ABOVE_TECHNIQUES
    assert not wrong, f"{unit} imports {sorted(wrong)}"


@pytest.mark.parametrize("unit", sorted(TECHNIQUES))
def test_no_technique_imports_another(unit):
    """Techniques are independent: what two of them share lives in core or layers."""
    wrong = _unit_imports(unit) & TECHNIQUES
    assert not wrong, f"{unit} imports {sorted(wrong)}"


def test_below_the_techniques_no_string_names_a_technique_module():
    """Imports by string (importlib) hide from the checks above: below the techniques, no
    string names a technique's module; techniques register through entry points."""
    below = {"core", "layers", "artifact", "measure", "deploy", "io", "reconstruct"}
    found = []
    for path in SOURCE.rglob("*.py"):
        parts = path.relative_to(SOURCE).parts
        unit = parts[0] if len(parts) > 1 else path.stem
        if unit not in below:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and node.value.split(".")[:2] in ([["kshrink", t] for t in TECHNIQUES])):
                found.append(f"{path.relative_to(SOURCE)}:{node.lineno} {node.value}")
    assert not found, found


def test_outside_layers_nothing_writes_a_private_attribute_of_another_object():
    """Private Keras attributes are written in `kshrink.layers` alone (each with a canary in
    tests/layers/test_keras_internals.py): elsewhere `x._name = ...` only on `self`."""
    found = []
    for path in SOURCE.rglob("*.py"):
        if path.relative_to(SOURCE).parts[0] == "layers":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            for target in targets:
                for item in target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]:
                    if (isinstance(item, ast.Attribute) and item.attr.startswith("_")
                            and not item.attr.startswith("__")
                            and not (isinstance(item.value, ast.Name)
                                     and item.value.id in ("self", "cls"))):
                        found.append(f"{path.relative_to(SOURCE)}:{node.lineno} "
                                     f"{ast.unparse(item)}")
    assert not found, found


def test_outside_layers_no_list_of_keras_layer_classes_or_kernel_names():
    """What a Keras layer is (its kernels, whether a rewrite may drop it, how its rows are
    formed) is told in `kshrink.layers` alone: elsewhere no tuple, list or set of two or more
    `keras.layers` classes, nor of kernel variable names."""
    kernel_names = {"kernel", "depthwise_kernel", "pointwise_kernel", "embeddings"}
    found = []
    for path in SOURCE.rglob("*.py"):
        if path.relative_to(SOURCE).parts[0] == "layers":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                continue
            classes = {ast.unparse(e) for e in node.elts if isinstance(e, ast.Attribute)
                       and ast.unparse(e.value) in ("keras.layers", "L", "_L")}
            names = [e for e in node.elts if isinstance(e, ast.Constant)
                     and e.value in kernel_names]
            if len(classes) >= 2 or len(names) >= 2:
                found.append(f"{path.relative_to(SOURCE)}:{node.lineno} {ast.unparse(node)}")
    assert not found, found


def test_outside_layers_no_check_names_a_keras_layer_class():
    """Which kind a layer is (a BatchNorm, an embedding, a ReLU, a residual Add) is asked of
    `kshrink.layers` alone: elsewhere `isinstance` and `type(x) is` name only Keras' generic
    bases. The model builders (zoo, datasets, testing) and export's stand-in for Normalization
    (a tf2onnx workaround that swaps the class itself) are left out."""
    generic = {"keras.layers.Layer", "keras.layers.Wrapper", "keras.layers.InputLayer"}
    allowed = {("deploy", "keras.layers.Normalization")}
    found = []
    for path in SOURCE.rglob("*.py"):
        unit = path.relative_to(SOURCE).parts[0].removesuffix(".py")
        if unit in ("layers", "zoo", "datasets", "testing"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("isinstance",
                                                                        "issubclass"):
                named = node.args[1:]
            elif isinstance(node, ast.Compare) and any(
                    isinstance(op, (ast.Is, ast.IsNot, ast.Eq, ast.NotEq, ast.In))
                    for op in node.ops):
                named = node.comparators + [node.left]
            else:
                continue
            for part in named:
                for element in part.elts if isinstance(part, ast.Tuple) else [part]:
                    name = ast.unparse(element)
                    if (name.startswith("keras.layers.") and name not in generic
                            and (unit, name) not in allowed):
                        found.append(f"{path.relative_to(SOURCE)}:{node.lineno} {name}")
    assert not found, found


def test_no_import_cycle_between_parts():
    graph = {unit: _unit_imports(unit) - {"kshrink", "errors", "render"}
             for unit in {_unit(m) for m in IMPORTS}}
    state = {}

    def visit(unit, path):
        if state.get(unit) == "done":
            return
        assert state.get(unit) != "open", f"import cycle: {' -> '.join(path + [unit])}"
        state[unit] = "open"
        for target in sorted(graph.get(unit, ())):
            visit(target, path + [unit])
        state[unit] = "done"

    for unit in sorted(graph):
        visit(unit, [])


def test_every_public_function_and_class_says_what_it_does():
    """The API reference is read from the docstrings: a public definition needs one."""
    missing = []
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if (isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_")
                    and ast.get_docstring(node) is None):
                missing.append(f"{path.relative_to(SOURCE)}:{node.lineno} {node.name}")
    assert not missing, missing
