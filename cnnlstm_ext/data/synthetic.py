"""SyntheticVideos: the built-in data set, generated on the fly from a seed (no files, no download).

Each clip shows a disc drifting over a plain background; the class is how the disc *moves in
depth over time*, seen as its size changing from frame to frame:

| class | motion |
| --- | --- |
| 0 `approach` | comes closer: grows steadily (a new disc starts far away after the nearest size) |
| 1 `recede` | moves away: shrinks steadily (and restarts near after the farthest size) |
| 2 `approach-fast` | as `approach`, about 2.5 times faster |
| 3 `recede-fast` | as `recede`, about 2.5 times faster |
| 4 `still` | keeps its distance |
| 5 `bounce` | comes closer and moves away in turn (period 6 frames) |

The size follows a sawtooth or triangle wave with a random phase, so at every time step the size
is uniformly distributed whatever the class; position, drift, colours and noise are drawn
independently of the class too. So a single frame never gives the class away and a per-frame
classifier (or a time-averaged feature) cannot beat chance: the temporal model has to compare
frames. Depth motion is used rather than sideways motion on purpose: CNN features pooled over
space keep an object's size but lose its position.

A sample is a pure function of (seed, split, epoch, index): the same in every worker process and
after a resume. With `resample_each_epoch=True` (the default for the built-in training split)
every epoch draws fresh clips, an endless supply that cannot be memorised.

Clips are drawn with numpy in the calling thread: a clip is a few thousand pixels, too small to
gain from torch's intra-op threads (which, on a busy machine, cost far more than they save).
"""
from typing import Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

# The motion classes, in label order (see the table above).
MOTIONS = ("approach", "recede", "approach-fast", "recede-fast", "still", "bounce")
_SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}

SLOW_STEP = 0.07  # size-phase change per frame (the size range is one unit of phase)
FAST_STEP = 0.17  # < 0.5, so a step is never mistaken for one in the other direction
BOUNCE_PERIOD = 6

# Pixel statistics of the generated clips, used to normalise them to about zero mean, unit spread.
SYNTHETIC_MEAN = (0.3, 0.3, 0.3)
SYNTHETIC_STD = (0.3, 0.3, 0.3)


def size_phase(motion: int, num_frames: int, phase0: float) -> np.ndarray:
    """The disc's size phase in [0, 1) at t = 0..num_frames-1 (0: farthest/smallest, 1: nearest).

    With `phase0` uniform in [0, 1) every entry is uniform in [0, 1) for every motion.
    """
    t = np.arange(num_frames, dtype=np.float64)
    name = MOTIONS[motion]
    if name == "bounce":
        x = np.mod(phase0 + t / BOUNCE_PERIOD, 1.0)
        return np.minimum(2 * np.abs(x - 0.5), 1.0 - 1e-9)  # triangle wave, uniform marginal
    velocity = {"approach": SLOW_STEP, "recede": -SLOW_STEP, "approach-fast": FAST_STEP,
                "recede-fast": -FAST_STEP, "still": 0.0}[name]
    return np.mod(phase0 + velocity * t, 1.0)  # sawtooth, uniform marginal


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """A numpy generator whose stream depends only on (seed, epoch, index)."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, index & 0xFFFFFFFF])


class SyntheticVideos(Dataset):
    """Seeded synthetic clips whose class is carried by motion; see the module docstring.

    Args:
        num_samples: clips per epoch.
        num_classes: the first `num_classes` motions of MOTIONS (2..6).
        num_frames: T, frames per clip.
        frame_size: frames are `frame_size x frame_size` RGB.
        split: "train", "val" or "test": independent streams of clips.
        seed: the data set's seed.
        min_frames: clips have a random length in [min_frames, num_frames], zero-padded to
            num_frames (the returned length says how many frames are real); default: all full.
        noise: standard deviation of the per-pixel Gaussian noise (pixel values in [0, 1]).
        resample_each_epoch: draw fresh clips every epoch (call `set_epoch`).
        normalize: subtract SYNTHETIC_MEAN and divide by SYNTHETIC_STD.

    Items are `(clip [T, 3, S, S] float32, label int, length int)`.
    """

    def __init__(self, num_samples: int = 2048, num_classes: int = 6, num_frames: int = 12,
                 frame_size: int = 32, split: str = "train", seed: int = 0,
                 min_frames: Optional[int] = None, noise: float = 0.04,
                 resample_each_epoch: bool = False, normalize: bool = True):
        if not 2 <= num_classes <= len(MOTIONS):
            raise ValueError("num_classes must be in [2, %d], got %d" % (len(MOTIONS), num_classes))
        if split not in _SPLIT_STREAM:
            raise ValueError("split must be one of %s, got %r" % (sorted(_SPLIT_STREAM), split))
        if num_frames < 3:
            raise ValueError("num_frames must be >= 3 (motion needs frames to compare), got %d"
                             % num_frames)
        if frame_size < 8:
            raise ValueError("frame_size must be >= 8, got %d" % frame_size)
        min_frames = num_frames if min_frames is None else min_frames
        if not 3 <= min_frames <= num_frames:
            raise ValueError("min_frames must be in [3, num_frames=%d], got %d" % (num_frames, min_frames))
        if num_samples < 1:
            raise ValueError("num_samples must be >= 1, got %d" % num_samples)
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.num_frames = num_frames
        self.frame_size = frame_size
        self.split = split
        self.seed = seed
        self.min_frames = min_frames
        self.noise = noise
        self.resample_each_epoch = resample_each_epoch
        self.normalize = normalize
        self.classes = list(MOTIONS[:num_classes])
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch's clips when resample_each_epoch is set (a no-op otherwise)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def label(self, index: int) -> int:
        """Classes are balanced: clip i has class i mod num_classes."""
        return index % self.num_classes

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError("index %d out of range for %d samples" % (index, self.num_samples))
        label = self.label(index)
        epoch = self.epoch if self.resample_each_epoch else 0
        rng = sample_rng(self.seed * len(_SPLIT_STREAM) + _SPLIT_STREAM[self.split], epoch, index)
        frames = self.render(label, rng)  # [T, 3, S, S]
        length = self.num_frames
        if self.min_frames < self.num_frames:
            length = int(rng.integers(self.min_frames, self.num_frames + 1))
            frames[length:] = 0.0  # zero padding past the clip's end
        return torch.from_numpy(frames), label, length

    def render(self, motion: int, rng: np.random.Generator) -> np.ndarray:
        """One clip of class `motion`, nuisance parameters drawn from `rng`: float32 `[T, 3, S, S]`."""
        T, S = self.num_frames, self.frame_size
        phase = size_phase(motion, T, rng.uniform())  # [T]
        radius = (S * (0.1 + 0.3 * phase)).astype(np.float32)  # [T] px: 0.1 S (far) .. 0.4 S (near)
        centre = S / 2 + rng.uniform(-0.1 * S, 0.1 * S, size=2)
        drift = rng.uniform(-0.4, 0.4, size=2)  # px per frame, sideways
        background = rng.uniform(0.0, 0.35, size=3).astype(np.float32)
        foreground = rng.uniform(0.6, 1.0, size=3).astype(np.float32)
        t = np.arange(T) - (T - 1) / 2
        cx = (centre[0] + drift[0] * t).astype(np.float32)  # [T]
        cy = (centre[1] + drift[1] * t).astype(np.float32)
        coords = np.arange(S, dtype=np.float32) + 0.5
        dx = coords[None, None, :] - cx[:, None, None]  # [T, 1, S]
        dy = coords[None, :, None] - cy[:, None, None]  # [T, S, 1]
        dist = np.sqrt(dx * dx + dy * dy)  # [T, S, S]
        # a soft edge about one pixel wide, so that size changes by a fraction of a pixel show
        mask = 1.0 / (1.0 + np.exp(np.clip((dist - radius[:, None, None]) * 2.0, -30, 30)))
        frames = background[None, :, None, None] + mask[:, None] * (foreground - background)[None, :, None, None]
        if self.noise > 0:
            frames += np.float32(self.noise) * rng.standard_normal(frames.shape, dtype=np.float32)
        frames = np.clip(frames, 0.0, 1.0, out=frames)  # [T, 3, S, S] float32
        if self.normalize:
            mean = np.asarray(SYNTHETIC_MEAN, dtype=np.float32)[None, :, None, None]
            std = np.asarray(SYNTHETIC_STD, dtype=np.float32)[None, :, None, None]
            frames = (frames - mean) / std
        return np.ascontiguousarray(frames)
