"""What is wrong with a checkpoint file (`cnnlstm-ext verify`, the summary report), and the
NaN/Inf check the trainer runs before every save."""
import math
import os
import zipfile
from typing import Iterable, List, Tuple

import torch

from .format import CheckpointError, _file_kind, _names, _one_line, _read, epoch_from_name
from .inspect import is_buffer_name
from .io import _check_moments, _saved_param_names, _UnmatchedOptimizer
from .legacy import normalize_checkpoint
from .safetensors_file import verify_safetensors


def nonfinite_tensors(named: Iterable[Tuple[str, torch.Tensor]]) -> List[str]:
    """Names of the floating-point tensors that hold NaN or Inf (one tensor in memory at a time)."""
    bad = []
    for name, t in named:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() \
                and not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad


def verify_checkpoint(path) -> List[str]:
    """What is wrong with a checkpoint file, one sentence each; empty when it is sound.

    Checks: readable and complete (zip end record, CRC of every member), its checksum record
    (integrity.py) when it has one, a model state dict, optimizer state with moments shaped like
    the parameters, no NaN/Inf in weights or moments, a finite train loss, and an epoch that
    agrees with the file name. A safetensors file (`cnnlstm-ext export --safetensors`, recognised
    by its content) gets the checks of safetensors_file.verify_safetensors: its header, every
    tensor's bytes within the file, the metadata export writes, NaN/Inf. Never raises: a file
    that cannot be read or checked gets one line saying why.
    """
    path = os.fspath(path)
    try:
        return _verify(path)
    except Exception as e:
        text = str(e) if isinstance(e, CheckpointError) else \
            "%s: cannot be checked: %s" % (path, _one_line(e))
        return [" ".join(text.split())]  # one line


def _verify(path):
    try:
        kind = _file_kind(path) if os.path.isfile(path) else None
        if kind == "safetensors":
            return verify_safetensors(path)
        if kind == "zip":
            if not zipfile.is_zipfile(path):
                _read(path)  # raises the truncation message
            with zipfile.ZipFile(path) as zf:
                broken = zf.testzip()  # reads every member and checks its CRC-32
            if broken is not None:
                return ["%s: corrupt: member %s fails its CRC check" % (path, broken)]
        raw = _read(path, mmap=True, crc=False)  # the CRCs were just checked
        ckpt = normalize_checkpoint(raw)
    except (CheckpointError, FileNotFoundError) as e:
        return [" ".join(str(e).split())]
    except Exception as e:  # a damaged zip directory (BadZipFile, a name that is not UTF-8...)
        return ["%s: corrupt: %s" % (path, _one_line(e))]
    problems = []
    sd = ckpt["model_state_dict"]
    if sd is None:
        return ["no model state dict (top-level keys: %s)" % sorted(raw)]
    bad = nonfinite_tensors(sd.items())
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
    bad = nonfinite_tensors(("%s.%s" % (name_of.get(sid, "#%s" % sid), k), t)
                     for sid, entry in opt["state"].items() for k, t in entry.items())
    if bad:
        problems.append("NaN/Inf in %d optimizer moment%s: %s"
                        % (len(bad), "s" if len(bad) > 1 else "", _names(bad)))
    return problems
