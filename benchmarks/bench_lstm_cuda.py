"""FusedLSTM against torch.nn.LSTM (cuDNN) on one GPU, in the same run.

    python -m pytest benchmarks/bench_lstm_cuda.py --benchmark-json=lstm_cuda.json
    python benchmarks/ratios.py lstm_cuda.json

Shape: I = H = 512, 3 layers, bidirectional (the CNN-LSTM's temporal model); B in {1, 8, 32, 128},
T in {16, 32, 64}; float32 and bfloat16; ``inference`` (forward under no_grad) and ``training``
(forward + backward with a fixed random output gradient, parameter gradients freed between calls).
Each timed call ends with torch.cuda.synchronize(). Torch's TF32 flags are left at their defaults
and recorded.

One pytest-benchmark group per (dtype, case, B, T), ``extra_info["impl"]`` = "baseline" | "fused"
(the convention of benchmarks/ratios.py). ``extra_info["peak_bytes"]``: torch.cuda's peak
allocation of one call above what was allocated before it. The fused entry also records
``speedup_vs_baseline`` and ``memory_vs_baseline`` of the same run. The baseline entries record
the cuDNN version and whether nn.LSTM really ran cuDNN in bfloat16 (a profiler pass looks for
aten::_cudnn_rnn and cuDNN's RNN kernels). CNNLSTM_EXT_LSTM_PATH=persistent|stepwise forces the
fused recurrence path; it is recorded too.
"""

import pytest
import torch
from torch import nn

import cnnlstm_ext
from cnnlstm_ext import FusedLSTM

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and cnnlstm_ext.cuda_kernels_built()),
    reason="needs a CUDA GPU and cnnlstm_ext built with its CUDA kernels")

INPUT = HIDDEN = 512
LAYERS = 3
BATCHES = [1, 8, 32, 128]
STEPS = [16, 32, 64]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CASES = ["inference", "training"]
IMPLS = ["baseline", "fused"]  # baseline first: the fused entry records the ratio against it

_baseline = {}  # group -> (median s, peak bytes) of this session's baseline run


def lstm_and_inputs(impl: str, case: str, dtype: torch.dtype, batch: int, steps: int,
                    seed: int = 0):
    """The LSTM of one benchmark (fused or cuDNN's, weights from `seed`), its input
    x: [T, B, I] (requiring grad for training) and a fixed output gradient [T, B, 2H]."""
    torch.manual_seed(seed)
    cls = FusedLSTM if impl == "fused" else nn.LSTM
    model = cls(INPUT, HIDDEN, LAYERS, bidirectional=True, device="cuda", dtype=dtype)
    x = torch.randn(steps, batch, INPUT, device="cuda", dtype=dtype,
                    requires_grad=case == "training")
    grad_out = torch.randn(steps, batch, 2 * HIDDEN, device="cuda", dtype=dtype)
    return model, x, grad_out


def make_step(impl: str, case: str, dtype: torch.dtype, batch: int, steps: int, seed: int = 0):
    """The timed call for one benchmark: x: [T, B, I] on the GPU, weights from `seed`."""
    model, x, grad_out = lstm_and_inputs(impl, case, dtype, batch, steps, seed)
    if case == "inference":
        model.eval()

        def step():
            with torch.no_grad():
                model(x)
            torch.cuda.synchronize()
    else:
        def step():
            out, _ = model(x)
            out.backward(grad_out)
            model.zero_grad(set_to_none=True)
            x.grad = None
            torch.cuda.synchronize()
    return step


def peak_bytes(step) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    return torch.cuda.max_memory_allocated() - base


@pytest.fixture(scope="module")
def cudnn_info():
    """cuDNN's version and what nn.LSTM ran in bfloat16 (one profiled forward + backward)."""
    from torch.profiler import ProfilerActivity, profile

    step = make_step("baseline", "training", torch.bfloat16, 8, 16)
    step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
    names = {e.name for e in prof.events()}
    rnn_kernels = sorted(n for n in names
                         if not n.startswith("aten::") and
                         any(k in n.lower() for k in ("cudnn", "rnn", "lstm")))
    return {
        "cudnn_version": torch.backends.cudnn.version(),
        "cudnn_enabled": torch.backends.cudnn.enabled,
        "nn_lstm_bf16_ran_cudnn": "aten::_cudnn_rnn" in names,
        "nn_lstm_bf16_rnn_kernels": rnn_kernels[:12],
    }


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("steps", STEPS, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_lstm_cuda(benchmark, cudnn_info, dtype_name, case, batch, steps, impl):
    dtype = DTYPES[dtype_name]
    step = make_step(impl, case, dtype, batch, steps)
    group = f"lstm_cuda:{dtype_name}:{case}:B{batch}:T{steps}"
    benchmark.group = group
    benchmark.extra_info.update({
        "impl": impl, "case": case, "dtype": dtype_name, "batch": batch, "steps": steps,
        "input_size": INPUT, "hidden_size": HIDDEN, "num_layers": LAYERS, "bidirectional": True,
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    })
    if impl == "fused":
        benchmark.extra_info["fused_path"] = cnnlstm_ext.backends.lstm.path
    else:
        benchmark.extra_info.update(cudnn_info)
    benchmark.pedantic(step, rounds=30, iterations=1, warmup_rounds=3)
    peak = peak_bytes(step)
    benchmark.extra_info["peak_bytes"] = peak
    median = benchmark.stats.stats.median
    if impl == "baseline":
        _baseline[group] = (median, peak)
    elif group in _baseline:
        base_median, base_peak = _baseline[group]
        benchmark.extra_info["speedup_vs_baseline"] = base_median / median
        benchmark.extra_info["memory_vs_baseline"] = peak / base_peak if base_peak else None


# The recurrence variants of the fused op against the same baseline, T=32: the persistent kernel
# with its tensor-core product (16-bit) or its FMA product, and the per-step path. Their
# crossover in B is what backends.lstm.persistent_max_batch's default rests on. Values: keywords
# of cnnlstm_ext.backends.flags.
VARIANTS = {
    "baseline": {},
    "fused-persistent-mma": {"lstm_path": "persistent", "lstm_mma": True},
    "fused-persistent-fma": {"lstm_path": "persistent", "lstm_mma": False},
    "fused-persistent-fma-tagged": {"lstm_path": "persistent", "lstm_mma": False,
                                    "lstm_exchange": "tagged"},
    "fused-stepwise": {"lstm_path": "stepwise"},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_lstm_cuda_paths(benchmark, dtype_name, case, batch, variant):
    if dtype_name == "float32" and variant == "fused-persistent-fma":
        pytest.skip("float32 always uses the FMA product")
    with cnnlstm_ext.backends.flags(**VARIANTS[variant]):
        _time_path(benchmark, dtype_name, case, batch, variant)


def _time_path(benchmark, dtype_name, case, batch, variant):
    impl = "baseline" if variant == "baseline" else "fused"
    dtype, steps = DTYPES[dtype_name], 32
    step = make_step(impl, case, dtype, batch, steps)
    benchmark.group = f"lstm_cuda_paths:{dtype_name}:{case}:B{batch}:T{steps}"
    benchmark.extra_info.update({"impl": impl, "variant": variant, "case": case,
                                 "dtype": dtype_name, "batch": batch, "steps": steps,
                                 "gpu": torch.cuda.get_device_name()})
    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=3)
    benchmark.extra_info["peak_bytes"] = peak_bytes(step)


# Host running ahead of the GPU, as inside a training step: CALLS calls are queued back to back and
# the device is synchronised once, so launch gaps between an implementation's kernels are hidden
# and the figure is closer to its kernels' own time (per call).
CALLS = 10


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", [8, 32], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_lstm_cuda_pipelined(benchmark, dtype_name, case, batch, impl):
    steps = 32
    model, x, grad_out = lstm_and_inputs(impl, case, DTYPES[dtype_name], batch, steps)

    def calls():
        for _ in range(CALLS):
            if case == "inference":
                with torch.no_grad():
                    model(x)
            else:
                out, _ = model(x)
                out.backward(grad_out)
        torch.cuda.synchronize()

    benchmark.group = f"lstm_cuda_pipelined:{dtype_name}:{case}:B{batch}:T{steps}"
    benchmark.extra_info.update({"impl": impl, "case": case, "dtype": dtype_name, "batch": batch,
                                 "steps": steps, "calls_per_round": CALLS,
                                 "gpu": torch.cuda.get_device_name()})
    benchmark.pedantic(calls, rounds=10, iterations=1, warmup_rounds=2)


# Both implementations replayed from a CUDA graph: no host time on either side, so the figure is
# the kernels' own time (and the gaps between them). One round is one replay and a synchronisation.
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", [1, 8, 32], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_lstm_cuda_graphed(benchmark, dtype_name, case, batch, impl):
    steps = 32
    model, x, grad_out = lstm_and_inputs(impl, case, DTYPES[dtype_name], batch, steps)

    def call():
        if case == "inference":
            with torch.no_grad():
                model(x)
        else:
            model.zero_grad(set_to_none=True)
            x.grad = None
            model(x)[0].backward(grad_out)

    side = torch.cuda.Stream()  # warm-up off the capture stream, as torch.cuda.graphs asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()

    def replay():
        graph.replay()
        torch.cuda.synchronize()

    benchmark.group = f"lstm_cuda_graphed:{dtype_name}:{case}:B{batch}:T{steps}"
    benchmark.extra_info.update({"impl": impl, "case": case, "dtype": dtype_name, "batch": batch,
                                 "steps": steps, "gpu": torch.cuda.get_device_name()})
    benchmark.pedantic(replay, rounds=30, iterations=1, warmup_rounds=3)


# float32 at the same precision on both sides. By default cuDNN may use TF32 for nn.LSTM
# (torch.backends.cudnn.allow_tf32 is True) while the fused op's GEMMs follow
# torch.backends.cuda.matmul.allow_tf32 (False) and its persistent recurrence is exact float32, so
# the default grid compares TF32 with float32 where the stepwise path runs (B > 32). Here both
# flags are set together: "exact" (both off) and "tf32" (both on).
PRECISIONS = {"exact": False, "tf32": True}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", [32, 128], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_lstm_cuda_fp32_precision(benchmark, monkeypatch, precision, case, batch, impl):
    allow = PRECISIONS[precision]
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow)
    steps = 32
    step = make_step(impl, case, torch.float32, batch, steps)
    group = f"lstm_cuda_fp32_{precision}:{case}:B{batch}:T{steps}"
    benchmark.group = group
    benchmark.extra_info.update({"impl": impl, "case": case, "dtype": "float32",
                                 "precision": precision, "batch": batch, "steps": steps,
                                 "matmul_allow_tf32": allow, "cudnn_allow_tf32": allow,
                                 "gpu": torch.cuda.get_device_name()})
    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=3)
    benchmark.extra_info["peak_bytes"] = peak_bytes(step)
