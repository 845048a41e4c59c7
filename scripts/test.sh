#!/usr/bin/env bash
# The test suite: everything on the TensorFlow backend, then the contract, pruning, clustering,
# quantization, folding, low-rank, export and layer-spec tests on JAX and torch.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# The HTML report's test renders it in a headless browser: Debian's Chromium.
if ! command -v chromium >/dev/null 2>&1; then
  echo "test: installing the Debian package chromium"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
export TF_CPP_MIN_LOG_LEVEL=2
KERAS_BACKEND=tensorflow .venv/bin/python -m pytest -n 2 --durations=15 "$@" tests
for backend in jax torch; do
  echo "== contract, pruning, clustering, quantization, folding, low-rank, export, layer-spec, reconstruction tests on $backend"
  KERAS_BACKEND=$backend .venv/bin/python -m pytest -n 2 --durations=15 "$@" tests/contract tests/prune \
    tests/cluster tests/quantize tests/fold tests/lowrank tests/deploy tests/layers \
    tests/reconstruct tests/core/test_distill.py
done
