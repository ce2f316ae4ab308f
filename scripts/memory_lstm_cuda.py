"""What is allocated at the peak of one LSTM training call on a GPU: FusedLSTM against nn.LSTM.

Records the CUDA caching allocator's history over one forward + backward (after warm-up calls),
replays it to the moment of the peak allocation, and prints the blocks alive then (above what was
allocated before the call), largest first, with the Python line that allocated each. This is the
peak `benchmarks/bench_lstm_cuda.py` reports as "fused/cuDNN MiB".

    python3 scripts/memory_lstm_cuda.py [--dtype bfloat16] [--batch 128] [--steps 64] [--out FILE]
"""
import argparse
import os
import sys
from collections import defaultdict

import torch

# The benchmark's own call, so that the peak traced here is the one it reports.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from bench_lstm_cuda import INPUT, LAYERS, make_step  # noqa: E402


def where(frames):
    """The innermost frame in this project or in torch.nn/autograd, as file:line function."""
    for f in frames:
        name = f.get("filename", "")
        if "cnnlstm_ext" in name or "benchmarks/" in name or "torch/nn" in name or "autograd" in name:
            return f"{name.split('/')[-1]}:{f.get('line')} {f.get('name')}"
    return frames[0].get("name", "?") if frames else "?"


def live_at_peak(call):
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
    call()
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snapshot["device_traces"][torch.cuda.current_device()]
    live, total, peak, at_peak = {}, 0, 0, {}
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif event["action"] == "free_requested" and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
    by_site = defaultdict(lambda: [0, 0])
    for event in at_peak.values():
        site = by_site[where(event.get("frames", []))]
        site[0] += event["size"]
        site[1] += 1
    return peak, sorted(by_site.items(), key=lambda kv: -kv[1][0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--out", help="also write the report to this file")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}; training call, "
             f"{args.dtype} B={args.batch} T={args.steps}, I=H={INPUT}, {LAYERS} layers, bidirectional"]
    for impl in ("cudnn", "fused"):
        step = make_step("fused" if impl == "fused" else "baseline", "training", dtype,
                         args.batch, args.steps)
        peak, sites = live_at_peak(step)
        lines.append(f"\n== {impl}: {peak / 2**20:.1f} MiB allocated during the call at its peak")
        for site, (size, count) in sites[:12]:
            lines.append(f"  {size / 2**20:8.1f} MiB in {count:3d} blocks  {site}")
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
