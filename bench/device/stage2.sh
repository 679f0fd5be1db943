#!/usr/bin/env bash
# Second device call, same warm machine (carry [".whl"]): flash-attn-4, cutlass-dsl, diffusers and the rest over
# stage 1's /tmp/site, then runs "$@" with FA4 importable:
#   bash bench/device/stage2.sh python bench/gpu_step.py --attention fa4 ... --save $OUT/y.md
set -euo pipefail
[ -f /tmp/cu13.ok ] || { echo "stage 1 has not run on this machine (no /tmp/cu13.ok): a fresh machine" >&2; exit 3; }
mkdir -p /tmp/site2
pip install -q --no-index --no-deps --target /tmp/site2 .whl/*.whl 2>&1 | grep -v WARNING || true
# keep stage 1's files; coreutils 9.2-9.4 exit 1 when -n skips a file, so the import below is the check
cp -an /tmp/site2/. /tmp/site/ 2>/dev/null || true
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:/tmp/sitem:$PWD
python -c "import flash_attn.cute, diffusers, fastvideo_kernel"
if [ $# -gt 0 ]; then "$@"; fi
