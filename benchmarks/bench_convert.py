"""Decoded frame -> the loader's RGB canvas: ops.yuv_to_rgb (the reader's path for planar YUV)
against FFmpeg's swscale (its AREA-scaled rgb24 output, the reader's previous path and still its
path for other formats), on H.264 yuv420p frames, one thread, in the same run.

    python -m pytest benchmarks/bench_convert.py --benchmark-json=convert.json
    python benchmarks/ratios.py convert.json

Cases: a 256 x 256 frame (WLASL's preprocessed videos) to the 128 x 128 canvas of 112 px clips,
and a 640 x 480 frame to its central square at 128 x 128. One round converts 16 decoded frames;
the swscale baseline runs before each round of the kernel (interleave.py). Each entry is the
whole per-frame call of cnnlstm_ext/data/video_io.py: the planes' views and the op, or swscale's
frame and its array, then the central square.
"""
import pytest

from cnnlstm_ext.data import video_io

import interleave
from bench_data import _write

CASES = {"256x256": (256, 256), "640x480": (480, 640)}
FRAMES = 16


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    import av
    root = tmp_path_factory.mktemp("convert")
    out = {}
    for name, (h, w) in CASES.items():
        path = str(root / (name + ".mp4"))
        _write(path, FRAMES, h, w)  # bench_data.py's moving texture
        with av.open(path) as c:
            out[name] = list(c.decode(video=0))
    return out


def _swscale(frames):
    for f in frames:
        h, w = video_io.scaled_size(f.height, f.width, 128)
        image = video_io._reformatter().reformat(f, width=w, height=h, format="rgb24",
                                                 interpolation="AREA", threads=1).to_ndarray()
        video_io.center_square(image)


def _kernel(frames):
    for f in frames:
        h, w = video_io.scaled_size(f.height, f.width, 128)
        assert video_io._planar_to_rgb(f, h, w, square=True) is not None


@pytest.mark.parametrize("impl", ["baseline", "fused"])
@pytest.mark.parametrize("case", list(CASES))
def test_convert(benchmark, decoded, case, impl):
    benchmark.group = "convert:%s" % case
    frames = decoded[case]
    benchmark.extra_info.update(impl=impl, frames=len(frames))
    if impl == "fused":
        interleave.time_interleaved(benchmark, lambda: _kernel(frames),
                                    lambda: _swscale(frames), rounds=30)
    else:
        interleave.time_interleaved(benchmark, lambda: _swscale(frames), None, rounds=30)
