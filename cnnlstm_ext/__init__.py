"""cnnlstm_ext: fused LSTM and pooling kernels for CNN-LSTM video classifiers."""
import torch

# ops loads the compiled kernels (_C). Without them the package still imports (checkpoint tools,
# models, reference ops); calling a fused op raises ops.KernelsNotBuiltError naming the build.
from . import ops  # noqa: E402,F401  (fake kernels and autograd)
from . import backends  # noqa: E402,F401  (run-time options of the kernels)
from .nn import FusedLSTM, FusedBiLSTM, fuse_lstm, unfuse_lstm  # noqa: E402
from .nn import FramePool, TemporalPool  # noqa: E402
from .models import CNNLSTM  # noqa: E402
from .inference import load_model  # noqa: E402

__version__ = "0.1.0"


def cuda_kernels_built() -> bool:
    """True when this build carries the CUDA kernels (independent of a visible GPU)."""
    return ops.kernels_built() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "cnnlstm_ext::lstm_layer_forward", "CUDA")


__all__ = ["FusedLSTM", "FusedBiLSTM", "fuse_lstm", "unfuse_lstm", "FramePool", "TemporalPool",
           "CNNLSTM", "load_model", "cuda_kernels_built", "ops", "backends"]
