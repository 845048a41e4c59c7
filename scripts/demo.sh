#!/usr/bin/env bash
# The main job: train (or reuse) LeNet-300-100 on MNIST, compress it, print before/after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/kshrink demo "$@"
