"""A full training step of the default CNNLSTM, fused against stock, in the same run.

    python -m pytest benchmarks/bench_train_step.py -k cpu --benchmark-json=train_step_cpu.json
    python -m pytest benchmarks/bench_train_step.py -k cuda --benchmark-json=train_step_cuda.json
    python benchmarks/ratios.py train_step_cpu.json

Step: forward (bf16 autocast on CUDA, fp32 on the CPU), cross-entropy, backward, gradient clipping,
AdamW (cnnlstm_ext.train.step_benchmark.train_step, what the Trainer runs per batch). Model:
CNNLSTM() (ResNet-18, 3-layer BiLSTM 512, mean pooling, 100 classes). "fused": CNNLSTM(fused=True);
"baseline": the same weights with torch.nn.LSTM and plain-PyTorch pooling.

Shapes: CUDA B=32, T=32, 112x112 (goal: fused >= 1.3x the baseline's clips/s); CPU B=4, T=8,
112x112 (the CUDA shape takes minutes per step on 2 cores). One pytest-benchmark group per device,
extra_info["impl"] = "baseline" | "fused" (the convention of benchmarks/ratios.py); the fused entry
also records clips/s of both and speedup_vs_baseline of this run.
"""
import pytest
import torch

from cnnlstm_ext.train.step_benchmark import (CPU_SHAPE, GPU_SHAPE, build_pair, describe_device,
                                              make_batch, train_step)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[CUDA, pytest.mark.cuda])]
IMPLS = ["baseline", "fused"]  # baseline first: the fused entry records the ratio against it
ROUNDS = {"cpu": 3, "cuda": 10}
STEPS_PER_ROUND = {"cpu": 1, "cuda": 5}

_baseline_median = {}  # device -> seconds per step of the baseline in this session


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_train_step(benchmark, device, impl):
    dev = torch.device(device)
    shape = GPU_SHAPE if device == "cuda" else CPU_SHAPE
    amp_dtype = torch.bfloat16 if device == "cuda" else None
    fused, stock = build_pair({}, dev)
    model = fused if impl == "fused" else stock
    del fused, stock  # only the timed model stays alive
    clips, labels = make_batch(shape["batch"], shape["frames"], shape["size"],
                               model.config["num_classes"], dev)
    step = train_step(model, clips, labels, amp_dtype)
    n = STEPS_PER_ROUND[device]

    def run():
        for _ in range(n):
            step()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.group = "train_step:%s" % device
    benchmark.pedantic(run, rounds=ROUNDS[device], warmup_rounds=1, iterations=1)
    per_step = benchmark.stats.stats.median / n
    info = benchmark.extra_info
    info.update(impl=impl, device=describe_device(dev), batch=shape["batch"],
                frames=shape["frames"], size=shape["size"],
                dtype="bfloat16" if amp_dtype else "float32",
                clips_per_s=round(shape["batch"] / per_step, 2))
    if impl == "baseline":
        _baseline_median[device] = per_step
    elif device in _baseline_median:
        info["baseline_clips_per_s"] = round(shape["batch"] / _baseline_median[device], 2)
        info["speedup_vs_baseline"] = round(_baseline_median[device] / per_step, 3)
    assert per_step > 0
