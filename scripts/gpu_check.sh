#!/usr/bin/env bash
# One run on a GPU machine: build the extension against the torch found there (or take the one
# scripts/gpu_prebuild.sh built elsewhere for it, in .gpu/prebuilt), run the CUDA tests (the CUDA
# error paths among them), the GPU benchmarks, compute-sanitizer (memcheck, racecheck) over the
# workloads of validation/ (a small forward+backward of every op), and a host/device profile of
# the LSTM calls.
#
#   scripts/gpu_check.sh [RESULTS_DIR]      (default: $OUT if set, else ./gpu_results)
#
# RESULTS_DIR receives at most 5 files: device.txt, benchmarks.json (pytest-benchmark), ratios.txt
# (fused over baseline, then the issues' goals), profile_lstm.txt and logs.tar.gz (every stage's
# full log). Stages run in order of importance and every stage runs even when an earlier one
# failed; the exit status is non-zero if any failed. The whole run is kept within
# GPU_CHECK_BUDGET seconds (default 540): a stage gets at most what is left of it.
# GPU_CHECK_SKIP="sanitizers profile-lstm ..." leaves out the stages it names; GPU_CHECK_TESTS (test
# paths, default python_tests), GPU_CHECK_BENCH (-k expression, default cuda) and
# GPU_CHECK_SANITIZE (tools, default "memcheck racecheck") narrow the others.
# GPU_CHECK_LIMIT_<stage> (stage name with - as _, e.g. GPU_CHECK_LIMIT_cuda_tests=300) replaces a
# stage's own time limit. GPU_CHECK_ARCH (default 9.0) is the CUDA arch the extension is built for.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RES=${1:-${OUT:-$ROOT/gpu_results}}
BUDGET=${GPU_CHECK_BUDGET:-540}
mkdir -p "$RES"
LOGS=$(mktemp -d)
cd "$ROOT"
PY=${PYTHON:-python3}
# Arch 9.0, the H100/H200 of docs/architecture.md ("Build and machines"), as
# scripts/gpu_prebuild.sh builds by default. The GPU image sets TORCH_CUDA_ARCH_LIST=9.0a, which a
# prebuilt library's stamp would never match; GPU_CHECK_ARCH picks another.
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${GPU_CHECK_ARCH:-9.0} CNNLSTM_EXT_CUDA=1
export PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
# The GPU image sets CXX=/opt/gcc/bin/g++; an extension built with it crashes (in std::ostream)
# whenever an error message formats a number. Build with the system compiler when there is one.
if [ -x /usr/bin/g++ ] && [ -z "${GPU_CHECK_KEEP_CXX:-}" ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared"
fi
status=0
summary=()
start=$(date +%s)
stage() {  # stage NAME LIMIT CMD...  (log: $LOGS/NAME.log)
  local name=$1 limit=$2; shift 2
  local override="GPU_CHECK_LIMIT_${name//-/_}"
  limit=${!override:-$limit}
  case " ${GPU_CHECK_SKIP:-} " in *" $name "*)
    summary+=("$(printf '%-18s skipped (GPU_CHECK_SKIP)' "$name")"); return 0;; esac
  local t0=$(date +%s)
  local left=$(( BUDGET - (t0 - start) ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    summary+=("$(printf '%-18s skipped: out of time' "$name")")
    status=1
    return 1
  fi
  echo "=== [$(( t0 - start ))s] $name (limit ${limit}s)"
  # SIGINT first: pytest then still writes what it has (the benchmark JSON of the cases run).
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-18s rc=%-3s %4ss' "$name" "$rc" "$(( $(date +%s) - t0 ))")")
  [ "$rc" -ne 0 ] && status=1
  return $rc
}
finish() {
  echo "=== stages (budget ${BUDGET}s)"
  printf '%s\n' "${summary[@]}"
  tar czf "$RES/logs.tar.gz" -C "$LOGS" .
  exit $status
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name())"
} > "$RES/device.txt" 2>&1
cat "$RES/device.txt"

# A library built elsewhere for this machine (scripts/gpu_prebuild.sh) saves the build, when it
# was built for this torch and arch from these sources and imports with its CUDA kernels.
export PY PREBUILT=${GPU_CHECK_PREBUILT:-$ROOT/.gpu/prebuilt}
prebuilt_ok() {
  [ -f "$PREBUILT/stamp" ] && [ -f "$PREBUILT/_C.abi3.so" ] || { echo "no library in $PREBUILT"; return 1; }
  local want
  want=$(printf 'torch=%s\narch=%s\nsources=%s' \
    "$("$PY" -c 'import torch; print(torch.__version__)')" "$TORCH_CUDA_ARCH_LIST" "$(scripts/source_hash.sh)")
  [ "$(cat "$PREBUILT/stamp")" = "$want" ] || { printf 'stamp differs; wanted:\n%s\n' "$want"; return 1; }
  cp "$PREBUILT/_C.abi3.so" cnnlstm_ext/_C.abi3.so &&
    "$PY" -c "import cnnlstm_ext, sys; sys.exit(not cnnlstm_ext.cuda_kernels_built())"
}
export -f prebuilt_ok
if ! stage prebuilt 30 bash -c prebuilt_ok; then
  status=0  # not a failure of the check: the build below decides
  rm -f cnnlstm_ext/_C.abi3.so
  cat "$LOGS/prebuilt.log"
  if ! stage build 220 "$PY" setup.py build_ext --inplace; then
    tail -40 "$LOGS/build.log"
    finish
  fi
fi
stage cuda-tests 180 "$PY" -m pytest ${GPU_CHECK_TESTS:-python_tests} -m cuda -q -p no:cacheprovider --durations=8
echo "--- cuda tests"
grep -E "FAILED|ERROR|Fatal|passed|failed" "$LOGS/cuda-tests.log" | tail -40
stage benchmarks 200 "$PY" -m pytest benchmarks -k "${GPU_CHECK_BENCH:-cuda}" -q -p no:cacheprovider \
  --benchmark-json="$RES/benchmarks.json" --benchmark-min-rounds=5 --benchmark-max-time=0.2 \
  --benchmark-warmup=on --benchmark-columns=median,iqr,rounds
echo "--- speed and memory ratios (fused over baseline, same run, $(head -2 "$RES/device.txt" | tail -1 | cut -d, -f1))"
{
  "$PY" benchmarks/ratios.py "$RES/benchmarks.json"
  echo "--- the issues' goals (benchmarks/targets.py)"
  "$PY" benchmarks/targets.py "$RES/benchmarks.json"
} > "$RES/ratios.txt" 2>&1
cat "$RES/ratios.txt"
stage sanitizers 90 bash -c "
  for tool in ${GPU_CHECK_SANITIZE:-memcheck racecheck}; do
    for script in validation/sanitize_lstm.py validation/sanitize_pooling.py; do
      echo \"== \$tool \$script\"
      compute-sanitizer --tool \$tool --error-exitcode 9 $PY \$script || exit 1
    done
  done"
grep -E "^== |ERROR SUMMARY|RACECHECK SUMMARY" "$LOGS/sanitizers.log"
stage profile-lstm 90 "$PY" scripts/profile_lstm_cuda.py --out "$RES/profile_lstm.txt"
cat "$LOGS/profile-lstm.log"
finish
