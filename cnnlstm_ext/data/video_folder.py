"""VideoFolder: a labelled set of clips on disk, in one of two layouts.

Class-per-folder (`VideoFolder(root)`)::

    root/<class>/<clip>.mp4            (any of VIDEO_EXTENSIONS), or
    root/<class>/<clip>/frame_001.jpg  (a folder of frame images, natural order)

at any depth below the class folder (root/<class>/<session>/<clip>.mp4), as torchvision's
DatasetFolder and `cnnlstm-ext predict` search folders (video_io.find_clips), with an optional
split level (`root/train/<class>/...`, `root/val/<class>/...`; pass `split`).
Classes are the sorted sub-folder names unless `classes` fixes them (so that a validation split
uses the training split's label numbering).

WLASL-style annotations (`VideoFolder.from_wlasl(json_file, video_root, split)`): a JSON list of
`{"gloss": ..., "instances": [{"video_id", "split", "frame_start", "frame_end", ...}]}`; the class
index is the gloss's position in the file (so the first 100 glosses are WLASL100), frame_start is
1-based and inclusive, frame_end inclusive or -1 for the end. Videos are
`video_root/<video_id>.<ext>` (the extension in any case: .mp4, .MP4) or frame folders
`video_root/<video_id>/`; missing ones are skipped and counted in `missing` (public copies of WLASL
always lack some). A null frame_start or frame_end means 1 or -1; an instance without a video_id
refuses the file. A clip whose range holds no frame of its video is named in the JSON's terms
(gloss, video_id, 1-based frame numbers) when it is read.

Each item is `(clip [T, 3, S, S] float32, label, length)`: T frames sampled uniformly over the clip
(with temporal jitter when training), zero-padded with `length < T` for shorter clips, then the
ClipTransform (resize, crop, colour jitter, normalisation).

With `batch_augment=True` (what training uses) an item is instead
`(clip [T, C, C, 3] uint8, label, length, params [8])`: the sampled frames decoded straight to the
square canvas of side C the transform needs (batch_transforms.canvas_size), and the parameters of
the clip's augmentation, drawn from the same generator; BatchAugment applies them to the whole
batch on the training device. With a ClipCache (`cache=`) the frames come out of the cache
instead of the video files.
"""
import collections
import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
from torch.utils.data import Dataset

from .batch_transforms import canvas_size, draw_params
from .transforms import ClipTransform, pad_clip, sample_generator, sample_indices
from .video_io import (ClipReadError, display_wanted, find_clips, frame_count, is_image_file,
                       list_frame_images, read_frame_folder, read_video_frames, VIDEO_EXTENSIONS)


@dataclass(frozen=True)
class ClipRecord:
    """One clip: a video file or a frame folder, its label and frame range [start, end)."""
    path: str
    label: int
    start: int = 0
    end: Optional[int] = None  # exclusive; None: to the last frame
    # Where an annotation file lists the clip ("gloss 'book', video_id 00001 of WLASL.json"), for
    # error messages; not part of the clip's identity (cache keys, equality).
    annotation: Optional[str] = field(default=None, compare=False)


def scan_class_folders(root: str, classes: Optional[Sequence[str]] = None):
    """(records, classes) of a class-per-folder tree; see the module docstring."""
    if os.path.isfile(root):
        raise NotADirectoryError("%s is a file, not a data folder: expected a folder of class "
                                 "folders (one sub-folder per class: root/<class>/<clip>) or a "
                                 "WLASL .json annotation file" % root)
    if not os.path.isdir(root):
        raise FileNotFoundError("data folder not found: %s" % root)
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))
                   and not d.startswith("."))
    if classes is None:
        classes = found
        if not classes:
            raise ValueError("%s holds no class folders (expected root/<class>/<clip>)" % root)
    classes = list(classes)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(found) - set(index))
    if unknown:
        raise ValueError("%s has class folders that are not among the %d known classes: %s"
                         % (root, len(classes), unknown[:10]))
    records = []
    for c in found:  # a class's clips at any depth (root/<class>/<session>/<clip>.mp4 too)
        records += [ClipRecord(path, index[c]) for path in find_clips(os.path.join(root, c))]
    if not records:
        raise ValueError("no clips under %s (videos: %s, or folders of frame images)"
                         % (root, ", ".join(VIDEO_EXTENSIONS)))
    counts = collections.Counter(r.label for r in records)
    empty = [c for c in found if not counts[index[c]]]
    if empty:  # a class the model must output but never sees
        logging.getLogger("cnnlstm_ext.data").warning(
            "%s: %d class folder%s without clips: %s", root, len(empty),
            "s" if len(empty) > 1 else "", ", ".join(empty[:10]) + (", ..." if len(empty) > 10 else ""))
    return records, classes


def _video_files(folder: str) -> dict:
    """{name without extension: [file names]} of the video files in `folder`, whatever the case
    of their extension (a camera's 00004.MP4), each list in VIDEO_EXTENSIONS' order; listed once,
    not probed per extension for each of WLASL's many videos."""
    try:
        names = os.listdir(folder)
    except OSError:  # a missing folder holds no videos: they are counted as missing
        return {}
    found = collections.defaultdict(list)
    for name in names:
        stem, ext = os.path.splitext(name)
        if ext.lower() in VIDEO_EXTENSIONS:
            found[stem].append((VIDEO_EXTENSIONS.index(ext.lower()), ext != ext.lower(), name))
    return {stem: [name for *_, name in sorted(c)] for stem, c in found.items()}


def _find_video(video_root: str, video_id: str, listings: Optional[dict] = None) -> Optional[str]:
    """The video file or frame folder of `video_id` under `video_root` (None: not there);
    `listings` caches _video_files per folder between calls."""
    listings = {} if listings is None else listings
    folder, stem = os.path.split(os.path.join(video_root, video_id))
    if folder not in listings:
        listings[folder] = _video_files(folder)
    for name in listings[folder].get(stem, ()):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    # A folder named for the video_id and holding images is its frames (the name says it is one
    # video: nothing below it is searched, unlike video_io.is_frame_folder's folders of clips).
    p = os.path.join(video_root, video_id)
    if os.path.isdir(p) and any(is_image_file(n) for n in os.listdir(p)):
        return p
    return None


def read_json(path: str):
    """The value of a JSON file; one that does not parse is a ValueError naming the file. A UTF-8
    byte order mark (what Windows editors write) is accepted."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except UnicodeDecodeError as e:  # (a ValueError too: caught first)
        raise ValueError("%s is not UTF-8 text: %s" % (path, e)) from e
    except ValueError as e:  # json.JSONDecodeError: where the syntax breaks
        raise ValueError("%s is not valid JSON: %s" % (path, e)) from e


def read_wlasl_entries(json_file: str, max_classes: Optional[int] = None) -> list:
    """The gloss entries of a WLASL-style file (the first `max_classes`)."""
    entries = read_json(json_file)
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "gloss" in e for e in entries):
        raise ValueError("%s is not WLASL-style: expected a JSON list of {\"gloss\", \"instances\"}"
                         % json_file)
    return entries if max_classes is None else entries[:max_classes]


def _frame_number(inst: dict, key: str, default: int, where: str) -> int:
    value = inst.get(key)
    if value is None:  # absent or null: WLASL's default (frame_start 1, frame_end -1: to the end)
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError("%s: %s is %r; expected a frame number (1-based%s)"
                         % (where, key, value, ", -1 for the video's end" if default < 0 else "")
                         ) from None


def read_wlasl(json_file: str, video_root: str, split: Optional[str] = None,
               max_classes: Optional[int] = None):
    """(records, classes, missing) from WLASL-style annotations; see the module docstring."""
    entries = read_wlasl_entries(json_file, max_classes)
    classes = [str(e["gloss"]) for e in entries]
    records, missing, listings = [], [], {}
    for label, entry in enumerate(entries):
        for position, inst in enumerate(entry.get("instances") or [], 1):
            where = "%s: instance %d of gloss %r (counting from 1)" % (json_file, position,
                                                                       classes[label])
            # Checked whatever the split: the file is refused as a whole, by every command.
            if not isinstance(inst, dict) or inst.get("video_id") is None:
                raise ValueError("%s has no \"video_id\": expected {\"video_id\", \"split\", "
                                 "\"frame_start\", \"frame_end\", ...}" % where)
            if split is not None and inst.get("split") != split:
                continue
            video_id = str(inst["video_id"])
            frame_start = _frame_number(inst, "frame_start", 1, where)
            frame_end = _frame_number(inst, "frame_end", -1, where)
            path = _find_video(video_root, video_id, listings)
            if path is None:
                missing.append(video_id)
                continue
            start = max(frame_start - 1, 0)
            end = None if frame_end < 0 else frame_end  # 1-based inclusive == 0-based exclusive
            records.append(ClipRecord(path, label, start, end, annotation="gloss %r, video_id %s "
                                      "of %s" % (classes[label], video_id, json_file)))
    return records, classes, missing


def _frame_total(path: str) -> Optional[int]:
    """The frames of a video file or frame folder; None when it cannot be read."""
    if os.path.isdir(path):
        return len(list_frame_images(path))
    try:
        return frame_count(path)
    except (ClipReadError, OSError):
        return None


@contextlib.contextmanager
def annotated_errors(rec: ClipRecord):
    """Reading an annotated (WLASL) clip: a ClipReadError names its gloss and video_id, and a
    frame range without frames of the video is told in the file's numbers (1-based, inclusive:
    frame_start 61, not the reader's 0-based [60, 80))."""
    if rec.annotation is None:
        yield
        return
    if rec.end is not None and rec.end <= rec.start:  # known without opening the video
        raise ClipReadError("no frames for %s: its frame_end %d is before its frame_start %d"
                            % (rec.annotation, rec.end, rec.start + 1))
    try:
        yield
    except ClipReadError as e:
        total = _frame_total(rec.path) if rec.start > 0 else None
        if total is not None and total <= rec.start:
            raise ClipReadError("no frames for %s: its frame_start %d is past the end of %s (%d "
                                "frames)" % (rec.annotation, rec.start + 1, rec.path, total)) from e
        raise ClipReadError("%s (%s)" % (e, rec.annotation)) from e


class VideoFolder(Dataset):
    """Labelled clips from disk; see the module docstring.

    Args:
        root: the class-per-folder tree (with `split`: `root/<split>` when that folder exists).
        num_frames: T, frames per clip.
        transform: a ClipTransform (or any callable (clip uint8 [t,3,H,W], generator) -> float
            [t,3,S,S]); default: ClipTransform(train=train).
        split: a split sub-folder name (e.g. "train", "val"), or None.
        classes: the class names, in label order; default: the sorted folder names.
        train: temporal jitter and the transform's training augmentations.
        seed: with the epoch (set_epoch) and index, fixes every random choice of a sample.
        batch_augment: yield uint8 canvases and augmentation parameters (see the module
            docstring); needs a ClipTransform.
        cache: a ClipCache holding the clips (those it lacks are decoded from their files).
        orientation: how frames are turned, video_io.ORIENTATIONS ("display": as players show
            them; "stored": as the files store them).
    """

    def __init__(self, root: str, num_frames: int = 16, transform: Optional[Callable] = None,
                 split: Optional[str] = None, classes: Optional[Sequence[str]] = None,
                 train: bool = False, seed: int = 0, records: Optional[List[ClipRecord]] = None,
                 batch_augment: bool = False, cache=None, orientation: str = "display"):
        if num_frames < 1:
            raise ValueError("num_frames must be >= 1, got %d" % num_frames)
        if records is None:
            folder = root
            if split is not None and os.path.isdir(os.path.join(root, split)):
                folder = os.path.join(root, split)
            elif split is not None:
                raise FileNotFoundError("split folder %s not found" % os.path.join(root, split))
            records, classes = scan_class_folders(folder, classes)
        elif classes is None:
            raise ValueError("records need their class names (classes=...)")
        self.root = root
        self.records = list(records)
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.num_frames = num_frames
        self.train = train
        self.seed = seed
        self.transform = transform if transform is not None else ClipTransform(train=train)
        if batch_augment and not isinstance(self.transform, ClipTransform):
            raise ValueError("batch_augment needs a ClipTransform, got %r" % (self.transform,))
        self.batch_augment = batch_augment
        self.cache = cache
        display_wanted(orientation)  # a ValueError for another value, before any reading
        self.orientation = orientation
        self.missing: List[str] = []
        self.epoch = 0

    @classmethod
    def from_wlasl(cls, json_file: str, video_root: str, split: Optional[str] = None,
                   max_classes: Optional[int] = None, **kwargs) -> "VideoFolder":
        records, classes, missing = read_wlasl(json_file, video_root, split, max_classes)
        if not records:
            raise ValueError("no %sclips of %s found under %s (%d listed videos missing)"
                             % ("" if split is None else split + " ", json_file, video_root,
                                len(missing)))
        if missing:  # (public copies of WLASL lack some of its videos)
            logging.getLogger("cnnlstm_ext.data").warning(
                "%s: %d of the %slisted videos are not under %s and are left out: %s%s",
                json_file, len(missing), "" if split is None else split + " split's ",
                video_root, ", ".join(missing[:5]), ", ..." if len(missing) > 5 else "")
        ds = cls(video_root, records=records, classes=classes, **kwargs)
        ds.missing = missing
        return ds

    def set_epoch(self, epoch: int) -> None:
        """Temporal jitter and augmentations differ per epoch (and are fixed by it)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> List[int]:
        return [r.label for r in self.records]

    def load_frames(self, index: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The sampled frames of clip `index`, before the transform: uint8 `[t, 3, H, W]`, t <= T."""
        rec = self.records[index]

        def select(n):
            return sample_indices(n, self.num_frames, jitter=self.train, generator=generator).tolist()

        reader = read_frame_folder if os.path.isdir(rec.path) else read_video_frames
        with annotated_errors(rec):
            return reader(rec.path, rec.start, rec.end, select, orientation=self.orientation)

    @property
    def canvas(self) -> int:
        """The side of the uint8 canvas of batch_augment items."""
        return canvas_size(self.transform)

    def load_canvas(self, index: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The sampled frames of clip `index` on the square canvas: uint8 `[t, C, C, 3]`."""
        rec, side = self.records[index], self.canvas

        def select(n):
            return sample_indices(n, self.num_frames, jitter=self.train, generator=generator).tolist()

        if self.cache is not None and self.cache.entry(rec, self.orientation) is not None:
            frames = self.cache.read(rec, select)  # [t, c, c, 3] at the cache's short side
            if frames.shape[1] != side:  # a cache built at another size
                x = torch.nn.functional.interpolate(
                    frames.permute(0, 3, 1, 2).float(), size=(side, side), mode="bilinear",
                    align_corners=False, antialias=frames.shape[1] > side)
                frames = x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
            return frames
        reader = read_frame_folder if os.path.isdir(rec.path) else read_video_frames
        with annotated_errors(rec):
            return reader(rec.path, rec.start, rec.end, select, short_side=side, square=True,
                          channels_last=True, orientation=self.orientation)

    def __getitem__(self, index: int):
        g = sample_generator(self.seed, self.epoch, index)
        if self.batch_augment:
            frames = self.load_canvas(index, g)  # [t, C, C, 3] uint8
            params = draw_params(self.transform, frames.shape[1], frames.shape[2], g)  # [8]
            clip, length = pad_clip(frames, self.num_frames)  # [T, C, C, 3]
            return clip, self.records[index].label, length, params
        frames = self.load_frames(index, g)  # [t, 3, H, W] uint8
        clip = self.transform(frames, g)  # [t, 3, S, S] float32
        clip, length = pad_clip(clip, self.num_frames)
        return clip, self.records[index].label, length
