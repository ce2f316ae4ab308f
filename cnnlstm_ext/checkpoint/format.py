"""The checkpoint file itself: its keys, the errors, plain types, reading and writing a file.

A checkpoint (docs/checkpoint_format.md) is a `torch.save` dict of plain types and tensors, so
that `torch.load(path, weights_only=True)` reads it in a script that knows nothing of this package:

    epoch, model_state_dict, optimizer_state_dict, scheduler_state_dict, history,
    best_val_acc, best_val_f1, best_epoch, val_acc, val_f1, train_loss, lr, config

- `read_checkpoint`: torch.load(weights_only=True), with errors that say what is wrong with a file.
- `atomic_write`: temp file in the same folder, fsync, rename.
- `epoch_from_name`, `find_checkpoints`: a run's files by the existing run's names.
"""
import collections
import dataclasses
import enum
import os
import pathlib
import pickle
import re
import uuid
import zipfile
from typing import List, Optional

import torch

HISTORY_FIELDS = ("train_loss", "train_acc", "val_loss", "val_acc", "val_f1", "lr")
METRIC_FIELDS = ("val_acc", "val_f1", "train_loss", "lr", "train_acc", "val_loss")
BEST_FIELDS = ("best_val_acc", "best_val_f1", "best_epoch")
# First bytes of a torch.save file: a zip archive (torch >= 1.6), or a bare pickle (older).
_ZIP_MAGIC, _PICKLE_MAGIC = b"PK\x03\x04", b"\x80"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or whose contents do not fit what it is loaded into."""


class CheckpointMismatchError(CheckpointError):
    """The model state dict does not fit the model: missing, unexpected or wrongly-shaped keys."""

    def __init__(self, message, missing=(), unexpected=(), wrong_shape=()):
        super().__init__(message)
        self.missing, self.unexpected, self.wrong_shape = list(missing), list(unexpected), \
            list(wrong_shape)


# --- plain types ---------------------------------------------------------------------------------

def _to_plain(obj, where):
    """obj as plain Python types and CPU tensors (what torch.load(weights_only=True) reads)."""
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    if isinstance(obj, enum.Enum):
        return _to_plain(obj.value, where)
    for base in (bool, int, float, str):  # subclasses (numpy.str_, IntFlag...) as the base type
        if isinstance(obj, base):
            return base(obj)
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        # A view of a larger storage would drag the whole storage into the file.
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        return t
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    if type(obj).__module__ == "numpy" or type(obj).__module__.startswith("numpy."):
        if hasattr(obj, "item") and getattr(obj, "shape", None) == ():
            return obj.item()  # numpy scalar
        if hasattr(obj, "__array__"):
            import numpy as np
            return torch.from_numpy(np.ascontiguousarray(obj).copy())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if hasattr(obj, "__dict__") and type(obj).__name__ == "Namespace":
        obj = vars(obj)
    if isinstance(obj, dict):
        plain = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                k = _to_plain(k, where)
                if not isinstance(k, (str, int, float, tuple)):
                    raise TypeError("%s: key %r (%s) is not a plain type"
                                    % (where, k, type(k).__name__))
            plain[k] = _to_plain(v, "%s[%r]" % (where, k))
        return plain
    if isinstance(obj, (list, tuple)):
        items = [_to_plain(v, "%s[%d]" % (where, i)) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, (set, frozenset)):
        return [_to_plain(v, where) for v in sorted(obj, key=repr)]
    raise TypeError("%s holds a %s.%s, which torch.load(weights_only=True) cannot read; convert "
                    "it to plain types (int, float, str, list, dict, tensor)"
                    % (where, type(obj).__module__, type(obj).__qualname__))


def _scalar(value):
    """A metric as a float/int (tensors and numpy scalars too), or None."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    elif hasattr(value, "item") and getattr(value, "shape", None) == ():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


# --- reading -------------------------------------------------------------------------------------

def _file_kind(path):
    with open(path, "rb") as f:
        head = f.read(4)
    if head == _ZIP_MAGIC:
        return "zip"
    if head[:1] == _PICKLE_MAGIC:
        return "legacy"
    return "unknown"


def read_checkpoint(path, map_location="cpu", mmap=False):
    """torch.load(path, weights_only=True), with errors that say what is wrong with the file.

    mmap=True maps tensor data instead of reading it (pages load on access), for looking at many
    large files; it applies to zip-format files (torch >= 1.6), others are read normally.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError("no checkpoint file at %s" % path)
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError("%s: empty file (0 bytes)" % path)
    kind = _file_kind(path)
    if kind == "zip" and not zipfile.is_zipfile(path):
        raise CheckpointError("%s: truncated (%s bytes): its zip archive has no end record, so "
                              "the write stopped before the file was complete"
                              % (path, f"{size:,}"))
    if kind == "unknown":
        raise CheckpointError("%s: not a torch.save file (it starts with neither a zip nor a "
                              "pickle header)" % path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True,
                          mmap=mmap and kind == "zip")
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            detail = next((line for line in first if "Unsupported global" in line or
                           "Unsupported operand" in line), first[0] if first else "")
            raise CheckpointError(
                "%s: holds objects other than plain types and tensors, which are not loaded "
                "(weights_only=True): %s. Re-save it with plain types (numbers, strings, lists, "
                "dicts, tensors) from the code that wrote it." % (path, detail.strip())) from None
        raise CheckpointError("%s: corrupt (%s bytes): %s" % (path, f"{size:,}", e)) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise CheckpointError("%s: unreadable (%s bytes; truncated or corrupt): %s"
                              % (path, f"{size:,}", str(e).strip().splitlines()[0]
                                 if str(e).strip() else type(e).__name__)) from None


# --- writing -------------------------------------------------------------------------------------

def atomic_write(path, write) -> pathlib.Path:
    """Call write(f) on a temp file in path's folder, fsync, rename over path: a crash leaves
    either the old file or the new one, never a partial one."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (".%s.%s.tmp" % (path.name, uuid.uuid4().hex[:8]))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode from the umask
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


# --- file names ----------------------------------------------------------------------------------

_EPOCH_IN_NAME = re.compile(r"epoch[_-]?(\d+)", re.IGNORECASE)
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".tar")


def epoch_from_name(path) -> Optional[int]:
    """The epoch a file name states (`checkpoint_epoch_0033.pth` -> 33), or None."""
    m = _EPOCH_IN_NAME.search(os.path.basename(os.fspath(path)))
    return int(m.group(1)) if m else None


def find_checkpoints(directory) -> List[pathlib.Path]:
    """Checkpoint files of a folder: per-epoch files by epoch, then the others by name.

    Temp files of an interrupted atomic write (hidden, `.tmp`) are not checkpoints.
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise NotADirectoryError("no checkpoint folder at %s" % directory)
    files = [p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")
             and p.name.endswith(CHECKPOINT_SUFFIXES)]
    return sorted(files, key=lambda p: (epoch_from_name(p) is None,
                                        epoch_from_name(p) or 0, p.name))
