"""Results that used to come out without a warning: evaluate and summarize of NaN weights, an
empty class folder, a single class, a guard summary counting the refused rollback, a folder of
different models, a loss that never left chance level."""
import logging
import math

import pytest
import torch

from cnnlstm_ext import CNNLSTM
from cnnlstm_ext.checkpoint import save_checkpoint
from cnnlstm_ext.cli import main
from cnnlstm_ext.data.video_folder import scan_class_folders
from cnnlstm_ext.report import analyse, summarize
from cnnlstm_ext.train.config import Config
from cnnlstm_ext.train.guards import NonFiniteGuard
from cnnlstm_ext.train.trainer import Trainer

MODEL = dict(num_classes=3, spatial_dim=16, temporal_dim=8, num_layers=1, backbone="tiny")
SERIES = {e: dict(val_acc=0.3 * e, train_loss=1.0 / e, val_loss=1.0, lr=1e-3, train_acc=0.3 * e,
                  val_f1=0.2) for e in (1, 2, 3)}


def write_files(folder, model_kwargs=MODEL, names=None, nan_in=(), series=SERIES):
    """checkpoint_epoch_000N.pth per epoch of `series` (and `names`: {file: epoch}); the files
    of `nan_in` get a NaN weight."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = CNNLSTM(**model_kwargs)
    files = {"checkpoint_epoch_%04d.pth" % e: e for e in series}
    files.update(names or {})
    for name, epoch in files.items():
        m = CNNLSTM(**model_kwargs)
        m.load_state_dict(model.state_dict())
        optimizer = torch.optim.AdamW(m.parameters(), lr=1e-3)
        m(torch.randn(1, 2, 3, 16, 16, generator=torch.Generator().manual_seed(0))).sum().backward()
        optimizer.step()
        if name in nan_in:
            with torch.no_grad():
                m.classifier.weight[0, 0] = float("nan")
        save_checkpoint(folder / name, model=m, optimizer=optimizer, epoch=epoch,
                        metrics=series[epoch], config={"model": dict(model_kwargs)})
    return folder


# --- evaluate / summarize of NaN weights ---------------------------------------------------------

def test_evaluate_refuses_a_checkpoint_with_nan_weights(tmp_path, capsys):
    cfg = Config()
    cfg.model.update(MODEL)
    cfg.data.num_classes, cfg.data.num_frames, cfg.data.frame_size = 3, 4, 16
    torch.manual_seed(0)
    model = CNNLSTM(**cfg.model)
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    save_checkpoint(path, model=model, epoch=1, config=cfg.to_dict())
    rc = main(["evaluate", str(path), "synthetic", "--out", str(tmp_path / "e"), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 2 and "accuracy" not in captured.out
    assert captured.err.splitlines() == [
        "error: %s holds NaN/Inf weights in 1 tensor (classifier.weight): nothing to evaluate; "
        "`cnnlstm-ext verify` finds the sound checkpoints of its run" % path]


def test_summarize_finds_nan_weights_in_the_best_file_without_check_weights(tmp_path, capsys):
    folder = write_files(tmp_path / "c", names={"best_checkpoint.pth": 3},
                         nan_in={"best_checkpoint.pth"})
    rc = main(["summarize", str(folder), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.splitlines() == ["warning: best_checkpoint.pth: NaN/Inf in 1 of %d model tensors: "
                                "classifier.weight" % len(CNNLSTM(**MODEL).state_dict())]
    recs = (tmp_path / "out" / "summary.md").read_text().split("## Recommendations")[1]
    assert "Nothing to fix" not in recs and "`best_checkpoint.pth` (NaN/Inf in 1 of" in recs


def test_summarize_of_a_sound_folder_says_which_weights_it_did_not_check(tmp_path, capsys):
    folder = write_files(tmp_path / "c", names={"best_checkpoint.pth": 3})
    assert main(["summarize", str(folder), "--out", str(tmp_path / "out")]) == 0
    recs = (tmp_path / "out" / "summary.md").read_text().split("## Recommendations")[1]
    assert "Nothing to fix: no NaN loss, no sustained overfitting, no damaged file; the weights of " \
           "3 files were not checked for NaN/Inf (--check-weights checks them)." in recs


# --- classes ---------------------------------------------------------------------------------------

def class_tree(root, clips):
    """root/<class>/<n>.mp4 (empty files: scanning does not decode)."""
    for name, n in clips.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / ("%d.mp4" % i)).write_bytes(b"")
    return root


def test_empty_class_folder_is_warned_about(tmp_path, caplog):
    root = class_tree(tmp_path / "v", {"a": 2, "b": 0, "c": 1})
    with caplog.at_level(logging.WARNING, logger="cnnlstm_ext.data"):
        records, classes = scan_class_folders(str(root))
    assert classes == ["a", "b", "c"] and len(records) == 3
    assert caplog.messages == ["%s: 1 class folder without clips: b" % root]


def test_class_folders_with_clips_are_not_warned_about(tmp_path, caplog):
    root = class_tree(tmp_path / "v", {"a": 2, "b": 1})
    with caplog.at_level(logging.WARNING, logger="cnnlstm_ext.data"):
        scan_class_folders(str(root))
    assert caplog.messages == []


def test_train_refuses_a_single_class_data_set(tmp_path, capsys):
    root = class_tree(tmp_path / "v", {"only": 4})
    rc = main(["train", "--data", str(root), "--output-dir", str(tmp_path / "out"), "-q",
               "--no-progress", "--set", "data.val_fraction=0.5"])
    err = capsys.readouterr().err
    assert rc == 2 and err.splitlines() == [
        "error: the data set has 1 class (only): a classifier needs at least 2 (with one, every "
        "prediction is right and nothing is learnt)"]


# --- guard counts ----------------------------------------------------------------------------------

def test_guard_does_not_count_the_refused_rollback():
    guard = NonFiniteGuard(max_bad_steps=1, max_rollbacks=3)
    assert [guard.on_rollback() for _ in range(4)] == [True, True, True, False]
    assert guard.rollbacks == 3


def test_guard_with_no_rollbacks_allowed_counts_none():
    guard = NonFiniteGuard(max_bad_steps=1, max_rollbacks=0)
    assert guard.on_rollback() is False and guard.rollbacks == 0


def test_a_diverged_run_reports_the_rollbacks_it_made(tmp_path):
    from test_train import NaNLogits, _model_with_hook, tiny_config
    cfg = tiny_config(tmp_path, epochs=4, max_bad_steps=2, max_rollbacks=1)
    hook = NaNLogits(range(4, 1000))  # every step from epoch 2 on
    result = Trainer(cfg, model=_model_with_hook(cfg, hook)).fit()
    assert (result["stop_reason"], result["rollbacks"]) == ("diverged", 1)


# --- summarize: different models, chance level -----------------------------------------------------

def test_summarize_names_the_file_of_a_different_model(tmp_path):
    folder = write_files(tmp_path / "c")
    other = dict(MODEL, temporal_dim=12)
    write_files(folder, other, series={4: SERIES[3]})
    md = summarize(folder, tmp_path / "out").read_text()
    notes = [line for line in md.splitlines() if line.startswith("| checkpoint_epoch_0004.pth")]
    assert "**different model: " in notes[0]
    assert ("**different model: 27,691 parameters against 26,451; shape of classifier.weight "
            "[3, 24] instead of [3, 16] and 8 more (the other files: `checkpoint_epoch_0001.pth`)**"
            in notes[0])
    for name in ("0001", "0002"):
        row = next(l for l in md.splitlines() if l.startswith("| checkpoint_epoch_%s.pth" % name))
        assert "different model" not in row
    recs = md.split("## Recommendations")[1]
    assert "**Files of different models in one folder**: `checkpoint_epoch_0004.pth`" in recs


def test_summarize_of_one_model_names_no_different_file(tmp_path):
    md = summarize(write_files(tmp_path / "c"), tmp_path / "out").read_text()
    assert "different model" not in md


def test_analyse_flags_a_loss_that_never_left_chance_level():
    chance = math.log(4)
    series = {e: dict(val_acc=0.25, train_loss=chance * (1.01 - 0.01 * e)) for e in (1, 2, 3)}
    r = analyse(series, num_classes=4)
    assert r["chance_loss"] == pytest.approx(chance) and r["chance_epochs"] == [1, 2, 3]
    assert r["notes"][2] == ["chance-level loss"]


def test_analyse_does_not_flag_a_loss_that_fell_below_chance():
    chance = math.log(4)
    series = {1: dict(val_acc=0.25, train_loss=chance), 2: dict(val_acc=0.5, train_loss=0.8 * chance)}
    r = analyse(series, num_classes=4)
    assert r["chance_loss"] is None and r["chance_epochs"] == []


def test_summarize_recommends_a_look_at_a_run_at_chance_level(tmp_path):
    series = {e: dict(SERIES[e], train_loss=math.log(3) + 0.01) for e in (1, 2, 3)}
    md = summarize(write_files(tmp_path / "c", series=series), tmp_path / "out").read_text()
    recs = md.split("## Recommendations")[1]
    assert "**Train loss at chance level** (ln 3 classes = 1.0986) in every epoch (1 to 3)" in recs
