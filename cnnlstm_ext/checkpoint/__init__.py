"""Checkpoints: the on-disk format of DESIGN.md section 6, and every common variant of it.

A checkpoint is a `torch.save` dict of plain Python types and tensors, so that
`torch.load(path, weights_only=True)` reads it in a script that knows nothing of this package:

    epoch, model_state_dict, optimizer_state_dict, scheduler_state_dict, history,
    best_val_acc, best_val_f1, best_epoch, val_acc, val_f1, train_loss, lr, config

- `save_checkpoint` writes it atomically (temp file in the same folder, fsync, rename).
- `load_checkpoint` reads it with weights_only=True, whatever aliases it was written with
  (`state_dict`/`model`, `optimizer`/`scheduler`, `train_history`/`training_history`, a nested
  `best_metrics`, a bare state dict, a `module.` prefix), renames keys with `key_map` rules, says
  exactly which keys do not fit, and places optimizer moments by parameter name.
- `verify_checkpoint` lists what is wrong with a file; `inspect_checkpoint` says what it holds.

Optimizer state is indexed by position in torch; here the position of each saved moment is tied
to a parameter name, either from the `param_names` this module writes into each param group or,
for files without them, from the order of the parameters in the file's model state dict (the order
`AdamW(model.parameters())` uses). Every moment's shape is checked against its parameter.
"""
import collections
import dataclasses
import enum
import math
import os
import pathlib
import pickle
import re
import uuid
import warnings
import zipfile
from typing import Iterable, List, Optional

import torch

from ..models.cnnlstm import canonical_names, describe_state_dict, is_buffer_name

__all__ = ["CheckpointError", "CheckpointMismatchError", "save_checkpoint", "load_checkpoint",
           "normalize_checkpoint", "read_checkpoint", "verify_checkpoint", "inspect_checkpoint",
           "apply_key_map", "parse_key_map", "invert_key_map", "expected_file_bytes",
           "find_checkpoints", "epoch_from_name", "atomic_write", "HISTORY_FIELDS"]

# Aliases, canonical key first.
MODEL_KEYS = ("model_state_dict", "state_dict", "model", "model_state")
OPTIMIZER_KEYS = ("optimizer_state_dict", "optimizer", "optimizer_state")
SCHEDULER_KEYS = ("scheduler_state_dict", "scheduler", "lr_scheduler", "scheduler_state")
HISTORY_KEYS = ("history", "train_history", "training_history")
HISTORY_FIELDS = ("train_loss", "train_acc", "val_loss", "val_acc", "val_f1", "lr")
METRIC_FIELDS = ("val_acc", "val_f1", "train_loss", "lr", "train_acc", "val_loss")
BEST_FIELDS = ("best_val_acc", "best_val_f1", "best_epoch")
# Names a nested `best_metrics` dict may use for each best field.
_BEST_ALIASES = {"best_val_acc": ("best_val_acc", "val_acc", "acc", "accuracy"),
                 "best_val_f1": ("best_val_f1", "val_f1", "f1"),
                 "best_epoch": ("best_epoch", "epoch")}
# First bytes of a torch.save file: a zip archive (torch >= 1.6), or a bare pickle (older).
_ZIP_MAGIC, _PICKLE_MAGIC = b"PK\x03\x04", b"\x80"
_LIST_LIMIT = 20  # keys listed per category in a mismatch message


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


# --- key maps ------------------------------------------------------------------------------------

def parse_key_map(key_map) -> List[tuple]:
    """Rules `old_prefix -> new_prefix` as a list of (pattern, replacement).

    key_map may be a dict {old: new}, a list of (old, new) pairs or of "old=new" strings. A plain
    `old` matches a key prefix; `re:<regex>` (or a compiled pattern) is a regular expression
    replaced once with re.sub (groups allowed: "re:^rnn\\.(.*)$=lstm.\\1"). A replacement of None
    drops the matching keys. The first rule that matches a key applies.
    """
    if key_map is None:
        return []
    if isinstance(key_map, dict):
        pairs = list(key_map.items())
    elif isinstance(key_map, (str, bytes)):
        raise TypeError("key_map must be a dict or a list of rules, got a string %r" % (key_map,))
    else:
        pairs = []
        for rule in key_map:
            if isinstance(rule, str):
                if "=" not in rule:
                    raise ValueError("key_map rule %r must read OLD=NEW" % rule)
                rule = tuple(rule.split("=", 1))
            if not isinstance(rule, (tuple, list)) or len(rule) != 2:
                raise ValueError("key_map rule %r must be a pair (old, new)" % (rule,))
            pairs.append(tuple(rule))
    rules = []
    for old, new in pairs:
        if new is not None and not isinstance(new, str):
            raise TypeError("key_map replacement for %r must be a str or None, got %r" % (old, new))
        if isinstance(old, re.Pattern):
            rules.append((old, new))
        elif isinstance(old, str) and old.startswith("re:"):
            try:
                rules.append((re.compile(old[3:]), new))
            except re.error as e:
                raise ValueError("key_map rule %r is not a valid regular expression: %s"
                                 % (old, e)) from None
        elif isinstance(old, str):
            rules.append((old, new))
        else:
            raise TypeError("key_map pattern must be a str or re.Pattern, got %r" % (old,))
    return rules


def _map_key(key, rules):
    for pattern, new in rules:
        if isinstance(pattern, re.Pattern):
            if pattern.search(key):
                return None if new is None else pattern.sub(new, key, count=1)
        elif key.startswith(pattern):
            return None if new is None else new + key[len(pattern):]
    return key


def apply_key_map(state_dict, key_map) -> "collections.OrderedDict":
    """state_dict with its keys renamed by key_map (see parse_key_map); order kept."""
    rules = parse_key_map(key_map)
    out, source = collections.OrderedDict(), {}
    for k, v in state_dict.items():
        new = _map_key(k, rules)
        if new is None:
            continue
        if new in out:
            raise CheckpointError("key_map maps both %r and %r to %r" % (source[new], k, new))
        out[new], source[new] = v, k
    return out


def invert_key_map(key_map) -> dict:
    """The prefix rules that undo key_map (to save files under the names they were loaded with)."""
    inverse = {}
    for old, new in parse_key_map(key_map):
        if isinstance(old, re.Pattern) or new is None:
            raise ValueError("only plain prefix rules can be inverted, not %r -> %r" % (old, new))
        inverse[new] = old
    return inverse


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


def _is_state_dict(obj):
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_prefixes(state_dict):
    for prefix in ("module.", "_orig_mod."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = collections.OrderedDict(
                (k[len(prefix):], v) for k, v in state_dict.items())
    return state_dict


def _first(raw, aliases):
    for key in aliases:
        if key in raw and raw[key] is not None:
            return key, raw[key]
    return None, None


def normalize_checkpoint(raw) -> dict:
    """A loaded checkpoint with the canonical keys of DESIGN.md section 6, filled from aliases.

    Always present: epoch, model_state_dict, optimizer_state_dict, scheduler_state_dict, history,
    config, best_val_acc, best_val_f1, best_epoch, val_acc, val_f1, train_loss, lr, train_acc,
    val_loss (None where the file does not say), `source_keys` (the model keys as stored, before
    any key_map) and every other key of the file as it is.
    """
    if _is_state_dict(raw):
        raw = {"model_state_dict": raw}
    if not isinstance(raw, dict):
        raise CheckpointError("a checkpoint is a dict (or a bare state dict), got a %s"
                              % type(raw).__name__)
    used = set()
    out = {}
    # The first alias holding a state dict (a `model` key may hold a config instead).
    key, model = next(((k, raw[k]) for k in MODEL_KEYS if _is_state_dict(raw.get(k))),
                      (None, None))
    if model is None and _first(raw, MODEL_KEYS)[0] is not None:
        raise CheckpointError("%r is not a state dict (str keys -> tensors)"
                              % _first(raw, MODEL_KEYS)[0])
    used.add(key)
    out["model_state_dict"] = _strip_prefixes(collections.OrderedDict(model)) \
        if model is not None else None
    out["source_keys"] = list(out["model_state_dict"]) if model is not None else []
    for name, aliases in (("optimizer_state_dict", OPTIMIZER_KEYS),
                          ("scheduler_state_dict", SCHEDULER_KEYS)):
        key, value = _first(raw, aliases)
        used.add(key)
        out[name] = value if isinstance(value, dict) else None

    key, history = _first(raw, HISTORY_KEYS)
    used.add(key)
    out["history"] = _plain_history(history) if isinstance(history, dict) else None

    epoch = _scalar(raw.get("epoch"))
    out["epoch"] = int(epoch) if epoch is not None and math.isfinite(epoch) else None

    nested = raw.get("best_metrics") if isinstance(raw.get("best_metrics"), dict) else {}
    for field in BEST_FIELDS:
        value = _scalar(raw.get(field))
        if value is None:
            value = next((_scalar(nested[a]) for a in _BEST_ALIASES[field]
                          if _scalar(nested.get(a)) is not None), None)
        out[field] = int(value) if field == "best_epoch" and value is not None else value

    metrics = raw.get("metrics") if isinstance(raw.get("metrics"), dict) else {}
    for field in METRIC_FIELDS:
        value = _scalar(raw.get(field))
        if value is None:
            value = _scalar(metrics.get(field))
        if value is None and out["history"] and out["history"].get(field):
            value = _history_value(out["history"], field, out["epoch"])
        out[field] = value
    if out["lr"] is None:
        groups = (out["optimizer_state_dict"] or {}).get("param_groups") or []
        if groups and _scalar(groups[0].get("lr")) is not None:
            out["lr"] = float(_scalar(groups[0]["lr"]))
    out["config"] = raw.get("config") if isinstance(raw.get("config"), dict) else None
    used.update(("epoch", "config", "best_metrics", "metrics") + BEST_FIELDS + METRIC_FIELDS)
    for k, v in raw.items():
        if k not in used and k not in out:
            out[k] = v
    return out


def _plain_history(history):
    plain = {}
    for k, v in history.items():
        if isinstance(v, (list, tuple)):
            plain[k] = [_scalar(x) if _scalar(x) is not None else x for x in v]
        elif isinstance(v, torch.Tensor) and v.dim() == 1:
            plain[k] = v.tolist()
        else:
            plain[k] = v
    return plain


def _history_value(history, field, epoch):
    """This epoch's entry of a per-epoch history list (the last entry when epoch is unknown)."""
    values = history.get(field)
    if not isinstance(values, list) or not values:
        return None
    epochs = history.get("epoch") or history.get("epochs")
    if epoch is not None and isinstance(epochs, list) and epoch in epochs:
        return _scalar(values[epochs.index(epoch)])
    return _scalar(values[-1])


# --- saving --------------------------------------------------------------------------------------

def _unwrap(model):
    """The module whose state dict has the model's own names (no DDP `module.`, no compile)."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _optimizer_for_file(optimizer, model, name_of_saved):
    """optimizer.state_dict() with each group's params in file order and named (param_names).

    Positions follow the file's state-dict order so that a plain script building its optimizer
    from model.parameters() in that order loads the moments onto the right parameters.
    """
    sd = optimizer.state_dict()
    name_by_id = {id(p): n for n, p in model.named_parameters()}
    names = [[name_by_id.get(id(p)) for p in g["params"]] for g in optimizer.param_groups]
    if any(n not in name_of_saved for group in names for n in group):
        return sd  # parameters outside the model, or dropped by key_map: keep torch's layout
    groups, state, position = [], {}, 0
    for saved_group, group_names in zip(sd["param_groups"], names):
        order = sorted(range(len(group_names)), key=lambda i: name_of_saved[group_names[i]][1])
        group = {k: v for k, v in saved_group.items() if k not in ("params", "param_names")}
        group["params"], group["param_names"] = [], []
        for i in order:
            old_id = saved_group["params"][i]
            if old_id in sd["state"]:
                state[position] = sd["state"][old_id]
            group["params"].append(position)
            group["param_names"].append(name_of_saved[group_names[i]][0])
            position += 1
        groups.append(group)
    return {"state": state, "param_groups": groups}


def save_checkpoint(path, *, model, optimizer=None, scheduler=None, epoch, history=None,
                    metrics=None, best=None, config=None, extra=None, key_map=None,
                    key_order: Optional[Iterable[str]] = None) -> pathlib.Path:
    """Write a checkpoint (DESIGN.md section 6) atomically; returns its path.

    Args:
        model: the nn.Module (DDP and torch.compile wrappers are looked through).
        optimizer, scheduler: written as `optimizer_state_dict` / `scheduler_state_dict`.
        epoch: the epoch just finished (int).
        history: per-epoch lists (train_loss, train_acc, val_loss, val_acc, val_f1, lr, ...).
        metrics: this epoch's values (val_acc, val_f1, train_loss, lr, ...), written top-level;
            `lr` defaults to the optimizer's first group's.
        best: best_val_acc, best_val_f1, best_epoch, written top-level.
        config: plain dict of the model and training configuration.
        extra: more top-level keys (e.g. RNG states for an exact resume); plain types only.
        key_map: rename the model's keys on the way out (e.g. invert_key_map of the map a file
            was loaded with, so the old code that wrote it loads this one).
        key_order: the order of the (renamed) keys in the file, e.g. the `source_keys` that
            load_checkpoint returned; the optimizer state follows the same order.
    Raises TypeError naming the field when something is not a plain type.
    """
    if epoch is None or isinstance(epoch, bool) or _scalar(epoch) is None:
        raise TypeError("epoch must be an int, got %r" % (epoch,))
    module = _unwrap(model)
    state = module.state_dict()
    rules = parse_key_map(key_map)
    renamed = collections.OrderedDict()  # name in the file -> (model name, tensor)
    for old, v in state.items():
        new = _map_key(old, rules)
        if new is None:
            continue
        if new in renamed:
            raise ValueError("key_map maps both %r and %r to %r" % (renamed[new][0], old, new))
        renamed[new] = (old, v)
    order = list(renamed)
    if key_order is not None:
        rank = {k: i for i, k in enumerate(key_order)}
        own = {k: i for i, k in enumerate(order)}  # keys not in key_order keep their place last
        order = sorted(order, key=lambda k: (rank.get(k, len(rank)), own[k]))
    model_sd = collections.OrderedDict((k, renamed[k][1]) for k in order)
    # Parameter name -> (name in the file, position in the file).
    name_of_saved = {renamed[k][0]: (k, i) for i, k in enumerate(order)}

    ckpt = {"epoch": int(_scalar(epoch)), "model_state_dict": model_sd}
    if optimizer is not None:
        ckpt["optimizer_state_dict"] = _optimizer_for_file(optimizer, module, name_of_saved)
    if scheduler is not None:
        ckpt["scheduler_state_dict"] = scheduler.state_dict()
    ckpt["history"] = dict(history) if history is not None else {}
    best = dict(best or {})
    for field in BEST_FIELDS:
        ckpt[field] = best.pop(field, None)
    metrics = dict(metrics or {})
    if metrics.get("lr") is None and optimizer is not None:
        metrics["lr"] = optimizer.param_groups[0]["lr"]
    for field in ("val_acc", "val_f1", "train_loss", "lr"):
        ckpt[field] = metrics.pop(field, None)
    ckpt["config"] = dict(config) if config is not None else {}
    # Further metrics (train_acc, val_loss, ...), best values and extra keys go top-level too.
    for source, values in (("metrics", metrics), ("best", best), ("extra", extra or {})):
        for k, v in values.items():
            if k in ckpt:
                raise ValueError("%s key %r would overwrite the checkpoint field of that name"
                                 % (source, k))
            ckpt[k] = v
    plain = _to_plain(ckpt, "checkpoint")
    return atomic_write(path, lambda f: torch.save(plain, f))


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


# --- loading -------------------------------------------------------------------------------------

def _shape(t):
    return list(t.shape)


def _listing(title, lines):
    if not lines:
        return []
    shown = ["    " + line for line in lines[:_LIST_LIMIT]]
    if len(lines) > _LIST_LIMIT:
        shown.append("    ... and %d more" % (len(lines) - _LIST_LIMIT))
    return ["  %s (%d):" % (title, len(lines))] + shown


def _check_model_fit(path, expected, mapped, strict, model_name, source_sd):
    missing = [k for k in expected if k not in mapped]
    unexpected = [k for k in mapped if k not in expected]
    wrong = [k for k in expected
             if k in mapped and tuple(mapped[k].shape) != tuple(expected[k].shape)]
    if not wrong and not (strict and (missing or unexpected)):
        return missing, unexpected
    lines = ["%s does not fit %s: %d missing, %d unexpected, %d wrongly-shaped keys"
             % (path, model_name, len(missing), len(unexpected), len(wrong))]
    lines += _listing("missing (in the model, not in the file)",
                      ["%s %s" % (k, _shape(expected[k])) for k in missing])
    lines += _listing("unexpected (in the file, not in the model)",
                      ["%s %s" % (k, _shape(mapped[k])) for k in unexpected])
    lines += _listing("wrong shape",
                      ["%s: file %s, model %s" % (k, _shape(mapped[k]), _shape(expected[k]))
                       for k in wrong])
    try:
        info = describe_state_dict(source_sd)
        lines.append("  the file holds: " + _architecture_line(info))
        rules = canonical_names(info)
        if rules and (missing or unexpected):
            lines.append("  its names differ from CNNLSTM's; try key_map=%r" % (rules,))
    except Exception:  # the description is a hint only; the lists above are the error
        pass
    raise CheckpointMismatchError("\n".join(lines), missing, unexpected, wrong)


def _architecture_line(info):
    parts = []
    if info.get("backbone"):
        b = info["backbone"]
        parts.append("backbone %s (%s features, %s params)" % (
            b["name"] or "unrecognised", b["features"], f"{b['params']:,}"))
    if info.get("spatial_proj"):
        p = info["spatial_proj"]
        parts.append("projection %d->%d" % (p["in_features"], p["out_features"]))
    if info.get("lstm"):
        s = info["lstm"]
        parts.append("LSTM %d layers x %s, input %d, hidden %d (%s params)" % (
            s["num_layers"], "2 directions" if s["bidirectional"] else "1 direction",
            s["input_size"], s["hidden_size"], f"{s['params']:,}"))
    if info.get("temporal_pool", {}).get("kind") == "attention":
        parts.append("attention pooling")
    if info.get("classifier"):
        c = info["classifier"]
        parts.append("classifier %s -> %d classes" % (
            " -> ".join(str(i) for i, _ in c["linear_layers"]), c["num_classes"]))
    if info.get("other"):
        parts.append("other: " + ", ".join("%s (%s)" % (m, f"{n:,}")
                                           for m, n in info["other"].items()))
    parts.append("%s parameters" % f"{info['param_count']:,}")
    return "; ".join(parts)


class _UnmatchedOptimizer(CheckpointError):
    """Optimizer positions cannot be tied to parameter names (e.g. frozen layers left out)."""


def _saved_param_names(opt_sd, file_params, rules, path):
    """Name of each saved optimizer position (after key_map), in position order."""
    groups = opt_sd.get("param_groups")
    if not isinstance(groups, list) or not isinstance(opt_sd.get("state"), dict):
        raise CheckpointError("%s: optimizer state has no 'state'/'param_groups'" % path)
    ids = [i for g in groups for i in g.get("params", [])]
    if groups and all("param_names" in g for g in groups):
        names = [_map_key(n, rules) for g in groups for n in g["param_names"]]
        return ids, names, "the param_names stored with the optimizer"
    if len(ids) != len(file_params):
        raise _UnmatchedOptimizer(
            "%s: the optimizer state covers %d parameters but the model state dict holds %d, so "
            "its moments cannot be matched to parameters by order (the file has no param_names)"
            % (path, len(ids), len(file_params)))
    return ids, list(file_params), "the order of the parameters in the model state dict"


def _check_moments(opt_sd, ids, names, shapes, how, path):
    """Every per-parameter tensor (exp_avg, exp_avg_sq, ...) must have its parameter's shape."""
    bad = []
    for position, (sid, name) in enumerate(zip(ids, names)):
        entry = opt_sd["state"].get(sid)
        if entry is None or name is None or name not in shapes:
            continue
        for key, t in entry.items():
            if isinstance(t, torch.Tensor) and t.dim() > 0 and tuple(t.shape) != shapes[name]:
                bad.append("#%d %s: %s %s, parameter %s"
                           % (position, name, key, _shape(t), list(shapes[name])))
    if bad:
        raise CheckpointError("\n".join(
            ["%s: optimizer moments do not line up with the parameters (matched by %s); "
             "loading them would put moments on the wrong parameters" % (path, how)]
            + _listing("mismatched", bad)))


def _load_optimizer(optimizer, opt_sd, module, mapped_sd, rules, strict, path):
    file_params = [k for k in mapped_sd if not is_buffer_name(k)]
    ids, names, how = _saved_param_names(opt_sd, file_params, rules, path)
    shapes = {k: tuple(v.shape) for k, v in mapped_sd.items()}
    _check_moments(opt_sd, ids, names, shapes, how, path)
    saved_groups = opt_sd["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise CheckpointError("%s: the optimizer has %d param groups, the file %d"
                              % (path, len(optimizer.param_groups), len(saved_groups)))
    if module is None:  # no names on our side: positions must agree, shape by shape
        ours = [p for g in optimizer.param_groups for p in g["params"]]
        if len(ours) != len(ids):
            raise CheckpointError("%s: the optimizer has %d parameters, the file's %d"
                                  % (path, len(ours), len(ids)))
        _check_moments(opt_sd, ids, [str(i) for i in range(len(ids))],
                       {str(i): tuple(p.shape) for i, p in enumerate(ours)}, "position", path)
        optimizer.load_state_dict(opt_sd)
        return
    position_of, offset = {}, 0  # parameter name -> (saved id, saved group)
    for gi, g in enumerate(saved_groups):
        for sid, name in zip(g["params"], names[offset:offset + len(g["params"])]):
            position_of[name] = (sid, gi)
        offset += len(g["params"])
    name_by_id = {id(p): n for n, p in module.named_parameters()}
    state, groups, position, uncovered = {}, [], 0, []
    for gi, (ours, saved) in enumerate(zip(optimizer.param_groups, saved_groups)):
        group = {k: v for k, v in saved.items() if k not in ("params", "param_names")}
        if "param_names" in ours:
            group["param_names"] = ours["param_names"]
        group["params"] = []
        for p in ours["params"]:
            name = name_by_id.get(id(p))
            if name is None:
                raise CheckpointError("%s: the optimizer holds a parameter %s that is not in the "
                                      "model" % (path, list(p.shape)))
            found = position_of.get(name)
            if found is None:
                uncovered.append(name)
            else:
                sid, saved_group = found
                if saved_group != gi:
                    raise CheckpointError("%s: parameter %s is in param group %d here but in "
                                          "group %d in the file" % (path, name, gi, saved_group))
                if sid in opt_sd["state"]:
                    entry = opt_sd["state"][sid]
                    for key, t in entry.items():
                        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape != p.shape:
                            raise CheckpointError(
                                "%s: optimizer %s of %s is %s, the parameter is %s"
                                % (path, key, name, _shape(t), _shape(p)))
                    state[position] = entry
            group["params"].append(position)
            position += 1
        groups.append(group)
    if uncovered and strict:
        raise CheckpointError("\n".join(["%s: the file has no optimizer state for %d of the "
                                         "optimizer's parameters" % (path, len(uncovered))]
                                        + _listing("without state", uncovered)))
    if uncovered:
        warnings.warn("%s: no optimizer state for %d parameters (they start fresh): %s"
                      % (path, len(uncovered), ", ".join(uncovered[:8])))
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _load_scheduler(scheduler, sched_sd, path):
    ours = scheduler.state_dict()
    needed = {k for k in ours if not k.startswith("_") and k != "verbose"}
    lacking = sorted(needed - set(sched_sd))
    if lacking:
        raise CheckpointError("%s: the scheduler state lacks %s that %s needs (it was written by "
                              "a different scheduler: its keys are %s)"
                              % (path, lacking, type(scheduler).__name__, sorted(sched_sd)))
    if "base_lrs" in ours and len(sched_sd.get("base_lrs", [])) != len(ours["base_lrs"]):
        raise CheckpointError("%s: the scheduler state has %d base_lrs, the optimizer %d groups"
                              % (path, len(sched_sd.get("base_lrs", [])), len(ours["base_lrs"])))
    scheduler.load_state_dict(sched_sd)


def load_checkpoint(path, model=None, optimizer=None, scheduler=None, key_map=None, strict=True,
                    map_location="cpu") -> dict:
    """Read a checkpoint (any common layout) and load it into what is given.

    Args:
        model: loaded with the file's model state dict (after key_map); with strict=True any
            missing or unexpected key is an error, and a wrong shape always is. The error lists
            every such key and what the file's architecture reads as.
        optimizer: loaded with moments placed by parameter name and checked against each
            parameter's shape (needs `model` to name its parameters; without it, by position).
        scheduler: loaded after checking it is the same kind of scheduler.
        key_map: rules renaming the file's keys to the model's (see parse_key_map).
        strict: as in nn.Module.load_state_dict; also requires optimizer state for every
            parameter of `optimizer`.
        map_location: passed to torch.load.
    Returns the normalised checkpoint dict (see normalize_checkpoint), model_state_dict renamed.
    """
    ckpt = normalize_checkpoint(read_checkpoint(path, map_location=map_location))
    if ckpt["model_state_dict"] is None:
        raise CheckpointError("%s: no model state dict (keys: %s)"
                              % (path, sorted(k for k in ckpt if ckpt[k] is not None)))
    rules = parse_key_map(key_map)
    source_sd = ckpt["model_state_dict"]
    mapped = apply_key_map(source_sd, rules)
    ckpt["model_state_dict"] = mapped
    module = _unwrap(model) if model is not None else None
    if module is not None:
        expected = module.state_dict()
        missing, unexpected = _check_model_fit(path, expected, mapped, strict,
                                               type(module).__name__, source_sd)
        if missing or unexpected:
            warnings.warn("%s: loaded non-strictly; missing %s, unexpected %s"
                          % (path, missing[:8], unexpected[:8]))
        module.load_state_dict(collections.OrderedDict(
            (k, v) for k, v in mapped.items() if k in expected), strict=strict)
    if optimizer is not None:
        if ckpt["optimizer_state_dict"] is None:
            raise CheckpointError("%s: no optimizer state; training cannot resume from it with "
                                  "the same moments" % path)
        _load_optimizer(optimizer, ckpt["optimizer_state_dict"], module, mapped, rules, strict,
                        path)
    if scheduler is not None:
        if ckpt["scheduler_state_dict"] is None:
            raise CheckpointError("%s: no scheduler state" % path)
        _load_scheduler(scheduler, ckpt["scheduler_state_dict"], path)
    return ckpt


# --- verify and inspect --------------------------------------------------------------------------

_EPOCH_IN_NAME = re.compile(r"epoch[_-]?(\d+)", re.IGNORECASE)


def _nonfinite(tensors):
    """Names of floating tensors holding NaN or Inf (one tensor in memory at a time)."""
    bad = []
    for name, t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() \
                and not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad


def _names(keys, limit=6):
    keys = list(keys)
    return ", ".join(keys[:limit]) + (" and %d more" % (len(keys) - limit)
                                       if len(keys) > limit else "")


def verify_checkpoint(path) -> List[str]:
    """What is wrong with a checkpoint file, one sentence each; empty when it is sound.

    Checks: readable and complete (zip end record, CRC of every member), a model state dict,
    optimizer state with moments shaped like the parameters, no NaN/Inf in weights or moments,
    a finite train loss, and an epoch that agrees with the file name.
    """
    path = os.fspath(path)
    try:
        if _file_kind(path) == "zip":
            if not zipfile.is_zipfile(path):
                read_checkpoint(path)  # raises the truncation message
            with zipfile.ZipFile(path) as zf:
                broken = zf.testzip()  # reads every member and checks its CRC-32
            if broken is not None:
                return ["%s: corrupt: member %s fails its CRC check" % (path, broken)]
        raw = read_checkpoint(path, mmap=True)
        ckpt = normalize_checkpoint(raw)
    except (CheckpointError, FileNotFoundError, zipfile.BadZipFile, OSError) as e:
        return [str(e)]
    problems = []
    sd = ckpt["model_state_dict"]
    if sd is None:
        return ["no model state dict (top-level keys: %s)" % sorted(raw)]
    bad = _nonfinite(sd.items())
    if bad:
        problems.append("NaN/Inf in %d of %d model tensors: %s" % (len(bad), len(sd), _names(bad)))
    opt = ckpt["optimizer_state_dict"]
    if opt is None:
        problems.append("no optimizer state: training cannot resume from this file with its "
                        "AdamW moments")
    else:
        problems += _verify_optimizer(opt, sd)
    loss = ckpt["train_loss"]
    if loss is not None and not math.isfinite(loss):
        problems.append("train loss is %s at epoch %s" % (loss, ckpt["epoch"]))
    named = epoch_from_name(path)
    if named is not None and ckpt["epoch"] is not None and named != ckpt["epoch"]:
        problems.append("the file name says epoch %d but it holds epoch %d"
                        % (named, ckpt["epoch"]))
    return problems


def _verify_optimizer(opt, sd):
    if not isinstance(opt.get("state"), dict) or not isinstance(opt.get("param_groups"), list):
        return ["optimizer state has no 'state'/'param_groups'"]
    if not opt["state"]:
        return ["optimizer state is empty: no moments were saved"]
    problems = []
    keys = set()
    for entry in opt["state"].values():
        keys |= {k for k, v in entry.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    lacking = [sid for sid, entry in opt["state"].items() if not keys <= set(entry)]
    if lacking:
        problems.append("optimizer moments %s missing for %d of %d parameters"
                        % (sorted(keys), len(lacking), len(opt["state"])))
    ids, names = [], []
    try:
        ids, names, how = _saved_param_names(opt, [k for k in sd if not is_buffer_name(k)], [],
                                             "the optimizer state")
        _check_moments(opt, ids, names, {k: tuple(v.shape) for k, v in sd.items()}, how,
                       "the optimizer state")
    except _UnmatchedOptimizer:
        pass  # an optimizer over some parameters only (frozen layers): nothing to line up
    except CheckpointError as e:
        problems.append(str(e))
    name_of = dict(zip(ids, names))
    bad = _nonfinite(("%s.%s" % (name_of.get(sid, "#%s" % sid), k), t)
                     for sid, entry in opt["state"].items() for k, t in entry.items())
    if bad:
        problems.append("NaN/Inf in %d optimizer moment%s: %s"
                        % (len(bad), "s" if len(bad) > 1 else "", _names(bad)))
    return problems


def _optimizer_kind(groups):
    if not groups:
        return "unknown"
    g = groups[0]
    if "betas" in g:
        if "decoupled_weight_decay" in g:
            return "AdamW" if g["decoupled_weight_decay"] else "Adam"
        return "Adam or AdamW"
    if "momentum" in g and "nesterov" in g:
        return "SGD"
    if "alpha" in g and "momentum" in g:
        return "RMSprop"
    return "unknown"


def _moment_bytes(opt):
    total = 0
    for entry in (opt or {}).get("state", {}).values():
        for t in entry.values():
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                total += t.numel() * t.element_size()
    return total


def expected_file_bytes(info, moments=2) -> int:
    """Size of a complete file for this state dict: all tensors once plus `moments` float32
    copies of the parameters (AdamW's exp_avg and exp_avg_sq); headers add well under 1%."""
    return info["state_bytes"] + moments * 4 * info["param_count"]


def inspect_checkpoint(path) -> dict:
    """What a checkpoint holds, as a plain dict (tensor data is mapped, not read)."""
    path = os.fspath(path)
    raw = read_checkpoint(path, mmap=True)
    ckpt = normalize_checkpoint(raw)
    size = os.path.getsize(path)
    sd = ckpt["model_state_dict"]
    info = describe_state_dict(sd) if sd else None
    opt = ckpt["optimizer_state_dict"]
    optimizer = None
    if opt is not None:
        groups = opt.get("param_groups") or []
        optimizer = {
            "kind": _optimizer_kind(groups),
            "param_groups": [{k: v for k, v in g.items() if k in (
                "lr", "initial_lr", "weight_decay", "betas", "eps", "momentum", "amsgrad")}
                | {"params": len(g.get("params", []))} for g in groups],
            "states": len(opt.get("state") or {}),
            "moments": sorted({k for e in (opt.get("state") or {}).values() for k, v in e.items()
                               if isinstance(v, torch.Tensor) and v.dim() > 0}),
            "moment_bytes": _moment_bytes(opt),
            "param_names": all("param_names" in g for g in groups) if groups else False,
        }
    sched = ckpt["scheduler_state_dict"]
    history = ckpt["history"]
    result = {
        "path": path, "size_bytes": size, "format": _file_kind(path),
        "keys": sorted(str(k) for k in raw) if isinstance(raw, dict) else [],
        "epoch": ckpt["epoch"],
        "metrics": {k: ckpt[k] for k in METRIC_FIELDS},
        "best": {k: ckpt[k] for k in BEST_FIELDS},
        "param_count": info["param_count"] if info else 0,
        "architecture": info,
        "optimizer": optimizer,
        "scheduler": None if sched is None else {
            k: v for k, v in sched.items() if not k.startswith("_") and not isinstance(
                v, torch.Tensor)},
        "history": None if history is None else {
            "fields": sorted(k for k, v in history.items() if isinstance(v, list)),
            "epochs": max((len(v) for v in history.values() if isinstance(v, list)), default=0)},
        "config": ckpt["config"],
    }
    if info:
        result["expected_size_bytes"] = expected_file_bytes(info)
        result["size_ratio"] = size / result["expected_size_bytes"]
    return result


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
