"""Typed Python faces of `torch.ops.cnnlstm_ext.*`: fake (meta) kernels and autograd.

The kernels live in csrc/ (schemas in csrc/ops.cpp). Each op gets a fake implementation so
`torch.compile(fullgraph=True)` traces through it. Autograd calls the matching backward op through
a C++ autograd function (csrc/lstm/lstm_autograd.cpp, csrc/pooling/pooling_autograd.cpp) rather than
`torch.library.register_autograd`, whose Python layer would cost more host time per call than
the small pooling kernels take, and bound a GPU training step of the LSTM by the host. The
pooling ops' backward ops are differentiable there too. The torch.func transforms and forward-mode
AD cannot go through a C++ autograd function: under them the ops run cnnlstm_ext.reference
(transform_active).
"""
import contextlib
import operator
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import reference

try:
    from . import _C  # noqa: F401  (registers torch.ops.cnnlstm_ext.*)
    _C_ERROR: Optional[str] = None
except ImportError as _error:  # a source tree or install without the build: see kernels_built()
    _C_ERROR = " ".join(str(_error).split()) or type(_error).__name__
BUILD_COMMAND = "pip install --no-build-isolation ."


def kernels_built() -> bool:
    """Whether the compiled kernels (cnnlstm_ext._C) are loaded. Without them the package still
    imports: the checkpoint tools, the models' construction and cnnlstm_ext.reference work, and
    calling a fused op raises KernelsNotBuiltError."""
    return _C_ERROR is None


class KernelsNotBuiltError(RuntimeError):
    """A fused op was called, but cnnlstm_ext._C is not built or could not be loaded."""


def _require_kernels(op: str) -> None:
    if _C_ERROR is not None:
        raise KernelsNotBuiltError(
            f"cnnlstm_ext.{op} needs the compiled kernels, but cnnlstm_ext._C could not be loaded "
            f"({_C_ERROR}). Build them with `{BUILD_COMMAND}` in the source folder, against the "
            f"installed torch (the pure-PyTorch cnnlstm_ext.reference runs without them).")


def _register_fake(name: str):
    """torch.library.register_fake for an op of _C; without the build there is no op to
    describe, and the function stays unregistered."""
    if _C_ERROR is not None:
        return lambda fn: fn
    return torch.library.register_fake(name)

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


def transform_active() -> bool:
    """Whether a torch.func transform (grad, vjp, jacrev, jvp, vmap, ...) is running, or
    forward-mode AD (inside torch.autograd.forward_ad.dual_level). The ops' autograd is a C++
    autograd function, which these cannot go through, so the ops then run the step-by-step
    reference of cnnlstm_ext.reference: the same semantics, slower."""
    return (torch._C._are_functorch_transforms_active()
            or torch.autograd.forward_ad._current_level >= 0)


def _reference_lengths(op: str, lengths: Optional[Tensor], batch: int, steps: int) -> None:
    """The kernels' checks of lengths, for a call that runs the reference instead (which would
    take an out-of-range length silently)."""
    if lengths is None:
        return
    if lengths.dtype != torch.long or tuple(lengths.shape) != (batch,):
        raise RuntimeError(f"{op}: lengths must be int64 of shape [{batch}], got {lengths.dtype} "
                           f"of shape {list(lengths.shape)}")
    if batch > 0:
        lo, hi = (int(v) for v in torch.aminmax(lengths))
        if lo < 1 or hi > steps:
            raise RuntimeError(f"{op}: every length must be in [1, T={steps}], got values in "
                               f"[{lo}, {hi}]")


# --- lstm ---------------------------------------------------------------------------------------

def lstm_layer(x: Tensor, weights: Sequence[Tensor], h0: Tensor, c0: Tensor,
               lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer, one or two directions (direction 1 in reverse time), differentiable.

    x: [T, B, I]; weights: the layer's slice of nn.LSTM's flat weights, per direction
    w_ih [4H, I], w_hh [4H, H], then b_ih, b_hh [4H] if the layer has biases, in one floating
    dtype (cast to x's by the op when it differs); h0, c0: [D, B, H]; lengths: [B] int64 on x's
    device with values in [1, T], or None. Returns y: [T, B, D*H] (zero past each length),
    h_n: [D, B, H], c_n: [D, B, H].

    With projections (nn.LSTM's proj_size = P) each direction's weights end with w_hr [P, H],
    w_hh is [4H, P], h0 is [D, B, P] and y, h_n have P columns: `lstm_layer_projected`, which
    runs step by step in ATen ops (the fused kernels take layers without projections).

    Inside an autocast region x, h0 and c0 are cast to autocast's dtype for x's device (so the
    results come out in that dtype, as nn.LSTM's do), the op casts the weights (one copy per kind
    for both directions; their gradients come back in their own dtype) and runs with autocast off.
    A float64 x is left as it is, as autocast leaves float64 tensors.
    """
    _require_kernels("ops.lstm_layer")
    device_type = x.device.type
    dtype = autocast_dtype(device_type)
    if dtype is not None and x.dtype != torch.float64:
        with torch.autocast(device_type, enabled=False):
            return lstm_layer(x.to(dtype), weights, h0.to(dtype), c0.to(dtype), lengths)
    if _projected(weights, h0):
        # Layers with projections run step by step in ATen ops on every device (csrc/lstm/
        # lstm_steps.cpp): a composite op, so autograd, vmap and fake tensors need nothing here.
        # torch.export would unroll its step loop for the example's T: there it is one node
        # (not for ONNX, which has no lowering of it; the unrolled loop lowers to standard ops).
        if torch.compiler.is_exporting() and not torch.onnx.is_in_onnx_export():
            return torch.ops.cnnlstm_ext.lstm_layer_projected_export(x, weights, h0, c0, lengths)
        if not (torch.compiler.is_compiling() or torch.jit.is_tracing() or transform_active()):
            _reference_lengths("lstm_layer", lengths, x.shape[1], x.shape[0])
        return torch.ops.cnnlstm_ext.lstm_layer_projected(x, weights, h0, c0, lengths)
    # The step-by-step reference serves what the kernels do not: an empty batch, which nn.LSTM
    # accepts (empty outputs, still functions of the weights: zero gradients), and the torch.func
    # transforms (with the kernels' checks of lengths).
    empty = x.dim() == 3 and x.shape[1] == 0
    if empty and torch.jit.is_tracing():
        # The reference's step loop would be recorded for this one T, wrong at any other shape.
        raise RuntimeError("lstm_layer: torch.jit.trace cannot trace an empty batch (B = 0); trace "
                           "with an example of at least one sequence, or use torch.export.export")
    if empty or transform_active():
        if not empty and x.dim() == 3:
            _reference_lengths("lstm_layer", lengths, x.shape[1], x.shape[0])
        return reference.lstm_layer(x, [w.to(x.dtype) for w in weights], h0, c0, lengths)
    # (A torch.jit.trace records no grad mode: there the flag follows requires_grad alone, so a
    # trace made under no_grad still saves what a later backward needs.)
    needs_grad = (torch.is_grad_enabled() or torch.jit.is_tracing()) and (
        x.requires_grad or h0.requires_grad or c0.requires_grad
        or any(w.requires_grad for w in weights))
    y, h_n, c_n, _, _ = torch.ops.cnnlstm_ext.lstm_layer_forward(
        x, weights, h0, c0, lengths, needs_grad)
    return y, h_n, c_n


def _projected(weights: Sequence[Tensor], h0: Tensor) -> bool:
    """Whether the layer has projections: 3 or 5 weights per direction (with w_hr [P, H])."""
    D = h0.shape[0] if h0.dim() == 3 else 0
    return D > 0 and len(weights) % D == 0 and len(weights) // D in (3, 5)


@_register_fake("cnnlstm_ext::lstm_layer_projected_export")
def _lstm_layer_projected_export_fake(x, weights, h0, c0, lengths):
    # x: [T, B, I], h0: [D, B, P], c0: [D, B, H] -> y [T, B, D*P], h_n [D, B, P], c_n [D, B, H]
    D, P, H = h0.shape[0], h0.shape[2], c0.shape[2]
    return (x.new_empty(x.shape[0], x.shape[1], D * P), x.new_empty(D, x.shape[1], P),
            x.new_empty(D, x.shape[1], H))


def _projected_export_setup(ctx, inputs, output) -> None:
    x, weights, h0, c0, lengths = inputs
    ctx.save_for_backward(x, h0, c0, lengths, *weights)


def _projected_export_backward(ctx, grad_y, grad_h_n, grad_c_n):
    """The gradients of lstm_layer_projected_export: lstm_layer_projected's, recomputed (an
    exported program's training is rare; its forward keeps nothing but the inputs). Under
    create_graph the recomputation runs on the inputs themselves, so the gradients are
    differentiable as the composite op's are."""
    x, h0, c0, lengths, *weights = ctx.saved_tensors
    create_graph = torch.is_grad_enabled()
    inputs = [x, h0, c0, *weights]
    if not create_graph:
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
    with torch.enable_grad():
        outputs = torch.ops.cnnlstm_ext.lstm_layer_projected(
            inputs[0], inputs[3:], inputs[1], inputs[2], lengths)
        pairs = [(o, g) for o, g in zip(outputs, (grad_y, grad_h_n, grad_c_n)) if g is not None]
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                         allow_unused=True, create_graph=create_graph)
                     if wanted and pairs else [None] * len(wanted))
    gx, gh0, gc0, *gw = [next(grads) if t.requires_grad else None for t in inputs]
    return gx, gw, gh0, gc0, None


if _C_ERROR is None:
    torch.library.register_autograd("cnnlstm_ext::lstm_layer_projected_export",
                                    _projected_export_backward,
                                    setup_context=_projected_export_setup)


_WEIGHT_NAMES = ("w_ih", "w_hh", "b_ih", "b_hh")


def _fake_layer_weights(op: str, x: Tensor, weights, h0: Tensor) -> Tuple[int, int]:
    """The checks of csrc/lstm/lstm.h's layer_weights, for the fake kernels: (D, H).

    The fake kernels also serve the Meta dispatch key, which wins when a meta tensor is mixed
    with CPU ones; without these checks such a call would return uninitialised tensors silently.
    """
    torch._check(x.dim() == 3, lambda: f"{op}: expected x of shape [T, B, I], got {tuple(x.shape)}")
    torch._check(h0.dim() == 3, lambda: f"{op}: expected h0 of shape [D, B, H], got {tuple(h0.shape)}")
    D, n = h0.shape[0], len(weights)
    torch._check(D >= 1 and n in (2 * D, 4 * D), lambda: (
        f"{op}: expected weights to hold 2 tensors per direction (w_ih, w_hh) or 4 (w_ih, w_hh, "
        f"b_ih, b_hh), for D = h0.size(0) = {D} directions; got {n} tensors"))
    per = n // D
    for k, w in enumerate(weights):
        name = f"weights[{k}] ({_WEIGHT_NAMES[k % per]} of direction {k // per})"
        torch._check(w.device == x.device, lambda: (
            f"{op}: {name} is on {w.device} but x is on {x.device}; all tensors must be on one "
            f"device"))
        torch._check(w.dtype == weights[0].dtype, lambda: (
            f"{op}: {name} has dtype {w.dtype} but weights[0] has dtype {weights[0].dtype}; the "
            f"weights must share one dtype"))
        torch._check(w.shape == weights[k % per].shape, lambda: (
            f"{op}: {name} has shape {list(w.shape)} but direction 0's {_WEIGHT_NAMES[k % per]} "
            f"has shape {list(weights[k % per].shape)}"))
    torch._check(weights[0].dtype.is_floating_point, lambda: (
        f"{op}: expected floating-point weights, got {weights[0].dtype}"))
    w_hh = weights[1]
    torch._check(w_hh.dim() == 2 and w_hh.shape[0] == 4 * w_hh.shape[1], lambda: (
        f"{op}: expected w_hh of shape [D, 4H, H], got {[D, *w_hh.shape]}"))
    return D, w_hh.shape[1]


def _check_same_device_dtype(op: str, x: Tensor, named: dict) -> None:
    """The device/dtype checks of csrc/lstm/lstm.h, for the fake kernels."""
    for name, t in named.items():
        if t is None:
            continue
        torch._check(t.device == x.device, lambda: (
            f"{op}: {name} is on {t.device} but x is on {x.device}; all tensors must be on one "
            f"device"))
        if name != "lengths":
            torch._check(t.dtype == x.dtype, lambda: (
                f"{op}: {name} has dtype {t.dtype} but x has dtype {x.dtype}; all floating "
                f"tensors must share one dtype"))


@_register_fake("cnnlstm_ext::lstm_layer_forward")
def _lstm_layer_forward_fake(x, weights, h0, c0, lengths, train):
    op = "lstm_layer_forward"
    D, H = _fake_layer_weights(op, x, weights, h0)
    _check_same_device_dtype(op, x, {"h0": h0, "c0": c0, "lengths": lengths})
    T, B, _ = x.shape
    y = x.new_empty(T, B, D * H)
    h_n = x.new_empty(D, B, H)
    c_n = x.new_empty(D, B, H)
    # Saved for backward in x's dtype (csrc/lstm/lstm.h).
    gates = x.new_empty(T, B, D, 4 * H) if train else x.new_empty(0)
    cell = x.new_empty(T, B, D, H) if train else x.new_empty(0)
    return y, h_n, c_n, gates, cell


@_register_fake("cnnlstm_ext::lstm_layer_backward")
def _lstm_layer_backward_fake(grad_y, grad_h_n, grad_c_n, x, weights, h0, c0, lengths, y, gates,
                              cell, need_grad_x=True):
    D, H = _fake_layer_weights("lstm_layer_backward", x, weights, h0)
    w = weights[0]  # weight gradients come in the weights' dtype
    grad_x = torch.empty_like(x) if need_grad_x else None
    return (grad_x, w.new_empty(D, 4 * H, x.shape[2]), w.new_empty(D, 4 * H, H),
            w.new_empty(D, 4 * H), torch.empty_like(h0), torch.empty_like(c0))


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
    _require_kernels("ops.frame_pool")
    if mode not in FRAME_POOL_MODES:
        raise ValueError("frame_pool: mode must be one of %s, got %r" % (FRAME_POOL_MODES, mode))
    if out_dtype is not None and out_dtype not in _POOL_DTYPES:
        raise TypeError("frame_pool: out_dtype must be one of %s, got %s" % (_POOL_DTYPES, out_dtype))
    traced_size = (torch.jit.is_tracing() and isinstance(batch_size, Tensor)
                   and batch_size.dim() == 0 and not batch_size.dtype.is_floating_point)
    if traced_size or isinstance(batch_size, torch.SymInt) or torch.compiler.is_exporting():
        # A symbolic batch size: a SymInt of torch.export / dynamic torch.compile (strict export
        # hands it as what isinstance does not tell from an int), or the 0-dim tensor a
        # torch.jit.trace hands for a size read off a tensor. The op's schema takes a
        # plain int, which would bake this one batch size into the graph (export: "specialized
        # it to be a constant"; trace: silently wrong at other sizes), so these run the
        # reference's aten ops, which keep the size symbolic (same values).
        if not traced_size:  # (one check each: symbolic ones become checks of the graph)
            traced_check(x.dim() == 4, lambda: f"frame_pool: x must be [B*T, C, h, w], got "
                                               f"{list(x.shape)}")
            traced_check(batch_size >= 1, lambda: f"frame_pool: batch_size must be >= 1, got "
                                                  f"{batch_size}")
            traced_check(x.shape[0] % batch_size == 0, lambda: (
                f"frame_pool: x must be [B*T, C, h, w] with B = batch_size = {batch_size} "
                f"dividing its first dimension, got {list(x.shape)}"))
        return reference.frame_pool(x, batch_size, mode, batch_first, out_dtype)
    batch_size = _int_argument("frame_pool", "batch_size", batch_size)
    if transform_active():
        if x.dim() != 4 or batch_size < 1 or x.shape[0] % batch_size:
            raise RuntimeError(f"frame_pool: x must be [B*T, C, h, w] with B = batch_size = "
                               f"{batch_size} dividing its first dimension, got {list(x.shape)}")
        return reference.frame_pool(x, int(batch_size), mode, batch_first, out_dtype)
    out, _ = torch.ops.cnnlstm_ext.frame_pool_forward(x, int(batch_size), mode, batch_first, out_dtype)
    return out


def traced_check(cond, message) -> None:
    """torch._check(cond, message) for code that torch.export or torch.compile traces: without
    the message under Dynamo (torch.compile, strict export), which cannot trace its lambda."""
    torch._check(cond, None if torch.compiler.is_compiling() else message)


def _int_argument(op: str, name: str, value):
    """`value` as an int (a SymInt passes as it is); a float, bool or other type is a TypeError
    naming the argument, rather than a silent truncation."""
    if isinstance(value, torch.SymInt):
        return value
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError("%s: %s must be an int, got %s %r" % (op, name, type(value).__name__, value))


def _fake_on_device(op: str, name: str, t: Optional[Tensor], device: torch.device,
                    what: str = "x's device") -> None:
    """The kernels' device check of one tensor argument, for the fake kernels (which also serve
    the Meta key: a meta tensor mixed with CPU ones would otherwise yield uninitialised memory)."""
    if t is not None:
        torch._check(t.device == device, lambda: (
            f"{op}: {name} must be on {device} ({what}), got {t.device}"))


def _values_known(t: Tensor) -> bool:
    """Whether `t`'s values can be read: not a meta tensor, not a fake one of a trace."""
    from torch._subclasses.fake_tensor import FakeTensor
    return t.device.type != "meta" and not isinstance(t, FakeTensor)


def _fake_lengths(op: str, lengths: Optional[Tensor], batch, steps, device: torch.device) -> None:
    """The checks of csrc/pooling/pooling.h's temporal_pool_lengths, for the fake kernels: int64
    [B] on the CPU or x's device, values in [1, T] where they are known."""
    if lengths is None:
        return
    torch._check(lengths.dtype == torch.long, lambda: (
        f"{op}: lengths must be int64, got {lengths.dtype}"))
    torch._check(lengths.dim() == 1 and lengths.shape[0] == batch, lambda: (
        f"{op}: lengths must be [B] = [{batch}], got shape {list(lengths.shape)}"))
    torch._check(lengths.device.type == "cpu" or lengths.device == device, lambda: (
        f"{op}: lengths must be on the CPU or on {device} (x's device), got {lengths.device}"))
    if _values_known(lengths) and lengths.numel() > 0:
        values = lengths.tolist()
        for b, v in enumerate(values):
            torch._check(v >= 1, lambda: (
                f"{op}: lengths[{b}] = {v}; every length must be >= 1 (a sequence needs at least "
                f"one valid step)"))
            torch._check(v <= steps, lambda: (
                f"{op}: lengths[{b}] = {v}; every length must be <= T = {steps} (x's time steps)"))


def _fake_score(op: str, x: Tensor, score_weight: Optional[Tensor],
                score_bias: Optional[Tensor]) -> None:
    """The checks of csrc/pooling/pooling.h's temporal_pool_score, for the fake kernels."""
    d = x.shape[2]
    torch._check(score_weight is not None, lambda: (
        f"{op}: mode \"attention\" needs score_weight [D] = [{d}]"))
    torch._check(score_weight.numel() == d and (
        score_weight.dim() == 1 or (score_weight.dim() == 2 and score_weight.shape[0] == 1)),
        lambda: (f"{op}: score_weight must be [D] or [1, D] with D = {d}, got shape "
                 f"{list(score_weight.shape)}"))
    _fake_on_device(op, "score_weight", score_weight, x.device)
    if score_bias is not None:
        torch._check(score_bias.numel() == 1, lambda: (
            f"{op}: score_bias must have one element ([1]), got shape {list(score_bias.shape)}"))
        _fake_on_device(op, "score_bias", score_bias, x.device)


@_register_fake("cnnlstm_ext::frame_pool_forward")
def _frame_pool_forward_fake(x, batch_size, mode, batch_first, out_dtype):
    torch._check(x.dim() == 4, lambda: "frame_pool: x must be [B*T, C, h, w], got %s" % (x.shape,))
    torch._check(mode in FRAME_POOL_MODES, lambda: "frame_pool: bad mode %r" % (mode,))
    torch._check(batch_size >= 1, lambda: "frame_pool: batch_size must be >= 1, got %s" % batch_size)
    torch._check(x.shape[0] % batch_size == 0, lambda: (
        "frame_pool: x must be [B*T, C, h, w] with B = batch_size = %s, but its first dimension %s "
        "is not a multiple of it" % (batch_size, x.shape[0])))
    n, c = x.shape[0], x.shape[1]
    t = n // batch_size
    shape = (batch_size, t, c) if batch_first else (t, batch_size, c)
    out = x.new_empty(shape, dtype=out_dtype if out_dtype is not None else x.dtype)
    argmax = x.new_empty((n, c) if mode == "max" else (0,), dtype=torch.int32)
    return out, argmax


@_register_fake("cnnlstm_ext::frame_pool_backward")
def _frame_pool_backward_fake(grad_out, argmax, x_size, x_dtype, channels_last, batch_size, mode,
                              batch_first):
    op = "frame_pool_backward"
    torch._check(len(x_size) == 4, lambda: f"{op}: x_size must be [B*T, C, h, w], got {x_size}")
    torch._check(batch_size >= 1, lambda: f"{op}: batch_size must be >= 1, got {batch_size}")
    torch._check(x_size[0] % batch_size == 0, lambda: (
        f"{op}: x_size[0] = {x_size[0]} is not a multiple of batch_size = {batch_size}"))
    n, c, t = x_size[0], x_size[1], x_size[0] // batch_size
    expected = [batch_size, t, c] if batch_first else [t, batch_size, c]
    torch._check(grad_out.dim() == 3 and all(a == b for a, b in zip(grad_out.shape, expected)),
                 lambda: (f"{op}: grad_out must be {'[B, T, C]' if batch_first else '[T, B, C]'} "
                          f"= {expected}, got {list(grad_out.shape)}"))
    if mode == "max":
        torch._check(argmax.dtype == torch.int32 and argmax.dim() == 2 and argmax.shape[0] == n
                     and argmax.shape[1] == c, lambda: (
            f"{op}: argmax must be int32 [N, C] = [{n}, {c}] as returned by frame_pool_forward, "
            f"got {argmax.dtype} {list(argmax.shape)}"))
        _fake_on_device(op, "argmax", argmax, grad_out.device, "grad_out's device")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(x_size, dtype=x_dtype, device=grad_out.device, memory_format=fmt)


def temporal_pool(x: Tensor, lengths: Optional[Tensor] = None, mode: str = "mean",
                  batch_first: bool = False, bidirectional: bool = False,
                  score_weight: Optional[Tensor] = None, score_bias: Optional[Tensor] = None) -> Tensor:
    """LSTM outputs -> one vector per sequence, over the valid steps t < lengths[b] only.

    x: [T, B, D] ([B, T, D] when batch_first); lengths: int64 [B] on the CPU or x's device, each in
    [1, T], or None (all T); lengths on a GPU are read back to be checked (a synchronisation;
    not while a CUDA graph is captured, which takes them only on the GPU, unchecked), lengths on
    the CPU are checked there and copied without waiting. mode: "mean", "max", "last"
    (the last valid step; with bidirectional, features [0, D/2) from step lengths[b]-1 and
    [D/2, D) from step 0, as a BiLSTM's classifier expects) or "attention" (softmax over the
    valid steps of x_t . score_weight + score_bias, then the weighted sum; score_weight [D] or
    [1, D], score_bias [1]). Returns [B, D] in x's dtype.
    """
    _require_kernels("ops.temporal_pool")
    if mode not in TEMPORAL_POOL_MODES:
        raise ValueError("temporal_pool: mode must be one of %s, got %r" % (TEMPORAL_POOL_MODES, mode))
    if mode == "attention" and score_weight is None:
        raise ValueError("temporal_pool: mode 'attention' needs score_weight [D]")
    if transform_active():
        if x.dim() == 3:
            _reference_lengths("temporal_pool", lengths, x.shape[0 if batch_first else 1],
                               x.shape[1 if batch_first else 0])
        return reference.temporal_pool(x, lengths, mode, batch_first, bidirectional, score_weight,
                                       score_bias)
    out, _ = torch.ops.cnnlstm_ext.temporal_pool_forward(x, lengths, mode, batch_first, bidirectional,
                                                         score_weight, score_bias)
    return out


@_register_fake("cnnlstm_ext::temporal_pool_forward")
def _temporal_pool_forward_fake(x, lengths, mode, batch_first, bidirectional, score_weight, score_bias):
    torch._check(x.dim() == 3, lambda: "temporal_pool: x must be [T, B, D], got %s" % (x.shape,))
    torch._check(mode in TEMPORAL_POOL_MODES, lambda: "temporal_pool: bad mode %r" % (mode,))
    t, b = (x.shape[1], x.shape[0]) if batch_first else (x.shape[0], x.shape[1])
    d = x.shape[2]
    _fake_lengths("temporal_pool", lengths, b, t, x.device)
    if mode == "attention":
        _fake_score("temporal_pool", x, score_weight, score_bias)
    out = x.new_empty((b, d))
    if mode == "max":
        aux = x.new_empty((b, d), dtype=torch.int32)
    elif mode == "attention":
        aux = x.new_empty((b, t), dtype=_acc_dtype(x.dtype))
    else:
        aux = x.new_empty((0,), dtype=torch.int32)
    return out, aux


@_register_fake("cnnlstm_ext::temporal_pool_backward")
def _temporal_pool_backward_fake(grad_out, x, lengths, aux, mode, batch_first, bidirectional,
                                 score_weight, score_bias):
    op = "temporal_pool_backward"
    torch._check(x.dim() == 3, lambda: f"{op}: x must be [T, B, D], got {list(x.shape)}")
    acc = _acc_dtype(x.dtype)
    t, b = (x.shape[1], x.shape[0]) if batch_first else (x.shape[0], x.shape[1])
    d = x.shape[2]
    torch._check(grad_out.dim() == 2 and grad_out.shape[0] == b and grad_out.shape[1] == d,
                 lambda: f"{op}: grad_out must be [B, D] = [{b}, {d}], got {list(grad_out.shape)}")
    _fake_on_device(op, "grad_out", grad_out, x.device)
    _fake_lengths(op, lengths, b, t, x.device)
    if mode in ("max", "attention"):
        _fake_on_device(op, "aux", aux, x.device)
    if mode == "attention":
        _fake_score(op, x, score_weight, score_bias)
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if mode == "attention":
        grad_w = torch.empty(score_weight.shape, dtype=score_weight.dtype, device=x.device)
        grad_b = (torch.empty(score_bias.shape, dtype=score_bias.dtype, device=x.device)
                  if score_bias is not None else x.new_empty((0,), dtype=acc))
    else:
        grad_w = x.new_empty((0,), dtype=acc)
        grad_b = x.new_empty((0,), dtype=acc)
    return grad_x, grad_w, grad_b


# --- video frames -------------------------------------------------------------------------------

__all__ += ["yuv_to_rgb"]


def yuv_to_rgb(y: Tensor, u: Tensor, v: Tensor, height: int, width: int, kr: float = 0.299,
               kb: float = 0.114, full_range: bool = False) -> Tensor:
    """A decoded planar YUV frame -> RGB uint8 [height, width, 3], area-resampled to a size no
    larger than the frame's: each output pixel is the mean over the source area it covers, as
    converting every pixel to RGB and then averaging would give (up to the clamp to [0, 255]).

    y: [H, W] uint8; u, v: [Hc, Wc] uint8 with Hc = H or ceil(H / 2) and Wc = W or ceil(W / 2)
    (4:4:4, 4:2:2, 4:2:0); rows may be padded (PyAV's planes), columns contiguous. kr, kb: the
    matrix's luma coefficients (BT.601 by default; BT.709: 0.2126, 0.0722); full_range: JPEG
    range, else limited (Y in [16, 235]). Same values as cnnlstm_ext.reference.yuv_to_rgb, to
    within one level where a value falls on a rounding boundary. CPU only, as the decoder.
    """
    _require_kernels("ops.yuv_to_rgb")
    return torch.ops.cnnlstm_ext.yuv_to_rgb(y, u, v, height, width, kr, kb, full_range)


@_register_fake("cnnlstm_ext::yuv_to_rgb")
def _yuv_to_rgb_fake(y, u, v, height, width, kr, kb, full_range):
    torch._check(y.dim() == 2 and u.dim() == 2 and v.dim() == 2,
                 lambda: "yuv_to_rgb: y, u and v must be 2-D planes")
    torch._check(y.dtype == torch.uint8 and u.dtype == torch.uint8 and v.dtype == torch.uint8,
                 lambda: "yuv_to_rgb: y, u and v must be uint8")
    torch._check(1 <= height <= y.shape[0] and 1 <= width <= y.shape[1],
                 lambda: "yuv_to_rgb: the output size must be between 1 x 1 and the frame's")
    return y.new_empty(height, width, 3)


# --- kernel trace (tests) -----------------------------------------------------------------------

__all__ += ["recorded_kernels"]

_recorders: List[List[str]] = []  # the lists of the recorded_kernels blocks now open


def _drain_kernel_trace() -> None:
    """Hands what the op recorded to every open block; records on while one is open."""
    names = torch.ops.cnnlstm_ext.kernel_trace(False)
    for recorder in _recorders:
        recorder.extend(names)
    if _recorders:
        torch.ops.cnnlstm_ext.kernel_trace(True)


@contextlib.contextmanager
def recorded_kernels() -> Iterator[List[str]]:
    """The kernel variants the ops launch inside the block, for tests that force a variant and
    must prove it ran (a silent fallback would otherwise pass them):

        with ops.recorded_kernels() as ran:
            model(x).sum().backward()
        assert "cuda:lstm_forward:persistent:fma:barrier" in ran

    The list fills when the block exits, one name per launch decision ("cpu:gemm:onednn",
    "cpu:lstm_forward:avx512:cell-avx2", "cuda:lstm_backward:stepwise", ...; csrc/kernel_trace.h),
    in order, repeats included. Blocks may nest. Launches replayed from a CUDA graph are not seen.
    """
    _require_kernels("ops.recorded_kernels")
    names: List[str] = []
    if _recorders:
        _drain_kernel_trace()
    else:
        torch.ops.cnnlstm_ext.kernel_trace(True)
    _recorders.append(names)
    try:
        yield names
    finally:
        _drain_kernel_trace()
        del _recorders[next(i for i, r in enumerate(_recorders) if r is names)]
        if not _recorders:
            torch.ops.cnnlstm_ext.kernel_trace(False)
