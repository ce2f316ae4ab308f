"""cnnlstm_ext.backends: the run-time options of the kernels, validated when set, scoped by
flags(...), read from the environment once at import, and reaching the kernels (the CPU GEMM choice
here; the CUDA choices in test_lstm_cuda_paths.py and test_frame_pool.py)."""
import subprocess
import sys

import pytest
import torch

import cnnlstm_ext
from cnnlstm_ext import FusedLSTM, backends, ops
from conftest import subprocess_env

DEFAULTS = {"lstm.path": "auto", "lstm.mma": False, "lstm.exchange": "barrier",
            "lstm.persistent_max_batch": 32, "lstm.persistent_min_hb": 0,
            "frame_pool.kernel": "pipelined", "cpu.gemm": "auto"}


def _get(dotted):
    group, name = dotted.split(".")
    return getattr(getattr(backends, group), name)


def _onednn_available():
    return torch._C._dispatch_has_kernel_for_dispatch_key("mkldnn::_linear_pointwise", "CPU")


@pytest.mark.parametrize("dotted,default", DEFAULTS.items())
def test_option_defaults(dotted, default):
    assert _get(dotted) == default


@pytest.mark.parametrize("dotted,value,error,message", [
    ("lstm.path", "fastest", ValueError, "lstm.path must be auto, persistent or stepwise, got 'fastest'"),
    ("lstm.exchange", "mailbox", ValueError, "lstm.exchange must be barrier or tagged, got 'mailbox'"),
    ("frame_pool.kernel", "fastest", ValueError, "frame_pool.kernel must be pipelined or tile, got 'fastest'"),
    ("cpu.gemm", "mkl", ValueError, "cpu.gemm must be auto, aten or onednn, got 'mkl'"),
    ("lstm.mma", 1, TypeError, "lstm.mma must be a bool, got int"),
    ("lstm.persistent_max_batch", 2.5, TypeError, "persistent_max_batch must be an int, got float"),
    ("lstm.persistent_max_batch", -1, ValueError, "persistent_max_batch must be >= 0, got -1"),
    ("lstm.persistent_min_hb", True, TypeError, "persistent_min_hb must be an int, got bool"),
])
def test_bad_value_is_refused_when_set_and_leaves_the_option(dotted, value, error, message):
    group, name = dotted.split(".")
    before = _get(dotted)
    with pytest.raises(error, match=message):
        setattr(getattr(backends, group), name, value)
    assert _get(dotted) == before


def test_unknown_option_is_refused():
    with pytest.raises(AttributeError, match="has no option 'paths'"):
        backends.lstm.paths = "stepwise"
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        backends.flags(lstm_paths="stepwise").__enter__()  # refused on entering the block


def test_flags_set_for_the_block_and_restore():
    with backends.flags(lstm_path="stepwise", frame_pool_kernel="tile", persistent_max_batch=8):
        assert (backends.lstm.path, backends.frame_pool.kernel,
                backends.lstm.persistent_max_batch) == ("stepwise", "tile", 8)
    assert (backends.lstm.path, backends.frame_pool.kernel,
            backends.lstm.persistent_max_batch) == ("auto", "pipelined", 32)


def test_flags_restore_after_an_exception():
    with pytest.raises(KeyError):
        with backends.flags(lstm_mma=True):
            raise KeyError("inside")
    assert backends.lstm.mma is False


def test_flags_check_every_value_before_setting_any():
    with pytest.raises(ValueError, match="lstm.exchange"):
        backends.flags(lstm_path="stepwise", lstm_exchange="mailbox").__enter__()
    assert backends.lstm.path == "auto"


def test_attribute_setting_persists_until_changed():
    try:
        backends.lstm.path = "stepwise"
        assert backends.lstm.path == "stepwise"
    finally:
        backends.lstm.path = "auto"
    assert backends.lstm.path == "auto"


@pytest.mark.skipif(not _onednn_available(), reason="this torch has no CPU oneDNN linear")
@pytest.mark.parametrize("gemm,library", [("aten", "aten"), ("onednn", "onednn"), ("auto", "onednn")])
def test_cpu_gemm_option_picks_the_gemm_library(gemm, library):
    model = FusedLSTM(8, 16, bidirectional=True)
    x = torch.randn(5, 3, 8, requires_grad=True)
    with backends.flags(cpu_gemm=gemm), ops.recorded_kernels() as ran:
        model(x)[0].sum().backward()
    assert {n for n in ran if n.startswith("cpu:gemm:")} == {f"cpu:gemm:{library}"}


def test_cpu_gemm_options_give_the_same_values():
    torch.manual_seed(0)
    model = FusedLSTM(8, 16, bidirectional=True)
    x = torch.randn(5, 3, 8)
    results = {}
    for gemm in ("aten", "auto"):
        with backends.flags(cpu_gemm=gemm):
            results[gemm] = model(x)[0]
    torch.testing.assert_close(results["aten"], results["auto"], rtol=1e-5, atol=1e-6)


ENV_CASE = ("import cnnlstm_ext\nb = cnnlstm_ext.backends\n"
            "print(b.lstm.path, b.lstm.mma, b.lstm.persistent_max_batch, b.frame_pool.kernel, b.cpu.gemm)\n")


def test_environment_variables_are_read_at_import(tmp_path):
    env = subprocess_env(CNNLSTM_EXT_LSTM_PATH="stepwise", CNNLSTM_EXT_LSTM_MMA="1",
                         CNNLSTM_EXT_PERSISTENT_MAX_BATCH="8", CNNLSTM_EXT_FRAME_POOL_KERNEL="tile",
                         CNNLSTM_EXT_CPU_GEMM="aten")
    run = subprocess.run([sys.executable, "-c", ENV_CASE], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["stepwise", "True", "8", "tile", "aten"]


@pytest.mark.parametrize("variable,value,message", [
    ("CNNLSTM_EXT_LSTM_PATH", "fastest", "CNNLSTM_EXT_LSTM_PATH must be auto, persistent or stepwise"),
    ("CNNLSTM_EXT_LSTM_MMA", "yes", "CNNLSTM_EXT_LSTM_MMA must be 0 or 1"),
    ("CNNLSTM_EXT_PERSISTENT_MAX_BATCH", "many", "CNNLSTM_EXT_PERSISTENT_MAX_BATCH must be an integer"),
    ("CNNLSTM_EXT_PERSISTENT_MIN_HB", "-4", "CNNLSTM_EXT_PERSISTENT_MIN_HB must be >= 0"),
])
def test_bad_environment_variable_fails_the_import_naming_it(variable, value, message, tmp_path):
    run = subprocess.run([sys.executable, "-c", ENV_CASE], env=subprocess_env(**{variable: value}),
                         cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode != 0
    assert message in run.stderr


def test_set_options_op_checks_its_values():
    with pytest.raises(ValueError, match="lstm path must be auto, persistent or stepwise"):
        torch.ops.cnnlstm_ext.set_options("fastest", False, "barrier", 32, 0, "pipelined", "auto")
    with pytest.raises(ValueError, match="persistent_max_batch must be >= 0"):
        torch.ops.cnnlstm_ext.set_options("auto", False, "barrier", -1, 0, "pipelined", "auto")


def test_backends_is_exported():
    assert cnnlstm_ext.backends is backends
