#!/usr/bin/env bash
# The API reference, generated from the docstrings with pdoc: docs/api/index.html (or the
# folder given), one page per public module.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/api}
TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python -m pdoc --docformat google --no-show-source \
  -o "$out" kshrink
echo "api_docs: $out/index.html"
