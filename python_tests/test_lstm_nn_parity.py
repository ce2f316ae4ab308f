"""FusedLSTM/FusedBiLSTM validate their constructor arguments and forward inputs as nn.LSTM does.

Ported from PyTorch's own tests of nn.LSTM (test/test_nn.py: test_rnn_args_check,
test_rnn_check_device, test_error_RNN_seq_len_zero, test_RNN_input_size_zero,
test_RNN_dropout_warning, test_RNN_change_dropout; the nn.LSTM entry of the module database run by
test/test_modules.py: module_inputs_torch_nn_LSTM, module_error_inputs_torch_nn_RNN_GRU), with
FusedLSTM in nn.LSTM's place. Every case runs on both modules and asserts the same exception type
and message (nn.LSTM's words, as PyTorch's tests match them).
"""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from cnnlstm_ext import FusedBiLSTM, FusedLSTM

I, H = 3, 5


def outcome(fn):
    """('ok', None) or (exception type, message) of fn()."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return type(e), str(e)
    return "ok", None


def assert_same_error(fused_fn, ref_fn, error_type=None, message=None):
    """fused_fn() and ref_fn() raise the same exception type (FusedLSTM's may be a subclass of
    it, which every `except` and assertRaises of nn.LSTM's type catches) with the same message
    (and, where given, that type and a message starting with `message`, word for word)."""
    ref, fused = outcome(ref_fn), outcome(fused_fn)
    assert ref[0] != "ok", "nn.LSTM accepted the case: it is not an error case"
    assert fused[0] != "ok" and issubclass(fused[0], ref[0]), (fused, ref)
    assert fused[1] == ref[1]
    if error_type is not None:
        assert ref[0] is error_type
    if message is not None:
        assert ref[1].startswith(message), ref[1]


# --- constructor -------------------------------------------------------------------------------

CONSTRUCTOR_ERRORS = [
    # module_error_inputs_torch_nn_RNN_GRU
    ((10, 0, 1), {}, ValueError, "hidden_size must be greater than zero"),
    ((10, 10, 0), {}, ValueError, "num_layers must be greater than zero"),
    ((I, H), {"bias": 0}, TypeError, "bias should be of type bool, got: int"),
    ((I, H), {"bias": 1}, TypeError, "bias should be of type bool, got: int"),
    ((I, H), {"bias": "True"}, TypeError, "bias should be of type bool, got: str"),
    ((I, H), {"batch_first": 0}, TypeError, "batch_first should be of type bool, got: int"),
    ((I, H), {"batch_first": 1}, TypeError, "batch_first should be of type bool, got: int"),
    ((I, H), {"batch_first": "False"}, TypeError, "batch_first should be of type bool, got: str"),
    ((3.0, H), {}, TypeError, "input_size should be of type int, got: float"),
    (("10", H), {}, TypeError, "input_size should be of type int, got: str"),
    ((0, H), {}, ValueError, "input_size must be greater than zero"),
    ((-1, H), {}, ValueError, "input_size must be greater than zero"),
    ((I, 5.0), {}, TypeError, "hidden_size should be of type int, got: float"),
    # the same checks on other values and arguments
    ((None, H), {}, TypeError, "input_size should be of type int, got: NoneType"),
    ((I, "5"), {}, TypeError, "hidden_size should be of type int, got: str"),
    ((I, -1), {}, ValueError, "hidden_size must be greater than zero"),
    ((I, H, -2), {}, ValueError, "num_layers must be greater than zero"),
    ((I, H, 2.0), {}, TypeError, "'float' object cannot be interpreted as an integer"),
    ((I, H, "2"), {}, TypeError, "'<=' not supported between instances of 'str' and 'int'"),
    ((I, H), {"dropout": -0.1}, ValueError, "dropout should be a number in range [0, 1] "
                                            "representing the probability of an element being "
                                            "zeroed"),
    ((I, H), {"dropout": 1.5}, ValueError, "dropout should be a number in range [0, 1]"),
    ((I, H), {"dropout": True}, ValueError, "dropout should be a number in range [0, 1]"),
    ((I, H), {"dropout": "0.5"}, ValueError, "dropout should be a number in range [0, 1]"),
    ((I, H), {"dropout": "high"}, ValueError, "could not convert string to float: 'high'"),
    ((I, H), {"proj_size": -1}, ValueError, "proj_size should be a positive integer or zero to "
                                            "disable projections"),
    ((I, H), {"proj_size": H}, ValueError, "proj_size has to be smaller than hidden_size"),
    ((I, H), {"proj_size": H + 2}, ValueError, "proj_size has to be smaller than hidden_size"),
]
CONSTRUCTOR_IDS = [f"{'-'.join(map(repr, a))}-{'-'.join(f'{k}={v!r}' for k, v in kw.items())}"
                   for a, kw, _, _ in CONSTRUCTOR_ERRORS]


@pytest.mark.parametrize("args, kwargs, error_type, message", CONSTRUCTOR_ERRORS,
                         ids=CONSTRUCTOR_IDS)
def test_constructor_error_matches_nn_lstm_for_invalid_argument(args, kwargs, error_type, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same_error(lambda: FusedLSTM(*args, **kwargs), lambda: nn.LSTM(*args, **kwargs),
                          error_type, message)


@pytest.mark.parametrize("args, kwargs, error_type, message", CONSTRUCTOR_ERRORS,
                         ids=CONSTRUCTOR_IDS)
def test_constructor_error_matches_nn_lstm_for_invalid_argument_bidirectional(
        args, kwargs, error_type, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same_error(lambda: FusedBiLSTM(*args, **kwargs),
                          lambda: nn.LSTM(*args, **kwargs, bidirectional=True),
                          error_type, message)


def test_constructor_batch_first_string_is_not_taken_as_true():
    # The case: a truthy string used to be accepted and run as batch_first=True.
    with pytest.raises(TypeError, match="batch_first should be of type bool, got: str"):
        FusedLSTM(I, H, batch_first="False")


@pytest.mark.parametrize("kwargs", [
    {}, {"bias": False}, {"batch_first": True}, {"num_layers": 3, "dropout": 0.5},
    {"dropout": 0}, {"dropout": 1}, {"bidirectional": True, "num_layers": 2},
], ids=["defaults", "no_bias", "batch_first", "dropout", "dropout_int_0", "dropout_int_1",
        "bidirectional"])
def test_constructor_valid_arguments_give_nn_lstm_attributes(kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, fused = nn.LSTM(I, H, **kwargs), FusedLSTM(I, H, **kwargs)
    for name in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first",
                 "dropout", "bidirectional", "proj_size"):
        assert getattr(fused, name) == getattr(ref, name)
        assert type(getattr(fused, name)) is type(getattr(ref, name))
    assert [(n, p.shape) for n, p in fused.named_parameters()] == \
        [(n, p.shape) for n, p in ref.named_parameters()]


def test_constructor_takes_a_valid_proj_size_and_refuses_an_invalid_one_as_nn_lstm():
    fused, ref = FusedLSTM(I, H, proj_size=2), nn.LSTM(I, H, proj_size=2)
    assert fused.proj_size == ref.proj_size == 2
    assert fused.weight_hr_l0.shape == ref.weight_hr_l0.shape == (2, H)
    with pytest.raises(ValueError, match="proj_size has to be smaller than hidden_size"):
        FusedLSTM(I, H, proj_size=H)


@pytest.mark.parametrize("cls", [FusedLSTM, FusedBiLSTM])
def test_constructor_dropout_warning_matches_nn_lstm_when_single_layer(cls):
    # test_RNN_dropout_warning
    kwargs = {"bidirectional": True} if cls is FusedBiLSTM else {}
    with warnings.catch_warnings(record=True) as ref_warned:
        warnings.simplefilter("always")
        nn.LSTM(I, H, num_layers=1, dropout=0.3, **kwargs)
    with warnings.catch_warnings(record=True) as fused_warned:
        warnings.simplefilter("always")
        cls(I, H, num_layers=1, dropout=0.3)
    assert [str(w.message) for w in ref_warned] == [str(w.message) for w in fused_warned]
    assert len(fused_warned) == 1
    assert "dropout option adds dropout after all but last recurrent layer" in \
        str(fused_warned[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls(I, H, num_layers=2, dropout=0.3)


# --- parameters built on the meta device -------------------------------------------------------

def parameter_metadata(module):
    return [(name, tuple(p.shape), p.stride(), p.storage_offset(), p.untyped_storage().nbytes(),
             p.dtype, p.is_contiguous()) for name, p in module.named_parameters()]


@pytest.mark.parametrize("kwargs", [
    {}, {"bidirectional": True}, {"bidirectional": True, "num_layers": 3},
    {"bidirectional": True, "bias": False, "num_layers": 2},
], ids=["unidirectional", "bidirectional", "bidirectional_3_layers", "bidirectional_no_bias"])
def test_meta_parameters_have_cpu_metadata_when_built_on_meta(kwargs):
    cpu = parameter_metadata(FusedLSTM(I, H, **kwargs))
    with torch.device("meta"):
        under_context = FusedLSTM(I, H, **kwargs)
    assert all(p.device.type == "meta" for p in under_context.parameters())
    assert parameter_metadata(under_context) == cpu
    assert parameter_metadata(FusedLSTM(I, H, device="meta", **kwargs)) == cpu
    # Flattening again keeps the layout; materialising on the CPU gives a CPU-built module's.
    under_context.flatten_parameters()
    assert parameter_metadata(under_context) == cpu
    assert parameter_metadata(under_context.to_empty(device="cpu")) == cpu


def test_meta_parameters_have_storages_of_their_own_as_on_the_cpu():
    with torch.device("meta"):
        lstm = FusedLSTM(I, H, bidirectional=True)
    w, w_rev = lstm.weight_ih_l0, lstm.weight_ih_l0_reverse
    assert w_rev.storage_offset() == 0 and w.untyped_storage().nbytes() == w.nbytes
    assert parameter_metadata(lstm) == parameter_metadata(nn.LSTM(I, H, bidirectional=True))


# --- forward: input, hx and dtype errors -------------------------------------------------------

def pair(num_layers=2, **kwargs):
    """nn.LSTM and FusedLSTM of the same configuration."""
    return nn.LSTM(I, H, num_layers, **kwargs), FusedLSTM(I, H, num_layers, **kwargs)


# test_rnn_args_check: num_layers 2, batch 4, seq 6; 7 divides no correct size.
SEQ, BATCH, LAYERS, BAD = 6, 4, 2, 7
GOOD_INPUT, GOOD_HIDDEN = (SEQ, BATCH, I), (LAYERS, BATCH, H)


def with_size(shape, dim, size):
    shape = list(shape)
    shape[dim] = size
    return tuple(shape)


ARGS_CHECK_CASES = {
    "input_batch": (with_size(GOOD_INPUT, 1, BAD), GOOD_HIDDEN),
    "hidden_batch": (GOOD_INPUT, with_size(GOOD_HIDDEN, 1, BAD)),
    "input_size": (with_size(GOOD_INPUT, 2, BAD), GOOD_HIDDEN),
    "hidden_size": (GOOD_INPUT, with_size(GOOD_HIDDEN, 2, BAD)),
    "hidden_layers": (GOOD_INPUT, with_size(GOOD_HIDDEN, 0, BAD)),
}


@pytest.mark.parametrize("case", list(ARGS_CHECK_CASES))
@pytest.mark.parametrize("which", ["h0", "c0", "both"])
def test_forward_error_matches_nn_lstm_when_shapes_disagree(case, which):
    input_shape, hidden_shape = ARGS_CHECK_CASES[case]
    ref, fused = pair(LAYERS)
    x = torch.randn(input_shape)
    good, bad = torch.randn(GOOD_HIDDEN), torch.randn(hidden_shape)
    hx = {"h0": (bad, good), "c0": (good, bad), "both": (bad, bad.clone())}[which]
    if case == "input_size":
        expected = f"input.size(-1) must be equal to input_size. Expected {I}, got {BAD}"
    else:
        size = (LAYERS, input_shape[1], H)
        k = next(k for k in (0, 1) if tuple(hx[k].shape) != size)   # the first one wrong
        expected = f"Expected hidden[{k}] size {size}, got {list(hx[k].shape)}"
    assert_same_error(lambda: fused(x, hx), lambda: ref(x, hx), RuntimeError, expected)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_forward_error_matches_nn_lstm_when_hidden_shape_wrong_for_batch_first(
        batch_first, bidirectional):
    ref, fused = pair(1, batch_first=batch_first, bidirectional=bidirectional)
    x = torch.randn(BATCH, SEQ, I) if batch_first else torch.randn(SEQ, BATCH, I)
    D = 2 if bidirectional else 1
    hx = (torch.randn(D, SEQ, H), torch.randn(D, SEQ, H))   # the sequence length as batch
    assert_same_error(lambda: fused(x, hx), lambda: ref(x, hx), RuntimeError,
                      f"Expected hidden[0] size {(D, BATCH, H)}, got {[D, SEQ, H]}")


@pytest.mark.parametrize("input_dtype, module_dtype", [
    (torch.float64, torch.float32), (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32), (torch.float32, torch.float64), (torch.int64, torch.float32),
], ids=["f64_to_f32", "f16_to_f32", "bf16_to_f32", "f32_to_f64", "int64_to_f32"])
@pytest.mark.parametrize("batched", [True, False])
def test_forward_error_matches_nn_lstm_when_input_dtype_differs(input_dtype, module_dtype,
                                                                 batched):
    ref, fused = pair(1, dtype=module_dtype)
    shape = (2, 4, I) if batched else (2, I)
    x = (torch.randint(1, 9, shape) if input_dtype == torch.int64
         else torch.randn(shape).to(input_dtype))
    assert_same_error(
        lambda: fused(x), lambda: ref(x), ValueError,
        f"RNN input dtype ({input_dtype}) does not match weight dtype ({module_dtype}). Convert "
        f"input: input.to({module_dtype}), or convert model: model.to({input_dtype})")


def test_forward_error_matches_module_db_regex_when_input_dtype_differs():
    # module_error_inputs_torch_nn_RNN_GRU's regex, as test_modules.py applies it.
    fused = FusedLSTM(I, H)
    with pytest.raises(ValueError, match=r"RNN input dtype .* does not match weight dtype .* "
                                         r"Convert input: input\.to\(.*\), or convert model: "
                                         r"model\.to\(.*\)"):
        fused(torch.randn(2, 4, I, dtype=torch.float64))


@pytest.mark.parametrize("dims", [1, 4], ids=["1d", "4d"])
def test_forward_error_matches_nn_lstm_when_input_not_2d_or_3d(dims):
    ref, fused = pair(1)
    x = torch.randn(*([2] * (dims - 1)), I)
    assert_same_error(lambda: fused(x), lambda: ref(x), ValueError,
                      f"LSTM: Expected input to be 2D or 3D, got {dims}D instead")


@pytest.mark.parametrize("batched", [True, False])
def test_forward_error_matches_nn_lstm_when_hidden_dims_disagree_with_input(batched):
    ref, fused = pair(1)
    if batched:
        x, hx = torch.randn(SEQ, BATCH, I), (torch.randn(1, H), torch.randn(1, H))
        message = "For batched 3-D input, hx and cx should also be 3-D but got (2-D, 2-D) tensors"
    else:
        x, hx = torch.randn(SEQ, I), (torch.randn(1, 1, H), torch.randn(1, 1, H))
        message = "For unbatched 2-D input, hx and cx should also be 2-D but got (3-D, 3-D) tensors"
    assert_same_error(lambda: fused(x, hx), lambda: ref(x, hx), RuntimeError, message)


def test_forward_error_names_two_hidden_states_when_hx_has_three():
    ref, fused = pair(1)
    x = torch.randn(SEQ, BATCH, I)
    hx = tuple(torch.randn(1, BATCH, H) for _ in range(3))
    with pytest.raises(RuntimeError, match="^lstm expects two hidden states$"):
        ref(x, hx)
    # nn.LSTM's words, then what was given.
    with pytest.raises(RuntimeError, match="^lstm expects two hidden states: .*got a tuple of 3"):
        fused(x, hx)


def _packed():
    from torch.nn.utils.rnn import pack_padded_sequence
    return pack_padded_sequence(torch.randn(SEQ, 2, I), torch.tensor([SEQ, 2]))


@pytest.mark.parametrize("case", [
    "tensor", "tuple of 1", "tuple of 3", "ints", "dict", "packed tensor", "packed tuple of 1",
    "packed None", "packed 2-D", "packed float64 input"])
def test_forward_error_is_an_instance_of_what_nn_lstm_raises(case):
    """Malformed hx or input dtype, padded and packed: nn.LSTM raises a RuntimeError for some and,
    from inside its code, a TypeError, IndexError or (packed float64) RuntimeError for others;
    FusedLSTM's error is an instance of each (HiddenStateError, InputDtypeError), with words that
    say what was expected."""
    from cnnlstm_ext.nn.lstm import HiddenStateError, InputDtypeError
    ref, fused = pair(1)
    h = torch.randn(1, 2, H)
    x = _packed() if case.startswith("packed") else torch.randn(SEQ, 2, I)
    hx = {"tensor": h, "tuple of 1": (h,), "tuple of 3": (h, h, h), "ints": (1, 2),
          "dict": {"h": h, "c": h},
          "packed tensor": h, "packed tuple of 1": (h,), "packed None": (None, None),
          "packed 2-D": (h[0], h[0]), "packed float64 input": None}[case]
    if case == "packed float64 input":
        from torch.nn.utils.rnn import PackedSequence
        x = PackedSequence(x.data.double(), x.batch_sizes)
    with pytest.raises(Exception) as nn_error:
        ref(x, hx)
    expected = InputDtypeError if case == "packed float64 input" else HiddenStateError
    with pytest.raises(expected) as fused_error:
        fused(x, hx)
    if nn_error.type is not AttributeError:  # (see HiddenStateError)
        assert isinstance(fused_error.value, nn_error.type), (nn_error.type, fused_error.value)
    assert isinstance(fused_error.value, RuntimeError)
    assert str(fused_error.value).startswith(("lstm expects two hidden states: hx must be",
                                              "For batched 3-D input, hx and cx should also be",
                                              "RNN input dtype (torch.float64) does not match"))


# test_error_RNN_seq_len_zero
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("layout", ["seq_first", "batch_first", "unbatched", "with_hx",
                                    "empty_batch_too"])
def test_forward_error_matches_nn_lstm_when_sequence_empty(bidirectional, layout):
    batch_first = layout == "batch_first"
    ref, fused = nn.LSTM(I, H, batch_first=batch_first, bidirectional=bidirectional), \
        FusedLSTM(I, H, batch_first=batch_first, bidirectional=bidirectional)
    D = 2 if bidirectional else 1
    hx = None
    if layout == "batch_first":
        x = torch.randn(10, 0, I)
    elif layout == "unbatched":
        x = torch.randn(0, I)
    elif layout == "empty_batch_too":
        x = torch.randn(0, 0, I)
    else:
        x = torch.randn(0, 10, I)
        if layout == "with_hx":
            hx = (torch.randn(D, 10, H), torch.randn(D, 10, H))
    assert_same_error(lambda: fused(x, hx), lambda: ref(x, hx), RuntimeError,
                      "Expected sequence length to be larger than 0 in RNN")


# test_rnn_check_device (on the meta device, so that no GPU is needed)
@pytest.mark.parametrize("case", ["input", "h0", "c0", "input_and_hx"])
def test_forward_error_matches_nn_lstm_when_devices_differ(case):
    ref, fused = pair(1)
    meta = {"device": "meta"}
    x = torch.randn(SEQ, BATCH, I, **(meta if case.startswith("input") else {}))
    hx = None
    if case != "input":
        hx = [torch.randn(1, BATCH, H), torch.randn(1, BATCH, H)]
        if case in ("h0", "c0"):
            hx[case == "c0"] = torch.empty(1, BATCH, H, **meta)
        hx = tuple(hx)
    if case == "input":
        message = ("Input and parameter tensors are not at the same device, found input tensor at "
                   "meta and parameter tensor at cpu")
    elif case == "input_and_hx":
        message = ("Input and hidden tensors are not at the same device, found input tensor at "
                   "meta and hidden tensor at cpu")
    else:
        message = ("Input and hidden tensors are not at the same device, found input tensor at "
                   "cpu and hidden tensor at meta")
    assert_same_error(lambda: fused(x, hx), lambda: ref(x, hx), RuntimeError, message)


def test_forward_error_matches_nn_lstm_when_module_on_meta():
    ref, fused = pair(1, device="meta")
    x = torch.randn(SEQ, BATCH, I)
    assert_same_error(lambda: fused(x), lambda: ref(x), RuntimeError,
                      "Input and parameter tensors are not at the same device, found input tensor "
                      "at cpu and parameter tensor at meta")


def test_forward_dtype_checked_before_shapes_as_nn_lstm():
    # Both wrong: nn.LSTM reports the dtype first.
    ref, fused = pair(1)
    x = torch.randn(SEQ, BATCH, BAD, dtype=torch.float64)
    assert_same_error(lambda: fused(x), lambda: ref(x), ValueError, "RNN input dtype")


# --- forward: what nn.LSTM accepts -------------------------------------------------------------

@pytest.mark.parametrize("cls", [nn.LSTM, FusedLSTM])
def test_forward_empty_batch_gives_empty_output_with_backward(cls):
    # test_RNN_input_size_zero
    torch.manual_seed(0)
    lstm = cls(input_size=I, hidden_size=4)
    x = torch.randn(5, 0, I, requires_grad=True)
    out, (h, c) = lstm(x)
    assert out.shape == (5, 0, 4) and h.shape == c.shape == (1, 0, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and not p.grad.any() for p in lstm.parameters())


def test_forward_matches_nn_lstm_when_dropout_changed_after_construction():
    # test_RNN_change_dropout, for LSTM: rnn.dropout set between calls takes effect.
    torch.manual_seed(0)
    ref = nn.LSTM(8, 8, 2, dropout=0)
    fused = FusedLSTM.from_lstm(ref)
    x = torch.randn(1, 1, 8)
    for train in (True, False):
        fused.train(train)
        prev = None
        for p in (0, 0.276, 0.731, 1):
            fused.dropout = p
            out1, (h1, _) = fused(x)
            out2, (h2, _) = fused(x)
            if p in (0, 1) or not train:
                torch.testing.assert_close(out1, out2)
                torch.testing.assert_close(h1, h2)
            else:
                assert not torch.equal(out1, out2)
            if p == 1 and train:
                # The second layer sees zeros: as the module without its layer-1 input weights.
                cut = FusedLSTM.from_lstm(nn.LSTM(8, 8, 2)).eval()
                cut.load_state_dict(fused.state_dict())
                with torch.no_grad():
                    cut.weight_ih_l1.zero_()
                torch.testing.assert_close(out1, cut(x)[0])
            if prev is not None:
                if not train:
                    torch.testing.assert_close(out1, prev)
                else:
                    assert not torch.equal(out1, prev)
            prev = out1.detach()


def _module_inputs_lstm():
    """module_inputs_torch_nn_LSTM's samples (with and without projections)."""
    common_modules = pytest.importorskip("torch.testing._internal.common_modules")
    info = next(m for m in common_modules.module_db if m.module_cls is nn.LSTM)
    samples = info.module_inputs_func(info, device="cpu", dtype=torch.float32,
                                      requires_grad=False, training=False)
    return list(samples)


def test_module_db_lstm_inputs_give_nn_lstm_outputs():
    samples = _module_inputs_lstm()
    assert len(samples) == 32
    assert sum(s.constructor_input.kwargs["proj_size"] > 0 for s in samples) == 16
    for sample in samples:
        torch.manual_seed(0)
        ref = nn.LSTM(*sample.constructor_input.args, **sample.constructor_input.kwargs)
        fused = FusedLSTM.from_lstm(ref)
        fused_out = fused(*sample.forward_input.args, **sample.forward_input.kwargs)
        ref_out = ref(*sample.forward_input.args, **sample.forward_input.kwargs)
        torch.testing.assert_close(fused_out, ref_out)


def test_module_db_lstm_error_inputs_raise_nn_lstm_errors():
    """Every error input of nn.LSTM's module_db entry, as test_modules.py's test_errors runs it."""
    common_modules = pytest.importorskip("torch.testing._internal.common_modules")
    info = next(m for m in common_modules.module_db if m.module_cls is nn.LSTM)
    cases = list(info.module_error_inputs_func(info, device="cpu", dtype=torch.float32,
                                               requires_grad=False, training=True))
    assert len(cases) >= 14
    for case in cases:
        sample = case.module_error_input
        ctor, fwd = sample.constructor_input, sample.forward_input

        def run(cls):
            m = cls(*ctor.args, **ctor.kwargs)
            if case.error_on == common_modules.ModuleErrorEnum.FORWARD_ERROR:
                m(*fwd.args, **fwd.kwargs)

        with pytest.raises(case.error_type, match=case.error_regex):
            run(nn.LSTM)
        with pytest.raises(case.error_type, match=case.error_regex):
            run(FusedLSTM)
        assert_same_error(lambda: run(FusedLSTM), lambda: run(nn.LSTM))


def test_assert_same_error_rejects_a_case_nn_lstm_accepts():
    # The helper itself: a valid case must not pass as an error case.
    with pytest.raises(AssertionError, match="nn.LSTM accepted the case"):
        assert_same_error(lambda: FusedLSTM(I, H), lambda: nn.LSTM(I, H))


# --- pruning (test/nn/test_pruning.py's test_rnn_pruning, with FusedLSTM) ------------------------

@pytest.mark.parametrize("cls", [nn.LSTM, FusedLSTM])
def test_rnn_pruning(cls):
    torch.manual_seed(0)
    lstm = cls(32, 32)
    # Four parameters: weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0; pruning one makes it
    # a tensor computed from weight_ih_l0_orig and its mask.
    prune.l1_unstructured(lstm, "weight_ih_l0", 0.5)
    assert sum(isinstance(p, nn.Parameter) for p in lstm._flat_weights) == 3
    prune.remove(lstm, "weight_ih_l0")
    assert sum(isinstance(p, nn.Parameter) for p in lstm._flat_weights) == 4
    assert "weight_ih_l0" in lstm._parameters
    assert lstm._parameters["weight_ih_l0"] is not None
    assert "weight_ih_l0_orig" not in lstm._parameters
    assert "weight_ih_l0" in dict(lstm.named_parameters())
    assert dict(lstm.named_parameters())["weight_ih_l0"] is not None
    assert "weight_ih_l0_orig" not in dict(lstm.named_parameters())


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_pruned_fused_lstm_computes_with_the_pruned_weights(bidirectional):
    torch.manual_seed(0)
    ref = nn.LSTM(6, 8, 2, bidirectional=bidirectional)
    fused = FusedLSTM.from_lstm(copy.deepcopy(ref))
    for module in (ref, fused):
        prune.l1_unstructured(module, "weight_hh_l1", 0.6)
    assert torch.equal(fused.weight_hh_l1, ref.weight_hh_l1)
    assert (fused.weight_hh_l1 == 0).float().mean() >= 0.55
    x = torch.randn(5, 3, 6)
    y_f, (h_f, _) = fused(x)
    y_r, (h_r, _) = ref(x)
    torch.testing.assert_close(y_f, y_r)
    # The gradient reaches weight_hh_l1_orig through the mask, as in nn.LSTM.
    g_f, = torch.autograd.grad(y_f.sum() + h_f.sum(), fused.weight_hh_l1_orig)
    g_r, = torch.autograd.grad(y_r.sum() + h_r.sum(), ref.weight_hh_l1_orig)
    torch.testing.assert_close(g_f, g_r)
    assert torch.count_nonzero(g_f[fused.weight_hh_l1_mask == 0]) == 0


# --- more of test/test_nn.py's LSTM tests, with FusedLSTM in nn.LSTM's place --------------------

@pytest.mark.parametrize("cls", [nn.LSTM, FusedLSTM])
@pytest.mark.parametrize("name,kwargs,num_params", [
    ("weight_ih_l0", {}, 4), ("weight_hr_l0", {"proj_size": 16}, 5)])
def test_rnn_weight_norm(cls, name, kwargs, num_params):
    lstm = torch.nn.utils.weight_norm(cls(32, 32, **kwargs), name=name)
    # The normalised weight becomes a tensor computed from name_g and name_v.
    assert sum(isinstance(p, nn.Parameter) for p in lstm._flat_weights) == num_params - 1
    x = torch.randn(3, 2, 32)
    lstm(x)[0].sum().backward()
    assert getattr(lstm, name + "_v").grad is not None
    lstm = torch.nn.utils.remove_weight_norm(lstm, name=name)
    assert sum(isinstance(p, nn.Parameter) for p in lstm._flat_weights) == num_params
    assert name in lstm._parameters and lstm._parameters[name] is not None
    params = dict(lstm.named_parameters())
    assert name in params and params[name] is not None
    assert name + "_v" not in lstm._parameters and name + "_g" not in lstm._parameters
    assert name + "_v" not in params and name + "_g" not in params


@pytest.mark.parametrize("kwargs", [{}, {"proj_size": 2}, {"bidirectional": True}],
                         ids=["plain", "proj", "bi"])
def test_rnn_initial_hidden_state(kwargs):
    lstm = FusedLSTM(10, 20, num_layers=2, **kwargs)
    D = 2 if kwargs.get("bidirectional") else 1
    x = torch.randn(5, 6, 10)
    h0 = torch.zeros(2 * D, 6, kwargs.get("proj_size") or 20)
    c0 = torch.zeros(2 * D, 6, 20)
    output1, hidden1 = lstm(x, (h0, c0))
    output2, hidden2 = lstm(x)
    torch.testing.assert_close(output1, output2)
    torch.testing.assert_close(hidden1, hidden2)


def test_rnn_retain_variables():
    torch.manual_seed(0)
    lstm = FusedLSTM(10, 20, num_layers=2, bidirectional=True, dtype=torch.double)
    x = torch.randn(5, 6, 10, dtype=torch.double, requires_grad=True)
    output = lstm(x)
    output[0].sum().backward(retain_graph=True)
    grads = [x.grad.clone()] + [p.grad.clone() for p in lstm.parameters()]
    for _ in range(4):
        lstm.zero_grad()
        x.grad.zero_()
        output[0].sum().backward(retain_graph=True)
        grads2 = [x.grad] + [p.grad for p in lstm.parameters()]
        torch.testing.assert_close(grads, grads2)
