"""Bad input to each op on CUDA must raise a clear RuntimeError, never crash the process.

Each case runs in its own subprocess, so a crash (a signal) is reported instead of ending the
check; prints one line per case and exits non-zero if any case crashed or did not raise.
    python3 scripts/cuda_error_paths.py
"""
import subprocess
import sys

CASES = {
    "lstm_layer_forward: wrong w_hh shape": """
x = torch.randn(4, 2, 8, device="cuda")
torch.ops.cnnlstm_ext.lstm_layer_forward(x, [torch.randn(64, 8, device="cuda"),
    torch.randn(64, 15, device="cuda")], torch.zeros(1, 2, 16, device="cuda"),
    torch.zeros(1, 2, 16, device="cuda"), None, False)""",
    "lstm_layer_forward: lengths int32": """
x = torch.randn(4, 2, 8, device="cuda")
torch.ops.cnnlstm_ext.lstm_layer_forward(x, [torch.randn(64, 8, device="cuda"),
    torch.randn(64, 16, device="cuda")], torch.zeros(1, 2, 16, device="cuda"),
    torch.zeros(1, 2, 16, device="cuda"), torch.tensor([4, 2], device="cuda", dtype=torch.int32), False)""",
    "FusedLSTM: wrong feature size": """
cnnlstm_ext.FusedLSTM(8, 16).cuda()(torch.randn(4, 2, 9, device="cuda"))""",
    "frame_pool: 3-D input": """
cnnlstm_ext.ops.frame_pool(torch.randn(6, 4, 3, device="cuda"), 2)""",
    "temporal_pool: zero length": """
cnnlstm_ext.ops.temporal_pool(torch.randn(5, 2, 8, device="cuda"), torch.tensor([0, 5], device="cuda"))""",
}

PRELUDE = "import torch, cnnlstm_ext\n"


def main() -> int:
    bad = 0
    for name, body in CASES.items():
        code = PRELUDE + "try:" + body.replace("\n", "\n    ") + "\nexcept RuntimeError as e:\n" \
               "    print('raises:', str(e).splitlines()[0][:160]); raise SystemExit(0)\n" \
               "print('did not raise'); raise SystemExit(1)\n"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if proc.returncode < 0:
            verdict = "CRASH (signal %d)" % -proc.returncode
        elif proc.returncode != 0:
            verdict = "FAIL " + (proc.stdout + proc.stderr).strip().splitlines()[-1][:200]
        else:
            verdict = "ok   " + proc.stdout.strip()
        bad += not verdict.startswith("ok")
        print("%-40s %s" % (name, verdict), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
