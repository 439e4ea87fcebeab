#!/usr/bin/env bash
# Creates .venv and installs dicom-node with its extras (idempotent).
# Usage: bash .ci/bootstrap.sh [EXTRAS]   (default EXTRAS: dev,train)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev,train}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
# torch and torchvision come from PyPI (CUDA build; it runs on the CPU too).
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
echo "bootstrap: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
