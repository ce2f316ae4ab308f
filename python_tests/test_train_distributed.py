"""Distributed training: 2 gloo processes on the CPU take the same steps as 1 process with the same
global batch, and evaluation counts every validation clip once."""
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cnnlstm_ext.train import Config, Trainer
from cnnlstm_ext.train.distributed import DistContext, ShardSampler, data_parallel, init_distributed


def _config(out_dir, run):
    cfg = Config()
    cfg.model.update(spatial_dim=16, temporal_dim=8, dropout=0.0)
    d = cfg.data
    d.num_classes, d.num_frames, d.frame_size = 3, 4, 16
    d.train_samples, d.val_samples = 32, 13  # 13: the two processes evaluate 7 and 6 clips
    d.min_frames = 3
    t = cfg.train
    t.output_dir, t.run_name = str(out_dir), run
    t.epochs, t.batch_size, t.progress, t.tensorboard = 2, 8, False, False
    return cfg


def _model(cfg):
    """CNNLSTM with BatchNorm replaced by identities: per-process batch statistics would make
    the CPU runs differ (SyncBatchNorm, which the trainer uses on GPUs, has no CPU kernel)."""
    from cnnlstm_ext.models import CNNLSTM

    torch.manual_seed(cfg.train.seed)
    model = CNNLSTM(**dict(cfg.model, num_classes=cfg.data.num_classes))
    for name, module in list(model.backbone.named_children()):
        if isinstance(module, nn.BatchNorm2d):
            setattr(model.backbone, name, nn.Identity())
    return model


def _worker(rank, world_size, port, out_dir):
    # As under torchrun: the launcher (here the test) hosts the rendezvous store, every rank is a
    # client of it.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    try:
        cfg = _config(out_dir, "ddp")
        result = Trainer(cfg, model=_model(cfg), ctx=ctx).fit()
        torch.save({"count": result["final_metrics"]["count"]},
                   os.path.join(out_dir, "rank%d.pt" % rank))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes, each importing torch
def test_two_gloo_processes_equal_one_process(tmp_path):
    torch.set_num_threads(1)
    cfg = _config(tmp_path, "single")
    single = Trainer(cfg, model=_model(cfg)).fit()
    # The store listens on a port the system picks as it binds (no probed port another process
    # could take before a worker binds it).
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                       timeout=timedelta(seconds=120))
    mp.start_processes(_worker, args=(2, store.port, str(tmp_path)), nprocs=2, start_method="spawn")
    del store

    a = torch.load(tmp_path / "single" / "checkpoints" / "latest_checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "ddp" / "checkpoints" / "latest_checkpoint.pth", weights_only=True)
    assert a["model_state_dict"].keys() == b["model_state_dict"].keys()
    for k, v in a["model_state_dict"].items():
        # the same steps; only the order of the gradient sums differs
        assert torch.allclose(v, b["model_state_dict"][k], rtol=1e-4, atol=1e-6), k
    for k in ("train_loss", "train_acc", "val_loss", "val_acc", "val_f1"):
        assert b["history"][k] == pytest.approx(a["history"][k], rel=1e-4, abs=1e-6), k
    assert b["trainer_state"]["world_size"] == 2
    for rank in (0, 1):  # every process saw the summed metrics of all 13 clips
        assert torch.load(tmp_path / ("rank%d.pt" % rank))["count"] == 13
    assert single["final_metrics"]["count"] == 13


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_data_parallel_keeps_lengths_on_the_cpu(device):
    """The trainer's DDP wrapper hands the model its inputs as given: the CPU lengths stay on
    the CPU (DDP with a device id would copy them to the GPU, and the model reads them back)."""
    cfg = _config(".", "unused")
    model = _model(cfg).to(device)
    g = torch.Generator().manual_seed(0)
    clips = torch.randn(2, 4, 3, 16, 16, generator=g).to(device)
    lengths = torch.tensor([4, 2])
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[1].device))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        net = data_parallel(model)
        with torch.no_grad():
            out = net(clips, lengths)
            expected = model(clips, lengths)
    finally:
        dist.destroy_process_group()
    assert seen == [torch.device("cpu")] * 2
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_shard_sampler_covers_every_index_once():
    shards = [list(ShardSampler(13, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(13))
    assert [len(ShardSampler(13, r, 3)) for r in range(3)] == [5, 4, 4]


def test_single_process_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_distributed("cpu")
    assert ctx == DistContext() and ctx.is_main and not ctx.enabled


def test_global_batch_must_divide_over_processes(tmp_path):
    cfg = _config(tmp_path, "odd")
    cfg.train.batch_size = 7
    with pytest.raises(ValueError, match="divide evenly over 2 processes"):
        Trainer(cfg, ctx=DistContext(rank=0, world_size=2))
