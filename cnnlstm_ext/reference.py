"""Pure-PyTorch versions of every op: the test oracle. Never a silent fallback for a failing
kernel; the ops call it only for what the kernels do not serve: an empty batch (lstm_layer) and
the torch.func transforms and forward-mode AD (cnnlstm_ext.ops.transform_active)."""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["lstm_layer"]


# --- lstm ---------------------------------------------------------------------------------------

def lstm_layer(x: Tensor, weights: Sequence[Tensor], h0: Tensor, c0: Tensor,
               lengths: Optional[Tensor] = None,
               round_to: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """The semantics of `torch.ops.cnnlstm_ext.lstm_layer_forward`, step by step (and of
    `lstm_layer_projected` when each direction also has w_hr).

    x: [T, B, I]; weights: per direction w_ih [4H, I], w_hh [4H, P], then b_ih, b_hh [4H] if the
    layer has biases, then w_hr [P, H] if it has projections (nn.LSTM's proj_size = P; P = H
    without); h0: [D, B, P], c0: [D, B, H]; lengths: [B] (values in [1, T]) or None. Direction 1
    reads sequence b backwards from step lengths[b] - 1; with projections h_t = w_hr (o_t *
    tanh(c_t)). Returns y: [T, B, D*P] (zeros past each length), h_n: [D, B, P], c_n: [D, B, H].

    round_to (a 16-bit dtype, with float32 x): what the ops promise for 16-bit layers, computed in
    float32: the recurrent product's operand h_{s-1} and the outputs are rounded to round_to,
    while the sums, the gate math and the cell state stay float32; under autograd, the gradients
    are rounded where the values were, and so are the pre-activation gate gradients (the operand
    of the gradient GEMMs). The accuracy tests' bar for 16-bit kernels.
    """
    if round_to is not None:
        def rnd(t: Tensor) -> Tensor:
            return t.to(round_to).to(t.dtype)

        def rnd_grad(t: Tensor) -> Tensor:
            return _RoundGrad.apply(t, round_to)
    else:
        def rnd(t: Tensor) -> Tensor:
            return t
        rnd_grad = rnd
    T, B, _ = x.shape
    D = h0.shape[0]
    per = len(weights) // D  # 2, 3 (+ w_hr), 4 (+ biases) or 5 (+ both), as nn.LSTM's
    w_ih, w_hh = weights[0::per], weights[1::per]
    bias = [weights[d * per + 2] + weights[d * per + 3] for d in range(D)] if per >= 4 else None
    w_hr = weights[per - 1::per] if per in (3, 5) else None
    P = h0.shape[2]
    lengths = (torch.full((B,), T, dtype=torch.long) if lengths is None
               else lengths.to(device="cpu", dtype=torch.long))
    rows = torch.arange(B)
    outputs, h_n, c_n = [], [], []
    for d in range(D):
        h, c = h0[d], c0[d]
        out = x.new_zeros(T, B, P)
        for s in range(T):
            valid = s < lengths                                           # [B]
            t = torch.full((B,), s) if d == 0 else (lengths - 1 - s).clamp(min=0)
            gates = x[t, rows] @ w_ih[d].t() + rnd(h) @ w_hh[d].t()        # [B, 4H]
            if bias is not None:
                gates = gates + bias[d]
            i, f, g, o = rnd_grad(gates).chunk(4, dim=1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            if w_hr is not None:
                h_new = h_new @ w_hr[d].t()
            m = valid[:, None].to(x.device)
            c = torch.where(m, c_new, c)
            h = torch.where(m, h_new, h)
            keep = out[t, rows]
            out = out.index_put((t.to(x.device), rows.to(x.device)),
                                torch.where(m, rnd(h_new), keep))
        outputs.append(out)
        h_n.append(rnd(h))
        c_n.append(rnd(c))
    return torch.cat(outputs, dim=2), torch.stack(h_n), torch.stack(c_n)


class _RoundGrad(torch.autograd.Function):
    """Identity whose gradient is rounded to `dtype`: the 16-bit kernels keep the pre-activation
    gate gradients in the layer's dtype, the operand of the gradient GEMMs."""

    @staticmethod
    def forward(ctx, t: Tensor, dtype: torch.dtype) -> Tensor:
        ctx.dtype = dtype
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.to(ctx.dtype).to(grad.dtype), None


# --- pooling ------------------------------------------------------------------------------------

__all__ += ["frame_pool", "temporal_pool"]

def frame_pool(x: Tensor, batch_size: int, mode: str = "avg", batch_first: bool = False,
               out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """x: [B*T, C, h, w] -> [T, B, C] ([B, T, C] when batch_first), pooled over h*w."""
    n, c = x.shape[0], x.shape[1]
    if mode == "avg":
        pooled = F.adaptive_avg_pool2d(x, 1)  # [B*T, C, 1, 1]
    elif mode == "max":
        pooled = F.adaptive_max_pool2d(x, 1)
    else:
        raise ValueError("frame_pool: mode must be 'avg' or 'max', got %r" % (mode,))
    y = pooled.flatten(1).view(batch_size, n // batch_size, c)  # [B, T, C]
    if not batch_first:
        y = y.transpose(0, 1)  # [T, B, C]
    y = y.contiguous()
    if out_dtype is not None:
        y = y.to(out_dtype)
    return y


def temporal_pool(x: Tensor, lengths: Optional[Tensor] = None, mode: str = "mean",
                  batch_first: bool = False, bidirectional: bool = False,
                  score_weight: Optional[Tensor] = None, score_bias: Optional[Tensor] = None) -> Tensor:
    """x: [T, B, D] ([B, T, D] when batch_first), lengths: [B] -> [B, D] over the valid steps."""
    if batch_first:
        x = x.transpose(0, 1)  # [T, B, D]
    t, b, d = x.shape
    if lengths is None:
        lengths = torch.full((b,), t, dtype=torch.long, device=x.device)
    lengths = (lengths.clone() if lengths.is_pinned() else lengths).to(x.device, non_blocking=True)
    valid = torch.arange(t, device=x.device)[:, None] < lengths[None, :]  # [T, B]
    if mode == "mean":
        return (x * valid.unsqueeze(-1).to(x.dtype)).sum(0) / lengths[:, None].to(x.dtype)
    if mode == "max":
        return x.masked_fill(~valid.unsqueeze(-1), float("-inf")).amax(0)
    if mode == "last":
        last = x[lengths - 1, torch.arange(b, device=x.device)]  # [B, D]
        if not bidirectional:
            return last
        h = d // 2  # forward direction ends at lengths-1, the reverse one at step 0
        return torch.cat([last[:, :h], x[0, :, h:]], dim=1)
    if mode == "attention":
        w = score_weight.reshape(1, d).to(x.dtype)
        bias = score_bias.reshape(1).to(x.dtype) if score_bias is not None else None
        scores = F.linear(x, w, bias).squeeze(-1)  # [T, B]
        scores = scores.masked_fill(~valid, float("-inf"))
        weights = torch.softmax(scores, dim=0)  # [T, B]
        return (weights.unsqueeze(-1) * x).sum(0)
    raise ValueError("temporal_pool: mode must be 'mean', 'max', 'last' or 'attention', got %r" % (mode,))


# --- video frames -------------------------------------------------------------------------------

__all__ += ["yuv_to_rgb"]


def _area_matrix(n: int, m: int) -> Tensor:
    """[m, n] float64: row j averages the pixels of [j * n / m, (j + 1) * n / m)."""
    s = n / m
    edges = torch.arange(n + 1, dtype=torch.float64)
    lo = torch.arange(m, dtype=torch.float64)[:, None] * s
    overlap = (torch.minimum(edges[1:], lo + s) - torch.maximum(edges[:-1], lo)).clamp_min(0)
    return overlap / s


def yuv_to_rgb(y: Tensor, u: Tensor, v: Tensor, height: int, width: int, kr: float = 0.299,
               kb: float = 0.114, full_range: bool = False) -> Tensor:
    """The semantics of `torch.ops.cnnlstm_ext.yuv_to_rgb`, in float64: chroma repeated to the
    luma grid (each sample over its 1 or 2 pixels per axis), every plane area-averaged to
    [height, width], then converted to RGB, rounded half up and clamped: uint8
    [height, width, 3]."""
    H, W = y.shape
    sy, sx = (1 if u.shape[0] == H else 2), (1 if u.shape[1] == W else 2)
    a_h, a_w = _area_matrix(H, height), _area_matrix(W, width)

    def plane(p: Tensor, rep_h: int, rep_w: int) -> Tensor:
        full = p.double().repeat_interleave(rep_h, 0)[:H].repeat_interleave(rep_w, 1)[:, :W]
        return a_h @ full @ a_w.T

    luma, cb, cr = plane(y, 1, 1), plane(u, sy, sx) - 128, plane(v, sy, sx) - 128
    if not full_range:
        luma, cb, cr = (luma - 16) * 255 / 219, cb * 255 / 224, cr * 255 / 224
    kg = 1 - kr - kb
    r = luma + 2 * (1 - kr) * cr
    b = luma + 2 * (1 - kb) * cb
    g = luma - 2 * kb * (1 - kb) / kg * cb - 2 * kr * (1 - kr) / kg * cr
    return torch.stack([r, g, b], -1).add(0.5).floor().clamp(0, 255).to(torch.uint8)
