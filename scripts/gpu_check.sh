#!/usr/bin/env bash
# One run on a GPU machine: build the extension against the torch found there (or take the one
# scripts/gpu_prebuild.sh built elsewhere for it, in .gpu/prebuilt), run the CUDA tests (the CUDA
# error paths among them), the GPU benchmarks, compute-sanitizer (memcheck, racecheck) over the
# workloads of validation/ (a small forward+backward of every op), the data pipeline's goal
# (training from the clip cache against in-memory clips) and a host/device profile of the LSTM
# calls.
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
# The data pipeline's GPU goal (issue 20): `cnnlstm-ext train` on a folder of videos, read from the
# clip cache with the default workers, holds >= 90% of the step rate of the same model (wlasl100:
# ResNet-18, 3 x BiLSTM 512; B=32, T=32, 112 px, bf16) on in-memory synthetic clips on the GPU.
stage data-pipeline 170 "$PY" - "$RES" <<'PYEOF'
import os, sys, tempfile, time
from concurrent.futures import ProcessPoolExecutor
import numpy as np, torch
from cnnlstm_ext.train.config import Config
from cnnlstm_ext.train.trainer import Trainer

def write(path, seed):  # WLASL-like: H.264 yuv420p, 256x256, 72 frames at 25 fps
    import av
    base = np.random.default_rng(seed).integers(0, 255, (17, 18, 3), dtype=np.uint8).repeat(16, 0).repeat(16, 1)
    with av.open(path, mode="w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width = s.height = 256
        s.pix_fmt, s.options = "yuv420p", {"preset": "veryfast", "crf": "23"}
        for i in range(72):
            img = np.ascontiguousarray(np.roll(base, 2 * i, axis=1)[:256, :256])
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)

def config(tmp, name, **data):
    cfg = Config()
    cfg.model.update(backbone="resnet18", spatial_dim=512, temporal_dim=512, num_layers=3, num_classes=4)
    d = cfg.data
    d.dataset, d.root, d.num_frames, d.frame_size, d.val_fraction = "folder", os.path.join(tmp, "videos"), 32, 112, 0.05
    for k, v in data.items():
        setattr(d, k, v)
    t = cfg.train
    t.output_dir, t.run_name, t.epochs, t.batch_size = tmp, name, 3, 32
    t.progress = t.tensorboard = False
    t.patience, t.eval_every, t.checkpoint_every = None, 100, 0
    return cfg

class InMemory(torch.utils.data.Dataset):  # synthetic clips already on the GPU
    def __init__(self, n, length):
        g = torch.Generator().manual_seed(0)
        self.clips = torch.randn(n, 32, 3, 112, 112, generator=g).cuda()
        self.n, self.length, self.records = n, length, None
    def __len__(self):
        return self.length
    def __getitem__(self, i):
        return self.clips[i % self.n], i % 4, 32

tmp = tempfile.mkdtemp()
paths = [os.path.join(tmp, "videos", "c%d" % (k % 4), "v%03d.mp4" % k) for k in range(288)]
for p in paths:
    os.makedirs(os.path.dirname(p), exist_ok=True)
with ProcessPoolExecutor(os.cpu_count()) as ex:
    list(ex.map(write, paths, range(len(paths))))
video = Trainer(config(tmp, "video", cache=os.path.join(tmp, "cache")))
n_train = len(video.train_set)
video.fit()
synthetic = Trainer(config(tmp, "synthetic", num_workers=0, pin_memory=False),
                    datasets=(InMemory(64, n_train), InMemory(64, 32), ["a", "b", "c", "d"]))
synthetic.fit()
a, b = video.history["clips_per_s"][-1], synthetic.history["clips_per_s"][-1]
line = ("data pipeline (GPU goal): video folder from the clip cache, %d workers: %.0f clips/s; "
        "in-memory synthetic: %.0f clips/s; ratio %.3f (target >= 0.9) %s"
        % (video.num_workers, a, b, a / b, "PASS" if a / b >= 0.9 else "FAIL"))
print(line)
print("video epochs: clips/s %s, data %s, steps %s" % (video.history["clips_per_s"],
      video.history["data_clips_per_s"], video.history["step_clips_per_s"]))
with open(os.path.join(sys.argv[1], "ratios.txt"), "a") as f:
    f.write(line + "\n")
sys.exit(0 if a / b >= 0.9 else 1)
PYEOF
grep -E "data pipeline|clips/s|Error" "$LOGS/data-pipeline.log" | tail -5
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
