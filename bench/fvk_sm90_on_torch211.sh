#!/bin/bash
# Bench use only: lets fastvideo-kernel 0.3.5's sm_90 extension (built against torch 2.12) load under torch 2.11,
# as bench/RESULTS.md's sm_90 rows of 2026-12-07 did. Two things stop it:
#   1. the wheel bundles a libcuda of driver 580.178 (fastvideo_kernel.libs/libcuda-*.so.*): linked to the
#      system's libcuda.so.1 instead;
#   2. it references NCCL symbols of torch 2.12's headers that it never calls in attention; those the installed
#      NCCL lacks (under torch 2.11's NCCL 2.28.9: ncclCommQueryProperties) get a stub returning
#      ncclInvalidUsage, built here into /tmp/libncclstub.so.
# Usage: SITE=/path/where/fastvideo_kernel/is bash bench/fvk_sm90_on_torch211.sh
#        LD_PRELOAD=/tmp/libncclstub.so python bench/vsa_parts.py ...     (fvfunc then picks the sm_90 op)
set -euo pipefail
SITE=${SITE:-$(python3 -c "import fastvideo_kernel, os; print(os.path.dirname(os.path.dirname(fastvideo_kernel.__file__)))")}
SYSCUDA=$(ldconfig -p | awk '/libcuda\.so\.1 /{print $NF; exit}')
for f in "$SITE"/fastvideo_kernel.libs/libcuda-*.so.*; do ln -sf "$SYSCUDA" "$f"; done
NCCL=$(python3 -c "import nvidia.nccl, os, glob; print(glob.glob(os.path.join(nvidia.nccl.__path__[0], 'lib', 'libnccl.so*'))[0])")
python3 - "$NCCL" > /tmp/ncclstub.c <<'PY'
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
names = ["ncclCommQueryProperties", "ncclCommWindowDeregister", "ncclCommWindowRegister", "ncclDevCommCreate",
         "ncclDevCommDestroy", "ncclMemAlloc", "ncclMemFree", "ncclTeamLsa"]
missing = [n for n in names if not hasattr(lib, n)]
print("/* stubs of the NCCL symbols %s lacks: %s */" % (sys.argv[1], " ".join(missing) or "none"))
for n in missing:
    print("int %s(void) { return 5; }" % n)
PY
gcc -O2 -shared -fPIC -o /tmp/libncclstub.so /tmp/ncclstub.c
head -1 /tmp/ncclstub.c
LD_PRELOAD=/tmp/libncclstub.so python3 -c "from fastvideo_kernel._C import fastvideo_kernel_ops; print('the sm_90 extension loads')"
