"""`FusedLSTM`: a drop-in for `torch.nn.LSTM` on the fused layer op.

Parameters carry `nn.LSTM`'s names, shapes, initialisation and registration order
(`weight_ih_l{k}[_reverse]`, `weight_hh_l{k}[_reverse]`, `bias_ih_l{k}[_reverse]`,
`bias_hh_l{k}[_reverse]`, `weight_hr_l{k}[_reverse]` with projections), so state dicts and
optimizer states move between the two unchanged. Each layer runs both directions in one op call;
inter-layer dropout is applied as nn.LSTM does.
"""
import contextlib
import math
import numbers
import warnings
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import ops

__all__ = ["FusedLSTM", "FusedBiLSTM", "fuse_lstm", "unfuse_lstm", "HiddenStateError",
           "InputDtypeError"]

_HX = Tuple[Tensor, Tensor]

# The error of torch.jit.script (TorchScript cannot compile the Python around the op calls:
# PackedSequence, lengths, autocast, the torch.func fallback).
SCRIPT_UNSUPPORTED = (
    "{name} does not support torch.jit.script. Use torch.export.export(model, args, "
    "dynamic_shapes=...) (batch size, sequence length and lengths stay dynamic) or "
    "torch.compile(model); torch.jit.trace(model, args) also works and holds at other batch "
    "sizes and sequence lengths; or cnnlstm_ext.unfuse_lstm(model) to script with torch.nn.LSTM.")


class HiddenStateError(RuntimeError, TypeError, IndexError, KeyError):
    """An hx that is not two tensors of the input's dimensions. nn.LSTM raises a RuntimeError for
    some of these and a TypeError, IndexError or (a dict) KeyError from inside its code for
    others; this is all four, so that code catching what nn.LSTM raised catches it. (nn.LSTM's
    AttributeError for a None in hx is left out: an AttributeError escaping forward would read
    as a missing attribute to hasattr and getattr.)"""

    __str__ = RuntimeError.__str__  # the message as it is (KeyError's would be quoted)


class InputDtypeError(ValueError, RuntimeError):
    """An input whose dtype differs from the parameters': nn.LSTM's ValueError, and the
    RuntimeError its kernels raise for a PackedSequence."""


def _check_hx_dims(hx: Optional[_HX], batched: bool) -> None:
    """nn.LSTM's check that hx has the input's dimensions (3-D for batched and packed input)."""
    n = 3 if batched else 2
    if hx is not None and (hx[0].dim() != n or hx[1].dim() != n):
        raise HiddenStateError(f"For {'batched 3-D' if batched else 'unbatched 2-D'} input, hx "
                               f"and cx should also be {n}-D but got ({hx[0].dim()}-D, "
                               f"{hx[1].dim()}-D) tensors")


def _stored_back_to_back(params: List[Tensor]) -> bool:
    """Whether `params` (same shape) lie one after another in one contiguous storage."""
    p0 = params[0]
    base = p0.untyped_storage().data_ptr()
    for k, p in enumerate(params):
        if (not p.is_contiguous() or p.shape != p0.shape or p.dtype != p0.dtype
                or p.device != p0.device or p.untyped_storage().data_ptr() != base
                or p.storage_offset() != p0.storage_offset() + k * p0.numel()):
            return False
    return True


def _share_storage(params: List[Tensor]) -> bool:
    ptrs = [p.untyped_storage().data_ptr() for p in params]
    return len(set(ptrs)) < len(ptrs)


def _keepable(t: Tensor) -> bool:
    """Whether tensors made from `t` may be kept between calls: `t` is a plain tensor and no
    dispatch mode is active (a FakeTensorMode's tensors would be fake, and would reach later real
    calls)."""
    return type(t) in (Tensor, nn.Parameter) and _get_current_dispatch_mode() is None


def _flatten_after_load(module: "FusedLSTM", incompatible_keys) -> None:
    module.flatten_parameters()


def _cuda_kernels_built() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        "cnnlstm_ext::lstm_layer_forward", "CUDA")


class FusedLSTM(nn.Module):
    r"""Multi-layer LSTM with the constructor, parameters and forward of :class:`torch.nn.LSTM`.

    ``forward(input, hx=None, lengths=None)`` accepts a padded tensor ``[T, B, I]`` (``[B, T, I]``
    with ``batch_first``), an unbatched ``[T, I]`` tensor or a ``PackedSequence``, and returns
    ``(output, (h_n, c_n))`` exactly as ``nn.LSTM`` does. ``lengths`` (``[B]`` int64, an addition
    to nn.LSTM's signature) runs padded input with per-sequence lengths without packing: steps past
    a sequence's length are not computed, its output there is zero, and ``h_n``/``c_n`` hold the
    state at its last valid step (the first step for the reverse direction), as with packing.
    ``lengths`` on the CPU cost the GPU nothing; on a GPU they are read back once to be checked
    (except while a CUDA graph is captured, which takes them only on the GPU, unchecked).
    ``proj_size > 0`` (projections, as nn.LSTM's: ``h_t = W_hr (o_t * tanh(c_t))``, ``h_n`` and
    the output of size proj_size) runs each layer step by step in ATen operators
    (``cnnlstm_ext::lstm_layer_projected``) on every device: nn.LSTM's results and transforms,
    without the fused kernels' speed.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device=None, dtype=None) -> None:
        super().__init__()
        # nn.LSTM's (RNNBase's) checks, in its order and with its exception types and messages;
        # the attributes are set first, as there (so that float(dropout) fails the same way).
        self.mode = "LSTM"
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        if not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1 or isinstance(dropout, bool):
            raise ValueError("dropout should be a number in range [0, 1] representing the "
                             "probability of an element being zeroed")
        if dropout > 0 and num_layers == 1:  # nn.LSTM's warning
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so "
                          f"non-zero dropout expects num_layers greater than 1, but got "
                          f"dropout={dropout} and num_layers={num_layers}", stacklevel=2)
        if not isinstance(bias, bool):
            raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
        if not isinstance(batch_first, bool):
            raise TypeError(
                f"batch_first should be of type bool, got: {type(batch_first).__name__}")
        if not isinstance(input_size, int):
            raise TypeError(f"input_size should be of type int, got: {type(input_size).__name__}")
        if input_size <= 0:
            raise ValueError("input_size must be greater than zero")
        if not isinstance(hidden_size, int):
            raise TypeError(f"hidden_size should be of type int, got: {type(hidden_size).__name__}")
        if hidden_size <= 0:
            raise ValueError("hidden_size must be greater than zero")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        num_directions = 2 if bidirectional else 1
        factory = {"device": device, "dtype": dtype}
        self._flat_weights_names: List[str] = []
        self._all_weights: List[List[str]] = []
        # Per layer: the names of its slice of the flat weights (the op's `weights` argument).
        self._layer_names: List[List[str]] = []
        # (device, dtype, batch) -> per-layer (h0, c0) zeros: the initial state when hx is None.
        self._zero_state = None
        # Per layer (key, weights cast to autocast's dtype), kept between inference calls.
        self._autocast_weights = {}
        real_hidden_size = proj_size if proj_size > 0 else hidden_size
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else real_hidden_size * num_directions
            for direction in range(num_directions):
                suffix = "_reverse" if direction == 1 else ""
                params = [("weight_ih_l{}{}", (4 * hidden_size, layer_input)),
                          ("weight_hh_l{}{}", (4 * hidden_size, real_hidden_size))]
                if bias:
                    params += [("bias_ih_l{}{}", (4 * hidden_size,)),
                               ("bias_hh_l{}{}", (4 * hidden_size,))]
                if proj_size > 0:
                    params += [("weight_hr_l{}{}", (proj_size, hidden_size))]
                names = []
                for fmt, shape in params:
                    name = fmt.format(layer, suffix)
                    setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
                    names.append(name)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
            self._layer_names.append([n for names in self._all_weights[-num_directions:]
                                      for n in names])
        self.reset_parameters()
        self.flatten_parameters()
        # load_state_dict(assign=True) installs new tensors: store them back to back again.
        self.register_load_state_dict_post_hook(_flatten_after_load)

    def reset_parameters(self) -> None:
        """nn.LSTM's initialisation: U(-1/sqrt(H), 1/sqrt(H)) for every parameter."""
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    @property
    def all_weights(self) -> List[List[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    @property
    def _flat_weights(self) -> List[Tensor]:
        return [getattr(self, name) for name in self._flat_weights_names]

    # nn.LSTM's own argument checks and hidden-state helpers, for code that calls them
    # (subclasses, wrappers): the same functions, which read only attributes that this module
    # shares with nn.LSTM. forward runs its own checks, with the same words.
    check_input = nn.RNNBase.check_input
    get_expected_hidden_size = nn.RNNBase.get_expected_hidden_size
    check_hidden_size = nn.RNNBase.check_hidden_size
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def _init_flat_weights(self) -> None:
        """What nn.LSTM's does after its weights were replaced: here, flatten_parameters."""
        self.flatten_parameters()

    def flatten_parameters(self) -> None:
        """On a GPU, stores each layer's per-direction weights (and biases) back to back in one
        buffer, as nn.LSTM keeps its weights in cuDNN's flat buffer there: the CUDA kernels read
        a layer's weights as one [D, 4H, I] / [D, 4H, H] tensor, and with this layout the op
        views the parameters instead of copying them on every call (parameters stored otherwise
        still work, with a copy per call). Elsewhere each parameter has a storage of its own, as
        nn.LSTM's (the CPU kernels read each direction where it lies; tools such as
        safetensors' save_model refuse shared storage). Parameter objects are kept (their
        `.data` moves), so optimizers and modules sharing them are unaffected. Called on
        construction, after `to()`/`cuda()`/`half()` and after `load_state_dict`.
        """
        self._zero_state = None
        self._autocast_weights = {}
        if not self.bidirectional or torch.compiler.is_compiling():
            return
        with torch.no_grad():
            for layer in range(self.num_layers):
                per_direction = self._all_weights[2 * layer:2 * layer + 2]
                for names in zip(*per_direction):
                    params = [getattr(self, name) for name in names]
                    device = params[0].device.type
                    if device == "cuda" and not _stored_back_to_back(params):
                        buf = torch.stack([p.detach() for p in params])
                        for p, b in zip(params, buf):
                            p.data = b
                    elif device not in ("cuda", "meta") and _share_storage(params):
                        for p in params:  # (a module pickled when CPU weights were shared)
                            p.data = p.detach().clone()

    def _apply(self, fn, recurse=True):
        ret = super()._apply(fn, recurse)
        self.flatten_parameters()
        return ret

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "_zero_state": None, "_autocast_weights": {}}

    def __setstate__(self, state):
        super().__setstate__(state)
        # Rebuilt, not trusted: modules pickled by earlier versions grouped these names by kind
        # and kept a cache of stacked weights.
        self.__dict__.pop("_weight_cache", None)
        self.__dict__.setdefault("_autocast_weights", {})
        D = 2 if self.bidirectional else 1
        self._layer_names = [[n for names in self._all_weights[D * layer:D * (layer + 1)]
                              for n in names] for layer in range(self.num_layers)]

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every module it is given (and on their submodules):
        # a clear error instead of TorchScript's complaint about the first line it cannot compile.
        raise RuntimeError(SCRIPT_UNSUPPORTED.format(name=type(self).__name__))

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        return s.format(**self.__dict__)

    # ----------------------------------------------------------------------------------------
    def _layer_weights(self, layer: int) -> List[Tensor]:
        """The layer's slice of the flat weights: per direction w_ih, w_hh (, b_ih, b_hh)."""
        found = self._parameters
        return [found[n] if n in found else getattr(self, n) for n in self._layer_names[layer]]

    def _autocast_layer_weights(self, layer: int, dtype: Optional[torch.dtype]) -> List[Tensor]:
        """The layer's weights, cast to `dtype` (autocast's for the input's device; None outside
        an autocast region) when no gradient is needed. The op would cast them at every call (for the model's LSTM about
        70 MB read and 35 MB written: at B = 1 most of an inference call), so the copies are
        kept until a weight changes (in place, or replaced), the module is moved or
        converted, or a state dict is loaded: half the float32 weights' memory, held while the
        module is used under autocast. (An edit through `.data` changes neither the version nor
        the address: torch's autocast(cache_enabled=False) turns the copies off, as it does
        autocast's own cache.) Under grad, compile, trace, the torch.func transforms and dispatch
        modes the op casts, as without this."""
        weights = self._layer_weights(layer)
        if (dtype is None or weights[0].dtype in (dtype, torch.float64)
                or not torch.is_autocast_cache_enabled()
                or (torch.is_grad_enabled() and any(w.requires_grad for w in weights))
                or torch.compiler.is_compiling() or torch.jit.is_tracing()
                or ops.transform_active() or not _keepable(weights[0])):
            return weights
        # The weights themselves are held (so that no other tensor can take their memory), with
        # their versions, which in-place updates (an optimizer's step) advance.
        key = (dtype, [w._version for w in weights], [w.data_ptr() for w in weights])
        cached = self._autocast_weights.get(layer)
        if (cached is None or cached[0] != key
                or any(a is not b for a, b in zip(cached[2], weights))):
            # One copy per kind, both directions back to back, as the op reads them in place.
            # The op adds b_ih and b_hh in float32 before it rounds their sum: the copies are that
            # rounded sum and zeros, so that the results are those of the op's own cast.
            D = 2 if self.bidirectional else 1
            per = len(weights) // D
            # (Outside inference mode: inference tensors kept here would fail a later call whose
            # autograd saves them.)
            with torch.no_grad(), torch.inference_mode(False):
                kinds = [torch.stack(weights[k::per]) for k in range(per)]
                if per == 4:
                    kinds[2:] = [kinds[2].float() + kinds[3].float(), torch.zeros_like(kinds[3])]
                kinds = [k.to(dtype) for k in kinds]
            cast = [kinds[k][d] for d in range(D) for k in range(per)]
            self._autocast_weights[layer] = cached = (key, cast, weights)
        return cached[1]

    def _check_input(self, x: Tensor, hx: Optional[_HX], batch: int) -> None:
        """nn.LSTM's checks of x [T, B, I] and hx, in its order, types and messages: those of
        RNNBase.check_forward_args (dtype, input size, state shapes), then of the native RNN
        (devices of the states and parameters, an empty sequence)."""
        weight = self.weight_ih_l0
        # Under autocast the op casts everything to autocast's dtype, so (as in nn.LSTM) the
        # input may differ from the parameters, e.g. bfloat16 features from an autocast Linear;
        # but autocast leaves float64 alone, so a float64 input or module runs as it is.
        autocast = ops.autocast_dtype(x.device.type) is not None
        if x.dtype != weight.dtype and not autocast:
            raise InputDtypeError(f"RNN input dtype ({x.dtype}) does not match weight dtype "
                                  f"({weight.dtype}). Convert input: input.to({weight.dtype}), or "
                                  f"convert model: model.to({x.dtype})")
        if x.dtype != weight.dtype and torch.float64 in (x.dtype, weight.dtype):
            # (nn.LSTM fails here inside its kernels, with words of their own.)
            raise RuntimeError(f"autocast does not cast float64: the input ({x.dtype}) and the "
                               f"parameters ({weight.dtype}) must then have the same dtype; "
                               f"convert one to match")
        autocast = autocast and x.dtype != torch.float64
        if x.size(-1) != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected "
                               f"{self.input_size}, got {x.size(-1)}")
        if hx is not None:
            layers = self.num_layers * (2 if self.bidirectional else 1)
            for name, t, size in zip(("hidden[0]", "hidden[1]"), hx,
                                     (self.proj_size or self.hidden_size, self.hidden_size)):
                expected = (layers, batch, size)
                if tuple(t.shape) != expected:
                    raise RuntimeError(f"Expected {name} size {expected}, got {list(t.shape)}")
            for t in hx:
                if t.device != x.device:
                    raise RuntimeError(f"Input and hidden tensors are not at the same device, "
                                       f"found input tensor at {x.device} and hidden tensor at "
                                       f"{t.device}")
        if weight.device != x.device:
            raise RuntimeError(f"Input and parameter tensors are not at the same device, found "
                               f"input tensor at {x.device} and parameter tensor at "
                               f"{weight.device}")
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if hx is not None and not autocast:
            # (nn.LSTM fails here inside its kernels, with words of their own.)
            for name, t in zip(("hx", "cx"), hx):
                if t.dtype != weight.dtype:
                    raise RuntimeError(f"{name} has dtype {t.dtype} but the parameters have "
                                       f"dtype {weight.dtype}; convert one to match (e.g. "
                                       f"module.to(dtype))")
        # (Not under compile: some torch versions' dynamo cannot trace the dispatcher query.)
        if (x.device.type == "cuda" and not torch.compiler.is_compiling()
                and not _cuda_kernels_built()):
            raise RuntimeError("cnnlstm_ext was built without its CUDA kernels, so FusedLSTM cannot "
                               "run on CUDA tensors; rebuild with a CUDA toolkit "
                               "(CNNLSTM_EXT_CUDA=1 pip install --no-build-isolation .)")
        if not torch.is_floating_point(x):
            raise RuntimeError(f"expected a floating-point input, got {x.dtype}")

    def _layer_states(self, x: Tensor, hx: Optional[_HX], batch: int) -> List[_HX]:
        """Per layer (h0 [D, B, P], c0 [D, B, H]; P = proj_size or H): views of hx, or zeros
        when hx is None.

        The zeros are kept between calls of the same device, dtype and batch: the op only reads
        them, and a call saves their allocation and fill. (Not under compile, nor under a
        torch.func transform or a dispatch mode, whose tensors must not outlive them.)
        """
        D = 2 if self.bidirectional else 1
        if hx is not None:
            return list(zip(hx[0].split(D), hx[1].split(D)))
        if (torch.compiler.is_compiling() or ops.transform_active() or torch.jit.is_tracing()
                or not _keepable(x)):
            # Fresh zeros, sized from x: a trace records x.size(1) (so it holds at other batch
            # sizes) and export keeps it symbolic, where a cached tensor would be a constant.
            return [self._zeros(x, D, x.size(1))] * self.num_layers
        key = (x.device, x.dtype, batch)
        if self._zero_state is None or self._zero_state[0] != key:
            with torch.inference_mode(False):  # (see _autocast_layer_weights)
                self._zero_state = (key, [self._zeros(x, D, batch)] * self.num_layers)
        return self._zero_state[1]

    def _zeros(self, x: Tensor, D: int, batch) -> _HX:
        c0 = x.new_zeros(D, batch, self.hidden_size)
        return (x.new_zeros(D, batch, self.proj_size) if self.proj_size > 0 else c0), c0

    def _run(self, x: Tensor, states: List[_HX], lengths: Optional[Tensor]) -> Tuple[Tensor, _HX]:
        """x: [T, B, I], states: per layer (h0 [D, B, P], c0 [D, B, H]) -> output [T, B, D*P],
        (h_n [L*D, B, P], c_n [L*D, B, H]); P = proj_size or H."""
        h_n, c_n = [], []
        y = x
        autocast = ops.autocast_dtype(x.device.type)  # (once for all layers)
        for layer, (h0, c0) in enumerate(states):
            if layer > 0 and self.dropout > 0 and self.training:
                y = F.dropout(y, p=self.dropout, training=True)
            y, h, c = ops.lstm_layer(y.contiguous(), self._autocast_layer_weights(layer, autocast),
                                     h0.contiguous(), c0.contiguous(), lengths)
            h_n.append(h)
            c_n.append(c)
        if self.bidirectional and y.requires_grad and not torch.jit.is_tracing():
            # The op saves its y for the backward. nn.LSTM's bidirectional output is a new tensor
            # (the directions concatenated), which callers may change in place (out.relu_())
            # before the backward: so is this one. (Not in a trace: its check reruns the model
            # without gradients, and the graphs must agree.)
            y = y.clone()
        return y, (torch.cat(h_n, 0), torch.cat(c_n, 0))

    def _lengths_on(self, lengths, batch: int, steps: int, device: torch.device) -> Tensor:
        lengths = torch.as_tensor(lengths)
        if lengths.dim() != 1 or lengths.numel() != batch:
            raise ValueError(f"lengths must have shape [{batch}] (one length per sequence), got "
                             f"{list(lengths.shape)}")
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
        compiling = torch.compiler.is_compiling()
        capturing = (not compiling and device.type == "cuda"
                     and torch.cuda.is_current_stream_capturing())
        if capturing and lengths.device != device:
            # A host-to-device copy in a CUDA graph would read the host memory at each replay.
            raise RuntimeError(f"FusedLSTM: while a CUDA graph is captured, lengths must already be "
                               f"on {device} (a static input of the graph), got lengths on "
                               f"{lengths.device}")
        if torch.compiler.is_exporting():
            # The values are unknown while torch.export traces: the bounds become checks that
            # the exported program runs on each call (no Python branch on them here).
            lo, hi = (v.item() for v in torch.aminmax(lengths))
            ops.traced_check(lo >= 1, lambda: "lengths must be in [1, T] (the padded length); "
                                              "got a length below 1")
            ops.traced_check(hi <= steps, lambda: "lengths must be in [1, T] (the padded "
                                                  "length); got a length above T")
        elif not compiling and not capturing and not torch.jit.is_tracing() and batch > 0:
            # Free for lengths on the CPU; lengths on a GPU are read back (one synchronisation),
            # except while a CUDA graph is captured, which forbids it: their values are then
            # not checked (the forward kernels clamp each length to [1, T]), nor under
            # torch.jit.trace, which could not record the check.
            lo, hi = (int(v) for v in torch.aminmax(lengths))
            if lo < 1 or hi > steps:
                raise ValueError(f"lengths must be in [1, {steps}] (the padded length); got "
                                 f"values in [{lo}, {hi}]")
        if compiling:  # (torch.compile and strict torch.export cannot trace is_pinned)
            return lengths.to(device=device, dtype=torch.long)
        # A copy from the CPU that does not wait for the device. From pageable memory the host
        # values are read before it returns; pinned lengths (a DataLoader's) are copied first, so
        # that a later write to them cannot reach the transfer.
        if lengths.is_pinned():
            lengths = lengths.clone()
        return lengths.to(device=device, dtype=torch.long, non_blocking=True)

    def _fx_leaf(self, input: torch.fx.Proxy, hx, lengths):
        """Under torch.fx.symbolic_trace: one call_module node for this module, as the tracer
        records nn.LSTM (a module of torch.nn is a leaf; its forward's checks of the input
        could not run on proxies). None when this module is the one traced."""
        tracer = input.tracer
        try:
            path = tracer.path_of_module(self)
        except NameError:
            return None
        if not path:
            return None
        kwargs = {k: v for k, v in (("hx", hx), ("lengths", lengths)) if v is not None}
        return tracer.create_proxy("call_module", path, (input,), kwargs)

    @torch.compiler.disable
    def _forward_packed(self, input: PackedSequence, hx: Optional[_HX]):
        """forward of a PackedSequence. Run eagerly under torch.compile, as dynamo runs
        nn.LSTM's: padding it depends on the values of its batch sizes, which a compiled graph
        does not have."""
        data, batch_sizes, sorted_indices, unsorted_indices = input
        # Padded [T, B, I] in the packed (sorted) batch order, and each sequence's length.
        padded, seq_lengths = torch._VF._pad_packed_sequence(
            data, batch_sizes, False, 0.0, batch_sizes.size(0))
        batch = int(batch_sizes[0])
        _check_hx_dims(hx, batched=True)
        if hx is not None and sorted_indices is not None:
            hx = (hx[0].index_select(1, sorted_indices), hx[1].index_select(1, sorted_indices))
        self._check_input(padded, hx, batch)
        out, (h_n, c_n) = self._run(padded, self._layer_states(padded, hx, batch),
                                    seq_lengths.to(data.device, non_blocking=True))
        out_data, _ = torch._VF._pack_padded_sequence(out, seq_lengths, False)
        output = PackedSequence(out_data, batch_sizes, sorted_indices, unsorted_indices)
        if unsorted_indices is not None:
            h_n = h_n.index_select(1, unsorted_indices)
            c_n = c_n.index_select(1, unsorted_indices)
        return output, (h_n, c_n)

    def forward(self, input: Union[Tensor, PackedSequence], hx: Optional[_HX] = None,
                lengths: Optional[Tensor] = None):
        if isinstance(input, torch.fx.Proxy):
            leaf = self._fx_leaf(input, hx, lengths)
            if leaf is not None:
                return leaf
        if hx is not None and not (isinstance(hx, (tuple, list)) and len(hx) == 2
                                   and all(isinstance(t, Tensor) for t in hx)):
            # nn.LSTM's words, then what was given, for any hx that is not two tensors.
            got = ("a %s of %d: (%s)" % (type(hx).__name__, len(hx),
                                         ", ".join(type(t).__name__ for t in hx))
                   if isinstance(hx, (tuple, list))
                   else "a %s" % type(hx).__name__)
            raise HiddenStateError("lstm expects two hidden states: hx must be a tuple of two "
                                   "tensors (h_0, c_0), got %s" % got)
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError("lengths cannot be given with a PackedSequence (it has its own)")
            return self._forward_packed(input, hx)

        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batched = input.dim() == 3
        _check_hx_dims(hx, batched)
        if not batched:
            input = input.unsqueeze(1)
            if hx is not None:
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        x = input.transpose(0, 1) if self.batch_first and batched else input   # [T, B, I]
        steps, batch = x.shape[0], x.shape[1]
        self._check_input(x, hx, batch)
        if lengths is not None:
            lengths = self._lengths_on(lengths, batch, steps, x.device)
        out, (h_n, c_n) = self._run(x.contiguous(), self._layer_states(x, hx, batch), lengths)
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        if not batched:
            out, h_n, c_n = out.squeeze(1), h_n.squeeze(1), c_n.squeeze(1)
        return out, (h_n, c_n)

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_lstm(cls, lstm: nn.LSTM) -> "FusedLSTM":
        """A FusedLSTM sharing `lstm`'s Parameter objects (so optimizers keep tracking them)."""
        p = lstm.weight_ih_l0
        with _source_warned():
            fused = FusedLSTM(lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bias,
                              lstm.batch_first, lstm.dropout, lstm.bidirectional, lstm.proj_size,
                              device="meta", dtype=p.dtype)
        for name in fused._flat_weights_names:
            setattr(fused, name, getattr(lstm, name))
        fused.flatten_parameters()
        fused.train(lstm.training)
        return fused

    def to_lstm(self) -> nn.LSTM:
        """An nn.LSTM sharing this module's Parameter objects."""
        p = self.weight_ih_l0
        with _source_warned():
            lstm = nn.LSTM(self.input_size, self.hidden_size, self.num_layers, self.bias,
                           self.batch_first, self.dropout, self.bidirectional, self.proj_size,
                           device="meta", dtype=p.dtype)
        for name in self._flat_weights_names:
            setattr(lstm, name, getattr(self, name))
        lstm._init_flat_weights()
        lstm.train(self.training)
        return lstm


@contextlib.contextmanager
def _source_warned():
    """Silences the dropout warning while a module is converted: its source warned already."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="dropout option adds dropout")
        yield


class FusedBiLSTM(FusedLSTM):
    """:class:`FusedLSTM` with ``bidirectional=True`` (the CNN-LSTM's temporal model)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, proj_size: int = 0,
                 device=None, dtype=None) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional=True, proj_size=proj_size, device=device, dtype=dtype)


def _swap(model: nn.Module, convert, match) -> nn.Module:
    for name, child in list(model.named_children()):
        if match(child):
            setattr(model, name, convert(child))
        else:
            _swap(child, convert, match)
    return model


def fuse_lstm(model: nn.Module) -> nn.Module:
    """Replaces every nn.LSTM in `model` (in place) by a FusedLSTM sharing its parameters.

    Returns `model` (or the fused module if `model` itself is an nn.LSTM).
    """
    match = lambda m: isinstance(m, nn.LSTM)  # noqa: E731
    if match(model):
        return FusedLSTM.from_lstm(model)
    return _swap(model, FusedLSTM.from_lstm, match)


def unfuse_lstm(model: nn.Module) -> nn.Module:
    """Replaces every FusedLSTM in `model` (in place) by an nn.LSTM sharing its parameters."""
    match = lambda m: isinstance(m, FusedLSTM)  # noqa: E731
    if match(model):
        return model.to_lstm()
    return _swap(model, lambda m: m.to_lstm(), match)
