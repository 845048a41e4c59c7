"""The README's quickstart runs as written, and says the truth about the files it writes."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_quickstart_runs_and_its_keras_file_loads_without_kshrink(tmp_path):
    quickstart = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", quickstart], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "summary: " in done.stdout and "applied" in done.stdout
    # "Dense layers only: loads without kshrink"
    plain = ("import sys, keras; keras.saving.load_model('lenet-int8.keras'); "
             "assert 'kshrink' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", plain], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "lenet-int8.kshrink").stat().st_size < (
        tmp_path / "lenet-int8.keras").stat().st_size


def test_every_module_the_readme_names_is_reached_from_import_kshrink():
    names = sorted(set(re.findall(r"\bkshrink\.([a-z_]+)\.", README.read_text())))
    assert "deploy" in names
    script = ("import kshrink\n"
              f"missing = [n for n in {names!r} if not hasattr(kshrink, n)]\n"
              "assert not missing, missing\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]
