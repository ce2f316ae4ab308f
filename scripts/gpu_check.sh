#!/usr/bin/env bash
# One run on a GPU machine: build the extension against the torch found there, run the CUDA tests,
# compute-sanitizer (memcheck, racecheck) over a small forward+backward of every op, and the GPU
# benchmarks; logs and pytest-benchmark JSON go to RESULTS_DIR; a short summary is printed last.
#
#   scripts/gpu_check.sh [RESULTS_DIR]      (default: $OUT if set, else ./gpu_results)
#
# Every stage runs even when an earlier one fails; the exit status is non-zero if any failed.
# Stage time limits keep the whole run under about 8 minutes on an H100.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RES=${1:-${OUT:-$ROOT/gpu_results}}
mkdir -p "$RES"
cd "$ROOT"
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} CNNLSTM_EXT_CUDA=1
export PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
# The GPU image sets CXX=/opt/gcc/bin/g++; an extension built with it crashes (in std::ostream)
# whenever an error message formats a number. Build with the system compiler when there is one.
if [ -x /usr/bin/g++ ] && [ -z "${GPU_CHECK_KEEP_CXX:-}" ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared"
fi
status=0
summary=()
start=$(date +%s)
stage() {  # stage NAME TIMEOUT LOG CMD...
  local name=$1 limit=$2 log=$3; shift 3
  local t0=$(date +%s)
  echo "=== [$(( t0 - start ))s] $name"
  timeout "$limit" "$@" > "$log" 2>&1
  local rc=$?
  summary+=("$(printf '%-22s rc=%-3s %4ss  %s' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$(basename "$log")")")
  [ "$rc" -ne 0 ] && status=1
  return $rc
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name())"
} > "$RES/device.txt" 2>&1
cat "$RES/device.txt"

if ! stage build 150 "$RES/build.log" "$PY" setup.py build_ext --inplace; then
  tail -40 "$RES/build.log"
  printf '%s\n' "${summary[@]}"
  exit 1
fi
stage cuda-error-paths 60 "$RES/cuda-error-paths.log" "$PY" scripts/cuda_error_paths.py
cat "$RES/cuda-error-paths.log"
# One pytest process per test file, so that a crash in one file cannot hide the others' results.
stage cuda-tests 200 "$RES/cuda-tests.log" bash -c '
  rc=0
  for f in python_tests/test_*.py; do
    grep -q "cuda" "$f" || continue
    echo "=== $f"
    "$0" -m pytest "$f" -m cuda -v -p no:cacheprovider --durations=5 || rc=1
  done
  exit $rc' "$PY"
stage benchmarks 170 "$RES/benchmarks.log" "$PY" -m pytest benchmarks -k cuda -q -p no:cacheprovider \
  --benchmark-json="$RES/benchmarks.json" --benchmark-min-rounds=5 --benchmark-max-time=0.2 \
  --benchmark-warmup=on --benchmark-columns=median,iqr,rounds
stage sanitizers 110 "$RES/sanitizers.log" bash -c "
  for tool in memcheck racecheck; do
    for script in scripts/sanitize_ops.py scripts/pooling_sanitizer_workload.py; do
      echo \"== \$tool \$script\"
      compute-sanitizer --tool \$tool --error-exitcode 9 $PY \$script || exit 1
    done
  done"

echo "=== test summary"
grep -E "FAILED|ERROR|Fatal|^=== |(passed|failed|skipped).* in " "$RES/cuda-tests.log" | head -60
grep -E "^== |ERROR SUMMARY|RACECHECK SUMMARY" "$RES/sanitizers.log"
echo "=== stages"
printf '%s\n' "${summary[@]}"
echo "=== speed and memory ratios (fused over baseline, same run, $(head -2 "$RES/device.txt" | tail -1 | cut -d, -f1))"
"$PY" benchmarks/ratios.py "$RES/benchmarks.json" | tee "$RES/ratios.txt"
exit $status
