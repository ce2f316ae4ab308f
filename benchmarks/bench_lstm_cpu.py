"""FusedLSTM against torch.nn.LSTM on the CPU, at the CNN-LSTM's temporal model shape.

    python -m pytest benchmarks/bench_lstm_cpu.py --benchmark-json=lstm_cpu.json
    python benchmarks/ratios.py lstm_cpu.json

Shape: I = H = 512, 3 layers, bidirectional, B = 8, T = 32, float32 (``test_lstm_cpu``, with the
memory figure), and the grid B in {1, 8, 32} x float32, bfloat16, autocast (``test_lstm_cpu_grid``). Cases: ``inference``
(forward under no_grad) and ``training`` (forward + backward of a random projection of the output,
parameter gradients freed between calls as ``zero_grad(set_to_none=True)`` does). One
pytest-benchmark group per case, ``extra_info["impl"]`` = "baseline" | "fused" (the convention of
benchmarks/ratios.py); the fused entry also carries ``speedup_vs_baseline`` and
``memory_vs_baseline`` (fused peak / baseline peak). The fused test times a baseline call before
each of its rounds (pytest-benchmark's setup), and ``speedup_vs_baseline`` is the ratio of those
interleaved medians: on a shared machine the load changes between tests, so that ratio is the one
to quote (``speedup_separate_runs`` keeps the ratio of the two tests' medians).

Peak memory (``extra_info["peak_bytes"]``): torch's CPU allocations are invisible to tracemalloc,
so each (impl, case) runs in a fresh subprocess with glibc's mmap threshold fixed at 64 KiB (every
large tensor is mmapped, its pages return to the system when freed, so resident memory follows the
live tensors); after one warm-up call the peak-RSS mark is reset (/proc/self/clear_refs) and the
peak of one more call is taken over the resident size before it.
"""
import json
import os
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

import cnnlstm_ext
from cnnlstm_ext import FusedLSTM

import interleave

INPUT = HIDDEN = 512
LAYERS = 3
BATCH = 8
STEPS = 32
CASES = ["inference", "training"]
IMPLS = ["baseline", "fused"]  # baseline first: the fused entry records the ratio against it
ROUNDS = {"inference": 8, "training": 5}

_medians = {}  # case -> baseline median (s), filled by the baseline run of this session
_peaks = {}    # case -> baseline peak bytes


def make_step(impl: str, case: str, seed: int = 0, size: int = INPUT, batch: int = BATCH,
              steps: int = STEPS, device: str = "cpu", precision: str = "float32"):
    """The timed call for (impl, case), on fresh seeded weights and input x: [T, B, I] with
    I = H = size; on CUDA the call ends with a synchronisation. precision: "float32",
    "bfloat16" (module and input) or "autocast" (float32 module under bfloat16 autocast)."""
    torch.manual_seed(seed)
    cls = FusedLSTM if impl == "fused" else nn.LSTM
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    model = cls(size, size, LAYERS, bidirectional=True, device=device, dtype=dtype)
    x = torch.randn(steps, batch, size, device=device, dtype=dtype, requires_grad=case == "training")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "autocast"):
            return model(x)[0]
    if case == "inference":
        model.eval()

        def step():
            with torch.no_grad():
                out = forward()
            sync()
            return out
    else:
        out_dtype = torch.float32 if precision == "float32" else torch.bfloat16
        proj = torch.randn(steps, batch, 2 * size, device=device, dtype=out_dtype)

        def step():
            out = forward()
            out.backward(proj)  # the gradient of (out * proj).sum()
            model.zero_grad(set_to_none=True)
            x.grad = None
            sync()
            return out
    return step


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _measure_peak_here(impl: str, case: str) -> int:
    import gc

    step = make_step(impl, case)
    step()  # warm-up: one-time allocations (oneDNN/MKL caches) are not the step's memory
    gc.collect()
    before = _status_bytes("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    step()
    return _status_bytes("VmHWM:") - before


def peak_bytes(impl: str, case: str) -> int:
    """Peak extra resident memory of one call, measured in a fresh subprocess."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(cnnlstm_ext.__file__)))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=os.pathsep.join([package_root, os.path.dirname(os.path.abspath(__file__))]))
    out = subprocess.run(
        [sys.executable, "-c",
         f"import bench_lstm_cpu as b, json; print(json.dumps(b._measure_peak_here({impl!r}, {case!r})))"],
        env=env, capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1]))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                    reason="the peak-memory measurement needs Linux /proc")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_lstm_cpu(benchmark, case, impl):
    step = make_step(impl, case)
    benchmark.group = f"lstm_cpu:{case}"
    benchmark.extra_info.update({
        "impl": impl, "case": case, "input_size": INPUT, "hidden_size": HIDDEN,
        "num_layers": LAYERS, "bidirectional": True, "batch": BATCH, "steps": STEPS,
        "dtype": "float32", "threads": torch.get_num_threads(), "cpu": _cpu_model(),
        "torch": torch.__version__, "load_average_1min": os.getloadavg()[0],
    })
    baseline = make_step("baseline", case) if impl == "fused" else None
    interleave.time_interleaved(benchmark, step, baseline, ROUNDS[case])
    peak = peak_bytes(impl, case)
    benchmark.extra_info["peak_bytes"] = peak
    median = benchmark.stats.stats.median
    if impl == "baseline":
        _medians[case], _peaks[case] = median, peak
    else:
        if case in _medians:
            benchmark.extra_info["speedup_separate_runs"] = _medians[case] / median
            benchmark.extra_info["memory_vs_baseline"] = peak / _peaks[case]


# The grid every point of which must be at least nn.LSTM's speed: B in {1, 8, 32} at T = 32, in
# float32, in bfloat16 (module and input) and under CPU autocast (a float32 module, bfloat16
# compute, where nn.LSTM runs oneDNN's bfloat16 RNN), inference and training. On a CPU with
# AVX512-BF16 the fused forward and backward run their products in bfloat16 too. At B = 32 the
# large GEMMs (the same on both sides) take most of a call.
PRECISIONS = ["float32", "bfloat16", "autocast"]
GRID_BATCHES = [1, 8, 32]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batch", GRID_BATCHES, ids=[f"B{b}" for b in GRID_BATCHES])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_lstm_cpu_grid(benchmark, precision, batch, case, impl):
    step = make_step(impl, case, batch=batch, precision=precision)
    benchmark.group = f"lstm_cpu_{precision}:B{batch}:{case}"
    benchmark.extra_info.update({
        "impl": impl, "case": case, "precision": precision, "batch": batch, "steps": STEPS,
        "threads": torch.get_num_threads(), "cpu": _cpu_model(), "torch": torch.__version__,
        "load_average_1min": os.getloadavg()[0],
    })
    baseline = (make_step("baseline", case, batch=batch, precision=precision)
                if impl == "fused" else None)
    interleave.time_interleaved(benchmark, step, baseline, ROUNDS[case])


@pytest.mark.parametrize("case", CASES)
def test_lstm_cpu_fused_matches_baseline(case):
    """The timed calls compute the same thing (same seed, same weights and input)."""
    torch.testing.assert_close(make_step("fused", case)(), make_step("baseline", case)(),
                               rtol=1e-4, atol=1e-5)


# --- cost of a call -------------------------------------------------------------------------------
# The model's 3 bidirectional layers at a tiny size (I = H = 8, T = 2, B = 1): the kernels take next
# to no time, so these cases time what a call costs the host (the module's Python, weight views,
# autograd, dispatch, allocation, launches). On a GPU that cost bounds small-batch calls and, in
# benchmarks/RESULTS.md's profile, the bfloat16 training step at B = 32.
TINY = 8
COST_ROUNDS = 200


def tiny_step(impl: str, case: str, device: str):
    return make_step(impl, case, size=TINY, batch=1, steps=2, device=device)


def twenty_calls(step):
    """A round of 20 calls, so that the timer's own cost stays out of the figure."""
    return lambda: [step() for _ in range(20)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("case", CASES)
def test_lstm_call_cost(benchmark, case, device, impl):
    step = tiny_step(impl, case, device)
    benchmark.group = f"lstm {device} call cost:{case}"
    benchmark.extra_info.update({
        "impl": impl, "case": case, "device": device, "input_size": TINY, "hidden_size": TINY,
        "num_layers": LAYERS, "bidirectional": True, "batch": 1, "steps": 2,
        "threads": torch.get_num_threads(), "cpu": _cpu_model(), "torch": torch.__version__,
    })
    baseline = twenty_calls(tiny_step("baseline", case, device)) if impl == "fused" else None
    interleave.time_interleaved(benchmark, twenty_calls(step), baseline, COST_ROUNDS,
                                warmup_rounds=5)
