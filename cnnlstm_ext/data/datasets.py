"""The training and validation sets a DataConfig (cnnlstm_ext.train.config) describes."""
import os
from typing import List, Sequence, Tuple

import torch

from .synthetic import SyntheticVideos
from .transforms import ClipTransform
from .video_folder import VideoFolder, scan_class_folders


def clip_transform(data_cfg, train: bool) -> ClipTransform:
    return ClipTransform(size=data_cfg.frame_size, resize_to=data_cfg.resize_to,
                         train=train and data_cfg.augment, crop_scale=tuple(data_cfg.crop_scale),
                         color_jitter=data_cfg.color_jitter, hflip=data_cfg.hflip,
                         mean=tuple(data_cfg.mean), std=tuple(data_cfg.std))


def _stratified_holdout(labels: Sequence[int], fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """(train indices, val indices): `fraction` of each class held out, chosen by `seed`."""
    g = torch.Generator().manual_seed(seed)
    by_class = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    train, val = [], []
    for y in sorted(by_class):
        idx = by_class[y]
        order = torch.randperm(len(idx), generator=g).tolist()
        n_val = int(round(len(idx) * fraction)) if len(idx) > 1 else 0
        val += [idx[j] for j in order[:n_val]]
        train += [idx[j] for j in order[n_val:]]
    return sorted(train), sorted(val)


def build_datasets(data_cfg, seed: int = 0, batch_augment: bool = False, cache=None):
    """(train_set, val_set, class_names) for `data_cfg` (a DataConfig).

    Video sets read with `batch_augment` yield uint8 canvases and augmentation parameters
    (VideoFolder), from the ClipCache `cache` where it holds the clip. Temporal jitter, like the
    spatial augmentations, follows data.augment.

    synthetic: SyntheticVideos, a fresh training draw every epoch, a fixed validation set.
    folder: root/<train_split> and root/<val_split> when both exist; otherwise root/<class>/...
        with `val_fraction` of each class held out (seeded).
    wlasl: the annotation file's `train_split` and `val_split` instances under root.
    """
    d = data_cfg
    if d.dataset == "synthetic":
        common = dict(num_classes=d.num_classes, num_frames=d.num_frames, frame_size=d.frame_size,
                      seed=seed, min_frames=d.min_frames, noise=d.noise)
        train = SyntheticVideos(d.train_samples, split="train", resample_each_epoch=True, **common)
        val = SyntheticVideos(d.val_samples, split="val", **common)
        return train, val, list(train.classes)
    video = dict(batch_augment=batch_augment, cache=cache, orientation=d.orientation)
    if d.dataset == "folder":
        train_dir, val_dir = os.path.join(d.root, d.train_split), os.path.join(d.root, d.val_split)
        if os.path.isdir(train_dir) and os.path.isdir(val_dir):
            train = VideoFolder(d.root, d.num_frames, clip_transform(d, True), split=d.train_split,
                                train=d.augment, seed=seed, **video)
            val = VideoFolder(d.root, d.num_frames, clip_transform(d, False), split=d.val_split,
                              classes=train.classes, seed=seed, **video)
            return train, val, list(train.classes)
        records, classes = scan_class_folders(d.root)
        train_idx, val_idx = _stratified_holdout([r.label for r in records], d.val_fraction, seed)
        if not val_idx:
            raise ValueError("%s: no validation clips (val_fraction=%s of %d clips); add %s/ and %s/ "
                             "split folders or raise data.val_fraction"
                             % (d.root, d.val_fraction, len(records), d.train_split, d.val_split))
        train = VideoFolder(d.root, d.num_frames, clip_transform(d, True), classes=classes,
                            records=[records[i] for i in train_idx], train=d.augment, seed=seed,
                            **video)
        val = VideoFolder(d.root, d.num_frames, clip_transform(d, False), classes=classes,
                          records=[records[i] for i in val_idx], seed=seed, **video)
        return train, val, list(classes)
    if d.dataset == "wlasl":
        train = VideoFolder.from_wlasl(d.annotations, d.root, split=d.train_split,
                                       max_classes=d.max_classes, num_frames=d.num_frames,
                                       transform=clip_transform(d, True), train=d.augment,
                                       seed=seed, **video)
        val = VideoFolder.from_wlasl(d.annotations, d.root, split=d.val_split,
                                     max_classes=d.max_classes, num_frames=d.num_frames,
                                     transform=clip_transform(d, False), seed=seed, **video)
        return train, val, list(train.classes)
    raise ValueError("unknown data.dataset %r (synthetic, folder or wlasl)" % d.dataset)


def build_eval_dataset(data_cfg, source: str, classes=None, seed: int = 0, split=None,
                       video_root=None):
    """The data set `cnnlstm-ext evaluate` reads, prepared as `data_cfg` says (frames, size,
    normalisation; no augmentation):

    "synthetic": the run's validation clips (`split`="test": clips never seen in training);
    a directory: class folders (`split`: a sub-folder), labels numbered as `classes`;
    a .json file: WLASL-style annotations, its `split` (default data_cfg.val_split), videos in
        `video_root` (default: the training config's data.root for a WLASL run, else videos/
        beside the file).
    """
    d = data_cfg
    if source == "synthetic":
        return SyntheticVideos(d.val_samples, num_classes=d.num_classes, num_frames=d.num_frames,
                               frame_size=d.frame_size, split=split or "val", seed=seed,
                               min_frames=d.min_frames, noise=d.noise)
    if os.path.isfile(source) and source.lower().endswith(".json"):
        if video_root is None:
            video_root = (d.root if d.root and d.dataset == "wlasl"
                          else os.path.join(os.path.dirname(os.path.abspath(source)), "videos"))
        return VideoFolder.from_wlasl(source, video_root, split=split or d.val_split,
                                      max_classes=d.max_classes, num_frames=d.num_frames,
                                      transform=clip_transform(d, False), seed=seed,
                                      orientation=d.orientation)
    if os.path.isdir(source):
        return VideoFolder(source, d.num_frames, clip_transform(d, False), split=split,
                           classes=classes, seed=seed, orientation=d.orientation)
    if not os.path.exists(source):
        raise FileNotFoundError("evaluation data not found: %s (give 'synthetic', a class-per-"
                                "folder directory or a WLASL JSON file)" % source)
    raise FileNotFoundError("evaluation data %r: expected 'synthetic', a class-per-folder directory "
                            "or a WLASL JSON file" % source)


__all__ = ["build_datasets", "build_eval_dataset", "clip_transform"]
