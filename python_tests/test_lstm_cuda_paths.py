"""Both CUDA recurrence paths (persistent, stepwise), both products of the persistent path
(tensor-core MMA, FMA) and both of its exchanges (barrier, tagged) against the float64 CPU
kernels, forward and every gradient.

The path is forced through cnnlstm_ext.backends.flags (lstm_path, lstm_mma, lstm_exchange), and
every case proves that the forced variant ran (ops.recorded_kernels): a forced variant that cannot
plan is an error, never a fallback.
Where cuDNN can run the same case (no lengths), the fused error must also stay within twice
cuDNN's own error in the same dtype against the same float64 reference (plus a small floor).
"""
import zlib

import pytest
import torch

import cnnlstm_ext
from cnnlstm_ext import FusedLSTM, ops

# (batch, steps, input, hidden, layers, bidirectional, with lengths)
SHAPES = [
    (1, 9, 32, 64, 1, False, False),
    (3, 7, 48, 64, 2, True, True),
    (8, 16, 512, 512, 1, True, False),
    (32, 12, 512, 512, 2, True, True),
    (40, 6, 96, 96, 1, True, True),
]
# Relative-norm tolerance against float64, and the floor added to 2x cuDNN's error. float32 is
# exact float32 here (TF32 off: FusedLSTM would follow cuDNN's flag, on by default).
pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("no_tf32")]
TOL = {torch.float32: (2e-5, 1e-6), torch.bfloat16: (2.5e-2, 2e-3), torch.float16: (5e-3, 3e-4)}


def _rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _run(model, x, hx, lengths, generator_seed):
    x = x.detach().clone().requires_grad_(True)
    h0 = hx[0].detach().clone().requires_grad_(True)
    c0 = hx[1].detach().clone().requires_grad_(True)
    if lengths is None:
        out, (h, c) = model(x, (h0, c0))
    else:
        out, (h, c) = model(x, (h0, c0), lengths=lengths)
    g = torch.Generator().manual_seed(generator_seed)
    loss = sum((t.double() * torch.randn(t.shape, generator=g, dtype=torch.double).to(t.device)).sum()
               for t in (out, h, c))
    grads = torch.autograd.grad(loss, [x, h0, c0] + list(model.parameters()))
    return [out, h, c, *grads]


def _case(shape, dtype, seed):
    B, T, I, H, L, bi, with_lengths = shape
    D = 2 if bi else 1
    g = torch.Generator().manual_seed(seed)
    ref = FusedLSTM(I, H, L, bidirectional=bi).double()
    for p in ref.parameters():  # weights exactly representable in dtype
        p.data = p.data.to(dtype).double()
    x = torch.randn(T, B, I, generator=g, dtype=torch.double).to(dtype).double()
    hx = tuple(torch.randn(L * D, B, H, generator=g, dtype=torch.double).to(dtype).double()
               for _ in range(2))
    lengths = None
    if with_lengths:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T
    return ref, x, hx, lengths


# The tensor-core product is for 16-bit weights (float32 always takes the FMA product).
VARIANTS = [pytest.param(v, dt, id=f"{v}-{dt}".replace("torch.", ""))
            for v in ["persistent-mma", "persistent-fma", "persistent-fma-tagged", "stepwise"]
            for dt in [torch.float32, torch.bfloat16, torch.float16]
            if not (v == "persistent-mma" and dt == torch.float32)]


def expected_kernels(variant):
    """The names ops.recorded_kernels gives for the forward and backward of `variant`."""
    if variant == "stepwise":
        return {"cuda:lstm_forward:stepwise", "cuda:lstm_backward:stepwise"}
    _, product, *tagged = variant.split("-")
    return {f"cuda:lstm_forward:persistent:{product}:{'tagged' if tagged else 'barrier'}",
            f"cuda:lstm_backward:persistent:{product}:barrier"}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-T{}-I{}-H{}-L{}-{}-{}".format(
    s[0], s[1], s[2], s[3], s[4], "bi" if s[5] else "uni", "lengths" if s[6] else "padded"))
@pytest.mark.parametrize("variant,dtype", VARIANTS)
def test_cuda_path_matches_float64(variant, dtype, shape):
    path, product, exchange = (variant.split("-") + ["", "barrier"])[:3]
    with cnnlstm_ext.backends.flags(lstm_path=path, lstm_mma=product == "mma",
                                    lstm_exchange=exchange):
        _check_path(variant, dtype, shape)


def _check_path(variant, dtype, shape):
    ref, x, hx, lengths = _case(shape, dtype, seed=zlib.crc32(repr((variant, str(dtype), shape)).encode()))
    want = _run(ref, x, hx, lengths, 1)
    model = FusedLSTM(ref.input_size, ref.hidden_size, ref.num_layers,
                      bidirectional=ref.bidirectional).to("cuda", dtype)
    model.load_state_dict(ref.state_dict())
    args = (x.to("cuda", dtype), tuple(t.to("cuda", dtype) for t in hx),
            None if lengths is None else lengths.cuda())
    with ops.recorded_kernels() as ran:
        got = _run(model, *args, 1)
    again = _run(model, *args, 1)
    assert set(ran) == expected_kernels(variant)
    tol, floor = TOL[dtype]
    names = ["output", "h_n", "c_n", "grad_input", "grad_h0", "grad_c0"] + [
        "grad_" + n for n, _ in model.named_parameters()]
    errors = {n: _rel(a, b) for n, a, b in zip(names, got, want)}
    assert max(errors.values()) < tol, errors
    assert all(torch.equal(a, b) for a, b in zip(got, again)), "not bitwise reproducible"
    if lengths is None:
        lstm = torch.nn.LSTM(ref.input_size, ref.hidden_size, ref.num_layers,
                             bidirectional=ref.bidirectional).to("cuda", dtype)
        lstm.load_state_dict(ref.state_dict())
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            base = _run(lstm, *args[:2], None, 1)
        for n, b, w in zip(names, base, want):
            assert errors[n] <= 2 * _rel(b, w) + floor, (n, errors[n], _rel(b, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_auto_path_takes_stepwise_for_unplannable_shape(dtype):
    # H % 32 != 0 cannot take the persistent kernel: automatic selection falls back to the
    # per-step path, with the right answer.
    assert cnnlstm_ext.backends.lstm.path == "auto"
    ref, x, hx, lengths = _case((4, 5, 40, 24, 1, True, True), dtype, seed=3)
    want = _run(ref, x, hx, lengths, 2)
    model = FusedLSTM(40, 24, 1, bidirectional=True).to("cuda", dtype)
    model.load_state_dict(ref.state_dict())
    with ops.recorded_kernels() as ran:
        got = _run(model, x.to("cuda", dtype), tuple(t.to("cuda", dtype) for t in hx),
                   lengths.cuda(), 2)
    assert set(ran) == expected_kernels("stepwise")
    tol, _ = TOL[dtype]
    assert max(_rel(a, b) for a, b in zip(got, want)) < tol


@pytest.mark.parametrize("hidden,batch,why", [
    (24, 4, "the hidden size 24 is not a multiple of 32"),
    (64, 1040, "the batch 1040 exceeds 1024"),
    (1024, 256, "no slice of hidden units"),  # 2 x 16 MiB of float32 w_hh: more than the chip
])
def test_cuda_forced_persistent_path_refuses_unplannable_shape(hidden, batch, why):
    model = FusedLSTM(16, hidden, bidirectional=True, device="cuda")
    with cnnlstm_ext.backends.flags(lstm_path="persistent"), pytest.raises(
            RuntimeError, match="backends.lstm.path is 'persistent', but the persistent kernel "
                                "cannot run this layer: " + why):
        model(torch.randn(3, batch, 16, device="cuda"))


def test_cuda_forced_persistent_path_refuses_float64():
    model = FusedLSTM(16, 32, device="cuda", dtype=torch.float64)
    with cnnlstm_ext.backends.flags(lstm_path="persistent"), pytest.raises(
            RuntimeError, match="the persistent kernel has no float64 version"):
        model(torch.randn(3, 2, 16, device="cuda", dtype=torch.float64))


def test_cuda_tagged_exchange_refuses_the_tensor_core_product():
    # The tagged exchange reads float32 rows: it does not combine with the tensor-core product.
    model = FusedLSTM(8, 32, device="cuda", dtype=torch.bfloat16)
    with cnnlstm_ext.backends.flags(lstm_path="persistent", lstm_exchange="tagged", lstm_mma=True):
        with pytest.raises(RuntimeError, match="needs the FMA product"):
            model(torch.randn(3, 2, 8, device="cuda", dtype=torch.bfloat16))
