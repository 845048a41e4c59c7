"""The API reference builds from the docstrings (`scripts/api_docs.sh`, pdoc) and documents
every name `import kshrink` offers."""

import subprocess
from pathlib import Path

import kshrink

ROOT = Path(__file__).resolve().parents[1]


def test_api_reference_documents_every_public_name(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "scripts" / "api_docs.sh"), str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    top = (tmp_path / "kshrink.html").read_text()
    pages = tmp_path / "kshrink"
    missing = [name for name in kshrink.__all__
               if f'id="{name}"' not in top and not (pages / f"{name}.html").exists()]
    assert not missing, missing
    testing = (tmp_path / "kshrink" / "testing.html").read_text()
    assert 'id="check_technique"' in testing and "Runs every contract check" in testing
