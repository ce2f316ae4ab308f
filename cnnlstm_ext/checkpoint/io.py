"""Saving a model, optimizer and scheduler to a checkpoint, and loading one back into them.

- `save_checkpoint` writes the format of format.py atomically, keys optionally renamed, with the
  checksum record of integrity.py under the reserved key `integrity`.
- `load_checkpoint` reads any layout legacy.py knows, renames keys with `key_map` rules, says
  exactly which keys do not fit, and places optimizer moments by parameter name.

Optimizer state is indexed by position in torch; here the position of each saved moment is tied
to a parameter name, either from the `param_names` this module writes into each param group or,
for files without them, from the order of the parameters in the file's model state dict (the order
`AdamW(model.parameters())` uses). Every moment's shape is checked against its parameter.
"""
import collections
import pathlib
import warnings
from typing import Iterable, Optional

import torch

from .format import (BEST_FIELDS, CheckpointError, CheckpointMismatchError, _scalar, _to_plain,
                     atomic_write, read_checkpoint)
from .integrity import INTEGRITY_KEY, compute_integrity
from .inspect import _architecture_line, canonical_names, describe_state_dict, is_buffer_name
from .legacy import _map_key, apply_key_map, normalize_file_content, parse_key_map

_LIST_LIMIT = 20  # keys listed per category in a mismatch message


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
    """Write a checkpoint (docs/checkpoint_format.md) atomically; returns its path.

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
    The file also holds `integrity`, the checksum of its tensors and of everything else
    (integrity.py), which every load checks.
    Raises TypeError naming the field when something is not a plain type, CheckpointWriteError
    (a CheckpointError and an OSError) when the file cannot be written (disk full...): the
    previous file is then unchanged and no partial one is left.
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
            if k in ckpt or k == INTEGRITY_KEY:
                raise ValueError("%s key %r would overwrite the checkpoint field of that name"
                                 % (source, k))
            ckpt[k] = v
    plain = _to_plain(ckpt, "checkpoint")
    plain[INTEGRITY_KEY] = compute_integrity(plain)
    return atomic_write(path, lambda f: torch.save(plain, f))


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
                    map_location="cpu", check_integrity=True) -> dict:
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
        check_integrity: check the file's checksum record (every tensor's bytes and the rest),
            or the zip CRCs of a file written without one, before anything is loaded;
            False skips it (faster on large files).
    Returns the normalised checkpoint dict (see normalize_checkpoint), model_state_dict renamed.
    Raises FileNotFoundError, CheckpointError naming the file and what failed (damaged,
    truncated, unreadable, a checksum mismatch), CheckpointMismatchError when it does not fit.
    """
    raw = read_checkpoint(path, map_location=map_location, check_integrity=check_integrity)
    ckpt = normalize_file_content(path, raw)
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
