"""What the trainer's DataLoaders read: epochs passed with the indices, bad clips skipped, timing.

`EpochSampler` yields `(epoch, index)` keys, so that persistent workers (which keep their own
copy of the data set for the whole run) see each epoch's `set_epoch` without being restarted.
`LoaderDataset` reads a key: sets the epoch on its copy, times the read, and turns a clip that
cannot be read (a corrupt, empty or vanished video, an unreadable frame image) into a
`SkippedClip` with a warning naming the file, never an exception that ends the run.
`collate_clips` stacks the readable samples into a `ClipBatch` that says which were skipped and how
long the reads took (the loader's data rate).
"""
import logging
import os
import time
from typing import List, NamedTuple, Optional

import torch
from torch.utils.data import Dataset, Sampler

from .video_io import ClipReadError

log = logging.getLogger("cnnlstm_ext.data")


class SkippedClip(NamedTuple):
    """A sample that could not be read: the file and why."""
    path: str
    error: str
    seconds: float
    index: int


class ClipBatch(NamedTuple):
    """A batch of the trainer's loaders.

    clips: float `[B, T, 3, S, S]`, or uint8 `[B, T, H, W, 3]` with `params` `[B, 8]` (their
    augmentation, applied on the device by BatchAugment); None when every sample was skipped.
    """
    clips: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    lengths: Optional[torch.Tensor]
    params: Optional[torch.Tensor]
    skipped: List[str]  # the files of the skipped samples
    load_seconds: float  # the time the samples' reads took, summed
    indices: Optional[torch.Tensor] = None  # [B] the data set indices of the clips


def default_num_workers() -> int:
    """Loader workers for video files: the cores this process may run on, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def resolve_num_workers(data_cfg) -> int:
    """data.num_workers, or its default: default_num_workers() for video files, 0 for the
    synthetic set (a generated clip costs less than passing it between processes)."""
    if data_cfg.num_workers is not None:
        return int(data_cfg.num_workers)
    return 0 if data_cfg.dataset == "synthetic" else default_num_workers()


class EpochSampler(Sampler):
    """Wraps a sampler (e.g. DistributedSampler); yields `(epoch, index)` keys."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, int(i)) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class LoaderDataset(Dataset):
    """`dataset` read by `(epoch, index)` keys (or plain indices); see the module docstring."""

    def __init__(self, dataset):
        self.dataset = dataset
        self._warned = set()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (None, key)
        ds = self.dataset
        if epoch is not None and hasattr(ds, "set_epoch") and getattr(ds, "epoch", None) != epoch:
            ds.set_epoch(epoch)
        start = time.perf_counter()
        try:
            sample = ds[index]
        except (ClipReadError, FileNotFoundError) as e:
            records = getattr(ds, "records", None)
            path = records[index].path if records is not None else "sample %d" % index
            if path not in self._warned:  # once per file and process, not every epoch
                self._warned.add(path)
                log.warning("skipping unreadable clip %s: %s", path, " ".join(str(e).split()))
            return SkippedClip(path, str(e), time.perf_counter() - start, index)
        return sample, time.perf_counter() - start, index


def collate_clips(items) -> ClipBatch:
    """Stacks LoaderDataset items into a ClipBatch (skipped samples left out)."""
    good = [s for s in items if not isinstance(s, SkippedClip)]
    skipped = [s.path for s in items if isinstance(s, SkippedClip)]
    seconds = sum(s.seconds if isinstance(s, SkippedClip) else s[1] for s in items)
    if not good:
        return ClipBatch(None, None, None, None, skipped, seconds)
    samples = [s[0] for s in good]
    clips = torch.stack([s[0] for s in samples])
    labels = torch.tensor([int(s[1]) for s in samples], dtype=torch.int64)
    lengths = torch.tensor([int(s[2]) for s in samples], dtype=torch.int64)
    params = torch.stack([s[3] for s in samples]) if len(samples[0]) > 3 else None
    indices = torch.tensor([s[2] for s in good], dtype=torch.int64)
    return ClipBatch(clips, labels, lengths, params, skipped, seconds, indices)


__all__ = ["ClipBatch", "SkippedClip", "EpochSampler", "LoaderDataset", "collate_clips",
           "default_num_workers", "resolve_num_workers"]
