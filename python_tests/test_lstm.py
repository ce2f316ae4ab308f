"""The fused LSTM on the CPU: parity with torch.nn.LSTM, the op against the reference, gradcheck,
opcheck, torch.compile, optimizer-state transfer, fuse/unfuse and input errors.

Sizes are tiny (I=3, H=4, T=5, B<=4) so the whole grid runs in seconds on two cores.
"""
import copy
import importlib.util
import io
import os
import platform
import sys
import tempfile
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import cnnlstm_ext
from conftest import assert_compiled_matches_eager, low_precision_errors, low_precision_verdict
from cnnlstm_ext import FusedBiLSTM, FusedLSTM, fuse_lstm, ops, reference, unfuse_lstm

I, H, T, B = 3, 4, 5, 3

# Largest error allowed, relative to the largest magnitude of the expected tensor. bfloat16 is
# compared with float32 nn.LSTM on the same bf16-rounded inputs and weights, so its error is the
# rounding of outputs, gradients and the summed bias to bfloat16 (2^-8), accumulated over layers.
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32"),
          pytest.param(torch.bfloat16, id="bfloat16")]
LAYERS = [1, 2, 3]
DIRECTIONS = [pytest.param(False, id="uni"), pytest.param(True, id="bi")]


def assert_close_rel(actual, expected, rel, what):
    """Elementwise |actual - expected| <= rel * max|expected| (+ rel * |expected|)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * max(scale, 1e-6),
                               msg=lambda m: f"{what}: {m}")


def nn_lstm_and_fused(dtype, **kwargs):
    """An nn.LSTM (float64 for float64, else float32) and a FusedLSTM in `dtype` holding the same
    weights as independent Parameters. For bfloat16 the nn.LSTM gets the bf16-rounded weights."""
    ref = nn.LSTM(**kwargs)
    fused = FusedLSTM(**kwargs, dtype=dtype)
    fused.load_state_dict(ref.state_dict())
    ref = ref.to(torch.float64 if dtype == torch.float64 else torch.float32)
    ref.load_state_dict(fused.state_dict())  # exact: bf16 -> fp32 is lossless
    return ref, fused


def forward_with_leaves(module, x, hx, prepare):
    """Runs `module(prepare(x), hx)` on fresh leaf copies of x and hx; returns the outputs and the
    leaves by name (input, h0, c0, then the parameters in registration order)."""
    leaves = {"input": x.detach().clone().requires_grad_()}
    if hx is not None:
        leaves["h0"] = hx[0].detach().clone().requires_grad_()
        leaves["c0"] = hx[1].detach().clone().requires_grad_()
        hx = (leaves["h0"], leaves["c0"])
    out, (h_n, c_n) = module(prepare(leaves["input"]), hx)
    leaves.update(module.named_parameters())
    return out, h_n, c_n, leaves


def check_parity(ref, fused, x, hx, dtype, rng, prepare=lambda x: x):
    """Outputs and the gradients of every leaf agree between nn.LSTM and FusedLSTM.

    x, hx are float64 tensors; the fused side gets them in `dtype`, nn.LSTM in its own dtype after
    the same rounding. The loss is a random projection of output, h_n and c_n, so every gradient
    path is exercised with non-trivial incoming gradients.
    """
    ref_dtype = next(ref.parameters()).dtype
    cast = lambda t, dt: t.to(dtype).to(dt)  # noqa: E731  (round to dtype first)
    r_hx = None if hx is None else tuple(cast(t, ref_dtype) for t in hx)
    f_hx = None if hx is None else tuple(t.to(dtype) for t in hx)
    r_out, r_h, r_c, r_leaves = forward_with_leaves(ref, cast(x, ref_dtype), r_hx, prepare)
    f_out, f_h, f_c, f_leaves = forward_with_leaves(fused, x.to(dtype), f_hx, prepare)
    if isinstance(r_out, PackedSequence):
        assert isinstance(f_out, PackedSequence)
        for field in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            a, b = getattr(f_out, field), getattr(r_out, field)
            assert (a is None and b is None) or torch.equal(a, b), field
        r_out, f_out = r_out.data, f_out.data
    assert list(f_leaves) == list(r_leaves)
    rel = REL_TOL[dtype]
    for name, f, r in (("output", f_out, r_out), ("h_n", f_h, r_h), ("c_n", f_c, r_c)):
        assert f.dtype == dtype and f.shape == r.shape, (name, f.dtype, f.shape, r.shape)
        assert_close_rel(f, r, rel, name)
    weights = [torch.randn(t.shape, generator=rng, dtype=torch.float64).to(ref_dtype)
               for t in (r_out, r_h, r_c)]
    loss = lambda outs: sum((o.to(ref_dtype) * w).sum() for o, w in zip(outs, weights))  # noqa: E731
    r_grads = torch.autograd.grad(loss((r_out, r_h, r_c)), list(r_leaves.values()))
    f_grads = torch.autograd.grad(loss((f_out, f_h, f_c)), list(f_leaves.values()))
    for name, f, r in zip(r_leaves, f_grads, r_grads):
        assert f.dtype == dtype, (name, f.dtype)
        assert_close_rel(f, r, rel, f"grad of {name}")


def randn(*shape, rng):
    return torch.randn(*shape, generator=rng, dtype=torch.float64)


def random_hx(num_states, batch, rng):
    shape = (num_states, H) if batch is None else (num_states, batch, H)
    return randn(*shape, rng=rng), randn(*shape, rng=rng)


# --- parity with nn.LSTM ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_hx", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("bidirectional", DIRECTIONS)
@pytest.mark.parametrize("num_layers", LAYERS)
def test_forward_backward_match_nn_lstm_padded(num_layers, bidirectional, batch_first, with_hx,
                                               dtype, rng):
    ref, fused = nn_lstm_and_fused(dtype, input_size=I, hidden_size=H, num_layers=num_layers,
                                   batch_first=batch_first, bidirectional=bidirectional)
    x = randn(*((B, T, I) if batch_first else (T, B, I)), rng=rng)
    hx = random_hx(num_layers * (1 + bidirectional), B, rng) if with_hx else None
    check_parity(ref, fused, x, hx, dtype, rng)


PACKINGS = {
    # name: (lengths, enforce_sorted, batch_first). FusedLSTM ignores batch_first for a
    # PackedSequence (as nn.LSTM does); one case checks that on batch-first padded input.
    "sorted_enforced": ([5, 4, 2, 1], True, False),
    "sorted_not_enforced": ([5, 4, 2, 1], False, False),
    "unsorted": ([2, 5, 1, 4], False, False),
    "unsorted_max_below_T_batch_first": ([2, 4, 1, 3], False, True),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_hx", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("packing", list(PACKINGS))
@pytest.mark.parametrize("bidirectional", DIRECTIONS)
@pytest.mark.parametrize("num_layers", LAYERS)
def test_forward_backward_match_nn_lstm_packed(num_layers, bidirectional, packing, with_hx, dtype,
                                               rng):
    lengths, enforce_sorted, batch_first = PACKINGS[packing]
    batch = len(lengths)
    ref, fused = nn_lstm_and_fused(dtype, input_size=I, hidden_size=H, num_layers=num_layers,
                                   batch_first=batch_first, bidirectional=bidirectional)
    x = randn(*((batch, T, I) if batch_first else (T, batch, I)), rng=rng)
    hx = random_hx(num_layers * (1 + bidirectional), batch, rng) if with_hx else None
    pack = lambda x: pack_padded_sequence(x, torch.tensor(lengths), batch_first=batch_first,  # noqa: E731
                                          enforce_sorted=enforce_sorted)
    check_parity(ref, fused, x, hx, dtype, rng, prepare=pack)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_hx", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("bidirectional", DIRECTIONS)
@pytest.mark.parametrize("num_layers", [1, 2])
def test_forward_backward_match_nn_lstm_unbatched(num_layers, bidirectional, with_hx, dtype, rng):
    ref, fused = nn_lstm_and_fused(dtype, input_size=I, hidden_size=H, num_layers=num_layers,
                                   bidirectional=bidirectional)
    x = randn(T, I, rng=rng)
    hx = random_hx(num_layers * (1 + bidirectional), None, rng) if with_hx else None
    check_parity(ref, fused, x, hx, dtype, rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_hx", [False, True], ids=["no_hx", "hx"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_forward_backward_match_nn_lstm_empty_batch(batch_first, with_hx, dtype, rng):
    """A batch of size 0, which nn.LSTM accepts: empty outputs that a backward goes through,
    giving every parameter a zero gradient."""
    ref, fused = nn_lstm_and_fused(dtype, input_size=I, hidden_size=H, num_layers=2,
                                   batch_first=batch_first, bidirectional=True)
    x = randn(*((0, T, I) if batch_first else (T, 0, I)), rng=rng)
    hx = random_hx(4, 0, rng) if with_hx else None
    check_parity(ref, fused, x, hx, dtype, rng)
    out, (h_n, c_n) = fused(x.to(dtype), lengths=torch.zeros(0, dtype=torch.long))
    assert out.shape == ((0, T, 2 * H) if batch_first else (T, 0, 2 * H))
    assert h_n.shape == c_n.shape == (4, 0, H)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bidirectional", DIRECTIONS)
@pytest.mark.parametrize("num_layers", [1, 2])
def test_forward_backward_match_nn_lstm_without_bias(num_layers, bidirectional, dtype, rng):
    ref, fused = nn_lstm_and_fused(dtype, input_size=I, hidden_size=H, num_layers=num_layers,
                                   bidirectional=bidirectional, bias=False)
    assert not any("bias" in name for name, _ in fused.named_parameters())
    check_parity(ref, fused, randn(T, B, I, rng=rng), random_hx(num_layers * (1 + bidirectional),
                                                                  B, rng), dtype, rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bidirectional", DIRECTIONS)
@pytest.mark.parametrize("num_layers", [2, 3])
def test_forward_backward_match_nn_lstm_dropout_in_eval_mode(num_layers, bidirectional, dtype, rng):
    ref, fused = nn_lstm_and_fused(dtype, input_size=I, hidden_size=H, num_layers=num_layers,
                                   bidirectional=bidirectional, dropout=0.5)
    ref.eval()
    fused.eval()
    check_parity(ref, fused, randn(T, B, I, rng=rng), None, dtype, rng)


@pytest.mark.parametrize("bidirectional", DIRECTIONS)
def test_forward_backward_match_nn_lstm_dropout_in_train_mode_same_seed(bidirectional, rng):
    # Inter-layer dropout draws its mask exactly as nn.LSTM's CPU path does (one dropout call on
    # each lower layer's [T, B, D*H] output), so the same seed gives the same masks.
    ref, fused = nn_lstm_and_fused(torch.float64, input_size=I, hidden_size=H, num_layers=3,
                                   bidirectional=bidirectional, dropout=0.5)
    x = randn(T, B, I, rng=rng)
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))

    def seeded(module):
        class Seeded(nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = module

            def forward(self, x, hx):
                torch.manual_seed(seed)
                return self.inner(x, hx)

        return Seeded()

    out_eval, _ = fused.eval()(x)
    fused.train()
    out_train, _ = fused(x)
    assert not torch.allclose(out_train, out_eval)  # dropout is active
    # check_parity reads parameters through module.named_parameters(): prefixes match on both.
    check_parity(seeded(ref), seeded(fused), x, None, torch.float64, rng)


@pytest.mark.parametrize("scale", [30.0, 1e4, 1e30], ids=["30", "1e4", "1e30"])
def test_saturated_gates_as_accurate_as_nn_lstm(scale, rng):
    """Gate pre-activations far out on both sides (exp of +-88 and beyond: overflow to inf and
    underflow to 0 in the cell kernels' exp): outputs and gradients finite, and as close to
    nn.LSTM's in float64 as nn.LSTM's in float32 are (at most 4x its error, which such inputs
    make large for the weight gradients). H = 32: the vector cell kernels."""
    import copy
    ref, fused = nn_lstm_and_fused(torch.float32, input_size=8, hidden_size=32, num_layers=2,
                                   bidirectional=True)
    ref64 = copy.deepcopy(ref).double()
    x = (randn(5, 3, 8, rng=rng) * scale).float()
    weights = randn(5, 3, 64, rng=rng).float()
    assert (x @ ref.weight_ih_l0.detach().T).abs().max() > (20 if scale < 100 else 88)  # far out
    results = []
    for module, dtype in ((ref, torch.float32), (fused, torch.float32), (ref64, torch.float64)):
        leaf = x.to(dtype).clone().requires_grad_()
        out, (h_n, c_n) = module(leaf)
        (out * weights.to(dtype)).sum().backward()
        results.append([out, h_n, c_n, leaf.grad] + [p.grad for p in module.parameters()])
    names = ["output", "h_n", "c_n", "grad of input"] + [n for n, _ in fused.named_parameters()]
    for name, r, f, r64 in zip(names, *results):
        assert f.isfinite().all() and r64.isfinite().all(), name
        error = lambda a: (a.double() - r64).abs().max().item()  # noqa: E731
        assert error(f) <= 4 * error(r) + 1e-6 * r64.abs().max().item(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_nan_spreads_as_in_nn_lstm(dtype, rng):
    """A NaN in one input step reaches the same outputs and gradients as in nn.LSTM (all of its
    sequence after two bidirectional layers, no other sequence). H = 32: the vector kernels, and
    for bfloat16 on AVX512-BF16 CPUs the bfloat16 products and loads/stores of the cell kernels."""
    ref, fused = nn_lstm_and_fused(dtype, input_size=8, hidden_size=32, num_layers=2,
                                   bidirectional=True)
    x = randn(6, 3, 8, rng=rng)
    x[2, 1, 5] = float("nan")
    weights = randn(6, 3, 64, rng=rng)
    results = []
    for module, inputs in ((ref, x.to(dtype).float()), (fused, x.to(dtype))):
        leaf = inputs.clone().requires_grad_()
        out, (h_n, c_n) = module(leaf)
        (out.float() * weights.float()).nan_to_num().sum().backward()
        results.append([out, h_n, c_n, leaf.grad] + [p.grad for p in module.parameters()])
    names = ["output", "h_n", "c_n", "grad of input"] + [n for n, _ in fused.named_parameters()]
    for name, r, f in zip(names, *results):
        assert torch.equal(f.isnan(), r.isnan()), name
    out, grad_x = results[1][0], results[1][3]
    assert out[:, 1].isnan().all() and not out[:, [0, 2]].isnan().any()
    assert grad_x[:, 1].isnan().all() and not grad_x[:, [0, 2]].isnan().any()


def test_from_lstm_shares_parameters_and_matches(rng):
    ref = nn.LSTM(I, H, num_layers=2, bidirectional=True, batch_first=True).double()
    fused = FusedLSTM.from_lstm(ref)
    assert [(n, id(p)) for n, p in fused.named_parameters()] == \
        [(n, id(p)) for n, p in ref.named_parameters()]
    assert (fused.batch_first, fused.bidirectional, fused.num_layers, fused.training) == \
        (True, True, 2, True)
    x = randn(B, T, I, rng=rng)
    out_f, (h_f, c_f) = fused(x)
    out_r, (h_r, c_r) = ref(x)
    for name, f, r in (("output", out_f, out_r), ("h_n", h_f, h_r), ("c_n", c_f, c_r)):
        assert_close_rel(f, r, REL_TOL[torch.float64], name)


# --- lengths= -----------------------------------------------------------------------------------

@pytest.mark.parametrize("lengths_as", ["int64", "int32", "list"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("bidirectional", DIRECTIONS)
def test_lengths_keyword_equals_packing(bidirectional, batch_first, lengths_as, rng):
    lengths = [2, 5, 1, 3]
    batch = len(lengths)
    fused = FusedLSTM(I, H, num_layers=2, bidirectional=bidirectional, batch_first=batch_first,
                      dtype=torch.float64)
    x = randn(*((batch, T, I) if batch_first else (T, batch, I)), rng=rng)
    hx = random_hx(2 * (1 + bidirectional), batch, rng)
    given = {"int64": torch.tensor(lengths), "int32": torch.tensor(lengths, dtype=torch.int32),
             "list": lengths}[lengths_as]

    x_l, h0_l, c0_l = (t.clone().requires_grad_() for t in (x, *hx))
    out_l, (h_l, c_l) = fused(x_l, (h0_l, c0_l), lengths=given)
    x_p, h0_p, c0_p = (t.clone().requires_grad_() for t in (x, *hx))
    packed = pack_padded_sequence(x_p, torch.tensor(lengths), batch_first=batch_first,
                                  enforce_sorted=False)
    out_packed, (h_p, c_p) = fused(packed, (h0_p, c0_p))
    out_p, _ = pad_packed_sequence(out_packed, batch_first=batch_first, total_length=T)

    torch.testing.assert_close(out_l, out_p, rtol=0, atol=1e-12)
    torch.testing.assert_close(h_l, h_p, rtol=0, atol=1e-12)
    torch.testing.assert_close(c_l, c_p, rtol=0, atol=1e-12)
    time_dim = 1 if batch_first else 0
    for b, n in enumerate(lengths):  # padding is zero and not computed
        padding = out_l.select(1 - time_dim, b).narrow(0, n, T - n)
        assert torch.count_nonzero(padding) == 0
    weights = [randn(*t.shape, rng=rng) for t in (out_l, h_l, c_l)]
    loss = lambda outs: sum((o * w).sum() for o, w in zip(outs, weights))  # noqa: E731
    g_l = torch.autograd.grad(loss((out_l, h_l, c_l)), [x_l, h0_l, c0_l, *fused.parameters()])
    g_p = torch.autograd.grad(loss((out_p, h_p, c_p)), [x_p, h0_p, c0_p, *fused.parameters()])
    for a, b in zip(g_l, g_p):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# --- the op against the reference ---------------------------------------------------------------

def op_inputs(D, with_bias, with_lengths, dtype, rng, t=T, b=B, i=I, h=H):
    """Random leaves for lstm_layer: x [t, b, i]; weights, per direction w_ih [4h, i],
    w_hh [4h, h] (, b_ih, b_hh [4h]), each its own tensor; h0, c0 [D, b, h]; and lengths [b]
    (one sequence at full length, one of length 1) or None."""
    mk = lambda *s: randn(*s, rng=rng).mul(0.5).to(dtype).requires_grad_()  # noqa: E731
    x = mk(t, b, i)
    shapes = [(4 * h, i), (4 * h, h)] + ([(4 * h,), (4 * h,)] if with_bias else [])
    weights = [mk(*shape) for _ in range(D) for shape in shapes]
    h0, c0 = mk(D, b, h), mk(D, b, h)
    lengths = None
    if with_lengths:
        lengths = torch.randint(1, t + 1, (b,), generator=rng)
        lengths[0], lengths[-1] = t, 1
    return x, weights, h0, c0, lengths


def weight_names(weights, D):
    kinds = ("w_ih", "w_hh", "b_ih", "b_hh")
    per = len(weights) // D
    return [f"{kinds[k % per]} of direction {k // per}" for k in range(len(weights))]


def detached(*ts):
    return [None if t is None else [w.detach() for w in t] if isinstance(t, list) else t.detach()
            for t in ts]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("D", [1, 2], ids=["forward_dir", "both_dirs"])
def test_op_matches_reference(D, with_bias, with_lengths, dtype, rng):
    x, weights, h0, c0, lengths = op_inputs(D, with_bias, with_lengths, dtype, rng, b=4)
    leaves = [x, *weights, h0, c0]
    got = ops.lstm_layer(x, weights, h0, c0, lengths)
    want = reference.lstm_layer(x, weights, h0, c0, lengths)
    rel = REL_TOL[dtype]
    for name, g, w in zip(("y", "h_n", "c_n"), got, want):
        assert g.shape == w.shape and g.dtype == dtype
        assert_close_rel(g, w, rel, name)
    proj = [randn(*t.shape, rng=rng).to(dtype) for t in want]
    loss = lambda outs: sum((o * p).sum() for o, p in zip(outs, proj))  # noqa: E731
    g_got = torch.autograd.grad(loss(got), leaves)
    g_want = torch.autograd.grad(loss(want), leaves)
    names = ["x", *weight_names(weights, D), "h0", "c0"]
    for name, g, w in zip(names, g_got, g_want):
        assert_close_rel(g, w, rel, f"grad of {name}")


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("D", [1, 2], ids=["forward_dir", "both_dirs"])
def test_op_gradcheck_float64(D, with_lengths, rng):
    x, weights, h0, c0, lengths = op_inputs(D, True, with_lengths, torch.float64, rng,
                                            t=3, b=2, i=2, h=2)
    if lengths is not None:
        lengths = torch.tensor([3, 2])
    fn = lambda x, *w: ops.lstm_layer(x, w[:-2], w[-2], w[-1], lengths)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, *weights, h0, c0), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_op_forward_passes_opcheck(train, with_bias, with_lengths, rng):
    x, weights, h0, c0, lengths = op_inputs(2, with_bias, with_lengths, torch.float32, rng)
    args = [x, weights, h0, c0]
    if not train:  # train=False saves nothing for backward: it is the no-grad (inference) call
        args = detached(*args)
    torch.library.opcheck(torch.ops.cnnlstm_ext.lstm_layer_forward, (*args, lengths, train))


@pytest.mark.parametrize("need_grad_x", [True, False], ids=["grad_x", "no_grad_x"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_op_backward_passes_opcheck(with_lengths, need_grad_x, rng):
    x, weights, h0, c0, lengths = detached(*op_inputs(2, True, with_lengths, torch.float32, rng))
    y, h_n, c_n, gates, cell = torch.ops.cnnlstm_ext.lstm_layer_forward(
        x, weights, h0, c0, lengths, True)
    grads = [randn(*t.shape, rng=rng).float() for t in (y, h_n, c_n)]
    torch.library.opcheck(torch.ops.cnnlstm_ext.lstm_layer_backward,
                          (*grads, x, weights, h0, c0, lengths, y, gates, cell, need_grad_x))


def test_op_backward_without_grad_x(rng):
    """need_grad_x=False skips the input gradient (None) and leaves every other one as it was."""
    x, weights, h0, c0, lengths = detached(*op_inputs(2, True, True, torch.float32, rng))
    y, h_n, c_n, gates, cell = torch.ops.cnnlstm_ext.lstm_layer_forward(
        x, weights, h0, c0, lengths, True)
    grads = [randn(*t.shape, rng=rng).float() for t in (y, h_n, c_n)]
    args = (*grads, x, weights, h0, c0, lengths, y, gates, cell)
    full = torch.ops.cnnlstm_ext.lstm_layer_backward(*args)
    skipped = torch.ops.cnnlstm_ext.lstm_layer_backward(*args, need_grad_x=False)
    assert full[0].shape == x.shape and skipped[0] is None
    for a, b in zip(full[1:], skipped[1:]):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_autograd_skips_grad_x_of_an_input_without_grad(rng, monkeypatch):
    """The first layer on inputs that need no gradient (frozen-backbone features) asks the
    backward for none, and the weights' gradients still match the reference's."""
    x, weights, h0, c0, lengths = op_inputs(2, True, True, torch.float64, rng, b=4)
    x = x.detach()
    calls = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.cnnlstm_ext.lstm_layer_backward.default:
                calls.append(args[11] if len(args) > 11 else (kwargs or {}).get("need_grad_x", True))
            return func(*args, **(kwargs or {}))

    proj = [randn(*s, rng=rng).double() for s in ((T, 4, 2 * H), (2, 4, H), (2, 4, H))]
    loss = lambda outs: sum((o * p).sum() for o, p in zip(outs, proj))  # noqa: E731
    leaves = [*weights, h0, c0]
    with Spy():
        got = torch.autograd.grad(loss(ops.lstm_layer(x, weights, h0, c0, lengths)), leaves)
    want = torch.autograd.grad(loss(reference.lstm_layer(x, weights, h0, c0, lengths)), leaves)
    assert calls == [False]
    for name, g, w in zip([*weight_names(weights, 2), "h0", "c0"], got, want):
        assert_close_rel(g, w, REL_TOL[torch.float64], f"grad of {name}")


def test_op_inference_call_saves_nothing(rng):
    x, weights, h0, c0, _ = detached(*op_inputs(2, True, False, torch.float32, rng))
    y_train, *_, gates, cell = torch.ops.cnnlstm_ext.lstm_layer_forward(
        x, weights, h0, c0, None, True)
    y_eval, *_, no_gates, no_cell = torch.ops.cnnlstm_ext.lstm_layer_forward(
        x, weights, h0, c0, None, False)
    assert gates.shape == (T, B, 2, 4 * H) and cell.shape == (T, B, 2, H)
    assert no_gates.numel() == 0 and no_cell.numel() == 0
    torch.testing.assert_close(y_eval, y_train, rtol=0, atol=0)


def test_op_records_a_graph_only_when_needed(rng):
    """The autograd kernel (csrc/lstm_autograd.cpp): no node without a gradient to compute
    (inputs without requires_grad, or no_grad), one node otherwise; the saved activations (gates,
    cell) are never differentiable."""
    x, weights, h0, c0, _ = op_inputs(2, True, False, torch.float32, rng)
    px, pw, ph0, pc0 = detached(x, weights, h0, c0)
    y, *_ = torch.ops.cnnlstm_ext.lstm_layer_forward(px, pw, ph0, pc0, None, False)
    assert y.grad_fn is None and not y.requires_grad
    with torch.no_grad():
        y, *_ = torch.ops.cnnlstm_ext.lstm_layer_forward(x, weights, h0, c0, None, False)
    assert y.grad_fn is None and not y.requires_grad
    # One input needing a gradient is enough: b_hh of direction 1.
    pw[7] = pw[7].clone().requires_grad_()
    y, h_n, c_n, gates, cell = torch.ops.cnnlstm_ext.lstm_layer_forward(
        px, pw, ph0, pc0, None, True)
    assert "LstmLayerFunction" in y.grad_fn.name()
    assert h_n.requires_grad and c_n.requires_grad
    assert not gates.requires_grad and not cell.requires_grad
    (g_bias,) = torch.autograd.grad(c_n.sum(), pw[7])
    want = reference.lstm_layer(px, pw, ph0, pc0)
    (g_want,) = torch.autograd.grad(want[2].sum(), pw[7])
    assert_close_rel(g_bias, g_want, 1e-5, "grad of b_hh through c_n alone")


def test_create_graph_gradients_equal_first_order_gradients():
    """create_graph=True computes the gradients through the step-by-step layer (differentiable);
    they equal the kernels' first-order gradients."""
    torch.manual_seed(9)
    fused = FusedBiLSTM(I, H, num_layers=2).double()
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([T, 2, 4])
    params = [x, *fused.parameters()]
    plain = torch.autograd.grad(fused(x, lengths=lengths)[0].sum(), params)
    first = torch.autograd.grad(fused(x, lengths=lengths)[0].sum(), params, create_graph=True)
    for p_, f in zip(plain, first):
        torch.testing.assert_close(f, p_, rtol=1e-10, atol=1e-12)
    assert all(f.requires_grad for f in first)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_gradgradcheck_float64(bidirectional, with_lengths):
    torch.manual_seed(3)
    fused = FusedLSTM(2, 3, num_layers=2, bidirectional=bidirectional).double()
    D = 2 if bidirectional else 1
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2 * D, 2, 3, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2 * D, 2, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 2]) if with_lengths else None
    weights = list(fused.parameters())

    def fn(x, h0, c0, *ws):
        out, (h, c) = torch.func.functional_call(
            fused, dict(zip([n for n, _ in fused.named_parameters()], ws)), (x, (h0, c0)),
            {"lengths": lengths})
        return out, h, c

    ws = [w.detach().clone().requires_grad_() for w in weights]
    assert torch.autograd.gradgradcheck(fn, (x, h0, c0, *ws), check_batched_grad=False)


def test_gradient_penalty_matches_nn_lstm():
    """d/dθ of ||∂L/∂x||², the gradient penalty of WGAN-GP style training, as nn.LSTM gives it."""
    torch.manual_seed(5)
    ref = nn.LSTM(I, H, num_layers=2, bidirectional=True).double()
    fused = FusedLSTM(I, H, num_layers=2, bidirectional=True).double()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64)
    results = []
    for model in (ref, fused):
        xi = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(model(xi)[0].tanh().sum(), xi, create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), list(model.parameters())))
    for name, a, b in zip([n for n, _ in ref.named_parameters()], *results):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_op_refuses_a_saved_input_changed_in_place(rng):
    """Backward reads x, the weights and the states as the forward saw them: an in-place change
    between the two is an error (autograd's version check), not a wrong gradient."""
    x, weights, h0, c0, _ = op_inputs(2, True, False, torch.float32, rng)
    y, _, _ = ops.lstm_layer(x, weights, h0, c0)
    with torch.no_grad():
        weights[5].mul_(2)  # w_hh of direction 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# --- autocast -------------------------------------------------------------------------------------

@pytest.mark.parametrize("input_from", ["float32_input", "autocast_linear"])
def test_autocast_cpu_matches_nn_lstm(input_from, rng):
    # Inside autocast nn.LSTM runs in autocast's dtype whatever its input's dtype (float32, or
    # bfloat16 from an autocast Linear); gradients reach the float32 parameters in float32.
    ref, fused = nn_lstm_and_fused(torch.float32, input_size=I, hidden_size=H, num_layers=2,
                                   bidirectional=True)
    frame = nn.Linear(I, I)
    x = randn(T, B, I, rng=rng).float()
    weights = [randn(T, B, 2 * H, rng=rng).float(), randn(4, B, H, rng=rng).float()]
    results = []
    for module in (ref, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = frame(x) if input_from == "autocast_linear" else x
            out, (h_n, c_n) = module(features)
            loss = (out.float() * weights[0]).sum() + (h_n.float() * weights[1]).sum()
        grads = torch.autograd.grad(loss, list(module.parameters()))
        results.append((out, h_n, c_n, grads))
    (r_out, r_h, r_c, r_grads), (f_out, f_h, f_c, f_grads) = results
    for name, f, r in (("output", f_out, r_out), ("h_n", f_h, r_h), ("c_n", f_c, r_c)):
        assert f.dtype == r.dtype == torch.bfloat16, (name, f.dtype, r.dtype)
        assert_close_rel(f, r, 3e-2, name)
    for (name, _), f, r in zip(fused.named_parameters(), f_grads, r_grads):
        assert f.dtype == r.dtype == torch.float32, (name, f.dtype, r.dtype)
        assert_close_rel(f, r, 5e-2, f"grad of {name}")


def test_autocast_cpu_op_returns_autocast_dtype(rng):
    x, weights, h0, c0, lengths = op_inputs(2, True, True, torch.float32, rng)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h_n, c_n = ops.lstm_layer(x, weights, h0, c0, lengths)
        # backward inside the region still runs (the kernels keep autocast away from their GEMMs)
        torch.autograd.grad(y.float().sum() + c_n.float().sum(), [x, weights[1]])
    assert y.dtype == h_n.dtype == c_n.dtype == torch.bfloat16
    rounded = lambda t: t.detach().to(torch.bfloat16).float()  # noqa: E731
    want = reference.lstm_layer(rounded(x), [rounded(w) for w in weights], rounded(h0),
                                rounded(c0), lengths)
    for name, g, w in zip(("y", "h_n", "c_n"), (y, h_n, c_n), want):
        assert_close_rel(g, w, 2e-2, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [4, 32], ids=["H4", "H32"])  # H = 32: the vector kernels
def test_nan_in_one_sequence_reaches_its_outputs_only(dtype, hidden):
    """A NaN in one input reaches that sequence's outputs from its step on (and its earlier ones
    in the reverse direction), as in nn.LSTM, and no other sequence's: no kernel turns it into a
    number (a fast exp would) or spreads it across the batch."""
    torch.manual_seed(0)
    lstm = FusedLSTM(8, hidden, 2, bidirectional=True).to(dtype)
    x = torch.randn(6, 3, 8).to(dtype)
    x[2, 1, 0] = float("nan")
    y, (h, c) = lstm(x)
    assert y[:, 1].isnan().all()  # both directions, every step: layer 2 reads all of layer 1
    assert not y[:, [0, 2]].isnan().any()
    assert h[:, 1].isnan().all() and c[:, 1].isnan().all()
    assert not h[:, [0, 2]].isnan().any() and not c[:, [0, 2]].isnan().any()


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_autocast_inference_keeps_cast_weights_with_the_op_cast_results(bidirectional, bias, rng):
    lstm = FusedLSTM(I, 16, 2, bias=bias, bidirectional=bidirectional).eval()
    x = randn(T, B, I, rng=rng).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with_grad = lstm(x)                   # the op casts the float32 weights
        assert lstm._autocast_weights == {}
        with torch.no_grad():
            first, again = lstm(x), lstm(x)   # the kept copies
    assert len(lstm._autocast_weights) == 2
    flat = lambda out: (out[0], *out[1])  # noqa: E731
    for a, b, c in zip(flat(with_grad), flat(first), flat(again)):
        assert a.dtype == torch.bfloat16
        assert torch.equal(a.detach(), b) and torch.equal(b, c)


def test_autocast_inference_follows_weight_changes(rng):
    """The kept copies follow in-place updates, replaced parameters, loaded state dicts and
    conversions: each call gives what a module built with the current weights gives."""
    lstm = FusedLSTM(I, 16, 2, bidirectional=True).eval()
    x = randn(T, B, I, rng=rng).float()

    def run(module):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return module(x)[0]

    def fresh():
        other = FusedLSTM(I, 16, 2, bidirectional=True).eval()
        other.load_state_dict(lstm.state_dict())
        return run(other)
    run(lstm)
    with torch.no_grad():
        lstm.weight_hh_l1_reverse.mul_(1.5)                 # in place (an optimizer's step)
    torch.testing.assert_close(run(lstm), fresh(), rtol=0, atol=0)
    lstm.bias_ih_l0 = nn.Parameter(torch.randn(64))         # replaced
    torch.testing.assert_close(run(lstm), fresh(), rtol=0, atol=0)
    source = FusedLSTM(I, 16, 2, bidirectional=True)
    lstm.load_state_dict(source.state_dict())               # loaded
    torch.testing.assert_close(run(lstm), fresh(), rtol=0, atol=0)
    lstm.double().float()                                   # converted
    torch.testing.assert_close(run(lstm), fresh(), rtol=0, atol=0)
    assert not torch.equal(run(lstm), run(FusedLSTM(I, 16, 2, bidirectional=True).eval()))


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_op_casts_weights_of_another_dtype(with_lengths, rng):
    """float32 weights with bfloat16 activations (autocast's case): the op computes with the
    weights rounded to bfloat16 (b_ih + b_hh summed in float32, then rounded), exactly as if they
    had been cast first, and returns their gradients in float32."""
    x, weights, h0, c0, lengths = detached(*op_inputs(2, True, with_lengths, torch.float32, rng))
    x, h0, c0 = (t.to(torch.bfloat16).requires_grad_() for t in (x, h0, c0))
    master = [w.requires_grad_() for w in weights]
    rounded = []
    for d in range(2):
        w_ih, w_hh, b_ih, b_hh = (w.detach() for w in weights[4 * d:4 * d + 4])
        rounded += [w_ih.to(torch.bfloat16), w_hh.to(torch.bfloat16),
                    (b_ih + b_hh).to(torch.bfloat16), torch.zeros(b_hh.shape, dtype=torch.bfloat16)]
    rounded = [w.requires_grad_() for w in rounded]
    got = ops.lstm_layer(x, master, h0, c0, lengths)
    want = ops.lstm_layer(x, rounded, h0, c0, lengths)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    proj = [randn(*t.shape, rng=rng).to(torch.bfloat16) for t in want]
    loss = lambda outs: sum((o * p).sum() for o, p in zip(outs, proj))  # noqa: E731
    g_got = torch.autograd.grad(loss(got), master)
    g_want = torch.autograd.grad(loss(want), rounded)
    for name, g, w in zip(weight_names(weights, 2), g_got, g_want):
        assert g.dtype == torch.float32, name
        assert_close_rel(g, w.float(), 1e-2, f"grad of {name}")
    args = [x.detach(), [w.detach() for w in master], h0.detach(), c0.detach()]
    torch.library.opcheck(torch.ops.cnnlstm_ext.lstm_layer_forward, (*args, lengths, False))


# --- torch.compile --------------------------------------------------------------------------------

class BiLSTMClassifier(nn.Module):
    """x: [B, T, I] -> logits [B, classes] from the mean of the BiLSTM outputs."""

    def __init__(self, lstm: nn.Module, classes: int = 3):
        super().__init__()
        self.lstm = lstm
        self.head = nn.Linear(2 * (lstm.proj_size or lstm.hidden_size), classes)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.head(y.mean(dim=1))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_matches_eager(backend, rng):
    model = BiLSTMClassifier(FusedBiLSTM(I, H, num_layers=2, batch_first=True))
    assert_compiled_matches_eager(model, randn(B, T, I, rng=rng).float(), backend)


class Autocast(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(x).float()


def test_compile_fullgraph_under_autocast_matches_eager(rng):
    """float32 parameters, bfloat16 activations: the fake kernels follow the op's cast of the
    weights, and the gradients reach the parameters in float32 as in eager mode."""
    model = Autocast(BiLSTMClassifier(FusedBiLSTM(I, H, num_layers=2, batch_first=True)))
    assert_compiled_matches_eager(model, randn(B, T, I, rng=rng).float(), "aot_eager")


def test_torch_export_keeps_the_fused_op(rng):
    """torch.export traces the module through the op's fake kernel: one lstm_layer_forward node
    per layer in the exported graph, and the exported program computes what the module does."""
    torch.manual_seed(8)
    fused = FusedBiLSTM(I, H, num_layers=2).eval()
    x = randn(T, B, I, rng=rng).float()
    lengths = torch.tensor([T, 2, 1])
    exported = torch.export.export(fused, (x,), {"lengths": lengths})
    ops_called = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert ops_called.count(torch.ops.cnnlstm_ext.lstm_layer_forward.default) == 2
    out, (h_n, c_n) = exported.module()(x, lengths=lengths)
    want, (h_want, c_want) = fused(x, lengths=lengths)
    for got, ref in ((out, want), (h_n, h_want), (c_n, c_want)):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


# --- optimizer state, fuse/unfuse, state dicts ---------------------------------------------------

def adamw_steps(model, opt, batches):
    losses = []
    for x, target in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("proj_size", [0, 3])
@pytest.mark.parametrize("direction", ["nn_to_fused", "fused_to_nn"])
def test_adamw_training_continues_after_moving_state(direction, proj_size, rng):
    # Train 3 steps with one implementation, move model and optimizer state into the other, then
    # 3 more steps on both: the two trajectories must stay together (weight_hr_l{k} included).
    src_cls, dst_cls = (nn.LSTM, FusedLSTM) if direction == "nn_to_fused" else (FusedLSTM, nn.LSTM)
    make = lambda cls: BiLSTMClassifier(  # noqa: E731
        cls(I, H, num_layers=2, bidirectional=True, batch_first=True, proj_size=proj_size))
    batches = [(randn(B, T, I, rng=rng).float(), torch.randint(0, 3, (B,), generator=rng))
               for _ in range(6)]
    src = make(src_cls)
    src_opt = torch.optim.AdamW(src.parameters(), lr=1e-2, weight_decay=1e-4)
    adamw_steps(src, src_opt, batches[:3])

    # Through a checkpoint in memory: load_state_dict alone would alias src's optimizer tensors.
    buffer = io.BytesIO()
    torch.save({"model": src.state_dict(), "optimizer": src_opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    dst = make(dst_cls)
    dst.load_state_dict(checkpoint["model"])
    dst_opt = torch.optim.AdamW(dst.parameters(), lr=1e-2, weight_decay=1e-4)
    dst_opt.load_state_dict(checkpoint["optimizer"])
    src_losses = adamw_steps(src, src_opt, batches[3:])
    dst_losses = adamw_steps(dst, dst_opt, batches[3:])

    assert dst_losses == pytest.approx(src_losses, rel=1e-5)
    assert list(dst.state_dict()) == list(src.state_dict())
    for (name, p_dst), p_src in zip(dst.named_parameters(), src.parameters()):
        torch.testing.assert_close(p_dst, p_src, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
        state_dst, state_src = dst_opt.state[p_dst], src_opt.state[p_src]
        assert float(state_dst["step"]) == float(state_src["step"]) == 6
        torch.testing.assert_close(state_dst["exp_avg_sq"], state_src["exp_avg_sq"], rtol=1e-4,
                                   atol=1e-12, msg=lambda m: f"exp_avg_sq of {name}: {m}")


class NestedLSTMs(nn.Module):
    """LSTMs at several depths, one of them with projections."""

    def __init__(self):
        super().__init__()
        self.frame = nn.Linear(I, I)
        self.temporal = nn.ModuleDict({"lstm": nn.LSTM(I, H, num_layers=2, bidirectional=True)})
        self.blocks = nn.Sequential(nn.Sequential(nn.LSTM(2 * H, H, batch_first=False)))
        self.projected = nn.LSTM(H, H, proj_size=2)

    def forward(self, x):  # x: [T, B, I]
        y, _ = self.temporal["lstm"](torch.tanh(self.frame(x)))
        y, _ = self.blocks[0][0](y)
        y, _ = self.projected(y)
        return y


def test_fuse_unfuse_round_trip_keeps_parameters_and_outputs(rng):
    model = NestedLSTMs()
    params_before = [(name, id(p)) for name, p in model.named_parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before fusing
    x = randn(T, B, I, rng=rng).float()
    out_nn = model(x)

    assert fuse_lstm(model) is model
    assert type(model.temporal["lstm"]) is FusedLSTM
    assert type(model.blocks[0][0]) is FusedLSTM
    assert type(model.projected) is FusedLSTM and model.projected.proj_size == 2
    assert [(name, id(p)) for name, p in model.named_parameters()] == params_before
    out_fused = model(x)
    torch.testing.assert_close(out_fused, out_nn, rtol=1e-5, atol=1e-6)

    # The optimizer built on the nn.LSTM parameters steps the fused model.
    lstm_weight = model.temporal["lstm"].weight_hh_l0_reverse
    before = lstm_weight.detach().clone()
    opt.zero_grad()
    out_fused.square().sum().backward()
    assert lstm_weight.grad is not None and lstm_weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(lstm_weight, before)
    out_stepped = model(x)

    assert unfuse_lstm(model) is model
    assert type(model.temporal["lstm"]) is nn.LSTM
    assert type(model.blocks[0][0]) is nn.LSTM
    assert [(name, id(p)) for name, p in model.named_parameters()] == params_before
    torch.testing.assert_close(model(x), out_stepped, rtol=1e-5, atol=1e-6)


def test_fuse_lstm_of_bare_lstm_returns_fused_module(rng):
    lstm = nn.LSTM(I, H, num_layers=2, dropout=0.25).eval()
    fused = fuse_lstm(lstm)
    assert isinstance(fused, FusedLSTM) and not fused.training and fused.dropout == 0.25
    assert all(a is b for a, b in zip(fused.parameters(), lstm.parameters()))
    back = unfuse_lstm(fused)
    assert type(back) is nn.LSTM and not back.training
    assert all(a is b for a, b in zip(back.parameters(), lstm.parameters()))
    x = randn(T, B, I, rng=rng).float()
    torch.testing.assert_close(fused(x)[0], lstm(x)[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(back(x)[0], lstm(x)[0], rtol=0, atol=0)


def test_dropout_of_one_layer_warns_as_nn_lstm_does():
    with pytest.warns(UserWarning, match="dropout option adds dropout") as nn_warned:
        lstm = nn.LSTM(I, H, num_layers=1, dropout=0.5)
    with pytest.warns(UserWarning, match="dropout option adds dropout") as warned:
        FusedLSTM(I, H, num_layers=1, dropout=0.5)
    assert str(warned[0].message) == str(nn_warned[0].message)
    with warnings.catch_warnings():  # converting a module does not warn a second time
        warnings.simplefilter("error")
        unfuse_lstm(fuse_lstm(lstm))
        FusedLSTM(I, H, num_layers=2, dropout=0.5)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("bidirectional", DIRECTIONS)
@pytest.mark.parametrize("num_layers", LAYERS)
def test_state_dict_and_parameters_match_nn_lstm(num_layers, bidirectional, bias):
    ref = nn.LSTM(I, H, num_layers=num_layers, bidirectional=bidirectional, bias=bias)
    fused = FusedLSTM(I, H, num_layers=num_layers, bidirectional=bidirectional, bias=bias)
    describe = lambda sd: [(k, tuple(v.shape), v.dtype) for k, v in sd.items()]  # noqa: E731
    assert describe(fused.state_dict()) == describe(ref.state_dict())
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in fused.named_buffers()] == [n for n, _ in ref.named_buffers()]
    assert fused._flat_weights_names == ref._flat_weights_names
    # Both directions load strictly.
    ref.load_state_dict(fused.state_dict())
    fused.load_state_dict(ref.state_dict())


def test_fused_bilstm_is_a_bidirectional_fused_lstm():
    bi = FusedBiLSTM(I, H, num_layers=3, batch_first=True)
    assert isinstance(bi, FusedLSTM) and bi.bidirectional and bi.batch_first
    ref = nn.LSTM(I, H, num_layers=3, batch_first=True, bidirectional=True)
    assert list(bi.state_dict()) == list(ref.state_dict())
    assert repr(bi) == repr(ref).replace("LSTM(", "FusedBiLSTM(", 1)


def test_initialisation_matches_nn_lstm_range(rng):
    bound = 1.0 / H ** 0.5
    for p in FusedLSTM(I, H, num_layers=2, bidirectional=True).parameters():
        assert p.abs().max() <= bound and p.std() > bound / 4  # U(-1/sqrt(H), 1/sqrt(H))


@pytest.mark.parametrize("seed", [0, 1234])
@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("bidirectional", DIRECTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_initialisation_equals_nn_lstm_under_one_seed(seed, layers, bias, bidirectional, dtype):
    kwargs = dict(input_size=I, hidden_size=H, num_layers=layers, bias=bias,
                  bidirectional=bidirectional, dtype=dtype)
    torch.manual_seed(seed)
    ref = nn.LSTM(**kwargs)
    torch.manual_seed(seed)
    fused = FusedLSTM(**kwargs)
    expected = dict(ref.named_parameters())
    got = dict(fused.named_parameters())
    assert list(got) == list(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected), \
        [name for name in expected if not torch.equal(got[name], expected[name])]


@pytest.mark.parametrize("seed", [0, 1234])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_bilstm_initialisation_equals_nn_lstm_under_one_seed(seed, layers, bias):
    torch.manual_seed(seed)
    ref = nn.LSTM(I, H, layers, bias=bias, bidirectional=True)
    torch.manual_seed(seed)
    fused = FusedBiLSTM(I, H, layers, bias=bias)
    expected = dict(ref.named_parameters())
    got = dict(fused.named_parameters())
    assert list(got) == list(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected), \
        [name for name in expected if not torch.equal(got[name], expected[name])]


def test_reset_parameters_equals_nn_lstm_under_one_seed():
    ref, fused = nn.LSTM(I, H, 2, bidirectional=True), FusedLSTM(I, H, 2, bidirectional=True)
    torch.manual_seed(7)
    ref.reset_parameters()
    torch.manual_seed(7)
    fused.reset_parameters()
    assert all(torch.equal(p, q) for p, q in zip(fused.parameters(), ref.parameters()))

# --- errors --------------------------------------------------------------------------------------

@pytest.fixture
def bi2():
    """FusedLSTM(3, 4, num_layers=2, bidirectional=True): 4 states of [B, 4]."""
    return FusedLSTM(I, H, num_layers=2, bidirectional=True)


def test_error_wrong_feature_size(bi2):
    with pytest.raises(RuntimeError, match=r"input.size\(-1\) must be equal to input_size. "
                                           r"Expected 3, got 5"):
        bi2(torch.randn(T, B, 5))


@pytest.mark.parametrize("which", ["h0", "c0"])
def test_error_wrong_state_shape(bi2, which):
    good, bad = torch.randn(4, B, H), torch.randn(2, B, H)
    hx = (bad, good) if which == "h0" else (good, bad)
    name = "hidden\\[0\\]" if which == "h0" else "hidden\\[1\\]"
    with pytest.raises(RuntimeError, match=rf"Expected {name} size \(4, 3, 4\), got \[2, 3, 4\]"):
        bi2(torch.randn(T, B, I), hx)


def test_error_state_dims_do_not_match_input(bi2):
    with pytest.raises(RuntimeError, match="For batched 3-D input, hx and cx should also be 3-D"):
        bi2(torch.randn(T, B, I), (torch.randn(4, H), torch.randn(4, H)))
    with pytest.raises(RuntimeError, match="For unbatched 2-D input, hx and cx should also be 2-D"):
        bi2(torch.randn(T, I), (torch.randn(4, B, H), torch.randn(4, B, H)))


def test_error_input_not_2d_or_3d(bi2):
    with pytest.raises(ValueError, match="Expected input to be 2D or 3D, got 4D"):
        bi2(torch.randn(T, B, 1, I))


def test_error_input_dtype_differs_from_parameters(bi2):
    # nn.LSTM's ValueError and words.
    with pytest.raises(ValueError, match=r"RNN input dtype \(torch.float64\) does not match weight "
                                         r"dtype \(torch.float32\)"):
        bi2(torch.randn(T, B, I, dtype=torch.float64))


def test_error_state_dtype_differs_from_parameters(bi2):
    hx = (torch.randn(4, B, H), torch.randn(4, B, H, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="cx has dtype torch.bfloat16 but the parameters have "
                                           "dtype torch.float32"):
        bi2(torch.randn(T, B, I), hx)


def test_error_input_on_other_device_than_parameters(bi2):
    with pytest.raises(RuntimeError, match="Input and parameter tensors are not at the same device, "
                                           "found input tensor at meta and parameter tensor at cpu"):
        bi2(torch.randn(T, B, I, device="meta"))


@pytest.mark.skipif(cnnlstm_ext.cuda_kernels_built(),
                    reason="this build has the CUDA kernels; the error is for builds without them")
def test_error_cuda_tensor_without_cuda_kernels():
    # Fake CUDA tensors need no GPU, so the check is exercised on any machine.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        lstm = FusedLSTM(I, H, device="cuda")
        x = torch.randn(T, B, I, device="cuda")
        with pytest.raises(RuntimeError, match="built without its CUDA kernels"):
            lstm(x)


@pytest.mark.parametrize("bad", [0, T + 1], ids=["zero", "longer_than_T"])
def test_error_lengths_out_of_range(bi2, bad):
    with pytest.raises(ValueError, match=rf"lengths must be in \[1, {T}\] \(the padded length\)"):
        bi2(torch.randn(T, B, I), lengths=torch.tensor([2, bad, 1]))


@pytest.mark.parametrize("lengths", [torch.tensor([2, 1]), torch.tensor([[2, 1, 3]])],
                         ids=["too_few", "2d"])
def test_error_lengths_wrong_shape(bi2, lengths):
    with pytest.raises(ValueError, match=r"lengths must have shape \[3\]"):
        bi2(torch.randn(T, B, I), lengths=lengths)


def test_error_lengths_not_integer(bi2):
    with pytest.raises(TypeError, match="lengths must be an integer tensor, got torch.float32"):
        bi2(torch.randn(T, B, I), lengths=torch.tensor([2.0, 1.0, 3.0]))


def test_error_lengths_with_packed_sequence(bi2):
    packed = pack_padded_sequence(torch.randn(T, B, I), torch.tensor([5, 3, 1]))
    with pytest.raises(ValueError, match="lengths cannot be given with a PackedSequence"):
        bi2(packed, lengths=torch.tensor([5, 3, 1]))


def raw_inputs(D=2, **shapes):
    """Valid lstm_layer_forward arguments (float32, biases, no lengths, train=True); `shapes`
    gives other shapes to weights of every direction by kind (w_ih, w_hh, b_ih, b_hh)."""
    kinds = {"w_ih": (4 * H, I), "w_hh": (4 * H, H), "b_ih": (4 * H,), "b_hh": (4 * H,), **shapes}
    weights = [torch.randn(*shape) for _ in range(D) for shape in kinds.values()]
    return dict(x=torch.randn(T, B, I), weights=weights, h0=torch.randn(D, B, H),
                c0=torch.randn(D, B, H), lengths=None, train=True)


def with_weight(k, t):
    """raw_inputs() with weights[k] replaced by t."""
    a = raw_inputs()
    a["weights"][k] = t
    return a


@pytest.mark.parametrize("args, message", [
    (raw_inputs(w_hh=(12, 4)), r"expected each w_hh of shape \[4H, H\], got \[12, 4\]"),
    (raw_inputs(w_ih=(16, 5)), r"expected each w_ih of shape \[16, 3\], got \[16, 5\]"),
    (raw_inputs(b_ih=(15,), b_hh=(15,)), r"expected bias of shape \[2, 16\], got \[2, 15\]"),
    (with_weight(5, torch.randn(16, 5)),
     r"weights\[5\] \(w_hh of direction 1\) has shape \[16, 5\] but direction 0's w_hh has shape "
     r"\[16, 4\]"),
    (with_weight(2, torch.randn(16, dtype=torch.float64)),
     r"weights\[2\] \(b_ih of direction 0\) has dtype Double but weights\[0\] has dtype Float; "
     r"the weights must share one dtype"),
    ({**raw_inputs(), "weights": raw_inputs()["weights"][:3]},
     r"expected weights to hold 2 tensors per direction \(w_ih, w_hh\) or 4 \(w_ih, w_hh, b_ih, "
     r"b_hh\), for D = h0.size\(0\) = 2 directions; got 3 tensors"),
    ({**raw_inputs(), "h0": torch.randn(1, B, H)},
     r"expected weights to hold .* for D = h0.size\(0\) = 1 directions; got 8 tensors"),
    ({**raw_inputs(), "c0": torch.randn(1, B, H)},
     r"expected c0 of shape \[2, 3, 4\], got \[1, 3, 4\]"),
    ({**raw_inputs(), "x": torch.randn(T, I)}, r"expected x of shape \[T, B, I\], got \[5, 3\]"),
    ({**raw_inputs(), "c0": torch.randn(2, B, H, dtype=torch.float64)},
     r"c0 has dtype Double but x has dtype Float"),
    ({**raw_inputs(), "lengths": torch.tensor([1, 2, 3], dtype=torch.int32)},
     r"expected lengths of dtype int64, got Int"),
    ({**raw_inputs(), "lengths": torch.tensor([1, 2])},
     r"expected lengths of shape \[3\], got \[2\]"),
    ({**raw_inputs(), "lengths": torch.tensor([1, 0, 3])},
     r"lengths\[1\] = 0 is out of range; every length must be in \[1, T=5\]"),
    ({**raw_inputs(), "lengths": torch.tensor([1, 6, 3])}, r"lengths\[1\] = 6 is out of range"),
    ({**raw_inputs(), "x": torch.randn(T, B, I).int()},
     r"expected x of dtype float32, float64, bfloat16 or float16, got Int"),
], ids=["w_hh_shape", "w_ih_shape", "bias_shape", "directions_differ", "weight_dtype",
        "weight_count", "h0_directions", "c0_shape", "x_2d", "c0_dtype", "lengths_dtype",
        "lengths_shape", "lengths_zero", "lengths_over_T", "x_int"])
def test_error_raw_op_checks(args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.cnnlstm_ext.lstm_layer_forward(**args)


def test_error_raw_op_mixed_meta_and_cpu():
    args = with_weight(0, torch.randn(4 * H, I, device="meta"))
    with pytest.raises(RuntimeError, match=r"weights\[0\] \(w_ih of direction 0\) is on meta but x "
                                           r"is on cpu"):
        torch.ops.cnnlstm_ext.lstm_layer_forward(**args)


def test_error_raw_op_backward_after_inference_forward():
    a = raw_inputs()
    y, h_n, c_n, gates, cell = torch.ops.cnnlstm_ext.lstm_layer_forward(**{**a, "train": False})
    with pytest.raises(RuntimeError, match="the forward ran with train=False and saved nothing"):
        torch.ops.cnnlstm_ext.lstm_layer_backward(
            torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(c_n), a["x"], a["weights"],
            a["h0"], a["c0"], None, y, gates, cell)


def test_error_autograd_through_inference_forward():
    a = raw_inputs()
    x = a["x"].requires_grad_()
    y, *_ = torch.ops.cnnlstm_ext.lstm_layer_forward(**{**a, "x": x, "train": False})
    with pytest.raises(RuntimeError, match="run lstm_layer_forward with train=True"):
        y.sum().backward()


# --- parameter layout and CPU kernel variants ---------------------------------------------------

def _directions_back_to_back(model, name):
    a, b = getattr(model, name), getattr(model, name + "_reverse")
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and b.storage_offset() == a.storage_offset() + a.numel())


def _storages(model):
    return [p.untyped_storage().data_ptr() for p in model.parameters()]


def test_cpu_parameters_have_storages_of_their_own_as_nn_lstm_and_train_like_it():
    """On the CPU no two parameters share a storage, as nn.LSTM's (the kernels read each
    direction where it lies), so tools that refuse shared storage take the module:
    safetensors' save_model and load_model."""
    safetensors = pytest.importorskip("safetensors.torch")
    torch.manual_seed(3)
    lstm = nn.LSTM(6, 5, 2, bidirectional=True)
    fused = fuse_lstm(lstm)
    assert fused.weight_hh_l1 is lstm.weight_hh_l1  # Parameter objects still shared
    for model in (fused, FusedLSTM(6, 5, 2, bidirectional=True).double(),
                  FusedLSTM(6, 5, 2, bidirectional=True, device="meta").to_empty(device="cpu")):
        assert len(set(_storages(model))) == len(_storages(model))
    reloaded = FusedBiLSTM(6, 5, 2)
    reloaded.load_state_dict({k: v.clone() for k, v in fused.state_dict().items()}, assign=True)
    assert len(set(_storages(reloaded))) == len(_storages(reloaded))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "lstm.safetensors")
        safetensors.save_model(fused, path)
        safetensors.load_model(reloaded, path)
    x = torch.randn(4, 3, 6)
    assert torch.equal(reloaded(x)[0], fused(x)[0])
    _assert_grads_match_nn_lstm(fused, lambda model: model(x)[0].square().sum().backward())


def _assert_grads_match_nn_lstm(fused, backward, atol=1e-6):
    """Runs backward(model) for `fused` and for an nn.LSTM with its state; compares the .grad."""
    baseline = nn.LSTM(fused.input_size, fused.hidden_size, fused.num_layers, bidirectional=True)
    baseline.load_state_dict(fused.state_dict())
    for model in (fused, baseline):
        backward(model)
    for (name, p), q in zip(fused.named_parameters(), baseline.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=atol, msg=name)


@pytest.mark.parametrize("how", ["two_backward_passes", "two_calls_in_one_graph"])
def test_gradients_accumulate_like_nn_lstm(how):
    """Gradients that add up in .grad (accumulation over backward passes, or the module used
    twice in one graph) must match nn.LSTM's: b_ih and b_hh get the same gradient from the op,
    and neither may alias the other's .grad, or the second addition would reach both."""
    torch.manual_seed(6)
    fused = FusedBiLSTM(6, 5, 2)
    x1, x2 = torch.randn(4, 3, 6), torch.randn(4, 3, 6)

    def backward(model):
        if how == "two_backward_passes":
            model(x1)[0].square().sum().backward()
            model(x2)[0].square().sum().backward()
        else:
            (model(x1)[0].square().sum() + model(x2)[0].sin().sum()).backward()
    _assert_grads_match_nn_lstm(fused, backward, atol=1e-5)
    assert fused.bias_ih_l0.grad.data_ptr() != fused.bias_hh_l0.grad.data_ptr()


def _store_back_to_back(model):
    """Each kind's directions moved into one buffer, as a GPU module keeps them (and a CPU module
    pickled by an earlier version did)."""
    with torch.no_grad():
        for name, _ in list(model.named_parameters()):
            if name.endswith("_reverse"):
                a, b = getattr(model, name[:-len("_reverse")]), getattr(model, name)
                a.data, b.data = torch.stack([a.detach(), b.detach()])


def test_training_with_directions_stored_back_to_back_matches_nn_lstm():
    """The CPU kernels read directions stored back to back in one buffer as well, with the same
    gradients; flatten_parameters (as after .to()) gives them storages of their own again."""
    torch.manual_seed(4)
    fused = FusedBiLSTM(6, 5, 2)
    _store_back_to_back(fused)
    assert _directions_back_to_back(fused, "weight_hh_l1")
    x = torch.randn(4, 3, 6)
    _assert_grads_match_nn_lstm(fused, lambda model: model(x)[0].square().sum().backward())
    before = fused(x)[0]
    fused.flatten_parameters()
    assert len(set(_storages(fused))) == len(_storages(fused))
    assert torch.equal(fused(x)[0], before)


def _no_grad_matches_nn_lstm(fused, x):
    ref = FusedLSTM.to_lstm(fused)
    with torch.no_grad():
        out_f, (h_f, c_f) = fused(x)
        out_r, (h_r, c_r) = ref(x)
    for name, f, r in (("output", out_f, out_r), ("h_n", h_f, h_r), ("c_n", c_f, c_r)):
        torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-6, msg=name)


def test_no_grad_calls_follow_parameter_changes():
    """The op views the parameters in place; every way of changing one must show."""
    torch.manual_seed(5)
    fused = FusedBiLSTM(6, 5, 2)
    x = torch.randn(4, 3, 6)
    with torch.no_grad():
        first = fused(x)[0]
        assert torch.equal(fused(x)[0], first)
    with torch.no_grad():  # in place, as an optimizer step does
        fused.bias_hh_l1_reverse.add_(0.25)
        fused.weight_hh_l0.mul_(1.5)
    _no_grad_matches_nn_lstm(fused, x)
    fused.weight_ih_l1 = nn.Parameter(torch.randn_like(fused.weight_ih_l1))  # replaced
    _no_grad_matches_nn_lstm(fused, x)
    fused.weight_hh_l1_reverse.data = torch.randn(20, 5)  # .data swapped
    _no_grad_matches_nn_lstm(fused, x)
    fused.load_state_dict(FusedBiLSTM(6, 5, 2).state_dict())
    _no_grad_matches_nn_lstm(fused, x)
    with torch.inference_mode():
        fused(x)
    _no_grad_matches_nn_lstm(fused, x)
    # Training after no-grad calls builds its own (differentiable) operands.
    fused(x)[0].sum().backward()
    assert all(p.grad is not None for p in fused.parameters())


def test_backward_allocates_nothing_of_the_saved_activations_size():
    """Autograd must not materialise zero gradients for the saved gates and cell.

    Each is as large as the layer's activations ([T, B, D, 4H] and [T, B, D, H]); zeros of their
    size would sit at the peak of a training step for nothing.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.seen.update(tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            return out

    torch.manual_seed(7)
    T, B, I, H = 5, 3, 6, 4
    fused = FusedBiLSTM(I, H, 2)
    x = torch.randn(T, B, I, requires_grad=True)
    for use in ("output", "h_n"):
        out, (h_n, _) = fused(x)
        loss = out.square().sum() if use == "output" else h_n.square().sum()
        shapes = Shapes()
        with shapes:
            loss.backward()
        assert x.grad is not None and x.grad.abs().sum() > 0, use
        assert (T, B, 2, 4 * H) not in shapes.seen, use  # gates
        assert (T, B, 2, H) not in shapes.seen, use      # cell
        x.grad = None


def test_zero_initial_state_follows_batch_and_dtype():
    """hx=None reuses a zero state between calls; a new batch size or dtype must get its own."""
    torch.manual_seed(6)
    fused = FusedBiLSTM(6, 5, 2)
    for batch in (3, 2, 3):
        x = torch.randn(4, batch, 6)
        zeros = torch.zeros(4, batch, 5)
        out, (h_n, c_n) = fused(x)
        ref, (h_ref, c_ref) = fused(x, (zeros, zeros.clone()))
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        torch.testing.assert_close((h_n, c_n), (h_ref, c_ref), rtol=0, atol=0)
        out.sum().backward()  # the cached zeros are saved for backward, never written
    assert not fused._zero_state[1][0][0].any()
    fused.double()  # _apply drops the float32 state
    assert fused._zero_state is None
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    _no_grad_matches_nn_lstm(fused, x)
    assert fused._zero_state[1][0][0].dtype == torch.float64
    assert copy.deepcopy(fused)._zero_state is None


def test_copies_run_on_their_own_parameters():
    fused = FusedBiLSTM(6, 5, 2)
    x = torch.randn(4, 3, 6)
    with torch.no_grad():
        fused(x)
    copied = copy.deepcopy(fused)
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        fused.weight_hh_l0.mul_(2)  # the original changes; the copies must not follow
    for model in (copied, loaded):
        assert not torch.equal(model.weight_hh_l0, fused.weight_hh_l0)
        _no_grad_matches_nn_lstm(model, x)


def test_unpickles_modules_saved_by_earlier_versions():
    """torch.save(module) of an earlier version held the per-layer names grouped by kind and a
    cache of stacked weights; loading rebuilds the names and drops the cache."""
    fused = FusedBiLSTM(6, 5, 2)
    fused._layer_names = [[list(kind) for kind in zip(*fused._all_weights[2 * layer:2 * layer + 2])]
                          for layer in range(2)]
    fused._weight_cache = {}
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert not hasattr(loaded, "_weight_cache")
    _no_grad_matches_nn_lstm(loaded, torch.randn(4, 3, 6))


# The vector kernels against the reference: batches that do not fill a row group, one and two
# directions, gate slices of one, two and three column blocks, the float32 product with the batch
# in the vector lanes (32 rows, 30 padded to 32, two groups of 32), lengths, forward and every
# gradient. argv: the dtype, the tolerance (relative to each tensor's largest magnitude) and
# optionally a file for the results.
KERNEL_CASE = """
import sys
import torch
from cnnlstm_ext import ops, reference
dtype, tol = getattr(torch, sys.argv[1]), float(sys.argv[2])
torch.manual_seed(0)
results = []
trace = ops.recorded_kernels()
ran = trace.__enter__()
for b, h, d in ((1, 16, 2), (3, 16, 1), (5, 32, 2), (9, 48, 1), (13, 32, 2), (37, 64, 2),
                (6, 160, 2), (32, 64, 2), (30, 128, 1), (64, 64, 1)):
    t, i = 6, 24
    shapes = [(4 * h, i), (4 * h, h), (4 * h,), (4 * h,)] * d
    x64 = [torch.randn(t, b, i, dtype=torch.float64),
           *(torch.randn(s, dtype=torch.float64) * (0.3 if k % 4 == 1 else 1)
             for k, s in enumerate(shapes)),
           torch.randn(d, b, h, dtype=torch.float64), torch.randn(d, b, h, dtype=torch.float64)]
    lengths = torch.randint(1, t + 1, (b,))
    lengths[0] = t
    xs = [a.to(dtype).requires_grad_() for a in x64]
    x64 = [a.to(dtype).double().requires_grad_() for a in x64]
    out = ops.lstm_layer(xs[0], xs[1:-2], xs[-2], xs[-1], lengths)
    ref = reference.lstm_layer(x64[0], x64[1:-2], x64[-2], x64[-1], lengths)
    proj = [torch.randn(o.shape, dtype=torch.float64) for o in ref]
    g = torch.autograd.grad(sum((o.double() * p).sum() for o, p in zip(out, proj)), xs)
    gr = torch.autograd.grad(sum((o * p).sum() for o, p in zip(ref, proj)), x64)
    for a, r in zip(list(out) + list(g), list(ref) + list(gr)):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), r, rtol=tol, atol=tol * r.abs().max().item())
    results += [a.detach() for a in list(out) + list(g)]
trace.__exit__(None, None, None)
if len(sys.argv) > 3:
    torch.save(results, sys.argv[3])
print(" ".join(sorted(set(ran))))
print(torch.backends.cpu.get_cpu_capability())
"""


def _cpu_has(capability: str) -> bool:
    order = ["DEFAULT", "AVX2", "AVX512"]
    best = torch.backends.cpu.get_cpu_capability()
    return best in order and order.index(best) >= order.index(capability)


def _onednn_gemm_available() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("mkldnn::_linear_pointwise", "CPU")


# (ATEN_CPU_CAPABILITY, CNNLSTM_EXT_CPU_GEMM): the recurrent product's AVX-512 kernel (where the
# CPU has it), its AVX2 kernel, the baseline build's at::bmm; the large GEMMs through oneDNN and
# through ATen.
KERNEL_CHOICES = [(None, "onednn"), (None, "aten"), ("avx2", "auto"), ("default", "auto")]


def _expected_cpu_kernels(capability, gemm):
    """The kernel names (ops.recorded_kernels) a float32 layer with H a multiple of 16 must run
    under ATEN_CPU_CAPABILITY=capability (None: this CPU's best) and CNNLSTM_EXT_CPU_GEMM=gemm."""
    best = capability.upper() if capability else torch.backends.cpu.get_cpu_capability()
    product = {"AVX512": "avx512", "AVX2": "avx2"}.get(best, "bmm")
    cell = {"AVX512": "avx512", "AVX2": "avx2"}.get(best, "default")
    library = "aten" if gemm == "aten" or not _onednn_gemm_available() else "onednn"
    # from 32 rows, the AVX-512 forward product holds the batch in the vector lanes
    forward = [product] + (["avx512-batch"] if best == "AVX512" else [])
    return {f"cpu:gemm:{library}", f"cpu:lstm_backward:{product}:cell-{cell}",
            *(f"cpu:lstm_forward:{p}:cell-{cell}" for p in forward)}


@pytest.mark.parametrize("capability,gemm", KERNEL_CHOICES,
                         ids=["best-onednn", "best-aten", "avx2", "baseline"])
def test_recurrent_product_kernels_match_reference(capability, gemm, tmp_path):
    """float32 with H a multiple of 16 takes the vector recurrent-product kernels (AVX-512, with
    the batch in the vector lanes from 32 rows, or AVX2), the baseline build at::bmm: batches that
    do not fill a row group, one and two directions, gate slices of one, two and three column
    blocks, lengths, forward and every gradient (in a fresh process for each setting)."""
    import subprocess
    import sys

    from conftest import subprocess_env
    if capability == "avx2" and not _cpu_has("AVX2"):
        pytest.skip("this CPU has no AVX2")
    if gemm == "onednn" and not _onednn_gemm_available():
        pytest.skip("this torch has no CPU mkldnn::_linear_pointwise")
    extra = {"CNNLSTM_EXT_CPU_GEMM": gemm}
    if capability:
        extra["ATEN_CPU_CAPABILITY"] = capability
    run = subprocess.run([sys.executable, "-c", KERNEL_CASE, "float32", "1e-5"],
                         env=subprocess_env(**extra), cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    kernels, ran_capability = run.stdout.strip().splitlines()[-2:]
    if capability:
        assert ran_capability == capability.upper()
    assert set(kernels.split()) == _expected_cpu_kernels(capability, gemm)


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
                    reason="the oneDNN GEMM is checked where the CI runs: x86-64 Linux")
def test_large_gemms_find_onednn():
    """The CPU op runs its large GEMMs through torch's oneDNN matmul, found by name at run time
    (a torch without it falls back to ATen's mm). Fails if this torch no longer has it, which
    would make those GEMMs 10-30% slower without any error."""
    assert torch.backends.mkldnn.is_available()
    assert _onednn_gemm_available()


@pytest.mark.skipif(not _onednn_gemm_available(),
                    reason="this torch has no CPU mkldnn::_linear_pointwise")
# torch.backends.mkldnn.flags() itself warns about a GPU feature on CPU-only builds
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
@pytest.mark.parametrize("enabled", [True, False])
def test_large_gemms_follow_mkldnn_flag(enabled):
    """The float32 forward and backward run their large GEMMs through oneDNN, unless
    torch.backends.mkldnn is disabled (then ATen's mm, as nn.LSTM leaves oneDNN too)."""
    from torch.profiler import profile
    model = FusedLSTM(8, 16, bidirectional=True)
    x = torch.randn(5, 3, 8, requires_grad=True)
    with torch.backends.mkldnn.flags(enabled=enabled), profile() as prof:
        model(x)[0].sum().backward()
    names = {e.name for e in prof.events()}
    assert ("mkldnn::_linear_pointwise" in names) == enabled
    assert enabled or "aten::mm" in names or "aten::addmm" in names


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_low_precision_error_at_most_twice_float32_accumulation(dtype, bidirectional):
    """16-bit layers keep the README's promise (float32 sums and cell state): over T=40 steps the
    error against float64 is at most twice that of the float32-accumulating reference, forward and
    gradients, where an LSTM computed entirely in the 16-bit dtype fails the same rule."""
    torch.manual_seed(7)
    model = FusedLSTM(32, 32, 2, bidirectional=bidirectional).to(dtype)
    errors = low_precision_errors(model, dtype, steps=40, batch=4, seed=11)
    assert low_precision_verdict(errors, "fused") == {}
    assert low_precision_verdict(errors, "all_low") != {}, "the rule does not bite"


def test_bfloat16_kernels_match_reference(tmp_path):
    """bfloat16 through the AVX512-BF16 and AMX products (where this CPU has them; AMX from 4 rows
    with H a multiple of 32), through the AVX512-BF16 product alone (ONEDNN_MAX_CPU_ISA without
    AMX) and through the float32 computation (ATEN_CPU_CAPABILITY=avx2): all match the float64
    reference on the same rounded inputs, forward and every gradient; on an AVX512-BF16 CPU the
    bfloat16 kernels' results differ from the float32 computation's, elsewhere they are the same
    computation."""
    import subprocess

    from conftest import subprocess_env
    if not _cpu_has("AVX2"):
        pytest.skip("this CPU has no AVX2")
    results, kernels = {}, {}
    settings = {"best": {}, "no-amx": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
                "avx2": {"ATEN_CPU_CAPABILITY": "avx2"}}
    for name, extra in settings.items():
        path = tmp_path / f"{name}.pt"
        env = subprocess_env(**extra)
        if name == "best":  # (a limit set where the tests run would take AMX away)
            env.pop("ONEDNN_MAX_CPU_ISA", None)
            env.pop("DNNL_MAX_CPU_ISA", None)
        run = subprocess.run([sys.executable, "-c", KERNEL_CASE, "bfloat16", "2e-2", str(path)],
                             env=env, cwd=tmp_path, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        results[name] = torch.load(path)
        kernels[name] = set(run.stdout.strip().splitlines()[-2].split())
    bf16_kernels = _cpu_has("AVX512") and torch.cpu._is_avx512_bf16_supported()
    amx = bf16_kernels and torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx()
    same = all(torch.equal(a, b) for a, b in zip(results["best"], results["avx2"]))
    assert same != bf16_kernels
    # The bfloat16 products ran where the CPU has them, AMX only where allowed, and never under
    # ATEN_CPU_CAPABILITY=avx2, whose backward runs the float32 kernels on float32 copies.
    for name in ("best", "no-amx"):
        assert ("cpu:lstm_forward:bf16-avx512:cell-avx512" in kernels[name]) == bf16_kernels
        assert ("cpu:lstm_backward:avx512:cell-avx512:io-bf16" in kernels[name]) == bf16_kernels
    assert ("cpu:lstm_forward:bf16-amx:cell-avx512" in kernels["best"]) == amx
    assert not any("amx" in k for k in kernels["no-amx"] | kernels["avx2"])
    assert kernels["avx2"] >= {"cpu:lstm_forward:avx2:cell-avx2", "cpu:lstm_backward:avx2:cell-avx2"}


@pytest.mark.parametrize("value", ["mkl", "ONEDNN"])
def test_cpu_gemm_setting_is_checked(value, tmp_path):
    import subprocess
    import sys

    from conftest import subprocess_env
    code = ("import torch\nfrom cnnlstm_ext import FusedLSTM\n"
            "FusedLSTM(4, 16)(torch.randn(3, 2, 4))\n")
    run = subprocess.run([sys.executable, "-c", code],
                         env=subprocess_env(CNNLSTM_EXT_CPU_GEMM=value), cwd=tmp_path,
                         capture_output=True, text=True)
    assert run.returncode != 0
    assert "CNNLSTM_EXT_CPU_GEMM must be auto, aten or onednn" in run.stderr


def test_baseline_instruction_set_kernels_match_reference(tmp_path):
    """ATEN_CPU_CAPABILITY=default selects the non-AVX2 cell kernels (in a fresh process)."""
    import subprocess
    import sys

    from conftest import subprocess_env
    code = (
        "import torch\n"
        "from cnnlstm_ext import ops, reference\n"
        "torch.manual_seed(0)\n"
        "D, T, B, I, H = 2, 5, 3, 7, 13\n"  # H not a multiple of the vector width
        "x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)\n"
        "weights = [torch.randn(s, dtype=torch.float64, requires_grad=True)\n"
        "           for s in [(4 * H, I), (4 * H, H), (4 * H,), (4 * H,)] * D]\n"
        "h0, c0 = torch.randn(D, B, H, dtype=torch.float64), torch.randn(D, B, H, dtype=torch.float64)\n"
        "lengths = torch.tensor([5, 2, 4])\n"
        "out = ops.lstm_layer(x, weights, h0, c0, lengths)\n"
        "ref = reference.lstm_layer(x, weights, h0, c0, lengths)\n"
        "for a, b in zip(out, ref): torch.testing.assert_close(a, b)\n"
        "g = torch.autograd.grad(sum(o.sum() for o in out), [x, *weights])\n"
        "gr = torch.autograd.grad(sum(o.sum() for o in ref), [x, *weights])\n"
        "for a, b in zip(g, gr): torch.testing.assert_close(a, b)\n"
        "print(torch.backends.cpu.get_cpu_capability())\n")
    run = subprocess.run([sys.executable, "-c", code], env=subprocess_env(ATEN_CPU_CAPABILITY="default"),
                         cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "DEFAULT"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the OpenMP build is Linux's")
def test_cpu_kernels_built_with_openmp():
    """at::parallel_for is inline OpenMP: built without -fopenmp, the extension's parallel loops
    would run on one thread whatever torch.get_num_threads() says. An OpenMP build calls the
    runtime's GOMP_parallel."""
    path = importlib.util.find_spec("cnnlstm_ext._C").origin
    with open(path, "rb") as f:
        assert b"GOMP_parallel" in f.read(), f"{path} was built without OpenMP"
