"""Runs every CUDA pooling kernel variant once, forward and backward, on small odd shapes, and
compares each result with the CPU kernels. Meant to run under compute-sanitizer:

    compute-sanitizer --tool memcheck python3 validation/sanitize_pooling.py
    compute-sanitizer --tool racecheck python3 validation/sanitize_pooling.py

Variants: frame_pool shared-memory tiles, one block per tile (backends.frame_pool.kernel "tile";
16-byte and element loads, one and several tiles per frame), the default pipelined tiles (blocks
looping over tiles), one warp per plane, channels_last (16-byte and element loads); temporal_pool
every mode, 16-byte and element accesses, batch-first, bidirectional "last". Exits non-zero on a
mismatch.
"""
import sys

import torch

import cnnlstm_ext
from cnnlstm_ext import ops


def check(name, cuda_result, cpu_result, atol):
    for got, want in zip(cuda_result, cpu_result):
        if got is None:
            continue
        if not torch.allclose(got.cpu().double(), want.double(), rtol=1e-3, atol=atol, equal_nan=True):
            err = (got.cpu().double() - want.double()).abs().max().item()
            print("MISMATCH %s: max abs error %g" % (name, err))
            return False
    return True


def run(fn, *tensors):
    """fn's output and the gradients of its inputs (those that require grad)."""
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    out = fn(*inputs)
    grad = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape).to(out)
    grads = torch.autograd.grad(out, [t for t in inputs if t.requires_grad], grad, allow_unused=True)
    return [out, *grads]


def main(device="cuda"):
    torch.manual_seed(0)
    ok = True
    frame_cases = [
        # (N, C, h, w, dtype, layout): tile kernel 16-byte and element loads, multi-tile, plane kernel
        (4, 16, 3, 5, torch.float32, "contiguous"),
        (4, 19, 7, 7, torch.float32, "contiguous"),
        (2, 300, 7, 7, torch.bfloat16, "contiguous"),
        (2, 5, 28, 30, torch.float32, "contiguous"),
        (4, 16, 3, 5, torch.bfloat16, "channels_last"),
        (4, 19, 7, 7, torch.float16, "channels_last"),
        (2, 300, 7, 7, torch.float64, "channels_last"),
    ]
    # The default pipelined kernel: contiguous maps whose C*h*w is a whole number of 16-byte
    # vectors; the last two have more tiles than its grid has blocks, so blocks loop.
    pipelined_cases = [
        (4, 16, 3, 5, torch.float32, "contiguous"),
        (1200, 8, 2, 2, torch.float32, "contiguous"),
        (1100, 16, 3, 3, torch.bfloat16, "contiguous"),
    ]
    for kernel, cases in (("tile", frame_cases), ("pipelined", pipelined_cases)):
        cnnlstm_ext.backends.frame_pool.kernel = kernel
        for n, c, h, w, dtype, layout in cases:
            x = torch.randn(n, c, h, w, dtype=dtype)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            for mode in ("avg", "max"):
                for out_dtype in (None, torch.float32):
                    fn = lambda t: ops.frame_pool(t, 2, mode, False, out_dtype)  # noqa: E731
                    name = "frame_pool %s %s %s %s out=%s %s" % ((n, c, h, w), dtype, layout, mode,
                                                                 out_dtype, kernel)
                    ok &= check(name, run(fn, x.to(device)), run(fn, x), atol=1e-2)
    cnnlstm_ext.backends.frame_pool.kernel = "pipelined"
    for d, dtype in ((37, torch.float32), (64, torch.float32), (64, torch.bfloat16), (64, torch.float64)):
        for batch_first in (False, True):
            x = torch.randn(9, 5, d, dtype=dtype)
            if batch_first:
                x = x.transpose(0, 1).contiguous()
            lengths = torch.tensor([1, 9, 4, 9, 2])
            w, bias = torch.randn(d, dtype=dtype) / d ** 0.5, torch.randn(1, dtype=dtype)
            for mode in ("mean", "max", "last", "attention"):
                for bidirectional in ((False, True) if mode == "last" and d % 2 == 0 else (False,)):
                    def fn(x_, w_, b_):
                        kw = {"score_weight": w_, "score_bias": b_} if mode == "attention" else {}
                        return ops.temporal_pool(x_, lengths.to(x_.device), mode, batch_first,
                                                 bidirectional, **kw)
                    name = "temporal_pool d=%d %s %s bf=%s bidir=%s" % (d, dtype, mode, batch_first,
                                                                        bidirectional)
                    ok &= check(name, run(fn, x.to(device), w.to(device), bias.to(device)), run(fn, x, w, bias),
                                atol=1e-2)
    if device == "cuda":
        torch.cuda.synchronize()
    print("pooling sanitizer workload:", "ok" if ok else "MISMATCHES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))  # optional argument: the device to compare with the CPU
