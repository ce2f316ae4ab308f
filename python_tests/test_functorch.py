"""torch.func transforms (grad, jacrev, jvp, vmap) and forward-mode AD through FusedLSTM, the
pooling ops and the model.

The ops' autograd is C++ (csrc/*_autograd.cpp), which functorch cannot go through; while a
transform runs, the ops take the pure-PyTorch reference instead (ops.transform_active). These tests
check that the transforms give what nn.LSTM's give, or what autograd gives through the kernels.
"""
import pytest
import torch
from torch import nn

from cnnlstm_ext import CNNLSTM, FusedLSTM, ops

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # torch's own warning, from the decompositions jvp loads
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")]
# The CUDA twin of the tests against the kernels; conftest.py skips it without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

I, H, T, B = 6, 16, 5, 3
LENGTHS = [5, 1, 3]  # a length of 1 and full length


def assert_close_rel(actual, expected, rel, what):
    """|actual - expected| <= rel * max|expected| elementwise (+ rel * |expected|)."""
    scale = max(expected.abs().max().item(), 1e-6)
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale,
                               msg=lambda m: f"{what}: {m}")


def rand(*shape, rng, dtype=torch.float64, device="cpu"):
    return torch.randn(*shape, generator=rng, dtype=torch.float64).to(device=device, dtype=dtype)


def lstm_pair(dtype):
    ref = nn.LSTM(I, H, 2, bidirectional=True, dtype=dtype)
    return ref, FusedLSTM.from_lstm(ref)


def lstm_loss(module, weights):
    """(params, x, h0, c0) -> a random projection of output, h_n and c_n, through functional_call."""
    def loss(params, x, h0, c0):
        y, (h, c) = torch.func.functional_call(module, params, (x, (h0, c0)))
        return (y * weights[0]).sum() + (h * weights[1]).sum() + (c * weights[2]).sum()
    return loss


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_lstm_func_grad_matches_nn_lstm(dtype, rng):
    ref, fused = lstm_pair(dtype)
    x, h0, c0 = rand(T, B, I, rng=rng, dtype=dtype), rand(4, B, H, rng=rng, dtype=dtype), \
        rand(4, B, H, rng=rng, dtype=dtype)
    weights = [rand(T, B, 2 * H, rng=rng, dtype=dtype), rand(4, B, H, rng=rng, dtype=dtype),
               rand(4, B, H, rng=rng, dtype=dtype)]
    argnums = (0, 1, 2, 3)
    r = torch.func.grad(lstm_loss(ref, weights), argnums)(dict(ref.named_parameters()), x, h0, c0)
    f = torch.func.grad(lstm_loss(fused, weights), argnums)(dict(fused.named_parameters()), x, h0,
                                                            c0)
    rel = 1e-10 if dtype == torch.float64 else 1e-5
    assert list(f[0]) == list(r[0])
    for name in r[0]:
        assert_close_rel(f[0][name], r[0][name], rel, f"grad of {name}")
    for name, a, b in zip(("x", "h0", "c0"), f[1:], r[1:]):
        assert_close_rel(a, b, rel, f"grad of {name}")


def test_lstm_jacrev_and_jvp_match_nn_lstm(rng):
    ref, fused = lstm_pair(torch.float64)
    x, v = rand(T, B, I, rng=rng), rand(T, B, I, rng=rng)
    jr = torch.func.jacrev(lambda t: ref(t)[0])(x)    # [T, B, 2H, T, B, I]
    jf = torch.func.jacrev(lambda t: fused(t)[0])(x)
    assert_close_rel(jf, jr, 1e-10, "jacobian")
    _, tr = torch.func.jvp(lambda t: ref(t)[0], (x,), (v,))
    _, tf = torch.func.jvp(lambda t: fused(t)[0], (x,), (v,))
    assert_close_rel(tf, tr, 1e-10, "jvp")


def test_lstm_forward_ad_matches_nn_lstm(rng):
    """torch.autograd.forward_ad (dual tensors, no torch.func): nn.LSTM in float64 has it (its
    ATen decomposition), so FusedLSTM must too; tangents on the input, h0 and a weight."""
    import torch.autograd.forward_ad as fwAD
    ref, fused = lstm_pair(torch.float64)
    x, h0, c0 = rand(T, B, I, rng=rng), rand(4, B, H, rng=rng), rand(4, B, H, rng=rng)
    tx, th, tw = rand(T, B, I, rng=rng), rand(4, B, H, rng=rng), rand(4 * H, H, rng=rng)
    results = []
    for module in (ref, fused):
        params = {k: v.detach() for k, v in module.named_parameters()}
        with fwAD.dual_level():
            params["weight_hh_l1_reverse"] = fwAD.make_dual(params["weight_hh_l1_reverse"], tw)
            y, (h, c) = torch.func.functional_call(
                module, params, (fwAD.make_dual(x, tx), (fwAD.make_dual(h0, th), c0)))
            results.append([fwAD.unpack_dual(t) for t in (y, h, c)])
    for name, (r, f) in zip(("output", "h_n", "c_n"), zip(*results)):
        assert_close_rel(f.primal, r.primal, 1e-10, name)
        assert_close_rel(f.tangent, r.tangent, 1e-10, f"tangent of {name}")


def test_model_forward_ad_matches_func_jvp(rng):
    """Forward-mode AD through the whole model (frame pooling, LSTM with lengths, attention
    pooling) gives torch.func.jvp's tangent."""
    import torch.autograd.forward_ad as fwAD
    model = CNNLSTM(num_classes=5, spatial_dim=8, temporal_dim=6, num_layers=2, backbone="tiny",
                    pooling="attention").double().eval()
    clips, v = rand(B, T, 3, 16, 16, rng=rng), rand(B, T, 3, 16, 16, rng=rng)
    lengths = torch.tensor(LENGTHS)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(model(fwAD.make_dual(clips, v), lengths)).tangent
    _, want = torch.func.jvp(lambda c: model(c, lengths), (clips,), (v,))
    assert got is not None and got.abs().max() > 0
    assert_close_rel(got, want, 1e-10, "tangent of the logits")


@pytest.mark.parametrize("device", DEVICES)
def test_lstm_func_grad_with_lengths_matches_autograd_through_the_kernels(device, rng):
    """With lengths (which nn.LSTM takes only packed): func.grad against torch.autograd.grad of
    the same module outside any transform, which runs the kernels."""
    fused = FusedLSTM(I, H, 2, bidirectional=True, dtype=torch.float64, device=device)
    x, w = rand(T, B, I, rng=rng, device=device), rand(T, B, 2 * H, rng=rng, device=device)
    lengths = torch.tensor(LENGTHS)
    params = dict(fused.named_parameters())

    def loss(p, t):
        return (torch.func.functional_call(fused, p, (t,), {"lengths": lengths})[0] * w).sum()
    got = torch.func.grad(loss, (0, 1))(params, x)
    leaf = x.clone().requires_grad_()
    want = torch.autograd.grad(loss(params, leaf), list(params.values()) + [leaf])
    for name, a, b in zip(list(params) + ["x"], list(got[0].values()) + [got[1]], want):
        assert_close_rel(a, b, 1e-10, f"grad of {name}")


def test_lstm_vmap_matches_calls_per_sample(rng):
    """vmap over a leading dimension of the input (nn.LSTM has no batching rule for this)."""
    fused = FusedLSTM(I, H, 2, bidirectional=True, dtype=torch.float64)
    xs = rand(4, T, B, I, rng=rng)
    lengths = torch.tensor(LENGTHS)
    got = torch.func.vmap(lambda t: fused(t, lengths=lengths)[0])(xs)
    with torch.no_grad():
        want = torch.stack([fused(t, lengths=lengths)[0] for t in xs])
    assert_close_rel(got, want, 1e-10, "output")
    assert (got[:, 1:, 1] == 0).all()  # past the length of 1


# --- batched gradients (vmap over the backward of the kernels' autograd) -------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_lstm_batched_gradients_match_nn_lstm(device, rng):
    """is_grads_batched=True: the forward ran the kernels, the backward runs under vmap."""
    ref, fused = lstm_pair(torch.float64)
    ref, fused = ref.to(device), fused.to(device)
    x = rand(T, B, I, rng=rng, device=device).requires_grad_()
    g_y = rand(6, T, B, 2 * H, rng=rng, device=device)
    g_h = rand(6, 4, B, H, rng=rng, device=device)
    outs = []
    for m in (ref, fused):
        y, (h, _) = m(x)
        outs.append(torch.autograd.grad((y, h), (x, m.weight_hh_l1_reverse, m.bias_ih_l0),
                                        (g_y, g_h), is_grads_batched=True))
    for name, f, r in zip(("x", "weight_hh_l1_reverse", "bias_ih_l0"), outs[1], outs[0]):
        assert f.shape[0] == 6
        assert_close_rel(f, r, 1e-10, f"batched grad of {name}")


def test_lstm_batched_gradients_with_lengths_match_one_backward_per_gradient(rng):
    fused = FusedLSTM(I, H, 2, bidirectional=True, dtype=torch.float64)
    x = rand(T, B, I, rng=rng).requires_grad_()
    lengths = torch.tensor(LENGTHS)
    y, _ = fused(x, lengths=lengths)
    g = rand(3, T, B, 2 * H, rng=rng)
    inputs = (x, fused.weight_ih_l1)
    got = torch.autograd.grad(y, inputs, g, is_grads_batched=True, retain_graph=True)
    for k in range(3):  # each through the fused backward kernel
        want = torch.autograd.grad(y, inputs, g[k], retain_graph=True)
        for a, b in zip(got, want):
            assert_close_rel(a[k], b, 1e-10, "batched grad")


def test_lstm_vectorized_jacobian_and_batched_gradcheck(rng):
    ref, fused = lstm_pair(torch.float64)
    x = rand(3, 2, I, rng=rng).requires_grad_()
    jf = torch.autograd.functional.jacobian(lambda t: fused(t)[0], x, vectorize=True)
    jr = torch.autograd.functional.jacobian(lambda t: ref(t)[0], x, vectorize=True)
    assert_close_rel(jf, jr, 1e-10, "jacobian")
    small = FusedLSTM(2, 3, bidirectional=True, dtype=torch.float64)
    xs = rand(3, 2, 2, rng=rng).requires_grad_()
    # gradcheck's default batched-gradient check, through the C++ autograd of the op.
    assert torch.autograd.gradcheck(lambda t: small(t, lengths=torch.tensor([3, 1]))[0], (xs,),
                                    check_batched_grad=True)


FRAME_CASES = [("avg", False), ("max", False), ("avg", True), ("max", True)]


@pytest.mark.parametrize("mode,batch_first", FRAME_CASES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("device", DEVICES)
def test_frame_pool_func_grad_matches_autograd(device, mode, batch_first, layout, rng):
    maps = rand(B * T, 7, 3, 4, rng=rng, device=device)
    if layout == "channels_last":
        maps = maps.to(memory_format=torch.channels_last)
    w = rand(*((B, T, 7) if batch_first else (T, B, 7)), rng=rng, device=device)

    def loss(m):
        return (ops.frame_pool(m, B, mode, batch_first) * w).sum()
    got = torch.func.grad(loss)(maps)
    leaf = maps.clone().requires_grad_()
    want, = torch.autograd.grad(loss(leaf), leaf)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["mean", "max", "last", "attention"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("device", DEVICES)
def test_temporal_pool_func_grad_matches_autograd(device, mode, batch_first, rng):
    x = rand(*((B, T, 10) if batch_first else (T, B, 10)), rng=rng, device=device)
    score_w, score_b = rand(10, rng=rng, device=device), rand(1, rng=rng, device=device)
    lengths = torch.tensor(LENGTHS, device=device)
    w = rand(B, 10, rng=rng, device=device)
    attention = mode == "attention"

    def loss(t, sw, sb):
        out = ops.temporal_pool(t, lengths, mode, batch_first, bidirectional=True,
                                score_weight=sw if attention else None,
                                score_bias=sb if attention else None)
        return (out * w).sum()
    got = torch.func.grad(loss, (0, 1, 2))(x, score_w, score_b)
    leaves = [t.clone().requires_grad_() for t in (x, score_w, score_b)]
    want = torch.autograd.grad(loss(*leaves), leaves, allow_unused=True)
    for name, a, b in zip(("x", "score_weight", "score_bias"), got, want):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, rtol=1e-12,
                                   atol=1e-12, msg=lambda m: f"grad of {name}: {m}")


def test_transforms_refuse_lengths_out_of_range(rng):
    """The reference would take a length of 0 or above T silently; the ops refuse them as the
    kernels do."""
    x = rand(T, B, 10, rng=rng)
    zero = torch.tensor([5, 0, 3])
    with pytest.raises(RuntimeError, match=r"temporal_pool: every length must be in \[1, T=5\]"):
        torch.func.grad(lambda t: ops.temporal_pool(t, zero).sum())(x)
    too_long = torch.tensor([5, 6, 3])
    weights = [rand(4 * 4, 10, rng=rng), rand(4 * 4, 4, rng=rng)]
    h0 = torch.zeros(1, B, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"lstm_layer: every length must be in \[1, T=5\]"):
        torch.func.grad(lambda t: ops.lstm_layer(t, weights, h0, h0, too_long)[0].sum())(x)
    with pytest.raises(RuntimeError, match="frame_pool: x must be"):
        torch.func.grad(lambda m: ops.frame_pool(m, 4).sum())(rand(B * T, 7, 2, 2, rng=rng))



def test_transforms_refuse_a_single_sequence_with_length_zero(rng):
    x = rand(T, 1, 10, rng=rng)
    with pytest.raises(RuntimeError, match=r"temporal_pool: every length must be in \[1, T=5\]"):
        torch.func.grad(lambda t: ops.temporal_pool(t, torch.tensor([0])).sum())(x)


def test_transforms_refuse_lengths_that_are_not_int64(rng):
    x = rand(T, B, 10, rng=rng)
    lengths = torch.tensor(LENGTHS, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"temporal_pool: lengths must be int64 of shape \[3\], "
                                           r"got torch.int32 of shape \[3\]"):
        torch.func.grad(lambda t: ops.temporal_pool(t, lengths).sum())(x)


def test_temporal_pool_func_grad_of_an_empty_batch_is_empty(rng):
    x = rand(T, 0, 10, rng=rng)
    g = torch.func.grad(lambda t: ops.temporal_pool(t, torch.zeros(0, dtype=torch.long)).sum())(x)
    assert g.shape == x.shape

def test_model_func_grad_matches_autograd(rng):
    """The whole CNN-LSTM (tiny trunk, eval mode) with lengths: func.grad over the parameters."""
    model = CNNLSTM(num_classes=7, spatial_dim=24, temporal_dim=12, num_layers=2,
                    backbone="tiny", pooling="attention").double().eval()
    clips = rand(B, T, 3, 32, 32, rng=rng)
    lengths = torch.tensor(LENGTHS)
    labels = torch.tensor([0, 3, 6])
    params = {k: v for k, v in model.named_parameters()}

    def loss(p):
        logits = torch.func.functional_call(model, p, (clips,), {"lengths": lengths})
        return nn.functional.cross_entropy(logits, labels)
    got = torch.func.grad(loss)(params)
    want = torch.autograd.grad(loss(params), list(params.values()))
    for (name, a), b in zip(got.items(), want):
        assert_close_rel(a, b, 1e-9, f"grad of {name}")


@pytest.mark.parametrize("pooling", ["mean", "max", "last", "attention"])
def test_model_batched_gradients_match_one_backward_per_gradient(pooling, rng):
    """is_grads_batched=True through the whole model (frame pooling, LSTM, temporal pooling)."""
    model = CNNLSTM(num_classes=5, spatial_dim=8, temporal_dim=6, num_layers=2, backbone="tiny",
                    pooling=pooling).double().eval()
    clips = rand(B, T, 3, 16, 16, rng=rng).requires_grad_()
    lengths = torch.tensor(LENGTHS)
    logits = model(clips, lengths)
    g = rand(4, B, 5, rng=rng)
    inputs = (clips, model.lstm.weight_hh_l1)
    got = torch.autograd.grad(logits, inputs, g, is_grads_batched=True, retain_graph=True)
    for k in range(4):
        want = torch.autograd.grad(logits, inputs, g[k], retain_graph=True)
        for a, b in zip(got, want):
            assert_close_rel(a[k], b, 1e-10, f"batched grad {k}")
