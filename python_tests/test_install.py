"""Installing anywhere: `import cnnlstm_ext` without the compiled `_C` (the checkpoint tools and
the reference ops work, a fused op raises one error naming the build command), and the CUDA
architectures a build without a visible GPU targets. (The wheel itself: .ci/run builds it and runs
this suite on it, installed in a fresh virtual environment.)
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import cnnlstm_ext
from cnnlstm_ext import CNNLSTM
from cnnlstm_ext.checkpoint import save_checkpoint
from cnnlstm_ext.data.synthetic import MOTIONS
from cnnlstm_ext.train.config import Config

from conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A child that cannot import cnnlstm_ext._C, whatever the install (wheel, editable, in place).
HIDE_C = """
import sys
class HideC:
    def find_spec(self, name, path=None, target=None):
        if name == "cnnlstm_ext._C":
            raise ImportError("libcnnlstm.so: cannot open shared object file (hidden by the test)")
sys.meta_path.insert(0, HideC())
"""


def run_without_c(code, cwd):
    proc = subprocess.run([sys.executable, "-c", HIDE_C + textwrap.dedent(code)], cwd=cwd,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("noc")
    torch.manual_seed(0)
    spec = dict(backbone="tiny", spatial_dim=16, temporal_dim=8, num_layers=1,
                num_classes=len(MOTIONS))  # evaluate's synthetic data set has these classes
    cfg = Config()
    cfg.model.update(spec)
    model = CNNLSTM(**spec)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3, 3, 16, 16)).square().mean().backward()
    optimizer.step()  # (a file verify calls sound holds the AdamW moments)
    save_checkpoint(d / "best.pth", model=model, epoch=2, config=cfg.to_dict(), optimizer=optimizer,
                    extra={"trainer_state": {"classes": list(MOTIONS)}})
    return d / "best.pth"


def test_import_without_the_compiled_kernels(checkpoint):
    """The package imports; construction, the reference ops and load_model work; a fused op, the
    model's forward and the kernel options say that the build is missing, naming the command."""
    out = run_without_c(f"""
        import json, torch
        import cnnlstm_ext
        from cnnlstm_ext import ops, reference
        result = {{"built": ops.kernels_built(), "cuda": cnnlstm_ext.cuda_kernels_built()}}
        x = torch.randn(5, 2, 8)
        result["pool"] = list(reference.temporal_pool(x, torch.tensor([5, 2])).shape)
        model = cnnlstm_ext.load_model({str(checkpoint)!r})
        result["classes"] = model.classes
        cnnlstm_ext.backends.lstm.path = "stepwise"  # options still validate and hold
        result["path"] = cnnlstm_ext.backends.lstm.path
        errors = []
        for call in (lambda: model(torch.randn(1, 2, 3, 16, 16)),
                     lambda: cnnlstm_ext.FusedLSTM(8, 4)(x),
                     lambda: ops.temporal_pool(x)):
            try:
                call()
                errors.append(None)
            except ops.KernelsNotBuiltError as e:
                errors.append(str(e))
        result["errors"] = errors
        print(json.dumps(result))
    """, cwd=checkpoint.parent)
    result = json.loads(out.strip().splitlines()[-1])
    assert (result["built"], result["cuda"]) == (False, False)
    assert result["pool"] == [2, 8]
    assert result["classes"] == list(MOTIONS)
    assert result["path"] == "stepwise"
    assert len(result["errors"]) == 3 and all(result["errors"])
    for message in result["errors"]:
        assert "pip install --no-build-isolation ." in message
        assert "hidden by the test" in message  # why _C did not load


def test_checkpoint_commands_without_the_compiled_kernels(checkpoint):
    """inspect, verify and export --safetensors run; export --onnx and evaluate (which run the
    model) end in one error line naming the build command."""
    d = checkpoint.parent
    out = run_without_c(f"""
        import contextlib, io, json
        from cnnlstm_ext.cli import main
        codes, errors = {{}}, io.StringIO()
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            codes["inspect"] = main(["inspect", "best.pth", "--json"])
            codes["verify"] = main(["verify", "best.pth"])
            codes["safetensors"] = main(["export", "best.pth", "--safetensors", "w.safetensors"])
            codes["onnx"] = main(["export", "best.pth", "--onnx", "m.onnx"])
            codes["evaluate"] = main(["evaluate", "best.pth", "synthetic", "--out", "eval",
                                      "--no-progress"])
        print(json.dumps({{"codes": codes, "stderr": errors.getvalue()}}))
    """, cwd=d)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["codes"] == {"inspect": 0, "verify": 0, "safetensors": 0, "onnx": 1,
                               "evaluate": 1}
    lines = [l for l in result["stderr"].strip().splitlines() if l.startswith("error: ")]
    assert "Traceback" not in result["stderr"] and len(lines) == 2, result["stderr"]
    assert lines[0].startswith("error: cnnlstm_ext.export needs the compiled kernels")
    assert lines[1].startswith("error: cnnlstm_ext.ops.frame_pool needs the compiled kernels")
    assert all("pip install --no-build-isolation ." in line for line in lines)
    assert (d / "w.safetensors").is_file() and not (d / "m.onnx").exists()


def test_the_package_with_kernels_reports_them():
    assert cnnlstm_ext.ops.kernels_built()
    with cnnlstm_ext.ops.recorded_kernels() as ran:
        cnnlstm_ext.FusedLSTM(4, 4)(torch.randn(3, 2, 4))
    assert ran  # the compiled op ran


@pytest.mark.skipif(torch.version.cuda is None, reason="torch without CUDA: no CUDA build")
def test_build_without_a_gpu_targets_the_common_cards():
    """setup.py's architectures: sm_80/86/89/90 + PTX without a visible GPU, the user's
    TORCH_CUDA_ARCH_LIST when set. (Needs a CUDA toolkit, as the CUDA build does.)"""
    env = {k: v for k, v in subprocess_env().items() if k != "TORCH_CUDA_ARCH_LIST"}
    for extra, want in (({}, "8.0;8.6;8.9;9.0+PTX"), ({"TORCH_CUDA_ARCH_LIST": "8.6"}, "8.6")):
        proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT,
                              env=dict(env, CUDA_VISIBLE_DEVICES="", **extra),
                              capture_output=True, text=True, timeout=300)
        if "building the CPU kernels only" in proc.stdout:
            pytest.skip("no CUDA toolkit found: the build would be CPU-only")
        assert proc.returncode == 0, proc.stderr
        assert "arch=%s)" % want in proc.stdout, proc.stdout
