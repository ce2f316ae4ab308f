"""Reading and writing clips: video files through PyAV, folders of frame images through Pillow.

PyAV (`pip install av`) is the decoder: its wheels carry their own FFmpeg, so it installs and runs
with pip alone on machines without system FFmpeg libraries, and it works with any torch version
(it hands back numpy frames, no torch ABI involved).

Frames come back as uint8 `[t, 3, H, W]` (RGB), or `[t, H, W, 3]` (channels_last=True). Only the
frames a clip samples are converted to RGB, at the short side the transform needs (planar YUV by
ops.yuv_to_rgb, other formats by FFmpeg's swscale), and decoding starts at the keyframe before
the first of them (a seek), so a clip cut out of a long video costs about as much as a short
video. Frames come out as players show them: a video's display matrix (a phone records a
portrait video as landscape frames and a rotation) is applied, as ffmpeg and OpenCV apply it;
or, with orientation="stored", as the file stores them (ORIENTATIONS).
"""
import functools
import logging
import math
import os
import threading
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch

log = logging.getLogger("cnnlstm_ext.data")

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv",
                    ".wmv", ".ts", ".mts", ".m2ts", ".3gp")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _import_av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading video files needs PyAV: pip install av") from e
    return av


def is_video_file(path: str) -> bool:
    return path.lower().endswith(VIDEO_EXTENSIONS)


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def list_frame_images(folder: str) -> List[str]:
    """The image files of a frame folder, in natural order (frame_2 before frame_10)."""
    import re

    def natural_key(name):
        return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]

    names = [n for n in os.listdir(folder) if is_image_file(n)]
    return [os.path.join(folder, n) for n in sorted(names, key=natural_key)]


def is_frame_folder(path: str) -> bool:
    """Whether `path` is one video as frame images: a folder holding images and no video file
    at any depth (a folder with videos below is a folder of clips)."""
    try:
        names = os.listdir(path)
    except OSError:
        return False
    if not any(is_image_file(n) for n in names):
        return False
    return not any(is_video_file(f) for _, _, files in os.walk(path) for f in files)


def find_clips(folder: str) -> List[str]:
    """The video files and frame folders (is_frame_folder) below `folder` at any depth, folder by
    folder in sorted order (a frame folder's own sub-folders are not searched)."""
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs.sort()
        for d in list(dirs):
            if is_frame_folder(os.path.join(parent, d)):
                found.append(os.path.join(parent, d))
                dirs.remove(d)  # its frames are one video, not a tree to search
        found += [os.path.join(parent, f) for f in sorted(files) if is_video_file(f)]
    return found


class ClipReadError(RuntimeError):
    """A clip that cannot be read: a video file that cannot be opened or decoded (corrupt, empty,
    not a video) or a frame image that cannot be; the message names the file."""


def scaled_size(height: int, width: int, short_side: Optional[int]) -> Tuple[int, int]:
    """(height, width) with min(height, width) == short_side and the aspect ratio kept (even
    sizes are not required: swscale takes any)."""
    if short_side is None or min(height, width) == short_side:
        return height, width
    scale = short_side / min(height, width)
    return max(short_side, round(height * scale)), max(short_side, round(width * scale))


def center_square(image: np.ndarray) -> np.ndarray:
    """The central `s x s` of `image: [H, W, 3]`, s = min(H, W)."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return image[top:top + s, left:left + s]


class _Timing:
    """How a stream's frames are numbered: frame i is the one presented at
    `first + i / per_tick` (time_base ticks), i in [0, count). per_tick is None where the
    frames have no timestamps (they are then counted from the start)."""

    def __init__(self, count: int, first: int, per_tick: Optional[float]):
        self.count, self.first, self.per_tick = count, first, per_tick

    def index(self, pts: int) -> int:
        # Halfway rounds down: after a seek, MPEG-PS timestamps come half a frame late.
        return math.ceil((pts - self.first) * self.per_tick - 0.5)


def _frame_timing(container, stream) -> _Timing:
    """The stream's frame count and numbering. With a count in the container (MP4, MOV), frames
    are numbered by their timestamps at the stream's average rate (the count over the duration
    there). Otherwise (MKV, WebM, MPEG...) the packets are read once without decoding: the count is
    theirs, and the rate is taken from their first and last timestamps, so that the frames span
    [0, count) evenly in time even where the rate varies (a phone's video) and the stream's
    nominal rate is not its average."""
    rate = stream.average_rate or stream.guessed_rate
    base = stream.time_base
    first = stream.start_time or 0
    per_tick = float(rate * base) if rate is not None and base is not None else None
    if stream.frames and stream.frames > 0:
        return _Timing(int(stream.frames), first, per_tick)
    n, lo, hi = 0, None, None
    for packet in container.demux(stream):
        if packet.size:
            n += 1
            if packet.pts is not None:
                lo = packet.pts if lo is None else min(lo, packet.pts)
                hi = packet.pts if hi is None else max(hi, packet.pts)
    container.seek(0, stream=stream, backward=True)
    if lo is not None and hi > lo and n > 1:
        return _Timing(n, lo, (n - 1) / (hi - lo))
    return _Timing(n, lo if lo is not None else first, per_tick if lo is not None else None)


def _open_video(path: str):
    av = _import_av()
    if not os.path.isfile(path):
        raise FileNotFoundError("video file not found: %s" % path)
    try:
        container = av.open(path)
    except Exception as e:  # PyAV raises its own error types per FFmpeg error
        raise ClipReadError("could not open video %s: %s" % (path, e)) from e
    if not container.streams.video:
        container.close()
        raise ClipReadError("%s has no video stream" % path)
    _set_decoder_threads(video_stream(container))
    return container


def video_stream(container):
    """The container's main video stream: FFmpeg's best (av_find_best_stream: cover art and
    thumbnails stored as video streams come last), not merely the first."""
    try:
        return container.streams.best("video") or container.streams.video[0]
    except AttributeError:  # a PyAV without streams.best
        return container.streams.video[0]


# Frame threads shorten the decode of large frames when cores are idle, but cost about 4 ms of
# set-up per opened file and more CPU per frame: one 256 x 256 video of 72 frames decoded 1.5x
# faster on one thread than with FFmpeg's automatic threads, a 640 x 480 clip no slower.
THREADED_DECODE_MIN_PIXELS = 1280 * 720


def _set_decoder_threads(stream) -> None:
    """One decoding thread in a loader worker (the workers already use the cores) and for frames
    under 1280 x 720; FFmpeg's automatic threads otherwise."""
    from torch.utils.data import get_worker_info
    ctx = stream.codec_context
    pixels = (ctx.width or 0) * (ctx.height or 0)
    if get_worker_info() is not None or pixels < THREADED_DECODE_MIN_PIXELS:
        stream.thread_count = 1
    else:
        stream.thread_type = "AUTO"


_local = threading.local()
# A clip whose first frame comes earlier is decoded from the start: a seek (a demuxer flush) costs
# more than decoding these few frames.
SEEK_MIN_FRAMES = 16


def _reformatter():
    """This thread's swscale converter. It keeps its SwsContext between frames of the same size
    (frame.to_ndarray(width=...) builds a new one per call, which costs more than the scaling).
    One per process too: a loader worker forked from a process that converted frames must not
    reuse the parent's context."""
    pid = os.getpid()
    if getattr(_local, "pid", None) != pid:
        from av.video.reformatter import VideoReformatter
        _local.reformatter, _local.pid = VideoReformatter(), pid
    return _local.reformatter


# The matrices of FFmpeg's colour spaces (AVColorSpace, PyAV's frame.colorspace) as (kr, kb);
# any other, unspecified included, is read as BT.601, as swscale reads it.
_MATRICES = {1: (0.2126, 0.0722), 4: (0.30, 0.11), 7: (0.212, 0.087), 9: (0.2627, 0.0593),
             10: (0.2627, 0.0593)}
_BT601 = (0.299, 0.114)
# The 8-bit planar YUV formats of ops.yuv_to_rgb, and whether the name says full (JPEG) range.
_PLANAR_YUV = {"yuv420p": False, "yuvj420p": True, "yuv422p": False, "yuvj422p": True,
               "yuv444p": False, "yuvj444p": True}
_RANGE_JPEG = 2  # AVColorRange


def _planar_to_rgb(frame, h: int, w: int, square: bool) -> Optional[np.ndarray]:
    """`frame` as RGB uint8 `[h, w, 3]` by ops.yuv_to_rgb (area resampling of its planes, then
    the conversion of the output pixels: 1.2 to 2.2x faster than swscale's scaled rgb24 on the
    frames of the data path, benchmarks/bench_convert.py), or None where the kernel does not take
    it: another pixel format, a size larger than the frame's, or no built kernels. `square`:
    `[s, s, 3]` with s = min(h, w), from the central square of the frame (its offset rounded down
    to whole chroma samples), which costs less than resampling the whole frame and cutting it."""
    full = _PLANAR_YUV.get(frame.format.name)
    op = _yuv_to_rgb_op()
    if full is None or h > frame.height or w > frame.width or op is None:
        return None
    full = full or getattr(frame, "color_range", 0) == _RANGE_JPEG
    kr, kb = _MATRICES.get(getattr(frame, "colorspace", 2), _BT601)
    y, u, v = frame_planes(frame)
    crop = square and h != w
    if crop:
        H, W = y.shape
        side, sy, sx = min(H, W), 1 + (u.shape[0] < H), 1 + (u.shape[1] < W)
        top, left = (H - side) // 2 // sy * sy, (W - side) // 2 // sx * sx
        cy, cx = top // sy, left // sx
        cu, cv = (p[cy:cy - (-side // sy), cx:cx - (-side // sx)] for p in (u, v))
        crop = cu.shape == (-(-side // sy), -(-side // sx))  # else (an odd edge) cut afterwards
        if crop:
            y, u, v, h, w = y[top:top + side, left:left + side], cu, cv, min(h, w), min(h, w)
    image = op(y, u, v, h, w, kr, kb, full).numpy()
    return center_square(image) if square and not crop else image


def frame_planes(frame) -> Tuple[torch.Tensor, ...]:
    """The planes of a planar PyAV frame as uint8 tensors `[rows, columns]`: views of the
    decoder's buffers (rows padded to its line size), valid while the frame lives."""
    return tuple(torch.from_numpy(np.ndarray((p.height, p.width), np.uint8, p, 0, (p.line_size, 1)))
                 for p in frame.planes)


@functools.lru_cache(maxsize=None)
def _yuv_to_rgb_op():
    """torch.ops.cnnlstm_ext.yuv_to_rgb.default, looked up once (a few µs a frame), or None
    without the built kernels."""
    from cnnlstm_ext import ops
    return torch.ops.cnnlstm_ext.yuv_to_rgb.default if ops.kernels_built() else None


def display_orientation(frame) -> Tuple[bool, bool, bool]:
    """How a decoded frame becomes the picture players show, from its display matrix (FFmpeg's
    DISPLAYMATRIX side data: phones store a portrait video as landscape frames turned by 90
    degrees, and selfie cameras may mirror): (transpose, flip rows, flip columns), applied in
    that order to an image `[H, W, ...]`; (False, False, False) without a matrix. A matrix maps a
    pixel (x, y) of the frame to (a x + c y, b x + d y) on the display; only its signs count (a
    turn by other than a multiple of 90 degrees, which no camera records, is taken to the
    nearest one)."""
    kind = _display_matrix_kind()
    side = frame.side_data.get(kind) if kind is not None else None
    if side is None:
        return False, False, False
    a, b, _, c, d = np.frombuffer(bytes(side), dtype=np.int32)[:5].tolist()
    if abs(b) > abs(a):  # x' = c y, y' = b x: rows and columns swap
        return True, b < 0, c < 0
    return False, d < 0, a < 0


@functools.lru_cache(maxsize=None)
def _display_matrix_kind():
    """PyAV's side-data type of a display matrix; None for a PyAV without frame side data."""
    try:
        from av.sidedata.sidedata import Type
        return Type.DISPLAYMATRIX
    except (ImportError, AttributeError):
        return None


def _orient(image: np.ndarray, orientation: Tuple[bool, bool, bool]) -> np.ndarray:
    transpose, flip_rows, flip_cols = orientation
    if not (transpose or flip_rows or flip_cols):
        return image
    if transpose:
        image = image.swapaxes(0, 1)
    if flip_rows:
        image = image[::-1]
    if flip_cols:
        image = image[:, ::-1]
    return np.ascontiguousarray(image)


# How frames are turned (the `orientation` argument of the readers, data.orientation):
#   "display": as players and viewers show them (a video's display matrix, an image's EXIF
#              orientation; ffmpeg's and OpenCV's default);
#   "stored":  as the file stores them (torchvision.io.read_video's and decord's frames): for a
#              model trained on frames read that way, whose portrait videos lay on their side.
ORIENTATIONS = ("display", "stored")


def display_wanted(orientation: str) -> bool:
    """Whether `orientation` (one of ORIENTATIONS, else ValueError) asks for frames as players
    show them."""
    if orientation not in ORIENTATIONS:
        raise ValueError("orientation must be one of %s, got %r"
                         % (", ".join(map(repr, ORIENTATIONS)), orientation))
    return orientation == "display"


def _to_array(frame, short_side: Optional[int], square: bool) -> np.ndarray:
    """One decoded frame as RGB uint8 `[H, W, 3]` as players show it (display_orientation),
    scaled so that its short side is `short_side` (the mean over each output pixel's area when
    it shrinks: ops.yuv_to_rgb for planar YUV, swscale's AREA otherwise), then cut to its central
    square. (Turned after the conversion, on the small image: the central square of a turned
    frame is the turned central square.)"""
    return _orient(_converted(frame, short_side, square), display_orientation(frame))


def _converted(frame, short_side: Optional[int], square: bool) -> np.ndarray:
    """_to_array in the frame's stored orientation."""
    h, w = scaled_size(frame.height, frame.width, short_side)
    image = _planar_to_rgb(frame, h, w, square)
    if image is not None:
        return image
    # threads=1: frames this small gain nothing from swscale's thread pool, and a pool does not
    # survive the fork of a loader worker. (Scaling in YUV, then converting to RGB at the small
    # size, took half the time but repeats chroma rows: 1.3 to 4x the mean error against an
    # antialiased resize of the full RGB frame.)
    image = _reformatter().reformat(frame, width=w, height=h, format="rgb24",
                                    interpolation="AREA" if h < frame.height else "BILINEAR",
                                    threads=1).to_ndarray()
    return center_square(image) if square else image


def frame_count(path: str) -> int:
    """The number of frames of a video file (as iter_video_frames numbers them), without
    decoding any; ClipReadError (FileNotFoundError) when it cannot be read."""
    with _open_video(path) as container:
        try:
            return _frame_timing(container, video_stream(container)).count
        except _av_errors() as e:
            raise ClipReadError("could not read video %s: %s" % (path, e)) from e


def iter_video_frames(path: str, start: int = 0, end: Optional[int] = None,
                      indices=None, short_side: Optional[int] = None,
                      square: bool = False,
                      orientation: str = "display") -> Iterator[Tuple[int, np.ndarray]]:
    """Yields `(i, image [H, W, 3] uint8)` for the frames `i` of `indices` (0-based within the
    range `start <= i < end`, increasing; None: every frame of the range; a callable: called
    with the number n of frames in the range, returns the indices).

    Frames are numbered by their presentation times (see _frame_timing): where the frame rate
    varies, frame i is the one shown at the i-th of n evenly spaced times, so a pause shows as a
    repeated frame and every part of the video is reached. Decoding starts at the keyframe
    before the first wanted frame (a seek; one that lands past it, as some containers' seeks and
    an open GOP's leading frames do, is retried from further back, down to frame 0), and stops
    after the last; only wanted frames are converted to RGB, at `short_side` (see _to_array),
    a few at a time (PENDING_BYTES). Memory is bounded by those few frames whatever the video's
    length. A frame the container promised but the file lacks (a truncated or damaged tail)
    repeats the last frame decoded before it, with a warning; a video without any of the range's
    frames raises ClipReadError. `orientation`: see ORIENTATIONS.
    """
    display = display_wanted(orientation)
    container = _open_video(path)
    with container:
        stream = video_stream(container)
        try:
            timing = _frame_timing(container, stream)
        except _av_errors() as e:
            raise ClipReadError("could not read video %s: %s" % (path, e)) from e
        total = timing.count
        stop = total if end is None else min(end, total)
        if stop <= start:
            raise ClipReadError("no frames in %s for the range [%d, %s) (the video has %d)"
                                % (path, start, end, total))
        if callable(indices):
            indices = indices(stop - start)
        wanted = list(range(stop - start)) if indices is None else [int(i) for i in indices]
        if any(b < a for a, b in zip(wanted, wanted[1:])) or not 0 <= wanted[0] <= wanted[-1] < stop - start:
            raise ValueError("frame indices must increase within [0, %d), got %s"
                             % (stop - start, wanted[:8]))
        wanted = [start + i for i in wanted]
        retry = yield from _decode_wanted(container, stream, timing, path, wanted, start,
                                          short_side, square, 0, display)
    while retry is not None:  # a seek landed past the first wanted frame: from further back
        with _open_video(path) as container:
            retry = yield from _decode_wanted(container, video_stream(container), timing, path,
                                              wanted, start, short_side, square, retry, display)


@functools.lru_cache(maxsize=None)
def _av_errors():
    """The exceptions of FFmpeg's failures (PyAV's error types): what a damaged file raises."""
    return (_import_av().error.FFmpegError,)


# Wanted frames wait, decoded, for their conversion until about this many bytes of them are
# held: converting each frame as it came slowed the decoding of the next ones (by about 12% of
# the time of a 256 x 256 clip; the two evict each other's state from the caches), and the bound
# keeps the memory of large frames in check.
PENDING_BYTES = 8 << 20


class _Pending:
    """Decoded frames of `path` waiting for their conversion: [frame, [positions in the clip]] in
    order."""

    def __init__(self, path: str, display: bool):
        self.path, self.display, self.entries, self.bytes = path, display, [], 0

    def add(self, position: int, frame) -> None:
        if self.entries and self.entries[-1][0] is frame:  # a frame that repeats
            self.entries[-1][1].append(position)
            return
        self.entries.append([frame, [position]])
        self.bytes += frame.width * frame.height * 3  # (8-bit 4:4:4; 4:2:0 holds half)

    def convert(self, short_side, square):
        """Yields (position, image) of every waiting frame, in order, and forgets them. A frame
        FFmpeg cannot convert raises ClipReadError: not an FFmpeg error, which the decoding loop
        would take for a damaged tail and so drop the frames converted with it."""
        entries, self.entries, self.bytes = self.entries, [], 0
        for frame, positions in entries:
            try:
                image = (_to_array if self.display else _converted)(frame, short_side, square)
            except _av_errors() as e:
                raise ClipReadError("could not convert a %dx%d %s frame of %s to RGB: %s"
                                    % (frame.width, frame.height, frame.format.name, self.path,
                                       e)) from e
            for position in positions:
                yield position, image


def _decode_wanted(container, stream, timing: _Timing, path, wanted, start, short_side, square,
                   back, display):
    """See iter_video_frames; `wanted`: absolute frame numbers, increasing. Seeks to `back`
    frames before the first wanted one (none below SEEK_MIN_FRAMES). Returns None when done, or
    the next `back` to try when the seek landed past the first wanted frame (nothing yielded)."""
    by_pts = timing.per_tick is not None
    seeked = by_pts and wanted[0] - back >= SEEK_MIN_FRAMES
    further = max(2 * back, 2 * SEEK_MIN_FRAMES)  # the next `back` when the seek misses
    if seeked:
        target = timing.first + int((wanted[0] - back) / timing.per_tick)
        container.seek(target, stream=stream, backward=True, any_frame=False)
    k, last, count, damaged, counting = 0, None, -1, None, False
    pending = _Pending(path, display)
    skips = [False]  # whether a packet was let go undecoded (then frames cannot be counted)
    try:
        for frame in _decode_skipping(container, stream, set(wanted), timing if by_pts else None,
                                      skips):
            count += 1
            if by_pts and frame.pts is not None:
                i = timing.index(frame.pts)
            elif by_pts and (seeked or skips[0]):  # no timestamp: count from frame 0 instead
                counting = True
                break
            else:
                i = count
            if count == 0 and seeked and i > wanted[0]:
                return further
            while k < len(wanted) and wanted[k] < i and last is not None:
                pending.add(wanted[k] - start, last)  # a missing frame: the one before it
                k += 1
            while k < len(wanted) and wanted[k] == i:
                pending.add(i - start, frame)
                k += 1
            last = frame
            if k == len(wanted):
                yield from pending.convert(short_side, square)
                return None
            if pending.bytes >= PENDING_BYTES:
                yield from pending.convert(short_side, square)
    except _av_errors() as e:
        if last is None and not seeked:
            raise ClipReadError("could not decode video %s: %s" % (path, e)) from e
        damaged = e  # the frames decoded so far stand; the rest repeat the last one
    yield from pending.convert(short_side, square)
    if counting:
        with _open_video(path) as again:
            yield from _decode_wanted(again, video_stream(again), _Timing(timing.count, 0, None),
                                      path, wanted[k:], start, short_side, square, 0, display)
        return None
    if last is None:
        if seeked:  # nothing decodable from where the seek landed
            return further
        raise ClipReadError("could not decode any frame of %s" % path)
    if k < len(wanted) and (damaged is not None or _ends_early(stream, timing, last)):
        log.warning("%s ends before frame %d of the %d it declares (%s); the clip repeats the "
                    "last frame decoded, %d, for %d frame(s)", path, wanted[k] + 1, timing.count,
                    "damaged: %s" % damaged if damaged is not None else "truncated",
                    timing.index(last.pts) + 1 if by_pts and last.pts is not None else count + 1,
                    len(wanted) - k)
    for j in wanted[k:]:  # the missing tail: the last frame again
        pending.add(j - start, last)
    yield from pending.convert(short_side, square)
    return None


def _ends_early(stream, timing: _Timing, last) -> bool:
    """Whether the stream ended more than a frame before the duration its container declares
    (a truncated file; a last frame held longer, as in variable-rate video, ends on time)."""
    if timing.per_tick is None or last.pts is None or not stream.duration:
        return False
    held = getattr(last, "duration", None) or 1 / timing.per_tick
    end = (stream.start_time or 0) + stream.duration
    return last.pts + held < end - 1.5 / timing.per_tick


# Decoders that read skip_frame at each packet (FFmpeg copies it to a frame thread's context per
# packet too). Others may read it once, when the decoder opens (libdav1d for AV1): NONREF set
# before the first packet would then drop every non-reference frame, wanted or not.
_SKIP_PER_PACKET = frozenset(["h264", "hevc"])


def _decode_skipping(container, stream, wanted, timing: Optional[_Timing], skips):
    """The frames of `stream` from where the container stands. For H.264 and HEVC, a packet
    whose frame is not wanted is dropped by the decoder when no other frame refers to it
    (skip_frame NONREF: the non-reference B-frames, about half of a WLASL video's frames), set
    per packet from its timestamp; `skips[0]` becomes True when one was. Other codecs, and
    streams without timestamps (timing None), decode every packet."""
    ctx, kept = stream.codec_context, True
    if ctx.name not in _SKIP_PER_PACKET:
        timing = None
    for packet in container.demux(stream):
        keep = timing is None or packet.pts is None or timing.index(packet.pts) in wanted
        if keep != kept:  # (the setter costs more than the test)
            ctx.skip_frame, kept = "DEFAULT" if keep else "NONREF", keep
        skips[0] = skips[0] or not keep
        yield from packet.decode()


def read_video_frames(path: str, start: int = 0, end: Optional[int] = None,
                      select=None, short_side: Optional[int] = None,
                      square: bool = False, channels_last: bool = False,
                      orientation: str = "display") -> torch.Tensor:
    """Frames `start <= i < end` (0-based, end=None: to the last frame) of a video file.

    `select(n) -> indices` picks which of the n frames of that range to return (increasing);
    only those are converted to RGB, and decoding starts at the keyframe before the first of
    them. `short_side`: frames are scaled (see _to_array) so that min(H, W) == short_side;
    `square`: then cut to their central square. Frames are turned as players show them
    (display_orientation; H and W are the display's), or not with `orientation="stored"` (see
    ORIENTATIONS). Returns uint8 `[t, 3, H, W]`, or `[t, H, W, 3]` with `channels_last` (the
    decoder's layout: no copy; torchvision.io.read_video's "THWC"). A file that cannot be read
    raises ClipReadError (FileNotFoundError when it does not exist).
    """
    order = []

    def sorted_select(n):
        picks = [int(i) for i in select(n)]
        order.extend(sorted(range(len(picks)), key=picks.__getitem__))
        return [picks[j] for j in order]

    frames = [image for _, image in iter_video_frames(
        path, start, end, None if select is None else sorted_select, short_side, square,
        orientation)]
    if order != sorted(order):  # back to the order select gave
        unsorted = [None] * len(order)
        for pos, j in enumerate(order):
            unsorted[j] = frames[pos]
        frames = unsorted
    clip = torch.from_numpy(np.stack(frames))  # [t, H, W, 3]
    return clip if channels_last else clip.permute(0, 3, 1, 2).contiguous()


_EXIF_ORIENTATION = 0x0112


def read_frame_folder(folder: str, start: int = 0, end: Optional[int] = None,
                      select=None, short_side: Optional[int] = None,
                      square: bool = False, channels_last: bool = False,
                      orientation: str = "display") -> torch.Tensor:
    """Reads the images of a frame folder (natural order); same contract as read_video_frames
    (scaled with Pillow's antialiased bilinear resize; turned by an image's EXIF orientation, as
    a video by its display matrix, unless `orientation="stored"`)."""
    from PIL import Image, ImageOps

    display = display_wanted(orientation)

    files = list_frame_images(folder)[start:end]
    if not files:
        videos = sum(1 for n in os.listdir(folder) if is_video_file(n)) if start == 0 else 0
        hint = ("; it holds %d video file(s): to read each of them, expand the folder with "
                "cnnlstm_ext.inference.find_videos([folder]), as cnnlstm-ext predict does"
                % videos) if videos else ""
        raise ClipReadError("no frame images (%s) in %s%s"
                            % (", ".join(IMAGE_EXTENSIONS), folder, hint))
    indices = range(len(files)) if select is None else [int(i) for i in select(len(files))]
    arrays = []
    for i in indices:
        try:
            with Image.open(files[i]) as im:
                if display and im.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # as viewers show it
                    im = ImageOps.exif_transpose(im)
                if im.mode.startswith("I"):  # 16-bit grey: its high byte (convert clips at 255)
                    grey = np.asarray(im).astype(np.uint32)
                    grey = grey >> 8 if grey.max() > 255 else grey
                    im = Image.fromarray(grey.astype(np.uint8))
                im = im.convert("RGB")
                h, w = scaled_size(im.height, im.width, short_side)
                if (h, w) != (im.height, im.width):
                    im = im.resize((w, h), Image.BILINEAR)
                image = np.asarray(im)
        except OSError as e:  # Pillow's UnidentifiedImageError and truncated files
            raise ClipReadError("could not read frame image %s: %s" % (files[i], e)) from e
        arrays.append(center_square(image) if square else image)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ClipReadError("frames of %s differ in size: %s" % (folder, sorted(shapes)))
    clip = torch.from_numpy(np.stack(arrays))  # [t, H, W, 3]
    return clip if channels_last else clip.permute(0, 3, 1, 2).contiguous()


def write_video(path: str, frames: torch.Tensor, fps: int = 8, codec: str = "libx264",
                crf: int = 0) -> None:
    """Writes uint8 `frames: [t, 3, H, W]` (RGB) as a video file (H and W even for yuv420p).

    crf=0 asks libx264 for lossless-quality encoding, so tests can compare what they read back.
    """
    av = _import_av()
    if frames.dim() != 4 or frames.shape[1] != 3 or frames.dtype != torch.uint8:
        raise ValueError("frames must be uint8 [t, 3, H, W], got %s %s"
                         % (frames.dtype, tuple(frames.shape)))
    t, _, h, w = frames.shape
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv444p" if codec == "libx264" and crf == 0 else "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "ultrafast"}
        for i in range(t):
            image = frames[i].permute(1, 2, 0).contiguous().numpy()
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_frame_folder(folder: str, frames: torch.Tensor, ext: str = ".png") -> List[str]:
    """Writes uint8 `frames: [t, 3, H, W]` as numbered images; returns their paths."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(frames.shape[0]):
        p = os.path.join(folder, "frame_%05d%s" % (i + 1, ext))
        Image.fromarray(frames[i].permute(1, 2, 0).contiguous().numpy()).save(p)
        paths.append(p)
    return paths

