"""A technique added from outside the package (examples/plugin): it registers, keeps the
contract, joins the size search by name, and an installed plugin is found through its entry
point without an import."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

import kshrink
from kshrink.analysis import search
from kshrink.testing import check_technique

PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "plugin"


@pytest.fixture(scope="module")
def round_float16():
    sys.path.insert(0, str(PLUGIN))
    try:
        import round_float16
    finally:
        sys.path.remove(str(PLUGIN))
    return round_float16


def test_plugin_keeps_the_contract_and_recipes_name_it(round_float16):
    run = check_technique(round_float16.RoundFloat16(exclude=kshrink.Select(names=("fc2",))),
                          tolerance=1e-3)
    (step,) = run.report.steps
    assert sorted(r.layer for r in step.applied) == ["conv1", "conv2", "fc1"]
    recipe = kshrink.Recipe.from_yaml("- prune: {sparsity: 0.5}\n- round_float16: {}\n")
    assert [type(step) for step in recipe] == [kshrink.Prune, round_float16.RoundFloat16]


def test_size_search_gives_layers_the_plugin_level(round_float16, trained, digits, tmp_path):
    small, report = search(trained, digits.train, objective="size", epochs=0, rounds=2,
                           techniques=["round_float16"], max_accuracy_drop=1.0)
    assert report.best is not None
    assert set(report.best.levels.values()) == {"float16"}
    assert [type(step) for step in report.recipe] == [round_float16.RoundFloat16]
    float_size = kshrink.save(trained, tmp_path / "float.kshrink").stat().st_size
    assert float_size / report.best.objective > 1.8  # kernels in half the bytes
    kernel = np.asarray(small.get_layer("fc1").kernel)
    np.testing.assert_array_equal(kernel, kernel.astype(np.float16).astype(np.float32))


def test_an_installed_plugin_is_found_by_its_entry_point(tmp_path):
    """What `pip install examples/plugin` writes, without installing: package metadata whose
    entry point names the module; `kshrink techniques` then lists it. A plugin that fails to
    import is one warning; the other techniques stay."""
    info = tmp_path / "kshrink_round_float16-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kshrink-round-float16\n"
                                   "Version: 0.1.0\n")
    declared = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"][
        "entry-points"]["kshrink.techniques"]
    declared = {**declared, "broken": "no_such_module"}  # a broken plugin hides no other
    (info / "entry_points.txt").write_text("[kshrink.techniques]\n" + "".join(
        f"{name} = {module}\n" for name, module in declared.items()))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(PLUGIN)])}
    listed = subprocess.run([sys.executable, "-m", "kshrink", "techniques"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "round_float16" in listed.stdout and "structured_prune" in listed.stdout
    assert "no_such_module (broken, registered in kshrink.techniques) failed to import" in \
        listed.stderr
