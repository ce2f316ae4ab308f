"""`cnnlstm-ext train | evaluate | bench` from the command line (and the dispatcher's help)."""
import argparse
import csv
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from cnnlstm_ext.cli import main
from cnnlstm_ext.commands import train as train_command
from cnnlstm_ext.data import write_video
from conftest import subprocess_env

TINY = ["--set", "model.spatial_dim=16", "--set", "model.temporal_dim=8",
        "--set", "data.num_classes=3", "--set", "data.num_frames=4", "--set", "data.frame_size=16",
        "--set", "data.train_samples=16", "--set", "data.val_samples=9",
        "--batch-size", "8", "--no-progress", "--set", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch run through the CLI: (output dir, its stdout)."""
    out = tmp_path_factory.mktemp("cli")
    import io
    from contextlib import redirect_stdout
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["train", "--output-dir", str(out), "--run-name", "r", "--epochs", "2"] + TINY)
    assert rc == 0
    return out, buf.getvalue()


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for command in ("train", "evaluate", "summarize", "inspect", "verify", "export", "bench"):
        assert command in text


@pytest.mark.parametrize("command", ["train", "evaluate", "bench"])
def test_command_help_explains_usage(capsys, command):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage: cnnlstm-ext " + command in text and "cnnlstm-ext %s" % command in text


def test_python_dash_m_entry_point(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cnnlstm_ext", "train", "--help"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=subprocess_env())
    assert done.returncode == 0 and "synthetic" in done.stdout


def test_train_without_arguments_is_the_synthetic_cpu_job():
    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    cfg, key_map, explicit = train_command.build_config(parser.parse_args([]))
    assert cfg.data.dataset == "synthetic" and cfg.model["backbone"] == "tiny"
    assert cfg.train.run_name == "synthetic" and cfg.train.output_dir == "outputs"
    assert cfg.optim.optimizer == "adamw" and cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 1e-4
    assert cfg.optim.scheduler == "cosine" and key_map is None and not explicit


def test_train_leaves_checkpoints_logs_metrics_and_report(trained):
    out, stdout = trained
    run = out / "r"
    assert "run folder" in stdout and "best epoch" in stdout
    for name in ("checkpoints/latest_checkpoint.pth", "checkpoints/best_checkpoint.pth",
                 "config.json", "train.log", "history.csv", "final_metrics.json",
                 "summary/summary.md", "summary/accuracy.png"):
        assert (run / name).is_file(), name
    ckpt = torch.load(run / "checkpoints" / "latest_checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["config"]["data"]["num_frames"] == 4


def test_a_second_run_does_not_overwrite_the_first(trained, capsys):
    out, _ = trained
    before = os.path.getmtime(out / "r" / "checkpoints" / "latest_checkpoint.pth")
    assert main(["train", "--output-dir", str(out), "--run-name", "r", "--epochs", "1"] + TINY) == 0
    assert (out / "r-2" / "checkpoints" / "latest_checkpoint.pth").is_file()
    assert os.path.getmtime(out / "r" / "checkpoints" / "latest_checkpoint.pth") == before


def test_resume_continues_in_the_same_run_folder(trained, tmp_path):
    out, _ = trained
    import shutil
    shutil.copytree(out / "r", tmp_path / "r")
    latest = tmp_path / "r" / "checkpoints" / "latest_checkpoint.pth"
    assert main(["train", "--resume", str(latest), "--epochs", "3", "--no-progress"]) == 0
    ckpt = torch.load(latest, weights_only=True)
    assert ckpt["epoch"] == 3 and len(ckpt["history"]["val_acc"]) == 3
    assert not (tmp_path / "r-2").exists()
    assert ckpt["scheduler_state_dict"]["T_max"] == 3 and ckpt["history"]["lr"][2] > 0


def test_resume_from_another_folder_finds_the_data_given_relative(tmp_path, monkeypatch):
    """A run started with a relative data folder stores it absolute: resumed from elsewhere, it
    reads the same videos."""
    data = tmp_path / "work" / "data"
    for c in range(2):
        for i in range(3):
            g = torch.Generator().manual_seed(10 * c + i)
            frames = torch.randint(0, 255, (6, 3, 24, 32), generator=g, dtype=torch.uint8)
            os.makedirs(data / ("c%d" % c), exist_ok=True)
            write_video(str(data / ("c%d" % c) / ("v%d.mp4" % i)), frames)
    monkeypatch.chdir(tmp_path / "work")
    tiny = ["--set", "model.spatial_dim=16", "--set", "model.temporal_dim=8", "--set",
            "data.num_frames=4", "--set", "data.frame_size=16", "--num-workers", "0",
            "--batch-size", "4", "--no-progress", "--set", "train.tensorboard=false",
            "--set", "data.val_fraction=0.34"]
    assert main(["train", "--data", "data", "--output-dir", "runs", "--run-name", "r",
                 "--epochs", "1"] + tiny) == 0
    latest = tmp_path / "work" / "runs" / "r" / "checkpoints" / "latest_checkpoint.pth"
    assert torch.load(latest, weights_only=True)["config"]["data"]["root"] == str(data)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", str(latest), "--epochs", "2", "--no-progress"]) == 0
    assert torch.load(latest, weights_only=True)["epoch"] == 2


def test_resume_names_the_data_folder_it_cannot_find(tmp_path, capsys):
    """A run whose stored data folder is gone: one error line, with what to give."""
    data = tmp_path / "data"
    for c in range(2):
        for i in range(2):
            os.makedirs(data / ("c%d" % c), exist_ok=True)
            write_video(str(data / ("c%d" % c) / ("v%d.mp4" % i)),
                        torch.full((6, 3, 24, 32), 40 * (c + 1), dtype=torch.uint8))
    tiny = ["--set", "model.spatial_dim=16", "--set", "model.temporal_dim=8", "--set",
            "data.num_frames=4", "--set", "data.frame_size=16", "--num-workers", "0",
            "--batch-size", "4", "--no-progress", "--set", "train.tensorboard=false",
            "--set", "data.val_fraction=0.5"]
    assert main(["train", "--data", str(data), "--output-dir", str(tmp_path / "runs"),
                 "--run-name", "r", "--epochs", "1"] + tiny) == 0
    data.rename(tmp_path / "moved")
    capsys.readouterr()
    latest = tmp_path / "runs" / "r" / "checkpoints" / "latest_checkpoint.pth"
    assert main(["train", "--resume", str(latest), "--epochs", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data folder not found: %s" % data)
    assert "give --data PATH" in err[0]
    assert main(["train", "--resume", str(latest), "--epochs", "2", "--no-progress",
                 "--data", str(tmp_path / "moved")]) == 0


def test_resume_a_legacy_checkpoint_from_the_command_line(tmp_path, capsys):
    import importlib.util
    import pathlib
    here = pathlib.Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location("legacy_run", here / "legacy_run.py")
    legacy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(legacy)
    legacy.train(str(tmp_path / "legacy"), epochs=2)
    rc = main(["train", "--resume", str(tmp_path / "legacy" / "latest_checkpoint.pth"),
               "--output-dir", str(tmp_path), "--run-name", "cont", "--epochs", "3", "--no-progress",
               "--set", "data.num_classes=%d" % legacy.NUM_CLASSES,
               "--set", "data.num_frames=%d" % legacy.FRAMES, "--set", "data.frame_size=%d" % legacy.SIZE,
               "--set", "data.train_samples=16", "--set", "data.val_samples=10"])
    assert rc == 0
    ckpt = torch.load(tmp_path / "cont" / "checkpoints" / "latest_checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["config"]["model"]["temporal_dim"] == legacy.HIDDEN
    assert "lstm.weight_ih_l0" in ckpt["model_state_dict"]  # saved under CNNLSTM's names


def test_evaluate_prints_metrics_and_writes_predictions(trained, tmp_path, capsys):
    out, _ = trained
    best = out / "r" / "checkpoints" / "best_checkpoint.pth"
    assert main(["evaluate", str(best), "synthetic", "--out", str(tmp_path / "ev"),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert "accuracy   %.4f" % metrics["acc"] in text and "per class" in text
    with open(tmp_path / "ev" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 == metrics["count"]
    assert sum(int(r["correct"]) for r in rows) == round(metrics["acc"] * 9)
    assert {r["label_name"] for r in rows} <= {"approach", "recede", "approach-fast"}
    # the run's own validation accuracy at its best epoch
    ckpt = torch.load(best, weights_only=True)
    assert metrics["acc"] == pytest.approx(ckpt["val_acc"])


def test_evaluate_default_output_is_in_the_run_folder(trained):
    out, _ = trained
    best = out / "r" / "checkpoints" / "best_checkpoint.pth"
    assert main(["evaluate", str(best), "synthetic", "--split", "test", "--no-progress"]) == 0
    assert (out / "r" / "evaluation" / "synthetic-test" / "predictions.csv").is_file()


def test_evaluate_rejects_data_with_other_classes(trained, tmp_path, capsys):
    out, _ = trained
    for cls in ("a", "b"):
        (tmp_path / "v" / cls).mkdir(parents=True)
        write_video(str(tmp_path / "v" / cls / "c.mp4"), torch.zeros(4, 3, 16, 16, dtype=torch.uint8))
    rc = main(["evaluate", str(out / "r" / "checkpoints" / "best_checkpoint.pth"), str(tmp_path / "v")])
    assert rc == 2 and "classes" in capsys.readouterr().err


def test_quiet_train_prints_no_epoch_lines_but_logs_them(tmp_path, capsys):
    assert main(["train", "--output-dir", str(tmp_path), "--run-name", "q", "--epochs", "1", "-q"]
                + TINY) == 0
    assert "epoch 1/1" not in capsys.readouterr().err
    assert "epoch 1/1" in (tmp_path / "q" / "train.log").read_text()
    train_command.setup_logging(quiet=False)


def test_train_reports_config_errors(tmp_path, capsys):
    assert main(["train", "--output-dir", str(tmp_path), "--set", "train.epoch=3"]) == 2
    assert "unknown key train.epoch" in capsys.readouterr().err
    assert main(["train", "--output-dir", str(tmp_path), "--data", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_bench_compares_fused_and_stock(tmp_path, capsys):
    result = tmp_path / "bench.json"
    rc = main(["bench", "--device", "cpu", "--set", "model.backbone=tiny", "--set",
               "model.spatial_dim=16", "--set", "model.temporal_dim=8", "--set", "model.num_layers=1",
               "--set", "model.num_classes=4", "--batch-size", "2", "--frames", "4", "--size", "16",
               "--steps", "1", "--rounds", "1", "--json", str(result)])
    assert rc == 0
    r = json.loads(result.read_text())
    assert r["fused_clips_per_s"] > 0 and r["stock_clips_per_s"] > 0
    assert r["speedup"] == pytest.approx(r["stock_step_s"] / r["fused_step_s"])
    assert "fused / stock" in capsys.readouterr().out


@pytest.mark.slow  # two processes through torchrun
def test_torchrun_two_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = subprocess_env(OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(port), "-m", "cnnlstm_ext", "train", "--device", "cpu",
         "--output-dir", str(tmp_path), "--run-name", "ddp", "--epochs", "1"] + TINY,
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "latest_checkpoint.pth", weights_only=True)
    assert ckpt["trainer_state"]["world_size"] == 2 and ckpt["epoch"] == 1
    assert done.stdout.count("run folder") == 1  # only rank 0 reports
    assert not (tmp_path / "ddp-2").exists()
