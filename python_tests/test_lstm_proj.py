"""FusedLSTM with projections (proj_size > 0) against torch.nn.LSTM, and the op
`lstm_layer_projected` against cnnlstm_ext.reference: values, gradients, lengths and packed input,
dtypes, state dicts both ways, gradcheck/gradgradcheck, batched gradients, opcheck, export.
"""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from cnnlstm_ext import FusedLSTM, fuse_lstm, ops, reference, unfuse_lstm

I, H, P, T, B = 5, 6, 3, 7, 4
LENGTHS = [7, 1, 4, 6]  # full length, a length of 1 and two others, not sorted
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def rand(*shape, rng, dtype=torch.float64, device="cpu"):
    return torch.randn(*shape, generator=rng, dtype=torch.float64).to(device=device, dtype=dtype)


def assert_close_rel(actual, expected, rel, what):
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = max(expected.abs().max().item(), 1e-6)
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale,
                               msg=lambda m: f"{what}: {m}")


def pair(dtype=torch.float64, device="cpu", **kwargs):
    """An nn.LSTM with projections and a FusedLSTM holding the same weights (own Parameters)."""
    kwargs = {"input_size": I, "hidden_size": H, "proj_size": P, **kwargs}
    ref = nn.LSTM(**kwargs).to(device=device, dtype=dtype)
    fused = FusedLSTM(**kwargs, device=device, dtype=dtype)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def grads_of(module, x, hx, weights):
    """Output, (h_n, c_n) and the gradients of a random projection of them, by leaf name."""
    leaves = {"input": x.detach().clone().requires_grad_()}
    if hx is not None:
        leaves["h0"], leaves["c0"] = (t.detach().clone().requires_grad_() for t in hx)
        hx = (leaves["h0"], leaves["c0"])
    out, (h, c) = module(leaves["input"], hx)
    loss = (out * weights[0]).sum() + (h * weights[1]).sum() + (c * weights[2]).sum()
    leaves.update(module.named_parameters())
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return (out, h, c), dict(zip(leaves, grads))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["zero-state", "hx"])
def test_forward_and_gradients_match_nn_lstm(device, dtype, bidirectional, bias, with_hx, rng):
    ref, fused = pair(dtype, device, num_layers=2, bias=bias, bidirectional=bidirectional)
    D = 2 if bidirectional else 1
    x = rand(T, B, I, rng=rng, dtype=dtype, device=device)
    hx = ((rand(2 * D, B, P, rng=rng, dtype=dtype, device=device),
           rand(2 * D, B, H, rng=rng, dtype=dtype, device=device)) if with_hx else None)
    weights = [rand(T, B, D * P, rng=rng, dtype=dtype, device=device),
               rand(2 * D, B, P, rng=rng, dtype=dtype, device=device),
               rand(2 * D, B, H, rng=rng, dtype=dtype, device=device)]
    (r_out, f_out), (r_grads, f_grads) = zip(grads_of(ref, x, hx, weights),
                                              grads_of(fused, x, hx, weights))
    rel = REL_TOL[dtype]
    for name, r, f in zip(("output", "h_n", "c_n"), r_out, f_out):
        assert f.shape == r.shape, name
        assert_close_rel(f, r, rel, name)
    assert list(f_grads) == list(r_grads)
    for name in r_grads:
        assert_close_rel(f_grads[name], r_grads[name], rel, f"grad of {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_first", [False, True], ids=["tb", "bt"])
def test_packed_sequence_and_lengths_match_nn_lstm_packed(device, batch_first, rng):
    ref, fused = pair(torch.float64, device, num_layers=2, bidirectional=True,
                      batch_first=batch_first)
    x = rand(B, T, I, rng=rng, device=device) if batch_first else rand(T, B, I, rng=rng,
                                                                        device=device)
    lengths = torch.tensor(LENGTHS)
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    r_out, (r_h, r_c) = ref(packed)
    f_out, (f_h, f_c) = fused(packed)
    torch.testing.assert_close(f_out.data, r_out.data)
    torch.testing.assert_close((f_h, f_c), (r_h, r_c))
    # Padded input with lengths: the same values, zeros past each length.
    y, (h, c) = fused(x, lengths=lengths)
    padded, _ = pad_packed_sequence(r_out, batch_first=batch_first, total_length=T)
    torch.testing.assert_close(y, padded)
    torch.testing.assert_close((h, c), (r_h, r_c))
    # Gradients through the padded path equal those through nn.LSTM's packed path.
    w = rand(*padded.shape, rng=rng, device=device)
    g_f = torch.autograd.grad((y * w).sum() + h.sum(), list(fused.parameters()))
    r_pad, _ = pad_packed_sequence(ref(packed)[0], batch_first=batch_first, total_length=T)
    g_r = torch.autograd.grad((r_pad * w).sum() + r_h.sum(), list(ref.parameters()))
    torch.testing.assert_close(g_f, g_r)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_16_bit_modules_match_nn_lstm_in_the_same_dtype(device, dtype, rng):
    ref, fused = pair(dtype, device, num_layers=2, bidirectional=True)
    x = rand(T, B, I, rng=rng, dtype=dtype, device=device)
    weights = [rand(T, B, 2 * P, rng=rng, dtype=dtype, device=device),
               rand(4, B, P, rng=rng, dtype=dtype, device=device),
               rand(4, B, H, rng=rng, dtype=dtype, device=device)]
    (r_out, f_out), (r_grads, f_grads) = zip(grads_of(ref, x, None, weights),
                                              grads_of(fused, x, None, weights))
    for name, r, f in zip(("output", "h_n", "c_n"), r_out, f_out):
        assert f.dtype == dtype
        assert_close_rel(f, r, REL_TOL[dtype], name)
    for name in r_grads:
        assert_close_rel(f_grads[name], r_grads[name], 4 * REL_TOL[dtype], f"grad of {name}")


def test_unbatched_input_and_batch_first_match_nn_lstm(rng):
    ref, fused = pair(num_layers=2, bidirectional=True, batch_first=True)
    x = rand(T, I, rng=rng)  # unbatched: [T, I]
    hx = (rand(4, P, rng=rng), rand(4, H, rng=rng))
    torch.testing.assert_close(fused(x, hx), ref(x, hx))
    xb = rand(B, T, I, rng=rng)
    torch.testing.assert_close(fused(xb), ref(xb))


def test_parameters_names_shapes_order_and_init_equal_nn_lstms():
    kwargs = dict(input_size=I, hidden_size=H, num_layers=3, bidirectional=True, proj_size=P)
    torch.manual_seed(0)
    ref = nn.LSTM(**kwargs)
    torch.manual_seed(0)
    fused = FusedLSTM(**kwargs)
    assert [(n, p.shape) for n, p in fused.named_parameters()] == \
        [(n, p.shape) for n, p in ref.named_parameters()]
    assert "weight_hr_l2_reverse" in dict(fused.named_parameters())
    for (name, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), name
    assert repr(fused) == repr(ref).replace("LSTM(", "FusedLSTM(", 1)
    assert [[p.shape for p in ws] for ws in fused.all_weights] == \
        [[p.shape for p in ws] for ws in ref.all_weights]


def test_state_dicts_and_conversions_move_both_ways(rng):
    ref, fused = pair(num_layers=2, bidirectional=True)
    back = nn.LSTM(I, H, 2, bidirectional=True, proj_size=P, dtype=torch.float64)
    back.load_state_dict(fused.state_dict())
    x = rand(T, B, I, rng=rng)
    torch.testing.assert_close(back(x), fused(x))
    converted = FusedLSTM.from_lstm(ref)
    assert converted.proj_size == P
    assert converted.weight_hr_l1_reverse is ref.weight_hr_l1_reverse  # shared Parameters
    torch.testing.assert_close(converted(x), ref(x))
    assert unfuse_lstm(converted).proj_size == P
    model = nn.Sequential(nn.LSTM(I, H, proj_size=P))
    assert type(fuse_lstm(model)[0]) is FusedLSTM


def test_hidden_state_shapes_are_checked_as_nn_lstm_checks_them(rng):
    ref, fused = pair(num_layers=2)
    x = rand(T, B, I, rng=rng)
    good_h, good_c = rand(2, B, P, rng=rng), rand(2, B, H, rng=rng)
    for hx, message in [((rand(2, B, H, rng=rng), good_c), r"Expected hidden\[0\] size \(2, 4, 3\), got \[2, 4, 6\]"),
                        ((good_h, rand(2, B, P, rng=rng)), r"Expected hidden\[1\] size \(2, 4, 6\), got \[2, 4, 3\]")]:
        for module in (ref, fused):
            with pytest.raises(RuntimeError, match=message):
                module(x, hx)


@pytest.mark.parametrize("D", [1, 2])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_op_matches_the_reference(D, with_bias, with_lengths, rng):
    x = rand(T, B, I, rng=rng)
    per = [(4 * H, I), (4 * H, P)] + ([(4 * H,), (4 * H,)] if with_bias else []) + [(P, H)]
    weights = [rand(*s, rng=rng) for _ in range(D) for s in per]
    h0, c0 = rand(D, B, P, rng=rng), rand(D, B, H, rng=rng)
    lengths = torch.tensor(LENGTHS) if with_lengths else None
    got = ops.lstm_layer(x, weights, h0, c0, lengths)
    want = reference.lstm_layer(x, weights, h0, c0, lengths)
    assert [t.shape for t in got] == [(T, B, D * P), (D, B, P), (D, B, H)]
    torch.testing.assert_close(got, want)
    if with_lengths:
        for b, n in enumerate(LENGTHS):
            assert torch.count_nonzero(got[0][n:, b]) == 0


def test_gradcheck_and_gradgradcheck_in_float64(rng):
    T_, B_, I_, H_, P_ = 3, 2, 2, 3, 2
    x = rand(T_, B_, I_, rng=rng).requires_grad_()
    per = [(4 * H_, I_), (4 * H_, P_), (4 * H_,), (4 * H_,), (P_, H_)]
    weights = [rand(*s, rng=rng).requires_grad_() for _ in range(2) for s in per]
    h0 = rand(2, B_, P_, rng=rng).requires_grad_()
    c0 = rand(2, B_, H_, rng=rng).requires_grad_()
    lengths = torch.tensor([3, 2])

    def f(x, h0, c0, *weights):
        return ops.lstm_layer(x, list(weights), h0, c0, lengths)

    # (gradcheck's default batched-gradient check included.)
    assert torch.autograd.gradcheck(f, (x, h0, c0, *weights), check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, (x, h0, c0, *weights))


def test_opcheck(rng):
    x = rand(T, B, I, rng=rng, dtype=torch.float32).requires_grad_()
    per = [(4 * H, I), (4 * H, P), (4 * H,), (4 * H,), (P, H)]
    weights = [rand(*s, rng=rng, dtype=torch.float32).requires_grad_() for _ in range(2) for s in per]
    h0 = rand(2, B, P, rng=rng, dtype=torch.float32)
    c0 = rand(2, B, H, rng=rng, dtype=torch.float32)
    for op in (torch.ops.cnnlstm_ext.lstm_layer_projected.default,
               torch.ops.cnnlstm_ext.lstm_layer_projected_export.default):
        for lengths in (None, torch.tensor(LENGTHS)):
            torch.library.opcheck(op, (x, weights, h0, c0, lengths))


def test_op_refuses_inconsistent_shapes_with_a_clear_error(rng):
    x = rand(T, B, I, rng=rng)
    weights = [rand(4 * H, I, rng=rng), rand(4 * H, P, rng=rng), rand(P, H, rng=rng)]
    with pytest.raises(RuntimeError, match=r"expected w_hr \[P, H\], h0 \[D, B, P\], c0 \[D, B, H\]"):
        torch.ops.cnnlstm_ext.lstm_layer_projected(x, weights, rand(1, B, H, rng=rng),
                                                   rand(1, B, H, rng=rng), None)
    with pytest.raises(RuntimeError, match=r"lengths must be int64 of shape \[B\]"):
        torch.ops.cnnlstm_ext.lstm_layer_projected(x, weights, rand(1, B, P, rng=rng),
                                                   rand(1, B, H, rng=rng), torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match=r"every length must be in \[1, T=7\]"):
        ops.lstm_layer(x, weights, rand(1, B, P, rng=rng), rand(1, B, H, rng=rng),
                       torch.tensor([8, 1, 1, 1]))


def test_batched_gradients_and_vectorized_jacobian_match_nn_lstm(rng):
    ref, fused = pair(num_layers=2, bidirectional=True)
    x = rand(T, 2, I, rng=rng).requires_grad_()
    grads = rand(5, T, 2, 2 * P, rng=rng)
    r = torch.autograd.grad(ref(x)[0], (x, ref.weight_hr_l1), grads, is_grads_batched=True)
    f = torch.autograd.grad(fused(x)[0], (x, fused.weight_hr_l1), grads, is_grads_batched=True)
    torch.testing.assert_close(f, r)
    j_f = torch.autograd.functional.jacobian(lambda x: fused(x)[0], x, vectorize=True)
    j_r = torch.autograd.functional.jacobian(lambda x: ref(x)[0], x, vectorize=True)
    torch.testing.assert_close(j_f, j_r)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_torch_export_with_a_dynamic_batch_and_steps(rng, strict):
    """Each layer is one lstm_layer_projected_export node (the composite op's step loop would fix
    T): the program holds at other batch sizes, steps and lengths."""
    from torch.export import Dim, export
    from test_lstm_export import WithLengths
    _, fused = pair(torch.float32, num_layers=2, bidirectional=True)
    fused.eval()
    steps, batch = Dim("steps", min=1, max=64), Dim("batch", min=1, max=64)
    x = rand(T, 2, I, rng=rng, dtype=torch.float32)
    program = export(fused, (x,), dynamic_shapes=({0: steps, 1: batch},), strict=strict)
    nodes = [n for n in program.graph.nodes
             if n.target is torch.ops.cnnlstm_ext.lstm_layer_projected_export.default]
    assert len(nodes) == 2
    with_lengths = export(WithLengths(fused), (x, torch.tensor([T, 3])), strict=strict,
                          dynamic_shapes=({0: steps, 1: batch}, {0: batch}))
    for t, b in [(3, 5), (T + 4, 1), (T, 2)]:
        x = rand(t, b, I, rng=rng, dtype=torch.float32)
        want = fused(x)
        torch.testing.assert_close(program.module()(x), want)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the node's dtype, as its fake says
            torch.testing.assert_close(program.module()(x), want)
        lengths = torch.tensor([t, 1, 2, t - 1, 1][:b]).clamp(1, t)
        torch.testing.assert_close(with_lengths.module()(x, lengths), fused(x, lengths=lengths))


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_through_an_exported_program_match_the_module(device, rng):
    """The export op's autograd (recomputed through lstm_layer_projected): first-order gradients
    of the input and weights, and under create_graph gradients that are differentiable again."""
    from torch.export import Dim, export
    _, fused = pair(torch.float64, device, num_layers=1, bidirectional=True)
    program = export(fused, (rand(T, 2, I, rng=rng, device=device),),
                     dynamic_shapes=({0: Dim("steps", min=1, max=64),
                                      1: Dim("batch", min=1, max=64)},)).module()
    assert sorted(n for n, _ in program.named_parameters()) == sorted(
        n for n, _ in fused.named_parameters())
    x = rand(T + 2, 3, I, rng=rng, device=device).requires_grad_()
    g = rand(T + 2, 3, 2 * P, rng=rng, device=device)
    results = []
    for module in (program, fused):
        weights = dict(module.named_parameters())
        wanted = (x, weights["weight_hr_l0"], weights["weight_ih_l0_reverse"])
        first = torch.autograd.grad(module(x)[0], wanted, g, create_graph=True)
        second = torch.autograd.grad(sum((f * f).sum() for f in first), wanted)
        results.append(first + second)
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torch_jit_trace_holds_at_other_batch_sizes_and_lengths(rng):
    _, fused = pair(torch.float32, num_layers=2, bidirectional=True)
    fused.eval()
    traced = torch.jit.trace(fused, (rand(T, 2, I, rng=rng, dtype=torch.float32),))
    assert traced.graph.str().count("cnnlstm_ext::lstm_layer_projected") == 2  # one node a layer
    for steps, batch in [(3, 5), (T + 4, 1)]:
        x = rand(steps, batch, I, rng=rng, dtype=torch.float32)
        torch.testing.assert_close(traced(x), fused(x))
