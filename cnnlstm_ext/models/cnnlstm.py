"""The reference CNN-LSTM video classifier, and reading its architecture off a state dict.

    clips [B, T, 3, H, W] --backbone--> maps [B*T, F, h, w] --frame_pool--> [T, B, F]
      --spatial_proj (only when F != spatial_dim)--> [T, B, S] --lstm--> [T, B, D*H]
      --temporal_pool--> [B, D*H] --dropout, classifier--> logits [B, num_classes]

with S = spatial_dim, H = temporal_dim (hidden size per direction), D = 2 when bidirectional.
State-dict prefixes: `backbone.`, `spatial_proj.`, `lstm.`, `temporal_pool.` (attention only),
`classifier.`. The LSTM's names are exactly `nn.LSTM`'s whether `fused` is on or off, so a state
dict (and an optimizer state) moves between the two unchanged.

Parameter count of the default model, `CNNLSTM()` (resnet18, 512 -> 3 x BiLSTM 512, mean pooling,
100 classes), next to the existing run's (docs/checkpoint_format.md):

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
import os
from typing import Optional

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..checkpoint.inspect import canonical_names, describe_state_dict, is_buffer_name
from ..checkpoint.legacy import strip_prefixes
from .. import ops
from ..nn import FramePool, FusedBiLSTM, FusedLSTM, TemporalPool

__all__ = ["CNNLSTM", "BACKBONES", "infer_architecture", "weights_config", "describe_state_dict", "is_buffer_name"]

# torchvision ResNet-family trunks (built with weights=None) and "tiny", a small CNN for CPU runs.
BACKBONES = ("tiny", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
             "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
             "wide_resnet50_2", "wide_resnet101_2")
POOLINGS = ("mean", "max", "last", "attention")
FRAME_POOLS = ("avg", "max")


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
    if not os.path.isfile(path):
        # Only a new run reads this file: checkpoints carry the backbone's weights, and loading
        # one (load_model, evaluate, predict, train --resume) builds the model without it.
        raise FileNotFoundError(
            "model.backbone_weights: %s not found (the %s weights a new run starts from; "
            "loading or resuming a checkpoint does not need it)" % (path, name))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError("backbone weights %s: expected a state dict, got %s"
                         % (path, type(state).__name__))
    state = strip_prefixes(state, ("module.", "backbone."))
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
        backbone_weights: path of a torchvision state dict the backbone starts from (never
            downloaded); read only here, by a new model: not part of `config`, since a
            checkpoint carries all weights (`weights_config` drops it for a model that will
            load them).
        freeze_backbone: the backbone gets no gradients and stays in eval mode (its BatchNorm
            statistics fixed): train the temporal model on a fixed trunk (see frame_features).

    Input `clips: [B, T, 3, H, W]` float, optional `lengths: [B]` int64 with 1 <= lengths <= T
    (frames past a clip's length are not run through the backbone and are ignored by the LSTM
    and the pooling). Output logits `[B, num_classes]`. Give `lengths` on the CPU, as a data
    loader yields them: then the forward never waits for the GPU. Lengths on the GPU are read back
    once, to check them.
    """

    def __init__(self, num_classes: int = 100, spatial_dim: int = 512, temporal_dim: int = 512,
                 num_layers: int = 3, bidirectional: bool = True, backbone: str = "resnet18",
                 pooling: str = "mean", dropout: float = 0.0, fused: bool = True,
                 frame_pool: str = "avg", backbone_weights: Optional[str] = None,
                 freeze_backbone: bool = False):
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
        # A fixed (pretrained) trunk: no gradients, and BatchNorm keeps its statistics (eval mode
        # whatever train() says); not part of `config`, as it changes no weight's shape.
        self.freeze_backbone = bool(freeze_backbone)
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    @classmethod
    def from_state_dict(cls, state_dict, strict: bool = True, **overrides) -> "CNNLSTM":
        """A model built from the architecture read off `state_dict`, with its weights loaded.

        `overrides` set what a state dict cannot tell (pooling mean/max/last, dropout, fused).
        The keys may come in any order (safetensors' `load_file` returns them sorted).
        """
        config = dict(infer_architecture(state_dict), **overrides)
        model = cls(**config)
        model.load_state_dict(strip_prefixes(state_dict), strict=strict)
        return model

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: a clear error instead of TorchScript's complaint
        # about the first line it cannot compile (the fused ops' Python faces).
        raise RuntimeError(
            "CNNLSTM does not support torch.jit.script. Use torch.export.export(model, (clips,) or "
            "(clips, lengths), dynamic_shapes=...) (batch size, clip length and lengths stay "
            "dynamic) or torch.compile(model); torch.jit.trace(model, args) also works and holds "
            "at other batch sizes, clip lengths and lengths.")

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
        if torch.jit.is_tracing():
            # A trace records no Python branch on values: it keeps the lengths path, which holds
            # for every lengths (full ones included), and checks nothing it could not record.
            return lengths
        if torch.compiler.is_exporting():
            # No branch on the values either (they are unknown), but the bounds become checks
            # of the exported program: a length outside [1, T] fails there, naming the bound.
            lo, hi = lengths.min().item(), lengths.max().item()
            ops.traced_check(lo >= 1, lambda: "lengths must lie in [1, T]: a length is below 1")
            ops.traced_check(hi <= T, lambda: "lengths must lie in [1, T]: a length exceeds T")
            return lengths
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 1 or hi > T:
            raise ValueError("lengths must lie in [1, T=%d], got min %d max %d" % (T, lo, hi))
        return lengths if lo < T else None  # every clip full: the path without lengths

    def forward(self, clips: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        lengths = self._check_input(clips, lengths)  # on the CPU, or None when all clips are full
        return self._head(self._frame_features(clips, lengths), lengths)

    def frame_features(self, clips: torch.Tensor, lengths: Optional[torch.Tensor] = None
                       ) -> torch.Tensor:
        """The pooled backbone features of every frame, `[B, T, F]` (0 past a clip's length):
        what a frozen backbone gives `forward_features` (a feature cache stores these)."""
        lengths = self._check_input(clips, lengths)
        return self._frame_features(clips, lengths).transpose(0, 1)

    def forward_features(self, features: torch.Tensor, lengths: Optional[torch.Tensor] = None
                         ) -> torch.Tensor:
        """Logits `[B, num_classes]` from `frame_features` `[B, T, F]`: the model after the
        backbone (projection, LSTM, pooling, classifier)."""
        if features.dim() != 3 or features.shape[2] != self.backbone_features:
            raise ValueError("forward_features expects [B, T, %d] features, got %s"
                             % (self.backbone_features, list(features.shape)))
        if lengths is not None:
            lengths = lengths.cpu()
            if bool((lengths >= features.shape[1]).all()):
                lengths = None
        return self._head(features.transpose(0, 1), lengths)

    def _frame_features(self, clips, lengths):
        B, T = clips.shape[:2]
        frames = clips.reshape(B * T, *clips.shape[2:])                     # [B*T, 3, H, W]
        if lengths is not None:
            # Padding frames skip the backbone (and its BatchNorm statistics); their maps are 0.
            # The valid frames' indices are found on the CPU and copied without waiting, where a
            # boolean mask on the GPU would synchronise (twice) to learn N.
            valid = torch.arange(T)[None, :] < lengths[:, None]                # [B, T]
            index = valid.reshape(-1).nonzero().squeeze(1).to(clips.device, non_blocking=True)  # [N]
            if torch.compiler.is_compiling():
                # N >= B >= 1 (every length >= 1): the bounds torch.export needs for the N it
                # cannot know.
                torch._check(index.shape[0] >= 1)
                torch._check(index.shape[0] <= B * T)
            maps_valid = self.backbone(frames.index_select(0, index))     # [N, F, h, w]
            maps = maps_valid.new_zeros((B * T,) + maps_valid.shape[1:])
            maps.index_copy_(0, index, maps_valid)
        else:
            maps = self.backbone(frames)                                  # [B*T, F, h, w]
        return self.frame_pool(maps, B)                                   # [T, B, F]

    def _head(self, x, lengths):
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


def weights_config(model_config: dict) -> dict:
    """CNNLSTM keyword arguments for a model whose weights will come from a checkpoint: the
    run's `model` config without `backbone_weights`, the file a new run's backbone started from
    (the checkpoint holds those weights, trained on; the file may be gone)."""
    return {k: v for k, v in model_config.items() if k != "backbone_weights"}


# --- reading an architecture off a state dict -------------------------------------------------
# describe_state_dict and canonical_names (cnnlstm_ext/checkpoint/inspect.py) read any state dict;
# infer_architecture turns what they find into CNNLSTM's arguments.

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
