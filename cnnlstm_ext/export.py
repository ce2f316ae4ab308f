"""Export a CNNLSTM for deployment: a `torch.export` program (.pt2) or an ONNX file.

    from cnnlstm_ext.export import export_program, save_onnx, save_pt2
    save_pt2(model, "model.pt2", frames=16, frame_size=112)     # torch.export.load(...) later
    save_onnx(model, "model.onnx", frames=16, frame_size=112)   # onnxruntime, no cnnlstm_ext

Both take clips [B, T, 3, S, S] (float32, normalised as in training) with B and T dynamic, and
optionally lengths [B] (int64, each in [1, T]); they return logits [B, num_classes].

The .pt2 program keeps the package's ops (`torch.ops.cnnlstm_ext.*`): the LSTM recurrence over a
dynamic T has no ATen formulation that torch.export keeps dynamic (nn.LSTM's aten.lstm decomposes
into a Python loop over the example's T), so `torch.export.load` needs `import cnnlstm_ext` first.
For ONNX the ops are lowered to standard operators here (onnx_translations): the LSTM layer to
ONNX's LSTM (gates reordered, lengths as sequence_lens), the temporal pooling to masked reductions;
the frame pooling already runs as ATen ops under export. The ONNX file needs only onnxruntime.
"""
import copy
from typing import Optional

import torch
from torch import nn

from . import ops

__all__ = ["export_program", "save_pt2", "save_onnx", "onnx_translations", "MAX_BATCH",
           "MAX_FRAMES"]

# Upper bounds of the dynamic dimensions (torch.export needs finite ones to reason about sizes).
MAX_BATCH = 4096
MAX_FRAMES = 4096


def _example(model: nn.Module, frames: int, frame_size: int, lengths: bool):
    # B = 2 and T >= 2: a size of 1 would be specialised (torch.export treats 0 and 1 as static).
    clips = torch.randn(2, max(frames, 2), 3, frame_size, frame_size,
                        generator=torch.Generator().manual_seed(0))
    param = next(model.parameters(), None)
    if param is not None:
        clips = clips.to(param.device)
    if not lengths:
        return (clips,)
    return clips, torch.tensor([clips.shape[1], 1])


def _dynamic_shapes(lengths: bool):
    from torch.export import Dim

    batch = Dim("batch", min=1, max=MAX_BATCH)
    frames = Dim("frames", min=1, max=MAX_FRAMES)
    clips = {0: batch, 1: frames}
    return (clips, {0: batch}) if lengths else (clips,)


def _frozen(model: nn.Module) -> nn.Module:
    """An inference copy: eval mode, no parameter asks for gradients (the LSTM op then saves no
    activations for a backward: its extra outputs are empty), and every nn.LSTM swapped for a
    FusedLSTM with the same weights (nn.LSTM's export fixes T to the example's)."""
    from .nn import fuse_lstm

    frozen = fuse_lstm(copy.deepcopy(model)).eval()
    if getattr(frozen, "fused", None) is False:  # a CNNLSTM(fused=False): its LSTM now is fused
        frozen.fused = True
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


def _check_shape(frames, frame_size) -> None:
    if not isinstance(frames, int) or frames < 1 or not isinstance(frame_size, int) or frame_size < 8:
        raise ValueError("export: frames must be >= 1 and frame_size >= 8, got %r and %r"
                         % (frames, frame_size))


def export_program(model: nn.Module, frames: int = 16, frame_size: int = 112,
                   lengths: bool = False) -> "torch.export.ExportedProgram":
    """`torch.export.export` of an inference copy of `model` (a CNNLSTM) with batch and frames
    dynamic; `frames`/`frame_size` shape the example only. With `lengths`, the program takes
    (clips, lengths)."""
    _check_shape(frames, frame_size)
    ops._require_kernels("export")
    frozen = _frozen(model)
    with torch.no_grad():
        return torch.export.export(frozen, _example(frozen, frames, frame_size, lengths),
                                   dynamic_shapes=_dynamic_shapes(lengths))


def save_pt2(model: nn.Module, path: str, frames: int = 16, frame_size: int = 112,
             lengths: bool = False, metadata: Optional[dict] = None) -> None:
    """export_program(...) saved with torch.export.save, atomically; `metadata` (strings) goes
    into the archive as the extra file "metadata.json" (torch.export.load(path,
    extra_files={"metadata.json": ""}) reads it back)."""
    import io
    import json

    from .checkpoint import atomic_write

    program = export_program(model, frames, frame_size, lengths)
    buffer = io.BytesIO()  # (torch.export.save wants a path or a seekable buffer)
    torch.export.save(program, buffer, extra_files={"metadata.json": json.dumps(metadata or {})})
    data = buffer.getvalue()
    atomic_write(path, lambda f: f.write(data))


def save_onnx(model: nn.Module, path: str, frames: int = 16, frame_size: int = 112,
              lengths: bool = False, metadata: Optional[dict] = None, opset: int = 18) -> None:
    """The model as ONNX (standard operators only, batch and frames dynamic), saved atomically.
    Inputs "clips" (and "lengths"), output "logits"; `metadata` (strings) becomes the model's
    metadata_props (onnxruntime: session.get_modelmeta().custom_metadata_map)."""
    import warnings

    from .checkpoint import atomic_write

    ops._require_kernels("export")
    _check_shape(frames, frame_size)
    frozen = _frozen(model)
    example = _example(frozen, frames, frame_size, lengths)
    with torch.no_grad(), warnings.catch_warnings():
        # torch.export's own notes about size checks it rewrites: nothing for the user to act on.
        warnings.simplefilter("ignore", FutureWarning)
        # (clips and lengths share the batch dimension: the exporter notes it keeps one name.)
        warnings.filterwarnings("ignore", message="# The axis name")
        program = torch.onnx.export(
            frozen, example, dynamo=True, dynamic_shapes=_dynamic_shapes(lengths),
            input_names=["clips", "lengths"][:len(example)], output_names=["logits"],
            custom_translation_table=onnx_translations(), opset_version=opset, verbose=False,
            optimize=True)
    proto = program.model_proto
    leftover = sorted({n.domain + "::" + n.op_type for n in proto.graph.node
                       if n.domain not in ("", "ai.onnx")})
    if leftover:  # a lowering is missing: the file would need this package to run
        raise RuntimeError("export: the ONNX graph still holds non-standard operators %s"
                           % ", ".join(leftover))
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    data = proto.SerializeToString()
    atomic_write(path, lambda f: f.write(data))


# --- ONNX lowerings of the package's ops ----------------------------------------------------------
# onnxscript functions the exporter traces, one per custom op (same schema as csrc/ops.cpp). The
# extra outputs the autograd formulation uses (saved gates, argmax, attention weights) are unused
# in an inference graph: empty constants stand for them.

def _onnx_ops():
    from onnxscript import opset18 as op
    return op


def _empty(op, dtype):
    import numpy as np
    import onnx

    return op.Constant(value=onnx.numpy_helper.from_array(np.zeros((0,), dtype=dtype)))


def _onnx_lstm_layer_forward(x, weights, h0, c0, lengths=None, train: bool = False):
    """cnnlstm_ext::lstm_layer_forward -> ONNX LSTM. x: [T, B, I]; weights per direction w_ih
    [4H, I], w_hh [4H, H](, b_ih, b_hh [4H]); h0, c0: [D, B, H]; lengths [B] or None.
    ONNX's reverse direction with sequence_lens reads each sequence from its last valid step and
    writes zeros past it, as the op does."""
    import numpy as np

    op = _onnx_ops()
    weights = list(weights)
    D = h0.shape[0]
    per = len(weights) // D
    H = weights[1].shape[1]

    def gates(t):
        # PyTorch's gate order i, f, g, o -> ONNX's i, o, f, c along dim 0 ([4H, ...]).
        i, f, g, o = (op.Slice(t, [k * H], [(k + 1) * H], [0]) for k in range(4))
        return op.Concat(i, o, f, g, axis=0)

    W = op.Concat(*[op.Unsqueeze(gates(weights[d * per]), [0]) for d in range(D)], axis=0)
    R = op.Concat(*[op.Unsqueeze(gates(weights[d * per + 1]), [0]) for d in range(D)], axis=0)
    B = None
    if per == 4:  # ONNX's B is [D, 8H]: input biases then recurrent biases
        B = op.Concat(*[op.Unsqueeze(op.Concat(gates(weights[d * per + 2]),
                                               gates(weights[d * per + 3]), axis=0), [0])
                        for d in range(D)], axis=0)
    W, R = op.CastLike(W, x), op.CastLike(R, x)
    if B is not None:
        B = op.CastLike(B, x)
    seq_lens = op.Cast(lengths, to=6) if lengths is not None else None  # int32
    Y, Y_h, Y_c = op.LSTM(x, W, R, B, seq_lens, h0, c0, hidden_size=H,
                          direction="bidirectional" if D == 2 else "forward")
    # Y: [T, D, B, H] -> [T, B, D*H]
    y = op.Reshape(op.Transpose(Y, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))
    return y, Y_h, Y_c, _empty(op, np.float32), _empty(op, np.float32)


def _onnx_temporal_pool_forward(x, lengths=None, mode: str = "mean", batch_first: bool = False,
                                bidirectional: bool = False, score_weight=None, score_bias=None):
    """cnnlstm_ext::temporal_pool_forward -> masked reductions over time (x: [T, B, D] or
    [B, T, D]; lengths [B] int64 or None) -> [B, D], as cnnlstm_ext.reference.temporal_pool."""
    import numpy as np

    op = _onnx_ops()
    if batch_first:
        x = op.Transpose(x, perm=[1, 0, 2])  # [T, B, D]
    shape = op.Shape(x)
    steps = op.Squeeze(op.Slice(shape, [0], [1]), [0])                     # T (scalar)
    if lengths is None:
        lengths = op.Expand(op.Unsqueeze(steps, [0]), op.Slice(shape, [1], [2]))  # [B] = T
    t = op.Range(op.Constant(value_int=0), steps, op.Constant(value_int=1))  # [T]
    valid = op.Less(op.Unsqueeze(t, [1]), op.Unsqueeze(lengths, [0]))       # [T, B]
    valid3 = op.Unsqueeze(valid, [2])                                       # [T, B, 1]
    aux = _empty(op, np.int32)
    if mode == "mean":
        total = op.ReduceSum(op.Mul(x, op.CastLike(valid3, x)), op.Constant(value_ints=[0]),
                             keepdims=0)
        return op.Div(total, op.CastLike(op.Unsqueeze(lengths, [1]), x)), aux
    if mode == "max":
        low = op.CastLike(op.Constant(value_float=float("-inf")), x)
        return op.ReduceMax(op.Where(valid3, x, low), op.Constant(value_ints=[0]), keepdims=0), aux
    if mode == "last":
        index = op.Unsqueeze(op.Sub(lengths, op.Constant(value_int=1)), [0, 2])  # [1, B, 1]
        index = op.Expand(index, op.Concat(op.Constant(value_ints=[1]),
                                           op.Slice(shape, [1], [3]), axis=0))  # [1, B, D]
        last = op.Squeeze(op.GatherElements(x, index, axis=0), [0])           # [B, D]
        if not bidirectional:
            return last, aux
        # The reverse direction's half [D/2, D) ends at step 0.
        half = op.Div(op.Slice(shape, [2], [3]), op.Constant(value_ints=[2]))
        first = op.Squeeze(op.Slice(x, [0], [1], [0]), [0])                  # [B, D]
        return op.Concat(op.Slice(last, [0], half, [1]),
                         op.Slice(first, half, op.Slice(shape, [2], [3]), [1]), axis=1), aux
    if mode == "attention":
        w = op.Reshape(op.CastLike(score_weight, x), op.Constant(value_ints=[-1, 1]))  # [D, 1]
        scores = op.MatMul(x, w)                                              # [T, B, 1]
        if score_bias is not None:
            scores = op.Add(scores, op.CastLike(op.Reshape(score_bias, op.Constant(
                value_ints=[1])), x))
        low = op.CastLike(op.Constant(value_float=float("-inf")), x)
        weights = op.Softmax(op.Where(valid3, scores, low), axis=0)           # [T, B, 1]
        return op.ReduceSum(op.Mul(weights, x), op.Constant(value_ints=[0]), keepdims=0), aux
    raise ValueError("temporal_pool: no ONNX lowering for mode %r" % (mode,))


def _onnx_reduce(name: str):
    """aten.amin/amax -> ReduceMin/ReduceMax (the exporter's own fails on an int64 input with no
    dims: the lengths' bounds that CNNLSTM checks)."""
    def reduce(x, dim=(), keepdim: bool = False):
        op = _onnx_ops()
        if len(dim):
            return getattr(op, name)(x, op.Constant(value_ints=list(dim)), keepdims=int(keepdim))
        return getattr(op, name)(x, keepdims=int(keepdim))
    return reduce


def onnx_translations() -> dict:
    """The exporter's custom_translation_table: each op of this package -> its ONNX lowering."""
    ops = torch.ops.cnnlstm_ext
    return {ops.lstm_layer_forward.default: _onnx_lstm_layer_forward,
            ops.temporal_pool_forward.default: _onnx_temporal_pool_forward,
            torch.ops.aten.amin.default: _onnx_reduce("ReduceMin"),
            torch.ops.aten.amax.default: _onnx_reduce("ReduceMax")}
