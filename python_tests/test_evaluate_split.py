"""`cnnlstm-ext evaluate` on the data a run trained on: only the run's validation clips by default
(recorded in its checkpoints), --all for every clip, --clips K, unreadable videos left out."""
import csv
import json
import os
import shutil

import pytest
import torch

from cnnlstm_ext import CNNLSTM
from cnnlstm_ext.checkpoint import save_checkpoint
from cnnlstm_ext.cli import main
from cnnlstm_ext.data.datasets import build_datasets
from cnnlstm_ext.train import Config, Trainer
from video_runs import folder_config, make_class_videos, train_folder_run, write_clip

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, one_thread):
    """(data folder, best checkpoint) of a run on a class-per-folder set, a quarter held out."""
    base = tmp_path_factory.mktemp("held_out")
    data = base / "data"
    make_class_videos(data)
    ckpts = train_folder_run(base / "runs", data)
    return data, os.path.join(ckpts, "best_checkpoint.pth")


def _evaluate(capsys, *argv):
    rc = main(["evaluate", *map(str, argv), "--no-progress", "--num-workers", "0"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _scored(out_dir):
    with open(os.path.join(str(out_dir), "predictions.csv")) as f:
        return [row["clip"] for row in csv.DictReader(f)]


def _other_folder(path, seed):
    """Class folders of 2 new videos each, named as no clip of the run (u0.mp4, u1.mp4)."""
    make_class_videos(path, per_class=2, first_seed=seed)
    for video in sorted(path.glob("class*/v*.mp4")):
        video.rename(video.with_name("u" + video.name[1:]))
    return path


def _recorded(ckpt):
    split = torch.load(ckpt, weights_only=True)["trainer_state"]["val_split"]
    return split, [os.path.join(split["root"], p) for p in split["clips"]]


def test_the_checkpoint_records_the_validation_clips(held_out):
    data, ckpt = held_out
    split, paths = _recorded(ckpt)
    assert split["root"] == str(data) and len(paths) == 3  # one of each class's 4
    assert sorted(os.path.dirname(p) for p in paths) == [str(data / c) for c in
                                                         ("class0", "class1", "class2")]
    cfg = folder_config("unused", data)
    _, val, _ = build_datasets(cfg.data, seed=cfg.train.seed)
    assert sorted(paths) == sorted(r.path for r in val.records)


def test_evaluate_on_the_runs_data_scores_its_validation_clips_and_says_so(held_out, capsys,
                                                                          tmp_path):
    data, ckpt = held_out
    rc, out, _ = _evaluate(capsys, ckpt, data, "--out", tmp_path / "val")
    assert rc == 0
    assert out.splitlines()[0].startswith("scoring the run's 3 validation clips (recorded in "
                                          "the checkpoint) of the 12 clips")
    assert "--all scores every clip" in out.splitlines()[0]
    assert sorted(_scored(tmp_path / "val")) == sorted(_recorded(ckpt)[1])
    metrics = json.loads((tmp_path / "val" / "metrics.json").read_text())
    assert metrics["count"] == 3
    best = torch.load(ckpt, weights_only=True)
    assert metrics["acc"] == pytest.approx(best["val_acc"])  # what training measured


def test_evaluate_all_scores_every_clip(held_out, capsys, tmp_path):
    data, ckpt = held_out
    rc, out, _ = _evaluate(capsys, ckpt, data, "--all", "--out", tmp_path / "all")
    assert rc == 0 and "scoring all 12 clips" in out and "training clips included" in out
    assert len(_scored(tmp_path / "all")) == 12


def test_the_default_output_folder_says_which_clips(held_out, capsys):
    data, ckpt = held_out
    run_dir = os.path.dirname(os.path.dirname(ckpt))
    assert _evaluate(capsys, ckpt, data)[0] == 0
    assert len(_scored(os.path.join(run_dir, "evaluation", "data-val"))) == 3


def test_the_recorded_split_holds_when_the_folder_changes(held_out, capsys, tmp_path):
    data, ckpt = held_out
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    for i in range(4, 8):  # new clips, which would move a split drawn again
        write_clip(copy / "class1" / ("w%d.mp4" % i), 1, 8, seed=50 + i)
    # a copy elsewhere is the run's data too: it holds every recorded clip
    rc, out, _ = _evaluate(capsys, ckpt, copy, "--out", tmp_path / "val")
    assert rc == 0 and "3 validation clips (recorded in the checkpoint) of the 16 clips" in out
    expected = sorted(str(copy) + p[len(str(data)):] for p in _recorded(ckpt)[1])
    assert sorted(_scored(tmp_path / "val")) == expected
    os.remove(expected[0])
    # a copy without one recorded clip: the two it holds, not the whole folder
    rc, out, _ = _evaluate(capsys, ckpt, copy, "--out", tmp_path / "val2")
    assert rc == 0 and out.startswith("scoring the run's 2 validation clips (recorded in the "
                                      "checkpoint) of the 15 clips")
    assert "; 1 recorded clips are not there" in out.splitlines()[0]
    assert sorted(_scored(tmp_path / "val2")) == expected[1:]
    for path in expected[1:]:
        os.remove(path)
    # none of them: the whole folder, and the first line says so
    rc, out, _ = _evaluate(capsys, ckpt, copy, "--out", tmp_path / "val3")
    assert rc == 0 and out.splitlines()[0] == (
        "scoring every clip of %s: it holds none of the run's 3 recorded validation clips" % copy)
    assert len(_scored(tmp_path / "val3")) == 13


def test_recorded_sizes_must_match_when_the_checkpoint_has_them(held_out, capsys, tmp_path):
    data, ckpt = held_out
    state = torch.load(ckpt, weights_only=True)
    state.pop("integrity")
    split = state["trainer_state"]["val_split"]
    split["sizes"] = [os.path.getsize(os.path.join(split["root"], p)) for p in split["clips"]]
    sized = tmp_path / "sized.pth"
    torch.save(state, sized)
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    rc, out, _ = _evaluate(capsys, sized, copy, "--out", tmp_path / "a")
    assert rc == 0 and out.startswith("scoring the run's 3 validation clips")
    first = copy / split["clips"][0]
    write_clip(first, 0, 5, seed=999)  # another video under a recorded name
    assert os.path.getsize(first) != split["sizes"][0]
    rc, out, _ = _evaluate(capsys, sized, copy, "--out", tmp_path / "b")
    assert rc == 0 and out.startswith("scoring the run's 2 validation clips")
    assert "1 recorded clips are not there" in out and str(first) not in _scored(tmp_path / "b")


def test_a_checkpoint_without_a_record_holds_the_split_out_again(held_out, capsys, tmp_path):
    data, ckpt = held_out
    state = torch.load(ckpt, weights_only=True)
    state.pop("integrity")
    del state["trainer_state"]["val_split"]
    old = tmp_path / "old.pth"
    torch.save(state, old)
    rc, out, _ = _evaluate(capsys, old, data, "--out", tmp_path / "val")
    assert rc == 0 and "held out again with data.val_fraction=0.25 and train.seed=0" in out
    assert sorted(_scored(tmp_path / "val")) == sorted(_recorded(ckpt)[1])


def test_split_folders_score_the_val_split(tmp_path, capsys):
    data = tmp_path / "data"
    make_class_videos(data / "train", per_class=2)
    make_class_videos(data / "val", per_class=1, first_seed=100)
    ckpt = os.path.join(train_folder_run(tmp_path / "runs", data, epochs=1),
                        "latest_checkpoint.pth")
    rc, out, _ = _evaluate(capsys, ckpt, data, "--out", tmp_path / "val")
    assert rc == 0 and "3 validation clips (its 'val' split) of the 9 clips" in out
    assert all("/val/" in p for p in _scored(tmp_path / "val"))
    rc, out, _ = _evaluate(capsys, ckpt, data, "--all", "--out", tmp_path / "all")
    assert rc == 0 and len(_scored(tmp_path / "all")) == 9


def test_another_folder_is_scored_whole_saying_so(held_out, capsys, tmp_path):
    _, ckpt = held_out
    other = _other_folder(tmp_path / "other", 200)
    rc, out, _ = _evaluate(capsys, ckpt, other, "--out", tmp_path / "o")
    assert rc == 0 and out.startswith("scoring every clip of %s: it holds none" % other)
    assert len(_scored(tmp_path / "o")) == 6


def test_evaluate_clips_k_averages_as_predict_does(held_out, capsys, tmp_path):
    data, ckpt = held_out
    rc, out, _ = _evaluate(capsys, ckpt, data, "--all", "--clips", 3, "--out", tmp_path / "k")
    assert rc == 0 and "12 clips, 3 per video" in out
    with open(tmp_path / "k" / "predictions.csv") as f:
        rows = {r["clip"]: r for r in csv.DictReader(f)}
    assert main(["predict", ckpt, str(data), "--clips", "3", "--json", "--top", "1",
                 "--num-workers", "0", "--no-progress"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    assert len(predicted) == 12
    for p in predicted:
        row = rows[p["path"]]
        assert row["prediction_name"] == p["predictions"][0]["class"]
        assert float(row["confidence"]) == pytest.approx(p["predictions"][0]["probability"],
                                                         abs=1e-5)
    metrics = json.loads((tmp_path / "k" / "metrics.json").read_text())
    assert metrics["clips_per_video"] == 3 and metrics["count"] == 12


def test_an_unreadable_video_is_left_out_and_named(held_out, capsys, tmp_path):
    _, ckpt = held_out
    other = _other_folder(tmp_path / "other", 300)
    (other / "class2" / "zz.mp4").write_bytes(b"not a video at all")
    rc, out, err = _evaluate(capsys, ckpt, other, "--out", tmp_path / "o")
    assert rc == 1 and "1 unreadable video left out" in out
    assert err.count("error:") == 1 and "zz.mp4" in err and "Traceback" not in err
    assert len(_scored(tmp_path / "o")) == 6
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["count"] == 6 and [u["clip"] for u in metrics["unreadable"]] == [
        str(other / "class2" / "zz.mp4")]
    entry = metrics["unreadable"][0]
    assert (entry["frame_start"], entry["frame_end"]) == (1, -1) and "zz.mp4" in entry["error"]


@pytest.mark.parametrize("argv,message", [
    (["--all"], "--all: the synthetic training clips are drawn afresh every epoch"),
    (["--clips", "2"], "--clips 2: synthetic clips are generated at data.num_frames"),
    (["--clips", "0"], "--clips must be >= 1, got 0"),
])
def test_evaluate_refuses_what_cannot_be_done_in_one_line(tmp_path, capsys, argv, message):
    cfg = Config()
    cfg.model["num_classes"] = 3
    save_checkpoint(tmp_path / "c.pth", model=CNNLSTM(**cfg.model), epoch=1, config=cfg.to_dict())
    rc, out, err = _evaluate(capsys, tmp_path / "c.pth", "synthetic", *argv)
    assert rc == 2 and err.startswith("error: " + message) and err.count("\n") == 1


def _wlasl_run(tmp_path, splits, seed):
    """A one-epoch run on a WLASL JSON file of 3 glosses with one video per entry of `splits`;
    returns (annotations, videos folder, latest checkpoint)."""
    videos = tmp_path / "videos"
    videos.mkdir()
    entries = []
    for c, gloss in enumerate(["book", "drink", "go"]):
        instances = []
        for i, split in enumerate(splits):
            video_id = "%05d" % (10 * c + i)
            write_clip(videos / (video_id + ".mp4"), c, 8 + i, seed=seed + 10 * c + i)
            instances.append({"video_id": video_id, "split": split, "frame_start": 1,
                              "frame_end": -1})
        entries.append({"gloss": gloss, "instances": instances})
    annotations = tmp_path / "WLASL.json"
    annotations.write_text(json.dumps(entries))
    cfg = folder_config(tmp_path / "runs", videos, epochs=1)
    cfg.data.dataset, cfg.data.annotations = "wlasl", str(annotations)
    Trainer(cfg).fit()
    return annotations, videos, tmp_path / "runs" / "run" / "checkpoints" / "latest_checkpoint.pth"


def test_a_wlasl_run_scores_its_val_split_from_the_json_or_the_video_folder(tmp_path, capsys):
    annotations, videos, ckpt = _wlasl_run(tmp_path, ["train", "train", "val"], seed=400)
    for data in (annotations, videos):
        rc, out, _ = _evaluate(capsys, ckpt, data, "--out", tmp_path / "val")
        assert rc == 0 and "3 validation clips (its 'val' split) of the 9 clips" in out
        assert sorted(os.path.basename(p) for p in _scored(tmp_path / "val")) == [
            "00002.mp4", "00012.mp4", "00022.mp4"]
    rc, out, _ = _evaluate(capsys, ckpt, annotations, "--all", "--out", tmp_path / "all")
    assert rc == 0 and len(_scored(tmp_path / "all")) == 9
    rc, out, _ = _evaluate(capsys, ckpt, annotations, "--split", "train", "--out", tmp_path / "t")
    assert rc == 0 and not out.startswith("scoring") and len(_scored(tmp_path / "t")) == 6


def test_no_readable_video_is_an_error_and_writes_nothing(held_out, capsys, tmp_path):
    _, ckpt = held_out
    other = tmp_path / "other"
    for c in range(3):
        (other / ("class%d" % c)).mkdir(parents=True)
        (other / ("class%d" % c) / "x.mp4").write_bytes(b"not a video")
    rc, out, err = _evaluate(capsys, ckpt, other, "--out", tmp_path / "o")
    assert rc == 2 and "accuracy" not in out and "Traceback" not in err
    assert err.splitlines()[-1].startswith("error: no video could be read (3 unreadable")
    assert err.count("error:") == 4 and not (tmp_path / "o" / "metrics.json").exists()
    assert not (tmp_path / "o" / "predictions.csv").exists()


def test_a_runtime_error_of_the_model_is_one_line(held_out, capsys, tmp_path, monkeypatch):
    data, ckpt = held_out
    from cnnlstm_ext.models import CNNLSTM

    def worker_died(self, *a, **k):
        raise RuntimeError("DataLoader worker (pid 123) is killed by signal: Killed.")
    monkeypatch.setattr(CNNLSTM, "forward", worker_died)
    rc, out, err = _evaluate(capsys, ckpt, data, "--out", tmp_path / "o")
    assert rc == 1 and "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("error: evaluation failed: DataLoader worker (pid 123) is killed")
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_outputs_are_replaced_whole(held_out, capsys, tmp_path, monkeypatch):
    data, ckpt = held_out
    out_dir = tmp_path / "o"
    assert _evaluate(capsys, ckpt, data, "--out", out_dir)[0] == 0
    before = {n: (out_dir / n).read_bytes() for n in ("predictions.csv", "metrics.json")}
    import builtins
    real_open = builtins.open

    def failing_open(file, mode="r", *a, **k):  # a disk that fills while writing in place
        if "w" in mode and os.path.basename(str(file)) in before:
            f = real_open(file, mode, *a, **k)
            f.write("partial" if "b" not in mode else b"partial")
            f.close()
            raise OSError(28, "No space left on device")
        return real_open(file, mode, *a, **k)
    monkeypatch.setattr(builtins, "open", failing_open)
    rc, _, err = _evaluate(capsys, ckpt, data, "--all", "--out", out_dir)
    monkeypatch.undo()
    assert rc != 0 and "No space left" in err
    for name, content in before.items():
        assert (out_dir / name).read_bytes() == content
    assert not [n for n in os.listdir(out_dir) if n.startswith(".")]


def test_nan_weights_exit_2_as_predict_does(held_out, capsys, tmp_path):
    data, ckpt = held_out
    state = torch.load(ckpt, weights_only=True)
    state.pop("integrity")
    state["model_state_dict"]["classifier.weight"].fill_(float("nan"))
    torch.save(state, tmp_path / "nan.pth")
    for command in ("evaluate", "predict"):
        rc = main([command, str(tmp_path / "nan.pth"), str(data), "--no-progress",
                   "--num-workers", "0"] + (["--out", str(tmp_path / "o")]
                                            if command == "evaluate" else []))
        err = capsys.readouterr().err
        assert rc == 2 and "NaN/Inf" in err and err.count("\n") == 1


def test_all_scores_the_test_split_folder_too(tmp_path, capsys):
    data = tmp_path / "data"
    make_class_videos(data / "train", per_class=2)
    make_class_videos(data / "val", per_class=1, first_seed=100)
    make_class_videos(data / "test", per_class=1, first_seed=200)
    ckpt = os.path.join(train_folder_run(tmp_path / "runs", data, epochs=1),
                        "latest_checkpoint.pth")
    rc, out, _ = _evaluate(capsys, ckpt, data, "--all", "--out", tmp_path / "all")
    assert rc == 0 and "scoring all 12 clips" in out and "train, val, test" in out
    scored = _scored(tmp_path / "all")
    assert len(scored) == 12 and sum("/test/" in p for p in scored) == 3


def test_all_scores_every_split_of_a_wlasl_file(tmp_path, capsys):
    annotations, _, ckpt = _wlasl_run(tmp_path, ["train", "train", "val", "test"], seed=500)
    rc, out, _ = _evaluate(capsys, ckpt, annotations, "--all", "--out", tmp_path / "all")
    assert rc == 0 and "scoring all 12 clips" in out and "test, train, val" in out
    assert sorted(os.path.basename(p) for p in _scored(tmp_path / "all")) == sorted(
        "%05d.mp4" % (10 * c + i) for c in range(3) for i in range(4))


@pytest.mark.parametrize("workers", [0, 1])
def test_skipped_clip_is_named_in_train_log(tmp_path, workers):
    """The warning that names an unreadable video reaches the run's train.log (from a loader
    worker too), beside the epoch's count of skipped clips."""
    videos = tmp_path / "videos"
    make_class_videos(videos, per_class=3)
    (videos / "class0" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    cfg = folder_config(tmp_path / "runs", videos, epochs=1, num_workers=workers)
    Trainer(cfg).fit()
    log = (tmp_path / "runs" / "run" / "train.log").read_text()
    assert "skipping unreadable clip" in log and "broken.mp4" in log
    assert "1 unreadable clip(s) skipped" in log


def test_instances_cut_out_of_one_video_are_told_apart_by_their_frames(tmp_path, capsys):
    """WLASL cuts several instances out of one video: predictions.csv names each row's frames as
    the JSON numbers them (1-based, inclusive; -1 to the end), so rows that share a path differ."""
    annotations, _, ckpt = _wlasl_run(tmp_path, ["train", "val"], seed=600)
    entries = json.loads(annotations.read_text())
    entries[0]["instances"].append({"video_id": "00000", "split": "test", "frame_start": 2,
                                    "frame_end": 5})
    annotations.write_text(json.dumps(entries))
    rc, out, _ = _evaluate(capsys, ckpt, annotations, "--all", "--out", tmp_path / "all")
    assert rc == 0 and "7 clips" in out
    with open(tmp_path / "all" / "predictions.csv") as f:
        rows = [r for r in csv.DictReader(f) if os.path.basename(r["clip"]) == "00000.mp4"]
    assert sorted((r["frame_start"], r["frame_end"]) for r in rows) == [("1", "-1"), ("2", "5")]


def test_unreadable_instances_of_one_video_are_told_apart(tmp_path, capsys):
    """Two instances cut out of one damaged video: stderr and metrics.json name each with its
    frames (WLASL's numbering) and the annotation that lists it, not just the shared path."""
    annotations, videos, ckpt = _wlasl_run(tmp_path, ["train", "val"], seed=700)
    entries = json.loads(annotations.read_text())
    entries[0]["instances"].append({"video_id": "00000", "split": "test", "frame_start": 2,
                                    "frame_end": 5})
    annotations.write_text(json.dumps(entries))
    (videos / "00000.mp4").write_bytes(b"not a video at all")
    rc, out, err = _evaluate(capsys, ckpt, annotations, "--all", "--out", tmp_path / "all")
    assert rc == 1 and "2 unreadable videos left out" in out and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 2 and all("00000.mp4" in line and "gloss 'book'" in line
                                   for line in lines)
    assert sum("(frames 2 to 5)" in line for line in lines) == 1, lines
    metrics = json.loads((tmp_path / "all" / "metrics.json").read_text())
    unreadable = sorted(metrics["unreadable"], key=lambda u: u["frame_start"])
    assert [(os.path.basename(u["clip"]), u["frame_start"], u["frame_end"]) for u in unreadable] \
        == [("00000.mp4", 1, -1), ("00000.mp4", 2, 5)]
    assert all(u["error"] for u in unreadable) and metrics["count"] == 5
