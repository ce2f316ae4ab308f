"""Typed Python faces of `torch.ops.cnnlstm_ext.*`: fake (meta) kernels and autograd.

The kernels live in csrc/ (schemas in csrc/ops.cpp). Each op gets a fake implementation so
`torch.compile(fullgraph=True)` traces through it, and autograd through
`torch.library.register_autograd`, whose backward calls the matching backward op.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["lstm_layer"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- lstm ---------------------------------------------------------------------------------------

def lstm_layer(x: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Optional[Tensor], h0: Tensor,
               c0: Tensor, lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer, one or two directions (direction 1 in reverse time), differentiable.

    x: [T, B, I]; w_ih: [D, 4H, I]; w_hh: [D, 4H, H]; bias: [D, 4H] (b_ih + b_hh) or None;
    h0, c0: [D, B, H]; lengths: [B] int64 on x's device with values in [1, T], or None.
    Returns y: [T, B, D*H] (zero past each length), h_n: [D, B, H], c_n: [D, B, H].

    Inside an autocast region the floating inputs are cast to autocast's dtype for x's device
    (so the results come out in that dtype, as nn.LSTM's do) and the op runs with autocast off.
    """
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        with torch.autocast(device_type, enabled=False):
            return lstm_layer(cast(x), cast(w_ih), cast(w_hh), cast(bias), cast(h0), cast(c0),
                              lengths)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w_ih, w_hh, bias, h0, c0))
    y, h_n, c_n, _, _ = torch.ops.cnnlstm_ext.lstm_layer_forward(
        x, w_ih, w_hh, bias, h0, c0, lengths, needs_grad)
    return y, h_n, c_n


def _check_same_device_dtype(x: Tensor, named: dict) -> None:
    """The device/dtype checks of csrc/lstm_layer.h, for the fake kernel.

    The fake kernel also serves the Meta dispatch key, which wins when a meta tensor is mixed with
    CPU ones; without these checks such a call would return uninitialised tensors silently.
    """
    for name, t in named.items():
        if t is None:
            continue
        torch._check(t.device == x.device, lambda: (
            f"lstm_layer_forward: {name} is on {t.device} but x is on {x.device}; all tensors "
            f"must be on one device"))
        if name != "lengths":
            torch._check(t.dtype == x.dtype, lambda: (
                f"lstm_layer_forward: {name} has dtype {t.dtype} but x has dtype {x.dtype}; all "
                f"floating tensors must share one dtype"))


@torch.library.register_fake("cnnlstm_ext::lstm_layer_forward")
def _lstm_layer_forward_fake(x, w_ih, w_hh, bias, h0, c0, lengths, train):
    torch._check(x.dim() == 3, lambda: f"expected x of shape [T, B, I], got {tuple(x.shape)}")
    torch._check(w_hh.dim() == 3, lambda: f"expected w_hh of shape [D, 4H, H], got {tuple(w_hh.shape)}")
    _check_same_device_dtype(x, {"w_ih": w_ih, "w_hh": w_hh, "bias": bias, "h0": h0, "c0": c0,
                                 "lengths": lengths})
    T, B, _ = x.shape
    D, _, H = w_hh.shape
    acc = _acc_dtype(x.dtype)
    y = x.new_empty(T, B, D * H)
    h_n = x.new_empty(D, B, H)
    c_n = x.new_empty(D, B, H)
    if train:
        gates = x.new_empty(T, B, D, 4 * H, dtype=acc)
        cell = x.new_empty(T, B, D, H, dtype=acc)
    else:
        gates = x.new_empty(0, dtype=acc)
        cell = x.new_empty(0, dtype=acc)
    return y, h_n, c_n, gates, cell


@torch.library.register_fake("cnnlstm_ext::lstm_layer_backward")
def _lstm_layer_backward_fake(grad_y, grad_h_n, grad_c_n, x, w_ih, w_hh, h0, c0, lengths, y,
                              gates, cell):
    D, G, _ = w_hh.shape
    return (torch.empty_like(x), torch.empty_like(w_ih), torch.empty_like(w_hh),
            w_hh.new_empty(D, G), torch.empty_like(h0), torch.empty_like(c0))


def _lstm_setup_context(ctx, inputs, output):
    x, w_ih, w_hh, bias, h0, c0, lengths, train = inputs
    y, _, _, gates, cell = output
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, w_ih, w_hh, h0, c0, lengths, y, gates, cell)


def _lstm_backward(ctx, grad_y, grad_h_n, grad_c_n, _grad_gates, _grad_cell):
    x, w_ih, w_hh, h0, c0, lengths, y, gates, cell = ctx.saved_tensors
    grad_y = torch.zeros_like(y) if grad_y is None else grad_y
    grad_h_n = torch.zeros_like(h0) if grad_h_n is None else grad_h_n
    grad_c_n = torch.zeros_like(c0) if grad_c_n is None else grad_c_n
    gx, gw_ih, gw_hh, gb, gh0, gc0 = torch.ops.cnnlstm_ext.lstm_layer_backward(
        grad_y.contiguous(), grad_h_n.contiguous(), grad_c_n.contiguous(), x, w_ih, w_hh, h0, c0,
        lengths, y, gates, cell)
    return gx, gw_ih, gw_hh, (gb if ctx.has_bias else None), gh0, gc0, None, None


torch.library.register_autograd("cnnlstm_ext::lstm_layer_forward", _lstm_backward,
                                setup_context=_lstm_setup_context)
