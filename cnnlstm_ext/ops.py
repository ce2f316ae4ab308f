"""Typed Python faces of `torch.ops.cnnlstm_ext.*`: fake (meta) kernels and autograd.

The kernels live in csrc/ (schemas in csrc/ops.cpp). Each op gets a fake implementation so
`torch.compile(fullgraph=True)` traces through it. Autograd calls the matching backward op through
a C++ autograd function (csrc/lstm_autograd.cpp, csrc/pooling_autograd.cpp) rather than
`torch.library.register_autograd`, whose Python layer would cost more host time per call than
the small pooling kernels take, and bound a GPU training step of the LSTM by the host. The
pooling ops' backward ops are differentiable there too.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["lstm_layer"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """autocast's dtype where an autocast region is active for `device_type`, else None."""
    # Some torch versions' dynamo cannot trace is_autocast_available; a device being compiled for
    # has autocast support, so under compile is_autocast_enabled alone decides.
    if not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


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
    dtype = autocast_dtype(device_type)
    if dtype is not None:
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
    y = x.new_empty(T, B, D * H)
    h_n = x.new_empty(D, B, H)
    c_n = x.new_empty(D, B, H)
    # Saved for backward in x's dtype (csrc/lstm_layer.h).
    gates = x.new_empty(T, B, D, 4 * H) if train else x.new_empty(0)
    cell = x.new_empty(T, B, D, H) if train else x.new_empty(0)
    return y, h_n, c_n, gates, cell


@torch.library.register_fake("cnnlstm_ext::lstm_layer_backward")
def _lstm_layer_backward_fake(grad_y, grad_h_n, grad_c_n, x, w_ih, w_hh, h0, c0, lengths, y,
                              gates, cell):
    D, G, _ = w_hh.shape
    return (torch.empty_like(x), torch.empty_like(w_ih), torch.empty_like(w_hh),
            w_hh.new_empty(D, G), torch.empty_like(h0), torch.empty_like(c0))


# --- pooling ------------------------------------------------------------------------------------

__all__ += ["frame_pool", "temporal_pool"]

FRAME_POOL_MODES = ("avg", "max")
TEMPORAL_POOL_MODES = ("mean", "max", "last", "attention")
_POOL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def frame_pool(x: Tensor, batch_size: int, mode: str = "avg", batch_first: bool = False,
               out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Per-frame CNN feature maps -> frame features in the layout the LSTM consumes, in one pass.

    x: [B*T, C, h, w] (frame n = b*T + t; contiguous or channels_last), float32/float64/bfloat16/
    float16. Returns [T, B, C] ([B, T, C] when batch_first), the average ("avg") or maximum ("max")
    over h*w, in out_dtype (default x's dtype). Same values as
    `F.adaptive_avg_pool2d(x, 1).flatten(1).view(B, T, C).transpose(0, 1).contiguous().to(out_dtype)`
    (see cnnlstm_ext.reference.frame_pool); the max gradient goes to the first maximum of each plane.
    """
    if mode not in FRAME_POOL_MODES:
        raise ValueError("frame_pool: mode must be one of %s, got %r" % (FRAME_POOL_MODES, mode))
    if out_dtype is not None and out_dtype not in _POOL_DTYPES:
        raise TypeError("frame_pool: out_dtype must be one of %s, got %s" % (_POOL_DTYPES, out_dtype))
    out, _ = torch.ops.cnnlstm_ext.frame_pool_forward(x, int(batch_size), mode, batch_first, out_dtype)
    return out


@torch.library.register_fake("cnnlstm_ext::frame_pool_forward")
def _frame_pool_forward_fake(x, batch_size, mode, batch_first, out_dtype):
    torch._check(x.dim() == 4, lambda: "frame_pool: x must be [B*T, C, h, w], got %s" % (x.shape,))
    torch._check(mode in FRAME_POOL_MODES, lambda: "frame_pool: bad mode %r" % (mode,))
    n, c = x.shape[0], x.shape[1]
    t = n // batch_size
    shape = (batch_size, t, c) if batch_first else (t, batch_size, c)
    out = x.new_empty(shape, dtype=out_dtype if out_dtype is not None else x.dtype)
    argmax = x.new_empty((n, c) if mode == "max" else (0,), dtype=torch.int32)
    return out, argmax


@torch.library.register_fake("cnnlstm_ext::frame_pool_backward")
def _frame_pool_backward_fake(grad_out, argmax, x_size, x_dtype, channels_last, batch_size, mode,
                              batch_first):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(x_size, dtype=x_dtype, device=grad_out.device, memory_format=fmt)


def temporal_pool(x: Tensor, lengths: Optional[Tensor] = None, mode: str = "mean",
                  batch_first: bool = False, bidirectional: bool = False,
                  score_weight: Optional[Tensor] = None, score_bias: Optional[Tensor] = None) -> Tensor:
    """LSTM outputs -> one vector per sequence, over the valid steps t < lengths[b] only.

    x: [T, B, D] ([B, T, D] when batch_first); lengths: int64 [B] on the CPU or x's device, each in
    [1, T], or None (all T); lengths on a GPU are read back to be checked (a synchronisation),
    lengths on the CPU are checked there and copied without waiting. mode: "mean", "max", "last"
    (the last valid step; with bidirectional, features [0, D/2) from step lengths[b]-1 and
    [D/2, D) from step 0, as a BiLSTM's classifier expects) or "attention" (softmax over the
    valid steps of x_t . score_weight + score_bias, then the weighted sum; score_weight [D] or
    [1, D], score_bias [1]). Returns [B, D] in x's dtype.
    """
    if mode not in TEMPORAL_POOL_MODES:
        raise ValueError("temporal_pool: mode must be one of %s, got %r" % (TEMPORAL_POOL_MODES, mode))
    if mode == "attention" and score_weight is None:
        raise ValueError("temporal_pool: mode 'attention' needs score_weight [D]")
    out, _ = torch.ops.cnnlstm_ext.temporal_pool_forward(x, lengths, mode, batch_first, bidirectional,
                                                         score_weight, score_bias)
    return out


@torch.library.register_fake("cnnlstm_ext::temporal_pool_forward")
def _temporal_pool_forward_fake(x, lengths, mode, batch_first, bidirectional, score_weight, score_bias):
    torch._check(x.dim() == 3, lambda: "temporal_pool: x must be [T, B, D], got %s" % (x.shape,))
    torch._check(mode in TEMPORAL_POOL_MODES, lambda: "temporal_pool: bad mode %r" % (mode,))
    t, b = (x.shape[1], x.shape[0]) if batch_first else (x.shape[0], x.shape[1])
    d = x.shape[2]
    out = x.new_empty((b, d))
    if mode == "max":
        aux = x.new_empty((b, d), dtype=torch.int32)
    elif mode == "attention":
        aux = x.new_empty((b, t), dtype=_acc_dtype(x.dtype))
    else:
        aux = x.new_empty((0,), dtype=torch.int32)
    return out, aux


@torch.library.register_fake("cnnlstm_ext::temporal_pool_backward")
def _temporal_pool_backward_fake(grad_out, x, lengths, aux, mode, batch_first, bidirectional,
                                 score_weight, score_bias):
    acc = _acc_dtype(x.dtype)
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if mode == "attention":
        grad_w = torch.empty(score_weight.shape, dtype=score_weight.dtype, device=x.device)
        grad_b = (torch.empty(score_bias.shape, dtype=score_bias.dtype, device=x.device)
                  if score_bias is not None else x.new_empty((0,), dtype=acc))
    else:
        grad_w = x.new_empty((0,), dtype=acc)
        grad_b = x.new_empty((0,), dtype=acc)
    return grad_x, grad_w, grad_b
