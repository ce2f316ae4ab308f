#!/usr/bin/env bash
# Builds the extension with its CUDA kernels here, for the GPU machine, so that
# scripts/gpu_check.sh there can skip its build stage, device time spent on no GPU work (here the
# whole build takes about 2 minutes on 2 cores, nvcc on lstm_cuda.cu alone about 40 s).
#
#   scripts/gpu_prebuild.sh PYTHON [DIR]      (default DIR: .gpu/prebuilt)
#
# PYTHON's torch must be the version the GPU machine has (docs/architecture.md, "Build and
# machines"; gpu_check.sh writes it to device.txt): the library links torch's C++ ABI. It builds from a
# copy of the sources (the checkout's own build is left alone) and writes DIR/_C.abi3.so, without
# debug information, and DIR/stamp: torch's version, the CUDA arch and scripts/source_hash.sh's
# hash. gpu_check.sh uses the library only when all three match there, and builds otherwise.
# Carry DIR to the machine (an ignored folder: .gpu/ is in .git/info/exclude here).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${1:?usage: scripts/gpu_prebuild.sh PYTHON [DIR]}
DIR=$(mkdir -p "${2:-$ROOT/.gpu/prebuilt}" && cd "${2:-$ROOT/.gpu/prebuilt}" && pwd)
ARCH=${GPU_CHECK_ARCH:-9.0}  # the arch gpu_check.sh builds for, set the same way
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
cp -r "$ROOT/csrc" "$ROOT/setup.py" "$ROOT/cnnlstm_ext" "$SRC/"
rm -f "$SRC"/cnnlstm_ext/*.so
SOURCES=$("$ROOT/scripts/source_hash.sh" "$SRC")  # of the copy built, whatever changes meanwhile
(cd "$SRC" && CNNLSTM_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST=$ARCH "$PY" setup.py build_ext --inplace) \
  > "$DIR/build.log" 2>&1 || { tail -30 "$DIR/build.log"; exit 1; }
strip --strip-debug -o "$DIR/_C.abi3.so" "$SRC/cnnlstm_ext/_C.abi3.so"
{
  echo "torch=$("$PY" -c 'import torch; print(torch.__version__)')"
  echo "arch=$ARCH"
  echo "sources=$SOURCES"
} > "$DIR/stamp"
cat "$DIR/stamp"
ls -l "$DIR/_C.abi3.so"
