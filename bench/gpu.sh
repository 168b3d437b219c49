#!/usr/bin/env bash
# The prepared single-GPU benchmark (bench/gpu.py): DINOv2-B and DINOv2-L, random weights, 224²,
# batch 32; prints one markdown table within 8 minutes (hard limit). Needs only this repo and
# its install: the README's set-up runs first when .venv is absent (torch==2.14.1 from PyPI is a
# CUDA build, so the same pins serve the GPU). PYTHON=/path/to/python uses an environment that
# already holds the install instead. Arguments go to bench/gpu.py (e.g. --no-compile).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
if [ -z "${PYTHON:-}" ] && [ ! -x .venv/bin/python ]; then
  "$(command -v python3.11 || command -v python3)" -m venv .venv
  .venv/bin/pip install torch==2.14.1 torchvision==0.29.1 -e . -c .ci/constraints.txt
fi
export PYTHONUNBUFFERED=1  # rows appear as they are measured, also when the time limit cuts the run
exec timeout 480 "$py" bench/gpu.py "$@"
