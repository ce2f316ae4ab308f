"""The decoded-clip cache (`cnnlstm-ext cache`, data.cache) and the frozen-backbone feature cache
(model.freeze_backbone, data.feature_cache)."""
import json
import logging
import multiprocessing
import os

import pytest
import torch

from cnnlstm_ext import cli
from cnnlstm_ext.data.cache import CacheError, ClipCache, build_cache, entry_key
from cnnlstm_ext.data.loader import LoaderDataset, SkippedClip
from cnnlstm_ext.data.transforms import ClipTransform
from cnnlstm_ext.data.video_folder import VideoFolder
from cnnlstm_ext.data.video_io import ClipReadError
from cnnlstm_ext.models import CNNLSTM
from cnnlstm_ext.train.config import Config
from cnnlstm_ext.train.trainer import Trainer

from test_data_pipeline import moving_frames, write_class_tree, write_h264


@pytest.fixture
def videos(tmp_path):
    """root/{a,b}/: three 16-frame 48x64 clips per class."""
    return write_class_tree(tmp_path / "videos", 16)


def folder(root, cache=None, train=True):
    return VideoFolder(str(root), num_frames=6, transform=ClipTransform(size=16, train=train),
                       train=train, seed=4, batch_augment=True, cache=cache)


def test_cache_gives_the_clips_of_the_video_files(videos, tmp_path):
    ds = folder(videos)
    summary = build_cache(str(tmp_path / "c"), ds.records, ds.canvas, progress=False)
    assert summary["built"] == 6 and summary["failed"] == 0
    cached = folder(videos, ClipCache(str(tmp_path / "c")))
    for epoch in (0, 3):
        ds.set_epoch(epoch)
        cached.set_epoch(epoch)
        for i in range(len(ds)):
            a, b = ds[i], cached[i]
            assert torch.equal(a[0], b[0]) and torch.equal(a[3], b[3]) and a[1:3] == b[1:3]


def test_cache_at_another_short_side_is_resized_to_the_canvas(videos, tmp_path):
    ds = folder(videos, train=False)
    build_cache(str(tmp_path / "c"), ds.records, 32, progress=False)
    cached = folder(videos, ClipCache(str(tmp_path / "c")), train=False)
    a, b = ds[0][0].float(), cached[0][0].float()
    assert b.shape == a.shape == (6, 18, 18, 3) and (a - b).abs().mean() < 8


def test_cache_updates_only_changed_and_added_videos(videos, tmp_path):
    path = str(tmp_path / "c")
    ds = folder(videos)
    build_cache(path, ds.records, 18, progress=False)
    assert build_cache(path, ds.records, 18, progress=False)["built"] == 0
    changed = videos / "a" / "v1.mp4"
    write_h264(changed, moving_frames(12, seed=77))
    os.utime(changed, ns=(1, 1))  # a different mtime, whatever the clock's resolution
    write_h264(videos / "b" / "new.mp4", moving_frames(10, seed=78))
    ds = folder(videos)
    summary = build_cache(path, ds.records, 18, progress=False)
    assert summary["built"] == 2 and summary["entries"] == 7
    cache = ClipCache(path)
    rec = [r for r in ds.records if r.path == str(changed)][0]
    assert cache.frames(rec).shape == (12, 18, 18, 3)


def test_clips_decoded_before_frames_were_turned_are_decoded_again(videos, tmp_path, caplog):
    """Entries without the orientation mark (a cache written before the reader turned frames by
    the display matrix: portrait videos on their side) are decoded again, once, with a warning."""
    path = str(tmp_path / "c")
    ds = folder(videos)
    build_cache(path, ds.records, 18, progress=False)
    file = os.path.join(path, "index.json")
    with open(file) as f:
        index = json.load(f)
    for entry in index["entries"].values():
        del entry["orientation"]
    with open(file, "w") as f:
        json.dump(index, f)
    with caplog.at_level(logging.WARNING, logger="cnnlstm_ext.data"):
        assert build_cache(path, ds.records, 18, progress=False)["built"] == 6
    assert "6 clip(s) decoded before the reader turned frames" in caplog.text
    assert build_cache(path, ds.records, 18, progress=False)["built"] == 0


def test_truncated_clip_file_is_refused_and_rebuilt_on_request(videos, tmp_path):
    path = str(tmp_path / "c")
    ds = folder(videos)
    build_cache(path, ds.records, 18, progress=False)
    rec = ds.records[2]
    file = os.path.join(path, "clips", entry_key(rec.path, rec.start, rec.end) + ".clip")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) - 100)
    with pytest.raises(CacheError, match="truncated.*--rebuild"):
        folder(videos, ClipCache(path))[2]
    assert build_cache(path, ds.records, 18, progress=False)["built"] == 1  # noticed as stale
    assert build_cache(path, ds.records, 18, rebuild=True, progress=False)["built"] == 6
    folder(videos, ClipCache(path))[2]


def test_cache_of_another_version_or_damaged_index_is_refused(videos, tmp_path):
    path = str(tmp_path / "c")
    ds = folder(videos)
    build_cache(path, ds.records, 18, progress=False)
    index = os.path.join(path, "index.json")
    doc = json.load(open(index))
    doc["version"] = 99
    json.dump(doc, open(index, "w"))
    with pytest.raises(CacheError, match="version 99.*--rebuild"):
        ClipCache(path)
    with pytest.raises(CacheError, match="version 99"):
        build_cache(path, ds.records, 18, progress=False)
    open(index, "w").write('{"format": "cnnlstm-ext clip ca')  # cut short
    with pytest.raises(CacheError, match="not a readable clip cache index"):
        ClipCache(path)
    build_cache(path, ds.records, 18, rebuild=True, progress=False)
    assert len(ClipCache(path)) == 6


def test_unreadable_video_gets_an_error_entry_and_is_skipped(videos, tmp_path, caplog):
    bad = videos / "b" / "corrupt.mp4"
    bad.write_bytes(b"\x00" * 300)
    ds = folder(videos)
    with caplog.at_level(logging.WARNING, logger="cnnlstm_ext.data"):
        summary = build_cache(str(tmp_path / "c"), ds.records, 18, progress=False)
    assert summary["failed"] == 1 and "corrupt.mp4" in caplog.text
    cached = folder(videos, ClipCache(str(tmp_path / "c")))
    i = [r.path for r in cached.records].index(str(bad))
    with pytest.raises(ClipReadError, match="corrupt.mp4"):
        cached[i]
    assert isinstance(LoaderDataset(cached)[i], SkippedClip)
    assert bad.read_bytes() == b"\x00" * 300  # sources are only read
    # counted in later updates too, which do not decode it again
    again = build_cache(str(tmp_path / "c"), ds.records, 18, progress=False)
    assert again["built"] == again["failed"] == 0
    assert ClipCache(str(tmp_path / "c")).unreadable(ds.records + ds.records) == 1


def _build_share(path, root, rank, world):
    build_cache(path, folder(root).records, 18, rank=rank, world_size=world, progress=False)


def test_a_rank_that_starts_late_still_builds_its_share(videos, tmp_path):
    """Rank 1 of 2 reading the index after rank 0 merged its clips takes its own share, not a
    share of what rank 0 left: the cache is whole whenever each rank starts."""
    path = str(tmp_path / "c")
    records = folder(videos).records
    first = build_cache(path, records, 18, rank=0, world_size=2, progress=False)
    second = build_cache(path, records, 18, rank=1, world_size=2, progress=False)
    assert first["built"] + second["built"] == 6
    cache = ClipCache(path)
    assert len(cache) == 6 and all(cache.entry(r) for r in folder(videos, cache).records)


@pytest.mark.parametrize("world", [1, 2])
def test_concurrent_builders_leave_a_whole_cache(videos, tmp_path, world):
    """Two processes at once (world=2: the ranks of a job sharing the work; world=1: two jobs
    building the same cache)."""
    path = str(tmp_path / "c")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_build_share, args=(path, str(videos), r % world, world))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    cache = ClipCache(path)
    ds = folder(videos, cache)
    assert len(cache) == 6 and all(cache.entry(r) for r in ds.records)
    assert not [n for n in os.listdir(os.path.join(path, "clips")) if n.endswith(".tmp")]
    assert build_cache(path, ds.records, 18, progress=False)["built"] == 0
    ds[0]


def test_cache_command_builds_and_reports(videos, tmp_path, capsys):
    out = str(tmp_path / "c")
    rc = cli.main(["cache", "--data", str(videos), "--out", out, "--no-progress",
                   "--set", "data.frame_size=16", "--set", "data.val_fraction=0.34"])
    text = capsys.readouterr().out
    assert rc == 0 and "clips          6 of this config (6 decoded in the cache)" in text
    assert "short side 18" in text
    assert len(ClipCache(out)) == 6
    rc = cli.main(["cache", "--data", str(videos), "--out", out, "--no-progress",
                   "--set", "data.frame_size=16", "--set", "data.val_fraction=0.34"])
    assert rc == 0 and "decoded now    0" in capsys.readouterr().out


def test_cache_command_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["cache", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the clip cache holds video files")
    assert cli.main(["cache", "--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no cache folder")


# --- training on the caches ---------------------------------------------------------------------

def video_config(tmp_path, root, run, **data):
    cfg = Config()
    cfg.model.update(spatial_dim=16, temporal_dim=8)
    d = cfg.data
    d.dataset, d.root, d.num_frames, d.frame_size, d.val_fraction = "folder", str(root), 6, 16, 0.34
    d.num_workers = 0
    for k, v in data.items():
        setattr(d, k, v)
    t = cfg.train
    t.output_dir, t.run_name = str(tmp_path / "runs"), run
    t.epochs, t.batch_size, t.progress, t.tensorboard = 2, 2, False, False
    return cfg


def test_training_from_the_clip_cache_sees_the_clips_of_the_files(videos, tmp_path, caplog):
    plain = Trainer(video_config(tmp_path, videos, "plain")).fit(stop_at_epoch=2)
    with caplog.at_level(logging.INFO, logger="cnnlstm_ext.train"):
        cached_trainer = Trainer(video_config(tmp_path, videos, "cached",
                                              cache=str(tmp_path / "cache")))
        cached = cached_trainer.fit(stop_at_epoch=2)
    assert len(ClipCache(str(tmp_path / "cache"))) == 6  # built on first use
    a = torch.load(os.path.join(plain["run_dir"], "checkpoints", "latest_checkpoint.pth"),
                   weights_only=True)["history"]
    b = cached_trainer.history
    assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"]
    assert "clips/s" in caplog.text and "sets the pace" in caplog.text
    assert b["data_clips_per_s"][0] > 0 and b["step_clips_per_s"][0] > 0


def test_training_skips_unreadable_videos_and_counts_them(videos, tmp_path, caplog):
    (videos / "a" / "broken.mp4").write_bytes(b"\x00" * 400)
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(video_config(tmp_path, videos, "bad", val_fraction=0.2))
        trainer.fit(stop_at_epoch=1)
    skipped = trainer.history["skipped_clips"][0]
    in_train = any(r.path.endswith("broken.mp4") for r in trainer.train_set.records)
    assert skipped == (1 if in_train else 0)
    assert "broken.mp4" in caplog.text


def test_frozen_backbone_gets_no_gradient_and_stays_in_eval_mode():
    model = CNNLSTM(num_classes=3, spatial_dim=16, temporal_dim=8, num_layers=1, backbone="tiny",
                    freeze_backbone=True)
    model.train()
    assert not model.backbone.training and model.classifier.training
    clips = torch.randn(2, 4, 3, 16, 16)
    model(clips).sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.classifier.weight.grad is not None
    feats = model.frame_features(clips)
    assert feats.shape == (2, 4, 64)
    assert torch.allclose(model.forward_features(feats), model(clips), atol=1e-6)


def test_feature_cache_gives_the_losses_of_frozen_training_without_it(videos, tmp_path):
    def run(name, **data):
        cfg = video_config(tmp_path, videos, name, augment=False, **data)
        cfg.model["freeze_backbone"] = True
        cfg.model["dropout"] = 0.2
        trainer = Trainer(cfg)
        trainer.fit(stop_at_epoch=2)
        return trainer

    frozen = run("frozen")
    cached = run("features", feature_cache=str(tmp_path / "feats"))
    for key in ("train_loss", "val_loss", "train_acc"):
        assert frozen.history[key] == pytest.approx(cached.history[key], rel=1e-5, abs=1e-6), key
    assert frozen.history["train_loss"][0] != frozen.history["train_loss"][1]  # it trains
    file = tmp_path / "feats" / "train.pt"
    stamp = os.stat(file).st_mtime_ns
    again = run("features-again", feature_cache=str(tmp_path / "feats"))
    assert os.stat(file).st_mtime_ns == stamp  # found, not computed again
    assert again.history["train_loss"] == cached.history["train_loss"]


def test_damaged_feature_cache_is_refused_with_a_clear_error(videos, tmp_path):
    cfg = video_config(tmp_path, videos, "f", augment=False, feature_cache=str(tmp_path / "feats"))
    cfg.model["freeze_backbone"] = True
    Trainer(cfg)
    file = tmp_path / "feats" / "train.pt"
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(CacheError, match="truncated or damaged.*cache_rebuild"):
        Trainer(cfg)
    cfg.data.cache_rebuild = True
    Trainer(cfg)


def test_cache_entries_keep_the_orientation_they_were_decoded_in(tmp_path, caplog):
    """data.orientation = stored against a cache decoded as players show frames: the data set
    reads such entries from the files, and the update decodes them again, once, saying why."""
    from test_data_pipeline import write_turned
    root = tmp_path / "videos"
    (root / "a").mkdir(parents=True)
    frames = moving_frames(12, h=48, w=64)
    write_turned(root / "a" / "portrait.mp4", frames, -90, lossless=False)
    path = str(tmp_path / "c")

    def dataset(orientation, cache=None):
        return VideoFolder(str(root), num_frames=6, transform=ClipTransform(size=16, train=False),
                           seed=4, batch_augment=True, cache=cache, orientation=orientation)
    shown, stored = dataset("display"), dataset("stored")
    assert not torch.equal(shown[0][0], stored[0][0])
    build_cache(path, shown.records, shown.canvas, progress=False)
    cache = ClipCache(path)
    assert cache.entry(shown.records[0]) is not None
    assert cache.entry(shown.records[0], "stored") is None
    assert torch.equal(dataset("stored", cache)[0][0], stored[0][0])    # from the file
    with caplog.at_level(logging.WARNING, logger="cnnlstm_ext.data"):
        assert build_cache(path, stored.records, stored.canvas, progress=False,
                           orientation="stored")["built"] == 1
    assert "1 clip(s) turned otherwise than data.orientation = stored" in caplog.text
    cache = ClipCache(path)
    assert cache.entry(stored.records[0], "stored") is not None
    assert torch.equal(dataset("stored", cache)[0][0], stored[0][0])    # from the cache
    assert build_cache(path, stored.records, stored.canvas, progress=False,
                       orientation="stored")["built"] == 0
    with pytest.raises(ValueError, match="orientation must be one of 'display', 'stored'"):
        dataset("sideways")
    with pytest.raises(ValueError, match="orientation must be one of 'display', 'stored'"):
        build_cache(str(tmp_path / "other"), stored.records, 18, orientation="sideways")
    assert not os.path.exists(tmp_path / "other")
