"""Pure-PyTorch versions of every op of cnnlstm_ext: the test oracle, never a silent fallback.

Each is written as the plain unfused sequence of stock PyTorch calls that the fused op replaces.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


# --- pooling ---

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
    lengths = lengths.to(x.device)
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
