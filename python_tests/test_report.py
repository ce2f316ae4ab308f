"""The checkpoint-folder summary: findings from a designed run, the markdown table, plots, CLI."""
import json
import math
import os
import struct

import pytest
import torch

from cnnlstm_ext import CNNLSTM
from cnnlstm_ext import report
from cnnlstm_ext.checkpoint import save_checkpoint
from cnnlstm_ext.cli import main as cli
from cnnlstm_ext.report import analyse, summarize

NAN = float("nan")
TINY = dict(num_classes=4, spatial_dim=16, temporal_dim=8, num_layers=1, backbone="tiny")


# Two shared cores: more intra-op threads only add contention for these tiny models.
pytestmark = pytest.mark.usefixtures("one_thread")


def designed_series():
    """30 epochs: a drop at 5 and recovery at 6, best 0.20 at 10, overfitting 11-24 (train loss
    falls, val acc sinks), NaN loss from 25 with val acc frozen at 0.074."""
    series = {}
    for e in range(1, 31):
        lr = 1e-3 * 0.5 * (1 + math.cos(math.pi * (e - 1) / 30))
        if e <= 10:
            acc = {5: 0.05}.get(e, 0.02 * e)
            row = dict(val_acc=acc, train_loss=2.0 - 0.05 * e, val_loss=2.0 - 0.04 * e)
        elif e <= 24:
            row = dict(val_acc=0.19 - 0.005 * (e - 10), train_loss=1.5 - 0.05 * (e - 10),
                       val_loss=1.6 + 0.03 * (e - 10))
        else:
            row = dict(val_acc=0.074, train_loss=NAN, val_loss=NAN)
        row.update(lr=lr, train_acc=min(1.0, 0.05 * e), val_f1=row["val_acc"] / 2)
        series[e] = row
    return series


def test_analyse_finds_the_designed_events():
    r = analyse(designed_series(), patience=10)
    assert (r["best_epoch"], r["best_val_acc"]) == (10, pytest.approx(0.20))
    assert r["drops"] == [5] and r["recoveries"] == [6]
    assert r["overfitting_onset"] == 11 and r["overfitting_epochs"] == list(range(11, 25))
    assert r["nan_onset"] == 25 and r["nan_epochs"] == list(range(25, 31))
    assert r["frozen_runs"] == [(25, 30, 0.074)]
    assert r["early_stop_epoch"] == 20
    notes = r["notes"]
    assert notes[1] == ["initial"] and notes[5] == ["drop"] and notes[6] == ["recovery"]
    assert notes[10] == ["best"] and notes[11] == ["overfitting"]
    assert notes[25] == ["NaN loss", "frozen accuracy"]
    assert notes[3] == []


def test_best_ignores_epochs_with_nan_loss():
    series = {1: dict(val_acc=0.1, train_loss=1.0), 2: dict(val_acc=0.9, train_loss=NAN)}
    assert analyse(series)["best_epoch"] == 1


def test_short_plateaus_and_short_overfitting_are_not_reported():
    series = {e: dict(val_acc=0.3 if e <= 4 else 0.5 - 0.01 * e, train_loss=2.0 - 0.1 * e)
              for e in range(1, 9)}
    r = analyse(series, patience=5, frozen_run=5)
    assert r["frozen_runs"] == []       # four equal epochs only
    assert r["overfitting_onset"] is None  # three epochs after the best (5)
    assert r["early_stop_epoch"] is None


def test_analyse_of_an_empty_series():
    r = analyse({})
    assert r["best_epoch"] is None and r["epochs"] == 0


def write_run(folder, series, accuracy_scale=1.0):
    """Checkpoint files the way a training loop writes them: one per epoch, best, latest."""
    torch.manual_seed(0)
    model = CNNLSTM(**TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=len(series))
    model(torch.randn(1, 2, 3, 16, 16)).sum().backward()
    optimizer.step()
    history = {k: [] for k in ("train_loss", "train_acc", "val_loss", "val_acc", "val_f1", "lr")}
    best = None
    for epoch, row in series.items():
        row = dict(row, val_acc=row["val_acc"] * accuracy_scale,
                   train_acc=row["train_acc"] * accuracy_scale)
        for k in history:
            history[k].append(row[k])
        if math.isfinite(row["train_loss"]) and (best is None or
                                                 row["val_acc"] > best["best_val_acc"]):
            best = dict(best_val_acc=row["val_acc"], best_val_f1=row["val_f1"], best_epoch=epoch)
            is_best = True
        else:
            is_best = False
        kwargs = dict(model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch,
                      history=history, metrics=row, best=best,
                      config={"model": model.config, "epochs": len(series), "batch_size": 8})
        if epoch == 12:  # written without its optimizer state
            kwargs["optimizer"] = None
        save_checkpoint(folder / ("checkpoint_epoch_%04d.pth" % epoch), **kwargs)
        if epoch == max(series):
            save_checkpoint(folder / "latest_checkpoint.pth", **kwargs)
        if is_best:
            save_checkpoint(folder / "best_checkpoint.pth", **kwargs)
    path = folder / "checkpoint_epoch_0007.pth"
    if path.exists():
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) * 3 // 4)
    return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_thread):
    folder = tmp_path_factory.mktemp("run") / "checkpoints"
    write_run(folder, designed_series())
    return folder


@pytest.fixture(scope="module")
def summary(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("summary")
    return summarize(run_dir, out, patience=10)


def table_notes(markdown):
    """{file name: notes cell} from the checkpoint table."""
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[0].endswith(".pth"):
            rows[cells[0]] = cells
    return rows


def test_table_has_every_file_with_its_notes(summary):
    rows = table_notes(summary.read_text())
    assert len(rows) == 32  # 30 epochs + best + latest
    notes = {name: cells[8] for name, cells in rows.items()}
    assert notes["checkpoint_epoch_0001.pth"] == "initial"
    assert notes["checkpoint_epoch_0005.pth"] == "drop"
    assert notes["checkpoint_epoch_0006.pth"] == "recovery"
    assert notes["checkpoint_epoch_0010.pth"] == "best"
    assert notes["checkpoint_epoch_0011.pth"] == "overfitting"
    assert notes["checkpoint_epoch_0025.pth"] == "NaN loss, frozen accuracy"
    assert "unreadable" in notes["checkpoint_epoch_0007.pth"]
    assert "truncated" in notes["checkpoint_epoch_0007.pth"]
    assert "no optimizer state" in notes["checkpoint_epoch_0012.pth"]
    assert "size" in notes["checkpoint_epoch_0012.pth"]
    assert notes["best_checkpoint.pth"].startswith("best")
    # Values: epoch 10 row (accuracies stored as fractions are shown in percent).
    epoch10 = rows["checkpoint_epoch_0010.pth"]
    assert epoch10[1:5] == ["10", "20.00", "20.00", "1.5000"]
    assert rows["checkpoint_epoch_0026.pth"][4] == "NaN"


def test_sections_name_the_best_checkpoint_and_the_fixes(summary):
    md = summary.read_text()
    for section in ("## Architecture and parameters", "## Training configuration",
                    "## Checkpoints", "## Best checkpoint", "## File sizes",
                    "## Recommendations", "## Plots"):
        assert section in md
    best = md.split("## Best checkpoint")[1].split("##")[0]
    assert "Epoch **10**" in best and "`best_checkpoint.pth`" in best
    recs = md.split("## Recommendations")[1].split("## Plots")[0]
    assert "ended at epoch 20" in recs
    assert "NaN loss from epoch 25" in recs and "`checkpoint_epoch_0024.pth`" in recs
    assert "Overfitting from epoch 11" in recs
    assert "`checkpoint_epoch_0007.pth`" in recs and "`checkpoint_epoch_0012.pth`" in recs
    sizes = md.split("## File sizes")[1].split("##")[0]
    assert "`checkpoint_epoch_0007.pth`" in sizes and "`checkpoint_epoch_0012.pth`" in sizes
    assert "`checkpoint_epoch_0008.pth`" not in sizes
    arch = md.split("## Architecture and parameters")[1].split("##")[0]
    total = sum(p.numel() for p in CNNLSTM(**TINY).parameters())
    assert "**%s**" % format(total, ",") in arch and "tiny" in arch
    config = md.split("## Training configuration")[1].split("##")[0]
    assert "| batch_size | 8 |" in config and "CosineAnnealingLR" in config


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plots_are_written(summary):
    for name in ("loss.png", "accuracy.png", "lr.png"):
        width, height = png_size(summary.parent / name)
        assert width >= 400 and height >= 200
        assert "(%s)" % name in summary.read_text()


def test_json_findings(summary):
    found = json.loads((summary.parent / "summary.json").read_text())
    assert found["best_epoch"] == 10 and found["nan_onset"] == 25
    assert found["overfitting_onset"] == 11 and found["early_stop_epoch"] == 20
    assert len(found["files"]) == 32


def test_accuracies_stored_in_percent_are_shown_as_they_are(tmp_path):
    series = {e: dict(val_acc=[5.0, 11.2, 9.0][e - 1], train_loss=1.0 / e, val_loss=1.0,
                      lr=1e-3, train_acc=10.0 * e, val_f1=0.1) for e in (1, 2, 3)}
    write_run(tmp_path / "c", series)
    rows = table_notes(summarize(tmp_path / "c", tmp_path / "out").read_text())
    assert rows["checkpoint_epoch_0002.pth"][3] == "11.20"


def test_files_are_read_memory_mapped_one_at_a_time(run_dir, tmp_path, monkeypatch):
    calls = []
    real = report.read_checkpoint

    def spy(path, **kwargs):
        calls.append((os.path.basename(str(path)), kwargs.get("mmap")))
        return real(path, **kwargs)
    monkeypatch.setattr(report, "read_checkpoint", spy)
    summarize(run_dir, tmp_path)
    assert len(calls) == 32 and len({name for name, _ in calls}) == 32
    assert all(mmap is True for _, mmap in calls)


def test_check_weights_adds_verify_findings(tmp_path):
    series = {e: dict(val_acc=0.1 * e, train_loss=1.0 / e, val_loss=1.0, lr=1e-3,
                      train_acc=0.1, val_f1=0.1) for e in (1, 2, 3)}
    model = write_run(tmp_path / "c", series)
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
    save_checkpoint(tmp_path / "c" / "checkpoint_epoch_0002.pth", model=model, epoch=2,
                    metrics=series[2])
    rows = table_notes(summarize(tmp_path / "c", tmp_path / "out", check_weights=True).read_text())
    assert "NaN/Inf in 1 of" in rows["checkpoint_epoch_0002.pth"][8]
    assert "NaN/Inf" not in rows["checkpoint_epoch_0003.pth"][8]


def test_summarize_cli(run_dir, tmp_path, capsys):
    assert cli(["summarize", str(run_dir), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "summary.md").exists()
    assert "wrote" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert cli(["summarize", str(tmp_path / "empty")]) == 1
    assert "no checkpoint files" in capsys.readouterr().err
    assert cli(["summarize", str(tmp_path / "nowhere")]) == 1
    assert cli(["summarize", str(run_dir), "--patience", "0"]) == 2


def test_default_output_folder_is_inside_the_checkpoint_folder(tmp_path):
    series = {1: dict(val_acc=0.1, train_loss=1.0, val_loss=1.0, lr=1e-3, train_acc=0.1,
                      val_f1=0.1)}
    write_run(tmp_path / "c", series)
    assert summarize(tmp_path / "c") == tmp_path / "c" / "summary" / "summary.md"
