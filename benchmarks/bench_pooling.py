"""Fused pooling ops against the unfused PyTorch sequences they replace, in the same run.

Each benchmark times the fused op with pytest-benchmark; before every round, the unfused sequence
(cnnlstm_ext.reference) runs once, timed the same way, so both see the same machine state. The
ratio unfused/fused (best round of each) goes to extra_info["speedup"]; CUDA cases also record the
achieved bandwidth (bytes read + written once) and its fraction of the card's copy bandwidth
measured in the same session (extra_info["copy_fraction"]).

    python -m pytest benchmarks/bench_pooling.py -k cpu --benchmark-json=pool.json
    python -m pytest benchmarks/bench_pooling.py -k cuda --benchmark-json=pool_cuda.json
    python benchmarks/pooling_ratios.py pool.json

Goals (issue): CPU >= 1.5x; GPU >= 2x and >= 85% of the copy bandwidth.
"""
import time

import pytest
import torch

from cnnlstm_ext import ops, reference

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FRAMES = [256, 1024, 4096]  # B*T of ResNet-18 maps [B*T, 512, 7, 7]
SEQ_T, SEQ_B, SEQ_D = 64, 32, 1024  # LSTM outputs [T, B, D]
CPU_ROUNDS = 5
CUDA_ROUNDS = 20
CUDA_LOOP = 20  # op calls per timed CUDA round (then one synchronisation)


def _timed(fn, device):
    """fn made into one timed unit: on CUDA, CUDA_LOOP calls and a synchronisation."""
    if device == "cpu":
        return fn

    def run():
        for _ in range(CUDA_LOOP):
            fn()
        torch.cuda.synchronize()
    return run


def compare(benchmark, fused, unfused, device, bytes_moved=None, copy_bandwidth=None):
    fused_run, unfused_run = _timed(fused, device), _timed(unfused, device)
    calls = 1 if device == "cpu" else CUDA_LOOP
    unfused_times = []

    def time_unfused():  # runs before each timed round of the fused op
        start = time.perf_counter()
        unfused_run()
        unfused_times.append(time.perf_counter() - start)

    unfused_run()  # warm-up (allocator, caches, lazy init)
    rounds = CPU_ROUNDS if device == "cpu" else CUDA_ROUNDS
    benchmark.pedantic(fused_run, setup=time_unfused, rounds=rounds, warmup_rounds=1)
    fused_s = benchmark.stats.stats.min / calls
    unfused_s = min(unfused_times) / calls
    info = benchmark.extra_info
    info["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu (%d threads)" % torch.get_num_threads()
    info["fused_ms"] = round(fused_s * 1e3, 4)
    info["unfused_ms"] = round(unfused_s * 1e3, 4)
    info["speedup"] = round(unfused_s / fused_s, 3)
    if bytes_moved is not None:
        info["fused_GBps"] = round(bytes_moved / fused_s / 1e9, 1)
        if copy_bandwidth is not None:
            info["copy_GBps"] = round(copy_bandwidth / 1e9, 1)
            info["copy_fraction"] = round(bytes_moved / fused_s / copy_bandwidth, 3)


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
    return 2 * src.numel() * src.element_size() / best


def resnet_maps(frames, dtype, device, layout):
    x = torch.randn(frames, 512, 7, 7, dtype=dtype, device=device)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def frame_pool_bytes(x, mode, out_dtype=None):
    n, c = x.shape[:2]
    out_size = torch.empty((), dtype=out_dtype or x.dtype).element_size()
    return x.numel() * x.element_size() + n * c * out_size + (n * c * 4 if mode == "max" else 0)


def sequence_lengths(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, SEQ_T + 1, (SEQ_B,), generator=g)
    lengths[0], lengths[1] = 1, SEQ_T
    return lengths.to(device)


# --- frame pooling, forward ------------------------------------------------------------------

@pytest.mark.parametrize("frames", FRAMES)
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_frame_pool_cpu(benchmark, frames, mode, layout):
    x = resnet_maps(frames, torch.float32, "cpu", layout)
    batch = frames // 16
    benchmark.group = "frame_pool cpu %s %s" % (mode, layout)
    compare(benchmark, lambda: ops.frame_pool(x, batch, mode),
            lambda: reference.frame_pool(x, batch, mode), "cpu", frame_pool_bytes(x, mode))


@CUDA
@pytest.mark.parametrize("frames", FRAMES)
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_frame_pool_cuda(benchmark, cuda_copy_bandwidth, frames, mode, layout, dtype):
    x = resnet_maps(frames, dtype, "cuda", layout)
    batch = frames // 16
    benchmark.group = "frame_pool cuda %s %s %s" % (mode, layout, dtype)
    compare(benchmark, lambda: ops.frame_pool(x, batch, mode),
            lambda: reference.frame_pool(x, batch, mode), "cuda", frame_pool_bytes(x, mode),
            cuda_copy_bandwidth)


@CUDA
@pytest.mark.parametrize("frames", FRAMES)
def test_frame_pool_cuda_bf16_to_fp32(benchmark, cuda_copy_bandwidth, frames):
    # Mixed precision: bf16 CNN maps, float32 LSTM input (the cast is part of both sides).
    x = resnet_maps(frames, torch.bfloat16, "cuda", "channels_last")
    batch = frames // 16
    benchmark.group = "frame_pool cuda avg bf16->fp32"
    compare(benchmark, lambda: ops.frame_pool(x, batch, "avg", out_dtype=torch.float32),
            lambda: reference.frame_pool(x, batch, "avg", out_dtype=torch.float32), "cuda",
            frame_pool_bytes(x, "avg", torch.float32), cuda_copy_bandwidth)


# --- frame pooling, forward + backward ---------------------------------------------------------

def _forward_backward(pool, x, grad):
    def step():
        x.grad = None
        pool(x).backward(grad)
    return step


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_frame_pool_train_step_cpu(benchmark, mode):
    frames, batch = 1024, 64
    x = resnet_maps(frames, torch.float32, "cpu", "contiguous").requires_grad_()
    grad = torch.randn(16, batch, 512)
    benchmark.group = "frame_pool cpu forward+backward"
    compare(benchmark, _forward_backward(lambda t: ops.frame_pool(t, batch, mode), x, grad),
            _forward_backward(lambda t: reference.frame_pool(t, batch, mode), x, grad), "cpu",
            2 * frame_pool_bytes(x, mode))


@CUDA
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_frame_pool_train_step_cuda(benchmark, cuda_copy_bandwidth, mode, layout):
    frames, batch = 4096, 256
    x = resnet_maps(frames, torch.bfloat16, "cuda", layout).requires_grad_()
    grad = torch.randn(16, batch, 512, device="cuda", dtype=torch.bfloat16)
    benchmark.group = "frame_pool cuda forward+backward bf16"
    compare(benchmark, _forward_backward(lambda t: ops.frame_pool(t, batch, mode), x, grad),
            _forward_backward(lambda t: reference.frame_pool(t, batch, mode), x, grad), "cuda",
            2 * frame_pool_bytes(x, mode), cuda_copy_bandwidth)


# --- temporal pooling ----------------------------------------------------------------------------

def _temporal_case(mode, device, dtype=torch.float32, requires_grad=False):
    x = torch.randn(SEQ_T, SEQ_B, SEQ_D, device=device, dtype=dtype, requires_grad=requires_grad)
    kw = {"mode": mode, "bidirectional": mode == "last"}
    if mode == "attention":
        kw["score_weight"] = (torch.randn(1, SEQ_D, device=device) / SEQ_D ** 0.5).requires_grad_(requires_grad)
        kw["score_bias"] = torch.zeros(1, device=device).requires_grad_(requires_grad)
    return x, sequence_lengths(device), kw


def _valid_bytes(x, lengths):
    # The fused op reads only the valid steps: count those (and the [B, D] output).
    per_step = x.shape[2] * x.element_size()
    steps = x.shape[0] * x.shape[1] if lengths is None else int(lengths.sum())
    return steps * per_step + x.shape[1] * per_step


@pytest.mark.parametrize("mode", ["mean", "max", "last", "attention"])
def test_temporal_pool_cpu(benchmark, mode):
    x, lengths, kw = _temporal_case(mode, "cpu")
    benchmark.group = "temporal_pool cpu [64, 32, 1024]"
    compare(benchmark, lambda: ops.temporal_pool(x, lengths, **kw),
            lambda: reference.temporal_pool(x, lengths, **kw), "cpu", _valid_bytes(x, lengths))


@CUDA
@pytest.mark.parametrize("mode", ["mean", "max", "last", "attention"])
@pytest.mark.parametrize("with_lengths", [True, False], ids=["lengths", "no_lengths"])
def test_temporal_pool_cuda(benchmark, cuda_copy_bandwidth, mode, with_lengths):
    # With lengths on the device, the fused op reads them back once to validate them (one
    # synchronisation per call); without lengths, it is launches only.
    x, lengths, kw = _temporal_case(mode, "cuda")
    if not with_lengths:
        lengths = None
    benchmark.group = "temporal_pool cuda [64, 32, 1024]"
    compare(benchmark, lambda: ops.temporal_pool(x, lengths, **kw),
            lambda: reference.temporal_pool(x, lengths, **kw), "cuda", _valid_bytes(x, lengths),
            cuda_copy_bandwidth)


def _temporal_step(pool, x, lengths, kw, grad):
    def step():
        x.grad = None
        pool(x, lengths, **kw).backward(grad)
    return step


@pytest.mark.parametrize("mode", ["mean", "max", "last", "attention"])
def test_temporal_pool_train_step_cpu(benchmark, mode):
    x, lengths, kw = _temporal_case(mode, "cpu", requires_grad=True)
    grad = torch.randn(SEQ_B, SEQ_D)
    benchmark.group = "temporal_pool cpu forward+backward"
    compare(benchmark, _temporal_step(ops.temporal_pool, x, lengths, kw, grad),
            _temporal_step(reference.temporal_pool, x, lengths, kw, grad), "cpu")


@CUDA
@pytest.mark.parametrize("mode", ["mean", "max", "last", "attention"])
def test_temporal_pool_train_step_cuda(benchmark, mode):
    x, lengths, kw = _temporal_case(mode, "cuda", requires_grad=True)
    grad = torch.randn(SEQ_B, SEQ_D, device="cuda")
    benchmark.group = "temporal_pool cuda forward+backward"
    compare(benchmark, _temporal_step(ops.temporal_pool, x, lengths, kw, grad),
            _temporal_step(reference.temporal_pool, x, lengths, kw, grad), "cuda")
