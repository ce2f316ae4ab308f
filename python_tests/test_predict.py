"""`cnnlstm-ext predict` and the multi-clip reading behind it: a run trained on tiny videos,
predicted on files, folders, frame folders and globs with a corrupt file among them."""
import csv
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from cnnlstm_ext import load_model
from cnnlstm_ext.cli import main
from cnnlstm_ext.data import ClipTransform, read_video_frames, sample_indices, write_frame_folder
from cnnlstm_ext.inference import VideoClips, clip_indices, find_videos, predict_videos
from cnnlstm_ext.train import Config
from conftest import subprocess_env
from video_runs import make_class_videos, train_folder_run, write_clip

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    """(best checkpoint, data folder, new videos folder with one corrupt file)."""
    base = tmp_path_factory.mktemp("predict")
    data = base / "data"
    make_class_videos(data)
    ckpt = os.path.join(train_folder_run(base / "runs", data), "best_checkpoint.pth")
    new = base / "new"
    new.mkdir()
    write_clip(new / "a.mp4", 0, 9, seed=100)
    write_clip(new / "b.mp4", 2, 14, seed=101)
    with open(data / "class1" / "v2.mp4", "rb") as f:
        (new / "broken.mp4").write_bytes(f.read(1500))  # the first 1.5 kB of a video
    frames = read_video_frames(str(data / "class1" / "v3.mp4"))
    write_frame_folder(str(new / "frames_c"), frames)
    return ckpt, data, new


def _predict(capsys, *argv):
    rc = main(["predict", *map(str, argv), "--no-progress"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# --- clip sampling ----------------------------------------------------------------------------

def test_one_clip_is_the_centred_clip_evaluation_uses():
    for n, T in [(10, 4), (37, 16), (16, 16), (100, 7)]:
        assert clip_indices(n, T, 1)[0].tolist() == sample_indices(n, T).tolist()


@pytest.mark.parametrize("n,T,K", [(40, 4, 5), (37, 16, 2), (90, 12, 3), (20, 16, 4)])
def test_k_clips_take_one_frame_of_every_segment_each(n, T, K):
    idx = clip_indices(n, T, K)
    assert idx.shape == (K, T)
    seg = n / T
    for t in range(T):
        lo, hi = int(seg * t), int(seg * (t + 1) - 1e-9)
        assert ((idx[:, t] >= lo) & (idx[:, t] <= hi)).all(), (t, idx[:, t])
    assert (idx.diff(dim=1) > 0).all()  # each clip runs forward in time
    if seg >= K:  # room for K different frames per segment: the clips differ everywhere
        assert (idx.diff(dim=0) > 0).all()


def test_k_clips_spread_over_each_segment_symmetrically():
    idx = clip_indices(100, 10, 5)  # segments of 10 frames: offsets 1, 3, 5, 7, 9
    assert idx[:, 0].tolist() == [1, 3, 5, 7, 9] and idx[:, 9].tolist() == [91, 93, 95, 97, 99]


def test_a_short_video_is_one_clip_of_all_its_frames():
    assert clip_indices(3, 8, 5).tolist() == [[0, 1, 2]]
    with pytest.raises(ValueError, match="at least one frame"):
        clip_indices(0, 8, 1)
    with pytest.raises(ValueError, match="clips must be >= 1"):
        clip_indices(10, 8, 0)


def test_video_clips_read_the_frames_clip_indices_names(run):
    _, data, _ = run
    path = str(data / "class2" / "v3.mp4")  # 15 frames
    prep = dict(num_frames=4, frame_size=16, resize_to=None, mean=[0.5] * 3, std=[0.25] * 3)
    item = VideoClips([path], prep, clips=3, batch_augment=False)[0]  # full-size frames
    assert item["error"] is None and item["clips"].shape == (3, 4, 3, 16, 16)
    assert item["lengths"].tolist() == [4, 4, 4]
    frames = read_video_frames(path)
    transform = ClipTransform(size=16, train=False, mean=(0.5,) * 3, std=(0.25,) * 3)
    for k, idx in enumerate(clip_indices(frames.shape[0], 4, 3)):
        torch.testing.assert_close(item["clips"][k], transform(frames[idx]))


def test_video_clips_read_frames_turned_as_the_preprocessing_says(tmp_path):
    """preprocessing["orientation"] (a run's data.orientation): "stored" reads a portrait video
    as the file stores it, as a model trained on frames read that way saw it."""
    from test_data_pipeline import moving_frames, write_turned
    frames = moving_frames(8, h=48, w=64)
    write_turned(tmp_path / "plain.mp4", frames, 0, lossless=False)
    write_turned(tmp_path / "turned.mp4", frames, -90, lossless=False)
    prep = dict(num_frames=4, frame_size=16, resize_to=None, mean=[0.5] * 3, std=[0.25] * 3)
    for batch_augment in (True, False):
        def clips(name, **kw):
            return VideoClips([str(tmp_path / name)], dict(prep, **kw),
                              batch_augment=batch_augment)[0]["clips"]
        assert torch.equal(clips("turned.mp4", orientation="stored"), clips("plain.mp4"))
        assert torch.equal(clips("turned.mp4"), clips("turned.mp4", orientation="display"))
        assert not torch.equal(clips("turned.mp4"), clips("plain.mp4"))
    with pytest.raises(ValueError, match="orientation must be one of"):
        VideoClips([str(tmp_path / "plain.mp4")], dict(prep, orientation="sideways"))


def test_video_clips_pad_a_short_video_and_report_its_length(tmp_path):
    write_clip(tmp_path / "short.mp4", 1, 3, seed=5)
    prep = dict(num_frames=6, frame_size=16, resize_to=None, mean=[0.5] * 3, std=[0.25] * 3)
    item = VideoClips([str(tmp_path / "short.mp4")], prep, clips=4, batch_augment=False)[0]
    assert item["clips"].shape == (1, 6, 3, 16, 16) and item["lengths"].tolist() == [3]
    assert (item["clips"][0, 3:] == 0).all() and (item["clips"][0, :3] != 0).any()
    # as training pads the uint8 canvas before BatchAugment: black frames, normalised
    item = VideoClips([str(tmp_path / "short.mp4")], prep, clips=4, batch_augment=True)[0]
    assert item["clips"].shape == (1, 6, 3, 16, 16) and item["lengths"].tolist() == [3]
    assert (item["clips"][0, 3:] == -2).all() and (item["clips"][0, :3] != -2).any()


# --- finding videos ---------------------------------------------------------------------------

def test_find_videos_takes_files_folders_frame_folders_and_globs(run):
    _, data, new = run
    found = find_videos([str(new / "a.mp4"), str(data / "class0"), str(new / "frames_c"),
                         str(data / "*" / "v1.mp4"), str(new)])
    assert found[:8] == [str(new / "a.mp4")] + [str(data / "class0" / ("v%d.mp4" % i))
                                               for i in range(4)] + [
        str(new / "frames_c"), str(data / "class1" / "v1.mp4"), str(data / "class2" / "v1.mp4")]
    # the folder: its frame folder as one video, its files sorted; nothing twice
    assert found[8:] == [str(new / "b.mp4"), str(new / "broken.mp4")]


def test_find_videos_names_what_it_cannot_use(run, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder: .*nothing.mp4"):
        find_videos([str(tmp_path / "nothing.mp4")])
    with pytest.raises(FileNotFoundError, match="matches no video"):
        find_videos([str(tmp_path / "*.mp4")])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt is not a video file"):
        find_videos([str(tmp_path / "notes.txt")])


# --- predict ----------------------------------------------------------------------------------

def test_predict_json_gives_every_good_video_its_top_k_and_the_bad_one_its_error(run, capsys):
    ckpt, data, new = run
    rc, out, err = _predict(capsys, ckpt, new, data / "class0" / "v1.mp4", "--json", "--top", 2,
                            "--num-workers", 0)
    assert rc == 1  # one file could not be read
    results = {os.path.basename(r["path"]): r for r in json.loads(out)}
    assert sorted(results) == ["a.mp4", "b.mp4", "broken.mp4", "frames_c", "v1.mp4"]
    assert results["broken.mp4"]["predictions"] == [] and results["broken.mp4"]["error"]
    assert err.count("error:") == 1 and "broken.mp4" in err and "Traceback" not in err
    for name in ("a.mp4", "b.mp4", "frames_c", "v1.mp4"):
        r = results[name]
        assert r["error"] is None and r["clips"] == 1
        probs = [p["probability"] for p in r["predictions"]]
        assert len(probs) == 2 and probs[0] >= probs[1] > 0 and sum(probs) < 1
        assert {p["class"] for p in r["predictions"]} <= {"class0", "class1", "class2"}


@pytest.fixture(scope="module")
def plain_run(run, tmp_path_factory, one_thread):
    """The best checkpoint of a run on the same videos trained with data.batch_augment=false."""
    _, data, _ = run
    base = tmp_path_factory.mktemp("plain")
    runs = train_folder_run(base / "runs", data, run="plain", epochs=1, batch_augment=False)
    return os.path.join(runs, "best_checkpoint.pth")


def _validation_logits(ckpt, out_dir):
    """{clip path: logits [C]} of the run's validation clips through the trainer's own
    validation pipeline (its val loader and the preparation of its batches)."""
    from cnnlstm_ext.train import Trainer
    from cnnlstm_ext.train.trainer import _unpack, forward_lengths

    cfg = Config.from_dict(torch.load(ckpt, weights_only=True)["config"])
    cfg.train.output_dir, cfg.train.run_name = str(out_dir), "again"
    trainer = Trainer(cfg, resuming=True)
    trainer.model.load_state_dict(load_model(ckpt).state_dict())
    trainer.model.eval()
    logits = {}
    with torch.no_grad():
        for batch in trainer.val_loader:
            clips, _, lengths, _ = _unpack(batch, trainer.device, trainer._prepare.get("val"))
            out = trainer._eval_net(clips, forward_lengths(lengths, clips.shape[1]))
            for i, row in zip(batch.indices.tolist(), out):
                logits[trainer.val_set.records[i].path] = row
    return cfg, logits


@pytest.mark.parametrize("which", ["batch_augment", "plain"])
def test_predict_and_evaluate_prepare_clips_as_the_runs_validation(run, plain_run, capsys,
                                                                   tmp_path, which):
    ckpt, data, _ = run
    if which == "plain":
        ckpt = plain_run
    cfg, expected = _validation_logits(ckpt, tmp_path / "trainer")
    assert cfg.data.batch_augment == (which == "batch_augment") and len(expected) >= 3
    paths = sorted(expected)
    model = load_model(ckpt)
    assert model.batch_augment == cfg.data.batch_augment
    # the clips predict and evaluate feed the model: the validation's logits
    dataset = VideoClips(paths, model.preprocessing, batch_augment=model.batch_augment)
    for i, path in enumerate(paths):
        item = dataset[i]
        with torch.no_grad():
            got = model(item["clips"], item["lengths"])[0]
        torch.testing.assert_close(got, expected[path], atol=1e-5, rtol=0)
    # the logits up to their log-sum-exp: what predict's and evaluate's probabilities keep
    logp = {p: expected[p].log_softmax(0) for p in paths}
    # predict: every class's probability
    rc, out, _ = _predict(capsys, ckpt, *paths, "--json", "--top", 3, "--num-workers", 0)
    assert rc == 0
    results = json.loads(out)
    assert sorted(r["path"] for r in results) == paths
    for r in results:
        got = {x["class"]: x["probability"] for x in r["predictions"]}
        assert sorted(got) == sorted(model.classes)
        for c, name in enumerate(model.classes):
            assert math.log(got[name]) == pytest.approx(float(logp[r["path"]][c]), abs=1e-5)
    # evaluate on the run's data: its validation clips, the same probabilities
    rc = main(["evaluate", ckpt, str(data), "--out", str(tmp_path / "eval"), "--no-progress",
               "--num-workers", "0"])
    capsys.readouterr()
    assert rc == 0
    with open(tmp_path / "eval" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["clip"] for r in rows) == paths
    for r in rows:  # the confidence is written with 6 decimals (>= 1/3 here: 2e-6 in its log)
        best = logp[r["clip"]].max(0)
        assert int(r["prediction"]) == int(best.indices)
        assert math.log(float(r["confidence"])) == pytest.approx(float(best.values), abs=1e-5)


def test_the_two_preparations_differ_on_these_videos(run):
    """The videos are small enough that decoding at the canvas size changes the input: the
    test above tells the two ways apart."""
    _, data, _ = run
    path = str(data / "class2" / "v3.mp4")
    prep = load_model(run[0]).preprocessing
    a = VideoClips([path], prep, batch_augment=True)[0]["clips"]
    b = VideoClips([path], prep, batch_augment=False)[0]["clips"]
    assert a.shape == b.shape and (a - b).abs().max() > 1e-3


def test_predict_clips_average_the_probabilities_of_k_clips(run, capsys):
    ckpt, data, _ = run
    path = data / "class1" / "v3.mp4"  # 15 frames: 3 clips of 4 differ
    rc, out, _ = _predict(capsys, ckpt, path, "--json", "--clips", 3, "--top", 3,
                          "--num-workers", 0)
    assert rc == 0
    (r,) = json.loads(out)
    assert r["clips"] == 3
    model = load_model(ckpt)
    clips = VideoClips([str(path)], model.preprocessing, clips=3)[0]["clips"]
    with torch.no_grad():
        each = model(clips).softmax(1)                              # [3, C]
    assert not torch.allclose(each[0], each[1])  # the clips do differ
    got = {x["class"]: x["probability"] for x in r["predictions"]}
    for c, name in enumerate(model.classes):
        assert got[name] == pytest.approx(float(each[:, c].mean()), abs=1e-5)


def test_predict_with_workers_and_batches_equals_one_process(run, capsys, tmp_path):
    ckpt, data, new = run
    args = [ckpt, data, new, "--json", "--clips", 2]
    _, one, _ = _predict(capsys, *args, "--num-workers", 0, "--batch-size", 1)
    # Decoding workers are forked processes: run them from a fresh process, as the command
    # runs (this one has decoded videos already, and a decoder's threads do not survive a fork).
    done = subprocess.run([sys.executable, "-m", "cnnlstm_ext", "predict", *map(str, args),
                           "--num-workers", "2", "--batch-size", "5", "--no-progress"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=subprocess_env())
    assert done.returncode == 1 and done.stderr.count("error:") == 1
    one, many = json.loads(one), json.loads(done.stdout)
    assert [r["path"] for r in one] == [r["path"] for r in many] and len(one) == 16
    for a, b in zip(one, many):
        assert a["error"] == b["error"] and a["clips"] == b["clips"]
        for x, y in zip(a["predictions"], b["predictions"]):
            assert x["class"] == y["class"] and x["probability"] == pytest.approx(
                y["probability"], abs=1e-6)


def test_predict_csv_and_table(run, capsys):
    ckpt, _, new = run
    rc, out, _ = _predict(capsys, ckpt, new, "--csv", "--top", 2, "--num-workers", 0)
    assert rc == 1
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["path", "clips", "top1", "p1", "top2", "p2", "error"]
    by_name = {os.path.basename(r[0]): r for r in rows[1:]}
    assert by_name["broken.mp4"][2:6] == ["", "", "", ""] and by_name["broken.mp4"][6]
    assert by_name["a.mp4"][6] == "" and float(by_name["a.mp4"][3]) >= float(by_name["a.mp4"][5])
    rc, out, err = _predict(capsys, ckpt, new, "--top", 2, "--num-workers", 0)
    lines = out.splitlines()
    assert rc == 1 and len(lines) == 4
    broken = [line for line in lines if "broken.mp4" in line]
    assert len(broken) == 1 and "error:" in broken[0]
    assert all(line.count(" 0.") == 2 for line in lines if "broken" not in line)


def test_predict_shows_a_progress_bar(run, capsys):
    ckpt, _, new = run
    rc = main(["predict", ckpt, str(new / "a.mp4"), "--num-workers", "0"])
    assert rc == 0 and "predict" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--clips", "0"], "--clips must be >= 1"),
    (["--top", "0"], "--top must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--num-workers", "-1"], "--num-workers must be >= 0"),
])
def test_predict_refuses_bad_options_in_one_line(run, capsys, argv, message):
    ckpt, _, new = run
    rc, out, err = _predict(capsys, ckpt, new / "a.mp4", *argv)
    assert rc == 2 and out == "" and err.strip() == "error: " + message + ", got %s" % argv[1]


def test_predict_names_a_missing_input_or_checkpoint(run, capsys, tmp_path):
    ckpt, _, new = run
    rc, _, err = _predict(capsys, ckpt, tmp_path / "gone.mp4")
    assert rc == 2 and err.startswith("error: no such file or folder") and "gone.mp4" in err
    rc, _, err = _predict(capsys, tmp_path / "none.pth", new / "a.mp4")
    assert rc == 2 and err.count("\n") == 1 and "none.pth" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    rc, _, err = _predict(capsys, ckpt, tmp_path / "empty")
    assert rc == 2 and "no video files or frame folders" in err


def test_predict_names_a_torch_export_program_and_what_it_takes(run, capsys, tmp_path):
    class Double(torch.nn.Module):
        def forward(self, x):
            return 2 * x

    _, _, new = run
    program = torch.export.export(Double(), (torch.randn(2, 3),))
    torch.export.save(program, str(tmp_path / "model.pt2"))
    rc, out, err = _predict(capsys, tmp_path / "model.pt2", new / "a.mp4")
    assert rc == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: %s: a torch.export program (.pt2" % (tmp_path / "model.pt2"))
    assert "checkpoint (.pth)" in err and ".safetensors weights" in err
    assert "torch.export.load(path).module()" in err and "data.pkl" not in err


def test_predict_refuses_a_checkpoint_with_nan_weights(run, capsys, tmp_path):
    ckpt, _, new = run
    state = torch.load(ckpt, weights_only=True)
    state.pop("integrity")
    state["model_state_dict"]["classifier.weight"].fill_(float("nan"))
    torch.save(state, tmp_path / "nan.pth")
    rc, out, err = _predict(capsys, tmp_path / "nan.pth", new / "a.mp4")
    assert rc == 2 and out == "" and "NaN/Inf" in err and "classifier.weight" in err


def test_predict_videos_in_python_keeps_the_input_order(run):
    ckpt, data, new = run
    model = load_model(ckpt)
    videos = [str(new / "broken.mp4"), str(data / "class0" / "v0.mp4"), str(new / "frames_c")]
    results = predict_videos(model, videos, clips=2, topk=1)
    assert [r["path"] for r in results] == videos
    assert results[0]["error"] and results[0]["top"] == []
    assert [len(r["top"]) for r in results[1:]] == [1, 1]
    assert [r["clips"] for r in results] == [0, 2, 2]


def test_predict_help_explains_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["predict", "--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and "usage: cnnlstm-ext predict" in text
    for option in ("--clips", "--top", "--json", "--csv", "--num-workers", "--batch-size"):
        assert option in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "predict" in capsys.readouterr().out


# --- inputs that give no video, folders with images among videos, the same video twice -------

def _image_bytes(new):
    folder = new / "frames_c"
    return (folder / sorted(os.listdir(folder))[0]).read_bytes()


def test_a_folder_of_videos_with_an_image_is_searched_not_one_frame_video(run, tmp_path):
    _, _, new = run
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.mp4", "b.mp4", "sub/c.mp4"):
        (folder / name).write_bytes((new / "a.mp4").read_bytes())
    (folder / "cover.jpg").write_bytes(_image_bytes(new))
    expected = [str(folder / "a.mp4"), str(folder / "b.mp4"), str(folder / "sub" / "c.mp4")]
    assert find_videos([str(folder)]) == expected
    # images beside a subfolder with a video: searched too; images alone: one video
    only = tmp_path / "only"
    (only / "deep" / "er").mkdir(parents=True)
    (only / "x.jpg").write_bytes(_image_bytes(new))
    (only / "deep" / "er" / "d.mp4").write_bytes((new / "a.mp4").read_bytes())
    assert find_videos([str(only)]) == [str(only / "deep" / "er" / "d.mp4")]
    assert find_videos([str(new / "frames_c")]) == [str(new / "frames_c")]


def test_a_video_named_twice_is_predicted_once_and_an_empty_folder_is_named(run, tmp_path):
    _, _, new = run
    twice = [str(new / "a.mp4"), os.path.join(str(new), ".", "a.mp4"),
             os.path.join(str(new / "frames_c"), "..", "a.mp4")]
    assert find_videos(twice) == [str(new / "a.mp4")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty holds no video"):
        find_videos([str(new / "a.mp4"), str(tmp_path / "empty")])


def test_predict_reports_each_bad_input_and_predicts_the_others(run, capsys, tmp_path):
    ckpt, _, new = run
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    bad = [tmp_path / "gone.mp4", tmp_path / "*.mkv", tmp_path / "notes.txt", tmp_path / "empty"]
    argv = [ckpt, new / "a.mp4", *bad, new / "b.mp4", "--num-workers", 0]
    rc, out, err = _predict(capsys, *argv, "--json")
    assert rc == 1 and "Traceback" not in err
    rows = json.loads(out)
    assert [r["path"] for r in rows] == [str(new / "a.mp4")] + list(map(str, bad)) + [
        str(new / "b.mp4")]
    assert all(r["error"] is None and len(r["predictions"]) == 3 for r in (rows[0], rows[-1]))
    for r, text in zip(rows[1:5], ("no such file or folder", "matches no video",
                                   "is not a video file", "holds no video")):
        assert r["predictions"] == [] and r["clips"] == 0 and text in r["error"]
    lines = err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") for line in lines)
    rc, out, _ = _predict(capsys, *argv, "--csv")
    rows = list(csv.reader(io.StringIO(out)))[1:]
    assert rc == 1 and [bool(r[-1]) for r in rows] == [False, True, True, True, True, False]
    rc, out, _ = _predict(capsys, *argv)
    assert rc == 1 and sum("error:" in line for line in out.splitlines()) == 4


def test_a_runtime_error_of_the_model_is_one_line(run, capsys, monkeypatch):
    ckpt, _, new = run
    from cnnlstm_ext.models import CNNLSTM

    def out_of_memory(self, *a, **k):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2.00 GiB")
    monkeypatch.setattr(CNNLSTM, "forward", out_of_memory)
    rc, out, err = _predict(capsys, ckpt, new / "a.mp4", "--num-workers", 0)
    assert rc == 1 and out == "" and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("error: ") and "out of memory" in err


def test_a_batch_runs_at_most_batch_size_clips_per_call(run):
    ckpt, data, new = run
    model = load_model(ckpt)
    videos = [str(new / "a.mp4"), str(new / "b.mp4"), str(data / "class2" / "v3.mp4")]
    whole = predict_videos(model, videos, clips=3, batch_size=9)  # 9 clips: one call
    sizes = []
    forward = model.forward

    def counting(clips, lengths=None):
        sizes.append(clips.shape[0])
        return forward(clips, lengths)
    model.forward = counting
    chunked = predict_videos(model, videos, clips=3, batch_size=2)
    assert sizes and max(sizes) <= 2 and sum(sizes) == 9
    for a, b in zip(whole, chunked):
        assert a["clips"] == b["clips"] == 3
        for (c1, p1), (c2, p2) in zip(a["top"], b["top"]):
            assert c1 == c2 and p1 == pytest.approx(p2, abs=1e-5)
