"""A full training step of the default CNNLSTM, fused against stock, in the same run.

    python -m pytest benchmarks/bench_train_step.py -k cpu --benchmark-json=train_step_cpu.json
    python -m pytest benchmarks/bench_train_step.py -k cuda --benchmark-json=train_step_cuda.json
    python benchmarks/ratios.py train_step_cpu.json

Step: forward (bf16 autocast on CUDA, fp32 on the CPU), cross-entropy, backward, gradient clipping,
AdamW (cnnlstm_ext.train.step_benchmark.train_step, what the Trainer runs per batch; on CUDA, as
there, NHWC convolutions and cudnn.benchmark for both implementations). Model:
CNNLSTM() (ResNet-18, 3-layer BiLSTM 512, mean pooling, 100 classes). "fused": CNNLSTM(fused=True);
"baseline": the same weights with torch.nn.LSTM and plain-PyTorch pooling.

Shapes: CUDA B=32, T=32, 112x112 (goal: fused >= 1.3x the baseline's clips/s); CPU B=4, T=8,
112x112 (the CUDA shape takes minutes per step on 2 cores). One pytest-benchmark group per device,
extra_info["impl"] = "baseline" | "fused" (the convention of benchmarks/ratios.py). The fused test
also times a baseline round before each of its rounds (pytest-benchmark's setup), and records
baseline_clips_per_s and speedup_vs_baseline from those interleaved rounds: on a shared machine
the load changes between tests, so that ratio is the one to quote.

test_optimizer_step: one AdamW step over the same model's parameters, torch's default
implementation ("baseline") against its fused kernel (what the Trainer runs, optim.fused); group
optimizer_step:<device>, the baseline step interleaved in the same way.
"""
import pytest
import torch

from cnnlstm_ext.train.step_benchmark import (CPU_SHAPE, GPU_SHAPE, build_pair, describe_device,
                                              make_batch, train_step)

import interleave

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[CUDA, pytest.mark.cuda])]
IMPLS = ["baseline", "fused"]  # baseline first: the fused entry records the ratio against it
ROUNDS = {"cpu": 3, "cuda": 10}
STEPS_PER_ROUND = {"cpu": 1, "cuda": 5}


def _round(step, n, device):
    """n steps and one synchronisation: a timed unit."""
    def run():
        for _ in range(n):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    return run


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_train_step(benchmark, device, impl):
    dev = torch.device(device)
    shape = GPU_SHAPE if device == "cuda" else CPU_SHAPE
    amp_dtype = torch.bfloat16 if device == "cuda" else None
    fused, stock = build_pair({}, dev)
    clips, labels = make_batch(shape["batch"], shape["frames"], shape["size"],
                               fused.config["num_classes"], dev)
    n = STEPS_PER_ROUND[device]
    timed = _round(train_step(fused if impl == "fused" else stock, clips, labels, amp_dtype), n,
                   device)
    stock_round = None
    if impl == "fused":
        # The stock model also runs one timed round before every fused round, so the ratio
        # below compares rounds taken under the same machine load.
        stock_round = _round(train_step(stock, clips, labels, amp_dtype), n, device)
    else:
        del fused
    benchmark.group = "train_step:%s" % device
    stock_s = interleave.time_interleaved(benchmark, timed, stock_round, ROUNDS[device])
    per_step = benchmark.stats.stats.median / n
    info = benchmark.extra_info
    info.update(impl=impl, device=describe_device(dev), batch=shape["batch"],
                frames=shape["frames"], size=shape["size"],
                dtype="bfloat16" if amp_dtype else "float32",
                clips_per_s=round(shape["batch"] / per_step, 2))
    if stock_s is not None:
        stock_step = stock_s / n
        info["baseline_clips_per_s"] = round(shape["batch"] / stock_step, 2)
    assert per_step > 0


OPTIMIZER_ROUNDS = {"cpu": 15, "cuda": 50}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_optimizer_step(benchmark, device, impl):
    """One AdamW step over the default model's trainable parameters (28.1 M): torch's default
    implementation ("baseline": a loop over the parameters on the CPU, foreach on CUDA) against
    its fused kernel, which the Trainer runs (optim.fused)."""
    dev = torch.device(device)
    model = build_pair({}, dev)[1]
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator(device=dev).manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, device=dev) * 1e-3
    optimizers = {k: torch.optim.AdamW(params, lr=1e-4, fused=(k == "fused") or None)
                  for k in IMPLS}
    steps = {k: _round(o.step, 1, device) for k, o in optimizers.items()}
    for step in steps.values():
        step()  # the moments' first allocation
    benchmark.group = "optimizer_step:%s" % device
    interleave.time_interleaved(benchmark, steps[impl],
                                steps["baseline"] if impl == "fused" else None,
                                OPTIMIZER_ROUNDS[device])
    benchmark.extra_info.update(impl=impl, device=describe_device(dev),
                                parameters=sum(p.numel() for p in params))
    assert all(torch.isfinite(p).all() for p in params)
