"""--resume with changed optimizer hyper-parameters: they are applied to the restored optimizer
and schedule, said in a warning, and the config recorded (config.json, every new checkpoint) is
what ran."""
import json
import logging
import math

import pytest
import torch

from cnnlstm_ext.cli import main
from cnnlstm_ext.train.config import Config
from cnnlstm_ext.train.trainer import Trainer

TINY = ["--set", "model.spatial_dim=16", "--set", "model.temporal_dim=8",
        "--set", "data.num_classes=3", "--set", "data.num_frames=4", "--set", "data.frame_size=16",
        "--set", "data.train_samples=16", "--set", "data.val_samples=9",
        "--batch-size", "8", "--no-progress", "-q", "--set", "train.tensorboard=false"]


def tiny_config(tmp_path, device="auto", **optim):
    cfg = Config()
    cfg.model.update(spatial_dim=16, temporal_dim=8)
    d, t = cfg.data, cfg.train
    d.num_classes, d.num_frames, d.frame_size, d.train_samples, d.val_samples = 3, 4, 16, 16, 9
    t.output_dir, t.run_name, t.epochs, t.batch_size = str(tmp_path), "r", 3, 8
    t.progress, t.tensorboard, t.device = False, False, device
    for k, v in optim.items():
        setattr(cfg.optim, k, v)
    return cfg


@pytest.fixture
def one_epoch(tmp_path):
    """latest_checkpoint.pth after epoch 1 of 3 (lr 1e-3, cosine)."""
    Trainer(tiny_config(tmp_path)).fit(stop_at_epoch=1)
    return tmp_path / "r" / "checkpoints" / "latest_checkpoint.pth"


def cosine(base, epoch, epochs=3, eta_min=0.0):
    return eta_min + (base - eta_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2


def test_resume_with_a_new_lr_applies_it_to_the_restored_optimizer(tmp_path, one_epoch):
    trainer = Trainer(tiny_config(tmp_path, lr=5e-4))
    trainer.resume(str(one_epoch))
    group = trainer.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(cosine(5e-4, 1))
    assert group["initial_lr"] == pytest.approx(5e-4)
    assert trainer.scheduler.base_lrs == [pytest.approx(5e-4)]


def test_resume_with_a_new_lr_says_so(tmp_path, one_epoch, caplog):
    trainer = Trainer(tiny_config(tmp_path, lr=5e-4))
    with caplog.at_level(logging.WARNING, logger="cnnlstm_ext.train"):
        trainer.resume(str(one_epoch))
    assert ("%s ran with optim.lr=0.001; resumed with optim.lr=0.0005: applied to the restored "
            "optimizer (learning rate now 0.000375)" % one_epoch) in caplog.messages


def test_resume_with_a_new_weight_decay_and_betas_applies_them(tmp_path, one_epoch):
    trainer = Trainer(tiny_config(tmp_path, weight_decay=0.05, betas=(0.8, 0.99)))
    trainer.resume(str(one_epoch))
    group = trainer.optimizer.param_groups[0]
    assert (group["weight_decay"], tuple(group["betas"])) == (0.05, (0.8, 0.99))
    assert group["lr"] == pytest.approx(cosine(1e-3, 1))  # the lr is the file's


def test_resume_without_changes_keeps_the_restored_optimizer(tmp_path, one_epoch):
    trainer = Trainer(tiny_config(tmp_path))
    trainer.resume(str(one_epoch))
    saved = torch.load(one_epoch, map_location="cpu", weights_only=False)
    assert trainer.optimizer.param_groups[0]["lr"] == saved["optimizer_state_dict"][
        "param_groups"][0]["lr"]


def test_resume_cli_with_lr_records_and_runs_the_new_lr(tmp_path, one_epoch):
    assert main(["train", "--resume", str(one_epoch), "--lr", "5e-4"] + TINY) == 0
    ckpt = torch.load(one_epoch, map_location="cpu", weights_only=False)  # now after epoch 3
    assert ckpt["epoch"] == 3 and ckpt["config"]["optim"]["lr"] == 5e-4
    assert ckpt["optimizer_state_dict"]["param_groups"][0]["initial_lr"] == pytest.approx(5e-4)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["optim"]["lr"] == 5e-4
    assert ckpt["history"]["lr"][1:] == [pytest.approx(cosine(5e-4, 1)),
                                         pytest.approx(cosine(5e-4, 2))]


def test_resume_of_a_file_without_our_config_records_the_restored_lr(tmp_path, one_epoch):
    ckpt = torch.load(one_epoch, map_location="cpu", weights_only=False)
    del ckpt["config"]
    ckpt.pop("integrity", None)  # the checksum covers the config it no longer holds
    torch.save(ckpt, tmp_path / "other.pth")
    trainer = Trainer(tiny_config(tmp_path / "b", lr=0.02))  # a default, not set by the user
    trainer.resume(str(tmp_path / "other.pth"))
    assert trainer.cfg.optim.lr == pytest.approx(1e-3)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(cosine(1e-3, 1))


def test_resume_of_a_file_without_our_config_applies_the_lr_the_user_set(tmp_path, one_epoch):
    ckpt = torch.load(one_epoch, map_location="cpu", weights_only=False)
    del ckpt["config"]
    ckpt.pop("integrity", None)  # the checksum covers the config it no longer holds
    torch.save(ckpt, tmp_path / "other.pth")
    trainer = Trainer(tiny_config(tmp_path / "b", lr=0.02))
    trainer.resume(str(tmp_path / "other.pth"), optim_changes={"lr"})
    assert trainer.cfg.optim.lr == 0.02
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(cosine(0.02, 1))


# --- optim.fused: torch's fused AdamW kernel, or its default implementation ----------------------

def _implementation(trainer):
    """(each group's fused flag, the devices and dtypes of the step counts)."""
    opt = trainer.optimizer
    steps = {(str(s["step"].device), s["step"].dtype) for s in opt.state.values() if "step" in s}
    return [g["fused"] for g in opt.param_groups], steps


def test_the_optimizer_is_fused_unless_configured_not(tmp_path):
    assert _implementation(Trainer(tiny_config(tmp_path / "a")))[0] == [True]
    assert _implementation(Trainer(tiny_config(tmp_path / "b", fused=False)))[0] == [None]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("saved, resumed", [(False, True), (True, False)])
def test_resume_runs_the_configured_implementation_whatever_the_file_was_saved_from(
        tmp_path, saved, resumed, device):
    Trainer(tiny_config(tmp_path, fused=saved, device=device)).fit(stop_at_epoch=1)
    path = tmp_path / "r" / "checkpoints" / "latest_checkpoint.pth"
    assert torch.load(path, weights_only=False)["optimizer_state_dict"]["param_groups"][0][
        "fused"] == (True if saved else None)
    trainer = Trainer(tiny_config(tmp_path, fused=resumed, device=device))
    trainer.resume(str(path))
    # the fused kernel reads the step count on the parameters' device, the default one on the CPU
    step_device = torch.device(device).type if resumed else "cpu"
    assert _implementation(trainer) == ([True if resumed else None],
                                        {(step_device, torch.float32)})
    assert trainer.fit()["epochs_completed"] == 3
    assert torch.load(path, weights_only=False)["optimizer_state_dict"]["param_groups"][0][
        "fused"] == (True if resumed else None)


def test_the_fused_and_default_implementations_learn_the_same_weights(tmp_path):
    """The fused kernel is a faster schedule of the same update: two epochs end at the same
    weights and moments up to float32 rounding."""
    runs = {}
    for fused in (True, False):
        trainer = Trainer(tiny_config(tmp_path / str(fused), fused=fused))
        trainer.fit(stop_at_epoch=2)
        runs[fused] = trainer
    a, b = runs[True], runs[False]
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
        sa, sb = a.optimizer.state[p], b.optimizer.state[q]
        assert float(sa["step"]) == float(sb["step"]) == 4.0
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-4, atol=1e-9)


def test_a_fused_run_s_file_loads_into_a_plain_adamw(tmp_path, one_epoch):
    """A script of the user's that knows nothing of this package resumes from the file."""
    ckpt = torch.load(one_epoch, weights_only=True)
    model = Trainer(tiny_config(tmp_path / "b")).model
    model.load_state_dict(ckpt["model_state_dict"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params)
    opt.load_state_dict(ckpt["optimizer_state_dict"])
    assert opt.param_groups[0]["fused"] is True  # the file's flag: torch's fused kernel runs
    before = [p.detach().clone() for p in params]
    model.train()
    model(torch.randn(2, 4, 3, 16, 16)).logsumexp(1).mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(p, q) for p, q in zip(params, before))
    assert all(float(opt.state[p]["step"]) == 3.0 for p in params)  # 2 steps in the file + 1


def test_a_compiled_model_trains_with_the_fused_optimizer(tmp_path):
    """train.compile (torch.compile of the model; ResNet-18, whose shortcuts are 1 x 1
    convolutions) with the fused AdamW: one epoch runs and learns finite weights."""
    cfg = tiny_config(tmp_path)
    cfg.model["backbone"] = "resnet18"
    cfg.train.compile, cfg.train.epochs = True, 1
    trainer = Trainer(cfg)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    assert trainer.fit()["epochs_completed"] == 1
    after = list(trainer.model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(p, q) for p, q in zip(after, before))
    assert trainer.optimizer.param_groups[0]["fused"] is True
