"""Reference models built on the fused modules."""
from .cnnlstm import BACKBONES, CNNLSTM, describe_state_dict, infer_architecture, weights_config

__all__ = ["CNNLSTM", "BACKBONES", "describe_state_dict", "infer_architecture", "weights_config"]
