"""torch.jit.trace, torch.jit.script and torch.export of FusedLSTM / FusedBiLSTM and CNNLSTM.

A trace made at one batch size and sequence length must hold at others (no batch size or cached
zero state baked in), scripting is refused with an error naming the alternatives, and an exported
program keeps the batch size, the sequence length and lengths dynamic.
"""
import warnings

import pytest
import torch
from torch import nn
from torch.export import Dim

from cnnlstm_ext import CNNLSTM, FusedBiLSTM, FusedLSTM

# Two shared cores: more intra-op threads only add contention for these tiny models.
pytestmark = pytest.mark.usefixtures("one_thread")

I, H = 4, 5
SMALL = dict(num_classes=7, spatial_dim=24, temporal_dim=12, num_layers=2, backbone="tiny")


def assert_same(got, want):
    """float32, exactly the same computation: a tight tolerance."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def lstms():
    torch.manual_seed(0)
    return [FusedLSTM(I, H, num_layers=2).eval(),
            FusedBiLSTM(I, H, num_layers=2, batch_first=True).eval()]


def padded(lstm, B, T, seed=0):
    return randn(B, T, I, seed=seed) if lstm.batch_first else randn(T, B, I, seed=seed)


def trace(module, args):
    """torch.jit.trace with its own consistency check on, quiet about its deprecation."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.trace(module, args)


class WithLengths(nn.Module):
    """lengths as a positional argument (torch.jit.trace passes positional inputs only)."""

    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x, lengths):
        return self.lstm(x, lengths=lengths)


def assert_lstm_outputs(got, want):
    out, (h_n, c_n) = got
    out_ref, (h_ref, c_ref) = want
    assert out.shape == out_ref.shape
    assert_same(out, out_ref)
    assert_same(h_n, h_ref)
    assert_same(c_n, c_ref)


# --- torch.jit.trace ----------------------------------------------------------------------------

@pytest.mark.parametrize("lstm", lstms(), ids=["FusedLSTM", "FusedBiLSTM"])
def test_trace_holds_at_other_batch_sizes_and_steps(lstm):
    lstm(padded(lstm, 2, 6))  # an eager call first: its zero state must not reach the trace
    traced = trace(lstm, (padded(lstm, 2, 6),))
    for B, T in ((3, 9), (1, 4), (2, 6)):
        x = padded(lstm, B, T, seed=B * 10 + T)
        assert_lstm_outputs(traced(x), lstm(x))


@pytest.mark.parametrize("lstm", lstms(), ids=["FusedLSTM", "FusedBiLSTM"])
def test_trace_with_lengths_holds_at_other_batch_sizes(lstm):
    model = WithLengths(lstm)
    traced = trace(model, (padded(lstm, 2, 6), torch.tensor([6, 3])))
    for B, T, lengths in ((3, 8, [8, 1, 5]), (2, 6, [6, 6]), (4, 5, [2, 5, 3, 4])):
        x, lengths = padded(lstm, B, T, seed=B + T), torch.tensor(lengths)
        assert_lstm_outputs(traced(x, lengths), model(x, lengths))


def test_trace_with_hx_and_unbatched_input():
    lstm = lstms()[1]
    hx = (randn(4, 2, H, seed=1), randn(4, 2, H, seed=2))
    traced = trace(lstm, (padded(lstm, 2, 6), hx))
    x, hx = padded(lstm, 3, 7, seed=3), (randn(4, 3, H, seed=4), randn(4, 3, H, seed=5))
    assert_lstm_outputs(traced(x, hx), lstm(x, hx))

    traced = trace(lstm, (randn(6, I),))
    x = randn(9, I, seed=6)
    assert_lstm_outputs(traced(x), lstm(x))


def test_trace_made_without_grad_backpropagates():
    """The trace records no grad mode: one made under no_grad still saves what backward needs."""
    lstm = lstms()[1]
    with torch.no_grad():
        traced = trace(lstm, (padded(lstm, 2, 6),))
    x = padded(lstm, 3, 5, seed=7).requires_grad_()
    traced(x)[0].sum().backward()
    grad = x.grad.clone()
    x.grad = None
    lstm(x)[0].sum().backward()
    assert_same(grad, x.grad)


# --- torch.jit.script ---------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: FusedLSTM(I, H), lambda: FusedBiLSTM(I, H),
    lambda: nn.Sequential(nn.Linear(I, I), FusedLSTM(I, H)),
    lambda: CNNLSTM(**SMALL), lambda: CNNLSTM(fused=False, **SMALL),
], ids=["FusedLSTM", "FusedBiLSTM", "inside-a-model", "CNNLSTM", "CNNLSTM-unfused"])
def test_script_is_refused_naming_the_alternatives(make):
    with pytest.raises(RuntimeError, match="does not support torch.jit.script") as info:
        torch.jit.script(make())
    message = str(info.value)
    for alternative in ("torch.export.export", "torch.compile", "torch.jit.trace"):
        assert alternative in message


# --- torch.export -------------------------------------------------------------------------------

def lstm_dims(lstm):
    B, T = Dim("batch", min=1, max=64), Dim("steps", min=1, max=256)
    return B, ({0: B, 1: T} if lstm.batch_first else {0: T, 1: B})


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("lstm", lstms(), ids=["FusedLSTM", "FusedBiLSTM"])
def test_export_with_dynamic_batch_and_steps(lstm, strict):
    _, dims = lstm_dims(lstm)
    program = torch.export.export(lstm, (padded(lstm, 2, 6),), dynamic_shapes=(dims,),
                                  strict=strict)
    exported = program.module()
    for B, T in ((3, 9), (5, 4), (1, 2)):
        x = padded(lstm, B, T, seed=B * 10 + T)
        assert_lstm_outputs(exported(x), lstm(x))


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("lstm", lstms(), ids=["FusedLSTM", "FusedBiLSTM"])
def test_export_with_lengths(lstm, strict):
    model = WithLengths(lstm)
    B, dims = lstm_dims(lstm)
    program = torch.export.export(model, (padded(lstm, 2, 6), torch.tensor([6, 3])),
                                  dynamic_shapes=(dims, {0: B}), strict=strict)
    exported = program.module()
    for B, T, lengths in ((3, 8, [8, 1, 5]), (4, 5, [2, 5, 3, 4]), (2, 7, [7, 7])):
        x, lengths = padded(lstm, B, T, seed=B + T), torch.tensor(lengths)
        assert_lstm_outputs(exported(x, lengths), model(x, lengths))
    # The bounds of lengths are checks of the exported program.
    for bad in ([9, 1, 5], [0, 1, 5]):
        with pytest.raises(RuntimeError):
            exported(padded(lstm, 3, 8), torch.tensor(bad))


def test_export_with_hx_and_unbatched_input():
    lstm = lstms()[0]
    B, T = Dim("batch", min=1, max=64), Dim("steps", min=1, max=256)
    hx = (randn(2, 2, H, seed=1), randn(2, 2, H, seed=2))
    program = torch.export.export(lstm, (randn(6, 2, I), hx),
                                  dynamic_shapes=({0: T, 1: B}, ({1: B}, {1: B})))
    x, hx = randn(8, 3, I, seed=3), (randn(2, 3, H, seed=4), randn(2, 3, H, seed=5))
    assert_lstm_outputs(program.module()(x, hx), lstm(x, hx))

    program = torch.export.export(lstm, (randn(6, I),), dynamic_shapes=({0: T},))
    x = randn(9, I, seed=6)
    assert_lstm_outputs(program.module()(x), lstm(x))


# --- CNNLSTM ------------------------------------------------------------------------------------

def cnnlstm(pooling="mean"):
    torch.manual_seed(0)
    return CNNLSTM(pooling=pooling, **SMALL).eval()


def clips(B, T, seed=0):
    return randn(B, T, 3, 32, 32, seed=seed)


RUNS = ((3, 7, [7, 2, 5]), (2, 5, [5, 5]), (4, 4, [1, 4, 2, 3]))


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_cnnlstm_trace_holds_at_other_batch_sizes_and_lengths(pooling):
    model = cnnlstm(pooling)
    traced = trace(model, (clips(2, 5),))
    for B, T, _ in RUNS:
        x = clips(B, T, seed=B + T)
        assert_same(traced(x), model(x))
    # Traced with full lengths (the eager model's shortcut path), run with partial ones.
    for example in ([5, 3], [5, 5]):
        traced = trace(model, (clips(2, 5), torch.tensor(example)))
        for B, T, lengths in RUNS:
            x, lengths = clips(B, T, seed=B + T), torch.tensor(lengths)
            assert_same(traced(x, lengths), model(x, lengths))


def cnnlstm_dims():
    B, T = Dim("batch", min=1, max=64), Dim("frames", min=1, max=256)
    return B, {0: B, 1: T}


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_cnnlstm_export_with_dynamic_batch_and_frames(pooling):
    model = cnnlstm(pooling)
    _, dims = cnnlstm_dims()
    exported = torch.export.export(model, (clips(2, 5),), dynamic_shapes=(dims,)).module()
    for B, T, _ in RUNS:
        x = clips(B, T, seed=B + T)
        assert_same(exported(x), model(x))


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_cnnlstm_export_with_lengths(pooling, strict):
    model = cnnlstm(pooling)
    B, dims = cnnlstm_dims()
    exported = torch.export.export(model, (clips(2, 5), torch.tensor([5, 3])),
                                   dynamic_shapes=(dims, {0: B}), strict=strict).module()
    for B, T, lengths in RUNS:
        x, lengths = clips(B, T, seed=B + T), torch.tensor(lengths)
        assert_same(exported(x, lengths), model(x, lengths))
    for bad in ([8, 2, 5], [0, 2, 5]):
        with pytest.raises(RuntimeError):
            exported(clips(3, 7), torch.tensor(bad))
