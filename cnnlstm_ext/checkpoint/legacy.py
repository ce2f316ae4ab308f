"""Reading the checkpoints of other code: key aliases, wrapper prefixes, renamed keys.

- `normalize_checkpoint` fills the canonical keys (format.py) from whatever aliases a file was
  written with (`state_dict`/`model`, `optimizer`/`scheduler`, `train_history`/
  `training_history`, a nested `best_metrics`, a bare state dict, a `module.` prefix).
- `strip_prefixes` drops the DDP (`module.`) and torch.compile (`_orig_mod.`) prefixes.
- `parse_key_map`, `apply_key_map`, `invert_key_map`: rules renaming the keys of another
  model's state dict to ours, and back.
"""
import collections
import math
import re
from typing import List

import torch

from .format import BEST_FIELDS, METRIC_FIELDS, CheckpointError, _scalar

# Aliases, canonical key first.
MODEL_KEYS = ("model_state_dict", "state_dict", "model", "model_state")
OPTIMIZER_KEYS = ("optimizer_state_dict", "optimizer", "optimizer_state")
SCHEDULER_KEYS = ("scheduler_state_dict", "scheduler", "lr_scheduler", "scheduler_state")
HISTORY_KEYS = ("history", "train_history", "training_history")
# Names a nested `best_metrics` dict may use for each best field.
_BEST_ALIASES = {"best_val_acc": ("best_val_acc", "val_acc", "acc", "accuracy"),
                 "best_val_f1": ("best_val_f1", "val_f1", "f1"),
                 "best_epoch": ("best_epoch", "epoch")}


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


# --- aliases and prefixes ------------------------------------------------------------------------

def _is_state_dict(obj):
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def strip_prefixes(state_dict, prefixes=("module.", "_orig_mod.")):
    """state_dict with each of `prefixes`, in turn, cut off its keys when every key starts with
    it: by default the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes of a wrapper."""
    for prefix in prefixes:
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
    """A loaded checkpoint with the canonical keys (docs/checkpoint_format.md), filled from aliases.

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
    out["model_state_dict"] = strip_prefixes(collections.OrderedDict(model)) \
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


def normalize_file_content(path, raw) -> dict:
    """normalize_checkpoint of what `path` held, every failure a CheckpointError naming the file
    (content of an unexpected shape, as a file without a checksum may hold)."""
    try:
        return normalize_checkpoint(raw)
    except CheckpointError as e:
        raise CheckpointError("%s: %s" % (path, e)) from None
    except Exception as e:
        raise CheckpointError("%s: malformed content: %s: %s"
                              % (path, type(e).__name__, e)) from None


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
