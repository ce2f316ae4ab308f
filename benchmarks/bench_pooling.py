"""Fused pooling ops against the unfused PyTorch sequences they replace, in the same run.

    python -m pytest benchmarks/bench_pooling.py -k cpu --benchmark-json=pool_cpu.json
    python -m pytest benchmarks/bench_pooling.py -k cuda --benchmark-json=pool_cuda.json
    python benchmarks/ratios.py pool_cpu.json          # speedups (the convention of ratios.py)
    python benchmarks/pooling_ratios.py pool_cuda.json # speedups, bandwidth, share of copy bandwidth

Cases: frame_pool on ResNet-18 maps [B*T, 512, 7, 7] (B*T in 256, 1024, 4096; avg and max;
contiguous and channels_last; float32, and bfloat16 at 1024 frames on the CPU), forward and
forward + backward; temporal_pool on LSTM outputs [T=64, B=32, D=1024] with lengths (a length of
1, a full length, the rest random), every mode; and the cost of one call of each op on tiny inputs
(forward, and forward + backward), which is host time.
The baseline is cnnlstm_ext.reference, the unfused PyTorch sequence.

One pytest-benchmark group per case, ``extra_info["impl"]`` = "baseline" | "fused" (the convention
of benchmarks/ratios.py); the baseline runs first, and the fused entry records
``speedup_vs_baseline`` (median over median). A CUDA round is CUDA_LOOP calls and one
synchronisation (both implementations alike), so launch-bound cases are not timed as
synchronisation latency. CUDA fused entries also record the bandwidth they reach counting bytes
read and written once (``GBps``) and its share of the card's copy bandwidth, measured in the same
session (``copy_fraction``). Goals (issue): CPU >= 1.5x; GPU >= 2x and >= 85% of copy bandwidth.
"""
import pytest
import torch

import cnnlstm_ext
from cnnlstm_ext import ops, reference

REQUIRES_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

IMPLS = ["baseline", "fused"]  # baseline first: the fused entry records the ratio against it
IMPL_FN = {
    "frame": {"baseline": reference.frame_pool, "fused": ops.frame_pool},
    "temporal": {"baseline": reference.temporal_pool, "fused": ops.temporal_pool},
}
FRAMES = [256, 1024, 4096]  # B*T of ResNet-18 maps [B*T, 512, 7, 7]; T = 16
SEQ_T, SEQ_B, SEQ_D = 64, 32, 1024  # LSTM outputs [T, B, D]
CUDA_LOOP = 20  # calls per timed CUDA round

_baseline_median = {}  # group -> median seconds per round of this session's baseline


def run_case(benchmark, group, impl, step, device, bytes_moved=None, copy_bandwidth=None):
    """Times step (one call) with pytest-benchmark and records the comparison in extra_info."""
    if device == "cuda":
        call = step

        def step():
            for _ in range(CUDA_LOOP):
                call()
            torch.cuda.synchronize()
    benchmark.group = group
    info = benchmark.extra_info
    info["impl"] = impl
    info["device"] = (torch.cuda.get_device_name() if device == "cuda"
                      else "cpu, %d threads" % torch.get_num_threads())
    info["calls_per_round"] = CUDA_LOOP if device == "cuda" else 1
    step()  # warm-up: allocator, caches, lazy initialisation
    benchmark(step)
    median = benchmark.stats.stats.median
    if impl == "baseline":
        _baseline_median[group] = median
    elif group in _baseline_median:
        info["speedup_vs_baseline"] = round(_baseline_median[group] / median, 3)
    if impl == "fused" and bytes_moved is not None:
        per_call = median / info["calls_per_round"]
        info["GBps"] = round(bytes_moved / per_call / 1e9, 1)
        if copy_bandwidth is not None:
            info["copy_GBps"] = round(copy_bandwidth / 1e9, 1)
            info["copy_fraction"] = round(bytes_moved / per_call / copy_bandwidth, 3)


@pytest.fixture(scope="session")
def cuda_copy_bandwidth():
    """Bytes read + written per second by a large device-to-device copy on this card."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * (1 << 28) * 4 / best


def resnet_maps(frames, dtype, device, layout, requires_grad=False):
    x = torch.randn(frames, 512, 7, 7, dtype=dtype, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


def frame_pool_bytes(x, mode, out_dtype=None, backward=False):
    """Bytes the fused op reads and writes once: maps in, features out (+ arg-max indices)."""
    n, c = x.shape[:2]
    out_size = torch.empty((), dtype=out_dtype or x.dtype).element_size()
    once = x.numel() * x.element_size() + n * c * out_size + (n * c * 4 if mode == "max" else 0)
    return 2 * once if backward else once  # backward: the same traffic, in reverse


def frame_forward(impl, frames, mode, dtype, device, layout, out_dtype=None):
    x = resnet_maps(frames, dtype, device, layout)
    fn, batch = IMPL_FN["frame"][impl], frames // 16
    return (lambda: fn(x, batch, mode, False, out_dtype)), frame_pool_bytes(x, mode, out_dtype)


def frame_training(impl, frames, mode, dtype, device, layout):
    x = resnet_maps(frames, dtype, device, layout, requires_grad=True)
    fn, batch = IMPL_FN["frame"][impl], frames // 16
    grad = torch.randn(16, batch, 512, dtype=dtype, device=device)

    def step():
        x.grad = None
        fn(x, batch, mode).backward(grad)
    return step, frame_pool_bytes(x, mode, backward=True)


def sequence_lengths(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, SEQ_T + 1, (SEQ_B,), generator=g)
    lengths[0], lengths[1] = 1, SEQ_T
    return lengths.to(device)


def temporal_inputs(mode, device, requires_grad=False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SEQ_T, SEQ_B, SEQ_D, generator=g).to(device).requires_grad_(requires_grad)
    kw = {"mode": mode, "bidirectional": mode == "last"}
    if mode == "attention":
        w = torch.randn(1, SEQ_D, generator=g) / SEQ_D ** 0.5
        kw["score_weight"] = w.to(device).requires_grad_(requires_grad)
        kw["score_bias"] = torch.zeros(1, device=device).requires_grad_(requires_grad)
    return x, kw


def temporal_bytes(x, lengths):
    # The fused op reads only the valid steps: count those and the [B, D] output.
    per_step = x.shape[2] * x.element_size()
    steps = x.shape[0] * x.shape[1] if lengths is None else int(lengths.sum())
    return steps * per_step + x.shape[1] * per_step


# --- frame pooling --------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("frames", FRAMES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_frame_pool_cpu(benchmark, mode, layout, frames, impl):
    step, nbytes = frame_forward(impl, frames, mode, torch.float32, "cpu", layout)
    run_case(benchmark, "frame_pool cpu %s %s %d" % (mode, layout, frames), impl, step, "cpu", nbytes)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_frame_pool_bf16_cpu(benchmark, mode, layout, impl):
    # bfloat16 maps (a CNN run under CPU autocast), the features kept in bfloat16.
    step, nbytes = frame_forward(impl, 1024, mode, torch.bfloat16, "cpu", layout)
    run_case(benchmark, "frame_pool cpu bf16 %s %s 1024" % (mode, layout), impl, step, "cpu", nbytes)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_frame_pool_training_cpu(benchmark, mode, impl):
    step, nbytes = frame_training(impl, 1024, mode, torch.float32, "cpu", "contiguous")
    run_case(benchmark, "frame_pool cpu training %s contiguous 1024" % mode, impl, step, "cpu", nbytes)


@REQUIRES_CUDA
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("frames", FRAMES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_frame_pool_cuda(benchmark, cuda_copy_bandwidth, dtype, mode, layout, frames, impl):
    step, nbytes = frame_forward(impl, frames, mode, dtype, "cuda", layout)
    group = "frame_pool cuda %s %s %s %d" % (str(dtype)[6:], mode, layout, frames)
    run_case(benchmark, group, impl, step, "cuda", nbytes, cuda_copy_bandwidth)


@REQUIRES_CUDA
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("frames", FRAMES)
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_frame_pool_tile_cuda(benchmark, cuda_copy_bandwidth, dtype, mode, frames, impl):
    # The other kernel for contiguous maps (backends.frame_pool.kernel = "tile": one block per
    # tile), against the same baseline as the default pipelined kernel's rows of
    # test_frame_pool_cuda.
    with cnnlstm_ext.backends.flags(frame_pool_kernel="tile"):
        step, nbytes = frame_forward(impl, frames, mode, dtype, "cuda", "contiguous")
        group = "frame_pool cuda %s %s contiguous %d tile" % (str(dtype)[6:], mode, frames)
        run_case(benchmark, group, impl, step, "cuda", nbytes, cuda_copy_bandwidth)


@REQUIRES_CUDA
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("frames", FRAMES)
def test_frame_pool_bf16_to_fp32_cuda(benchmark, cuda_copy_bandwidth, frames, impl):
    # Mixed precision: bf16 CNN maps, float32 LSTM input (the cast is part of both sides).
    step, nbytes = frame_forward(impl, frames, "avg", torch.bfloat16, "cuda", "channels_last",
                                 out_dtype=torch.float32)
    group = "frame_pool cuda bf16->fp32 avg channels_last %d" % frames
    run_case(benchmark, group, impl, step, "cuda", nbytes, cuda_copy_bandwidth)


@REQUIRES_CUDA
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_frame_pool_training_cuda(benchmark, cuda_copy_bandwidth, mode, layout, impl):
    step, nbytes = frame_training(impl, 4096, mode, torch.bfloat16, "cuda", layout)
    group = "frame_pool cuda training bf16 %s %s 4096" % (mode, layout)
    run_case(benchmark, group, impl, step, "cuda", nbytes, cuda_copy_bandwidth)


# --- temporal pooling -----------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["mean", "max", "last", "attention"])
def test_temporal_pool_cpu(benchmark, mode, impl):
    x, kw = temporal_inputs(mode, "cpu")
    lengths, fn = sequence_lengths("cpu"), IMPL_FN["temporal"][impl]
    run_case(benchmark, "temporal_pool cpu %s" % mode, impl, lambda: fn(x, lengths, **kw), "cpu",
             temporal_bytes(x, lengths))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["mean", "max", "last", "attention"])
def test_temporal_pool_training_cpu(benchmark, mode, impl):
    x, kw = temporal_inputs(mode, "cpu", requires_grad=True)
    lengths, fn = sequence_lengths("cpu"), IMPL_FN["temporal"][impl]
    grad = torch.randn(SEQ_B, SEQ_D)

    def step():
        x.grad = None
        fn(x, lengths, **kw).backward(grad)
    run_case(benchmark, "temporal_pool cpu training %s" % mode, impl, step, "cpu")


@REQUIRES_CUDA
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lengths_on", ["cuda", "cpu", "none"])
@pytest.mark.parametrize("mode", ["mean", "max", "last", "attention"])
def test_temporal_pool_cuda(benchmark, cuda_copy_bandwidth, mode, lengths_on, impl):
    # With lengths on the GPU the fused op reads them back once to validate them (one
    # synchronisation per call); on the CPU (as a DataLoader yields them) they are checked there
    # and copied without waiting; "none" (every sequence full) shows the kernels alone.
    x, kw = temporal_inputs(mode, "cuda")
    lengths = None if lengths_on == "none" else sequence_lengths(lengths_on)
    fn = IMPL_FN["temporal"][impl]
    group = "temporal_pool cuda %s lengths=%s" % (mode, lengths_on)
    run_case(benchmark, group, impl, lambda: fn(x, lengths, **kw), "cuda", temporal_bytes(x, lengths),
             cuda_copy_bandwidth)


@REQUIRES_CUDA
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lengths_on", ["cuda", "cpu"])
@pytest.mark.parametrize("mode", ["mean", "max", "last", "attention"])
def test_temporal_pool_training_cuda(benchmark, mode, lengths_on, impl):
    x, kw = temporal_inputs(mode, "cuda", requires_grad=True)
    lengths, fn = sequence_lengths(lengths_on), IMPL_FN["temporal"][impl]
    grad = torch.randn(SEQ_B, SEQ_D, device="cuda")

    def step():
        x.grad = None
        fn(x, lengths, **kw).backward(grad)
    group = "temporal_pool cuda training %s lengths=%s" % (mode, lengths_on)
    run_case(benchmark, group, impl, step, "cuda")


# --- cost of a call -------------------------------------------------------------------------------
# Tiny inputs (maps [32, 64, 2, 2] with T = 16, LSTM outputs [16, 2, 64]): the kernels take next to
# no time, so these cases time what a call costs the host (argument checks, dispatch, autograd,
# allocation, launch). On a GPU that cost, not the kernel, bounds the 256-frame cases above.

def tiny_call(op, train, impl, device):
    g = torch.Generator().manual_seed(2)
    if op == "frame":
        x = torch.randn(32, 64, 2, 2, generator=g).to(device).requires_grad_(train)
        args, grad = (2,), torch.randn(16, 2, 64, generator=g).to(device)
    else:
        x = torch.randn(16, 2, 64, generator=g).to(device).requires_grad_(train)
        args, grad = (torch.tensor([16, 5], device=device),), torch.randn(2, 64, generator=g).to(device)
    fn = IMPL_FN[op][impl]
    if not train:
        return lambda: fn(x, *args)

    def step():
        x.grad = None
        fn(x, *args).backward(grad)
    return step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=REQUIRES_CUDA)])
@pytest.mark.parametrize("train", [False, True], ids=["forward", "training"])
@pytest.mark.parametrize("op", ["frame", "temporal"])
def test_pool_call_cost(benchmark, op, train, device, impl):
    group = "%s_pool %s call cost %s" % (op, device, "training" if train else "forward")
    run_case(benchmark, group, impl, tiny_call(op, train, impl, device), device)
