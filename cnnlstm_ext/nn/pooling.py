"""Pooling modules around the CNN-LSTM's recurrent core, backed by the fused pooling ops.

FramePool sits between the per-frame CNN and the LSTM, TemporalPool between the LSTM and the
classifier.
"""
from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops


class FramePool(nn.Module):
    """CNN feature maps [B*T, C, h, w] -> frame features [T, B, C] ([B, T, C] if batch_first).

    Replaces `adaptive_{avg,max}_pool2d(x, 1).flatten(1).view(B, T, C).transpose(0, 1).contiguous()`
    (and a cast to out_dtype) with one pass that writes each feature once, where the LSTM reads it.

    Args:
        mode: "avg" or "max" over the h*w positions.
        batch_first: return [B, T, C] instead of [T, B, C].
        out_dtype: dtype of the features (None: the maps' dtype).
    """

    def __init__(self, mode: str = "avg", batch_first: bool = False,
                 out_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if mode not in ops.FRAME_POOL_MODES:
            raise ValueError("FramePool: mode must be one of %s, got %r" % (ops.FRAME_POOL_MODES, mode))
        self.mode = mode
        self.batch_first = batch_first
        self.out_dtype = out_dtype

    def forward(self, maps: Tensor, batch_size: int) -> Tensor:
        # maps: [B*T, C, h, w] with frame n = b*T + t  ->  [T, B, C] (or [B, T, C])
        return ops.frame_pool(maps, batch_size, self.mode, self.batch_first, self.out_dtype)

    def extra_repr(self) -> str:
        s = "mode=%r, batch_first=%s" % (self.mode, self.batch_first)
        if self.out_dtype is not None:
            s += ", out_dtype=%s" % (self.out_dtype,)
        return s


class TemporalPool(nn.Module):
    """LSTM outputs [T, B, D] ([B, T, D] if batch_first) + lengths [B] -> [B, D].

    Pools only the valid steps t < lengths[b] of each sequence (all T when lengths is None).

    Args:
        mode: "mean", "max", "last" (the last valid step) or "attention" (softmax over the valid
            steps of a learned score `score(x_t)`, then the weighted sum of x_t).
        dim: feature size D; required for "attention", checked against the input when given.
        batch_first: the input is [B, T, D].
        bidirectional: for "last", the input is a bidirectional output whose second half
            [D/2, D) runs in reverse time, so that half is taken at step 0.

    Attributes:
        score: `nn.Linear(dim, 1)`, the attention score (mode "attention" only, else None).
    """

    def __init__(self, mode: str = "mean", dim: Optional[int] = None, batch_first: bool = False,
                 bidirectional: bool = False):
        super().__init__()
        if mode not in ops.TEMPORAL_POOL_MODES:
            raise ValueError("TemporalPool: mode must be one of %s, got %r"
                             % (ops.TEMPORAL_POOL_MODES, mode))
        if mode == "attention" and dim is None:
            raise ValueError("TemporalPool: mode 'attention' needs dim (the feature size D)")
        if bidirectional and mode == "last" and dim is not None and dim % 2:
            raise ValueError("TemporalPool: bidirectional 'last' needs an even dim, got %d" % dim)
        self.mode = mode
        self.dim = dim
        self.batch_first = batch_first
        self.bidirectional = bidirectional
        self.score = nn.Linear(dim, 1) if mode == "attention" else None

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        # x: [T, B, D] (or [B, T, D]), lengths: [B] int64 -> [B, D]
        if self.dim is not None and (x.dim() != 3 or x.shape[-1] != self.dim):
            raise ValueError("TemporalPool: expected input [%s, D=%d], got shape %s"
                             % ("B, T" if self.batch_first else "T, B", self.dim, tuple(x.shape)))
        weight = self.score.weight if self.score is not None else None
        bias = self.score.bias if self.score is not None else None
        return ops.temporal_pool(x, lengths, self.mode, self.batch_first, self.bidirectional, weight, bias)

    def extra_repr(self) -> str:
        return "mode=%r, dim=%s, batch_first=%s, bidirectional=%s" % (
            self.mode, self.dim, self.batch_first, self.bidirectional)
