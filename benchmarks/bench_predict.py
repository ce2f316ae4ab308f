"""`cnnlstm-ext predict`'s throughput for the WLASL100 model, against the model alone.

    python -m pytest benchmarks/bench_predict.py --benchmark-json=predict.json

The model is configs/wlasl100.toml's (ResNet-18 frames -> 3-layer BiLSTM 512 -> mean -> 100
classes; 16 frames of 112x112 per clip) with random weights, saved as a run's checkpoint. The
videos: VIDEOS H.264 files of FRAMES frames of SIZE x SIZE (WLASL's videos are about 60 frames
of 256x256 after the usual cropping). One round of `predict` is what the command does for a
folder: read the videos with the default decoding workers, batch 8 videos, run the model (K=1
and K=3 clips per video) and take the top 5. The baseline round runs the model alone over the
same number of ready-made clips, batch 8: the throughput predict would have if reading videos
cost nothing. Each test records `clips_per_s` and the fraction of the model-bound throughput it
reaches (`fraction_of_model`; best rounds of both, timed in the same test).
"""
import os
import time

import pytest
import torch

from cnnlstm_ext import CNNLSTM, load_model
from cnnlstm_ext.checkpoint import save_checkpoint
from cnnlstm_ext.data import write_video
from cnnlstm_ext.inference import predict_videos
from cnnlstm_ext.train.config import Config, apply_dict, load_config_file

HERE = os.path.dirname(os.path.abspath(__file__))
VIDEOS, FRAMES, SIZE, BATCH = 16, 64, 256, 8


@pytest.fixture(scope="module")
def wlasl100(tmp_path_factory):
    """(checkpoint path, video folder) of the WLASL100 model with random weights."""
    out = tmp_path_factory.mktemp("predict_bench")
    cfg = apply_dict(Config(), load_config_file(os.path.join(HERE, "..", "configs",
                                                             "wlasl100.toml")))
    cfg.model["num_classes"] = 100
    torch.manual_seed(0)
    model = CNNLSTM(**cfg.model)
    classes = ["gloss%03d" % i for i in range(100)]
    path = str(out / "wlasl100.pth")
    save_checkpoint(path, model=model, epoch=1, config=cfg.to_dict(),
                    extra={"trainer_state": {"classes": classes}})
    videos = out / "videos"
    videos.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(VIDEOS):
        # a moving gradient plus noise: H.264 has to code motion, as in a real sign video
        x = torch.arange(SIZE).view(1, 1, 1, SIZE) + 4 * torch.arange(FRAMES).view(FRAMES, 1, 1, 1)
        frames = (x + torch.randint(0, 30, (FRAMES, 3, SIZE, SIZE), generator=g)) % 256
        write_video(str(videos / ("v%02d.mp4" % i)), frames.to(torch.uint8), crf=23)
    return path, str(videos)


def _best(fn, rounds):
    fn()  # warm-up: allocator, oneDNN primitives, decoder libraries
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@pytest.mark.parametrize("clips", [1, 3])
def test_predict_clips_per_second(benchmark, wlasl100, clips):
    path, folder = wlasl100
    model = load_model(path)
    videos = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    workers = min(4, os.cpu_count() or 1)  # the command's default
    T, S = model.preprocessing["num_frames"], model.preprocessing["frame_size"]
    ready = torch.randn(BATCH, T, 3, S, S)

    def model_only():  # as many clips as a predict round runs, batch 8
        with torch.no_grad():
            for _ in range(VIDEOS * clips // BATCH):
                model(ready)

    def predict():
        results = predict_videos(model, videos, clips=clips, batch_size=BATCH,
                                 num_workers=workers)
        assert all(r["error"] is None and r["clips"] == clips for r in results)

    n = VIDEOS * clips
    model_s = _best(model_only, 2)
    benchmark.group = "predict:wlasl100:clips=%d" % clips
    benchmark.pedantic(predict, rounds=2, warmup_rounds=1)
    predict_s = benchmark.stats.stats.min
    info = benchmark.extra_info
    info.update(device="cpu, %d threads" % torch.get_num_threads(), workers=workers,
                videos=VIDEOS, clips_per_video=clips, clips_per_s=n / predict_s,
                model_only_clips_per_s=n / model_s, fraction_of_model=model_s / predict_s)
    print("\nclips=%d: predict %.2f clips/s (%.2f videos/s), model alone %.2f clips/s, "
          "fraction %.2f" % (clips, n / predict_s, VIDEOS / predict_s, n / model_s,
                             model_s / predict_s))
