"""frame_pool: [B*T, C, h, w] -> [T, B, C] (or [B, T, C]) against cnnlstm_ext.reference.frame_pool."""
import pytest
import torch
import torch.nn.functional as F

import cnnlstm_ext
from cnnlstm_ext import ops, reference

# The CUDA twin of every test; conftest.py skips `cuda`-marked cases without a GPU and kernels.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "channels_last"]


def feature_maps(n, c, h, w, dtype, device, layout, mode, seed=0):
    """Random maps; for "max", each plane is a random permutation of distinct values that every
    dtype represents exactly, so the maximum (and the gradient's route) is unique."""
    g = torch.Generator().manual_seed(seed)
    if mode == "max":
        ranks = torch.rand(n, c, h * w, generator=g).argsort(-1)
        x = ((ranks - h * w // 2).to(torch.float64) / 8).view(n, c, h, w)
    else:
        x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    x = x.to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def assert_within_reference_error(fused, same_dtype_ref, exact_ref):
    """The fused result's error is at most twice that of the unfused PyTorch sequence in the same
    precision (plus one rounding step), measured against a float64 computation."""
    assert fused.shape == exact_ref.shape and fused.dtype == same_dtype_ref.dtype
    err = (fused.double() - exact_ref).abs().max().item()
    ref_err = (same_dtype_ref.double() - exact_ref).abs().max().item()
    # For float64 the reference is itself the exact computation: allow a few roundings.
    roundings = 16 if fused.dtype == torch.float64 else 1
    floor = roundings * torch.finfo(fused.dtype).eps * max(exact_ref.abs().max().item(), 1.0)
    assert err <= 2 * ref_err + floor, (err, ref_err, floor)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_frame_pool_matches_reference(device, dtype, layout, mode, batch_first):
    # h*w = 49 covers the vector loop and its tail, C = 19 a channel count off the vector width.
    x = feature_maps(12, 19, 7, 7, dtype, device, layout, mode)
    out = ops.frame_pool(x, 3, mode, batch_first)
    ref = reference.frame_pool(x, 3, mode, batch_first)
    exact = reference.frame_pool(x.double(), 3, mode, batch_first)
    assert out.is_contiguous()
    if mode == "max":
        assert torch.equal(out, ref)
    else:
        assert_within_reference_error(out, ref, exact)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,out_dtype", [
    (torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16), (torch.float64, torch.float32)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_frame_pool_out_dtype(device, dtype, out_dtype, layout):
    x = feature_maps(8, 16, 3, 5, dtype, device, layout, "avg")
    out = ops.frame_pool(x, 2, "avg", out_dtype=out_dtype)
    ref = reference.frame_pool(x, 2, "avg", out_dtype=out_dtype)
    exact = reference.frame_pool(x.double(), 2, "avg")
    assert out.dtype == out_dtype
    assert_within_reference_error(out, ref, exact)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (7, 7), (28, 30)])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_frame_pool_plane_sizes(device, h, w, mode):
    # From single pixels to planes too large for the CUDA kernel's shared-memory tiles.
    x = feature_maps(6, 5, h, w, torch.float32, device, "contiguous", mode).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out, ref = ops.frame_pool(x, 3, mode), reference.frame_pool(x_ref, 3, mode)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, grad)[0],
                               torch.autograd.grad(ref, x_ref, grad)[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("h,w", [(1, 3), (2, 4), (3, 5), (4, 6)])
def test_frame_pool_avg_plane_sizes(device, dtype, layout, h, w):
    """Planes smaller than the CPU's 8-lane vector, of exactly 16 and 24 elements, and a tail of 7
    (read by a load that overlaps the elements already added); 11 channels: a group of 8 and a
    tail."""
    x = feature_maps(4, 11, h, w, dtype, device, layout, "avg", seed=h)
    out = ops.frame_pool(x, 2, out_dtype=torch.float32)
    exact = reference.frame_pool(x.double(), 2)
    # float32 sums of inputs exact in dtype: each add rounds once, at most h*w*max|x| / 2^24
    bound = h * w * 2.0 ** -24 * x.abs().max().item()
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=bound)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pos", [0, 7, 8, 14])
def test_frame_pool_avg_propagates_non_finite(device, layout, pos):
    """An inf or NaN at any position of a 15-element plane (in a full vector, in the overlap of the
    tail load, in the tail) reaches that plane's average, and no other."""
    x = feature_maps(4, 9, 3, 5, torch.float32, device, "contiguous", "avg")
    x.view(4, 9, 15)[1, 3, pos] = float("inf")
    x.view(4, 9, 15)[2, 8, pos] = float("nan")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out = ops.frame_pool(x, 2, batch_first=True).view(4, 9)
    ref = reference.frame_pool(x, 2, batch_first=True).view(4, 9)
    torch.testing.assert_close(out, ref, equal_nan=True)
    assert out[1, 3] == float("inf") and torch.isnan(out[2, 8])
    assert torch.isfinite(out).sum() == 4 * 9 - 2


def test_pooling_baseline_instruction_set(tmp_path):
    """The CPU cases of this file and of test_temporal_pool.py with ATEN_CPU_CAPABILITY=default, in
    a fresh process: the kernels for CPUs without AVX2 (ATen's mean for the frame average, the
    portable loops of pooling_cpu_reduce.h)."""
    import os
    import subprocess
    import sys

    from conftest import subprocess_env
    files = [__file__, os.path.join(os.path.dirname(__file__), "test_temporal_pool.py")]
    run = subprocess.run([sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider",
                          "-m", "not cuda", "-k", "not baseline_instruction_set and not compiles"],
                         env=subprocess_env(ATEN_CPU_CAPABILITY="default"), cwd=tmp_path,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


@pytest.mark.parametrize("device", DEVICES)
def test_frame_pool_non_contiguous_input(device):
    # A layout that is neither contiguous nor channels_last (every other channel).
    x = feature_maps(6, 10, 4, 4, torch.float32, device, "contiguous", "avg")[:, ::2]
    torch.testing.assert_close(ops.frame_pool(x, 2), reference.frame_pool(x, 2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("channels,c", [(3, 2), (19, 10)])
def test_frame_pool_max_propagates_nan(device, layout, channels, c):
    """NaN wins, and the plane's first NaN is the argmax that takes the gradient (channel 10 of
    19: a lane of the CPU's vector loops, channel 2 of 3: their scalar tail)."""
    x = feature_maps(4, channels, 3, 3, torch.float32, device, "contiguous", "max")
    x[1, c, 0, 1] = float("nan")
    x[1, c, 2, 0] = float("nan")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    out = ops.frame_pool(x, 2, "max", batch_first=True).view(4, channels)
    assert torch.isnan(out[1, c])
    assert torch.isnan(out).sum() == 1
    grad = torch.autograd.grad(out, x, torch.ones_like(out))[0]
    assert grad[1, c, 0, 1] == 1 and grad[1, c].sum() == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("h,w", [(2, 4), (3, 3), (3, 5), (4, 4), (3, 6), (7, 7)])
def test_frame_pool_max_ties_nan_and_signed_zero(device, dtype, layout, h, w):
    """torch.max's rule on every plane: NaN wins, and of equal maxima (+0 and -0 too) the first,
    whose value is returned. Values from {-2, ..., 2} (many ties), NaNs in some planes, and planes of
    -1 and zeros of both signs; 13 channels (a group of 8 and a tail), planes of 8, 9, 15, 16, 18
    and 49 elements."""
    g = torch.Generator().manual_seed(h * 10 + w)
    flat = torch.randint(-2, 3, (6, 13, h * w), generator=g).to(torch.float64)
    nan_at = torch.rand(flat.shape, generator=g) < 0.05
    flat[:2][nan_at[:2]] = float("nan")  # frames 0 and 1: NaNs here and there
    # frame 2: -1, -0 and +0, so that a plane's first 0 and the 0 met first in a vector lane differ
    choice = torch.randint(0, 3, (13, h * w), generator=g)
    flat[2] = torch.tensor([-1.0, -0.0, 0.0], dtype=torch.float64)[choice]
    x = flat.view(6, 13, h, w).to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    out, argmax = torch.ops.cnnlstm_ext.frame_pool_forward(x, 2, "max", True, None)
    expected, expected_index = x.float().flatten(2).cpu().max(-1)
    out = out.view(6, 13).float().cpu()
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    numbers = ~expected.isnan()  # (a NaN's sign is not kept by conversions to bfloat16)
    assert torch.equal(torch.signbit(out[numbers]), torch.signbit(expected[numbers]))
    assert torch.equal(argmax.cpu().long(), expected_index)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_frame_pool_gradient_matches_reference(device, dtype, layout, mode, batch_first):
    x = feature_maps(12, 19, 7, 7, dtype, device, layout, mode).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    grad = torch.randn(3, 4, 19, dtype=torch.float64).to(device=device, dtype=dtype)
    if not batch_first:
        grad = grad.transpose(0, 1).contiguous()
    (gx,) = torch.autograd.grad(ops.frame_pool(x, 3, mode, batch_first), x, grad)
    (gx_ref,) = torch.autograd.grad(reference.frame_pool(x_ref, 3, mode, batch_first), x_ref, grad)
    assert gx.dtype == dtype and gx.shape == x.shape
    assert gx.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    if mode == "max" or dtype == torch.float32:
        torch.testing.assert_close(gx, gx_ref)
    else:
        per_frame = grad if batch_first else grad.transpose(0, 1)  # [B, T, C]
        exact = (per_frame.double().reshape(12, 19, 1, 1) / 49).expand(12, 19, 7, 7)
        assert_within_reference_error(gx, gx_ref, exact)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_frame_pool_gradient_with_out_dtype(device, out_dtype):
    x = feature_maps(6, 8, 3, 3, torch.bfloat16, device, "contiguous", "avg").requires_grad_()
    grad = torch.randn(2, 3, 8, device=device, dtype=out_dtype)
    (gx,) = torch.autograd.grad(ops.frame_pool(x, 3, out_dtype=out_dtype), x, grad)
    expected = (grad.double() / 9).transpose(0, 1).reshape(6, 8, 1, 1).expand(6, 8, 3, 3)
    assert gx.dtype == torch.bfloat16
    torch.testing.assert_close(gx.double(), expected, rtol=2 ** -8, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_frame_pool_gradcheck(device, layout, mode, batch_first):
    """Gradients, and gradients of gradients (create_graph=True: the backward op has an autograd of
    its own)."""
    x = feature_maps(4, 3, 3, 2, torch.float64, device, layout, "avg").requires_grad_()
    fn = lambda t: ops.frame_pool(t, 2, mode, batch_first)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_frame_pool_opcheck(device, layout, mode):
    x = feature_maps(6, 4, 3, 3, torch.float32, device, layout, "avg").requires_grad_()
    torch.library.opcheck(torch.ops.cnnlstm_ext.frame_pool_forward.default, (x, 3, mode, False, None))
    torch.library.opcheck(torch.ops.cnnlstm_ext.frame_pool_forward.default,
                          (x, 2, mode, True, torch.bfloat16))
    out, argmax = torch.ops.cnnlstm_ext.frame_pool_forward(x.detach(), 3, mode, False, None)
    torch.library.opcheck(torch.ops.cnnlstm_ext.frame_pool_backward.default,
                          (torch.randn_like(out), argmax, list(x.shape), x.dtype,
                           layout == "channels_last", 3, mode, False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_frame_pool_records_a_graph_only_when_needed(device, mode):
    """The autograd kernel (csrc/pooling_autograd.cpp): no node without a gradient to compute
    (inputs without requires_grad, or no_grad), one node otherwise; argmax is never differentiable."""
    x = feature_maps(6, 5, 3, 3, torch.float32, device, "contiguous", mode)
    out, argmax = torch.ops.cnnlstm_ext.frame_pool_forward(x, 3, mode, False, None)
    assert out.grad_fn is None and not out.requires_grad
    x.requires_grad_()
    with torch.no_grad():
        out, _ = torch.ops.cnnlstm_ext.frame_pool_forward(x, 3, mode, False, None)
    assert out.grad_fn is None and not out.requires_grad
    out, argmax = torch.ops.cnnlstm_ext.frame_pool_forward(x, 3, mode, False, None)
    assert out.requires_grad and "FramePoolFunction" in out.grad_fn.name()
    assert not argmax.requires_grad
    (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert gx.shape == x.shape and gx.sum().item() == pytest.approx(out.numel(), rel=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_frame_pool_compiles_fullgraph(device):
    def features(maps):
        return ops.frame_pool(maps.relu(), 2, "avg").sum(-1)

    x = feature_maps(4, 8, 3, 3, torch.float32, device, "contiguous", "avg").requires_grad_()
    compiled = torch.compile(features, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (gx,) = torch.autograd.grad(out.sum(), x)
    x_ref = x.detach().clone().requires_grad_()
    ref = reference.frame_pool(x_ref.relu(), 2, "avg").sum(-1)
    (gx_ref,) = torch.autograd.grad(ref.sum(), x_ref)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, gx_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_first", [False, True])
def test_frame_pool_module_matches_reference(device, batch_first):
    pool = cnnlstm_ext.FramePool("max", batch_first=batch_first)
    x = feature_maps(6, 8, 4, 4, torch.float32, device, "channels_last", "max")
    assert torch.equal(pool(x, 2), reference.frame_pool(x, 2, "max", batch_first))
    assert "mode='max'" in repr(pool)
    assert list(pool.parameters()) == []


def test_frame_pool_module_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        cnnlstm_ext.FramePool("median")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad_call, message", [
    (lambda d: ops.frame_pool(torch.randn(6, 4, 3, device=d), 2), r"\[B\*T, C, h, w\] \(4-D\)"),
    (lambda d: ops.frame_pool(torch.randn(7, 4, 3, 3, device=d), 2), "not a multiple"),
    (lambda d: ops.frame_pool(torch.randn(6, 4, 3, 3, device=d), 0), "batch_size must be >= 1"),
    (lambda d: ops.frame_pool(torch.ones(6, 4, 3, 3, device=d, dtype=torch.int32), 2),
     "float32, float64, bfloat16 or float16"),
    (lambda d: ops.frame_pool(torch.randn(6, 4, 0, 3, device=d), 2), "h, w >= 1"),
])
def test_frame_pool_rejects_bad_input(device, bad_call, message):
    with pytest.raises(RuntimeError, match=message):
        bad_call(device)


def test_frame_pool_rejects_bad_mode_and_dtype():
    x = torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match="mode"):
        ops.frame_pool(x, 2, "median")
    with pytest.raises(TypeError, match="out_dtype"):
        ops.frame_pool(x, 2, out_dtype=torch.int64)
    with pytest.raises(RuntimeError, match='"avg" or "max"'):
        torch.ops.cnnlstm_ext.frame_pool_forward(x, 2, "median", False, None)


@pytest.mark.cuda
def test_frame_pool_cuda_matches_cpu_on_resnet_sized_maps():
    # The kernel's production shape: ResNet-18 maps, C = 512, 7x7, bf16 in, float32 out.
    x = torch.randn(64, 512, 7, 7).to(torch.bfloat16)
    for layout in LAYOUTS:
        xl = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
        for mode in ("avg", "max"):
            cpu = ops.frame_pool(xl, 8, mode, out_dtype=torch.float32)
            gpu = ops.frame_pool(xl.cuda(), 8, mode, out_dtype=torch.float32)
            torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("n,c,h,w", [
    (1024, 512, 7, 7),  # ResNet-18 maps: many tiles per block, a short last tile per frame
    (6, 24, 3, 3),      # fewer tiles than blocks
    (40, 200, 5, 5),    # C*h*w a whole number of 16-byte vectors in every dtype
    (12, 19, 7, 7),     # C*h*w not a whole number of vectors: the tile kernel runs either way
])
def test_frame_pool_pipelined_kernel_matches_tile_kernel(dtype, mode, n, c, h, w):
    """The default pipelined kernel for contiguous maps against backends.frame_pool.kernel='tile':
    the same reduction order, so the same bits, and the reference's values; each run proves which
    kernel it launched."""
    x = feature_maps(n, c, h, w, dtype, "cuda", "contiguous", mode, seed=n)
    results = {}
    # The pipelined kernel takes maps of a whole number of 16-byte vectors; others the tile kernel.
    vectors = (c * h * w * x.element_size()) % 16 == 0
    for kernel in ("tile", "pipelined"):
        with cnnlstm_ext.backends.flags(frame_pool_kernel=kernel), ops.recorded_kernels() as ran:
            for batch_first, out_dtype in ((False, None), (True, torch.float32)):
                results[kernel, batch_first] = torch.ops.cnnlstm_ext.frame_pool_forward(
                    x, 2, mode, batch_first, out_dtype)
        expected = kernel if vectors else "tile-unaligned"
        assert set(ran) == {f"cuda:frame_pool_forward:{expected}"}, ran
    for batch_first in (False, True):
        (out_t, idx_t), (out_p, idx_p) = results["tile", batch_first], results["pipelined", batch_first]
        assert torch.equal(out_p, out_t) and torch.equal(idx_p, idx_t)
    exact = reference.frame_pool(x.double(), 2, mode, True)
    torch.testing.assert_close(results["pipelined", True][0].double(), exact, rtol=1e-5, atol=1e-5)


def test_frame_pool_reference_is_the_unfused_sequence():
    x = torch.randn(6, 4, 3, 3)
    expected = F.adaptive_avg_pool2d(x, 1).flatten(1).view(2, 3, 4).transpose(0, 1)
    assert torch.equal(reference.frame_pool(x, 2), expected)


BAD_ARGMAX = [-1, 16]  # planes of 4 x 4: indices 0 to 15


def frame_pool_backward_bad_argmax(layout, bad, device):
    """The backward op with one arg-max out of its plane: the call, as source for a child process."""
    return ("x = torch.randn(4, 3, 4, 4, device=%r)\n"
            "x = x.contiguous(memory_format=torch.%s)\n"
            "out, argmax = torch.ops.cnnlstm_ext.frame_pool_forward(x, 2, 'max', False, None)\n"
            "argmax[1, 2] = %d\n"
            "torch.ops.cnnlstm_ext.frame_pool_backward(torch.ones_like(out), argmax, list(x.shape), x.dtype,"
            " %s, 2, 'max', False)\n"
            % (device, "channels_last" if layout == "channels_last" else "contiguous_format", bad,
               layout == "channels_last"))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bad", BAD_ARGMAX)
def test_frame_pool_backward_refuses_a_bad_argmax(layout, bad):
    with pytest.raises(RuntimeError, match="out of bounds"):
        exec(frame_pool_backward_bad_argmax(layout, bad, "cpu"), {"torch": torch})


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bad", BAD_ARGMAX)
def test_frame_pool_backward_refuses_a_bad_argmax_cuda(layout, bad, tmp_path):
    from conftest import assert_device_assert
    assert_device_assert(frame_pool_backward_bad_argmax(layout, bad, "cuda"), tmp_path)
