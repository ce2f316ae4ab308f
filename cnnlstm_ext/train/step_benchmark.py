"""One full training step of a CNNLSTM, fused against stock, timed in the same run.

A step is what the Trainer does per batch: forward under autocast, cross-entropy, backward,
gradient clipping, AdamW. "fused" is CNNLSTM(fused=True) with the library's FusedBiLSTM and fused
pooling ops; "stock" is the same model with torch.nn.LSTM and the pooling written as plain PyTorch
(`cnnlstm_ext.reference`), with identical weights and the same batch.

The two are timed in alternating rounds (stock, fused, stock, ...), so both see the same machine
state; each round runs `steps` steps and synchronises once. The figure is clips per second of the
median round; the ratio is fused over stock.
"""
import statistics
import time
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from .. import reference

# The benchmark shapes of the issue on a GPU, and a CPU-sized version of them.
GPU_SHAPE = {"batch": 32, "frames": 32, "size": 112}
CPU_SHAPE = {"batch": 4, "frames": 8, "size": 112}


class ReferenceFramePool(nn.Module):
    """FramePool as the plain PyTorch sequence it replaces: maps [B*T, C, h, w] -> [T, B, C]."""

    def __init__(self, mode: str = "avg", batch_first: bool = False, out_dtype=None):
        super().__init__()
        self.mode, self.batch_first, self.out_dtype = mode, batch_first, out_dtype

    def forward(self, maps: torch.Tensor, batch_size: int) -> torch.Tensor:
        return reference.frame_pool(maps, batch_size, self.mode, self.batch_first, self.out_dtype)


class ReferenceTemporalPool(nn.Module):
    """TemporalPool as plain PyTorch: x [T, B, D] + lengths [B] -> [B, D]; keeps `score`."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.mode, self.batch_first = pool.mode, pool.batch_first
        self.bidirectional = pool.bidirectional
        self.score = pool.score  # the same parameters (attention), so the state dict is unchanged

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight = self.score.weight if self.score is not None else None
        bias = self.score.bias if self.score is not None else None
        return reference.temporal_pool(x, lengths, self.mode, self.batch_first, self.bidirectional,
                                       weight, bias)


def build_pair(model_config: Dict[str, Any], device: torch.device, seed: int = 0,
               channels_last: Optional[bool] = None):
    """(fused, stock) CNNLSTMs with the same weights, on `device`; convolutions in NHWC layout
    when channels_last (None: on GPUs), as the Trainer runs them."""
    from ..models import CNNLSTM

    config = dict(model_config)
    config.pop("fused", None)
    torch.manual_seed(seed)
    fused = CNNLSTM(fused=True, **config)
    stock = CNNLSTM(fused=False, **config)
    stock.frame_pool = ReferenceFramePool(fused.frame_pool.mode, fused.frame_pool.batch_first,
                                          getattr(fused.frame_pool, "out_dtype", None))
    stock.temporal_pool = ReferenceTemporalPool(stock.temporal_pool)
    stock.load_state_dict(fused.state_dict())
    fused, stock = fused.to(device), stock.to(device)
    if channels_last if channels_last is not None else device.type == "cuda":
        fused = fused.to(memory_format=torch.channels_last)
        stock = stock.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return fused, stock


def make_batch(batch: int, frames: int, size: int, num_classes: int, device: torch.device,
               seed: int = 0):
    """Random clips [B, T, 3, size, size] and labels [B] (speed does not depend on the values)."""
    g = torch.Generator().manual_seed(seed)
    clips = torch.randn(batch, frames, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    return clips, labels


def train_step(model: nn.Module, clips: torch.Tensor, labels: torch.Tensor,
               amp_dtype: Optional[torch.dtype], lr: float = 1e-3,
               grad_clip: float = 1.0) -> Callable[[], None]:
    """The Trainer's step as a closure: autocast forward, loss, backward, clipping, AdamW (fused,
    the Trainer's default optim.fused)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4, fused=True)
    criterion = nn.CrossEntropyLoss()
    device_type = clips.device.type
    model.train()

    def step():
        with torch.autocast(device_type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            logits = model(clips)
        loss = criterion(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare_train_step(model_config: Dict[str, Any], batch: int, frames: int, size: int,
                       device: torch.device, amp_dtype: Optional[torch.dtype], steps: int = 3,
                       rounds: int = 3, warmup: int = 1, channels_last: Optional[bool] = None,
                       profile_dir: Optional[str] = None) -> Dict[str, Any]:
    """Times fused and stock steps in alternating rounds; returns clips/s of each and the ratio.

    profile_dir: also profile 2 steps of each with torch.profiler after the timing, writing
    profile_<name>.txt (operators by self time) and trace_<name>.json (chrome://tracing) there.
    """
    fused, stock = build_pair(model_config, device, channels_last=channels_last)
    clips, labels = make_batch(batch, frames, size, fused.config["num_classes"], device)
    runs = {"stock": train_step(stock, clips, labels, amp_dtype),
            "fused": train_step(fused, clips, labels, amp_dtype)}
    for step in runs.values():
        for _ in range(warmup):
            step()
        synchronize(device)
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, step in runs.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / steps)
    result = {"batch": batch, "frames": frames, "size": size, "device": describe_device(device),
              "dtype": str(amp_dtype or torch.float32).replace("torch.", ""),
              "steps_per_round": steps, "rounds": rounds,
              "parameters": sum(p.numel() for p in fused.parameters())}
    for name in runs:
        median = statistics.median(times[name])
        result[name + "_step_s"] = median
        result[name + "_clips_per_s"] = batch / median
    result["speedup"] = result["stock_step_s"] / result["fused_step_s"]
    result["channels_last"] = any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
                                  and not p.is_contiguous() for p in fused.parameters())
    if profile_dir is not None:
        result["profiles"] = {name: profile_steps(step, device, profile_dir, name)
                              for name, step in runs.items()}
    return result


def profile_steps(step: Callable[[], None], device: torch.device, out_dir: str, name: str,
                  steps: int = 2) -> str:
    """Profiles `steps` calls of `step`; writes the operator table and a chrome trace."""
    import os

    from torch.profiler import ProfilerActivity, profile

    os.makedirs(out_dir, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = os.path.join(out_dir, "profile_%s.txt" % name)
    with open(table, "w") as f:
        f.write("%d training steps, %s\n\n" % (steps, describe_device(device)))
        f.write(prof.key_averages().table(sort_by=sort, row_limit=40))
    prof.export_chrome_trace(os.path.join(out_dir, "trace_%s.json" % name))
    return table


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu (%d threads)" % torch.get_num_threads()
