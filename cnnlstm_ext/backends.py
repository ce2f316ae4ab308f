"""Run-time choices among the kernels' variants, in the style of `torch.backends.cudnn`.

    import cnnlstm_ext
    cnnlstm_ext.backends.lstm.path = "persistent"          # validated when set
    with cnnlstm_ext.backends.flags(lstm_path="stepwise", frame_pool_kernel="tile"):
        ...                                               # restored on exit

| option (attribute)                  | flags() keyword        | values (default first)          | environment variable               |
| ----------------------------------- | ---------------------- | ------------------------------- | ---------------------------------- |
| `lstm.path`                         | `lstm_path`            | auto, persistent, stepwise      | `CNNLSTM_EXT_LSTM_PATH`            |
| `lstm.mma`                          | `lstm_mma`             | False, True                     | `CNNLSTM_EXT_LSTM_MMA` (0/1)       |
| `lstm.exchange`                     | `lstm_exchange`        | barrier, tagged                 | `CNNLSTM_EXT_LSTM_EXCHANGE`        |
| `lstm.persistent_max_batch`         | `persistent_max_batch` | 32, any int >= 0                | `CNNLSTM_EXT_PERSISTENT_MAX_BATCH` |
| `lstm.persistent_min_hb`            | `persistent_min_hb`    | 0, any int >= 0                 | `CNNLSTM_EXT_PERSISTENT_MIN_HB`    |
| `frame_pool.kernel`                 | `frame_pool_kernel`    | pipelined, tile                 | `CNNLSTM_EXT_FRAME_POOL_KERNEL`    |
| `cpu.gemm`                          | `cpu_gemm`             | auto, aten, onednn              | `CNNLSTM_EXT_CPU_GEMM`             |

- `lstm.path` (CUDA): auto gives the persistent recurrence the batches up to
  `persistent_max_batch` whose plan fits on chip, the per-step path the rest; persistent or
  stepwise force one (a forced persistent path that cannot run a shape is an error saying why).
- `lstm.mma`: the tensor-core recurrent product for 16-bit weights (opt-in); `lstm.exchange`
  tagged: the persistent forward passes h as words tagged with their step (FMA product only);
  `lstm.persistent_min_hb`: the fewest hidden units per CTA of a persistent plan (0: any).
- `frame_pool.kernel` (CUDA, contiguous maps): the pipelined persistent grid or one block per tile
  (same results bit for bit).
- `cpu.gemm`: the CPU LSTM's large GEMMs through oneDNN (auto: where this torch has it) or ATen.

The environment variables are read once, when this module is imported (a bad value fails the
import with a message naming the variable); after that only the attributes count. The values live
in one C++ struct that the launchers read (csrc/options.h).
"""
import contextlib
import os
from typing import Any, Dict, Iterator

import torch

from . import ops

__all__ = ["lstm", "frame_pool", "cpu", "flags"]

# flags() keyword -> (choices, or the type of a number with its least value; default)
_SPEC: Dict[str, tuple] = {
    "lstm_path": (("auto", "persistent", "stepwise"), "auto"),
    "lstm_mma": (bool, False),
    "lstm_exchange": (("barrier", "tagged"), "barrier"),
    "persistent_max_batch": (int, 32),
    "persistent_min_hb": (int, 0),
    "frame_pool_kernel": (("pipelined", "tile"), "pipelined"),
    "cpu_gemm": (("auto", "aten", "onednn"), "auto"),
}
_ATTRIBUTE = {"lstm_path": "lstm.path", "lstm_mma": "lstm.mma", "lstm_exchange": "lstm.exchange",
              "persistent_max_batch": "lstm.persistent_max_batch",
              "persistent_min_hb": "lstm.persistent_min_hb",
              "frame_pool_kernel": "frame_pool.kernel", "cpu_gemm": "cpu.gemm"}
_ENV = {"lstm_path": "CNNLSTM_EXT_LSTM_PATH", "lstm_mma": "CNNLSTM_EXT_LSTM_MMA",
        "lstm_exchange": "CNNLSTM_EXT_LSTM_EXCHANGE",
        "persistent_max_batch": "CNNLSTM_EXT_PERSISTENT_MAX_BATCH",
        "persistent_min_hb": "CNNLSTM_EXT_PERSISTENT_MIN_HB",
        "frame_pool_kernel": "CNNLSTM_EXT_FRAME_POOL_KERNEL", "cpu_gemm": "CNNLSTM_EXT_CPU_GEMM"}

_values: Dict[str, Any] = {key: default for key, (_, default) in _SPEC.items()}


def _choices_text(choices) -> str:
    return ", ".join(choices[:-1]) + " or " + choices[-1]


def _onednn_available() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("mkldnn::_linear_pointwise", "CPU")


def _checked(key: str, value: Any, name: str) -> Any:
    """value as the option `key` takes it, or the error of nn-style argument checks."""
    kind, _ = _SPEC[key]
    if isinstance(kind, tuple):
        if not isinstance(value, str) or value not in kind:
            raise ValueError(f"{name} must be {_choices_text(kind)}, got {value!r}")
        if key == "cpu_gemm" and value == "onednn" and not _onednn_available():
            raise RuntimeError(f"{name}='onednn', but this torch has no CPU "
                               "mkldnn::_linear_pointwise")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _push() -> None:
    if not ops.kernels_built():  # nothing to configure; the fused ops say so when called
        return
    torch.ops.cnnlstm_ext.set_options(*(_values[key] for key in _SPEC))


def _from_environment() -> None:
    for key, variable in _ENV.items():
        raw = os.environ.get(variable, "")
        if raw == "":
            continue
        kind, _ = _SPEC[key]
        if kind is bool:
            if raw not in ("0", "1"):
                raise ValueError(f"{variable} must be 0 or 1, got {raw!r}")
            value: Any = raw == "1"
        elif kind is int:
            try:
                value = int(raw)
            except ValueError:
                raise ValueError(f"{variable} must be an integer >= 0, got {raw!r}") from None
        else:
            value = raw
        _values[key] = _checked(key, value, variable)


class _Group:
    """A set of options read and written as attributes (cnnlstm_ext.backends.lstm.path)."""

    def __init__(self, prefix: str, keys: Dict[str, str]):
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_keys", keys)

    def __getattr__(self, attribute: str) -> Any:
        keys = object.__getattribute__(self, "_keys")
        if attribute not in keys:
            raise AttributeError(f"cnnlstm_ext.backends.{self._prefix} has no option "
                                 f"{attribute!r}; it has {', '.join(keys)}")
        return _values[keys[attribute]]

    def __setattr__(self, attribute: str, value: Any) -> None:
        if attribute not in self._keys:
            raise AttributeError(f"cnnlstm_ext.backends.{self._prefix} has no option "
                                 f"{attribute!r}; it has {', '.join(self._keys)}")
        key = self._keys[attribute]
        _values[key] = _checked(key, value, f"cnnlstm_ext.backends.{_ATTRIBUTE[key]}")
        _push()

    def __dir__(self):
        return list(self._keys)

    def __repr__(self) -> str:
        items = ", ".join(f"{a}={_values[k]!r}" for a, k in self._keys.items())
        return f"cnnlstm_ext.backends.{self._prefix}({items})"


lstm = _Group("lstm", {"path": "lstm_path", "mma": "lstm_mma", "exchange": "lstm_exchange",
                       "persistent_max_batch": "persistent_max_batch",
                       "persistent_min_hb": "persistent_min_hb"})
frame_pool = _Group("frame_pool", {"kernel": "frame_pool_kernel"})
cpu = _Group("cpu", {"gemm": "cpu_gemm"})


@contextlib.contextmanager
def flags(**options: Any) -> Iterator[None]:
    """Sets the given options (keywords of the table above) for the block, then restores the
    previous values, as torch.backends.cudnn.flags does. Every value is checked before any is
    set."""
    unknown = sorted(set(options) - set(_SPEC))
    if unknown:
        raise TypeError(f"flags() got unexpected keyword argument(s) {', '.join(unknown)}; it "
                        f"takes {', '.join(_SPEC)}")
    checked = {key: _checked(key, value, f"cnnlstm_ext.backends.{_ATTRIBUTE[key]}")
               for key, value in options.items()}
    saved = dict(_values)
    _values.update(checked)
    _push()
    try:
        yield
    finally:
        _values.clear()
        _values.update(saved)
        _push()


_from_environment()
_push()
