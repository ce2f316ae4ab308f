"""Tiny video data sets and runs trained on them, for the predict, load_model and evaluate tests.

Class c's videos are a colour with pixel noise, 6 to 15 frames of 24x32 (H.264, lossless):
a few seconds of training on 2 CPU cores.
"""
import os

import torch

from cnnlstm_ext.data import write_video
from cnnlstm_ext.train import Config, Trainer

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def write_clip(path, label, frames, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor(COLOURS[label], dtype=torch.uint8).view(1, 3, 1, 1)
    noise = torch.randint(0, 40, (frames, 3, 24, 32), generator=g, dtype=torch.uint8)
    write_video(str(path), (base.expand(frames, 3, 24, 32) + noise).contiguous())


def make_class_videos(root, per_class=4, first_seed=0):
    """root/class<c>/v<i>.mp4 for 3 classes; returns the paths."""
    paths = []
    for c in range(len(COLOURS)):
        folder = os.path.join(str(root), "class%d" % c)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            path = os.path.join(folder, "v%d.mp4" % i)
            write_clip(path, c, 6 + 3 * i, first_seed + 10 * c + i)
            paths.append(path)
    return paths


def folder_config(out_dir, data_root, run="run", epochs=2, **data):
    """A 4-frame 16x16 CNN-LSTM on a class-per-folder data set, a quarter held out."""
    cfg = Config()
    cfg.model.update(spatial_dim=16, temporal_dim=8)
    d = cfg.data
    d.dataset, d.root, d.val_fraction = "folder", str(data_root), 0.25
    d.num_frames, d.frame_size, d.num_workers = 4, 16, 0
    for k, v in data.items():
        setattr(d, k, v)
    t = cfg.train
    t.output_dir, t.run_name = str(out_dir), run
    t.epochs, t.batch_size, t.progress, t.tensorboard = epochs, 4, False, False
    return cfg


def train_folder_run(out_dir, data_root, run="run", epochs=2, **data):
    """Trains the run; returns its checkpoints folder."""
    cfg = folder_config(out_dir, data_root, run, epochs, **data)
    Trainer(cfg).fit()
    return os.path.join(str(out_dir), run, "checkpoints")
