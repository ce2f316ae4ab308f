"""Training configuration: defaults, config files (TOML, YAML or JSON) and command-line overrides.

The configuration has four sections:

    model   keyword arguments of cnnlstm_ext.models.CNNLSTM (a plain dict)
    data    DataConfig: which data set, clip length, frame size, augmentations, loader
    optim   OptimConfig: AdamW + CosineAnnealingLR, as in the original run
    train   TrainConfig: epochs, batch, precision, clipping, NaN guard, early stopping, outputs

A config file holds any subset of them, e.g. (TOML)::

    [model]
    backbone = "resnet18"
    num_classes = 100

    [data]
    dataset = "wlasl"
    annotations = "WLASL_v0.3.json"
    root = "videos"

    [train]
    epochs = 200
    patience = 20

and `--set section.key=value` overrides any field from the command line. The resolved config (all
fields, after overrides) is saved in every checkpoint and as `config.json` in the run folder; that
file is itself a valid `--config`.
"""
import copy
import dataclasses
import inspect
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

# The built-in main job's model: a small CNN-LSTM that trains on 2 CPU cores in minutes.
SYNTHETIC_MODEL = {
    "backbone": "tiny",
    "num_classes": None,  # None: the number of classes of the data set
    "spatial_dim": 64,
    "temporal_dim": 64,
    "num_layers": 1,
    "bidirectional": True,
    "pooling": "mean",
    "dropout": 0.0,
}


@dataclass
class DataConfig:
    dataset: str = "synthetic"  # "synthetic" | "folder" (class-per-folder) | "wlasl"
    root: Optional[str] = None  # folder/wlasl: the data folder (wlasl: the videos)
    annotations: Optional[str] = None  # wlasl: the JSON annotation file
    train_split: str = "train"  # folder: sub-folder (used when present); wlasl: the split name
    val_split: str = "val"
    val_fraction: float = 0.1  # folder without split sub-folders: seeded hold-out fraction
    max_classes: Optional[int] = None  # wlasl: keep the first N glosses (100 = WLASL100)
    num_frames: int = 12  # T
    frame_size: int = 32  # S: frames are S x S after the crop
    resize_to: Optional[int] = None  # short side before cropping; default round(S * 8 / 7)
    augment: bool = True  # training augmentations (random resized crop, colour, temporal jitter)
    crop_scale: Tuple[float, float] = (0.6, 1.0)
    color_jitter: float = 0.2
    hflip: bool = False  # off by default: handedness matters in sign language
    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)  # video files (the synthetic set
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)  # normalises itself)
    # "display": frames as players show them (display matrix, EXIF); "stored": as files store
    # them, for a model trained on frames read that way (torchvision.io.read_video, decord)
    orientation: str = "display"
    # synthetic data set
    num_classes: int = 6
    train_samples: int = 1536
    val_samples: int = 480
    min_frames: Optional[int] = None  # shorter clips (padded, with lengths) when set
    noise: float = 0.04
    # loader
    num_workers: Optional[int] = None  # None: min(cores, 8) for video files, 0 for synthetic
    pin_memory: Optional[bool] = None  # default: on when training on a GPU
    # video files: uint8 clips from the loader, crop/resize/jitter/normalise batched on the device
    batch_augment: bool = True
    cache: Optional[str] = None  # decoded-clip cache folder (built on first use; `cnnlstm-ext cache`)
    cache_short_side: Optional[int] = None  # stored short side; None: what the transform needs
    cache_rebuild: bool = False  # decode every clip again (a damaged cache, another version)
    # frozen backbone (model.freeze_backbone): per-frame features computed once, in this folder
    feature_cache: Optional[str] = None


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # "adamw" (decoupled weight decay) | "adam" (L2 in the gradient)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: Tuple[float, float] = (0.9, 0.999)
    scheduler: str = "cosine"  # "cosine" (CosineAnnealingLR over the planned epochs) | "none"
    min_lr: float = 0.0  # eta_min of the cosine schedule
    # torch's fused AdamW/Adam kernel (CPU and CUDA): one pass over each parameter per step;
    # false: torch's default implementation (foreach on CUDA, a loop over the parameters on the CPU)
    fused: bool = True


@dataclass
class TrainConfig:
    run_name: str = "synthetic"
    output_dir: str = "outputs"  # the run folder is output_dir/run_name
    epochs: int = 8
    batch_size: int = 16  # global: split evenly over the processes of a distributed run
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA when available) | "cpu" | "cuda" | "cuda:N"
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "fp32" | "bf16"
    grad_clip: Optional[float] = 1.0  # max global gradient norm; None: no clipping
    label_smoothing: float = 0.0
    # NaN/Inf guard: a step with a non-finite loss or gradient norm is skipped; after
    # `max_bad_steps` consecutive skips the run rolls back to the last good checkpoint and
    # multiplies the learning rate by `rollback_lr_factor`; after `max_rollbacks` it stops.
    max_bad_steps: int = 5
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3
    # early stopping on `monitor` ("val_acc", "val_f1", "val_loss", "val_top5") after `patience`
    # evaluations without an improvement larger than `min_delta` (patience None: never stop)
    monitor: str = "val_acc"
    patience: Optional[int] = 10
    min_delta: float = 0.0
    checkpoint_every: int = 5  # write checkpoint_epoch_NNNN.pth every N epochs (0: never)
    eval_every: int = 1
    progress: bool = True  # tqdm progress bars
    tensorboard: bool = True
    sync_batchnorm: bool = True  # distributed runs on GPUs: BatchNorm statistics over all GPUs
    compile: bool = False  # torch.compile the model
    channels_last: Optional[bool] = None  # convolutions in NHWC layout (None: on GPUs only)
    cudnn_benchmark: bool = True  # let cuDNN pick the fastest convolution for each input shape


@dataclass
class Config:
    model: Dict[str, Any] = field(default_factory=lambda: dict(SYNTHETIC_MODEL))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict (lists instead of tuples), safe for checkpoints and JSON."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Config":
        cfg = cls()
        apply_dict(cfg, d)
        return cfg

    @property
    def run_dir(self) -> str:
        return os.path.join(self.train.output_dir, self.train.run_name)


SECTIONS = ("model", "data", "optim", "train")


def _plain(x):
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _field_type(hint):
    """int for Optional[int] and the like; None when the annotation says nothing simpler."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        hint = args[0]
    return hint if hint in (int, float, bool, str) else None


def _coerce(value, current, where: str, hint=None):
    """Converts a parsed value to the type of the field (lists -> tuples, 3.0 -> 3, etc.)."""
    if current is None and value is not None:
        kind = _field_type(hint)
        if kind is not None:  # an Optional field now unset: check against its annotation
            return _coerce(value, kind(), where)
        return value
    if isinstance(current, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(current):
            raise ValueError("%s expects a list of %d values, got %r" % (where, len(current), value))
        return tuple(type(c)(v) if isinstance(c, float) else v for c, v in zip(current, value))
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ValueError("%s expects true or false, got %r" % (where, value))
        return value
    if isinstance(current, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if current is not None and value is not None and not isinstance(value, type(current)):
        name = type(current).__name__
        raise ValueError("%s expects a%s %s, got %r" % (where, "n" if name[0] in "aeiou" else "",
                                                        name, value))
    return value


def apply_dict(cfg: Config, d: Dict[str, Any]) -> Config:
    """Merges a nested dict (from a file or a checkpoint) into `cfg`; unknown keys are errors."""
    if not isinstance(d, dict):
        raise ValueError("a config must be a mapping of sections, got %s" % type(d).__name__)
    for section, values in d.items():
        if section not in SECTIONS:
            raise ValueError("unknown config section %r (sections: %s)" % (section, ", ".join(SECTIONS)))
        if not isinstance(values, dict):
            raise ValueError("config section %r must be a mapping, got %r" % (section, values))
        if section == "model":
            cfg.model.update(copy.deepcopy(values))
            continue
        target = getattr(cfg, section)
        hints = typing.get_type_hints(type(target))
        for key, value in values.items():
            if key not in hints:
                raise ValueError("unknown key %s.%s (known: %s)" % (section, key, ", ".join(sorted(hints))))
            setattr(target, key, _coerce(value, getattr(target, key), "%s.%s" % (section, key),
                                         hints[key]))
    return cfg


def load_config_file(path: str) -> Dict[str, Any]:
    """Reads a TOML (.toml), YAML (.yaml/.yml) or JSON (.json) config file into a nested dict."""
    ext = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise FileNotFoundError("config file not found: %s" % path)
    if ext not in (".toml", ".yaml", ".yml", ".json"):
        raise ValueError("config file %s: expected .toml, .yaml, .yml or .json" % path)
    if ext == ".toml":
        try:
            import tomllib
        except ImportError:  # Python < 3.11
            import tomli as tomllib
        read, errors = (lambda f: tomllib.loads(f.read())), (tomllib.TOMLDecodeError,)
    elif ext == ".json":
        read, errors = json.load, (ValueError,)
    else:
        try:
            import yaml
        except ImportError as e:
            raise ImportError("YAML config files need PyYAML: pip install pyyaml") from e
        read, errors = (lambda f: yaml.safe_load(f) or {}), (yaml.YAMLError,)
    try:
        # utf-8-sig: UTF-8 with or without the byte order mark that Windows editors write
        with open(path, encoding="utf-8-sig") as f:
            return read(f)
    except UnicodeDecodeError as e:  # (a ValueError, which the JSON reader's errors include)
        raise ValueError("config file %s is not text: %s" % (path, e)) from e
    except errors as e:  # a syntax error: where it is, in one line
        raise ValueError("config file %s is not valid %s: %s"
                         % (path, ext[1:].upper().replace("YML", "YAML"),
                            " ".join(str(e).split()))) from e


# The data config's paths. A run makes them absolute when it starts: the config saved with the run
# (and in its checkpoints) then names the same files when the run is resumed from another folder.
DATA_PATHS = ("root", "annotations", "cache", "feature_cache")


def absolute_data_paths(cfg: "Config") -> None:
    for name in DATA_PATHS:
        value = getattr(cfg.data, name)
        if isinstance(value, str) and value:
            setattr(cfg.data, name, os.path.abspath(os.path.expanduser(value)))


def check_output_dir(path: str, what: str) -> None:
    """Raises ValueError when `path` cannot become a folder this process writes in: some part
    of it is a regular file, or the nearest existing folder is on a read-only file system or not
    writable. Called before data and model are built, so that a run fails at once, not after."""
    p = os.path.abspath(path)
    while not os.path.lexists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise ValueError("%s %s: %s is a file, not a folder" % (what, path, p))
    if not os.access(p, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(p).f_flag & os.ST_RDONLY)
        except (OSError, AttributeError):
            read_only = False
        raise ValueError("%s %s: cannot write in %s (%s)" % (
            what, path, p, "read-only file system" if read_only else "permission denied"))


def parse_value(text: str):
    """A command-line value: JSON/YAML-like literals (1e-3, true, null, [1, 2]) or a plain string."""
    low = text.strip().lower()
    if low in ("none", "null", "~"):
        return None
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return float(text)  # 1e-3 and similar forms json rejects
    except ValueError:
        return text


def parse_override(item: str) -> Tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value)."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ValueError("override %r: expected section.key=value, e.g. optim.lr=3e-4" % item)
    dotted, text = item.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    return section, key, parse_value(text)


def apply_overrides(cfg: Config, overrides: List[str]) -> Config:
    for item in overrides or []:
        section, key, value = parse_override(item)
        target = getattr(cfg, section, None)
        if value is None and dataclasses.is_dataclass(target) \
                and typing.get_type_hints(type(target)).get(key) is str:
            value = item.split("=", 1)[1].strip()  # e.g. optim.scheduler=none: the word, not null
        apply_dict(cfg, {section: {key: value}})
    return cfg


# Upper bounds that keep a typo from asking for more memory than any machine has (a frame of
# 100000 x 100000 pixels); far above what a video classifier uses.
MAX_FRAME_SIZE = 4096
MAX_NUM_FRAMES = 100000


def _check_finite(cfg: Config) -> None:
    """Every float field (and float in a tuple field) must be a finite number: NaN compares
    false with everything, so it would slip through every range check below."""
    for section in ("data", "optim", "train"):
        for f in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            values = value if isinstance(value, (tuple, list)) else (value,)
            for v in values:
                if isinstance(v, float) and not math.isfinite(v):
                    raise ValueError("%s.%s must be %s, got %r" % (
                        section, f.name, "finite numbers" if values is value else "a finite number",
                        list(value) if values is value else value))


def validate(cfg: Config) -> Config:
    """Checks every value a run depends on against its range, and the rules between fields;
    raises ValueError naming the field. The one place where a config is checked: the train
    command and the Trainer call it before any data, model or file is made."""
    t, o, d = cfg.train, cfg.optim, cfg.data
    _check_finite(cfg)
    if t.epochs < 1:
        raise ValueError("train.epochs must be >= 1, got %d" % t.epochs)
    if t.batch_size < 1:
        raise ValueError("train.batch_size must be >= 1, got %d" % t.batch_size)
    if t.precision not in ("auto", "fp32", "bf16"):
        raise ValueError("train.precision must be auto, fp32 or bf16, got %r" % t.precision)
    if t.monitor not in ("val_acc", "val_f1", "val_loss", "val_top5"):
        raise ValueError("train.monitor must be val_acc, val_f1, val_loss or val_top5, got %r" % t.monitor)
    if t.patience is not None and t.patience < 1:
        raise ValueError("train.patience must be >= 1 or null, got %r" % t.patience)
    if t.max_bad_steps < 1:
        raise ValueError("train.max_bad_steps must be >= 1, got %d" % t.max_bad_steps)
    if not 0 < t.rollback_lr_factor <= 1:
        raise ValueError("train.rollback_lr_factor must be in (0, 1], got %r" % t.rollback_lr_factor)
    if t.grad_clip is not None and t.grad_clip <= 0:
        raise ValueError("train.grad_clip must be > 0 or null, got %r" % t.grad_clip)
    if not 0 <= t.label_smoothing < 1:
        raise ValueError("train.label_smoothing must be in [0, 1), got %r" % t.label_smoothing)
    if o.optimizer.lower() not in ("adamw", "adam"):
        raise ValueError("optim.optimizer must be adamw or adam, got %r" % o.optimizer)
    if o.scheduler not in ("cosine", "none"):
        raise ValueError("optim.scheduler must be cosine or none, got %r" % o.scheduler)
    if o.lr <= 0:
        raise ValueError("optim.lr must be > 0, got %r" % o.lr)
    if not 0 <= o.min_lr <= o.lr:
        raise ValueError("optim.min_lr (the end of the cosine schedule) must be in [0, optim.lr = "
                         "%r], got %r" % (o.lr, o.min_lr))
    if o.weight_decay < 0:
        raise ValueError("optim.weight_decay must be >= 0, got %r" % o.weight_decay)
    if not all(0 <= b < 1 for b in o.betas):
        raise ValueError("optim.betas must both be in [0, 1), got %r" % (list(o.betas),))
    if t.min_delta < 0:
        raise ValueError("train.min_delta must be >= 0, got %r" % t.min_delta)
    if t.max_rollbacks < 0:
        raise ValueError("train.max_rollbacks must be >= 0, got %d" % t.max_rollbacks)
    if t.checkpoint_every < 0:
        raise ValueError("train.checkpoint_every must be >= 0 (0: never), got %d" % t.checkpoint_every)
    if t.eval_every < 1:
        raise ValueError("train.eval_every must be >= 1, got %d" % t.eval_every)
    if d.dataset not in ("synthetic", "folder", "wlasl"):
        raise ValueError("data.dataset must be synthetic, folder or wlasl, got %r" % d.dataset)
    if d.dataset in ("folder", "wlasl") and not d.root:
        raise ValueError("data.root is required for data.dataset=%s" % d.dataset)
    if d.dataset == "wlasl" and not d.annotations:
        raise ValueError("data.annotations (the WLASL JSON file) is required for data.dataset=wlasl")
    if d.num_frames < 1 or d.frame_size < 8:
        raise ValueError("data.num_frames must be >= 1 and data.frame_size >= 8")
    if d.frame_size > MAX_FRAME_SIZE:
        raise ValueError("data.frame_size must be <= %d, got %d" % (MAX_FRAME_SIZE, d.frame_size))
    if d.num_frames > MAX_NUM_FRAMES:
        raise ValueError("data.num_frames must be <= %d, got %d" % (MAX_NUM_FRAMES, d.num_frames))
    if d.resize_to is not None and not d.frame_size <= d.resize_to <= MAX_FRAME_SIZE:
        raise ValueError("data.resize_to (the short side before the %d-pixel crop) must be in "
                         "[data.frame_size = %d, %d] or null, got %d"
                         % (d.frame_size, d.frame_size, MAX_FRAME_SIZE, d.resize_to))
    if not 0 < d.val_fraction < 1:
        raise ValueError("data.val_fraction must be in (0, 1), got %r" % d.val_fraction)
    lo, hi = d.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ValueError("data.crop_scale must be [min, max] with 0 < min <= max <= 1, got %r"
                         % (list(d.crop_scale),))
    if d.orientation not in ("display", "stored"):
        raise ValueError("data.orientation must be display (as players show frames) or stored (as "
                         "the files store them), got %r" % (d.orientation,))
    if d.color_jitter < 0:
        raise ValueError("data.color_jitter must be >= 0, got %r" % d.color_jitter)
    if d.noise < 0:
        raise ValueError("data.noise must be >= 0, got %r" % d.noise)
    if not all(s > 0 for s in d.std):
        raise ValueError("data.std must be > 0 in every channel (it divides), got %r" % (list(d.std),))
    if d.dataset == "synthetic":
        from ..data.synthetic import MOTIONS
        if not 2 <= d.num_classes <= len(MOTIONS):
            raise ValueError("data.num_classes (synthetic motions) must be in [2, %d], got %d"
                             % (len(MOTIONS), d.num_classes))
    if d.max_classes is not None and d.max_classes < 2:
        raise ValueError("data.max_classes must be >= 2 or null, got %d" % d.max_classes)
    if d.train_samples < 1 or d.val_samples < 1:
        raise ValueError("data.train_samples and data.val_samples must be >= 1, got %d and %d"
                         % (d.train_samples, d.val_samples))
    if d.min_frames is not None and not 3 <= d.min_frames <= d.num_frames:
        raise ValueError("data.min_frames must be in [3, data.num_frames = %d] or null, got %d"
                         % (d.num_frames, d.min_frames))
    if d.num_workers is not None and d.num_workers < 0:
        raise ValueError("data.num_workers must be >= 0, got %d" % d.num_workers)
    if (d.cache or d.feature_cache) and d.dataset == "synthetic":
        raise ValueError("data.cache and data.feature_cache hold decoded video files; "
                         "data.dataset=synthetic is generated on the fly")
    if d.cache_short_side is not None and not d.frame_size <= d.cache_short_side <= MAX_FRAME_SIZE:
        raise ValueError("data.cache_short_side must be in [data.frame_size = %d, %d] or null, "
                         "got %d" % (d.frame_size, MAX_FRAME_SIZE, d.cache_short_side))
    if d.feature_cache:
        if not (isinstance(cfg.model, dict) and cfg.model.get("freeze_backbone")):
            raise ValueError("data.feature_cache holds the features of a frozen backbone: set "
                             "model.freeze_backbone=true")
        if d.augment:
            raise ValueError("data.feature_cache holds one un-augmented feature sequence per clip: "
                             "set data.augment=false")
    if not isinstance(cfg.model, dict):
        raise ValueError("model must be a mapping of CNNLSTM keyword arguments")
    from ..models import CNNLSTM
    known = set(inspect.signature(CNNLSTM.__init__).parameters) - {"self"}
    unknown = sorted(set(cfg.model) - known)
    if unknown:
        raise ValueError("unknown model setting(s) %s (CNNLSTM takes: %s)"
                         % (", ".join(unknown), ", ".join(sorted(known))))
    return cfg


def save_config(cfg: Config, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cfg.to_dict(), f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def config_from_checkpoint(ckpt: Dict[str, Any], key_map=None) -> Tuple[Config, Any, bool]:
    """(config, key_map, ours) for a normalised checkpoint (checkpoint.normalize_checkpoint).

    A checkpoint of ours carries its resolved config. For one of another training script, the
    model is read off its weights (backbone, LSTM layers and sizes, classes) and, unless
    `key_map` is given, the renaming of its keys to CNNLSTM's (e.g. `rnn.` -> `lstm.`); the rest
    of the config keeps the defaults. Raises ValueError saying what does not fit a CNNLSTM.
    """
    from ..checkpoint import canonical_names, describe_state_dict

    cfg = Config()
    saved = ckpt.get("config")
    if isinstance(saved, dict) and saved and set(saved) <= set(SECTIONS):
        apply_dict(cfg, saved)
        return cfg, key_map, True
    info = describe_state_dict(ckpt.get("model_state_dict") or {})
    if info["cnnlstm_config"] is None:
        raise ValueError("cannot read a CNN-LSTM architecture off the checkpoint's weights (%s); "
                         "give the model with --config / --set model.* and --key-map"
                         % "; ".join(info["mismatch"]))
    cfg.model.update(info["cnnlstm_config"])
    if key_map is None:
        key_map = canonical_names(info) or None
    return cfg, key_map, False
