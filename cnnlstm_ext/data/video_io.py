"""Reading and writing clips: video files through PyAV, folders of frame images through Pillow.

PyAV (`pip install av`) is the decoder: its wheels carry their own FFmpeg, so it installs and runs
with pip alone on machines without system FFmpeg libraries, and it works with any torch version
(it hands back numpy frames, no torch ABI involved).

Frames come back as uint8 `[t, 3, H, W]` (RGB).
"""
import os
from typing import List, Optional

import numpy as np
import torch

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv")
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


def read_video_frames(path: str, start: int = 0, end: Optional[int] = None,
                      select=None) -> torch.Tensor:
    """Decodes frames `start <= i < end` (0-based, end=None: to the last frame) of a video file.

    `select(n) -> indices` may pick which of the n frames of that range to convert to RGB (the
    others are decoded but never converted, which is most of the cost saved). Returns uint8
    `[t, 3, H, W]`.
    """
    av = _import_av()
    if not os.path.isfile(path):
        raise FileNotFoundError("video file not found: %s" % path)
    try:
        container = av.open(path)
    except Exception as e:  # PyAV raises its own error types per FFmpeg error
        raise RuntimeError("could not open video %s: %s" % (path, e)) from e
    with container:
        if not container.streams.video:
            raise RuntimeError("%s has no video stream" % path)
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        kept = []
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i < start:
                    continue
                if end is not None and i >= end:
                    break
                kept.append(frame)
        except Exception as e:
            if not kept:
                raise RuntimeError("could not decode video %s: %s" % (path, e)) from e
            # A damaged tail: keep the frames decoded so far.
        if not kept:
            raise RuntimeError("no frames in %s for the range [%d, %s)" % (path, start, end))
        indices = range(len(kept)) if select is None else [int(i) for i in select(len(kept))]
        arrays = [kept[i].to_ndarray(format="rgb24") for i in indices]  # each [H, W, 3]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def read_frame_folder(folder: str, start: int = 0, end: Optional[int] = None,
                      select=None) -> torch.Tensor:
    """Reads the images of a frame folder (natural order); same contract as read_video_frames."""
    from PIL import Image

    files = list_frame_images(folder)[start:end]
    if not files:
        raise RuntimeError("no frame images (%s) in %s" % (", ".join(IMAGE_EXTENSIONS), folder))
    indices = range(len(files)) if select is None else [int(i) for i in select(len(files))]
    arrays = []
    for i in indices:
        with Image.open(files[i]) as im:
            arrays.append(np.asarray(im.convert("RGB")))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise RuntimeError("frames of %s differ in size: %s" % (folder, sorted(shapes)))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


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

