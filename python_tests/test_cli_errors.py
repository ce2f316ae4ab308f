"""Expected failures of the commands end in one `error:` line on stderr and a non-zero exit,
without a traceback: config syntax, output paths (checked before data and model are built), a
full disk during a run (the files written before stay), sizes no machine holds, bad options."""
import errno
import os
import subprocess
import sys

import pytest
import torch

from cnnlstm_ext.cli import main
from cnnlstm_ext.train import trainer as trainer_module
from conftest import subprocess_env

TINY = ["--set", "model.spatial_dim=16", "--set", "model.temporal_dim=8",
        "--set", "data.num_classes=3", "--set", "data.num_frames=4", "--set", "data.frame_size=16",
        "--set", "data.train_samples=16", "--set", "data.val_samples=9",
        "--batch-size", "8", "--no-progress", "-q", "--set", "train.tensorboard=false"]


def error_lines(capsys):
    """(stderr lines that start with error:, the whole stderr)."""
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.startswith("error:")], err


@pytest.fixture
def no_data(monkeypatch):
    """Fails a test that builds a data set: the checks must come first."""
    def build(*args, **kwargs):
        raise AssertionError("the data set was built before the check")
    monkeypatch.setattr("cnnlstm_ext.data.datasets.build_datasets", build)


@pytest.mark.parametrize("name,text,kind", [
    ("run.yaml", "train:\n  epochs: [1, 2\n", "YAML"),
    ("run.toml", "[train]\nepochs = = 3\n", "TOML"),
    ("run.json", '{"train": {"epochs": 3,}}', "JSON"),
])
def test_train_config_syntax_error_is_one_error_line(tmp_path, capsys, name, text, kind):
    (tmp_path / name).write_text(text)
    rc = main(["train", "--config", str(tmp_path / name), "--output-dir", str(tmp_path)])
    lines, err = error_lines(capsys)
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("error: config file %s is not valid %s: " % (tmp_path / name, kind))


def test_train_config_file_that_is_a_folder_is_one_error_line(tmp_path, capsys):
    (tmp_path / "run.yaml").mkdir()
    rc = main(["train", "--config", str(tmp_path / "run.yaml"), "--output-dir", str(tmp_path)])
    lines, err = error_lines(capsys)
    assert (rc, len(lines)) == (2, 1) and "Traceback" not in err


def test_train_output_dir_under_a_file_fails_before_the_data(tmp_path, capsys, no_data):
    (tmp_path / "file").write_text("x")
    rc = main(["train", "--output-dir", str(tmp_path / "file" / "out")] + TINY)
    lines, err = error_lines(capsys)
    assert rc == 2 and "Traceback" not in err
    assert lines == ["error: run folder %s: %s is a file, not a folder"
                     % (os.path.join(str(tmp_path / "file" / "out"), "synthetic", "checkpoints"),
                        tmp_path / "file")]


def test_train_output_dir_not_writable_fails_before_the_data(tmp_path, capsys, monkeypatch, no_data):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(tmp_path)
                        else real_access(p, mode, **kw))
    rc = main(["train", "--output-dir", str(tmp_path / "out")] + TINY)
    lines, err = error_lines(capsys)
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("error: run folder ") and "cannot write in %s (" % tmp_path in lines[0]


def test_train_disk_full_during_a_save_is_one_error_line_and_keeps_the_previous_files(
        tmp_path, capsys, monkeypatch):
    real_save = trainer_module.save_checkpoint

    def save(path, **kwargs):
        if kwargs["epoch"] >= 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(path, **kwargs)

    monkeypatch.setattr(trainer_module, "save_checkpoint", save)
    rc = main(["train", "--output-dir", str(tmp_path), "--run-name", "r", "--epochs", "3"] + TINY)
    lines, err = error_lines(capsys)
    latest = tmp_path / "r" / "checkpoints" / "latest_checkpoint.pth"
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err
    assert "[Errno 28] No space left on device" in lines[0]
    assert lines[0].endswith("the checkpoint of epoch 1 stays: continue with: cnnlstm-ext train "
                             "--resume %s" % latest)
    assert torch.load(latest, map_location="cpu", weights_only=False)["epoch"] == 1


def test_train_memory_error_while_building_the_data_is_one_error_line(tmp_path, capsys, monkeypatch):
    def build(*args, **kwargs):
        raise MemoryError("Unable to allocate 28.0 TiB for an array")
    monkeypatch.setattr("cnnlstm_ext.data.datasets.build_datasets", build)
    rc = main(["train", "--output-dir", str(tmp_path)] + TINY)
    lines, err = error_lines(capsys)
    assert rc == 2 and "Traceback" not in err
    assert lines == ["error: Unable to allocate 28.0 TiB for an array"]


def test_train_huge_frame_size_is_refused_before_anything_runs(tmp_path, capsys, no_data):
    rc = main(["train", "--output-dir", str(tmp_path)] + TINY + ["--set", "data.frame_size=100000"])
    lines, _ = error_lines(capsys)
    assert (rc, lines) == (2, ["error: data.frame_size must be <= 4096, got 100000"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["train", "cache"])
def test_data_that_is_a_file_is_named_a_file_not_a_missing_folder(tmp_path, capsys, command):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\0" * 64)
    options = (["--output-dir", str(tmp_path / "out")] + TINY if command == "train"
               else ["--out", str(tmp_path / "cache"), "--no-progress"])
    rc = main([command, "--data", str(video)] + options)
    lines, err = error_lines(capsys)
    assert "Traceback" not in err and "not found" not in err
    assert (rc, lines) == (2, ["error: %s is a file, not a data folder: expected a folder of class "
                               "folders (one sub-folder per class: root/<class>/<clip>) or a WLASL "
                               ".json annotation file" % video])


@pytest.mark.parametrize("option,message", [
    (["--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
    (["--num-workers", "-1"], "error: --num-workers must be >= 0, got -1"),
])
def test_evaluate_bad_loader_option_is_one_error_line(tmp_path, capsys, option, message):
    rc = main(["evaluate", str(tmp_path / "missing.pth"), "synthetic"] + option)
    lines, err = error_lines(capsys)
    assert (rc, lines) == (2, [message]) and "Traceback" not in err


def test_evaluate_output_under_a_file_is_one_error_line_before_reading(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    rc = main(["evaluate", str(tmp_path / "missing.pth"), "synthetic", "--out",
               str(tmp_path / "file" / "eval")])
    lines, err = error_lines(capsys)
    assert (rc, lines) == (2, ["error: output folder %s: %s is a file, not a folder"
                               % (tmp_path / "file" / "eval", tmp_path / "file")])


def test_export_to_a_path_under_a_file_is_one_error_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "w.safetensors"
    rc = main(["export", str(tmp_path / "missing.pth"), "--safetensors", str(out)])
    text = capsys.readouterr()
    assert rc == 1 and "Traceback" not in text.err
    assert text.err.splitlines() == ["error: --safetensors %s: %s is a file, not a folder"
                                     % (out.parent, tmp_path / "file")]


def test_cli_turns_an_unforeseen_os_error_into_one_error_line(capsys, monkeypatch):
    from cnnlstm_ext.commands import inspect as inspect_command

    def run(args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(inspect_command, "run", run)
    rc = main(["inspect", "x.pth"])
    lines, err = error_lines(capsys)
    assert (rc, lines) == (1, ["error: [Errno 28] No space left on device"])


def test_train_names_the_run_folder_it_cannot_create(tmp_path, capsys):
    out = tmp_path / ("x" * 300)  # a name the file system refuses, in a folder it can write in
    rc = main(["train", "--output-dir", str(out)] + TINY)
    lines, err = error_lines(capsys)
    folder = os.path.join(str(out), "synthetic", "checkpoints")
    assert "Traceback" not in err and "[Errno" not in err
    assert (rc, lines) == (2, ["error: cannot create the run folder %s: File name too long (%s)"
                               % (folder, out)])


def small_checkpoint(path):
    from cnnlstm_ext import CNNLSTM
    from cnnlstm_ext.checkpoint import save_checkpoint
    torch.manual_seed(0)
    model = CNNLSTM(num_classes=3, spatial_dim=16, temporal_dim=8, backbone="tiny")
    return save_checkpoint(path, model=model, epoch=1)


def test_an_unreadable_checkpoint_is_exit_2_for_every_command_that_reads_one(tmp_path, capsys):
    from video_runs import write_clip
    ckpt = small_checkpoint(tmp_path / "c.pth")
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[:len(data) * 3 // 4])
    ckpt = str(ckpt)
    write_clip(tmp_path / "a.mp4", 0, 6, seed=1)
    commands = {
        "predict": ["predict", ckpt, str(tmp_path / "a.mp4"), "--no-progress",
                    "--num-workers", "0"],
        "evaluate": ["evaluate", ckpt, "synthetic", "--out", str(tmp_path / "eval")],
        "train --resume": ["train", "--resume", ckpt, "--output-dir", str(tmp_path / "runs")],
        "export": ["export", ckpt, "--safetensors", str(tmp_path / "w.safetensors")],
        "inspect": ["inspect", ckpt],
    }
    for name, argv in commands.items():
        rc = main(argv)
        out = capsys.readouterr()
        lines = [line for line in (out.out + out.err).splitlines() if line.startswith("error:")]
        assert (name, rc) == (name, 2)
        assert len(lines) == 1 and "truncated" in lines[0] and "Traceback" not in out.err, name
    # verify's verdict on it (exit 1: a bad file found), not an error of reading the input
    assert main(["verify", ckpt]) == 1
    assert "BAD  c.pth" in capsys.readouterr().out


def test_cli_ends_quietly_when_stdout_is_closed(capsys, monkeypatch):
    from cnnlstm_ext.commands import inspect as inspect_command

    def run(args):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")
    monkeypatch.setattr(inspect_command, "run", run)
    rc = main(["inspect", "x.pth"])
    out = capsys.readouterr()
    assert (rc, out.err) == (141, "")  # 128 + SIGPIPE, as for cat or grep in a closed pipe


def test_a_command_writing_into_a_closed_pipe_exits_141_without_a_message(tmp_path):
    ckpt = small_checkpoint(tmp_path / "c.pth")
    read, write = os.pipe()
    os.close(read)  # `cnnlstm-ext inspect c.pth | head -0`: the reader is gone before the write
    try:
        done = subprocess.run([sys.executable, "-m", "cnnlstm_ext", "inspect", str(ckpt)],
                              stdout=write, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                              env=subprocess_env(), timeout=300)
    finally:
        os.close(write)
    assert done.returncode == 141, done.stderr
    for text in ("error", "Broken pipe", "BrokenPipeError", "Traceback"):
        assert text not in done.stderr
