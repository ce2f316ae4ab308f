"""Multi-process training through `torchrun` (one or many nodes).

    torchrun --nproc_per_node 8 -m cnnlstm_ext train --config run.toml            # one node
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --nproc_per_node 8 \\
        -m cnnlstm_ext train --config run.toml                                   # each node

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_distributed`
reads them and joins the process group: NCCL when the processes train on GPUs, gloo on CPUs.
Without those variables the run is a single process and nothing here is used.

The training data are split by a DistributedSampler (reshuffled per epoch with set_epoch); the
global batch (`train.batch_size`) is split evenly over the processes, so a run on N processes
takes the same optimisation steps as one process with the same global batch. Evaluation splits
the data without padding (`ShardSampler`) and sums the metric counts over processes. Only rank 0
writes files (checkpoints, logs, reports).
"""
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        """Sums (or `op`s) a tensor over all processes, in place; a no-op in a single process."""
        if self.enabled:
            dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, obj):
        """rank 0's `obj` on every process."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistContext:
    """Joins the process group torchrun describes; returns a DistContext (single process if none).

    device "auto"/"cuda" with GPUs: NCCL, one GPU per process (cuda:LOCAL_RANK); otherwise gloo.
    """
    if not launched_by_torchrun():
        return DistContext()
    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if world_size == 1:
        return DistContext(rank=0, world_size=1, local_rank=local_rank)
    use_cuda = device != "cpu" and torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError("LOCAL_RANK %d but only %d GPUs are visible on this node"
                               % (local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        kwargs = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if use_cuda:
            kwargs["device_id"] = torch.device("cuda", local_rank)
        dist.init_process_group(**kwargs)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """`model` (on one device) under DistributedDataParallel.

    `device_ids` stays None, also for a model on a GPU: with a device id, DDP copies every input
    to that device, the `lengths` too, which the model reads on the host: a copy there and a
    read-back, which waits for the GPU, every step. The trainer moves the clips itself.
    """
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=None)


class ShardSampler(Sampler):
    """Indices rank, rank + world, rank + 2 world, ... of a data set: every sample exactly once
    over all processes (no padding, unlike DistributedSampler), for evaluation."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))
