"""What a checkpoint holds: the architecture read off a state dict, and `cnnlstm-ext inspect`.

- `describe_state_dict`: the LSTM, backbone, projection, attention score, classifier and the rest
  of a (possibly foreign) model state dict, found from names and shapes alone, and the CNNLSTM
  config that rebuilds it when there is one; `canonical_names`: the key map onto CNNLSTM's names.
- `inspect_checkpoint`: a file's epoch, metrics, architecture, optimizer and scheduler state, and
  its size against `expected_file_bytes`.
"""
import collections
import os
import re

import torch

from .format import BEST_FIELDS, METRIC_FIELDS, _file_kind, read_checkpoint
from .integrity import INTEGRITY_KEY
from .legacy import normalize_file_content, strip_prefixes

# State-dict entries that are buffers rather than parameters (BatchNorm statistics).
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def is_buffer_name(key: str) -> bool:
    """True for state-dict keys of BatchNorm buffers (not trained by the optimizer)."""
    return key.rsplit(".", 1)[-1] in _BUFFER_SUFFIXES


def _model_file():
    """cnnlstm_ext.models.cnnlstm (BACKBONES, build_backbone), imported when first used: it imports
    this module for describe_state_dict, so this module cannot import it while loading."""
    from ..models import cnnlstm
    return cnnlstm


# --- reading an architecture off a state dict -------------------------------------------------

_LSTM_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)weight_ih_l(?P<layer>\d+)(?P<reverse>_reverse)?$")


def _numel(t) -> int:
    return int(t.numel())


_BACKBONE_SHAPES = {}


def _backbone_shapes(name):
    """A backbone trunk's state-dict {key: shape} in module order, and its output features
    (built on the meta device: no memory)."""
    if name not in _BACKBONE_SHAPES:
        with torch.device("meta"):
            trunk, features = _model_file().build_backbone(name)
        _BACKBONE_SHAPES[name] = ({k: tuple(v.shape) for k, v in trunk.state_dict().items()},
                                  features)
    return _BACKBONE_SHAPES[name]


# Convolutions per trunk: a stem, 2 (basic) or 3 (bottleneck) per block, 3 or 4 downsamples.
_BASIC, _BOTTLENECK = 2, 3
_TRUNK_BLOCKS = {
    "resnet18": (_BASIC, [2, 2, 2, 2]), "resnet34": (_BASIC, [3, 4, 6, 3]),
    "resnet50": (_BOTTLENECK, [3, 4, 6, 3]), "resnet101": (_BOTTLENECK, [3, 4, 23, 3]),
    "resnet152": (_BOTTLENECK, [3, 8, 36, 3]), "resnext50_32x4d": (_BOTTLENECK, [3, 4, 6, 3]),
    "resnext101_32x8d": (_BOTTLENECK, [3, 4, 23, 3]),
    "resnext101_64x4d": (_BOTTLENECK, [3, 4, 23, 3]),
    "wide_resnet50_2": (_BOTTLENECK, [3, 4, 6, 3]),
    "wide_resnet101_2": (_BOTTLENECK, [3, 4, 23, 3]),
}


def _conv_count(name):
    if name == "tiny":
        return 3
    convs_per_block, blocks = _TRUNK_BLOCKS[name]
    return 1 + convs_per_block * sum(blocks) + (3 if convs_per_block == _BASIC else 4)


def _identify_backbone(items):
    """The BACKBONES name whose trunk fits these (key, tensor) items of one top-level module, or
    None. Independent of the items' order where their names are the trunk's (safetensors files
    come back with sorted keys); foreign inner names are matched by the shapes in module order,
    else by the shapes alone when exactly one trunk has them."""
    names = {k.split(".", 1)[1] if "." in k else k: tuple(v.shape) for k, v in items}
    shapes = [tuple(v.shape) for _, v in items]
    convs = sum(1 for s in shapes if len(s) == 4)
    # Build (on meta) only the trunks with this many convolutions.
    candidates = [n for n in _model_file().BACKBONES if _conv_count(n) == convs]
    for name in candidates:
        if _backbone_shapes(name)[0] == names:
            return name
    for name in candidates:
        if list(_backbone_shapes(name)[0].values()) == shapes:
            return name
    by_shapes = [n for n in candidates
                 if sorted(_backbone_shapes(n)[0].values()) == sorted(shapes)]
    return by_shapes[0] if len(by_shapes) == 1 else None


def describe_state_dict(state_dict) -> dict:
    """What a (possibly foreign) model state dict holds, found from names and shapes alone.

    Finds the LSTM (any prefix; `nn.LSTM` names), the backbone (the top-level modules holding
    4-D convolution weights, matched against BACKBONES), a spatial projection (backbone features
    -> LSTM input) and an attention score ([1, LSTM output]) if present, the classifier (the
    top-level module whose Linear layers read the LSTM output), and everything else.
    Returns a plain dict; `cnnlstm_config` is the CNNLSTM(**config) that fits exactly, or None
    with the reasons in `mismatch`.
    """
    sd = strip_prefixes(collections.OrderedDict(state_dict))
    # One wrapper module around everything (`model.`, `net.`) is not part of the architecture.
    tops = {k.split(".", 1)[0] for k in sd}
    wrapper = ""
    if len(tops) == 1 and all("." in k for k in sd):
        wrapper = next(iter(tops)) + "."
        sd = collections.OrderedDict((k[len(wrapper):], v) for k, v in sd.items())

    params = collections.OrderedDict((k, v) for k, v in sd.items() if not is_buffer_name(k))
    info = {
        "wrapper_prefix": wrapper or None,
        "param_count": sum(_numel(v) for v in params.values()),
        "buffer_count": sum(_numel(v) for k, v in sd.items() if is_buffer_name(k)),
        "tensor_count": len(sd),
        "param_bytes": sum(_numel(v) * v.element_size() for v in params.values()),
        "state_bytes": sum(_numel(v) * v.element_size() for v in sd.values()),
        "dtypes": sorted({str(v.dtype).replace("torch.", "") for v in sd.values()}),
        "modules": _count_by_top_module(params),
        "lstm": None, "backbone": None, "spatial_proj": None, "temporal_pool": None,
        "classifier": None, "other": {}, "cnnlstm_config": None, "mismatch": [],
    }
    claimed = set()

    # LSTM: nn.LSTM names under some prefix.
    lstms = collections.OrderedDict()
    for k in sd:
        m = _LSTM_KEY.match(k)
        if m:
            lstms.setdefault(m.group("prefix"), set()).add(
                (int(m.group("layer")), bool(m.group("reverse"))))
    if lstms:
        prefix, layers = next(iter(lstms.items()))
        w_hh = sd[prefix + "weight_hh_l0"]
        w_ih = sd[prefix + "weight_ih_l0"]
        num_layers = max(layer for layer, _ in layers) + 1
        bidirectional = any(rev for _, rev in layers)
        lstm_keys = [k for k in sd if k.startswith(prefix) and re.match(
            r"^(weight|bias)_(ih|hh|hr)_l\d+(_reverse)?$", k[len(prefix):])]
        claimed.update(lstm_keys)
        info["lstm"] = {
            "prefix": prefix, "num_layers": num_layers, "hidden_size": int(w_hh.shape[1]),
            "input_size": int(w_ih.shape[1]), "bidirectional": bidirectional,
            "bias": (prefix + "bias_ih_l0") in sd,
            "proj_size": int(sd[prefix + "weight_hr_l0"].shape[0])
            if (prefix + "weight_hr_l0") in sd else 0,
            "params": sum(_numel(sd[k]) for k in lstm_keys),
        }
        if len(lstms) > 1:
            info["mismatch"].append("%d LSTMs (prefixes %s); CNNLSTM has one"
                                    % (len(lstms), ", ".join(repr(p) for p in lstms)))
    lstm = info["lstm"]
    lstm_out = None  # the LSTM's output features, D * (proj_size or hidden_size)
    if lstm:
        lstm_out = (lstm["proj_size"] or lstm["hidden_size"]) * (2 if lstm["bidirectional"] else 1)

    # Backbone: whole top-level modules that hold 4-D (convolution) weights.
    conv_tops = []
    for k, v in sd.items():
        top = k.split(".", 1)[0]
        if v.dim() == 4 and top not in conv_tops:
            conv_tops.append(top)
    if conv_tops:
        items = [(k, v) for k, v in sd.items() if k.split(".", 1)[0] in conv_tops]
        claimed.update(k for k, _ in items)
        name = _identify_backbone(items) if len(conv_tops) == 1 else None
        # The output features: the known trunk's, else the channels of the last convolution in
        # the file's order (the module order, unless the keys were sorted).
        last_conv = [v for _, v in items if v.dim() == 4][-1]
        info["backbone"] = {
            "prefix": conv_tops[0] + "." if len(conv_tops) == 1 else None,
            "modules": conv_tops, "name": name,
            "features": _backbone_shapes(name)[1] if name else int(last_conv.shape[0]),
            "params": sum(_numel(v) for k, v in items if not is_buffer_name(k)),
        }

    # A projection maps the backbone's features to the LSTM input; an attention score maps the
    # LSTM output to one number per step.
    for k, v in params.items():
        if k in claimed or not k.endswith("weight") or v.dim() != 2:
            continue
        module = k[:-len("weight")]
        keys = [x for x in (module + "weight", module + "bias") if x in sd]
        shape = tuple(v.shape)
        if lstm_out is not None and shape == (1, lstm_out) and not info["temporal_pool"]:
            info["temporal_pool"] = {"kind": "attention", "prefix": module,
                                     "params": sum(_numel(sd[x]) for x in keys)}
            claimed.update(keys)
        elif lstm and info["backbone"] and not info["spatial_proj"] \
                and shape == (lstm["input_size"], info["backbone"]["features"]):
            info["spatial_proj"] = {"prefix": module, "in_features": shape[1],
                                    "out_features": shape[0],
                                    "params": sum(_numel(sd[x]) for x in keys)}
            claimed.update(keys)
    if info["temporal_pool"] is None:
        info["temporal_pool"] = {"kind": "parameter-free (mean, max or last)", "prefix": None,
                                 "params": 0}

    # Classifier: the top-level module of the remaining 2-D weights whose first Linear reads
    # the LSTM output (the last such module; else the module of the last 2-D weight). A whole
    # MLP head counts, with its Linear layers listed.
    heads = collections.OrderedDict()  # top-level module -> its 2-D weight keys
    for k, v in params.items():
        if k not in claimed and v.dim() == 2 and k.endswith("weight"):
            heads.setdefault(k.split(".", 1)[0] if "." in k else "", []).append(k)
    if heads:
        reading_lstm = [m for m, ks in heads.items()
                        if lstm_out is not None and sd[ks[0]].shape[1] == lstm_out
                        and sd[ks[-1]].shape[0] > 1]
        top = reading_lstm[-1] if reading_lstm else next(reversed(heads))
        head_keys = [k for k in sd if k not in claimed and (
            k.split(".", 1)[0] == top if top else "." not in k)]
        layers = [tuple(int(d) for d in reversed(sd[k].shape)) for k in heads[top]]
        claimed.update(head_keys)
        info["classifier"] = {
            "prefix": top + "." if top else "",
            "in_features": layers[0][0], "num_classes": layers[-1][1],
            "linear_layers": layers,
            "params": sum(_numel(sd[k]) for k in head_keys if not is_buffer_name(k)),
        }

    leftover = [k for k in params if k not in claimed]
    info["other"] = _count_by_module(params, leftover)
    info["cnnlstm_config"] = _cnnlstm_config(info, sd)
    return info


def _count_by_top_module(params):
    counts = collections.OrderedDict()
    for k, v in params.items():
        top = k.split(".", 1)[0] if "." in k else "(top level)"
        counts[top] = counts.get(top, 0) + _numel(v)
    return dict(counts)


def _count_by_module(params, keys):
    counts = collections.OrderedDict()
    for k in keys:
        module = k.rsplit(".", 1)[0] if "." in k else "(top level)"
        counts[module] = counts.get(module, 0) + _numel(params[k])
    return dict(counts)


_CANONICAL = {"backbone": "backbone.", "lstm": "lstm.", "classifier": "classifier.",
              "spatial_proj": "spatial_proj.", "temporal_pool": "temporal_pool.score."}


def _cnnlstm_config(info, sd):
    """CNNLSTM kwargs that rebuild this state dict exactly, or None (why: info['mismatch'])."""
    why = info["mismatch"]
    lstm, backbone, head = info["lstm"], info["backbone"], info["classifier"]
    if lstm is None:
        why.append("no LSTM weights (weight_ih_l0, ...) found")
    elif lstm["proj_size"] or not lstm["bias"]:
        why.append("the LSTM has proj_size or no bias; CNNLSTM's has bias and no projection")
    if backbone is None:
        why.append("no convolution weights found (no backbone)")
    elif backbone["name"] is None:
        why.append("the backbone under %s matches none of %s"
                   % (", ".join(backbone["modules"]), ", ".join(_model_file().BACKBONES)))
    if head is None:
        why.append("no classifier (a 2-D weight after the LSTM) found")
    elif len(head["linear_layers"]) != 1:
        why.append("the classifier %r has %d Linear layers %s; CNNLSTM's has one"
                   % (head["prefix"], len(head["linear_layers"]), head["linear_layers"]))
    if lstm is not None and backbone is not None and info["spatial_proj"] is None \
            and backbone["features"] != lstm["input_size"]:
        why.append("backbone features %d differ from the LSTM input %d and no projection was "
                   "found" % (backbone["features"], lstm["input_size"]))
    if info["other"]:
        why.append("parameters CNNLSTM does not have: %s" % ", ".join(
            "%s (%s)" % (m, format(n, ",")) for m, n in info["other"].items()))
    if why:
        return None
    directions = 2 if lstm["bidirectional"] else 1
    if head["in_features"] != directions * lstm["hidden_size"]:
        why.append("classifier input %d differs from the LSTM output %d"
                   % (head["in_features"], directions * lstm["hidden_size"]))
        return None
    return dict(num_classes=head["num_classes"], spatial_dim=lstm["input_size"],
                temporal_dim=lstm["hidden_size"], num_layers=lstm["num_layers"],
                bidirectional=lstm["bidirectional"], backbone=backbone["name"],
                pooling="attention" if info["temporal_pool"]["kind"] == "attention" else "mean")


def canonical_names(info) -> dict:
    """Prefix rules (found prefix -> CNNLSTM prefix) for a state dict `describe_state_dict` read."""
    rules = {}
    wrapper = info.get("wrapper_prefix") or ""
    for part, canonical in _CANONICAL.items():
        found = info.get(part)
        prefix = found and found.get("prefix")
        if prefix is not None and wrapper + prefix != canonical:
            rules[wrapper + prefix] = canonical
    return rules


def _architecture_line(info):
    """describe_state_dict's findings in one line (for the mismatch message of a load)."""
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


# --- inspect -------------------------------------------------------------------------------------

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


def inspect_checkpoint(path, check_integrity=True) -> dict:
    """What a checkpoint holds, as a plain dict (tensor data is mapped, and read only to check
    the file's checksum; check_integrity=False skips that).

    A safetensors file (`cnnlstm-ext export --safetensors`, recognised by its content) gets
    safetensors_file.inspect_safetensors' dict instead: "format" says which."""
    path = os.fspath(path)
    try:
        safetensors = os.path.isfile(path) and _file_kind(path) == "safetensors"
    except OSError:
        safetensors = False  # read_checkpoint says why the file cannot be read
    if safetensors:
        from .safetensors_file import inspect_safetensors  # it imports this module
        return inspect_safetensors(path)
    raw = read_checkpoint(path, mmap=True, check_integrity=check_integrity)
    ckpt = normalize_file_content(path, raw)
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
        # "sha256 (checked)", "sha256 (not checked)" or None: written without a checksum.
        "integrity": (None if not isinstance(raw, dict) or not isinstance(
            raw.get(INTEGRITY_KEY), dict) else "%s (%s)" % (
                raw[INTEGRITY_KEY].get("algorithm"),
                "checked" if check_integrity else "not checked")),
    }
    if info:
        result["expected_size_bytes"] = expected_file_bytes(info)
        result["size_ratio"] = size / result["expected_size_bytes"]
    return result
