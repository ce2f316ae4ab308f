"""cnnlstm_ext: fused LSTM and pooling kernels for CNN-LSTM video classifiers."""
import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.cnnlstm_ext.*)
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "cnnlstm_ext._C could not be loaded (%s). Build the extension with "
        "`pip install --no-build-isolation .` against the installed torch." % e) from e

from . import ops  # noqa: E402,F401  (fake kernels and autograd)
from . import backends  # noqa: E402,F401  (run-time options of the kernels)
from .nn import FusedLSTM, FusedBiLSTM, fuse_lstm, unfuse_lstm  # noqa: E402
from .nn import FramePool, TemporalPool  # noqa: E402
from .models import CNNLSTM  # noqa: E402
from .inference import load_model  # noqa: E402

__version__ = "0.1.0"


def cuda_kernels_built() -> bool:
    """True when this build carries the CUDA kernels (independent of a visible GPU)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        "cnnlstm_ext::lstm_layer_forward", "CUDA")


__all__ = ["FusedLSTM", "FusedBiLSTM", "fuse_lstm", "unfuse_lstm", "FramePool", "TemporalPool",
           "CNNLSTM", "load_model", "cuda_kernels_built", "ops", "backends"]
