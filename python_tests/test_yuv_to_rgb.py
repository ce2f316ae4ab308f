"""ops.yuv_to_rgb (csrc/video/): a decoded planar YUV frame -> RGB uint8 at a smaller size,
against reference.yuv_to_rgb, FFmpeg's own conversion, and its errors."""
import subprocess
import sys

import pytest
import torch

from cnnlstm_ext import ops, reference

BT601, BT709 = (0.299, 0.114), (0.2126, 0.0722)


def planes(rng, H, W, sy, sx, pad=0):
    """Random y [H, W] and u, v [ceil(H / sy), ceil(W / sx)] uint8; rows `pad` bytes longer than
    the plane (as PyAV's line sizes) when pad > 0."""
    def plane(h, w):
        full = torch.randint(0, 256, (h, w + pad), dtype=torch.uint8, generator=rng)
        return full[:, :w]
    Hc, Wc = -(-H // sy), -(-W // sx)
    return plane(H, W), plane(Hc, Wc), plane(Hc, Wc)


@pytest.mark.parametrize("full_range", [False, True], ids=["limited", "full"])
@pytest.mark.parametrize("matrix", [BT601, BT709], ids=["bt601", "bt709"])
@pytest.mark.parametrize("H, W, sy, sx, h, w", [
    (256, 256, 2, 2, 128, 128),   # WLASL's 256 x 256 at the loader's 128: an exact 2x
    (40, 50, 2, 2, 20, 25),       # halved, a row of 16 pixels and 9 more
    (480, 640, 2, 2, 128, 171),   # 640 x 480 to short side 128: 3.75x, fractional windows
    (31, 45, 2, 2, 7, 20),        # odd sizes: the last chroma sample covers one pixel
    (100, 150, 2, 2, 37, 53),     # fractional windows; rows and columns past a multiple of 8
    (20, 30, 1, 1, 20, 30),       # 4:4:4 at its own size: the conversion alone
    (21, 33, 1, 2, 10, 11),       # 4:2:2
    (16, 16, 2, 2, 1, 1),         # one pixel: the mean of the frame
])
def test_matches_reference(H, W, sy, sx, h, w, matrix, full_range, rng):
    y, u, v = planes(rng, H, W, sy, sx)
    got = ops.yuv_to_rgb(y, u, v, h, w, *matrix, full_range)
    want = reference.yuv_to_rgb(y, u, v, h, w, *matrix, full_range)
    assert got.shape == (h, w, 3) and got.dtype == torch.uint8
    diff = (got.int() - want.int()).abs()
    # float32 sums against float64: a value on a rounding boundary may land one level apart
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def test_padded_rows_read_as_the_plane(rng):
    padded = planes(rng, 48, 64, 2, 2, pad=32)
    dense = [p.contiguous() for p in padded]
    assert padded[0].stride(0) == 96
    torch.testing.assert_close(ops.yuv_to_rgb(*padded, 24, 32), ops.yuv_to_rgb(*dense, 24, 32),
                               rtol=0, atol=0)


@pytest.mark.parametrize("yuv, full_range, rgb", [
    ((235, 128, 128), False, (255, 255, 255)),   # limited-range white
    ((16, 128, 128), False, (0, 0, 0)),          # limited-range black
    ((128, 128, 128), True, (128, 128, 128)),    # full-range grey
    ((81, 90, 240), False, (255, 0, 0)),         # BT.601 red (81, 90, 240)
    ((145, 54, 34), False, (0, 255, 0)),         # green
    ((41, 240, 110), False, (0, 0, 255)),        # blue
])
def test_known_colours(yuv, full_range, rgb):
    y, u, v = (torch.full(s, c, dtype=torch.uint8) for s, c in zip(((8, 8), (4, 4), (4, 4)), yuv))
    out = ops.yuv_to_rgb(y, u, v, 4, 4, *BT601, full_range)
    assert (out.int() - torch.tensor(rgb)).abs().max() <= 1


def test_area_mean_of_a_checkerboard():
    """A 2x reduction of 1-pixel stripes of black and white is flat grey: the exact box."""
    y = torch.tensor([[16, 235] * 8] * 16, dtype=torch.uint8)
    u = v = torch.full((8, 8), 128, dtype=torch.uint8)
    out = ops.yuv_to_rgb(y, u, v, 8, 8)
    assert out.int().sub(128).abs().max() <= 1


def test_agrees_with_ffmpeg_on_a_decoded_frame(tmp_path):
    """The same BT.601 limited-range conversion as FFmpeg's swscale: against its full-size RGB of
    an H.264 frame, averaged over 2 x 2 blocks, within rounding and chroma interpolation."""
    av = pytest.importorskip("av")
    from cnnlstm_ext.data import video_io
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 255, 64).round().to(torch.uint8)
    frames = torch.stack([ramp.view(1, 64).expand(64, 64), ramp.view(64, 1).expand(64, 64),
                          torch.randint(96, 160, (64, 64), generator=g, dtype=torch.uint8)])
    path = str(tmp_path / "v.mp4")
    video_io.write_video(path, frames.unsqueeze(0).repeat(2, 1, 1, 1), crf=18, codec="libx264")
    with av.open(path) as c:
        frame = next(c.decode(video=0))
    assert frame.format.name == "yuv420p"
    y, u, v = video_io.frame_planes(frame)
    ours = ops.yuv_to_rgb(y, u, v, 32, 32).int()
    full = torch.from_numpy(frame.to_ndarray(format="rgb24")).double()  # [64, 64, 3]
    ffmpeg = full.view(32, 2, 32, 2, 3).mean((1, 3))
    assert (ours - ffmpeg).abs().mean() < 2.0


def test_passes_opcheck(rng):
    y, u, v = planes(rng, 30, 40, 2, 2)
    torch.library.opcheck(torch.ops.cnnlstm_ext.yuv_to_rgb, (y, u, v, 15, 20, 0.299, 0.114, False))


@pytest.mark.parametrize("change, message", [
    (dict(y=torch.zeros(8, 8)), r"y must be uint8, got Float"),
    (dict(u=torch.zeros(4, 4, 1, dtype=torch.uint8)), r"u must be a non-empty 2-D plane"),
    (dict(v=torch.zeros(4, 8, dtype=torch.uint8).t()), r"v must be a non-empty 2-D plane"),
    (dict(u=torch.zeros(3, 4, dtype=torch.uint8), v=torch.zeros(3, 4, dtype=torch.uint8)),
     r"the chroma planes must have the luma plane's height \(8\) or half of it rounded up \(4\), "
     r"got 3"),
    (dict(v=torch.zeros(8, 8, dtype=torch.uint8)), r"u and v must have the same shape"),
    (dict(height=9), r"the output size must be between 1 x 1 and the frame's 8 x 8 \(it only "
                     r"reduces\), got 9 x 4"),
    (dict(width=0), r"got 4 x 0"),
    (dict(kr=0.6, kb=0.5), r"0 < kr, 0 < kb, kr \+ kb < 1, got kr = 0.6, kb = 0.5"),
])
def test_errors(change, message):
    args = dict(y=torch.zeros(8, 8, dtype=torch.uint8), u=torch.zeros(4, 4, dtype=torch.uint8),
                v=torch.zeros(4, 4, dtype=torch.uint8), height=4, width=4, kr=0.299, kb=0.114,
                full_range=False)
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.cnnlstm_ext.yuv_to_rgb(**args)


# Both builds of the row kernels (yuv_to_rgb_impl.h) against the reference, in a child whose
# ATEN_CPU_CAPABILITY picks one.
VARIANT_CASE = """
import torch
from cnnlstm_ext import ops, reference
g = torch.Generator().manual_seed(0)
with ops.recorded_kernels() as ran:
    for H, W, h, w in ((256, 256, 128, 128), (480, 640, 128, 171), (37, 23, 11, 9),
                       (64, 96, 16, 24)):
        y = torch.randint(0, 256, (H, W), dtype=torch.uint8, generator=g)
        u, v = (torch.randint(0, 256, (-(-H // 2), -(-W // 2)), dtype=torch.uint8, generator=g)
                for _ in range(2))
        d = (ops.yuv_to_rgb(y, u, v, h, w).int() - reference.yuv_to_rgb(y, u, v, h, w).int()).abs()
        assert d.max() <= 1 and (d > 0).float().mean() < 1e-3, (H, W)
print(" ".join(sorted(set(ran))))
"""


@pytest.mark.parametrize("capability, kernels", [("default", {"cpu:yuv_to_rgb:default"}),
                                                 (None, None)])
def test_each_kernel_build_matches_reference(capability, kernels, tmp_path):
    from conftest import subprocess_env
    extra = {} if capability is None else {"ATEN_CPU_CAPABILITY": capability}
    r = subprocess.run([sys.executable, "-c", VARIANT_CASE], env=subprocess_env(**extra),
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    ran = set(r.stdout.split())
    if kernels is None:  # this CPU's best: 256 x 256 -> 128 x 128 is the half-size kernel's,
        # fractional windows the blocked kernel's, 64 x 96 -> 16 x 24 (4x) the row kernel's
        kernels = ({"cpu:yuv_to_rgb:avx2", "cpu:yuv_to_rgb:avx2:half",
                    "cpu:yuv_to_rgb:avx2:blocked"}
                   if "AVX" in torch.backends.cpu.get_cpu_capability()
                   else {"cpu:yuv_to_rgb:default"})
    assert ran == kernels


HALF_CASE = """
import sys, torch
from cnnlstm_ext import ops
g = torch.Generator().manual_seed(0)
out = []
with ops.recorded_kernels() as ran:
    for H, W in ((256, 256), (48, 64), (40, 50), (2, 2), (30, 34)):
        y = torch.randint(0, 256, (H, W + 7), dtype=torch.uint8, generator=g)[:, :W]
        u, v = (torch.randint(0, 256, (H // 2, W // 2), dtype=torch.uint8, generator=g)
                for _ in range(2))
        for full in (False, True):
            out.append(ops.yuv_to_rgb(y, u, v, H // 2, W // 2, 0.2126, 0.0722, full))
torch.save(out, sys.argv[1])
print(" ".join(sorted(set(ran))))
"""


@pytest.mark.skipif("AVX" not in torch.backends.cpu.get_cpu_capability(),
                    reason="the half-size kernel is built for AVX2")
def test_half_size_kernel_agrees_with_the_baseline_build(tmp_path):
    """4:2:0 halved (the loader's 256 x 256 -> 128 x 128) takes its own AVX2 kernel, with the
    general kernel's arithmetic: against the baseline build, tails of rows and padded planes
    too, the same bytes but where FMA's single rounding puts a value across a rounding
    boundary."""
    from conftest import subprocess_env
    outs = {}
    for capability, kernel in (("default", "cpu:yuv_to_rgb:default"),
                               (None, "cpu:yuv_to_rgb:avx2:half")):
        extra = {} if capability is None else {"ATEN_CPU_CAPABILITY": capability}
        path = str(tmp_path / ("%s.pt" % capability))
        r = subprocess.run([sys.executable, "-c", HALF_CASE, path], env=subprocess_env(**extra),
                           cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.split() == [kernel]
        outs[capability] = torch.load(path)
    assert len(outs[None]) == 10
    for half, general in zip(outs[None], outs["default"]):
        diff = (half.int() - general.int()).abs()
        assert half.shape == general.shape and diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
