"""The frozen-backbone feature cache: per-frame backbone features computed once per clip.

With `model.freeze_backbone=true` the backbone is a fixed function of the frames, so without
augmentation (`data.augment=false`) every epoch runs it on the same frames to the same features.
`load_or_build_features` computes them once per split (`frame_features`: `[T, F]` per clip, 0 past
its length) and stores them in `<folder>/<split>.pt`; training then runs only the projection, LSTM,
pooling and classifier on them (`CNNLSTM.forward_features`), with the losses of frozen training
without the cache.

A split's file records a fingerprint of what made it (the backbone's weights, the frame pooling,
the clips' files with size and mtime, frames, size and normalisation, the frames' orientation): a different fingerprint
computes the features again. A truncated file or one of another format version is refused with a
CacheError (`data.cache_rebuild=true` computes it again). Files are written to a temporary name
and renamed.
"""
import hashlib
import json
import logging
import os
from typing import Callable, List, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from ..checkpoint.format import atomic_write
from .cache import CacheError
from .loader import LoaderDataset, collate_clips

log = logging.getLogger("cnnlstm_ext.data")

FEATURE_FORMAT = "cnnlstm-ext feature cache"
FEATURE_VERSION = 1


class FeatureDataset(Dataset):
    """Items `(features [T, F] float32, label, length)` of the clips whose features were computed;
    `records` and `classes` as the VideoFolder they came from."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor,
                 records, classes):
        self.features, self.labels_t, self.lengths = features, labels, lengths
        self.records, self.classes = list(records), list(classes)

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def labels(self) -> List[int]:
        return self.labels_t.tolist()

    def __getitem__(self, index: int):
        return self.features[index], int(self.labels_t[index]), int(self.lengths[index])


def fingerprint(model, dataset, data_cfg) -> str:
    """What the features of `dataset` depend on, hashed (see the module docstring)."""
    h = hashlib.sha256()
    for name, t in sorted(model.backbone.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    d = data_cfg
    # (data.orientation; files written before the reader turned frames hold the features of
    # portrait videos on their side, and a fingerprint without it.)
    h.update(json.dumps([model.config.get("frame_pool"), d.num_frames, d.frame_size, d.resize_to,
                         list(d.mean), list(d.std), d.batch_augment, d.orientation]).encode())
    for r in dataset.records:
        try:
            st = os.stat(r.path)
            stat = [st.st_size, st.st_mtime_ns]
        except OSError:
            stat = None
        h.update(json.dumps([os.path.abspath(r.path), r.start, r.end, r.label, stat]).encode())
    return h.hexdigest()


def _load(file: str) -> dict:
    try:
        doc = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, not a torch file
        raise CacheError("feature cache %s cannot be read (truncated or damaged: %s): compute it "
                         "again with --set data.cache_rebuild=true, or delete it"
                         % (file, " ".join(str(e).split())[:200])) from e
    if not isinstance(doc, dict) or doc.get("format") != FEATURE_FORMAT:
        raise CacheError("%s is not a feature cache file: compute it again with --set "
                         "data.cache_rebuild=true, or delete it" % file)
    if doc.get("version") != FEATURE_VERSION:
        raise CacheError("%s was written by version %s of the feature cache format; this is "
                         "version %d: compute it again with --set data.cache_rebuild=true"
                         % (file, doc.get("version"), FEATURE_VERSION))
    return doc


@torch.no_grad()
def compute_features(model, dataset, device: torch.device, prepare: Callable,
                     batch_size: int = 16, num_workers: int = 0, progress: bool = False):
    """(features [N, T, F] float32, valid [N] bool, lengths [N]) of every clip of `dataset` through the
    frozen `model.frame_features`; `prepare(batch) -> clips on device` makes a ClipBatch model
    input (the trainer's). Unreadable clips are skipped (valid False)."""
    n = len(dataset)
    # A generator of its own: iterating a loader without one draws from the global RNG, which
    # would shift the training's dropout draws against a run without the cache.
    loader = DataLoader(LoaderDataset(dataset), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=collate_clips,
                        generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    features, valid = None, torch.zeros(n, dtype=torch.bool)
    lengths = torch.ones(n, dtype=torch.int64)
    bar = loader
    if progress:
        try:
            from tqdm.auto import tqdm
            bar = tqdm(loader, desc="feature cache", unit="batch", dynamic_ncols=True, leave=False)
        except ImportError:
            pass
    for batch in bar:
        if batch.clips is None:
            continue
        clips = prepare(batch)
        feats = model.frame_features(clips, batch.lengths).float().cpu()   # [B, T, F]
        if features is None:
            features = torch.zeros((n,) + tuple(feats.shape[1:]), dtype=torch.float32)
        features[batch.indices] = feats
        valid[batch.indices] = True
        lengths[batch.indices] = batch.lengths
    model.train(was_training)
    if features is None:
        raise CacheError("no clip of the data set could be read: no features to cache")
    return features, valid, lengths


def load_or_build_features(folder: str, split: str, model, dataset, data_cfg,
                           device: torch.device, prepare: Callable, batch_size: int = 16,
                           num_workers: int = 0, rebuild: bool = False, build: bool = True,
                           progress: bool = False) -> Optional[FeatureDataset]:
    """The FeatureDataset of `dataset` from `folder/<split>.pt`, computed (and stored) first when
    the file is missing, stale or `rebuild`; with build=False returns None instead of computing
    (a rank waiting for rank 0)."""
    os.makedirs(folder, exist_ok=True)
    file = os.path.join(folder, split + ".pt")
    key = fingerprint(model, dataset, data_cfg)
    if os.path.exists(file) and not rebuild:
        doc = _load(file)
        if doc["fingerprint"] == key:
            return _dataset(doc, dataset)
        log.info("%s was computed for other weights or clips: computing the features again", file)
    if not build:
        return None
    features, valid, lengths = compute_features(model, dataset, device, prepare, batch_size,
                                                num_workers, progress)
    labels = torch.tensor([r.label for r in dataset.records], dtype=torch.int64)
    doc = {"format": FEATURE_FORMAT, "version": FEATURE_VERSION, "fingerprint": key,
           "features": features, "labels": labels, "valid": valid, "lengths": lengths}
    atomic_write(file, lambda f: torch.save(doc, f))
    return _dataset(_load(file), dataset)


def _dataset(doc: dict, dataset) -> FeatureDataset:
    if bool(doc["valid"].all()):  # the memory-mapped tensors as they are
        return FeatureDataset(doc["features"], doc["labels"], doc["lengths"], dataset.records,
                              dataset.classes)
    keep = doc["valid"].nonzero().squeeze(1)
    if len(keep) < len(doc["valid"]):
        skipped = [dataset.records[i].path for i in (~doc["valid"]).nonzero().squeeze(1).tolist()]
        log.warning("feature cache: %d unreadable clip(s) left out: %s", len(skipped),
                    ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else ""))
    records = [dataset.records[i] for i in keep.tolist()]
    return FeatureDataset(doc["features"][keep], doc["labels"][keep], doc["lengths"][keep],
                          records, dataset.classes)


__all__ = ["FeatureDataset", "load_or_build_features", "compute_features", "fingerprint"]
