"""temporal_pool: [T, B, D] + lengths -> [B, D] against cnnlstm_ext.reference.temporal_pool."""
import pytest
import torch

import cnnlstm_ext
from cnnlstm_ext import ops, reference

# The CUDA twin of every test; conftest.py skips `cuda`-marked cases without a GPU and kernels.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
MODES = ["mean", "max", "last", "attention"]

T, B, D = 9, 5, 37  # D off the vector width: vector loop and tail
LENGTHS = [1, 9, 4, 9, 2]  # includes a length of 1 and full length


def lstm_outputs(t, b, d, dtype, device, mode, batch_first=False, seed=0):
    """Random [T, B, D] (or [B, T, D]); for "max", each (b, d) column over time is a random
    permutation of distinct values that every dtype represents exactly."""
    g = torch.Generator().manual_seed(seed)
    if mode == "max":
        ranks = torch.rand(b, d, t, generator=g).argsort(-1)  # [B, D, T]
        x = ((ranks - t // 2).to(torch.float64) / 8).permute(2, 0, 1)  # [T, B, D]
    else:
        x = torch.randn(t, b, d, generator=g, dtype=torch.float64)
    if batch_first:
        x = x.transpose(0, 1)
    return x.contiguous().to(device=device, dtype=dtype)


def score_params(d, device, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(1, d, generator=g, dtype=torch.float64) / d ** 0.5
    bias = torch.randn(1, generator=g, dtype=torch.float64)
    return w.to(device=device, dtype=dtype), bias.to(device=device, dtype=dtype)


def pool_kwargs(mode, device, dtype, bidirectional=False, d=D):
    kw = {"mode": mode, "bidirectional": bidirectional}
    if mode == "attention":
        kw["score_weight"], kw["score_bias"] = score_params(d, device, dtype)
    return kw


def assert_within_reference_error(fused, same_dtype_ref, exact_ref):
    """Error at most twice that of the unfused sequence in the same precision (plus one rounding
    step), measured against a float64 computation."""
    assert fused.shape == exact_ref.shape and fused.dtype == same_dtype_ref.dtype
    err = (fused.double() - exact_ref).abs().max().item()
    ref_err = (same_dtype_ref.double() - exact_ref).abs().max().item()
    # For float64 the reference is itself the exact computation: allow a few roundings.
    roundings = 16 if fused.dtype == torch.float64 else 1
    floor = roundings * torch.finfo(fused.dtype).eps * max(exact_ref.abs().max().item(), 1.0)
    assert err <= 2 * ref_err + floor, (err, ref_err, floor)


def as_double(kw):
    return {k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_lengths", [True, False])
@pytest.mark.parametrize("d", [D, 64])  # 64: 16-byte accesses on CUDA; 37: element by element
def test_temporal_pool_matches_reference(device, dtype, mode, batch_first, with_lengths, d):
    x = lstm_outputs(T, B, d, dtype, device, mode, batch_first)
    lengths = torch.tensor(LENGTHS, device=device) if with_lengths else None
    kw = pool_kwargs(mode, device, dtype, d=d)
    out = ops.temporal_pool(x, lengths, batch_first=batch_first, **kw)
    ref = reference.temporal_pool(x, lengths, batch_first=batch_first, **kw)
    exact = reference.temporal_pool(x.double(), lengths, batch_first=batch_first, **as_double(kw))
    assert out.shape == (B, d) and out.dtype == dtype
    if mode in ("max", "last"):
        assert torch.equal(out, ref)
    else:
        assert_within_reference_error(out, ref, exact)


# --- hand-computed oracles, independent of reference.py -------------------------------------------
# Written per sequence with slices and loops in float64, so that a scaling bug shared by the
# kernels and reference.py (dividing by T, or by lengths + 1) still shows.


def test_reference_temporal_pool_defaults_to_the_mean_over_every_step():
    x = lstm_outputs(T, B, D, torch.float64, "cpu", "mean")
    torch.testing.assert_close(reference.temporal_pool(x), x.mean(0), rtol=1e-12, atol=1e-12)


def test_reference_temporal_pool_last_without_lengths_is_the_last_step():
    """Not bidirectional by default: the last step for all D features."""
    x = lstm_outputs(T, B, D, torch.float64, "cpu", "last")
    torch.testing.assert_close(reference.temporal_pool(x, mode="last"), x[-1], rtol=0, atol=0)

def mean_oracle(x, lengths):
    """x: [T, B, D] float64 -> [B, D]: each sequence's mean over its first lengths[b] steps."""
    return torch.stack([x[:n, b].mean(0) for b, n in enumerate(lengths)])


def attention_oracle(x, lengths, w, bias):
    """x: [T, B, D] float64 -> ([B, D], weights [B, T]): per sequence, scores x_t . w + bias over
    its valid steps only, their softmax, the weighted sum of those steps; weights zero past the
    length."""
    steps = x.shape[0]
    outs, weights = [], []
    for b, n in enumerate(lengths):
        valid = x[:n, b]  # [n, D]
        scores = torch.stack([valid[t] @ w.reshape(-1) + bias.reshape(()) for t in range(n)])
        e = torch.exp(scores - scores.max())
        p = e / e.sum()
        outs.append(sum(p[t] * valid[t] for t in range(n)))
        weights.append(torch.cat([p, p.new_zeros(steps - n)]))
    return torch.stack(outs), torch.stack(weights)


def oracle_inputs(batch_first, device, dtype, lengths, d=D, seed=3):
    """Random x ([T, B, D], or [B, T, D]), score weight [1, D], score bias [1], and the lengths
    tensor (None for all T) with the per-sequence lengths the oracle uses."""
    x = lstm_outputs(T, B, d, dtype, device, "mean", batch_first, seed=seed)
    w, bias = score_params(d, device, dtype, seed=seed + 1)
    as_tensor = None if lengths is None else torch.tensor(lengths, device=device)
    return x, w, bias, as_tensor, (lengths or [T] * B)


def time_major_double(x, batch_first):
    return (x.transpose(0, 1) if batch_first else x).double()


ORACLE_TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}
ORACLE_LENGTHS = [pytest.param(LENGTHS, id="lengths"), pytest.param([3, 1, 7, 2, 5], id="no_full"),
                  pytest.param(None, id="all_T")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("lengths", ORACLE_LENGTHS)
def test_temporal_pool_mean_equals_per_sequence_mean(device, dtype, batch_first, bidirectional, lengths):
    x, _, _, lens, per_seq = oracle_inputs(batch_first, device, dtype, lengths)
    out = ops.temporal_pool(x, lens, "mean", batch_first, bidirectional)
    expected = mean_oracle(time_major_double(x, batch_first).cpu(), per_seq)
    torch.testing.assert_close(out.double().cpu(), expected, **ORACLE_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("lengths", ORACLE_LENGTHS)
def test_temporal_pool_attention_equals_per_sequence_softmax(device, dtype, batch_first, bidirectional,
                                                             lengths):
    x, w, bias, lens, per_seq = oracle_inputs(batch_first, device, dtype, lengths)
    out = ops.temporal_pool(x, lens, "attention", batch_first, bidirectional, w, bias)
    expected, _ = attention_oracle(time_major_double(x, batch_first).cpu(), per_seq,
                                   w.double().cpu(), bias.double().cpu())
    torch.testing.assert_close(out.double().cpu(), expected, **ORACLE_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("lengths", ORACLE_LENGTHS)
def test_temporal_pool_attention_weights_are_the_per_sequence_softmax(device, dtype, batch_first, lengths):
    """The op's aux output: the attention weights [B, T], zero past each length."""
    x, w, bias, lens, per_seq = oracle_inputs(batch_first, device, dtype, lengths)
    _, aux = torch.ops.cnnlstm_ext.temporal_pool_forward(x, lens, "attention", batch_first, False,
                                                         w, bias)
    _, expected = attention_oracle(time_major_double(x, batch_first).cpu(), per_seq,
                                   w.double().cpu(), bias.double().cpu())
    assert aux.shape == (B, T)
    torch.testing.assert_close(aux.double().cpu(), expected, **ORACLE_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_first", [False, True])
def test_temporal_pool_attention_weights_are_zero_past_each_length(device, batch_first):
    x, w, bias, lens, per_seq = oracle_inputs(batch_first, device, torch.float32, LENGTHS)
    _, aux = torch.ops.cnnlstm_ext.temporal_pool_forward(x, lens, "attention", batch_first, False,
                                                         w, bias)
    pad = torch.arange(T)[None, :] >= torch.tensor(per_seq)[:, None]  # [B, T]
    assert pad.any() and torch.all(aux.cpu()[pad] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("lengths", ORACLE_LENGTHS)
def test_temporal_pool_mean_gradient_equals_per_sequence_oracle(device, dtype, batch_first, bidirectional,
                                                                 lengths):
    x, _, _, lens, per_seq = oracle_inputs(batch_first, device, dtype, lengths)
    x.requires_grad_()
    grad = torch.randn(B, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (gx,) = torch.autograd.grad(ops.temporal_pool(x, lens, "mean", batch_first, bidirectional), x,
                                grad.to(device=device, dtype=dtype))
    x64 = x.detach().double().cpu().requires_grad_()
    (gx_oracle,) = torch.autograd.grad(mean_oracle(time_major_double(x64, batch_first), per_seq), x64, grad)
    torch.testing.assert_close(gx.double().cpu(), gx_oracle, **ORACLE_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("lengths", ORACLE_LENGTHS)
def test_temporal_pool_attention_gradients_equal_per_sequence_oracle(device, dtype, batch_first,
                                                                     bidirectional, lengths):
    """Gradients of x, the score weight and the score bias (the bias's is zero: softmax ignores a
    shift)."""
    x, w, bias, lens, per_seq = oracle_inputs(batch_first, device, dtype, lengths)
    inputs = [x.requires_grad_(), w.requires_grad_(), bias.requires_grad_()]
    grad = torch.randn(B, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = ops.temporal_pool(x, lens, "attention", batch_first, bidirectional, w, bias)
    grads = torch.autograd.grad(out, inputs, grad.to(device=device, dtype=dtype))
    leaves = [t.detach().double().cpu().requires_grad_() for t in inputs]
    expected, _ = attention_oracle(time_major_double(leaves[0], batch_first), per_seq, *leaves[1:])
    oracle_grads = torch.autograd.grad(expected, leaves, grad)
    for name, g, g_oracle in zip(("x", "score_weight", "score_bias"), grads, oracle_grads):
        torch.testing.assert_close(g.double().cpu(), g_oracle, **ORACLE_TOL[dtype],
                                   msg=lambda m: "%s: %s" % (name, m))


@pytest.mark.parametrize("mode", ["mean", "attention"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_temporal_pool_module_equals_per_sequence_oracle(mode, batch_first):
    pool = cnnlstm_ext.TemporalPool(mode, dim=2 * D, batch_first=batch_first, bidirectional=True).double()
    x, _, _, lens, per_seq = oracle_inputs(batch_first, "cpu", torch.float64, LENGTHS, d=2 * D)
    xt = time_major_double(x, batch_first)
    if mode == "mean":
        expected = mean_oracle(xt, per_seq)
    else:
        expected, _ = attention_oracle(xt, per_seq, pool.score.weight.detach(), pool.score.bias.detach())
    torch.testing.assert_close(pool(x, lens).detach(), expected, **ORACLE_TOL[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_first", [False, True])
def test_temporal_pool_last_bidirectional(device, batch_first):
    # Forward half at the last valid step, reverse half at step 0.
    x = lstm_outputs(T, B, 2 * D, torch.float32, device, "last", batch_first)
    lengths = torch.tensor(LENGTHS, device=device)
    out = ops.temporal_pool(x, lengths, "last", batch_first, bidirectional=True)
    xt = x.transpose(0, 1) if batch_first else x
    for b, n in enumerate(LENGTHS):
        assert torch.equal(out[b, :D], xt[n - 1, b, :D])
        assert torch.equal(out[b, D:], xt[0, b, D:])
    assert torch.equal(out, reference.temporal_pool(x, lengths, "last", batch_first, True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_temporal_pool_ignores_padding(device, mode):
    x = lstm_outputs(T, B, D, torch.float32, device, mode)
    lengths = torch.tensor(LENGTHS, device=device)
    kw = pool_kwargs(mode, device, torch.float32)
    padded = x.clone()
    pad = torch.arange(T, device=device)[:, None] >= lengths[None, :]
    padded[pad] = float("nan")
    assert torch.equal(ops.temporal_pool(padded, lengths, **kw), ops.temporal_pool(x, lengths, **kw))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [D, 64])
def test_temporal_pool_max_ties_and_nan(device, dtype, d):
    """torch.max's rule over each sequence's valid steps: NaN wins, then the first of equal
    maxima (values from {-2, ..., 2}: many ties; NaNs in some columns)."""
    g = torch.Generator().manual_seed(d)
    x = torch.randint(-2, 3, (T, B, d), generator=g).to(torch.float64)
    x[torch.rand(T, B, d, generator=g) < 0.05] = float("nan")
    x = x.to(device=device, dtype=dtype)
    lengths = torch.tensor(LENGTHS)
    out, argmax = torch.ops.cnnlstm_ext.temporal_pool_forward(x, lengths.to(device), "max", False, False,
                                                               None, None)
    for b, n in enumerate(LENGTHS):
        value, index = x[:n, b].float().cpu().max(0)
        torch.testing.assert_close(out[b].float().cpu(), value, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(argmax[b].cpu().long(), index), b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("d", [2 * D, 64])
def test_temporal_pool_gradient_matches_reference(device, mode, batch_first, bidirectional, d):
    x = lstm_outputs(T, B, d, torch.float32, device, mode, batch_first).requires_grad_()
    lengths = torch.tensor(LENGTHS, device=device)
    grad = torch.randn(B, d, device=device)
    inputs = [x]
    kw = {"mode": mode, "bidirectional": bidirectional, "batch_first": batch_first}
    if mode == "attention":
        w, bias = score_params(d, device)
        kw["score_weight"], kw["score_bias"] = w.requires_grad_(), bias.requires_grad_()
        inputs += [w, bias]
    grads = torch.autograd.grad(ops.temporal_pool(x, lengths, **kw), inputs, grad)
    ref_grads = torch.autograd.grad(reference.temporal_pool(x, lengths, **kw), inputs, grad)
    for g, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    # Padding receives exactly zero gradient.
    gx = grads[0].transpose(0, 1) if batch_first else grads[0]
    pad = torch.arange(T, device=device)[:, None] >= lengths[None, :]
    assert torch.all(gx[pad] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_temporal_pool_gradient_reduced_precision(device, dtype, mode):
    x = lstm_outputs(T, B, D, dtype, device, mode).requires_grad_()
    lengths = torch.tensor(LENGTHS, device=device)
    kw = pool_kwargs(mode, device, dtype)
    grad = torch.randn(B, D, dtype=torch.float64).to(device=device, dtype=dtype)
    (gx,) = torch.autograd.grad(ops.temporal_pool(x, lengths, **kw), x, grad)
    (gx_ref,) = torch.autograd.grad(reference.temporal_pool(x, lengths, **kw), x, grad)
    x64 = x.detach().double().requires_grad_()
    (gx_exact,) = torch.autograd.grad(reference.temporal_pool(x64, lengths, **as_double(kw)), x64,
                                      grad.double())
    assert gx.dtype == dtype
    assert_within_reference_error(gx, gx_ref, gx_exact)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch_first", [False, True])
def test_temporal_pool_gradcheck(device, mode, batch_first):
    """Gradients; for the modes whose backward is linear, gradients of gradients too
    (create_graph=True); attention refuses those (test below)."""
    x = lstm_outputs(4, 3, 6, torch.float64, device, "mean", batch_first).requires_grad_()
    lengths = torch.tensor([1, 4, 2], device=device)
    if mode == "attention":
        w, bias = score_params(6, device, torch.float64)
        w.requires_grad_()
        bias.requires_grad_()
        fn = lambda x_, w_, b_: ops.temporal_pool(x_, lengths, mode, batch_first, False, w_, b_)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, w, bias))
    else:
        for bidirectional in (False, True):
            fn = lambda x_: ops.temporal_pool(x_, lengths, mode, batch_first, bidirectional)  # noqa: E731
            assert torch.autograd.gradcheck(fn, (x,))
            assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_temporal_pool_attention_refuses_double_backward(device):
    x = lstm_outputs(4, 3, 6, torch.float64, device, "attention").requires_grad_()
    w, bias = score_params(6, device, torch.float64)
    w.requires_grad_()
    lengths = torch.tensor([1, 4, 2], device=device)
    kw = {"score_weight": w, "score_bias": bias}
    out = ops.temporal_pool(x, lengths, "attention", **kw)
    (gx,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)  # the first gradient works
    ref = reference.temporal_pool(x, lengths, "attention", **kw)
    (gx_ref,) = torch.autograd.grad(ref.pow(2).sum(), x)
    torch.testing.assert_close(gx.detach(), gx_ref)
    with pytest.raises(RuntimeError, match='double backward.*not supported for mode "attention"'):
        gx.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,dtype", [(m, torch.float32) for m in MODES] + [("attention", torch.float64)])
def test_temporal_pool_opcheck(device, mode, dtype):
    """Attention in float64 too: its weights (aux) are float64 there, float32 for the others."""
    x = lstm_outputs(5, 3, 8, dtype, device, mode).requires_grad_()
    lengths = torch.tensor([2, 5, 1], device=device)
    w, bias = score_params(8, device, dtype) if mode == "attention" else (None, None)
    if w is not None:
        w.requires_grad_()
        bias.requires_grad_()
    for lens, batch_first in ((lengths, False), (None, True)):
        torch.library.opcheck(torch.ops.cnnlstm_ext.temporal_pool_forward.default,
                              (x, lens, mode, batch_first, True, w, bias))
    out, aux = torch.ops.cnnlstm_ext.temporal_pool_forward(x.detach(), lengths, mode, False, True,
                                                           w, bias)
    torch.library.opcheck(torch.ops.cnnlstm_ext.temporal_pool_backward.default,
                          (torch.randn_like(out), x.detach(), lengths, aux, mode, False, True,
                           None if w is None else w.detach(), None if bias is None else bias.detach()))


@pytest.mark.parametrize("device", DEVICES)
def test_temporal_pool_records_a_graph_only_when_needed(device):
    """The autograd kernel (csrc/pooling_autograd.cpp) records a node when any of x, score_weight,
    score_bias needs a gradient, and none otherwise; with x frozen, the score parameters still get
    theirs (those of the reference)."""
    x = lstm_outputs(T, B, D, torch.float32, device, "attention")
    lengths = torch.tensor(LENGTHS, device=device)
    w, bias = score_params(D, device)
    out, aux = torch.ops.cnnlstm_ext.temporal_pool_forward(x, lengths, "attention", False, False, w, bias)
    assert out.grad_fn is None and not out.requires_grad
    w.requires_grad_()
    bias.requires_grad_()
    with torch.no_grad():
        out, _ = torch.ops.cnnlstm_ext.temporal_pool_forward(x, lengths, "attention", False, False, w, bias)
    assert out.grad_fn is None
    out, aux = torch.ops.cnnlstm_ext.temporal_pool_forward(x, lengths, "attention", False, False, w, bias)
    assert out.requires_grad and not aux.requires_grad
    grad = torch.randn(B, D, generator=torch.Generator().manual_seed(2)).to(device)
    gw, gb = torch.autograd.grad(out, (w, bias), grad)
    w64, b64 = w.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    ref = reference.temporal_pool(x.double(), lengths, "attention", score_weight=w64, score_bias=b64)
    gw_ref, gb_ref = torch.autograd.grad(ref, (w64, b64), grad.double())
    torch.testing.assert_close(gw.double(), gw_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb.double(), gb_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_temporal_pool_compiles_fullgraph(device):
    pool = cnnlstm_ext.TemporalPool("attention", dim=8).to(device)

    def head(x, lengths):
        return pool(x.tanh(), lengths).sum(-1)

    x = lstm_outputs(5, 3, 8, torch.float32, device, "attention").requires_grad_()
    lengths = torch.tensor([2, 5, 1], device=device)
    out = torch.compile(head, fullgraph=True, backend="aot_eager")(x, lengths)
    gx, gw = torch.autograd.grad(out.sum(), (x, pool.score.weight))
    ref = reference.temporal_pool(x.tanh(), lengths, "attention", score_weight=pool.score.weight,
                                  score_bias=pool.score.bias).sum(-1)
    gx_ref, gw_ref = torch.autograd.grad(ref.sum(), (x, pool.score.weight))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gw, gw_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_temporal_pool_attention_backward_is_deterministic(device):
    x = lstm_outputs(16, 8, 64, torch.float32, device, "attention").requires_grad_()
    w, bias = score_params(64, device)
    w.requires_grad_()
    grad = torch.randn(8, 64, device=device)
    first = torch.autograd.grad(ops.temporal_pool(x, None, "attention", score_weight=w), (x, w), grad)
    second = torch.autograd.grad(ops.temporal_pool(x, None, "attention", score_weight=w), (x, w), grad)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("device", DEVICES)
def test_temporal_pool_accepts_cpu_lengths_for_any_device(device):
    x = lstm_outputs(T, B, D, torch.float32, device, "mean")
    out = ops.temporal_pool(x, torch.tensor(LENGTHS), "mean")
    torch.testing.assert_close(out, reference.temporal_pool(x, torch.tensor(LENGTHS), "mean"))


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
def test_temporal_pool_cpu_lengths_never_wait_for_the_gpu(mode):
    from conftest import assert_no_cuda_sync
    x = lstm_outputs(T, B, D, torch.float32, "cuda", mode).requires_grad_()
    kw = pool_kwargs(mode, "cuda", torch.float32)
    assert_no_cuda_sync(lambda: ops.temporal_pool(x, torch.tensor(LENGTHS), **kw).square().sum().backward())


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
def test_temporal_pool_pinned_lengths_are_read_at_the_call(mode):
    # The GPU is kept busy so that the op's copies wait on the stream; a write to the pinned
    # lengths after the call must not reach them.
    x = lstm_outputs(T, B, D, torch.float32, "cuda", mode)
    kw = pool_kwargs(mode, "cuda", torch.float32)
    expected = ops.temporal_pool(x, torch.tensor(LENGTHS), **kw)
    pinned = torch.tensor(LENGTHS).pin_memory()
    torch.cuda._sleep(50_000_000)
    out = ops.temporal_pool(x, pinned, **kw)
    pinned.fill_(T)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
def test_temporal_pool_cuda_graph_replay_matches_eager(mode):
    # Lengths on the GPU: a static input of the graph, not read back while it is captured.
    from conftest import captured
    x = lstm_outputs(T, B, D, torch.float32, "cuda", mode)
    lengths = torch.tensor(LENGTHS, device="cuda")
    kw = pool_kwargs(mode, "cuda", torch.float32)
    graph, out = captured(lambda: ops.temporal_pool(x, lengths, **kw))
    x.copy_(lstm_outputs(T, B, D, torch.float32, "cuda", mode, seed=1))
    graph.replay()
    torch.testing.assert_close(out, ops.temporal_pool(x, lengths, **kw), rtol=0, atol=0)


@pytest.mark.cuda
def test_temporal_pool_cuda_graph_capture_refuses_lengths_on_the_cpu():
    x = lstm_outputs(T, B, D, torch.float32, "cuda", "mean")
    ops.temporal_pool(x, None, "mean")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=r"lengths must already be on cuda.*got lengths on cpu"):
        with torch.cuda.graph(graph):
            ops.temporal_pool(x, torch.tensor(LENGTHS), "mean")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_temporal_pool_refuses_zero_length(device, mode):
    x = lstm_outputs(T, B, D, torch.float32, device, mode)
    lengths = torch.tensor([3, 0, 1, 9, 9], device=device)
    with pytest.raises(RuntimeError, match="at least one valid step"):
        ops.temporal_pool(x, lengths, **pool_kwargs(mode, device, torch.float32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths, message", [
    ([3, 10, 1, 9, 9], r"<= T = 9"),
    ([3, -2, 1, 9, 9], "at least one valid step"),
])
def test_temporal_pool_refuses_out_of_range_lengths(device, lengths, message):
    x = lstm_outputs(T, B, D, torch.float32, device, "last")
    with pytest.raises(RuntimeError, match=message):
        ops.temporal_pool(x, torch.tensor(lengths, device=device), "last")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad_call, message", [
    (lambda d: ops.temporal_pool(torch.randn(4, 3, device=d)), r"\[T, B, D\] \(3-D\)"),
    (lambda d: ops.temporal_pool(torch.randn(4, 3, 2, device=d), torch.tensor([1, 2, 3], dtype=torch.int32)),
     "lengths must be int64"),
    (lambda d: ops.temporal_pool(torch.randn(4, 3, 2, device=d), torch.tensor([1, 2])), r"\[B\] = \[3\]"),
    (lambda d: ops.temporal_pool(torch.randn(0, 3, 2, device=d)), "at least one time step"),
    (lambda d: ops.temporal_pool(torch.ones(4, 3, 2, device=d, dtype=torch.int64)),
     "float32, float64, bfloat16 or float16"),
    (lambda d: ops.temporal_pool(torch.randn(4, 3, 5, device=d), mode="last", bidirectional=True),
     "even feature size"),
    (lambda d: ops.temporal_pool(torch.randn(4, 3, 5, device=d), mode="attention",
                                 score_weight=torch.randn(4, device=d)), r"\[D\] or \[1, D\] with D = 5"),
])
def test_temporal_pool_rejects_bad_input(device, bad_call, message):
    with pytest.raises(RuntimeError, match=message):
        bad_call(device)


def test_temporal_pool_rejects_bad_mode_and_missing_score():
    x = torch.randn(4, 3, 2)
    with pytest.raises(ValueError, match="mode"):
        ops.temporal_pool(x, mode="median")
    with pytest.raises(ValueError, match="score_weight"):
        ops.temporal_pool(x, mode="attention")
    with pytest.raises(RuntimeError, match="needs score_weight"):
        torch.ops.cnnlstm_ext.temporal_pool_forward(x, None, "attention", False, False, None, None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch_first", [False, True])
def test_temporal_pool_module_matches_reference(device, mode, batch_first):
    pool = cnnlstm_ext.TemporalPool(mode, dim=2 * D, batch_first=batch_first, bidirectional=True).to(device)
    x = lstm_outputs(T, B, 2 * D, torch.float32, device, mode, batch_first)
    lengths = torch.tensor(LENGTHS, device=device)
    kw = {}
    if mode == "attention":
        kw = {"score_weight": pool.score.weight, "score_bias": pool.score.bias}
    ref = reference.temporal_pool(x, lengths, mode, batch_first, True, **kw)
    torch.testing.assert_close(pool(x, lengths), ref)


def test_temporal_pool_module_parameters():
    pool = cnnlstm_ext.TemporalPool("attention", dim=16)
    assert set(pool.state_dict()) == {"score.weight", "score.bias"}
    assert isinstance(pool.score, torch.nn.Linear) and pool.score.weight.shape == (1, 16)
    assert list(cnnlstm_ext.TemporalPool("mean").parameters()) == []
    # The score bias gets a gradient (zero: softmax ignores a shift), so DDP sees it used.
    x = torch.randn(5, 2, 16, requires_grad=True)
    pool(x).sum().backward()
    assert pool.score.bias.grad is not None and pool.score.weight.grad is not None
    torch.testing.assert_close(pool.score.bias.grad, torch.zeros(1), atol=1e-6, rtol=0)


def test_temporal_pool_module_rejects_bad_configuration():
    with pytest.raises(ValueError, match="needs dim"):
        cnnlstm_ext.TemporalPool("attention")
    with pytest.raises(ValueError, match="mode"):
        cnnlstm_ext.TemporalPool("median")
    with pytest.raises(ValueError, match="even dim"):
        cnnlstm_ext.TemporalPool("last", dim=5, bidirectional=True)
    with pytest.raises(ValueError, match=r"D=16"):
        cnnlstm_ext.TemporalPool("mean", dim=16)(torch.randn(4, 2, 8))


def temporal_pool_backward_bad_argmax(bad, device):
    """The max backward with one arg-max past its sequence's last step (lengths[2] = 4): the call, as
    source for a child process."""
    return ("x = torch.randn(%d, %d, %d, device=%r)\n"
            "lengths = torch.tensor(%r)\n"
            "out, aux = torch.ops.cnnlstm_ext.temporal_pool_forward(x, lengths, 'max', False, False, None, None)\n"
            "aux[2, 5] = %d\n"
            "torch.ops.cnnlstm_ext.temporal_pool_backward(torch.ones_like(out), x, lengths, aux, 'max', False,"
            " False, None, None)\n" % (T, B, D, device, LENGTHS, bad))


@pytest.mark.parametrize("bad", [-1, 4])
def test_temporal_pool_backward_refuses_a_bad_argmax(bad):
    with pytest.raises(RuntimeError, match=r"aux\[2, 5\] = %d is not a valid step of sequence 2" % bad):
        exec(temporal_pool_backward_bad_argmax(bad, "cpu"), {"torch": torch})


@pytest.mark.cuda
@pytest.mark.parametrize("bad", [-1, 4])
def test_temporal_pool_backward_refuses_a_bad_argmax_cuda(bad, tmp_path):
    from conftest import assert_device_assert
    assert_device_assert(temporal_pool_backward_bad_argmax(bad, "cuda"), tmp_path)
