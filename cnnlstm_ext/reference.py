"""Pure-PyTorch versions of every op: the test oracle. Never used as a silent fallback."""
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["lstm_layer"]


# --- lstm ---------------------------------------------------------------------------------------

def lstm_layer(x: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Optional[Tensor], h0: Tensor,
               c0: Tensor, lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """The semantics of `torch.ops.cnnlstm_ext.lstm_layer_forward`, step by step.

    x: [T, B, I]; w_ih: [D, 4H, I]; w_hh: [D, 4H, H]; bias: [D, 4H] or None; h0, c0: [D, B, H];
    lengths: [B] (values in [1, T]) or None. Direction 1 reads sequence b backwards from step
    lengths[b] - 1. Returns y: [T, B, D*H] (zeros past each length), h_n, c_n: [D, B, H].
    """
    T, B, _ = x.shape
    D, _, H = w_hh.shape
    lengths = (torch.full((B,), T, dtype=torch.long) if lengths is None
               else lengths.to(device="cpu", dtype=torch.long))
    rows = torch.arange(B)
    outputs, h_n, c_n = [], [], []
    for d in range(D):
        h, c = h0[d], c0[d]
        out = x.new_zeros(T, B, H)
        for s in range(T):
            valid = s < lengths                                           # [B]
            t = torch.full((B,), s) if d == 0 else (lengths - 1 - s).clamp(min=0)
            gates = x[t, rows] @ w_ih[d].t() + h @ w_hh[d].t()             # [B, 4H]
            if bias is not None:
                gates = gates + bias[d]
            i, f, g, o = gates.chunk(4, dim=1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            m = valid[:, None].to(x.device)
            c = torch.where(m, c_new, c)
            h = torch.where(m, h_new, h)
            keep = out[t, rows]
            out = out.index_put((t.to(x.device), rows.to(x.device)), torch.where(m, h_new, keep))
        outputs.append(out)
        h_n.append(h)
        c_n.append(c)
    return torch.cat(outputs, dim=2), torch.stack(h_n), torch.stack(c_n)
