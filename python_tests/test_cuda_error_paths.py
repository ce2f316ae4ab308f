"""Bad input to each op on CUDA raises a clear RuntimeError, never crashes the process. Each case
runs in a child process, so that a crash (a signal, a device-side fault) fails its case instead of
ending the test run."""
import subprocess
import sys

import pytest

from conftest import subprocess_env

pytestmark = pytest.mark.cuda

CASES = {
    "lstm_layer_forward-wrong-w_hh-shape": ("""
x = torch.randn(4, 2, 8, device="cuda")
torch.ops.cnnlstm_ext.lstm_layer_forward(x, [torch.randn(64, 8, device="cuda"),
    torch.randn(64, 15, device="cuda")], torch.zeros(1, 2, 16, device="cuda"),
    torch.zeros(1, 2, 16, device="cuda"), None, False)""", "w_hh"),
    "lstm_layer_forward-lengths-int32": ("""
x = torch.randn(4, 2, 8, device="cuda")
torch.ops.cnnlstm_ext.lstm_layer_forward(x, [torch.randn(64, 8, device="cuda"),
    torch.randn(64, 16, device="cuda")], torch.zeros(1, 2, 16, device="cuda"),
    torch.zeros(1, 2, 16, device="cuda"), torch.tensor([4, 2], device="cuda", dtype=torch.int32),
    False)""", "lengths of dtype int64"),
    "FusedLSTM-wrong-feature-size": ("""
cnnlstm_ext.FusedLSTM(8, 16).cuda()(torch.randn(4, 2, 9, device="cuda"))""", "input_size"),
    "frame_pool-3d-input": ("""
cnnlstm_ext.ops.frame_pool(torch.randn(6, 4, 3, device="cuda"), 2)""", "frame_pool"),
    "temporal_pool-zero-length": ("""
cnnlstm_ext.ops.temporal_pool(torch.randn(5, 2, 8, device="cuda"), torch.tensor([0, 5], device="cuda"))""",
                                  "length"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cuda_bad_input_raises_clear_error(case, tmp_path):
    body, expected = CASES[case]
    code = ("import torch, cnnlstm_ext\ntry:" + body.replace("\n", "\n    ") +
            "\nexcept RuntimeError as e:\n    print('raises:', e)\n    raise SystemExit(0)\n"
            "raise SystemExit('did not raise')\n")
    run = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), cwd=tmp_path,
                         capture_output=True, text=True)
    assert run.returncode >= 0, f"crashed with signal {-run.returncode}: {run.stderr[-2000:]}"
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert expected in run.stdout, run.stdout
