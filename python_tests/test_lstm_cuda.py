"""The fused LSTM on CUDA: parity with cuDNN's nn.LSTM and with the CPU kernels, opcheck,
reproducibility, autocast, torch.compile, long sequences, exact float32 and shapes too large to
keep on chip.

Every test carries the `cuda` marker (conftest skips them without a GPU and the CUDA kernels).
Accuracy follows the "at most 2x the reference's own error" rule: against a float64 CPU nn.LSTM on
the same rounded weights and inputs (the gold), the fused kernel's error may be at most twice that
of cuDNN in the same dtype (and of the CPU kernels), or a small floor for the dtype. TF32 is off in
every test (fixture below) but the one that checks it, so float32 means float32.
"""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import cnnlstm_ext
from conftest import (assert_compiled_matches_eager, assert_no_cuda_sync, captured,
                      low_precision_errors, low_precision_verdict)
from cnnlstm_ext import FusedBiLSTM, FusedLSTM, ops

pytestmark = pytest.mark.cuda

CUDA = "cuda"
# Error floors (relative to the gold's largest magnitude) for the 2x rule.
FLOOR = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.bfloat16, id="bfloat16"),
          pytest.param(torch.float16, id="float16")]
# The recurrence has two CUDA paths; backends.lstm.path forces one (csrc/lstm/lstm_cuda_plan.cuh).
# A forced persistent path that cannot plan is an error (test_lstm_cuda_paths.py), and every test
# that forces a path proves, through ops.recorded_kernels, that only that path ran.
PATHS = ["persistent", "stepwise"]
I, H, T, B = 24, 32, 9, 5  # H a multiple of 32 so the persistent path can take it; B not of 4


@pytest.fixture(autouse=True)
def exact_float32(no_tf32):
    """float32 GEMMs in float32 in every test of this file (conftest's no_tf32)."""


@pytest.fixture(params=PATHS)
def path(request):
    with cnnlstm_ext.backends.flags(lstm_path=request.param), ops.recorded_kernels() as ran:
        yield request.param
    recurrences = {name.split(":")[2] for name in ran if name.startswith("cuda:lstm_")}
    assert recurrences == {request.param}, f"forced {request.param}, ran {sorted(set(ran))}"


def randn(*shape, rng):
    return torch.randn(*shape, generator=rng, dtype=torch.float64)


def four_lstms(dtype, **kwargs):
    """FusedLSTM on CUDA in `dtype`, and with its weights: FusedLSTM on the CPU in `dtype`,
    cuDNN's nn.LSTM in `dtype`, and the gold nn.LSTM in float64 on the CPU."""
    fused = FusedLSTM(**kwargs, dtype=dtype, device=CUDA)
    cpu_fused = FusedLSTM(**kwargs, dtype=dtype)
    cudnn = nn.LSTM(**kwargs, dtype=dtype, device=CUDA)
    gold = nn.LSTM(**kwargs, dtype=torch.float64)
    for module in (cpu_fused, cudnn, gold):
        module.load_state_dict(fused.state_dict())
    return {"fused": fused, "cpu_fused": cpu_fused, "cudnn": cudnn, "gold": gold}


def run(module, x, hx, prepare, weights, rng):
    """Forward and backward of `module` on leaf copies of x, hx (moved to the module's device and
    dtype). The loss is a random projection of output, h_n, c_n (`weights`, filled on first use).
    Returns ({name: float64 CPU tensor} for outputs and every gradient, {name: dtype})."""
    p = next(module.parameters())
    leaf = lambda t: t.detach().to(p.device, p.dtype, copy=True).requires_grad_()  # noqa: E731
    leaves = {"input": leaf(x)}
    if hx is not None:
        leaves["h0"], leaves["c0"] = leaf(hx[0]), leaf(hx[1])
        hx = (leaves["h0"], leaves["c0"])
    out, (h_n, c_n) = module(prepare(leaves["input"]), hx)
    if isinstance(out, PackedSequence):
        out = out.data
    outs = {"output": out, "h_n": h_n, "c_n": c_n}
    for name, o in outs.items():
        if name not in weights:
            weights[name] = randn(*o.shape, rng=rng)
    loss = sum((o.double() * weights[n].to(o.device)).sum() for n, o in outs.items())
    leaves.update(module.named_parameters())
    grads = torch.autograd.grad(loss, list(leaves.values()))
    results = {n: o.detach().double().cpu() for n, o in outs.items()}
    results.update({f"grad of {n}": g.double().cpu() for n, g in zip(leaves, grads)})
    dtypes = {n: o.dtype for n, o in outs.items()}
    dtypes.update({f"grad of {n}": g.dtype for n, g in zip(leaves, grads)})
    return results, dtypes


def rel_err(a, gold):
    return ((a - gold).abs().max() / gold.abs().max().clamp_min(1e-12)).item()


def assert_within_2x(results, gold, refs, floor):
    """For every tensor: error(fused) <= max(2 * error(ref), floor) for each reference."""
    assert results.keys() == gold.keys()
    for name in gold:
        assert results[name].shape == gold[name].shape, name
        err = rel_err(results[name], gold[name])
        for ref_name, ref in refs.items():
            ref_err = rel_err(ref[name], gold[name])
            assert err <= max(2 * ref_err, floor), (
                f"{name}: fused CUDA error {err:.3e} exceeds max(2 x {ref_name} error {ref_err:.3e}, "
                f"floor {floor:.0e})")


def check_against_all(lstms, x, hx, dtype, rng, prepare=lambda t: t):
    """The fused CUDA module against the gold, cuDNN and the CPU kernels (2x rule), on inputs
    rounded to `dtype` once so that every module sees the same values."""
    x = x.to(dtype)
    hx = None if hx is None else tuple(t.to(dtype) for t in hx)
    weights = {}
    results = {name: run(module, x, hx, prepare, weights, rng) for name, module in lstms.items()}
    fused, dtypes = results["fused"]
    assert all(dt == dtype for dt in dtypes.values()), dtypes
    refs = {name: results[name][0] for name in ("cudnn", "cpu_fused")}
    assert_within_2x(fused, results["gold"][0], refs, FLOOR[dtype])


INPUTS = ["padded", "padded_hx_batch_first", "packed_unsorted_hx"]


@pytest.mark.parametrize("inputs", INPUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_cuda_matches_cudnn_and_cpu_kernels(num_layers, bidirectional, dtype, inputs, path, rng):
    batch_first = inputs == "padded_hx_batch_first"
    lstms = four_lstms(dtype, input_size=I, hidden_size=H, num_layers=num_layers,
                       bidirectional=bidirectional, batch_first=batch_first)
    x = randn(*((B, T, I) if batch_first else (T, B, I)), rng=rng)
    states = num_layers * (2 if bidirectional else 1)
    hx = None if inputs == "padded" else (randn(states, B, H, rng=rng), randn(states, B, H, rng=rng))
    prepare = lambda t: t  # noqa: E731
    if inputs == "packed_unsorted_hx":
        lengths = torch.tensor([4, T, 1, 7, 2])
        prepare = lambda t: pack_padded_sequence(t, lengths, enforce_sorted=False)  # noqa: E731
    check_against_all(lstms, x, hx, dtype, rng, prepare)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cudnn_unbatched(dtype, path, rng):
    # Unbatched input is B = 1 (the persistent kernel's single-row tile).
    lstms = four_lstms(dtype, input_size=I, hidden_size=H, num_layers=2, bidirectional=True)
    check_against_all(lstms, randn(T, I, rng=rng), (randn(4, H, rng=rng), randn(4, H, rng=rng)),
                      dtype, rng)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cudnn_without_bias(dtype, path, rng):
    lstms = four_lstms(dtype, input_size=I, hidden_size=H, num_layers=2, bidirectional=True,
                       bias=False)
    check_against_all(lstms, randn(T, B, I, rng=rng), None, dtype, rng)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cudnn_hidden_not_multiple_of_32(dtype, rng):
    # H = 20 cannot take the persistent path: automatic selection gives it to the stepwise path.
    lstms = four_lstms(dtype, input_size=13, hidden_size=20, num_layers=2, bidirectional=True)
    with ops.recorded_kernels() as ran:
        check_against_all(lstms, randn(T, 3, 13, rng=rng), None, dtype, rng)
    assert {n for n in ran if n.startswith("cuda:lstm_")} == {
        "cuda:lstm_forward:stepwise", "cuda:lstm_backward:stepwise"}


@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_cuda_low_precision_error_at_most_twice_float32_accumulation(dtype, bidirectional, path):
    """16-bit layers keep the README's promise (float32 sums and cell state): over T=40 steps the
    error against float64 is at most twice that of the float32-accumulating reference, forward and
    gradients, where an LSTM computed entirely in the 16-bit dtype fails the same rule."""
    torch.manual_seed(7)
    model = FusedLSTM(32, 32, 2, bidirectional=bidirectional, device=CUDA, dtype=dtype)
    errors = low_precision_errors(model, dtype, steps=40, batch=4, seed=11)
    assert low_precision_verdict(errors, "fused") == {}
    assert low_precision_verdict(errors, "all_low") != {}, "the rule does not bite"


@pytest.mark.parametrize("inputs", ["padded", "packed_unsorted"])
def test_cuda_float32_follows_cudnn_tf32_flag(inputs, path, rng, monkeypatch):
    """torch.backends.cudnn.allow_tf32 (nn.LSTM's flag on CUDA) on, the matmul flag off: the float32
    GEMMs run on TF32 tensor cores, so the error against float64 grows from float32's to TF32's
    and stays within 2x cuDNN's own error in that mode (or TF32's floor)."""
    lstms = four_lstms(torch.float32, input_size=I, hidden_size=H, num_layers=2, bidirectional=True)
    x = randn(T, B, I, rng=rng).float()
    prepare = lambda t: t  # noqa: E731
    if inputs == "packed_unsorted":
        lengths = torch.tensor([4, T, 1, 7, 2])
        prepare = lambda t: pack_padded_sequence(t, lengths, enforce_sorted=False)  # noqa: E731
    weights = {}
    gold, _ = run(lstms["gold"], x, None, prepare, weights, rng)
    exact, _ = run(lstms["fused"], x, None, prepare, weights, rng)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert not torch.backends.cuda.matmul.allow_tf32
    tf32, dtypes = run(lstms["fused"], x, None, prepare, weights, rng)
    cudnn_tf32, _ = run(lstms["cudnn"], x, None, prepare, weights, rng)
    assert all(dt == torch.float32 for dt in dtypes.values()), dtypes
    err_exact = max(rel_err(exact[n], gold[n]) for n in gold)
    err_tf32 = max(rel_err(tf32[n], gold[n]) for n in gold)
    assert err_exact < FLOOR[torch.float32], err_exact
    assert err_tf32 > 10 * err_exact, (err_tf32, err_exact)  # TF32 did run
    assert_within_2x(tf32, gold, {"cudnn (TF32)": cudnn_tf32}, floor=5e-3)


def test_cuda_lengths_keyword_equals_packing(path, rng):
    fused = FusedBiLSTM(I, H, num_layers=2, device=CUDA)
    x = randn(T, B, I, rng=rng).float().to(CUDA)
    lengths = torch.tensor([4, T, 1, 7, 2])
    out_l, (h_l, c_l) = fused(x, lengths=lengths.to(CUDA))
    out_p, (h_p, c_p) = fused(pack_padded_sequence(x, lengths, enforce_sorted=False))
    out_p, _ = nn.utils.rnn.pad_packed_sequence(out_p, total_length=T)
    torch.testing.assert_close(out_l, out_p, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h_l, h_p, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c_l, c_p, rtol=1e-6, atol=1e-6)
    for b, n in enumerate(lengths.tolist()):
        assert torch.count_nonzero(out_l[n:, b]) == 0  # padding is zero


def test_cuda_lengths_on_the_cpu_never_wait_for_the_gpu(path, rng):
    fused = FusedBiLSTM(I, H, num_layers=2, device=CUDA)
    x = randn(T, B, I, rng=rng).float().to(CUDA).requires_grad_()
    lengths = torch.tensor([4, T, 1, 7, 2])
    assert_no_cuda_sync(lambda: fused(x, lengths=lengths)[0].square().sum().backward())


def test_cuda_pinned_lengths_are_read_at_the_call(rng):
    # The GPU is kept busy so that the call's copies wait on the stream; a write to the pinned
    # lengths after the call must not reach them.
    fused = FusedBiLSTM(I, H, num_layers=2, device=CUDA)
    x = randn(T, B, I, rng=rng).float().to(CUDA)
    lengths = torch.tensor([4, T, 1, 7, 2])
    expected = fused(x, lengths=lengths)[0]
    pinned = lengths.pin_memory()
    torch.cuda._sleep(50_000_000)
    out = fused(x, lengths=pinned)[0]
    pinned.fill_(T)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_cuda_empty_batch_like_nn_lstm():
    # nn.LSTM's shapes (as on the CPU: test_lstm.py checks them against nn.LSTM there).
    fused = FusedBiLSTM(I, H, num_layers=2, device=CUDA)
    x = torch.randn(T, 0, I, device=CUDA, requires_grad=True)
    out, (h_n, c_n) = fused(x, lengths=torch.zeros(0, dtype=torch.long, device=CUDA))
    assert out.shape == (T, 0, 2 * H) and h_n.shape == c_n.shape == (4, 0, H)
    (out.sum() + h_n.sum() + c_n.sum()).backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and not p.grad.any() for p in fused.parameters())


# --- CUDA graphs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_cuda_graph_replay_matches_eager_inference(with_lengths, dtype, path, rng):
    fused = FusedBiLSTM(I, H, num_layers=2, device=CUDA, dtype=dtype).eval()
    x = randn(T, B, I, rng=rng).to(CUDA, dtype)  # static input: refilled before each replay
    lengths = torch.tensor([4, T, 1, 7, 2], device=CUDA) if with_lengths else None

    def forward():
        with torch.no_grad():
            out, (h_n, c_n) = fused(x, lengths=lengths)
        return out, h_n, c_n
    graph, static = captured(forward)
    for _ in range(2):  # new inputs each time: a replay that reused old values would differ
        x.copy_(randn(T, B, I, rng=rng))
        graph.replay()
        for name, got, want in zip(["out", "h_n", "c_n"], static, forward()):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    if with_lengths:
        assert torch.count_nonzero(static[0][1:, 2]) == 0  # padding after length 1 stays zero


def test_cuda_graph_replay_matches_eager_training(path, rng):
    fused = FusedBiLSTM(I, H, num_layers=2, device=CUDA)
    params = list(fused.parameters())
    x = randn(T, B, I, rng=rng).float().to(CUDA).requires_grad_()
    grad_out = randn(T, B, 2 * H, rng=rng).float().to(CUDA)

    def step():
        # .grad set to None before the backward: the captured backward allocates the gradients
        # from the graph's memory, and each replay rewrites them there.
        fused.zero_grad(set_to_none=True)
        x.grad = None
        out, _ = fused(x)
        out.backward(grad_out)
        return out
    graph, out = captured(step)
    with torch.no_grad():
        x.copy_(randn(T, B, I, rng=rng))
        grad_out.copy_(randn(T, B, 2 * H, rng=rng))
    graph.replay()
    got = [out] + [p.grad for p in params] + [x.grad]
    want_out, _ = fused(x)
    want = [want_out] + list(torch.autograd.grad(want_out, params + [x], grad_out))
    names = ["out"] + [n for n, _ in fused.named_parameters()] + ["x"]
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_cuda_graph_capture_refuses_lengths_on_the_cpu(rng):
    fused = FusedBiLSTM(I, H, device=CUDA).eval()
    x = randn(T, B, I, rng=rng).float().to(CUDA)
    with torch.no_grad():
        fused(x)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=r"lengths must already be on cuda.*got lengths on cpu"):
        with torch.cuda.graph(graph), torch.no_grad():
            fused(x, lengths=torch.tensor([4, T, 1, 7, 2]))


# --- ops ------------------------------------------------------------------------------------------

def op_args(D, with_bias, with_lengths, dtype, rng, requires_grad=True):
    """x, weights (per direction w_ih, w_hh (, b_ih, b_hh)), h0, c0, lengths for the raw op."""
    mk = lambda *s: randn(*s, rng=rng).mul(0.5).to(CUDA, dtype).requires_grad_(requires_grad)  # noqa: E731
    lengths = torch.tensor([T, 3, 1, 8, 5], device=CUDA) if with_lengths else None
    shapes = [(4 * H, I), (4 * H, H)] + ([(4 * H,), (4 * H,)] if with_bias else [])
    weights = [mk(*shape) for _ in range(D) for shape in shapes]
    return mk(T, B, I), weights, mk(D, B, H), mk(D, B, H), lengths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_cuda_op_forward_passes_opcheck(train, with_bias, with_lengths, dtype, path, rng):
    args = op_args(2, with_bias, with_lengths, dtype, rng, requires_grad=train)
    torch.library.opcheck(torch.ops.cnnlstm_ext.lstm_layer_forward, (*args, train))


@pytest.mark.parametrize("need_grad_x", [True, False], ids=["grad_x", "no_grad_x"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_cuda_op_backward_passes_opcheck(with_lengths, dtype, need_grad_x, path, rng):
    x, weights, h0, c0, lengths = op_args(2, True, with_lengths, dtype, rng, requires_grad=False)
    y, h_n, c_n, gates, cell = torch.ops.cnnlstm_ext.lstm_layer_forward(
        x, weights, h0, c0, lengths, True)
    grads = [randn(*t.shape, rng=rng).to(CUDA, dtype) for t in (y, h_n, c_n)]
    args = (*grads, x, weights, h0, c0, lengths, y, gates, cell)
    torch.library.opcheck(torch.ops.cnnlstm_ext.lstm_layer_backward, (*args, need_grad_x))
    if not need_grad_x:  # no input gradient, every other one as with it
        full = torch.ops.cnnlstm_ext.lstm_layer_backward(*args)
        skipped = torch.ops.cnnlstm_ext.lstm_layer_backward(*args, need_grad_x=False)
        assert skipped[0] is None and full[0].shape == x.shape
        for a, b in zip(full[1:], skipped[1:]):
            torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_cuda_float64_matches_or_raises_clearly(rng):
    # The CUDA kernels target float32/bfloat16/float16; float64 must either be exact or refuse.
    x, weights, h0, c0, lengths = op_args(2, True, True, torch.float32, rng)
    tensors = [t.detach().double().requires_grad_() for t in (x, *weights, h0, c0)]
    call = lambda ts, lengths: ops.lstm_layer(ts[0], ts[1:-2], ts[-2], ts[-1], lengths)  # noqa: E731
    try:
        got = call(tensors, lengths)
    except RuntimeError as e:
        assert "float64" in str(e) or "Double" in str(e), f"unclear error for float64: {e}"
        return
    cpu = [t.detach().cpu().requires_grad_() for t in tensors]
    want = call(cpu, lengths.cpu())
    for g, w in zip(got, want):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g.cpu(), w, rtol=1e-10, atol=1e-12)
    g_got = torch.autograd.grad(sum(o.sum() for o in got), tensors)
    g_want = torch.autograd.grad(sum(o.sum() for o in want), cpu)
    for g, w in zip(g_got, g_want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-10, atol=1e-10)


# --- reproducibility, autocast, compile -----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cuda_runs_are_bitwise_reproducible(dtype, path, rng):
    fused = FusedBiLSTM(64, 64, num_layers=2, device=CUDA, dtype=dtype)
    x = randn(16, 32, 64, rng=rng).to(CUDA, dtype)
    lengths = torch.randint(1, 17, (32,), generator=rng).to(CUDA)
    proj = randn(16, 32, 128, rng=rng).to(CUDA, dtype)

    def forward_backward():
        leaf = x.clone().requires_grad_()
        out, (h_n, c_n) = fused(leaf, lengths=lengths)
        grads = torch.autograd.grad((out * proj).sum() + h_n.sum() + c_n.sum(),
                                    [leaf, *fused.parameters()])
        return [out, h_n, c_n, *grads]

    first, second = forward_backward(), forward_backward()
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"result {i} differs between two identical runs"


def test_cuda_directions_are_stored_back_to_back_and_apart_again_on_the_cpu():
    """On a GPU each kind's directions share one buffer (as nn.LSTM's weights share cuDNN's),
    which the CUDA kernels view in place; back on the CPU each parameter has its own storage."""
    fused = FusedBiLSTM(I, H, num_layers=2).to(CUDA)
    for name in ("weight_ih_l0", "weight_hh_l1", "bias_ih_l1"):
        a, b = getattr(fused, name), getattr(fused, name + "_reverse")
        assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        assert b.storage_offset() == a.storage_offset() + a.numel()
    ptrs = [p.untyped_storage().data_ptr() for p in fused.cpu().parameters()]
    assert len(set(ptrs)) == len(ptrs)


def test_cuda_gradients_accumulate_over_backward_passes(path, rng):
    """Two identical backward passes leave exactly twice one pass's .grad (the kernels are
    deterministic): b_ih and b_hh get their own gradient memory, so the second addition to one
    does not reach the other."""
    fused = FusedBiLSTM(I, H, num_layers=2, device=CUDA)
    x = randn(T, B, I, rng=rng).float().to(CUDA)

    def backward():
        fused(x)[0].square().sum().backward()
    backward()
    once = [p.grad.clone() for p in fused.parameters()]
    backward()
    for (name, p), g in zip(fused.named_parameters(), once):
        assert torch.equal(p.grad, 2 * g), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_cuda_op_casts_weights_of_another_dtype(dtype, path, rng):
    """float32 weights with 16-bit activations (autocast's case) compute exactly as weights cast
    first (b_ih + b_hh summed in float32, then rounded); their gradients come back in float32."""
    x, weights, h0, c0, lengths = op_args(2, True, True, torch.float32, rng, requires_grad=False)
    x, h0, c0 = (t.to(dtype) for t in (x, h0, c0))
    master = [w.requires_grad_() for w in weights]
    rounded = []
    for d in range(2):
        w_ih, w_hh, b_ih, b_hh = (w.detach() for w in weights[4 * d:4 * d + 4])
        rounded += [w_ih.to(dtype), w_hh.to(dtype), (b_ih + b_hh).to(dtype),
                    torch.zeros_like(b_hh, dtype=dtype)]
    rounded = [w.requires_grad_() for w in rounded]
    got = ops.lstm_layer(x, master, h0, c0, lengths)
    want = ops.lstm_layer(x, rounded, h0, c0, lengths)
    for g, w in zip(got, want):
        assert g.dtype == dtype and torch.equal(g, w)
    proj = [randn(*t.shape, rng=rng).to(CUDA, dtype) for t in want]
    loss = lambda outs: sum((o * p).sum() for o, p in zip(outs, proj))  # noqa: E731
    for g, w in zip(torch.autograd.grad(loss(got), master),
                    torch.autograd.grad(loss(want), rounded)):
        assert g.dtype == torch.float32
        scale = w.float().abs().max().item()
        torch.testing.assert_close(g, w.float(), rtol=2e-2, atol=2e-2 * scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_cuda_autocast_matches_nn_lstm(dtype, path, rng):
    ref = nn.LSTM(I, H, num_layers=2, bidirectional=True, device=CUDA)
    fused = FusedLSTM(I, H, num_layers=2, bidirectional=True, device=CUDA)
    fused.load_state_dict(ref.state_dict())
    frame = nn.Linear(I, I, device=CUDA)
    x = randn(T, B, I, rng=rng).float().to(CUDA)
    proj = randn(T, B, 2 * H, rng=rng).float().to(CUDA)
    results = []
    for module in (ref, fused):
        with torch.autocast(CUDA, dtype=dtype):
            out, (h_n, c_n) = module(frame(x))
            loss = (out.float() * proj).sum() + h_n.float().sum() + c_n.float().sum()
        grads = torch.autograd.grad(loss, list(module.parameters()))
        results.append((out, h_n, c_n, grads))
    (r_out, r_h, r_c, r_grads), (f_out, f_h, f_c, f_grads) = results
    tol = 4e-2 if dtype == torch.bfloat16 else 8e-3
    for name, f, r in (("output", f_out, r_out), ("h_n", f_h, r_h), ("c_n", f_c, r_c)):
        # nn.LSTM's own result dtype under autocast depends on torch's version (some versions run
        # cuDNN's RNN in float16 whatever the autocast dtype), so only its values are compared.
        assert f.dtype == dtype, (name, f.dtype)
        assert rel_err(f.double(), r.double()) <= tol, name
    for (name, _), f, r in zip(fused.named_parameters(), f_grads, r_grads):
        assert f.dtype == r.dtype == torch.float32, (name, f.dtype, r.dtype)
        assert rel_err(f.double(), r.double()) <= 2 * tol, f"grad of {name}"


class BiLSTMClassifier(nn.Module):
    """x: [B, T, I] -> logits [B, 3] from the mean of the BiLSTM outputs."""

    def __init__(self):
        super().__init__()
        self.lstm = FusedBiLSTM(I, H, num_layers=2, batch_first=True)
        self.head = nn.Linear(2 * H, 3)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.head(y.mean(dim=1))


def test_cuda_compile_fullgraph_matches_eager(rng):
    assert_compiled_matches_eager(BiLSTMClassifier().to(CUDA), randn(B, T, I, rng=rng).float().to(CUDA))


# --- long sequences, exact float32, shapes that do not fit on chip ---------------------------------

def fused_and_gold(dtype, **kwargs):
    fused = FusedLSTM(**kwargs, dtype=dtype, device=CUDA)
    gold = nn.LSTM(**kwargs, dtype=torch.float64)
    gold.load_state_dict(fused.state_dict())
    return fused, gold


def assert_rel(results, gold, tol_outputs, tol_grads):
    for name in gold:
        tol = tol_grads if name.startswith("grad") else tol_outputs
        err = rel_err(results[name], gold[name])
        assert err <= tol, f"{name}: error {err:.3e} relative to float64 exceeds {tol:.0e}"


def test_cuda_long_sequence_matches_float64(path, rng):
    # T = 1024: errors must not grow with the sequence (state kept in float32 throughout).
    fused, gold = fused_and_gold(torch.float32, input_size=64, hidden_size=64, bidirectional=True)
    steps, lengths = 1024, torch.tensor([1024, 700])
    x = randn(steps, 2, 64, rng=rng)
    hx = (randn(2, 2, 64, rng=rng), randn(2, 2, 64, rng=rng))
    pack = lambda t: pack_padded_sequence(t, lengths)  # noqa: E731
    weights = {}
    want, _ = run(gold, x.float(), hx and tuple(t.float() for t in hx), pack, weights, rng)
    got, _ = run(fused, x.float(), hx and tuple(t.float() for t in hx), pack, weights, rng)
    assert_rel(got, want, 1e-5, 1e-4)


def test_cuda_float32_without_tf32_matches_float64(path, rng):
    # TF32 is off (fixture): float32 GEMMs and the on-chip product keep about 1e-5 relative.
    assert not torch.backends.cuda.matmul.allow_tf32
    fused, gold = fused_and_gold(torch.float32, input_size=256, hidden_size=256, num_layers=2,
                                 bidirectional=True)
    x = randn(32, 8, 256, rng=rng).float()
    weights = {}
    want, _ = run(gold, x, None, lambda t: t, weights, rng)
    got, _ = run(fused, x, None, lambda t: t, weights, rng)
    # Gradients sum over all T*B rows, hence their looser bound.
    assert_rel(got, want, 1e-5, 3e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cuda_large_batch_and_hidden_match_cudnn(dtype, rng):
    # B = 256, H = 1024: one direction's w_hh is 16 MiB in float32, more than the chip holds for
    # both directions, so automatic selection gives it to the stepwise path.
    kwargs = dict(input_size=256, hidden_size=1024, bidirectional=True)
    fused = FusedLSTM(**kwargs, dtype=dtype, device=CUDA)
    cudnn = nn.LSTM(**kwargs, dtype=dtype, device=CUDA)
    gold = nn.LSTM(**kwargs, dtype=torch.float64)
    cudnn.load_state_dict(fused.state_dict())
    gold.load_state_dict(fused.state_dict())
    x = randn(4, 256, 256, rng=rng).to(dtype)
    weights = {}
    want, _ = run(gold, x, None, lambda t: t, weights, rng)
    got, dtypes = run(fused, x, None, lambda t: t, weights, rng)
    ref, _ = run(cudnn, x, None, lambda t: t, weights, rng)
    assert all(dt == dtype for dt in dtypes.values())
    assert_within_2x(got, want, {"cudnn": ref}, FLOOR[dtype])
    with ops.recorded_kernels() as ran:
        fused(x.to(CUDA))
    assert "cuda:lstm_forward:stepwise" in ran


# --- errors on CUDA -------------------------------------------------------------------------------

def test_cuda_error_mixed_devices_raw_op(rng):
    x, weights, h0, c0, _ = op_args(2, True, False, torch.float32, rng, requires_grad=False)
    with pytest.raises(RuntimeError, match=r"weights\[4\] \(w_ih of direction 1\) is on cpu but x "
                                           r"is on cuda"):
        torch.ops.cnnlstm_ext.lstm_layer_forward(
            x, [*weights[:4], weights[4].cpu(), *weights[5:]], h0, c0, None, False)
    with pytest.raises(RuntimeError, match=r"lengths is on cpu but x is on cuda"):
        torch.ops.cnnlstm_ext.lstm_layer_forward(x, weights, h0, c0, torch.full((B,), T), False)


def test_cuda_error_module_input_on_other_device():
    fused = FusedLSTM(I, H)
    with pytest.raises(RuntimeError, match=r"Input and parameter tensors are not at the same "
                                           r"device, found input tensor at cuda:0 and parameter "
                                           r"tensor at cpu"):
        fused(torch.randn(T, B, I, device=CUDA))


def test_cuda_error_lengths_out_of_range():
    fused = FusedLSTM(I, H, device=CUDA)
    with pytest.raises(ValueError, match=rf"lengths must be in \[1, {T}\]"):
        fused(torch.randn(T, 2, I, device=CUDA), lengths=torch.tensor([T + 1, 2], device=CUDA))


def test_cuda_kernels_are_registered():
    assert cnnlstm_ext.cuda_kernels_built()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("cnnlstm_ext::lstm_layer_backward",
                                                          "CUDA")
