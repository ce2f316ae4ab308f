"""Programs written for nn.LSTM run unchanged with FusedLSTM, beyond a single forward: what the
module keeps between calls (the zero state, the autocast copies of the weights) never carries a
mode of one call into the next (inference mode, a FakeTensorMode), autocast leaves float64 alone,
the output may be changed in place before the backward, torch.compile takes a PackedSequence,
torch.fx traces the module as a leaf, and nn.LSTM's helper methods are there. Every case runs on
nn.LSTM too, and asserts what nn.LSTM does.
"""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence, pad_packed_sequence

from cnnlstm_ext import FusedLSTM

CLASSES = [nn.LSTM, FusedLSTM]
IDS = ["nn.LSTM", "FusedLSTM"]


def build(cls, *args, **kwargs):
    torch.manual_seed(0)
    return cls(*args, **kwargs)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_training_call_after_an_inference_mode_call(cls, bidirectional):
    """A first call under inference_mode (a validation pass) must not leave inference tensors
    that a later training call's autograd saves."""
    m = build(cls, 3, 4, 2, bidirectional=bidirectional)
    x = torch.randn(5, 2, 3)
    with torch.inference_mode():
        m(x)
    out, _ = m(x)
    out.sum().backward()
    assert m.weight_hh_l0.grad is not None and m.weight_hh_l0.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_frozen_weights_under_autocast_after_an_inference_mode_call(cls):
    """The autocast copies of frozen weights made in inference mode serve a later call whose
    input needs a gradient."""
    m = build(cls, 3, 4, bidirectional=True).requires_grad_(False)
    x = torch.randn(5, 2, 3)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        m(x)
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = m(x)
    out.float().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_real_call_after_a_fake_tensor_mode_call_gives_real_tensors(cls):
    from torch._subclasses.fake_tensor import FakeTensorMode
    m = build(cls, 3, 4, bidirectional=True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        m(torch.empty(5, 2, 3))
    x = torch.randn(5, 2, 3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        m(x)  # (the autocast copies too)
    out, (h, c) = m(x)
    assert all(type(t) is torch.Tensor for t in (out, h, c))
    torch.manual_seed(0)
    ref = nn.LSTM(3, 4, bidirectional=True)
    torch.testing.assert_close(out, ref(x)[0])


def test_autocast_copies_are_off_with_autocast_cache_disabled():
    """With autocast(cache_enabled=False), as for autocast's own cache, nothing is kept: an edit
    of the weights through .data (which no version counter sees) reaches the next call."""
    x = torch.randn(5, 2, 3)
    results = []
    for cls in CLASSES:
        m = build(cls, 3, 4, bidirectional=True)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            m(x)
        for p in m.parameters():
            p.data.mul_(0.5)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            results.append(m(x)[0].float())
    torch.testing.assert_close(results[1], results[0], atol=2e-2, rtol=0)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_autocast_leaves_a_float64_module_and_input_in_float64(cls):
    m = build(cls, 3, 4, bidirectional=True).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = m(x)
    assert out.dtype == h.dtype == c.dtype == torch.float64
    torch.testing.assert_close(out, m(x)[0])  # the same as outside autocast


@pytest.mark.parametrize("module_dtype, input_dtype", [(torch.float64, torch.float32),
                                                       (torch.float32, torch.float64)])
def test_autocast_with_float64_on_one_side_is_refused(module_dtype, input_dtype):
    """nn.LSTM fails inside its kernels (autocast casts the float32 side only): a RuntimeError;
    FusedLSTM raises one too, where it would otherwise compute in the cast dtype."""
    for cls in CLASSES:
        m = build(cls, 3, 4, bidirectional=True).to(module_dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError) as e:
            m(torch.randn(5, 2, 3, dtype=input_dtype))
        if cls is FusedLSTM:
            assert "autocast does not cast float64" in str(e.value)


@pytest.mark.parametrize("batch_first", [False, True])
def test_bidirectional_output_changed_in_place_before_backward(batch_first):
    """nn.LSTM's bidirectional output is a new tensor: out.relu_() before the backward is
    allowed, and the gradients are those of relu(out)."""
    grads = []
    for cls in CLASSES:
        m = build(cls, 3, 4, 2, bidirectional=True, batch_first=batch_first)
        x = torch.randn(5, 2, 3, requires_grad=True)
        out, _ = m(x)
        out.relu_()
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([x.grad] + [p.grad for p in m.parameters()])
    for fused, ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_unidirectional_output_changed_in_place_before_backward_is_refused(cls):
    """nn.LSTM saves a unidirectional output for its backward: autograd refuses the in-place
    change (FusedLSTM keeps that check rather than copy the output)."""
    m = build(cls, 3, 4)
    out, _ = m(torch.randn(5, 2, 3))
    out.relu_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def _sequences():
    torch.manual_seed(1)
    return [torch.randn(4, 3), torch.randn(2, 3), torch.randn(3, 3)]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_takes_a_packed_sequence(backend):
    import torch._dynamo
    outs = []
    for cls in CLASSES:
        torch._dynamo.reset()
        m = torch.compile(build(cls, 3, 4, bidirectional=True), backend=backend)
        out, (h, _) = m(pack_sequence(_sequences(), enforce_sorted=False))
        assert isinstance(out, nn.utils.rnn.PackedSequence)
        outs.append((pad_packed_sequence(out)[0], h))
    torch.testing.assert_close(outs[1], outs[0])


def test_compiled_model_that_packs_inside():
    import torch._dynamo

    class Model(nn.Module):
        def __init__(self, cls):
            super().__init__()
            self.lstm = build(cls, 3, 4, bidirectional=True, batch_first=True)

        def forward(self, x, lengths):
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out, _ = self.lstm(packed)
            return pad_packed_sequence(out, batch_first=True)[0].sum(1)

    x, lengths = torch.randn(3, 4, 3), torch.tensor([4, 2, 3])
    outs = []
    for cls in CLASSES:
        torch._dynamo.reset()
        outs.append(torch.compile(Model(cls), backend="eager")(x, lengths))
    torch.testing.assert_close(outs[1], outs[0])


class _Wrapper(nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.lstm = build(cls, 3, 4, 2, bidirectional=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x, hx):
        out, (h, c) = self.lstm(x, hx)
        return self.fc(out) + h.sum() + c.mean()


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_fx_symbolic_trace_records_the_lstm_as_a_leaf(cls):
    from torch.fx.passes.shape_prop import ShapeProp
    model = _Wrapper(cls)
    gm = torch.fx.symbolic_trace(model)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["lstm", "fc"]
    x, hx = torch.randn(5, 2, 3), (torch.randn(4, 2, 4), torch.randn(4, 2, 4))
    ShapeProp(gm).propagate(x, hx)
    torch.testing.assert_close(gm(x, hx), model(x, hx))


def test_fx_traced_models_agree():
    x, hx = torch.randn(5, 2, 3), (torch.randn(4, 2, 4), torch.randn(4, 2, 4))
    ref, fused = (torch.fx.symbolic_trace(_Wrapper(cls))(x, hx) for cls in CLASSES)
    torch.testing.assert_close(fused, ref)


@pytest.mark.parametrize("kwargs", [{}, {"proj_size": 2}, {"batch_first": True}],
                         ids=["plain", "proj", "batch_first"])
def test_nn_lstm_helper_methods(kwargs):
    """check_forward_args, get_expected_hidden_size / cell_size, permute_hidden, check_input:
    the same results and errors as nn.LSTM's."""
    ref, fused = (build(cls, 3, 4, 2, bidirectional=True, **kwargs) for cls in CLASSES)
    x = torch.randn(2, 5, 3)
    P = kwargs.get("proj_size") or 4
    hx = (torch.randn(4, 2 if kwargs.get("batch_first") else 5, P),
          torch.randn(4, 2 if kwargs.get("batch_first") else 5, 4))
    for m in (ref, fused):
        m.check_forward_args(x, hx, None)
    assert fused.get_expected_hidden_size(x, None) == ref.get_expected_hidden_size(x, None)
    assert fused.get_expected_cell_size(x, None) == ref.get_expected_cell_size(x, None)
    perm = torch.tensor([1, 0, 2, 4, 3])[:hx[0].shape[1]]
    for a, b in zip(fused.permute_hidden(hx, perm), ref.permute_hidden(hx, perm)):
        torch.testing.assert_close(a, b)
    for bad in [(hx[0][:, :, :1], hx[1]), (hx[0], hx[1][:3]), (torch.randn(2, 5, 7), None)]:
        results = []
        for m in (ref, fused):
            with pytest.raises(RuntimeError) as e:
                if bad[1] is None:
                    m.check_input(bad[0], None)
                else:
                    m.check_forward_args(x, bad, None)
            results.append(str(e.value))
        assert results[0] == results[1]


def test_init_flat_weights_after_replacing_a_weight():
    """nn.LSTM's _init_flat_weights after a weight is replaced: the module computes with it."""
    x = torch.randn(5, 2, 3)
    outs = []
    for cls in CLASSES:
        m = build(cls, 3, 4, bidirectional=True)
        m.weight_hh_l0_reverse = nn.Parameter(torch.full((16, 4), 0.1))
        m._init_flat_weights()
        outs.append(m(x)[0])
    torch.testing.assert_close(outs[1], outs[0])
