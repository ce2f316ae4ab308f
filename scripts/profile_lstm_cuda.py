"""Where the time of one FusedLSTM / nn.LSTM (cuDNN) call goes on a GPU: host or device.

For each case prints, per implementation:
  wall    median time of a call followed by torch.cuda.synchronize() (what the benchmarks time)
  host    median time until the call returns, without synchronising (Python + dispatch + launches;
          the GPU is idle at the start of each measured call)
  device  summed CUDA kernel time of one call (torch.profiler), and its largest kernels
A call whose wall time is close to its host time is bound by the host, not by its kernels.

First, whether the host runs ahead of the GPU (host and wall time of a fused call at T = 32 and
T = 512). Then a sweep of the persistent plan's hidden units per CTA (CNNLSTM_EXT_PERSISTENT_MIN_HB:
the fused wall time with the smallest slice that fits, and with slices of at least 8 and 16
units), and the host-side operators and CUDA runtime calls of fused bfloat16 training at B=32 and
float32 inference at B=8, by self CPU time. Lines are printed as they are measured.

    python3 scripts/profile_lstm_cuda.py [--out FILE]
"""
import argparse
import statistics
import sys
import time
from collections import defaultdict

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import cnnlstm_ext
from cnnlstm_ext import FusedLSTM

I = H = 512
LAYERS = 3
CASES = [  # (dtype, case, B, T)
    (torch.float32, "inference", 1, 32),
    (torch.float32, "inference", 8, 32),
    (torch.bfloat16, "inference", 1, 32),
    (torch.bfloat16, "inference", 8, 32),
    (torch.float32, "inference", 128, 32),
    (torch.bfloat16, "training", 32, 32),
    (torch.float32, "training", 128, 32),
]


def make_call(impl, dtype, case, batch, steps):
    torch.manual_seed(0)
    cls = FusedLSTM if impl == "fused" else nn.LSTM
    model = cls(I, H, LAYERS, bidirectional=True, device="cuda", dtype=dtype)
    x = torch.randn(steps, batch, I, device="cuda", dtype=dtype, requires_grad=case == "training")
    grad = torch.randn(steps, batch, 2 * H, device="cuda", dtype=dtype)
    if case == "inference":
        model.eval()

        def call():
            with torch.no_grad():
                model(x)
    else:
        def call():
            out, _ = model(x)
            out.backward(grad)
            model.zero_grad(set_to_none=True)
            x.grad = None
    return call


def measure(call, rounds=40):
    for _ in range(5):
        call()
    torch.cuda.synchronize()
    wall, host = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        call()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append(t1 - t0)
        wall.append(t2 - t0)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    kernels = defaultdict(float)  # only CUDA activity was recorded: every event is device work
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0)
        if us > 0:
            kernels[e.key] += us
    return statistics.median(wall), statistics.median(host), kernels


SWEEP_CASES = [  # (dtype, case, B, T)
    (torch.float32, "inference", 1, 32),
    (torch.float32, "inference", 8, 32),
    (torch.bfloat16, "inference", 8, 32),
    (torch.bfloat16, "inference", 32, 32),
    (torch.float32, "training", 8, 32),
    (torch.bfloat16, "training", 32, 32),
    (torch.float32, "training", 32, 32),
]
SWEEP_MIN_HB = ("", "8", "16")  # "": the plan's own choice


def host_operators(dtype=torch.float32, case="inference", batch=8, steps=32, top=15):
    """Self CPU time of the operators and CUDA runtime calls of 10 fused calls (host breakdown;
    a runtime call that waits for the device, such as a launch that blocks, shows up here)."""
    call = make_call("fused", dtype, case, batch, steps)
    for _ in range(5):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            call()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    return [f"\n== host operators of 10 fused calls, {str(dtype).replace('torch.', '')} {case} "
            f"B={batch} T={steps}", table]


def runs_ahead():
    """Whether a fused call returns before its kernels finish. The recurrence's time grows with T
    and its host work does not: if the host time of a call grows like its wall time, the launches
    wait for earlier kernels and the host cannot queue work ahead of the GPU."""
    lines = ["\n== does the host run ahead of the GPU? fused bfloat16 inference B=8, us"]
    for steps in (32, 512):
        call = make_call("fused", torch.bfloat16, "inference", 8, steps)
        wall, host, _ = measure(call, rounds=20)
        lines.append(f"  T={steps:<4d} host {host * 1e6:9.1f}  wall {wall * 1e6:9.1f}")
    return lines


def sweep_min_hb():
    lines = ["\n== fused wall us by backends.lstm.persistent_min_hb (auto / 8 / 16)"]
    for dtype, case, batch, steps in SWEEP_CASES:
        walls = []
        for min_hb in SWEEP_MIN_HB:
            with cnnlstm_ext.backends.flags(persistent_min_hb=int(min_hb or 0)):
                wall, _, _ = measure(make_call("fused", dtype, case, batch, steps))
            walls.append(f"{wall * 1e6:8.1f}")
        name = str(dtype).replace("torch.", "")
        lines.append(f"  {name:8s} {case:9s} B={batch:<3d} T={steps}: " + " / ".join(walls))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args()
    lines = []

    def emit(new_lines):  # printed as they come: a run cut short still shows what it measured
        lines.extend(new_lines)
        print("\n".join(new_lines), flush=True)

    emit([f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"cuDNN {torch.backends.cudnn.version()}; I=H={I}, {LAYERS} layers, bidirectional"])
    emit(runs_ahead())
    for dtype, case, batch, steps in CASES:
        name = str(dtype).replace("torch.", "")
        block = [f"\n== {name} {case} B={batch} T={steps}"]
        for impl in ("cudnn", "fused"):
            wall, host, kernels = measure(make_call(impl, dtype, case, batch, steps))
            device_us = sum(kernels.values())
            block.append(f"  {impl:6s} wall {wall * 1e6:8.1f} us  host {host * 1e6:8.1f} us  "
                         f"device {device_us:8.1f} us in {len(kernels)} kernel kinds")
            for kname, us in sorted(kernels.items(), key=lambda kv: -kv[1])[:5]:
                block.append(f"           {us:8.1f} us  {kname[:100]}")
        emit(block)
    # The sweep before the host breakdowns: a profiler pass with CPU activity leaves host
    # overhead behind it.
    emit(sweep_min_hb())
    emit(host_operators(torch.bfloat16, "training", 32))
    emit(host_operators())
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
