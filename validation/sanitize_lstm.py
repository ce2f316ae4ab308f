"""A small forward + backward of the LSTM op on the GPU, for compute-sanitizer (memcheck, racecheck):

    compute-sanitizer --tool memcheck python3 validation/sanitize_lstm.py

Both LSTM recurrence paths, float32 and bfloat16, with and without lengths, and the persistent
forward's tagged exchange.
"""

import torch

import cnnlstm_ext
from cnnlstm_ext import FusedLSTM


def lstm_case(path: str, dtype: torch.dtype, lengths: bool, exchange: str = "barrier") -> None:
    cnnlstm_ext.backends.lstm.path = path
    cnnlstm_ext.backends.lstm.exchange = exchange
    model = FusedLSTM(32, 64, num_layers=2, bidirectional=True).to("cuda", dtype)
    x = torch.randn(5, 3, 32, device="cuda", dtype=dtype, requires_grad=True)
    L = torch.tensor([5, 2, 4], device="cuda") if lengths else None
    out, (h, c) = model(x, lengths=L)
    (out.float().square().sum() + h.float().sum() + c.float().sum()).backward()


def main() -> None:
    assert cnnlstm_ext.cuda_kernels_built(), "built without CUDA kernels"
    for path in ("persistent", "stepwise"):
        for dtype in (torch.float32, torch.bfloat16):
            for lengths in (False, True):
                lstm_case(path, dtype, lengths)
    for lengths in (False, True):  # the persistent forward's tagged exchange
        lstm_case("persistent", torch.float32, lengths, exchange="tagged")
    torch.cuda.synchronize()
    print("sanitize_lstm: all ops ran")


if __name__ == "__main__":
    main()
