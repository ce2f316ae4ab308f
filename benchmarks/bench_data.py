"""The video data path against the pure-decode ceiling of the same run (CPU, one worker).

    python -m pytest benchmarks/bench_data.py --benchmark-json=data.json
    python benchmarks/data_ratios.py data.json            # the goals, PASS / FAIL per goal

The session writes its own WLASL-like set with PyAV: 8 videos, H.264 yuv420p, 256x256, 72 frames
at 25 fps; and a 60 s 640x480 video (keyframes every 2 s, YouTube's recommendation) whose
annotated clip is its frames 1400..1471, as WLASL's frame_start/frame_end cut clips out of long
videos. Each benchmark reads whole "epochs" in the calling process (num_workers=0: the rate of
one loader worker) and records ``extra_info``: kind, clips per round, T, transform. The entry
of each goal's numerator (files, long_clip, cache, features) also runs that goal's baseline
(ceiling, short_clip, files, frozen) once before each of its rounds (interleave.py) and records
baseline_interleaved_median_s and baseline_clips: data_ratios.py computes the goal from those, two
rates taken under the same machine load. The baselines' own entries stay, for the record.

kinds:
  ceiling   every frame of each video decoded by PyAV, no conversion (one decoding thread, as
            the loader decodes frames this small): what one worker can reach
  files     LoaderDataset(VideoFolder(batch_augment=True)): seek, scaled decode of the sampled
            frames, uint8 canvas + drawn augmentation (applied later, batched on the device)
  legacy    the previous path: every frame decoded and converted to full-size RGB, then the
            float32 ClipTransform per clip (for the record; no goal)
  long_clip / short_clip   one annotated clip of the long video / of a short one
  long_decode  decoding alone (PyAV, one thread, no conversion) of the long clip's 72 frames,
            against a short video's 72 (its baseline): what the long clip's larger frames cost
            to decode (the reader's costs per clip, the same for both, pull the goal below it)
  cache     the same loader reading the decoded-clip cache
  augment   BatchAugment of a batch on the CPU (on a GPU it is a few kernels; for the record)
  frozen / features   an epoch of the default `wlasl100` model with a frozen backbone on the
            frames, against the same epoch of the LSTM + head on cached features

Goals (issue 20; data_ratios.py): files >= 0.7 x ceiling; long clip <= 3 x a short clip;
cache >= 10 x files; features >= 20 x frozen.
"""
import numpy as np
import pytest
import torch

from cnnlstm_ext.data.batch_transforms import BatchAugment
from cnnlstm_ext.data.cache import ClipCache, build_cache
from cnnlstm_ext.data.loader import LoaderDataset, collate_clips
from cnnlstm_ext.data.transforms import ClipTransform, pad_clip, sample_generator, sample_indices
from cnnlstm_ext.data.video_folder import ClipRecord, VideoFolder

import interleave

SIZE, SHORT_VIDEOS, SHORT_FRAMES, FPS = 112, 8, 72, 25
LONG_SECONDS, LONG_CLIP = 60, (1400, 1472)
# Rounds of the file-reading entries (a fraction of a second each): the median of a few rounds
# still moved by 1.4x between runs on a shared 2-core machine.
ROUNDS = 15


def _write(path, n, h, w, gop=None, seed=0):
    """n frames of moving texture as H.264 yuv420p (WLASL's codec and pixel format)."""
    import av
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h // 16 + 1, w // 16 + 2, 3)).astype(np.uint8)
    base = base.repeat(16, 0).repeat(16, 1)
    with av.open(path, mode="w") as c:
        s = c.add_stream("libx264", rate=FPS)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = dict({"preset": "veryfast", "crf": "23"}, **({"g": str(gop)} if gop else {}))
        for i in range(n):
            image = np.ascontiguousarray(np.roll(base, i * 2, axis=1)[:h, :w])
            for p in s.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture(scope="session")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("wlasl_like")
    short = []
    for k in range(SHORT_VIDEOS):
        path = str(root / ("%05d.mp4" % k))
        _write(path, SHORT_FRAMES, 256, 256, seed=k)
        short.append(path)
    long = str(root / "long.mp4")
    _write(long, LONG_SECONDS * FPS, 480, 640, gop=2 * FPS, seed=99)
    return {"root": str(root), "short": short, "long": long}


def _folder(records, T, train, cache=None):
    tf = ClipTransform(size=SIZE, train=train)
    return VideoFolder("", num_frames=T, transform=tf, classes=["x"], records=records,
                       train=train, seed=0, batch_augment=True, cache=cache)


def _epoch(ds, epoch=[0]):
    """Reads every clip of `ds` once as a loader worker does; a new epoch per call."""
    epoch[0] += 1
    view = LoaderDataset(ds)
    return collate_clips([view[(epoch[0], i)] for i in range(len(ds))])


def _pure_decode(paths):
    import av
    n = 0
    for path in paths:
        with av.open(path) as c:
            s = c.streams.video[0]
            s.thread_count = 1  # PyAV's fastest for these frames (1.5x FFmpeg's automatic threads)
            for _ in c.decode(s):
                n += 1
    return n


def _info(benchmark, kind, clips, T=None, transform=None):
    benchmark.extra_info.update(kind=kind, clips=clips, T=T, transform=transform)


def _timed(benchmark, step, rounds, baseline=None, baseline_clips=None):
    """Times step(); with `baseline`, the goal's baseline (a callable) interleaved with the rounds
    and its clips recorded for data_ratios.py."""
    if baseline is not None:
        benchmark.extra_info["baseline_clips"] = baseline_clips
    interleave.time_interleaved(benchmark, step, baseline, rounds)


@pytest.mark.parametrize("T", [16, 32])
def test_ceiling(benchmark, videos, T):
    benchmark.group = "data:T=%d" % T
    _info(benchmark, "ceiling", len(videos["short"]), T)
    benchmark.pedantic(_pure_decode, args=(videos["short"],), rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("transform", ["train", "eval"])
@pytest.mark.parametrize("T", [16, 32])
def test_files(benchmark, videos, T, transform):
    benchmark.group = "data:T=%d" % T
    ds = _folder([ClipRecord(p, 0) for p in videos["short"]], T, transform == "train")
    _info(benchmark, "files", len(ds), T, transform)
    _timed(benchmark, lambda: _epoch(ds), ROUNDS, lambda: _pure_decode(videos["short"]),
           len(videos["short"]))
    batch = _epoch(ds)
    assert batch.clips.shape == (len(ds), T, 128, 128, 3) and not batch.skipped


def _legacy_read(path, T, generator):
    """The previous reader: decode every frame, convert each to full-size RGB, then sample."""
    import av
    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
    idx = sample_indices(len(frames), T, jitter=True, generator=generator).tolist()
    return torch.from_numpy(np.stack([frames[i] for i in idx])).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("T", [16, 32])
def test_legacy(benchmark, videos, T):
    benchmark.group = "data:T=%d" % T
    tf = ClipTransform(size=SIZE, train=True)
    _info(benchmark, "legacy", len(videos["short"]), T, "train")

    def epoch():
        for i, path in enumerate(videos["short"]):
            g = sample_generator(0, 1, i)
            pad_clip(tf(_legacy_read(path, T, g), g), T)
    benchmark.pedantic(epoch, rounds=3, warmup_rounds=0)


def _decode_range(path, start, n):
    """PyAV's decode of frames start .. start + n - 1 of `path`: a seek to the keyframe before
    `start` (from frame 16 on, as the reader), one thread, no conversion, every frame decoded."""
    import av
    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_count = 1
        per_tick = float(s.average_rate * s.time_base)
        first = s.start_time or 0
        if start >= 16:
            c.seek(first + int(start / per_tick), stream=s, backward=True)
        for f in c.decode(s):
            if round((f.pts - first) * per_tick) >= start + n - 1:
                return


@pytest.mark.parametrize("which", ["short_clip", "long_clip", "long_decode"])
def test_clip_of_a_long_video(benchmark, videos, which):
    benchmark.group = "data:long video"
    if which == "long_decode":
        # For the long-clip goal: decoding alone, the long clip's frames against the short
        # video's, 4 clips each, interleaved.
        _info(benchmark, which, 4, 32)
        start, end = LONG_CLIP
        _timed(benchmark, lambda: [_decode_range(videos["long"], start, end - start)
                                   for _ in range(4)], ROUNDS,
               lambda: [_decode_range(videos["short"][0], 0, SHORT_FRAMES) for _ in range(4)], 4)
        return
    short = _folder([ClipRecord(videos["short"][0], 0)] * 4, 32, True)
    ds = (_folder([ClipRecord(videos["long"], 0, *LONG_CLIP)] * 4, 32, True)
          if which == "long_clip" else short)
    _info(benchmark, which, len(ds), 32, "train")
    if which == "long_clip":
        _timed(benchmark, lambda: _epoch(ds), ROUNDS, lambda: _epoch(short), len(short))
    else:
        _timed(benchmark, lambda: _epoch(ds), ROUNDS)
    assert _epoch(ds).clips.shape[:2] == (4, 32)


@pytest.fixture(scope="session")
def cache(videos, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cache"))
    build_cache(path, [ClipRecord(p, 0) for p in videos["short"]], 128, progress=False)
    return ClipCache(path)


@pytest.mark.parametrize("T", [16, 32])
def test_cache(benchmark, videos, cache, T):
    benchmark.group = "data:T=%d" % T
    records = [ClipRecord(p, 0) for p in videos["short"]]
    ds, files = _folder(records, T, True, cache), _folder(records, T, True)
    _info(benchmark, "cache", len(ds), T, "train")
    _timed(benchmark, lambda: _epoch(ds), 20, lambda: _epoch(files), len(files))


def test_batch_augment(benchmark, videos):
    benchmark.group = "data:augment"
    ds = _folder([ClipRecord(p, 0) for p in videos["short"]], 16, True)
    batch = _epoch(ds)
    aug = BatchAugment(ds.transform)
    _info(benchmark, "augment", len(ds), 16, "train")
    benchmark.pedantic(aug, args=(batch.clips, batch.params), rounds=5, warmup_rounds=1)


# configs/wlasl100.toml: batch_size 32, num_frames 16.
FEATURE_BATCHES, FEATURE_B, FEATURE_T = 2, 32, 16


@pytest.fixture(scope="session")
def wlasl_model():
    """The default wlasl100 model (configs/wlasl100.toml) with a frozen backbone."""
    from cnnlstm_ext.models import CNNLSTM
    torch.manual_seed(0)
    return CNNLSTM(num_classes=100, spatial_dim=512, temporal_dim=512, num_layers=3,
                   backbone="resnet18", pooling="mean", dropout=0.3, freeze_backbone=True)


def _epoch_runner(model, batches, forward):
    """A callable that trains one epoch of `batches` per call, with one optimizer for all its
    calls, as a run keeps its optimizer from epoch to epoch (a new AdamW per call would time
    the allocation of its state too)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=True)  # as the trainer (optim.fused)

    def epoch():
        model.train()
        for x, y in batches:
            loss = torch.nn.functional.cross_entropy(forward(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return epoch


@pytest.mark.parametrize("which", ["frozen", "features"])
def test_feature_cache_epoch(benchmark, wlasl_model, which):
    benchmark.group = "data:feature cache"
    g = torch.Generator().manual_seed(0)
    labels = [torch.randint(0, 100, (FEATURE_B,), generator=g) for _ in range(FEATURE_BATCHES)]
    clips = [torch.randn(FEATURE_B, FEATURE_T, 3, SIZE, SIZE, generator=g)
             for _ in range(FEATURE_BATCHES)]
    model = wlasl_model
    frozen = _epoch_runner(model, list(zip(clips, labels)), model)
    _info(benchmark, which, FEATURE_BATCHES * FEATURE_B, FEATURE_T)
    if which == "features":
        with torch.no_grad():
            model.eval()
            feats = [model.frame_features(c) for c in clips]   # [B, T, 512], as the cache holds
        cached = _epoch_runner(model, list(zip(feats, labels)), model.forward_features)
        # the frozen epoch (seconds) interleaved with the cached one's rounds
        _timed(benchmark, cached, 5, frozen, FEATURE_BATCHES * FEATURE_B)
    else:
        _timed(benchmark, frozen, 2)
