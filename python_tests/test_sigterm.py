"""SIGTERM (what a cluster scheduler sends before it kills a job) during `cnnlstm-ext train`: the
step under way finishes or is abandoned, the epoch under way is abandoned, latest_checkpoint.pth
keeps the last completed epoch, and the command exits 143 with the command that resumes."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cnnlstm_ext.cli import main
from cnnlstm_ext.train import trainer as trainer_module
from cnnlstm_ext.train.trainer import StopRequested, Trainer
from conftest import subprocess_env

TINY = ["--set", "model.spatial_dim=16", "--set", "model.temporal_dim=8",
        "--set", "data.num_classes=3", "--set", "data.num_frames=4", "--set", "data.frame_size=16",
        "--set", "data.train_samples=16", "--set", "data.val_samples=9",
        "--batch-size", "8", "--no-progress", "-q", "--set", "train.tensorboard=false"]


def sigterm_self():
    os.kill(os.getpid(), signal.SIGTERM)


def train(tmp_path, epochs=3):
    return main(["train", "--output-dir", str(tmp_path), "--run-name", "r", "--epochs", str(epochs)]
                + TINY)


def latest_path(tmp_path):
    return tmp_path / "r" / "checkpoints" / "latest_checkpoint.pth"


def saved_epoch(path):
    return torch.load(path, map_location="cpu", weights_only=False)["epoch"]


def test_sigterm_mid_epoch_abandons_it_and_keeps_the_last_completed_epoch(tmp_path, capsys,
                                                                         monkeypatch):
    real = Trainer._set_epoch

    def set_epoch(self, epoch):
        real(self, epoch)
        if epoch == 2:
            sigterm_self()  # before the first step of epoch 2

    monkeypatch.setattr(Trainer, "_set_epoch", set_epoch)
    rc = train(tmp_path)
    err = capsys.readouterr().err
    assert rc == 128 + signal.SIGTERM and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("terminated (SIGTERM) after epoch 1; continue with: "
                                            "cnnlstm-ext train --resume %s" % latest_path(tmp_path))
    assert saved_epoch(latest_path(tmp_path)) == 1


def test_sigterm_during_a_save_stops_before_the_next_epoch(tmp_path, capsys, monkeypatch):
    real = trainer_module.save_checkpoint

    def save(path, **kwargs):
        if kwargs["epoch"] == 2:
            sigterm_self()  # the save under way still completes
        return real(path, **kwargs)

    monkeypatch.setattr(trainer_module, "save_checkpoint", save)
    rc = train(tmp_path, epochs=4)
    err = capsys.readouterr().err
    assert rc == 143 and "terminated (SIGTERM) after epoch 2; continue with" in err
    assert saved_epoch(latest_path(tmp_path)) == 2
    assert len((tmp_path / "r" / "history.csv").read_text().splitlines()) == 1 + 2


def test_sigterm_before_the_first_epoch_ends_says_there_is_nothing_to_resume(tmp_path, capsys,
                                                                            monkeypatch):
    real = Trainer._set_epoch

    def set_epoch(self, epoch):
        real(self, epoch)
        sigterm_self()

    monkeypatch.setattr(Trainer, "_set_epoch", set_epoch)
    rc = train(tmp_path)
    err = capsys.readouterr().err
    assert rc == 143
    assert err.strip().splitlines()[-1] == ("terminated (SIGTERM) before the first epoch ended; "
                                            "nothing to resume: start the run again")
    assert not latest_path(tmp_path).exists()


def test_sigterm_handler_is_restored_after_the_run(tmp_path, capsys):
    before = signal.getsignal(signal.SIGTERM)
    assert train(tmp_path, epochs=1) == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_trainer_request_stop_raises_stop_requested_at_the_next_step(tmp_path):
    from test_resume_optim import tiny_config
    trainer = Trainer(tiny_config(tmp_path))
    trainer.fit(stop_at_epoch=1)
    trainer.request_stop("test")
    with pytest.raises(StopRequested) as e:
        trainer.fit()
    assert (e.value.reason, e.value.epoch, trainer.epoch) == ("test", 1, 1)


def test_sigterm_to_a_training_process_exits_143_with_a_resume_hint(tmp_path):
    args = [sys.executable, "-m", "cnnlstm_ext", "train", "--output-dir", str(tmp_path),
            "--run-name", "r", "--epochs", "200"] + TINY
    proc = subprocess.Popen(args, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not latest_path(tmp_path).exists() and time.time() < deadline \
                and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("terminated (SIGTERM) after epoch ") and last.endswith(
        "; continue with: cnnlstm-ext train --resume %s" % latest_path(tmp_path))
    assert saved_epoch(latest_path(tmp_path)) == int(last.split("after epoch ")[1].split(";")[0])
