"""Drop-in modules backed by the fused ops."""
from .lstm import FusedBiLSTM, FusedLSTM, fuse_lstm, unfuse_lstm
from .pooling import FramePool, TemporalPool

__all__ = ["FusedLSTM", "FusedBiLSTM", "fuse_lstm", "unfuse_lstm", "FramePool", "TemporalPool"]
