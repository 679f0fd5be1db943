#!/usr/bin/env bash
# Packs the GPU benchmark's wheels for the lent device machines (their image: torch 2.11+cu130, no diffusers,
# tyro, msgspec, flash-attn-4 or fastvideo-kernel; a carry is at most 64 MiB). Run here, where pip can download:
#   bash bench/device/pack.sh            # -> .whl/ (FA4 stage, ~39 MB) and .whlx/ (first stage, ~62 MiB)
# Both folders are ignored (.git/info/exclude) and carried one per call: see bench/device/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
W=.whl X=.whlx M=.whlm
mkdir -p "$W" "$X/small" "$M"
for d in .whl/ .whlx/ .whlm/; do grep -qxF "/$d" .git/info/exclude 2>/dev/null || echo "/$d" >> .git/info/exclude; done
py=(--python-version 3.12 --only-binary=:all: --no-deps)  # the device's python 3.12, glibc 2.35
for tag in manylinux_2_35 manylinux_2_34 manylinux_2_28 manylinux_2_24 manylinux_2_17 manylinux2014; do
    py+=(--platform "${tag}_x86_64")
done
pip download -q "${py[@]}" -d "$W" flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 \
    nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 quack-kernels==0.6.5 apache-tvm-ffi \
    torch-c-dlpack-ext fastvideo-kernel==0.3.5 diffusers==0.42.1 tyro msgspec docstring_parser typeguard \
    importlib_metadata
pip download -q "${py[@]}" -d "$M" nvidia-cutlass-dsl-libs-cu13==4.8.1
cp "$W"/{tyro,msgspec,docstring_parser,typeguard,importlib_metadata}-*.whl "$X/small/"
# fastvideo-kernel without what the VSA rows never load (QAT / fp4 kernels), its 96 MB bundled libcuda an empty
# placeholder (the driver's own libcuda is loaded; only the sm_90 op, which torch 2.11 cannot load, links it)
t=$(mktemp -d)
unzip -q "$W"/fastvideo_kernel-*.whl -d "$t/fvk"
rm -rf "$t/fvk/attn_qat_infer" "$t"/fvk/fp4*.so
for f in "$t"/fvk/fastvideo_kernel.libs/libcuda-*; do : > "$f"; done
(cd "$t/fvk" && tar cf - . | xz -9 > "$OLDPWD/$X/small/fvk.tar.xz")
# the 92 MB cu13 libraries, unpacked and re-packed with xz -9e on one thread: 62.2 MB (two threads' blocks
# compress to 63.6 MB, too near the 64 MiB carry with the small pack)
unzip -q "$M"/nvidia_cutlass_dsl_libs_cu13-*.whl -d "$t/cu13"
(cd "$t/cu13" && tar cf - . | xz -9e -T1 > "$OLDPWD/$X/cu13.tar.xz")
rm -rf "$t"
du -sh "$W" "$X"
