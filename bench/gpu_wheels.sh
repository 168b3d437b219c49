#!/usr/bin/env bash
# Prepares .wheels/ for bench/gpu.sh on a GPU machine that reaches no package index but has
# its own PyTorch image (python3 with torch, timm, safetensors, numpy, ...): the few packages
# bench/gpu.py needs beyond that image, at the versions CI tests (.ci/constraints.txt), as
# wheels for CPython $PY_VERSION on x86_64. Run it here (with .venv), then carry .wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
py_version=${PY_VERSION:-3.12}
pin() { grep -i "^$1==" .ci/constraints.txt; }
rm -rf .wheels && mkdir -p .wheels
.venv/bin/pip download -q -d .wheels --no-deps --only-binary=:all: --implementation cp \
  --python-version "$py_version" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  "$(pin pydantic)" "$(pin pydantic_core)" "$(pin annotated-types)" "$(pin typing-inspection)" \
  "$(pin hjson)" "$(pin py-cpuinfo)"
.venv/bin/pip wheel -q --no-deps -w .wheels "$(pin deepspeed)"  # pure Python: its ops build at run time
ls -l .wheels
