"""The reference CNN-LSTM video classifier, and reading its architecture off a state dict.

    clips [B, T, 3, H, W] --backbone--> maps [B*T, F, h, w] --frame_pool--> [T, B, F]
      --spatial_proj (only when F != spatial_dim)--> [T, B, S] --lstm--> [T, B, D*H]
      --temporal_pool--> [B, D*H] --dropout, classifier--> logits [B, num_classes]

with S = spatial_dim, H = temporal_dim (hidden size per direction), D = 2 when bidirectional.
State-dict prefixes: `backbone.`, `spatial_proj.`, `lstm.`, `temporal_pool.` (attention only),
`classifier.`. The LSTM's names are exactly `nn.LSTM`'s whether `fused` is on or off, so a state
dict (and an optimizer state) moves between the two unchanged.

Parameter count of the default model, `CNNLSTM()` (resnet18, 512 -> 3 x BiLSTM 512, mean pooling,
100 classes), next to the existing run's (DESIGN.md section 1):

| part | `CNNLSTM()` | existing run |
| --- | ---: | ---: |
| backbone: ResNet-18 trunk without `fc` | 11,176,512 | 11,176,512 |
| spatial_proj (512 -> 512 features: none needed) | 0 | ? |
| lstm: 3 layers x 2 directions x (4H(I + H) + 8H), I = 512 then 1024 | 16,801,792 | 16,801,792 |
| temporal_pool: mean (attention: `score` = Linear(1024, 1), +1,025) | 0 | ? |
| classifier: Linear(1024, 100) | 102,500 | ? |
| parts not named by the run's summary (head, projection, attention) | - | 5,138,890 |
| total | 28,080,804 | 33,219,694 |

The 5,138,890 are not any single common block (no Linear/LayerNorm/MultiheadAttention of usual
sizes, alone or in pairs, adds up to it); `cnnlstm-ext inspect` lists them by module once a file of
that run is read, and `load_checkpoint(key_map=..., strict=False)` says exactly which keys do not
fit this model.
"""
import collections
import re
from typing import Optional

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..nn import FramePool, FusedBiLSTM, FusedLSTM, TemporalPool

__all__ = ["CNNLSTM", "BACKBONES", "infer_architecture", "describe_state_dict", "is_buffer_name"]

# torchvision ResNet-family trunks (built with weights=None) and "tiny", a small CNN for CPU runs.
BACKBONES = ("tiny", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
             "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
             "wide_resnet50_2", "wide_resnet101_2")
POOLINGS = ("mean", "max", "last", "attention")
FRAME_POOLS = ("avg", "max")

# State-dict entries that are buffers rather than parameters (BatchNorm statistics).
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def is_buffer_name(key: str) -> bool:
    """True for state-dict keys of BatchNorm buffers (not trained by the optimizer)."""
    return key.rsplit(".", 1)[-1] in _BUFFER_SUFFIXES


def _tiny_backbone() -> nn.Sequential:
    """Three stride-2 conv layers, 3 -> 16 -> 32 -> 64 channels: fast on a CPU at 32-64 px."""
    layers = collections.OrderedDict()
    for i, (cin, cout) in enumerate([(3, 16), (16, 32), (32, 64)], start=1):
        layers["conv%d" % i] = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        layers["bn%d" % i] = nn.BatchNorm2d(cout)
        layers["relu%d" % i] = nn.ReLU(inplace=True)
    return nn.Sequential(layers)


def build_backbone(name: str, weights: Optional[str] = None):
    """A trunk mapping frames [N, 3, H, W] -> feature maps [N, F, h, w]; returns (trunk, F).

    torchvision models are built with weights=None; pretrained weights come only from the file
    `weights` names (a torchvision state dict, with or without its `fc.` entries).
    """
    if name not in BACKBONES:
        raise ValueError("unknown backbone %r; choose one of %s" % (name, ", ".join(BACKBONES)))
    if name == "tiny":
        trunk, features = _tiny_backbone(), 64
    else:
        import torchvision
        full = getattr(torchvision.models, name)(weights=None)
        features = full.fc.in_features
        # Keep torchvision's child names (conv1, bn1, layer1, ...) so its weights load by name.
        trunk = nn.Sequential(collections.OrderedDict(
            (child, module) for child, module in full.named_children()
            if child not in ("avgpool", "fc")))
    if weights is not None:
        _load_backbone_weights(trunk, weights, name)
    return trunk, features


def _load_backbone_weights(trunk: nn.Module, path: str, name: str) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError("backbone weights %s: expected a state dict, got %s"
                         % (path, type(state).__name__))
    for prefix in ("module.", "backbone."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = trunk.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = ["%s: file %s, %s needs %s" % (k, tuple(state[k].shape), name, tuple(v.shape))
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError("backbone weights %s do not fit a %s trunk: missing %s; unexpected %s; "
                         "wrong shape %s" % (path, name, missing[:8], unexpected[:8], wrong[:8]))
    trunk.load_state_dict(state)


class CNNLSTM(nn.Module):
    """Per-frame CNN, LSTM over time, temporal pooling and a linear classifier.

    Args:
        num_classes: classifier outputs.
        spatial_dim: frame feature size fed to the LSTM; a `spatial_proj` Linear maps the
            backbone's F features to it only when F != spatial_dim.
        temporal_dim: LSTM hidden size per direction.
        num_layers: stacked LSTM layers.
        bidirectional: run the LSTM in both directions (output 2 * temporal_dim).
        backbone: one of BACKBONES ("tiny" is a 3-layer CNN with 64 output channels).
        pooling: temporal pooling, "mean" | "max" | "last" | "attention" (masked by `lengths`).
        dropout: between LSTM layers and before the classifier.
        fused: use cnnlstm_ext's FusedLSTM/FusedBiLSTM, else torch.nn.LSTM (same state dict).
        frame_pool: "avg" | "max" over each frame's feature map.
        backbone_weights: path of a torchvision state dict for the backbone (never downloaded);
            not part of `config`, since a checkpoint carries all weights anyway.

    Input `clips: [B, T, 3, H, W]` float, optional `lengths: [B]` int64 with 1 <= lengths <= T
    (frames past a clip's length are not run through the backbone and are ignored by the LSTM
    and the pooling). Output logits `[B, num_classes]`. Give `lengths` on the CPU, as a data
    loader yields them: then the forward never waits for the GPU. Lengths on the GPU are read back
    once, to check them.
    """

    def __init__(self, num_classes: int = 100, spatial_dim: int = 512, temporal_dim: int = 512,
                 num_layers: int = 3, bidirectional: bool = True, backbone: str = "resnet18",
                 pooling: str = "mean", dropout: float = 0.0, fused: bool = True,
                 frame_pool: str = "avg", backbone_weights: Optional[str] = None):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("spatial_dim", spatial_dim),
                            ("temporal_dim", temporal_dim), ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError("%s must be a positive int, got %r" % (name, value))
        if pooling not in POOLINGS:
            raise ValueError("pooling must be one of %s, got %r" % (POOLINGS, pooling))
        if frame_pool not in FRAME_POOLS:
            raise ValueError("frame_pool must be one of %s, got %r" % (FRAME_POOLS, frame_pool))
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError("dropout must be in [0, 1), got %r" % (dropout,))
        self.config = dict(num_classes=num_classes, spatial_dim=spatial_dim,
                           temporal_dim=temporal_dim, num_layers=num_layers,
                           bidirectional=bool(bidirectional), backbone=backbone, pooling=pooling,
                           dropout=float(dropout), fused=bool(fused), frame_pool=frame_pool)
        self.fused = bool(fused)
        directions = 2 if bidirectional else 1

        self.backbone, self.backbone_features = build_backbone(backbone, backbone_weights)
        self.frame_pool = FramePool(frame_pool, batch_first=False)
        self.spatial_proj = (nn.Linear(self.backbone_features, spatial_dim)
                             if self.backbone_features != spatial_dim else None)
        lstm_dropout = float(dropout) if num_layers > 1 else 0.0  # only between layers
        if fused and bidirectional:
            self.lstm = FusedBiLSTM(spatial_dim, temporal_dim, num_layers, dropout=lstm_dropout)
        else:
            lstm_cls = FusedLSTM if fused else nn.LSTM
            self.lstm = lstm_cls(spatial_dim, temporal_dim, num_layers, dropout=lstm_dropout,
                                 bidirectional=bool(bidirectional))
        self.temporal_pool = TemporalPool(pooling, dim=directions * temporal_dim,
                                          batch_first=False, bidirectional=bool(bidirectional))
        self.dropout = nn.Dropout(float(dropout))
        self.classifier = nn.Linear(directions * temporal_dim, num_classes)

    @classmethod
    def from_state_dict(cls, state_dict, strict: bool = True, **overrides) -> "CNNLSTM":
        """A model built from the architecture read off `state_dict`, with its weights loaded.

        `overrides` set what a state dict cannot tell (pooling mean/max/last, dropout, fused).
        """
        config = dict(infer_architecture(state_dict), **overrides)
        model = cls(**config)
        model.load_state_dict(_strip_wrappers(state_dict), strict=strict)
        return model

    def _check_input(self, clips, lengths):
        if not isinstance(clips, torch.Tensor) or clips.dim() != 5 or clips.shape[2] != 3:
            raise ValueError("CNNLSTM expects clips [B, T, 3, H, W], got %s"
                             % (list(clips.shape) if isinstance(clips, torch.Tensor)
                                else type(clips).__name__))
        if not clips.is_floating_point():
            raise TypeError("CNNLSTM expects floating-point clips, got %s" % clips.dtype)
        if lengths is None:
            return None
        B, T = clips.shape[:2]
        if not isinstance(lengths, torch.Tensor) or lengths.shape != (B,) \
                or lengths.dtype != torch.int64:
            raise ValueError("lengths must be an int64 tensor of shape [B]=[%d], got %s" % (
                B, "%s %s" % (lengths.dtype, tuple(lengths.shape))
                if isinstance(lengths, torch.Tensor) else type(lengths).__name__))
        lengths = lengths.cpu()  # the values decide the path below: one read-back if on a GPU
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 1 or hi > T:
            raise ValueError("lengths must lie in [1, T=%d], got min %d max %d" % (T, lo, hi))
        return lengths if lo < T else None  # every clip full: the path without lengths

    def forward(self, clips: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        lengths = self._check_input(clips, lengths)  # on the CPU, or None when all clips are full
        B, T = clips.shape[:2]
        frames = clips.reshape(B * T, *clips.shape[2:])                     # [B*T, 3, H, W]
        if lengths is not None:
            # Padding frames skip the backbone (and its BatchNorm statistics); their maps are 0.
            # The valid frames' indices are found on the CPU and copied without waiting, where a
            # boolean mask on the GPU would synchronise (twice) to learn N.
            valid = torch.arange(T)[None, :] < lengths[:, None]                # [B, T]
            index = valid.reshape(-1).nonzero().squeeze(1).to(clips.device, non_blocking=True)  # [N]
            maps_valid = self.backbone(frames.index_select(0, index))     # [N, F, h, w]
            maps = maps_valid.new_zeros((B * T,) + maps_valid.shape[1:])
            maps.index_copy_(0, index, maps_valid)
        else:
            maps = self.backbone(frames)                                  # [B*T, F, h, w]
        x = self.frame_pool(maps, B)                                      # [T, B, F]
        if self.spatial_proj is not None:
            x = self.spatial_proj(x)                                      # [T, B, S]
        y = self._run_lstm(x.contiguous(), lengths)                       # [T, B, D*H]
        pooled = self.temporal_pool(y, lengths)                           # [B, D*H]
        return self.classifier(self.dropout(pooled))                      # [B, num_classes]

    def _run_lstm(self, x, lengths):
        if lengths is None:
            return self.lstm(x)[0]
        if self.fused:
            return self.lstm(x, lengths=lengths)[0]
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)  # lengths on the CPU
        y, _ = self.lstm(packed)
        return pad_packed_sequence(y, total_length=x.shape[0])[0]


# --- reading an architecture off a state dict -------------------------------------------------

_LSTM_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)weight_ih_l(?P<layer>\d+)(?P<reverse>_reverse)?$")


def _strip_wrappers(state_dict):
    """Drop the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes shared by every key."""
    for prefix in ("module.", "_orig_mod."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = collections.OrderedDict(
                (k[len(prefix):], v) for k, v in state_dict.items())
    return state_dict


def _numel(t) -> int:
    return int(t.numel())


_BACKBONE_SHAPES = {}


def _backbone_shapes(name):
    """The ordered state-dict shapes of a backbone trunk (built on the meta device: no memory)."""
    if name not in _BACKBONE_SHAPES:
        with torch.device("meta"):
            trunk, features = build_backbone(name)
        _BACKBONE_SHAPES[name] = ([tuple(v.shape) for v in trunk.state_dict().values()], features)
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
    """The BACKBONES name whose trunk has exactly these (key, tensor) shapes in order, or None."""
    shapes = [tuple(v.shape) for _, v in items]
    convs = sum(1 for s in shapes if len(s) == 4)
    for name in BACKBONES:
        # Build (on meta) only the trunks with this many convolutions.
        if _conv_count(name) == convs and _backbone_shapes(name)[0] == shapes:
            return name
    return None


def describe_state_dict(state_dict) -> dict:
    """What a (possibly foreign) model state dict holds, found from names and shapes alone.

    Finds the LSTM (any prefix; `nn.LSTM` names), the backbone (the top-level modules holding
    4-D convolution weights, matched against BACKBONES), a spatial projection (backbone features
    -> LSTM input) and an attention score ([1, LSTM output]) if present, the classifier (the
    top-level module whose Linear layers read the LSTM output), and everything else.
    Returns a plain dict; `cnnlstm_config` is the CNNLSTM(**config) that fits exactly, or None
    with the reasons in `mismatch`.
    """
    sd = _strip_wrappers(collections.OrderedDict(state_dict))
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
        last_conv = [v for _, v in items if v.dim() == 4][-1]
        info["backbone"] = {
            "prefix": conv_tops[0] + "." if len(conv_tops) == 1 else None,
            "modules": conv_tops, "name": _identify_backbone(items) if len(conv_tops) == 1
            else None, "features": int(last_conv.shape[0]),
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
                   % (", ".join(backbone["modules"]), ", ".join(BACKBONES)))
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


def infer_architecture(state_dict) -> dict:
    """CNNLSTM(**config) kwargs read off a state dict (pooling reads as "mean" unless it has an
    attention score: mean, max and last hold no weights). Raises ValueError naming what does
    not fit when the state dict is not a CNNLSTM's."""
    info = describe_state_dict(state_dict)
    if info["cnnlstm_config"] is None:
        raise ValueError("state dict does not describe a CNNLSTM: " + "; ".join(info["mismatch"]))
    rules = canonical_names(info)
    if rules:
        raise ValueError("state dict has CNNLSTM's structure under other names; load it with "
                         "key_map=%r" % (rules,))
    return info["cnnlstm_config"]
