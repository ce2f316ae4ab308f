"""The fast video data path: seeking scaled decode, uint8 clips with batched augmentation on the
device, epochs through persistent workers, unreadable clips skipped, default workers."""
import logging

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cnnlstm_ext.data import video_io
from cnnlstm_ext.data.batch_transforms import (BatchAugment, canvas_size, draw_params,
                                               reference_augment)
from cnnlstm_ext.data.datasets import build_datasets
from cnnlstm_ext.data.loader import (EpochSampler, LoaderDataset, SkippedClip, collate_clips,
                                     default_num_workers, resolve_num_workers)
from cnnlstm_ext.data.transforms import ClipTransform, sample_generator, sample_indices
from cnnlstm_ext.data.video_folder import VideoFolder
from cnnlstm_ext.data.video_io import (ClipReadError, iter_video_frames, read_frame_folder,
                                       read_video_frames, write_frame_folder)
from cnnlstm_ext.train.config import Config, DataConfig, validate


def write_h264(path, frames, fps=25, gop=None, preset="ultrafast"):
    """uint8 `frames [n, H, W, 3]` as H.264 yuv420p (a keyframe every `gop` frames; B-frames from
    preset "veryfast" on, none with "ultrafast")."""
    write_encoded(path, frames, "libx264",
                  dict({"crf": "12", "preset": preset}, **({"g": str(gop)} if gop else {})), fps)


def write_encoded(path, frames, codec, options, fps=25):
    """uint8 `frames [n, H, W, 3]` as yuv420p video through FFmpeg's encoder `codec`."""
    import av
    with av.open(str(path), mode="w") as c:
        s = c.add_stream(codec, rate=fps)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = "yuv420p"
        s.options = options
        for image in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def moving_frames(n, h=48, w=64, seed=0):
    """Smooth content that shifts one pixel per frame, with the frame number in its brightness."""
    g = np.random.default_rng(seed)
    base = g.integers(40, 200, (h // 8 + 1, w // 8 + n // 8 + 2, 3)).astype(np.float32)
    base = torch.nn.functional.interpolate(torch.from_numpy(base).permute(2, 0, 1)[None],
                                           scale_factor=8, mode="bilinear")[0].permute(1, 2, 0)
    return np.stack([base[:h, i:i + w].numpy() for i in range(n)]).round().astype(np.uint8)


class _CountingContainer:
    """An av container that counts the packets of frames it reads from the file."""

    def __init__(self, container, counter):
        self._c, self._counter = container, counter

    def demux(self, *args, **kwargs):
        for packet in self._c.demux(*args, **kwargs):
            if packet.size:  # (not the empty packet that flushes the decoder)
                self._counter.append(packet.pts)
            yield packet

    def __getattr__(self, name):
        return getattr(self._c, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._c.close()


@pytest.fixture
def long_video(tmp_path):
    frames = moving_frames(200)
    path = tmp_path / "long.mp4"
    write_h264(path, frames, gop=25)
    return str(path), frames


def test_decode_seeks_to_the_keyframe_before_the_first_sampled_frame(monkeypatch, long_video):
    path, frames = long_video
    decoded = []
    real_open = video_io._open_video
    monkeypatch.setattr(video_io, "_open_video", lambda p: _CountingContainer(real_open(p), decoded))
    clip = read_video_frames(path, 160, 192, select=lambda n: sample_indices(n, 8).tolist())
    # frames from the keyframe at 150 to the last sampled one (190), not from frame 0
    assert 30 <= len(decoded) <= 45, len(decoded)
    ref = read_video_frames(path)  # every frame, decoded from the start
    picks = [160 + i for i in sample_indices(32, 8).tolist()]
    assert torch.equal(clip, ref[picks])


def read_counting(monkeypatch, path, start, end, select):
    """read_video_frames(path, start, end, select), with the timestamps of the packets read from
    the file and of the frames the decoder returned."""
    read, out = [], []
    real_open, real_decode = video_io._open_video, video_io._decode_skipping

    def counting(*args):
        for frame in real_decode(*args):
            out.append(frame.pts)
            yield frame
    with monkeypatch.context() as m:
        m.setattr(video_io, "_open_video", lambda p: _CountingContainer(real_open(p), read))
        m.setattr(video_io, "_decode_skipping", counting)
        clip = read_video_frames(path, start, end, select=select)
    return clip, read, out


def test_decode_drops_unsampled_frames_that_no_frame_refers_to(monkeypatch, tmp_path):
    frames = moving_frames(96)
    path = str(tmp_path / "bframes.mp4")
    write_h264(path, frames, gop=48, preset="veryfast")  # I/P frames and (non-)reference B-frames
    clip, read, out = read_counting(monkeypatch, path, 0, 96,
                                    lambda n: sample_indices(n, 12).tolist())
    # every packet up to the last sampled frame is read, but the decoder lets some go
    assert len(read) >= 85 and len(out) < len(read) - 10, (len(read), len(out))
    ref = read_video_frames(path)  # every frame decoded
    assert len(ref) == 96 and torch.equal(clip, ref[sample_indices(96, 12).tolist()])


def test_decode_converts_only_the_sampled_frames(monkeypatch, long_video):
    path, _ = long_video
    converted = []
    real = video_io._to_array
    monkeypatch.setattr(video_io, "_to_array", lambda f, s, q: converted.append(f.pts) or real(f, s, q))
    clip = read_video_frames(path, 0, 72, select=lambda n: sample_indices(n, 16).tolist())
    assert clip.shape[0] == 16 and len(converted) == 16


def test_decoded_frames_wait_for_their_conversion_within_a_bound(monkeypatch, long_video):
    """The wanted frames are converted a few at a time, after their decoding, with no more
    than PENDING_BYTES of decoded frames held (past it by the frame that reached it); any bound
    gives the same clip, the tiniest converting each frame as it comes."""
    path, _ = long_video  # 64 x 48 frames: 9216 bytes each as the bound counts them
    select = lambda n: [0, 3, 3, 7, 20, 21, 40, 71]  # noqa: E731 (a repeat included)
    held = []  # the bytes held at each conversion
    real_convert = video_io._Pending.convert

    def convert(pending, *args):
        held.append(pending.bytes)
        return real_convert(pending, *args)
    monkeypatch.setattr(video_io._Pending, "convert", convert)
    whole = read_video_frames(path, 0, 72, select=select)
    assert held == [7 * 9216]  # 7 distinct frames, converted at the end at once
    clips = []
    for bound in (1, 2 * 9216):
        monkeypatch.setattr(video_io, "PENDING_BYTES", bound)
        held.clear()
        clips.append(read_video_frames(path, 0, 72, select=select))
        assert max(held) <= bound + 9216 and len(held) > 3, held
    for clip in clips:
        assert torch.equal(clip, whole)


def test_decode_scales_to_the_short_side_and_cuts_the_central_square(long_video):
    path, frames = long_video
    full = read_video_frames(path, 10, 14)                                 # [4, 3, 48, 64]
    small = read_video_frames(path, 10, 14, short_side=24)                 # aspect kept
    square = read_video_frames(path, 10, 14, short_side=24, square=True, channels_last=True)
    assert full.shape == (4, 3, 48, 64) and small.shape == (4, 3, 24, 32)
    assert square.shape == (4, 24, 24, 3) and square.dtype == torch.uint8
    assert torch.equal(square, small.permute(0, 2, 3, 1)[:, :, 4:28])
    expected = torch.nn.functional.interpolate(full.float(), size=(24, 32), mode="bilinear",
                                               antialias=True)
    assert (small.float() - expected).abs().mean() < 6.0  # scaled in YUV (chroma 4:2:0), then RGB


def test_decode_scales_by_the_mean_of_each_area(long_video):
    """H.264 yuv420p frames go through ops.yuv_to_rgb: halving the short side gives the mean of
    each 2 x 2 block of the full-size RGB frame (up to rounding, and clamping where a block
    saturates); a larger short side than the frame's is swscale's enlargement."""
    from cnnlstm_ext import ops
    path, _ = long_video
    with ops.recorded_kernels() as ran:
        full = read_video_frames(path, 10, 14)                             # [4, 3, 48, 64]
        small = read_video_frames(path, 10, 14, short_side=24)
    kernels = {"cpu:yuv_to_rgb:avx2", "cpu:yuv_to_rgb:avx2:half", "cpu:yuv_to_rgb:avx2:blocked",
               "cpu:yuv_to_rgb:default"}
    assert set(ran) <= kernels and len(ran) == 8
    block_mean = full.double().view(4, 3, 24, 2, 32, 2).mean((3, 5))
    assert (small.double() - block_mean).abs().mean() < 0.75
    with ops.recorded_kernels() as ran:
        large = read_video_frames(path, 10, 14, short_side=96)
    assert ran == [] and large.shape == (4, 3, 96, 128)


@pytest.mark.parametrize("width, height, short_side", [(64, 48, 24), (15, 9, 6), (9, 15, 6),
                                                       (17, 17, 8), (40, 30, 30)])
def test_planar_frames_of_any_size_convert_to_the_central_square(width, height, short_side):
    """The square canvas of a yuv420p frame of any size (odd ones too, whose chroma planes round
    up): the kernel's resampling of the frame's central square, or of the whole frame then cut."""
    av = pytest.importorskip("av")
    from cnnlstm_ext import reference
    frame = av.VideoFrame(width, height, "yuv420p")
    for k, p in enumerate(frame.planes):  # smooth ramps: a shift by a pixel moves a few levels
        rows, cols = np.mgrid[0:p.height, 0:p.line_size]
        ramp = 40 + (rows * (3 + k) + cols * (5 - k)) * 150 // (p.height * 3 + p.line_size * 5)
        p.update(ramp.astype(np.uint8))
    image = video_io._to_array(frame, short_side, square=True)
    assert image.shape == (short_side, short_side, 3) and image.dtype == np.uint8
    y, u, v = video_io.frame_planes(frame)
    h, w = video_io.scaled_size(height, width, short_side)
    whole = reference.yuv_to_rgb(y, u, v, h, w).numpy()
    # against the cut of the whole frame's resampling: the same picture, to within a window
    # shifted by less than a chroma sample
    cut = video_io.center_square(whole).astype(int)
    assert np.abs(image.astype(int) - cut).mean() < 8


def write_turned(path, frames, degrees, hflip=False, vflip=False, lossless=True):
    """uint8 `frames [n, H, W, 3]` as H.264 with a display matrix: shown turned by `degrees`
    counterclockwise, then mirrored (PyAV's set_display_rotation; an MP4 track's matrix, as phones
    write portrait video)."""
    import av
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("libx264", rate=25)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = "yuv444p" if lossless else "yuv420p"
        s.options = {"crf": "0" if lossless else "12", "preset": "ultrafast"}
        if degrees or hflip or vflip:
            s.set_display_rotation(degrees, hflip=hflip, vflip=vflip)
        for f in frames:
            for packet in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)


@pytest.mark.parametrize("degrees, hflip, vflip", [
    (0, False, False), (-90, False, False), (90, False, False), (180, False, False),
    (0, True, False), (0, False, True), (90, True, False), (-90, True, False)])
def test_decode_turns_frames_as_players_show_them(tmp_path, degrees, hflip, vflip):
    """All eight orientations of a display matrix, against numpy's turn of the stored frames:
    a portrait phone video (stored landscape, -90: a quarter turn clockwise) comes out
    portrait."""
    pytest.importorskip("av")
    frames = moving_frames(3, h=16, w=32)
    frames[:, :4, :4] = 255                            # a mark in the stored top-left corner
    write_turned(tmp_path / "v.mp4", frames, degrees, hflip, vflip)
    expected = np.rot90(frames, degrees // 90, axes=(1, 2))   # counterclockwise
    expected = expected[:, :, ::-1] if hflip else expected
    expected = expected[:, ::-1] if vflip else expected
    clip = read_video_frames(str(tmp_path / "v.mp4"), channels_last=True).numpy()
    assert clip.shape == expected.shape
    assert np.abs(clip.astype(int) - expected).max() <= 2     # lossless up to the YUV rounding
    if (degrees, hflip, vflip) == (-90, False, False):
        assert clip[0, :4, -4:].min() > 200                   # the mark at the top right


def test_decode_turns_scaled_and_square_frames_after_converting_them(tmp_path):
    """The data path's canvas of a portrait video: the converted picture of the same frames
    stored upright, turned (the central square of a turned frame is the turned square)."""
    pytest.importorskip("av")
    frames = moving_frames(4, h=48, w=64)
    write_turned(tmp_path / "plain.mp4", frames, 0, lossless=False)
    write_turned(tmp_path / "turned.mp4", frames, -90, lossless=False)
    for kw in (dict(short_side=24), dict(short_side=24, square=True)):
        plain = read_video_frames(str(tmp_path / "plain.mp4"), channels_last=True, **kw).numpy()
        turned = read_video_frames(str(tmp_path / "turned.mp4"), channels_last=True, **kw).numpy()
        assert turned.shape == ((4, 24, 24, 3) if kw.get("square") else (4, 32, 24, 3))
        assert np.array_equal(turned, np.rot90(plain, -1, axes=(1, 2)))


@pytest.mark.parametrize("orientation, turn", [(1, lambda a: a), (3, lambda a: np.rot90(a, 2)),
                                               (6, lambda a: np.rot90(a, -1)),
                                               (8, lambda a: np.rot90(a, 1)),
                                               (2, lambda a: a[:, ::-1])])
def test_frame_images_are_turned_by_their_exif_orientation(tmp_path, orientation, turn):
    """A frame folder of photos with an EXIF orientation (6: a quarter turn clockwise, as a phone
    held upright writes it) reads as image viewers show them, as a video by its display matrix."""
    from PIL import Image
    image = moving_frames(1, h=16, w=32)[0]
    image[:4, :4] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    (tmp_path / "f").mkdir()
    Image.fromarray(image).save(tmp_path / "f" / "frame_1.png", exif=exif)
    clip = read_frame_folder(str(tmp_path / "f"), channels_last=True)[0].numpy()
    assert np.array_equal(clip, turn(image))
    stored = read_frame_folder(str(tmp_path / "f"), channels_last=True, orientation="stored")
    assert np.array_equal(stored[0].numpy(), image)


def test_stored_orientation_reads_frames_as_the_file_stores_them(tmp_path):
    """orientation="stored" leaves the display matrix aside (torchvision's and decord's frames):
    the turned video's frames are the plain one's, through the scaled and square paths and the
    seek; another value is a ValueError naming both."""
    pytest.importorskip("av")
    frames = moving_frames(40, h=48, w=64)
    write_turned(tmp_path / "plain.mp4", frames, 0, lossless=False)
    write_turned(tmp_path / "turned.mp4", frames, -90, lossless=False)
    select = lambda n: [0, 5, n - 1]  # noqa: E731
    for kw in (dict(), dict(short_side=24, square=True), dict(start=30, end=40)):
        plain = read_video_frames(str(tmp_path / "plain.mp4"), select=select, **kw)
        stored = read_video_frames(str(tmp_path / "turned.mp4"), select=select,
                                   orientation="stored", **kw)
        shown = read_video_frames(str(tmp_path / "turned.mp4"), select=select, **kw)
        assert torch.equal(stored, plain) and not torch.equal(shown, plain), kw
    with pytest.raises(ValueError, match="orientation must be one of 'display', 'stored', got "
                                         "'upright'"):
        read_video_frames(str(tmp_path / "plain.mp4"), orientation="upright")


def numbered_frame(i):
    """A 64 x 48 frame that says its number i < 256: grey 10 + 15 (i % 16) on its left half,
    10 + 15 (i // 16) on its right (flat areas survive any codec's rounding)."""
    f = np.empty((48, 64, 3), np.uint8)
    f[:, :32], f[:, 32:] = 10 + 15 * (i % 16), 10 + 15 * (i // 16)
    return f


def frame_numbers(clip):
    """The numbers of numbered_frame()s, clip: [t, 3, 48, 64]."""
    halves = clip.float().view(clip.shape[0], 3, 48, 2, 32).mean(dim=(1, 2, 4))
    return [round((float(a) - 10) / 15) + 16 * round((float(b) - 10) / 15) for a, b in halves]


def write_numbered(path, n, pts_ms=None, fmt=None, codec="libx264", options=None, rate=30):
    """n numbered_frame()s, at the given presentation times in ms (default: the constant
    rate)."""
    import av
    import fractions
    tb = fractions.Fraction(1, 1000)
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.options = options or {}
        if pts_ms is not None:
            s.time_base = s.codec_context.time_base = tb
        for i in range(n):
            f = av.VideoFrame.from_ndarray(numbered_frame(i), format="rgb24")
            if pts_ms is not None:
                f.pts, f.time_base = pts_ms[i], tb
            for packet in s.encode(f):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)


@pytest.mark.parametrize("ext", ["mkv", "mp4"])
def test_variable_rate_video_is_sampled_evenly_in_time_to_its_end(tmp_path, ext):
    """40 frames at 30 fps with a 1 s pause after frame 19 (a phone's variable rate): 16
    frames evenly spaced in time, so the paused frame repeats and the clip reaches the end (the
    MKV's nominal rate, 30, once left its last half unread)."""
    pytest.importorskip("av")
    path = tmp_path / ("vfr." + ext)
    write_numbered(path, 40, pts_ms=[round(1000 * (i / 30 + (i >= 20))) for i in range(40)])
    got = frame_numbers(read_video_frames(str(path), select=lambda n: sample_indices(n, 16)))
    assert got == sorted(got) and got[:4] == [1, 5, 10, 14], got
    assert got.count(19) >= 6 and got[-1] >= 35, got


def test_video_without_timestamps_is_read_by_counting_frames(tmp_path):
    """H.264 in MPEG-PS: only the first packet has a timestamp, so frames are counted from the
    start (that fallback once failed inside PyAV and read as a damaged tail: frame 0 thrice)."""
    pytest.importorskip("av")
    path = tmp_path / "ps.mpg"
    write_numbered(path, 40, fmt="mpeg", rate=25)
    assert frame_numbers(read_video_frames(str(path), select=lambda n: [3, 20, 38])) == [3, 20, 38]


@pytest.mark.parametrize("gop", [12, 120], ids=["gop12", "one_keyframe"])
def test_a_seek_that_lands_past_the_first_wanted_frame_is_retried_from_further_back(tmp_path, gop):
    """MPEG-PS seeks land on the keyframe after the target, and with one keyframe on none: the
    reader checks where it landed and seeks further back (to frame 0 at worst)."""
    pytest.importorskip("av")
    path = tmp_path / "mpeg2.mpg"
    write_numbered(path, 120, codec="mpeg2video", options={"g": str(gop)}, rate=25)
    for first in (16, 30, 100):
        got = frame_numbers(read_video_frames(str(path), select=lambda n: [first, first + 2]))
        assert got == [first, first + 2], (first, got)


def test_truncated_video_repeats_its_last_frame_with_a_warning(tmp_path, caplog):
    """An MP4 whose index (at the front) declares 40 frames, cut in half: the frames it lacks
    repeat the last one decoded, and a warning names the file."""
    pytest.importorskip("av")
    path = tmp_path / "whole.mp4"
    import av
    frames = np.random.default_rng(0).integers(0, 255, (40, 120, 160, 3)).astype(np.uint8)
    frames[:, :, :20] = (10 + 6 * np.arange(40)).astype(np.uint8)[:, None, None, None]
    with av.open(str(path), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 160, 120, "yuv420p"
        for f in frames:
            for packet in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[:len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="cnnlstm_ext.data"):
        clip = read_video_frames(str(cut), select=lambda n: sample_indices(n, 8),
                                 channels_last=True)
    got = [round((float(v) - 10) / 6) for v in clip[:, :, :20].float().mean(dim=(1, 2, 3))]
    assert len(got) == 8 and got[-1] == got[-2] < 39, got
    assert "cut.mp4 ends before frame" in caplog.text and "of the 40 it declares" in caplog.text


def test_the_main_video_stream_is_read_not_a_thumbnail_before_it(tmp_path):
    """An MKV whose first video stream is a one-frame thumbnail: FFmpeg's best stream (the
    video), as players pick it; and the transport-stream and 3GP extensions count as video."""
    av = pytest.importorskip("av")
    path = tmp_path / "two.mkv"
    with av.open(str(path), "w") as c:
        thumb = c.add_stream("mjpeg", rate=1)
        thumb.width, thumb.height, thumb.pix_fmt = 32, 24, "yuvj420p"
        video = c.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        for packet in thumb.encode(av.VideoFrame.from_ndarray(np.full((24, 32, 3), 250, np.uint8),
                                                              format="rgb24")):
            c.mux(packet)
        for packet in thumb.encode():
            c.mux(packet)
        for i in range(20):
            for packet in video.encode(av.VideoFrame.from_ndarray(numbered_frame(i),
                                                                  format="rgb24")):
                c.mux(packet)
        for packet in video.encode():
            c.mux(packet)
    assert frame_numbers(read_video_frames(str(path))) == list(range(20))
    assert all(video_io.is_video_file("clip" + e) for e in (".ts", ".MTS", ".m2ts", ".3gp"))


def test_16_bit_frame_images_keep_their_range(tmp_path):
    """A folder of 16-bit greyscale PNGs (a depth or scientific camera): each value's high byte,
    not Pillow's conversion, which clips everything above 255 to white."""
    from PIL import Image
    grey = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    (tmp_path / "f").mkdir()
    Image.fromarray(grey).save(tmp_path / "f" / "frame_1.png")
    clip = read_frame_folder(str(tmp_path / "f"), channels_last=True)[0].numpy()
    assert np.array_equal(clip[..., 0], (grey >> 8).astype(np.uint8))
    assert np.array_equal(clip[..., 0], clip[..., 2])


def test_decode_keeps_the_order_select_gives(long_video):
    path, _ = long_video
    clip = read_video_frames(path, 0, 20, select=lambda n: [9, 2, 5])
    ref = read_video_frames(path, 0, 20)
    assert torch.equal(clip, ref[[9, 2, 5]])


def test_decode_holds_one_frame_at_a_time(long_video):
    path, _ = long_video
    frames = iter_video_frames(path, short_side=24)
    first = next(frames)
    assert first[0] == 0 and first[1].shape == (24, 32, 3)
    assert sum(1 for _ in frames) == 199  # a generator: the caller decides what to keep


@pytest.mark.parametrize("content", [b"", b"not a video at all", None])
def test_unreadable_video_is_a_clip_read_error_naming_the_file(tmp_path, content, long_video):
    path = tmp_path / "bad.mp4"
    if content is None:  # a file cut after its header: no frame can be decoded
        data = open(long_video[0], "rb").read()
        path.write_bytes(data[:200])
    else:
        path.write_bytes(content)
    with pytest.raises(ClipReadError, match="bad.mp4"):
        read_video_frames(str(path), select=lambda n: [0])


def test_unreadable_frame_image_is_a_clip_read_error_naming_the_file(tmp_path):
    folder = tmp_path / "f"
    write_frame_folder(str(folder), torch.zeros(3, 3, 8, 8, dtype=torch.uint8))
    (folder / "frame_00002.png").write_bytes(b"broken")
    with pytest.raises(ClipReadError, match="frame_00002.png"):
        read_frame_folder(str(folder))


# --- batched augmentation ----------------------------------------------------------------------

def smooth_clips(b, t, side, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(b * t, 3, side // 8, side // 8, generator=g),
                                        size=(side, side), mode="bilinear")
    return x.mul(255).round().to(torch.uint8).view(b, t, 3, side, side).permute(0, 1, 3, 4, 2).contiguous()


@pytest.mark.parametrize("hflip", [False, True])
def test_batch_augment_is_the_per_clip_transform_with_the_drawn_parameters(hflip):
    tf = ClipTransform(size=56, train=True, hflip=hflip, color_jitter=0.4)
    clips = smooth_clips(6, 3, canvas_size(tf))
    params = torch.stack([draw_params(tf, 64, 64, sample_generator(1, 2, i)) for i in range(6)])
    out = BatchAugment(tf)(clips, params)
    assert out.shape == (6, 3, 3, 56, 56) and out.dtype == torch.float32
    for i in range(6):
        ref = reference_augment(clips[i], params[i], tf)
        # roi_align's area sampling against torch's antialiased bilinear resize
        assert (out[i] - ref).abs().mean() < 0.03, i
    assert len({tuple(p[:4].tolist()) for p in params}) == 6  # a different crop per clip
    if hflip:
        assert {0.0, 1.0} <= set(params[:, 7].tolist()) | {0.0} and params[:, 7].sum() >= 0


def test_batch_augment_eval_is_the_exact_centre_crop():
    tf = ClipTransform(size=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    clips = smooth_clips(3, 2, 20)
    params = torch.stack([draw_params(tf, 20, 20, None) for _ in range(3)])
    out = BatchAugment(tf)(clips, params)
    x = clips.permute(0, 1, 4, 2, 3).float()[..., 2:18, 2:18] / 255
    ref = (x - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor([0.2, 0.3, 0.4]).view(3, 1, 1)
    assert torch.allclose(out, ref, atol=1e-5)


def test_batch_augment_of_a_clip_does_not_depend_on_the_rest_of_the_batch():
    tf = ClipTransform(size=24, train=True)
    clips = smooth_clips(5, 2, 28, seed=3)
    params = torch.stack([draw_params(tf, 28, 28, sample_generator(0, 1, i)) for i in range(5)])
    whole = BatchAugment(tf)(clips, params)
    order = [3, 0, 4]
    part = BatchAugment(tf)(clips[order], params[order])
    assert torch.allclose(whole[order], part, atol=1e-6)


def test_draw_params_follow_the_transform_draws_of_the_same_generator():
    tf = ClipTransform(size=24, train=True, hflip=True)
    p = draw_params(tf, 28, 28, sample_generator(5, 6, 7))
    g = sample_generator(5, 6, 7)
    from cnnlstm_ext.data.transforms import color_jitter_factors, random_resized_crop_params
    box = random_resized_crop_params(28, 28, tf.crop_scale, tf.crop_ratio, g)
    factors = color_jitter_factors(tf.color_jitter, g)
    flip = float(torch.rand((), generator=g).item() < 0.5)
    assert p.tolist() == [*box, *factors, flip]


def test_batch_augment_refuses_float_or_channels_first_clips():
    tf = ClipTransform(size=8)
    with pytest.raises(ValueError, match="uint8 clips"):
        BatchAugment(tf)(torch.zeros(1, 2, 3, 10, 10, dtype=torch.uint8), torch.zeros(1, 8))


# --- data sets and loaders ---------------------------------------------------------------------

def write_class_tree(root, frames):
    """root/{a,b}/: three `frames`-frame 48x64 H.264 clips per class; returns root."""
    for c, cls in enumerate(["a", "b"]):
        (root / cls).mkdir(parents=True)
        for k in range(3):
            write_h264(root / cls / ("v%d.mp4" % k), moving_frames(frames, seed=10 * c + k))
    return root


@pytest.fixture
def video_tree(tmp_path):
    """root/{a,b}/: three 20-frame 48x64 clips per class."""
    return write_class_tree(tmp_path / "videos", 20)


def test_video_folder_batch_augment_items_are_uint8_canvases_with_reproducible_params(video_tree):
    tf = ClipTransform(size=16, train=True)
    ds = VideoFolder(str(video_tree), num_frames=6, transform=tf, train=True, seed=2,
                     batch_augment=True)
    clip, label, length, params = ds[1]
    assert clip.shape == (6, 18, 18, 3) and clip.dtype == torch.uint8 and length == 6
    assert params.shape == (8,) and label == ds.records[1].label
    again = ds[1]
    assert torch.equal(clip, again[0]) and torch.equal(params, again[3])
    ds.set_epoch(1)
    assert not torch.equal(params, ds[1][3])


def test_batch_augment_eval_items_match_the_float_path(video_tree):
    tf = ClipTransform(size=16)
    fast = VideoFolder(str(video_tree), num_frames=4, transform=tf, batch_augment=True)
    slow = VideoFolder(str(video_tree), num_frames=4, transform=tf)
    batch = collate_clips([LoaderDataset(fast)[i] for i in range(len(fast))])
    out = BatchAugment(tf)(batch.clips, batch.params)
    ref = torch.stack([slow[i][0] for i in range(len(slow))])
    # swscale's area scaling against torch's antialiased resize: the same pictures
    assert out.shape == ref.shape and (out - ref).abs().mean() < 0.12  # about 6/255


def test_persistent_workers_see_every_epoch_through_the_sampler(video_tree):
    tf = ClipTransform(size=16, train=True)
    ds = VideoFolder(str(video_tree), num_frames=4, transform=tf, train=True, seed=1,
                     batch_augment=True)
    runs = []
    for workers in (0, 2):
        sampler = EpochSampler(range(len(ds)))
        loader = DataLoader(LoaderDataset(ds), batch_size=3, sampler=sampler, num_workers=workers,
                            persistent_workers=workers > 0, collate_fn=collate_clips)
        epochs = []
        for epoch in (1, 2):
            sampler.set_epoch(epoch)
            epochs.append([(b.clips, b.params) for b in loader])
        runs.append(epochs)
    for e in range(2):
        for (c0, p0), (c1, p1) in zip(runs[0][e], runs[1][e]):
            assert torch.equal(c0, c1) and torch.equal(p0, p1)
    assert not torch.equal(runs[1][0][0][1], runs[1][1][0][1])  # epoch 2 draws anew


def test_unreadable_clip_is_skipped_with_a_warning_naming_it(video_tree, caplog):
    (video_tree / "b" / "corrupt.mp4").write_bytes(b"\x00" * 500)
    (video_tree / "a" / "empty.mp4").write_bytes(b"")
    ds = VideoFolder(str(video_tree), num_frames=4, transform=ClipTransform(size=16),
                     batch_augment=True)
    loader = DataLoader(LoaderDataset(ds), batch_size=4, collate_fn=collate_clips)
    with caplog.at_level(logging.WARNING, logger="cnnlstm_ext.data"):
        batches = list(loader)
    skipped = sorted(p for b in batches for p in b.skipped)
    assert sorted(p.rsplit("/", 1)[1] for p in skipped) == ["corrupt.mp4", "empty.mp4"]
    kept = torch.cat([b.labels for b in batches if b.labels is not None])
    good = [r.label for r in ds.records if not r.path.endswith(("corrupt.mp4", "empty.mp4"))]
    assert kept.tolist() == good  # the labels of the clips that are there, none shifted
    assert "corrupt.mp4" in caplog.text and "empty.mp4" in caplog.text
    assert isinstance(LoaderDataset(ds)[[r.path for r in ds.records].index(skipped[0])],
                      SkippedClip)


def test_batch_of_only_unreadable_clips_is_empty():
    batch = collate_clips([SkippedClip("x.mp4", "bad", 0.1, 0)])
    assert batch.clips is None and batch.skipped == ["x.mp4"]


def test_default_workers_fit_the_machine():
    n = default_num_workers()
    assert 1 <= n <= 8
    assert resolve_num_workers(DataConfig(dataset="folder", root="x")) == n
    assert resolve_num_workers(DataConfig()) == 0  # synthetic: generated in the main process
    assert resolve_num_workers(DataConfig(dataset="folder", root="x", num_workers=3)) == 3


def test_build_datasets_batch_augment_and_temporal_jitter_follow_augment(video_tree):
    cfg = DataConfig(dataset="folder", root=str(video_tree), num_frames=4, frame_size=16,
                     val_fraction=0.34, augment=False)
    train, val, _ = build_datasets(cfg, batch_augment=True)
    assert train.batch_augment and val.batch_augment and not train.train
    cfg.augment = True
    assert build_datasets(cfg)[0].train


@pytest.mark.parametrize("overrides, match", [
    (dict(cache="/c"), "data.dataset=synthetic"),
    (dict(dataset="folder", root="/v", feature_cache="/f"), "model.freeze_backbone=true"),
    (dict(dataset="folder", root="/v", cache_short_side=4), "data.cache_short_side"),
])
def test_config_checks_the_cache_settings(overrides, match):
    cfg = Config()
    for k, v in overrides.items():
        setattr(cfg.data, k, v)
    with pytest.raises(ValueError, match=match):
        validate(cfg)


def test_feature_cache_needs_augment_off():
    cfg = Config()
    cfg.data.dataset, cfg.data.root, cfg.data.feature_cache = "folder", "/v", "/f"
    cfg.model["freeze_backbone"] = True
    with pytest.raises(ValueError, match="data.augment=false"):
        validate(cfg)
    cfg.data.augment = False
    validate(cfg)


def test_decoder_threads_one_for_small_frames_and_in_loader_workers(monkeypatch, long_video):
    path, _ = long_video
    with video_io._open_video(path) as c:  # 64 x 48: one thread
        assert c.streams.video[0].thread_count == 1
    monkeypatch.setattr(video_io, "THREADED_DECODE_MIN_PIXELS", 0)
    with video_io._open_video(path) as c:  # "large" frames, not in a worker: FFmpeg's threads
        assert c.streams.video[0].thread_type.name == "AUTO"
    import torch.utils.data as tud
    monkeypatch.setattr(tud, "get_worker_info", lambda: object())
    with video_io._open_video(path) as c:  # in a loader worker: one thread whatever the size
        assert c.streams.video[0].thread_count == 1


def test_decode_lets_go_only_where_the_decoder_reads_skip_frame_per_packet(monkeypatch, tmp_path):
    """MPEG-4 part 2 with B-frames: not H.264/HEVC, so every packet is decoded (a decoder that
    reads skip_frame once, when it opens, would drop wanted frames), and the clip is right."""
    path = str(tmp_path / "bframes_mpeg4.mp4")
    write_encoded(path, moving_frames(48), "mpeg4", {"bf": "2", "g": "24", "qscale": "2"})
    clip, read, out = read_counting(monkeypatch, path, 0, 48,
                                    lambda n: sample_indices(n, 6).tolist())
    assert len(read) > 40 and len(out) >= len(read) - 2  # (the B-frames' reordering delay)
    assert torch.equal(clip, read_video_frames(path)[sample_indices(48, 6).tolist()])


@pytest.mark.parametrize("orientation, converter", [("display", "_to_array"),
                                                     ("stored", "_converted")])
def test_a_frame_that_cannot_be_converted_is_a_clip_read_error(monkeypatch, long_video,
                                                                orientation, converter):
    """An FFmpeg error while converting the held frames names the file; it is not taken for a
    damaged tail, which would drop the frames converted with it and return a shorter clip."""
    import av
    path, _ = long_video
    real, calls = getattr(video_io, converter), []

    def failing(frame, short_side, square):
        calls.append(frame.pts)
        if len(calls) == 3:
            raise av.error.FFmpegError(22, "swscale refused")
        return real(frame, short_side, square)
    monkeypatch.setattr(video_io, converter, failing)
    with pytest.raises(ClipReadError, match=r"could not convert a 64x48 yuv420p frame of .*\.mp4"
                       r" to RGB: .*swscale refused"):
        read_video_frames(path, 0, 72, select=lambda n: sample_indices(n, 8).tolist(),
                          orientation=orientation)
    assert len(calls) == 3
