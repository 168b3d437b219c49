#!/usr/bin/env bash
# The prepared single-GPU benchmark (bench/gpu.py): DINOv2-B and DINOv2-L, random weights, 224²,
# batch 32; prints one markdown table within 8 minutes (hard limit), after a table of the six
# evaluation methods' fit and predict speed on the GPU (bench/methods.py, at most 2 minutes). Needs only this repo and
# its install: the README's set-up runs first when .venv is absent (torch==2.14.1 from PyPI is a
# CUDA build, so the same pins serve the GPU). PYTHON=/path/to/python uses an environment that
# already holds the install instead; on a GPU machine without a package index, the wheels of
# bench/gpu_wheels.sh (.wheels/) complete its own PyTorch image. Arguments go to bench/gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -x .venv/bin/python ]; then
  py=.venv/bin/python
elif [ -d .wheels ] && python3 -c "import torch, timm" 2>/dev/null; then
  # a GPU machine with its own PyTorch image and no package index: add what bench/gpu_wheels.sh
  # prepared, and run the checkout itself
  py=python3
  python3 -m pip install -q --no-index --no-deps .wheels/*.whl
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  "$(command -v python3.11 || command -v python3)" -m venv .venv
  .venv/bin/pip install torch==2.14.1 torchvision==0.29.1 -e . -c .ci/constraints.txt
  py=.venv/bin/python
fi
export PYTHONUNBUFFERED=1  # rows appear as they are measured, also when the time limit cuts the run
# the six evaluation methods at the embedded default's feature size, on the GPU (about a minute)
timeout 120 "$py" -m bench.methods --device cuda --no-paper || echo "bench.methods: exit $?"
exec timeout 480 "$py" bench/gpu.py "$@"
