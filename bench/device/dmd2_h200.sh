#!/usr/bin/env bash
# Issue 20's DMD2 row on one H200, after stage1.sh has set the path up (carry [".whlx"]):
#   bash bench/device/stage1.sh bash bench/device/dmd2_h200.sh
# Every role on VSA 0.9 (cuDNN cross-attention), twelve steps after one warm-up, at the lowest remat fraction
# that fits: 0.25, else 0.5 (fraction 0 is estimated at about 136 GiB of the card's 140). Each try's log and table
# go to $OUT (C_<fraction>.log, dmd2_c_<fraction>.md).
set -uo pipefail
for F in 0.25 0.5; do
  python bench/gpu_step.py --attention cudnn --skip-small --skip-diffusers --no-append --only vsa-dmd2 \
    --vsa-roles all --vsa 0.9 --dmd2-warmup 1 --dmd2-reps 12 --remat-fraction "$F" \
    --save "$OUT/dmd2_c_$F.md" 2>&1 | tee "$OUT/C_$F.log"
  if grep -q "DMD2 step" "$OUT/dmd2_c_$F.md" 2>/dev/null && ! grep -qi "out of memory" "$OUT/C_$F.log"; then
    exit 0
  fi
  echo "remat fraction $F: no DMD2 row (out of memory?); trying the next"
done
exit 1
