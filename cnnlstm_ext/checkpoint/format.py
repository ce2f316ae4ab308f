"""The checkpoint file itself: its keys, the errors, plain types, reading and writing a file.

A checkpoint (docs/checkpoint_format.md) is a `torch.save` dict of plain types and tensors, so
that `torch.load(path, weights_only=True)` reads it in a script that knows nothing of this package:

    epoch, model_state_dict, optimizer_state_dict, scheduler_state_dict, history,
    best_val_acc, best_val_f1, best_epoch, val_acc, val_f1, train_loss, lr, config

- `read_checkpoint`: torch.load(weights_only=True), with errors that say what is wrong with a file,
  and the checks of integrity.py (the file's checksum record, or the zip CRCs of a file without
  one). Every failure to read a file is a CheckpointError naming the file; the other files of
  this package's commands (a torch.export program `.pt2`, safetensors weights) are recognised by
  their content and named as such, with what reads them.
- `atomic_write`: temp file in the same folder, fsync, rename; removes stale temp files of its
  own naming; a failed write is a CheckpointWriteError (also an OSError).
- `epoch_from_name`, `find_checkpoints`: a run's files by the existing run's names.
"""
import collections
import dataclasses
import enum
import errno as errno_module
import os
import pathlib
import pickle
import re
import uuid
import zipfile
from typing import List, Optional

import torch

from .integrity import integrity_problems

try:
    import fcntl
except ImportError:  # Windows: stale temp files are recognised by age instead of by lock
    fcntl = None

HISTORY_FIELDS = ("train_loss", "train_acc", "val_loss", "val_acc", "val_f1", "lr")
METRIC_FIELDS = ("val_acc", "val_f1", "train_loss", "lr", "train_acc", "val_loss")
BEST_FIELDS = ("best_val_acc", "best_val_f1", "best_epoch")
# First bytes of a torch.save file: a zip archive (torch >= 1.6), or a bare pickle (older).
_ZIP_MAGIC, _PICKLE_MAGIC = b"PK\x03\x04", b"\x80"
# A safetensors file: the header's length (8 bytes, little-endian, at most safetensors' own limit
# of 100 MB), then the header, a JSON object.
SAFETENSORS_MAX_HEADER = 100_000_000


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or whose contents do not fit what it is loaded into."""


class CheckpointMismatchError(CheckpointError):
    """The model state dict does not fit the model: missing, unexpected or wrongly-shaped keys."""

    def __init__(self, message, missing=(), unexpected=(), wrong_shape=()):
        super().__init__(message)
        self.missing, self.unexpected, self.wrong_shape = list(missing), list(unexpected), \
            list(wrong_shape)


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint (or any atomic_write) that could not be written: disk full, permissions, a
    failure inside torch's writer. The previous file is unchanged and the partial one removed.
    Also an OSError, with `errno` set when the cause had one."""


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
    """"zip" (torch.save, or another zip archive), "legacy" (a bare pickle), "safetensors" or
    "unknown", from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    # Before the pickle test: a header length whose low byte is 0x80 starts like a pickle.
    if len(head) == 9 and head[8:9] == b"{" \
            and int.from_bytes(head[:8], "little") <= SAFETENSORS_MAX_HEADER:
        return "safetensors"
    if head[:4] == _ZIP_MAGIC:
        return "zip"
    if head[:1] == _PICKLE_MAGIC:
        return "legacy"
    return "unknown"


def file_format(path) -> str:
    """What a file is, by its content: "checkpoint" (a torch.save zip archive), "legacy" (torch's
    pre-1.6 pickle format), "pt2" (a torch.export program, `cnnlstm-ext export --pt2`),
    "safetensors" (weights, `cnnlstm-ext export --safetensors`) or "unknown". Raises OSError when
    the file cannot be opened."""
    kind = _file_kind(path)
    if kind == "zip":
        return "pt2" if _is_pt2_archive(path) else "checkpoint"
    return kind


def _is_pt2_archive(path) -> bool:
    """A zip archive holding a torch.export program, as torch.export.save writes it: the record
    `<archive>/archive_format` reads "pt2" (torch >= 2.6, also AOTInductor packages), or the
    archive holds `serialized_exported_program.json` (older torch). False for anything else,
    a damaged archive included (reading it then says what is wrong)."""
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                parts = info.filename.split("/")
                if len(parts) > 2:
                    continue
                if parts[-1] == "serialized_exported_program.json":
                    return True
                if parts[-1] == "archive_format" and info.file_size <= 64:
                    return zf.read(info).strip() == b"pt2"
    except Exception:
        return False
    return False


# What reads the files that are not checkpoints (the messages of read_checkpoint).
_PT2_MESSAGE = (
    "%s: a torch.export program (.pt2, as `cnnlstm-ext export --pt2` writes), not a checkpoint: "
    "commands read a checkpoint (.pth); `predict` and `export --onnx/--pt2` also read the "
    ".safetensors weights that `cnnlstm-ext export --safetensors` writes. Run a .pt2 program in "
    "Python: `import cnnlstm_ext` (its ops), then `torch.export.load(path).module()(clips)`")
_SAFETENSORS_MESSAGE = (
    "%s: safetensors weights (as `cnnlstm-ext export --safetensors` writes), not a torch.save "
    "checkpoint: `predict` and `export --onnx/--pt2` read it as a model (named *.safetensors), "
    "`inspect` and `verify` check it; `train --resume`, `evaluate` and `export --safetensors` "
    "need a checkpoint (.pth)")
_ONNX_MESSAGE = (
    "%s: an ONNX model (as `cnnlstm-ext export --onnx` writes), not a checkpoint: run it with "
    "onnxruntime (its `preprocessing` metadata says how to prepare clips); commands read a "
    "checkpoint (.pth), and `predict` and `export` also the .safetensors weights of "
    "`cnnlstm-ext export --safetensors`")


def _looks_like_onnx(path: str) -> bool:
    """An ONNX file: a protobuf ModelProto, whose first field is ir_version (tag byte 0x08), and
    which names its producer and opset domain near its start."""
    with open(path, "rb") as f:
        head = f.read(4096)
    return head[:1] == b"\x08" and (path.lower().endswith(".onnx") or b"pytorch" in head
                                    or b"onnx" in head)


def _names(keys, limit=6) -> str:
    """The first `limit` of `keys`, and how many more (for one-line messages)."""
    keys = list(keys)
    return ", ".join(keys[:limit]) + (" and %d more" % (len(keys) - limit)
                                       if len(keys) > limit else "")


def _one_line(e) -> str:
    text = str(e).strip()
    first = text.splitlines()[0].strip() if text else ""
    return "%s: %s" % (type(e).__name__, first) if first else type(e).__name__


def _storage_member(name) -> bool:
    """A zip member holding tensor bytes (`<archive>/data/<key>`)."""
    parts = name.split("/")
    return len(parts) == 3 and parts[1] == "data"


def _check_zip(path, storages):
    """Read the pickle and the small records of a torch zip file (and every tensor's bytes when
    `storages`) through zipfile, which checks each member's CRC-32; raises CheckpointError."""
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not storages and _storage_member(info.filename):
                    continue
                with zf.open(info) as member:
                    while member.read(1 << 22):
                        pass
    except Exception as e:  # BadZipFile (CRC, headers), UnicodeDecodeError (a name), OSError...
        raise CheckpointError("%s: corrupt: %s" % (path, _one_line(e))) from None


def _is_zipfile(path):
    """zipfile.is_zipfile, which raises BadZipFile for some damaged end records."""
    try:
        return zipfile.is_zipfile(path)
    except Exception as e:
        raise CheckpointError("%s: corrupt: its zip end record is damaged (%s)"
                              % (path, _one_line(e))) from None


def _is_legacy_unsigned_error(e):
    return isinstance(e, AttributeError) and "UntypedStorage" in str(e) and "dtype" in str(e)


def read_checkpoint(path, map_location="cpu", mmap=False, check_integrity=True):
    """torch.load(path, weights_only=True), with errors that say what is wrong with the file.

    mmap=True maps tensor data instead of reading it (pages load on access), for looking at many
    large files; it applies to zip-format files (torch >= 1.6), others are read normally.

    check_integrity=True (the default) checks the file against the checksum record that
    save_checkpoint writes (integrity.py): every tensor's bytes and all other content. A zip file
    also has the CRC-32 of its pickle checked, and one without a record (written by other code)
    the CRC-32 of every member. The check reads every tensor's bytes once more;
    check_integrity=False skips it and only reads the file.
    Raises FileNotFoundError for a missing file, CheckpointError naming the file and what is
    wrong for anything else.
    """
    return _read(path, map_location=map_location, mmap=mmap, check_integrity=check_integrity)


def _read(path, map_location="cpu", mmap=False, check_integrity=True, crc=True):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError("no checkpoint file at %s" % path)
    try:
        size = os.path.getsize(path)
        kind = _file_kind(path)
    except OSError as e:
        raise CheckpointError("%s: cannot be read: %s" % (path, _one_line(e))) from None
    if size == 0:
        raise CheckpointError("%s: empty file (0 bytes)" % path)
    if kind == "safetensors":
        raise CheckpointError(_SAFETENSORS_MESSAGE % path)
    if kind == "zip" and not _is_zipfile(path):
        raise CheckpointError("%s: truncated (%s bytes): its zip archive has no end record, so "
                              "the write stopped before the file was complete"
                              % (path, f"{size:,}"))
    if kind == "zip" and _is_pt2_archive(path):  # torch.load would call it corrupt (no data.pkl)
        raise CheckpointError(_PT2_MESSAGE % path)
    if kind == "unknown" and _looks_like_onnx(path):
        raise CheckpointError(_ONNX_MESSAGE % path)
    if kind == "unknown":
        raise CheckpointError("%s: not a torch.save file (it starts with neither a zip nor a "
                              "pickle header)" % path)
    if kind == "zip" and check_integrity and crc:
        _check_zip(path, storages=False)
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True,
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
    except Exception as e:  # a damaged file makes torch.load raise about anything
        if kind == "legacy" and _is_legacy_unsigned_error(e):
            raise CheckpointError(
                "%s: written in torch's legacy (non-zip) format, whose uint16/uint32/uint64 "
                "tensors (e.g. a NumPy RNG state) torch.load(weights_only=True) cannot read; "
                "re-save it with torch.save's default zip format" % path) from None
        raise CheckpointError("%s: unreadable (%s bytes; truncated or corrupt): %s"
                              % (path, f"{size:,}", _one_line(e))) from None
    if check_integrity:
        try:
            problems = integrity_problems(raw)
        except Exception as e:  # a damaged record of an unexpected shape
            problems = ["the checksum record cannot be checked (%s)" % _one_line(e)]
        if problems:
            raise CheckpointError("%s: corrupt: %s" % (path, "; ".join(problems)))
        if problems is None and kind == "zip" and crc:  # no record: the zip's own CRCs
            _check_zip(path, storages=True)
    return raw


# --- writing -------------------------------------------------------------------------------------

_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")
_STALE_AGE_S = 3600.0  # without file locks (Windows): a temp file this old is stale


def _temp_name(path):
    return path.parent / (".%s.%s.tmp" % (path.name, uuid.uuid4().hex[:8]))


def _remove_if_stale(path) -> bool:
    """Remove a temp file unless a live atomic_write holds it (it keeps an exclusive flock on it
    while writing; without flock, a file younger than an hour counts as live)."""
    if fcntl is None:
        import time
        try:
            if time.time() - os.path.getmtime(path) < _STALE_AGE_S:
                return False
            os.unlink(path)
            return True
        except OSError:
            return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)  # while the lock is ours, so no writer can be holding it
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_stale_temp_files(directory) -> List[pathlib.Path]:
    """Remove the temp files (`.NAME.<8 hex>.tmp`) that interrupted atomic_writes left in a
    folder; a temp file another process is still writing is kept. Returns those removed.
    Every atomic_write (so every save) calls it on its own folder first."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        try:
            if _TEMP_NAME.match(entry.name) and entry.is_file(follow_symlinks=False) \
                    and _remove_if_stale(entry.path):
                removed.append(pathlib.Path(entry.path))
        except OSError:
            continue
    return removed


def _open_locked_temp(path):
    """Create and lock a fresh temp file; returns (tmp path, fd, lock fd)."""
    while True:
        tmp = _temp_name(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode from the umask
        if fcntl is None:
            return tmp, fd, None
        lock_fd = os.dup(fd)  # the lock lives until this is closed, after the rename
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        except OSError:  # no locks on this file system (ENOLCK): write unlocked
            os.close(lock_fd)
            return tmp, fd, None
        try:  # a cleaner may have taken the name between the create and the lock
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return tmp, fd, lock_fd
        except FileNotFoundError:
            pass
        os.close(lock_fd)
        os.close(fd)


class _WriteRecorder:
    """The temp file as write() sees it: remembers the first OSError of its writes (disk full),
    which torch's zip writer replaces with a RuntimeError of its own."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            if self.error is None:
                self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def _write_error(path, e):
    code = getattr(e, "errno", None)
    if code == errno_module.ENOSPC or "No space left" in str(e):
        reason = "no space left on device"
    else:
        reason = _one_line(e)
    err = CheckpointWriteError("%s: not written (%s); the previous file is unchanged and the "
                               "partial one was removed" % (path, reason))
    err.errno = code if code is not None else (errno_module.ENOSPC
                                                if reason == "no space left on device" else None)
    return err


def atomic_write(path, write) -> pathlib.Path:
    """Call write(f) on a temp file in path's folder, fsync, rename over path: a crash leaves
    either the old file or the new one, never a partial one.

    The temp file (`.NAME.<8 hex>.tmp`) is locked while it is written; stale ones of that naming
    that crashed writes left in the folder are removed first, so a crash leaves at most one, until
    the next write. An OSError or RuntimeError from the write (disk full, torch's writer) becomes
    a CheckpointWriteError naming the file; the temp file is removed in every case.
    """
    path = pathlib.Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(path.parent)
        tmp, fd, lock_fd = _open_locked_temp(path)
    except OSError as e:
        raise _write_error(path, e) from e
    recorder = None
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                recorder = _WriteRecorder(f)
                write(recorder)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            if isinstance(e, (OSError, RuntimeError)) and not isinstance(e, CheckpointError):
                # torch's zip writer turns the OSError of a write into its own RuntimeError
                # ("enforce fail at inline_container.cc"): report the write's error instead.
                cause = recorder.error if recorder is not None and recorder.error is not None \
                    and not isinstance(e, OSError) else e
                raise _write_error(path, cause) from e
            raise
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
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
