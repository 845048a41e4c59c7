#!/usr/bin/env bash
# The test suite: everything on the TensorFlow backend, then on JAX and torch the tests marked
# `every_backend`: the technique contract on every layer kind, custom-layer specs, quantized
# layers, export, Keras internals and one training or reload test per technique. (Tests of
# NumPy-side logic run once; tests/contract/test_across_backends.py compares all three
# backends from the first run.)
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
# The session fixture `trained` is trained once per run and loaded by every worker and backend.
KSHRINK_TEST_CACHE=$(mktemp -d)
export KSHRINK_TEST_CACHE
trap 'rm -rf "$KSHRINK_TEST_CACHE"' EXIT
# worksteal: an idle worker takes queued tests from the busy one, so the few minute-long tests
# need not leave one core idle at the end (TF run 11:26 and 11:53 against 11:54: within noise).
KERAS_BACKEND=tensorflow .venv/bin/python -m pytest -n 2 --dist worksteal --durations=15 "$@" tests
# Only the modules that mark tests every_backend are collected (importing the others is time).
marked=$(grep -rl --include='test_*.py' every_backend tests | sort)
for backend in jax torch; do
  echo "== the tests marked every_backend, on $backend"
  KERAS_BACKEND=$backend .venv/bin/python -m pytest -n 2 --dist worksteal --durations=15 \
    -m every_backend "$@" $marked
done
