"""The Trainer: epochs of AdamW + cosine schedule with the guards the original run lacked.

    trainer = Trainer(Config())          # the built-in synthetic job
    result = trainer.fit()               # -> dict: run_dir, best_epoch, best_val_acc, ...

Per epoch: train (mixed precision on GPUs, gradient clipping, NaN/Inf guard), validate
(loss, accuracy, macro-F1, top-5), step the schedule, early stopping, checkpoints
(`latest_checkpoint.pth` every epoch, `best_checkpoint.pth` on improvement,
`checkpoint_epoch_NNNN.pth` every `checkpoint_every` epochs), history CSV and TensorBoard.
At the end: the best weights are evaluated once more (per-class accuracy, confusion matrix) and
the summary report with its plots is written.

Run folder (`<output_dir>/<run_name>/`)::

    config.json            the resolved configuration (a valid --config)
    train.log              the log of the run
    history.csv            one row per epoch
    tensorboard/           TensorBoard event files
    checkpoints/           checkpoint_epoch_NNNN.pth, best_checkpoint.pth, latest_checkpoint.pth
    final_metrics.json     the best checkpoint's validation metrics, per class, confusion matrix
    confusion_matrix.csv, per_class_accuracy.csv, confusion_matrix.png
    summary/               summary.md, loss.png, accuracy.png, lr.png, summary.json

Reproducibility: the data order is a function of (seed, epoch) and every sample of
(seed, epoch, index); checkpoints carry the RNG states, so on the CPU a run stopped after any
epoch and resumed with `resume()` ends with exactly the weights of the uninterrupted run.
"""
import copy
import csv
import functools
import json
import logging
import math
import os
import random
import shutil
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..checkpoint import (atomic_write, load_checkpoint, normalize_checkpoint, read_checkpoint,
                          remove_stale_temp_files, save_checkpoint)
from .config import Config, check_output_dir, save_config, validate
from .distributed import DistContext, ShardSampler, data_parallel
from .guards import (EarlyStopping, NonFiniteGuard, RollbackRequired, nonfinite_tensors,
                     optimizer_tensors)
from .metrics import ClassificationMeter

log = logging.getLogger("cnnlstm_ext.train")
_package_log = logging.getLogger("cnnlstm_ext")

HISTORY_KEYS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_f1", "val_top5",
                "lr", "epoch_time", "clips_per_s", "skipped_steps", "data_clips_per_s",
                "step_clips_per_s", "skipped_clips")
CHECKPOINT_DIR = "checkpoints"
LATEST, BEST = "latest_checkpoint.pth", "best_checkpoint.pth"


def epoch_checkpoint_name(epoch: int) -> str:
    return "checkpoint_epoch_%04d.pth" % epoch


def resolve_device(name: str, ctx: DistContext) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=%s but no CUDA GPU is visible" % name)
        if ctx.enabled or device.index is None:
            device = torch.device("cuda", ctx.local_rank if ctx.enabled else torch.cuda.current_device())
    return device


def resolve_precision(name: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for plain fp32."""
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    # auto: bf16 autocast on GPUs that support it, fp32 on the CPU (where bf16 is rarely faster)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def rng_state(device: torch.device) -> Dict[str, Any]:
    """Every RNG a training step may draw from (plain types and tensors only)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": list(np.random.get_state())}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
        np.random.set_state((kind, keys.astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(torch.as_tensor(state["cuda"], dtype=torch.uint8), device)


def _use_implementation(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    """Runs `optimizer` (Adam or AdamW) fused or with torch's default implementation, whatever
    the state it loaded was saved from (a loaded param group brings its own flags; the trainer
    sets neither capturable nor differentiable). Each `step` count goes where that
    implementation keeps it: the fused kernel reads it as float32 on the parameter's device, the
    default one on the CPU."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = (True if fused else None), None
        group["capturable"] = group["differentiable"] = False
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=p.device if fused else "cpu",
                                                  dtype=torch.float32)


def _cpu_copy(obj):
    """A deep copy with every tensor cloned to the CPU (for in-memory rollback snapshots)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, _cpu_copy(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


def forward_lengths(lengths: torch.Tensor, num_frames: int) -> Optional[torch.Tensor]:
    """`lengths` when some clip is shorter than the batch's T, else None (the faster full path)."""
    return lengths if bool((lengths < num_frames).any()) else None


@torch.no_grad()
def evaluate_model(model: nn.Module, loader, device: torch.device, num_classes: int,
                   amp_dtype: Optional[torch.dtype] = None, criterion: Optional[nn.Module] = None,
                   ctx: Optional[DistContext] = None, collect_predictions: bool = False,
                   progress: bool = False, desc: str = "val", prepare=None):
    """Runs `model` over `loader`; returns (metrics dict, predictions or None).

    Batches are `(clips, labels, lengths)` or ClipBatch (cnnlstm_ext.data.loader; skipped clips
    are counted in a warning); `prepare(batch) -> model input on device` makes the clips of a
    ClipBatch (default: the clips as they are, moved to `device`).

    metrics: see ClassificationMeter.compute (summed over processes when `ctx` is distributed).
    predictions (collect_predictions, single process): one dict per sample in loader order with
    label, prediction, confidence and the top-k classes.
    """
    ctx = ctx or DistContext()
    criterion = criterion or nn.CrossEntropyLoss()
    meter = ClassificationMeter(num_classes, device=device)
    predictions = [] if collect_predictions else None
    was_training = model.training
    model.eval()
    bar = _progress(loader, progress and ctx.is_main, desc)
    skipped = 0
    for batch in bar:
        clips, labels, lengths, n_skipped = _unpack(batch, device, prepare)
        skipped += n_skipped
        if clips is None:
            continue
        lens = forward_lengths(lengths, clips.shape[1])
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(clips, lens)  # lengths stay on the CPU, where the model reads them
        logits = logits.float()
        loss_sum = nn.functional.cross_entropy(
            logits, labels, reduction="sum",
            label_smoothing=getattr(criterion, "label_smoothing", 0.0))
        meter.update(logits, labels, loss_sum)
        if predictions is not None:
            probs = logits.softmax(1)
            conf, pred = probs.max(1)
            top = probs.topk(min(5, num_classes), dim=1).indices
            for i in range(labels.shape[0]):
                predictions.append({"label": int(labels[i]), "prediction": int(pred[i]),
                                    "confidence": float(conf[i]), "topk": top[i].tolist()})
    if bar is not loader:
        bar.close()
    if skipped:
        log.warning("%s: %d unreadable clip(s) skipped", desc, skipped)
    if ctx.enabled:
        meter.all_reduce()
    model.train(was_training)
    return meter.compute(), predictions


def _unpack(batch, device: torch.device, prepare=None):
    """(clips on device, labels on device, lengths on the CPU, skipped count) of a batch; clips
    None when every clip of a ClipBatch was skipped."""
    from ..data.loader import ClipBatch

    if isinstance(batch, ClipBatch):
        if batch.clips is None:
            return None, None, None, len(batch.skipped)
        clips = prepare(batch) if prepare is not None else batch.clips.to(device, non_blocking=True)
        return (clips, batch.labels.to(device, non_blocking=True), batch.lengths,
                len(batch.skipped))
    clips, labels, lengths = batch[:3]
    return clips.to(device, non_blocking=True), labels.to(device, non_blocking=True), lengths, 0


class _FeatureHead(nn.Module):
    """The model after its frozen backbone: what trains on a feature cache."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, features, lengths=None):
        return self.model.forward_features(features, lengths)


def _progress(iterable, enabled: bool, desc: str, **kwargs):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are optional
        return iterable
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, **kwargs)


class StopRequested(Exception):
    """Raised by `fit` at a step boundary once `request_stop` was called (e.g. on SIGTERM): the
    current epoch is abandoned; latest_checkpoint.pth keeps the last completed one."""

    def __init__(self, reason: str, epoch: int):
        super().__init__("%s: stopped after epoch %d" % (reason, epoch))
        self.reason, self.epoch = reason, epoch


class Trainer:
    """Trains a CNNLSTM on the data sets a Config describes; see the module docstring.

    Args:
        config: the resolved Config (cnnlstm_ext.train.config); validated here.
        model: a ready nn.Module to train instead of CNNLSTM(**config.model) (tests, custom models).
        datasets: (train_set, val_set, class_names) instead of the ones config.data describes.
        ctx: the DistContext of a torchrun launch (default: a single process).
        resuming: the weights will come from a checkpoint (`resume`): model.backbone_weights,
            the file a new run's backbone starts from, is not read (it may be gone).
    """

    def __init__(self, config: Config, model: Optional[nn.Module] = None, datasets=None,
                 ctx: Optional[DistContext] = None, resuming: bool = False):
        self.cfg = validate(config)
        self.ctx = ctx or DistContext()
        t = self.cfg.train
        self.device = resolve_device(t.device, self.ctx)
        self.amp_dtype = resolve_precision(t.precision, self.device)
        self.run_dir = self.cfg.run_dir
        self.ckpt_dir = os.path.join(self.run_dir, CHECKPOINT_DIR)
        if t.batch_size % self.ctx.world_size:
            raise ValueError("train.batch_size=%d (the global batch) must divide evenly over %d "
                             "processes" % (t.batch_size, self.ctx.world_size))
        if self.ctx.is_main:  # before the data and the model: a run fails at once, not after
            check_output_dir(self.ckpt_dir, "run folder")

        if datasets is None:
            from ..data.datasets import build_datasets
            datasets = build_datasets(self.cfg.data, seed=t.seed,
                                      batch_augment=self.cfg.data.batch_augment)
            if self.cfg.data.cache:
                self._open_clip_cache(datasets[:2])
        self.train_set, self.val_set, self.classes = datasets
        self.classes = list(self.classes)
        if len(self.classes) < 2:
            raise ValueError("the data set has %d class%s (%s): a classifier needs at least 2 "
                             "(with one, every prediction is right and nothing is learnt)"
                             % (len(self.classes), "" if len(self.classes) == 1 else "es",
                                ", ".join(self.classes) or "none"))
        num_classes = self.cfg.model.get("num_classes")
        if num_classes is None:
            self.cfg.model["num_classes"] = len(self.classes)
        elif int(num_classes) != len(self.classes):
            raise ValueError("model.num_classes=%d but the data set has %d classes (%s...); leave "
                             "model.num_classes unset to take it from the data"
                             % (num_classes, len(self.classes), ", ".join(self.classes[:5])))
        self.num_classes = len(self.classes)

        torch.manual_seed(t.seed)  # the initial weights are a function of the seed
        if model is None:
            from ..models import CNNLSTM, weights_config
            model = CNNLSTM(**(weights_config(self.cfg.model) if resuming else self.cfg.model))
        self.model = model.to(self.device)
        if t.channels_last if t.channels_last is not None else self.device.type == "cuda":
            # NHWC convolutions run on tensor cores without layout transposes; the first
            # convolution converts the frames, and the fused frame pooling reads NHWC maps.
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = t.cudnn_benchmark
        if self.ctx.enabled and t.sync_batchnorm and self.device.type == "cuda":
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        # On a feature cache the steps run the model after its frozen backbone.
        head = self.model
        if self.cfg.data.feature_cache:
            self._use_feature_cache()
            head = _FeatureHead(self.model)
        self.net = head  # what the training step calls (DDP / compiled wrappers)
        if self.ctx.enabled:
            self.net = data_parallel(head)
        # Evaluation runs the model without DDP: its forward would broadcast buffers, a
        # collective that processes with unequal numbers of validation batches cannot match.
        self._eval_net = head
        if t.compile:
            self.net = torch.compile(self.net)
            self._eval_net = torch.compile(self._eval_net)

        o = self.cfg.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer_cls = torch.optim.AdamW if o.optimizer.lower() == "adamw" else torch.optim.Adam
        self.optimizer = optimizer_cls(params, lr=o.lr, weight_decay=o.weight_decay,
                                       betas=tuple(o.betas), fused=bool(o.fused) or None)
        # A loaded state brings the implementation it was saved from (a file written without
        # fused, a rollback snapshot): the configured one stays.
        self.optimizer.register_load_state_dict_post_hook(
            functools.partial(_use_implementation, fused=bool(o.fused)))
        self.scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=t.epochs, eta_min=o.min_lr) if o.scheduler == "cosine" else None)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)

        self.guard = NonFiniteGuard(t.max_bad_steps, t.rollback_lr_factor, t.max_rollbacks)
        self.early = EarlyStopping(t.monitor, t.patience, t.min_delta)
        self.history: Dict[str, List] = {k: [] for k in HISTORY_KEYS}
        self.epoch = 0  # epochs completed
        self.saved_epoch: Optional[int] = None  # the epoch latest_checkpoint.pth holds
        self.stop_reason: Optional[str] = None  # set by request_stop (a signal handler)
        self.lr_scale = 1.0  # product of the rollback learning-rate cuts
        self.best_metrics: Dict[str, Any] = {}
        self._best_weights = None
        self._val_split_record = None  # _val_split(), computed at the first save
        self._good = None
        self._writer = None
        self._log_handler = None
        self._build_loaders()

    # --- data ---------------------------------------------------------------------------------

    def _build_loaders(self) -> None:
        from ..data.batch_transforms import BatchAugment
        from ..data.loader import EpochSampler, LoaderDataset, collate_clips, resolve_num_workers

        t, d = self.cfg.train, self.cfg.data
        per_process = t.batch_size // self.ctx.world_size
        cuda = self.device.type == "cuda"
        pin = d.pin_memory if d.pin_memory is not None else cuda
        self.num_workers = 0 if d.feature_cache else resolve_num_workers(d)
        # DistributedSampler also serves the single process: its order is a function of
        # (seed, epoch) only, which is what makes a resumed run see the same batches.
        self.train_sampler = DistributedSampler(self.train_set, num_replicas=self.ctx.world_size,
                                                rank=self.ctx.rank, shuffle=True, seed=t.seed)
        # The epoch travels with each index, so persistent workers see every set_epoch.
        self._epoch_samplers = [EpochSampler(self.train_sampler),
                                EpochSampler(ShardSampler(len(self.val_set), self.ctx.rank,
                                                          self.ctx.world_size))]
        self._loader_generator = torch.Generator()
        common = dict(num_workers=self.num_workers, pin_memory=pin, collate_fn=collate_clips,
                      persistent_workers=self.num_workers > 0)
        if self.num_workers > 0 and cuda:
            common["prefetch_factor"] = 4  # batches in flight per worker: the GPU never waits
        self.train_loader = DataLoader(LoaderDataset(self.train_set), batch_size=per_process,
                                       sampler=self._epoch_samplers[0],
                                       generator=self._loader_generator, **common)
        self.val_loader = DataLoader(LoaderDataset(self.val_set), batch_size=per_process,
                                     sampler=self._epoch_samplers[1], **common)
        # uint8 clips with their drawn augmentation: applied batched on the training device
        self._prepare = {}
        for name, ds in (("train", self.train_set), ("val", self.val_set)):
            if getattr(ds, "batch_augment", False):
                self._prepare[name] = self._augmenter(BatchAugment(ds.transform))

    def _augmenter(self, augment):
        device = self.device

        def prepare(batch):
            clips = batch.clips.to(device, non_blocking=True)  # [B, T, H, W, 3] uint8
            return augment(clips, batch.params)                # [B, T, 3, S, S] float32
        return prepare

    def _open_clip_cache(self, sets) -> None:
        """Builds (or updates) data.cache for the clips of `sets`, every rank decoding its share,
        then has the sets read from it."""
        from ..data.batch_transforms import canvas_size
        from ..data.cache import ClipCache, build_cache

        d = self.cfg.data
        videos = [ds for ds in sets if hasattr(ds, "records")]
        if not videos:
            return
        side = d.cache_short_side or canvas_size(videos[0].transform)
        records = [r for ds in videos for r in ds.records]
        summary = build_cache(d.cache, records, side, rebuild=d.cache_rebuild, rank=self.ctx.rank,
                              world_size=self.ctx.world_size,
                              progress=self.cfg.train.progress and self.ctx.is_main,
                              orientation=d.orientation)
        self.ctx.barrier()  # every rank's share is in before anyone reads
        cache = ClipCache(d.cache)
        if self.ctx.is_main:
            log.info("clip cache %s: %d clips at short side %d (%d decoded now, %d unreadable)",
                     d.cache, summary["entries"], cache.short_side, summary["built"],
                     cache.unreadable(records))
        for ds in videos:
            ds.cache = cache

    def _use_feature_cache(self) -> None:
        """Replaces the data sets by their frozen-backbone features (data.feature_cache), which
        rank 0 computes (or finds) while the others wait."""
        from ..data.batch_transforms import BatchAugment
        from ..data.feature_cache import load_or_build_features
        from ..data.loader import resolve_num_workers

        d = self.cfg.data
        if not getattr(self.model, "freeze_backbone", False) or not hasattr(self.model, "frame_features"):
            raise ValueError("data.feature_cache needs a CNNLSTM with model.freeze_backbone=true")
        out = []
        for split, ds in (("train", self.train_set), ("val", self.val_set)):
            if not hasattr(ds, "records"):
                raise ValueError("data.feature_cache needs a data set of video files")
            prepare = (self._augmenter(BatchAugment(ds.transform)) if ds.batch_augment
                       else (lambda b: b.clips.to(self.device)))
            kwargs = dict(batch_size=max(1, self.cfg.train.batch_size // self.ctx.world_size),
                          num_workers=resolve_num_workers(d), rebuild=d.cache_rebuild,
                          progress=self.cfg.train.progress)
            feats = None
            if self.ctx.is_main:
                feats = load_or_build_features(d.feature_cache, split, self.model, ds, d,
                                               self.device, prepare, **kwargs)
            self.ctx.barrier()
            if feats is None:
                feats = load_or_build_features(d.feature_cache, split, self.model, ds, d,
                                               self.device, prepare, build=False, **kwargs)
                if feats is None:
                    raise RuntimeError("rank %d: the feature cache %s that rank 0 wrote does not "
                                       "fit this rank's model or clips" % (self.ctx.rank,
                                                                           d.feature_cache))
            out.append(feats)
        self.train_set, self.val_set = out
        if self.ctx.is_main:
            log.info("feature cache %s: %d train / %d val clips of %s features", d.feature_cache,
                     len(out[0]), len(out[1]), "x".join(map(str, out[0].features.shape[1:])))

    def _set_epoch(self, epoch: int) -> None:
        for sampler in self._epoch_samplers:
            sampler.set_epoch(epoch)  # the train one sets the DistributedSampler's epoch too
        self._loader_generator.manual_seed(self.cfg.train.seed * 100003 + epoch)
        for ds in (self.train_set, self.val_set):
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(epoch)

    # --- resume -------------------------------------------------------------------------------

    def resume(self, path: str, key_map=None, optim_changes=None, check_integrity=True) -> int:
        """Continues from a checkpoint, ours or a legacy one; returns the epoch it continues after.

        Model weights must fit (key_map renames a legacy file's keys); optimizer and scheduler
        states are loaded when the file has them (a legacy file without them restarts AdamW's
        moments, with a warning). Our files also restore the RNG states, early stopping and the
        guard, for an exact continuation. The file's checksum record is checked unless
        check_integrity=False (a caller that has checked it already).

        Optimizer hyper-parameters (optim.lr, weight_decay, betas, min_lr) that the config sets
        differently from the file's own config are applied to the restored optimizer and
        schedule (the cosine re-based on the new lr, placed at the epoch resumed), with a
        warning; the config then records what runs. A file without a config of ours: the fields
        named in `optim_changes` are applied, the others are taken from the restored optimizer
        into the config.
        """
        # Temp files that saves interrupted by a crash left beside the file (never one being
        # written: remove_stale_temp_files keeps those).
        remove_stale_temp_files(os.path.dirname(os.path.abspath(path)))
        peek = normalize_checkpoint(read_checkpoint(path, mmap=True, check_integrity=False))
        has_opt = peek.get("optimizer_state_dict") is not None
        has_sched = peek.get("scheduler_state_dict") is not None and self.scheduler is not None
        del peek
        ckpt = load_checkpoint(path, model=self.model, optimizer=self.optimizer if has_opt else None,
                               scheduler=self.scheduler if has_sched else None, key_map=key_map,
                               map_location="cpu", check_integrity=check_integrity)
        if not has_opt:
            log.warning("%s holds no optimizer state: AdamW starts with fresh moments", path)
        epoch = int(ckpt.get("epoch") or 0)
        if self.scheduler is not None and not has_sched:
            self._place_schedule(epoch)
            log.warning("%s holds no scheduler state: the cosine schedule is placed at epoch %d "
                        "of %d", path, epoch, self.cfg.train.epochs)
        elif self.scheduler is not None and self.scheduler.T_max != self.cfg.train.epochs:
            log.warning("%s planned %d epochs: the cosine schedule now spans train.epochs=%d",
                        path, self.scheduler.T_max, self.cfg.train.epochs)
            self.scheduler.T_max = self.cfg.train.epochs
            self._place_schedule(epoch)
        self.epoch = epoch
        self.history = _history_from(ckpt.get("history"), epoch)
        state = ckpt.get("trainer_state")
        if isinstance(state, dict):
            self.early.load_state_dict(state.get("early_stopping", {}))
            self.guard.load_state_dict(state.get("guard", {}))
            self.lr_scale = float(state.get("lr_scale", 1.0))
            if "rng" in state:
                set_rng_state(state["rng"], self.device)
        else:  # a legacy file: take its best so far, so that patience counts from its best epoch
            best, best_epoch = _as_fraction(ckpt.get("best_val_acc")), ckpt.get("best_epoch")
            if self.early.monitor == "val_acc" and best is not None and best_epoch is not None:
                self.early.best, self.early.best_epoch = best, int(best_epoch)
                self.early.bad_epochs = max(0, epoch - int(best_epoch))
        if has_opt:
            self._apply_optim_config(path, ckpt, epoch, optim_changes)
        self.best_metrics = {"best_val_acc": _as_fraction(ckpt.get("best_val_acc")),
                             "best_val_f1": ckpt.get("best_val_f1"),
                             "best_epoch": ckpt.get("best_epoch")}
        weights = self._find_best_weights(path, ckpt, key_map)
        self._best_weights = None if weights is None else (self.best_metrics["best_epoch"], weights)
        log.info("resumed from %s after epoch %d (best %s at epoch %s)", path, epoch,
                 _fmt(self.best_metrics["best_val_acc"]), self.best_metrics["best_epoch"])
        return epoch

    def _apply_optim_config(self, path: str, ckpt: Dict[str, Any], epoch: int,
                            optim_changes=None) -> None:
        """See resume: the config's optimizer hyper-parameters onto the restored optimizer."""
        o, groups = self.cfg.optim, self.optimizer.param_groups
        scale = self.lr_scale or 1.0
        restored = {"lr": float(groups[0].get("initial_lr", groups[0]["lr"])) / scale,
                    "weight_decay": float(groups[0]["weight_decay"]),
                    "betas": tuple(float(b) for b in groups[0]["betas"]),
                    "min_lr": float(self.scheduler.eta_min) if self.scheduler is not None else o.min_lr}
        saved = ckpt.get("config")
        saved = saved.get("optim") if isinstance(saved, dict) else None
        current = {k: (tuple(float(b) for b in getattr(o, k)) if k == "betas" else float(getattr(o, k)))
                   for k in restored}
        if isinstance(saved, dict):
            before = {k: (tuple(float(b) for b in saved[k]) if k == "betas" else float(saved[k]))
                      for k in restored if k in saved}
            changed = [k for k in restored if k in before and current[k] != before[k]]
        else:  # not our file: what it ran is what its optimizer holds
            before = restored
            changed = [k for k in restored if k in set(optim_changes or ())
                       and current[k] != restored[k]]
            for k in restored:
                if k not in changed:
                    setattr(o, k, restored[k])
        if not changed:
            return
        for g in groups:
            if "lr" in changed:
                g["lr"] = o.lr * scale
                if "initial_lr" in g:
                    g["initial_lr"] = o.lr * scale
            if "weight_decay" in changed:
                g["weight_decay"] = o.weight_decay
            if "betas" in changed:
                g["betas"] = tuple(o.betas)
        if self.scheduler is not None:
            if "lr" in changed:
                self.scheduler.base_lrs = [o.lr * scale for _ in groups]
            if "min_lr" in changed:
                self.scheduler.eta_min = o.min_lr
            if "lr" in changed or "min_lr" in changed:
                self._place_schedule(epoch)
        log.warning("%s ran with %s; resumed with %s: applied to the restored optimizer%s", path,
                    ", ".join("optim.%s=%s" % (k, _plain_value(before[k])) for k in changed),
                    ", ".join("optim.%s=%s" % (k, _plain_value(current[k])) for k in changed),
                    " (learning rate now %.3g)" % groups[0]["lr"] if "lr" in changed
                    or "min_lr" in changed else "")

    def _place_schedule(self, epoch: int) -> None:
        """Sets the cosine schedule (and each group's lr) to where it is after `epoch` epochs."""
        sched = self.scheduler
        sched.last_epoch = epoch
        progress = min(epoch, sched.T_max) / sched.T_max
        for group, base in zip(self.optimizer.param_groups, sched.base_lrs):
            group["lr"] = sched.eta_min + (base - sched.eta_min) * (1 + math.cos(math.pi * progress)) / 2
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def _find_best_weights(self, path: str, ckpt: Dict[str, Any], key_map):
        """The best epoch's weights for the final evaluation: this file's when it is the best
        epoch, else those of best_checkpoint.pth beside it (None when neither is known)."""
        if ckpt.get("best_epoch") is not None and ckpt.get("best_epoch") == ckpt.get("epoch"):
            return _cpu_copy(self.model.state_dict())
        best_path = os.path.join(os.path.dirname(os.path.abspath(path)), BEST)
        if os.path.isfile(best_path) and os.path.abspath(path) != best_path:
            best = normalize_checkpoint(read_checkpoint(best_path))
            if best.get("epoch") == ckpt.get("best_epoch"):
                from ..checkpoint import apply_key_map
                return _cpu_copy(apply_key_map(best["model_state_dict"], key_map))
        return None

    # --- the run ------------------------------------------------------------------------------

    def request_stop(self, reason: str = "stop requested") -> None:
        """Asks a running `fit` to stop at the next step boundary (safe from a signal handler: it
        only sets a flag). The step under way finishes or is abandoned, never half-applied; the
        epoch under way is abandoned, and fit raises StopRequested. latest_checkpoint.pth, written
        atomically at the end of every epoch, then holds the last completed epoch."""
        self.stop_reason = reason

    def _check_stop(self) -> None:
        if self._on_any_process(self.stop_reason is not None):
            reason = self.stop_reason or "stop requested on another process"
            log.warning("%s: stopping; the epoch under way is abandoned, %s", reason,
                        "latest_checkpoint.pth holds epoch %d" % self.saved_epoch
                        if self.saved_epoch is not None
                        else "no epoch ended since it started (latest_checkpoint.pth, if "
                             "any, is unchanged)")
            raise StopRequested(reason, self.epoch)

    def fit(self, stop_at_epoch: Optional[int] = None) -> Dict[str, Any]:
        """Trains until train.epochs, early stopping, or divergence; returns a summary dict.

        stop_at_epoch: end this call after that epoch (the schedule still spans train.epochs),
        as if the run were interrupted there; `resume` continues it. The final evaluation and
        report are written only when the run really ends; then the model holds the best weights
        (those final_metrics.json describes), not the last ones.
        """
        t = self.cfg.train
        self._open_run_dir()
        self._good = self._snapshot()
        if self._best_weights is None:  # until an epoch improves: the weights we start from
            self._best_weights = (self.epoch, _cpu_copy(self.model.state_dict()))
        stop_reason, last = None, min(t.epochs, stop_at_epoch or t.epochs)
        validated = False  # whether a validation pass ran in this call
        log.info("training %s: %d parameters, %d train / %d val clips, %d classes, device %s%s, "
                 "%d process(es), epochs %d..%d", self.cfg.train.run_name,
                 sum(p.numel() for p in self.model.parameters()), len(self.train_set),
                 len(self.val_set), self.num_classes, self.device,
                 " (%s autocast)" % str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "",
                 self.ctx.world_size, self.epoch + 1, last)
        try:
            while self.epoch < last:
                self._check_stop()
                epoch = self.epoch + 1
                try:
                    train_stats = self._train_epoch(epoch)
                    bad = self._nonfinite_state()
                    if self._on_any_process(bool(bad)):
                        raise RollbackRequired("non-finite weights or optimizer state after epoch "
                                               "%d: %s" % (epoch, ", ".join(bad[:5]) or "on another process"))
                except RollbackRequired as e:
                    if not self._rollback(str(e)):
                        stop_reason = "diverged"
                        break
                    continue
                val = None
                if epoch % max(1, t.eval_every) == 0 or epoch == t.epochs:
                    val, _ = evaluate_model(self._eval_net, self.val_loader, self.device, self.num_classes,
                                            self.amp_dtype, self.criterion, self.ctx,
                                            progress=t.progress, desc="epoch %d val" % epoch,
                                            prepare=self._prepare.get("val"))
                    validated = True
                    if not val["count"]:
                        # Every clip skipped: its acc 0 measures nothing, and as a first value
                        # it would be a "best" (a best checkpoint, a patience count to beat).
                        log.warning("epoch %d: all %d validation clips were unreadable and "
                                    "skipped (warnings above name the files): no validation "
                                    "metrics this epoch, no best checkpoint, early stopping not "
                                    "updated", epoch, len(self.val_set))
                        val = None
                self._end_epoch(epoch, train_stats, val)
                if self.early.should_stop:
                    stop_reason = "early_stop"
                    log.warning("early stop after epoch %d: %s", epoch, self.early.reason())
                    break
            else:
                stop_reason = "completed" if self.epoch >= t.epochs else "paused"
            result = self._result(stop_reason)
            if stop_reason != "paused" and validated and \
                    all(v is None for v in self.history["val_acc"]):
                # No pass of the run (a resumed one's earlier epochs included) scored a clip: no
                # weights were ever validated, and a final evaluation would score none either.
                result["error"] = (
                    "no validation clip could be read in any epoch (all %d skipped; the warnings "
                    "name the files): the run has no validation metrics, best checkpoint or final "
                    "evaluation; fix or remove those clips, then continue with: cnnlstm-ext train "
                    "--resume %s"
                    % (len(self.val_set), os.path.join(self.ckpt_dir, LATEST)))
            elif stop_reason != "paused":
                result.update(self._finish(stop_reason))
            return result
        finally:
            self._close()

    def _train_epoch(self, epoch: int) -> Dict[str, float]:
        t = self.cfg.train
        self._set_epoch(epoch)
        self.net.train()
        self.guard.start_epoch()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, count
        clip_norm = t.grad_clip if t.grad_clip is not None else math.inf
        params = [p for p in self.model.parameters() if p.requires_grad]
        bar = _progress(self.train_loader, t.progress and self.ctx.is_main,
                        "epoch %d/%d" % (epoch, t.epochs))
        start, seen = time.perf_counter(), 0
        # The data rate: clips read / the reads' summed time, times the workers reading in
        # parallel; the step rate: clips / the time not spent waiting for the loader.
        batches, waited, read, read_s, skipped = iter(bar), 0.0, 0, 0.0, 0
        while True:
            wait_start = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            waited += time.perf_counter() - wait_start
            self._check_stop()
            clips, labels, lengths, n_skipped = _unpack(batch, self.device, self._prepare.get("train"))
            read_s += getattr(batch, "load_seconds", 0.0)
            read += n_skipped + (0 if clips is None else labels.shape[0])
            skipped += n_skipped
            # Every clip of the batch unreadable: no step (on every process, which step together).
            if self._on_any_process(clips is None) if self.ctx.enabled else clips is None:
                continue
            # A corrupt clip (NaN/Inf pixels) is skipped before the forward pass, which would
            # otherwise write NaN into BatchNorm statistics; all processes skip together (one
            # running backward alone would wait forever for the others' gradients).
            if self._on_any_process(not bool(torch.isfinite(clips).all())):
                what, loss, grad_norm = "input", None, None
            else:
                lens = forward_lengths(lengths, clips.shape[1])
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    logits = self.net(clips, lens)  # lengths stay on the CPU, where the model reads them
                loss = self.criterion(logits.float(), labels)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(params, clip_norm)
                loss_ok = bool(torch.isfinite(loss.detach()))
                what = None if loss_ok and bool(torch.isfinite(grad_norm)) else (
                    "gradient" if loss_ok else "loss")
            # every process must take the same decision
            ok = not self._on_any_process(what is not None)
            if ok:
                self.optimizer.step()
                n = labels.shape[0]
                sums += torch.stack([loss.detach().double() * n,
                                     (logits.argmax(1) == labels).sum().double(),
                                     torch.tensor(float(n), dtype=torch.float64, device=self.device)])
            else:  # the weights never see this step
                self.optimizer.zero_grad(set_to_none=True)
                must_roll_back = self.guard.record(False)
                # The forward pass may already have written NaN into BatchNorm statistics.
                bad_buffers = nonfinite_tensors(self.model.named_buffers())
                if self._on_any_process(bool(bad_buffers)):
                    raise RollbackRequired("non-finite activations in epoch %d poisoned buffers: %s"
                                           % (epoch, ", ".join(bad_buffers[:5]) or "on another process"))
                log.warning("epoch %d: non-finite %s (loss %s, grad norm %s): step skipped "
                            "(%d in a row, %d this epoch)", epoch, what or "value on another process",
                            _fmt(None if loss is None else float(loss.detach())),
                            _fmt(None if grad_norm is None else float(grad_norm)),
                            self.guard.consecutive, self.guard.skipped_epoch)
                if must_roll_back:
                    raise RollbackRequired("%d consecutive non-finite steps in epoch %d"
                                           % (self.guard.consecutive, epoch))
                continue
            self.guard.record(True)
            seen += labels.shape[0]
            if bar is not self.train_loader:
                done = max(float(sums[2]), 1.0)
                bar.set_postfix(loss="%.4f" % (float(sums[0]) / done),
                                acc="%.3f" % (float(sums[1]) / done),
                                clips_s="%.0f" % (seen * self.ctx.world_size
                                                  / max(time.perf_counter() - start, 1e-9)),
                                skipped=self.guard.skipped_epoch, refresh=False)
        if bar is not self.train_loader:
            bar.close()
        elapsed = time.perf_counter() - start
        self.ctx.all_reduce_(sums)
        count = max(float(sums[2]), 1.0)
        data_rate = (read * max(1, self.num_workers) / read_s * self.ctx.world_size
                     if read_s > 0 else None)
        return {"train_loss": float(sums[0]) / count if sums[2] > 0 else float("nan"),
                "train_acc": float(sums[1]) / count, "epoch_time": elapsed,
                "clips_per_s": float(sums[2]) / max(elapsed, 1e-9),
                "skipped_steps": self.guard.skipped_epoch,
                "data_clips_per_s": data_rate,
                "step_clips_per_s": seen * self.ctx.world_size / max(elapsed - waited, 1e-9),
                "skipped_clips": skipped}

    def _nonfinite_state(self) -> List[str]:
        """Names of model and optimizer tensors holding NaN/Inf (what must never be saved)."""
        return nonfinite_tensors(list(self.model.state_dict().items())
                                 + list(optimizer_tensors(self.optimizer)))

    def _on_any_process(self, flag: bool) -> bool:
        """True when `flag` is set on any process: a decision all processes take together."""
        if not self.ctx.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return float(self.ctx.all_reduce_(t)) > 0

    def _end_epoch(self, epoch: int, train: Dict[str, float], val: Optional[Dict[str, Any]]) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        row = {"epoch": epoch, "lr": lr, **train,
               "val_loss": val["loss"] if val else None, "val_acc": val["acc"] if val else None,
               "val_f1": val["f1"] if val else None, "val_top5": val["top5"] if val else None}
        for k in HISTORY_KEYS:
            self.history.setdefault(k, []).append(row.get(k))
        if self.scheduler is not None:
            self.scheduler.step()
        self.epoch = epoch
        improved = False
        if val is not None:
            monitored = {"val_acc": val["acc"], "val_f1": val["f1"], "val_loss": val["loss"],
                         "val_top5": val["top5"]}[self.early.monitor]
            improved = self.early.step(monitored, epoch)
            if improved:
                self.best_metrics = {"best_val_acc": val["acc"], "best_val_f1": val["f1"],
                                     "best_epoch": epoch}
                self._best_weights = (epoch, _cpu_copy(self.model.state_dict()))
        self._log_epoch(row, improved)
        self._save(epoch, row, improved)
        self._good = self._snapshot()

    # --- rollback -----------------------------------------------------------------------------

    def _snapshot(self) -> Dict[str, Any]:
        """The state a rollback returns to: what latest_checkpoint.pth holds, kept in memory
        (every process has it, also on nodes that do not share rank 0's disk)."""
        return {"epoch": self.epoch, "model": _cpu_copy(self.model.state_dict()),
                "optimizer": _cpu_copy(self.optimizer.state_dict()),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "history": copy.deepcopy(self.history), "early": self.early.state_dict(),
                "rng": _cpu_copy(rng_state(self.device)), "lr_scale": self.lr_scale}

    def _rollback(self, why: str) -> bool:
        if not self.guard.on_rollback():
            log.error("%s; all %d rollbacks used (train.max_rollbacks): stopping, the last good "
                      "checkpoint (epoch %d) stays", why, self.guard.max_rollbacks, self._good["epoch"])
            return False
        good = self._good
        self.model.load_state_dict(good["model"])
        self.optimizer.load_state_dict(good["optimizer"])
        if self.scheduler is not None and good["scheduler"] is not None:
            self.scheduler.load_state_dict(good["scheduler"])
        self.epoch = good["epoch"]
        self.history = copy.deepcopy(good["history"])
        self.early.load_state_dict(good["early"])
        set_rng_state(good["rng"], self.device)
        # The restored state ran at the snapshot's learning-rate scale; cuts compound.
        self.lr_scale *= self.guard.lr_factor
        factor = self.lr_scale / good["lr_scale"]
        for group in self.optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
        if self.scheduler is not None:
            self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
            self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        log.error("%s: rolled back to the state after epoch %d, learning rate x%g (now %.3g; "
                  "rollback %d of %d)", why, self.epoch, self.lr_scale, self.optimizer.param_groups[0]["lr"],
                  self.guard.rollbacks, self.guard.max_rollbacks)
        return True

    # --- files --------------------------------------------------------------------------------

    def _open_run_dir(self) -> None:
        if self.ctx.is_main:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            save_config(self.cfg, os.path.join(self.run_dir, "config.json"))
            self._log_handler = logging.FileHandler(os.path.join(self.run_dir, "train.log"))
            self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            # On the package's logger: the data path's warnings (a skipped clip, named by its
            # file) reach train.log too, from loader workers as well (they fork with it).
            _package_log.addHandler(self._log_handler)
            if log.level == logging.NOTSET or log.level > logging.INFO:
                log.setLevel(logging.INFO)
            if self.cfg.train.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self._writer = SummaryWriter(os.path.join(self.run_dir, "tensorboard"),
                                                 purge_step=self.epoch + 1)
                except ImportError:
                    log.warning("tensorboard is not installed: no TensorBoard logs "
                                "(pip install tensorboard)")
        self.ctx.barrier()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._log_handler is not None:
            _package_log.removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    def _trainer_state(self) -> Dict[str, Any]:
        return {"rng": rng_state(self.device), "early_stopping": self.early.state_dict(),
                "guard": self.guard.state_dict(), "lr_scale": self.lr_scale,
                "classes": list(self.classes), "world_size": self.ctx.world_size,
                "val_split": self._val_split()}

    def _val_split(self) -> Optional[Dict[str, Any]]:
        """The run's validation clips on video files: {"root": data.root (absolute), "clips":
        their paths relative to it}. `cnnlstm-ext evaluate` scores these by default on the run's
        data, whatever the folder holds later. None for data without files (synthetic)."""
        records = getattr(self.val_set, "records", None)
        if self._val_split_record is None and records and self.cfg.data.root:
            root = os.path.abspath(self.cfg.data.root)
            paths = [os.path.relpath(os.path.abspath(r.path), root) for r in records]
            if not any(p == os.pardir or p.startswith(os.pardir + os.sep) for p in paths):
                self._val_split_record = {"root": root,
                                          "clips": [p.replace(os.sep, "/") for p in paths]}
        return self._val_split_record

    def _save(self, epoch: int, row: Dict[str, Any], improved: bool) -> None:
        bad = self._nonfinite_state()
        if bad:  # the epoch-end check rolls back before this; no path may write NaN
            raise RuntimeError("refusing to save non-finite tensors: %s" % ", ".join(bad[:5]))
        if self.ctx.is_main:
            metrics = {k: row[k] for k in ("val_acc", "val_f1", "train_loss", "lr", "train_acc",
                                           "val_loss", "val_top5")}
            latest = os.path.join(self.ckpt_dir, LATEST)
            save_checkpoint(latest, model=self.model, optimizer=self.optimizer,
                            scheduler=self.scheduler, epoch=epoch, history=self.history,
                            metrics=metrics, best=dict(self.best_metrics), config=self.cfg.to_dict(),
                            extra={"trainer_state": self._trainer_state()})
            self.saved_epoch = epoch
            copies = []
            if improved:
                copies.append(BEST)
            every = self.cfg.train.checkpoint_every
            if every and epoch % every == 0:
                copies.append(epoch_checkpoint_name(epoch))
            for name in copies:  # the same bytes as latest: copy the file instead of re-serialising
                with open(latest, "rb") as src:
                    atomic_write(os.path.join(self.ckpt_dir, name),
                                 lambda f, src=src: shutil.copyfileobj(src, f, 1 << 20))
            self._write_history_csv()
            if self._writer is not None:
                for k, v in row.items():
                    if k != "epoch" and v is not None:
                        self._writer.add_scalar(k, v, epoch)
                self._writer.flush()
        self.ctx.barrier()

    def _write_history_csv(self) -> None:
        path = os.path.join(self.run_dir, "history.csv")
        keys = [k for k in HISTORY_KEYS if k in self.history]
        rows = zip(*[self.history[k] for k in keys])
        tmp = path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(keys)
            for r in rows:
                w.writerow(["" if v is None else v for v in r])
        os.replace(tmp, path)

    def _log_epoch(self, row: Dict[str, Any], improved: bool) -> None:
        t = self.cfg.train
        # (val_top5 is the top-k accuracy with k = min(5, classes), as the final line says)
        msg = ("epoch %d/%d  train loss %s acc %s | val loss %s acc %s f1 %s top%d %s | lr %.3g | "
               "%.0f clips/s, %.1f s" % (row["epoch"], t.epochs, _fmt(row["train_loss"]),
                                        _fmt(row["train_acc"]), _fmt(row["val_loss"]),
                                        _fmt(row["val_acc"]), _fmt(row["val_f1"]),
                                        min(5, self.num_classes), _fmt(row["val_top5"]),
                                        row["lr"], row["clips_per_s"], row["epoch_time"]))
        if improved:
            msg += "  * new best %s" % self.early.monitor
        elif self.early.best is not None:
            msg += "  (best %s %s at epoch %s, %d epoch(s) ago%s)" % (
                self.early.monitor, _fmt(self.early.best), self.early.best_epoch,
                self.early.bad_epochs,
                "" if t.patience is None else ", patience %d" % t.patience)
        log.info(msg)
        if row.get("data_clips_per_s") is not None:
            data, steps = row["data_clips_per_s"], row["step_clips_per_s"]
            log.info("epoch %d data: loader %.0f clips/s (%d worker%s), steps %.0f clips/s: %s "
                     "sets the pace", row["epoch"], data, max(1, self.num_workers),
                     "" if self.num_workers == 1 else "s", steps,
                     "the loader" if data < steps else "the model")
        if row.get("skipped_clips"):
            log.warning("epoch %d: %d unreadable clip(s) skipped (warnings above name the files)",
                        row["epoch"], row["skipped_clips"])
        if row["skipped_steps"]:
            log.warning("epoch %d: %d step(s) skipped for NaN/Inf inputs, loss or gradients "
                        "(%d in this run)",
                        row["epoch"], row["skipped_steps"], self.guard.skipped_total)
        warning = _overfitting_warning(self.history)
        if warning:
            log.warning(warning)

    def _result(self, stop_reason: str) -> Dict[str, Any]:
        return {"run_dir": self.run_dir, "stop_reason": stop_reason, "epochs_completed": self.epoch,
                "best_epoch": self.best_metrics.get("best_epoch"),
                "best_val_acc": self.best_metrics.get("best_val_acc"),
                "best_val_f1": self.best_metrics.get("best_val_f1"),
                "skipped_steps": self.guard.skipped_total, "rollbacks": self.guard.rollbacks,
                "lr_scale": self.lr_scale}

    def _finish(self, stop_reason: str) -> Dict[str, Any]:
        """Evaluates the best weights once more and writes the final metrics and the report."""
        out: Dict[str, Any] = {}
        weights_epoch, weights = self._best_weights
        self.model.load_state_dict(weights)
        metrics, _ = evaluate_model(self._eval_net, self.val_loader, self.device, self.num_classes,
                                    self.amp_dtype, self.criterion, self.ctx,
                                    progress=self.cfg.train.progress, desc="final val",
                                    prepare=self._prepare.get("val"))
        out["final_metrics"] = metrics
        if self.ctx.is_main:
            write_metrics(self.run_dir, metrics, self.classes,
                          extra={"weights_of_epoch": weights_epoch, **self._result(stop_reason)})
            log.info("final evaluation of the weights of epoch %s (best %s): val acc %s, macro-F1 "
                     "%s, top-%d %s (%d clips); stopped: %s", weights_epoch, self.early.monitor,
                     _fmt(metrics["acc"]), _fmt(metrics["f1"]), metrics["topk"],
                     _fmt(metrics["top5"]), metrics["count"], stop_reason)
            try:
                from ..report import summarize
                report = summarize(self.ckpt_dir, os.path.join(self.run_dir, "summary"),
                                   patience=self.cfg.train.patience or 10)
                out["report"] = str(report)
                log.info("summary report: %s", report)
            except Exception as e:  # the run's results stand even if the report fails
                log.error("could not write the summary report: %s", e)
        self.ctx.barrier()
        return out


def write_metrics(out_dir: str, metrics: Dict[str, Any], classes: Sequence[str],
                  extra: Optional[Dict[str, Any]] = None,
                  json_name: str = "final_metrics.json") -> None:
    """`json_name` (all metrics), confusion_matrix.csv, per_class_accuracy.csv and
    confusion_matrix.png in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    doc = dict(extra or {})
    doc.update({"classes": list(classes), **metrics})
    with open(os.path.join(out_dir, json_name), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "confusion_matrix.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted"] + list(classes))
        for name, row in zip(classes, metrics["confusion"]):
            w.writerow([name] + list(row))
    with open(os.path.join(out_dir, "per_class_accuracy.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "accuracy", "samples"])
        for name, acc, row in zip(classes, metrics["per_class_acc"], metrics["confusion"]):
            w.writerow([name, "" if acc is None else acc, sum(row)])
    _plot_confusion(os.path.join(out_dir, "confusion_matrix.png"), metrics["confusion"], classes)


def _plot_confusion(path: str, confusion, classes) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no confusion_matrix.png (pip install matplotlib)")
        return
    conf = np.asarray(confusion, dtype=np.float64)
    rows = conf / np.maximum(conf.sum(1, keepdims=True), 1)  # each true class sums to 1
    n = len(classes)
    size = min(max(4.0, 0.35 * n + 2), 24.0)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    if n <= 40:
        ax.set_xticks(range(n), labels=classes, rotation=90)
        ax.set_yticks(range(n), labels=classes)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(conf[i, j]), ha="center", va="center",
                        color="white" if rows[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (rows sum to 1)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _history_from(history, epoch: int) -> Dict[str, List]:
    """A loaded history in our layout, cut to `epoch` entries (accuracies as fractions)."""
    out: Dict[str, List] = {k: [] for k in HISTORY_KEYS}
    if not isinstance(history, dict):
        return out
    lengths = [len(v) for v in history.values() if isinstance(v, list)]
    n = min(max(lengths, default=0), epoch) if epoch else max(lengths, default=0)
    for k, v in history.items():
        if isinstance(v, list):
            out[k] = list(v[:n])
    for k in ("train_acc", "val_acc"):  # legacy files may hold percentages
        vals = [x for x in out.get(k, []) if isinstance(x, (int, float))]
        if vals and max(vals) > 1.0:
            out[k] = [x / 100.0 if isinstance(x, (int, float)) else x for x in out[k]]
    if not out["epoch"] and n:
        out["epoch"] = list(range(epoch - n + 1, epoch + 1))
    for k in HISTORY_KEYS:  # pad columns the file did not have
        if len(out[k]) < n:
            out[k] = [None] * (n - len(out[k])) + out[k]
    return out


def _as_fraction(acc):
    if acc is None:
        return None
    acc = float(acc)
    return acc / 100.0 if acc > 1.0 else acc


def _overfitting_warning(history: Dict[str, List], epochs: int = 3) -> Optional[str]:
    """A warning when validation loss rose for `epochs` epochs in a row while training loss fell."""
    val = [v for v in history.get("val_loss", []) if v is not None]
    train = [v for v in history.get("train_loss", []) if v is not None]
    if len(val) <= epochs or len(train) <= epochs:
        return None
    v, tr = val[-epochs - 1:], train[-epochs - 1:]
    if all(b > a for a, b in zip(v, v[1:])) and all(b < a for a, b in zip(tr, tr[1:])):
        return ("overfitting: validation loss has risen for %d epochs (%.4f -> %.4f) while "
                "training loss fell (%.4f -> %.4f)" % (epochs, v[0], v[-1], tr[0], tr[-1]))
    return None


def _plain_value(v) -> str:
    return "[%s]" % ", ".join("%g" % b for b in v) if isinstance(v, tuple) else "%g" % v


def _fmt(x) -> str:
    if x is None:
        return "-"
    try:
        return "%.4f" % float(x)
    except (TypeError, ValueError):
        return str(x)
