"""The peer-tool environment: a virtual environment of its own, made on first use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-peers"
PYTHON = VENV / "bin" / "python"


def ensure_venv() -> Path:
    """Creates benchmarks/.venv-peers with the pinned peer tools, once."""
    stamp = VENV / ".installed"
    wanted = (HERE / "peers" / "requirements.txt").read_text() + (
        HERE / "peers" / "no-deps.txt").read_text()
    if stamp.exists() and stamp.read_text() == wanted:
        return PYTHON
    print("creating the peer-tool environment (tensorflow-model-optimization + tf_keras)...")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    pip = [str(PYTHON), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + ["-r", str(HERE / "peers" / "requirements.txt")], check=True)
    subprocess.run(pip + ["--no-deps", "-r", str(HERE / "peers" / "no-deps.txt")], check=True)
    stamp.write_text(wanted)
    return PYTHON


def run(script: str, job: dict) -> dict:
    """Runs peers/SCRIPT in the peer environment with a JSON job; returns its JSON result."""
    python = ensure_venv()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_USE_LEGACY_KERAS="1")
    done = subprocess.run([str(python), str(HERE / "peers" / script), json.dumps(job)],
                          capture_output=True, text=True, env=env)
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{script} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])
