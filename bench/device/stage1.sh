#!/usr/bin/env bash
# First device call (carry [".whlx"]): tyro, msgspec and a lean fastvideo-kernel into /tmp/sitem, the cu13
# libraries into /tmp/site (kept while the machine is warm). Then runs "$@" (a bench command) under that path:
#   bash bench/device/stage1.sh python bench/gpu_step.py --attention cudnn ... --save $OUT/x.md
set -euo pipefail
R=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
mkdir -p /tmp/sitem /tmp/site
pip install -q --no-index --no-deps --target /tmp/sitem .whlx/small/*.whl 2>&1 | grep -v WARNING || true
(cd /tmp/sitem && xz -dc "$R/.whlx/small/fvk.tar.xz" | tar xf -)
(cd /tmp/site && xz -dc "$R/.whlx/cu13.tar.xz" | tar xf - && touch /tmp/cu13.ok) &
export PYTHONPATH=/tmp/sitem:$R
if [ $# -gt 0 ]; then "$@"; fi
wait
ls /tmp/cu13.ok
