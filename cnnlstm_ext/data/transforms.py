"""Clip transforms: temporal sampling, resize/crop, colour jitter, normalisation.

A clip is a tensor `[T, 3, H, W]` (uint8 or float in [0, 1]). Every spatial and colour transform
draws its parameters once per clip, so all frames of a clip get the same crop and the same colour
change (motion is the signal; changing the crop from frame to frame would fake motion). Random
choices come from an explicit `torch.Generator`, so a sample is a pure function of
(seed, epoch, index) and a resumed run sees exactly the data it would have seen.

There is no horizontal flip by default: in sign language, handedness carries meaning.
"""
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_indices(num_available: int, num_frames: int, *, jitter: bool = False,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Frame indices that cover a clip of `num_available` frames uniformly with `num_frames` picks.

    The clip is cut into `num_frames` equal segments; without jitter each pick is its segment's
    centre, with jitter a uniformly random frame of the segment (temporal jitter). A clip shorter
    than `num_frames` gives all its frames once (`len(result) == num_available`): the caller pads
    and reports the length, instead of repeating frames that would fake a slower motion.
    """
    if num_available < 1:
        raise ValueError("a clip needs at least one frame, got %d" % num_available)
    if num_frames < 1:
        raise ValueError("num_frames must be >= 1, got %d" % num_frames)
    if num_available <= num_frames:
        return torch.arange(num_available)
    seg = num_available / num_frames
    starts = torch.arange(num_frames, dtype=torch.float64) * seg
    if jitter:
        offsets = torch.rand(num_frames, generator=generator, dtype=torch.float64) * seg
    else:
        offsets = torch.full((num_frames,), seg / 2, dtype=torch.float64)
    idx = torch.floor(starts + offsets).long()
    return idx.clamp_(0, num_available - 1)


def pad_clip(clip: torch.Tensor, num_frames: int) -> Tuple[torch.Tensor, int]:
    """Zero-pads `clip: [t, C, H, W]` (t <= num_frames) to `[num_frames, C, H, W]`; returns (clip, t)."""
    t = clip.shape[0]
    if t > num_frames:
        raise ValueError("clip has %d frames, more than num_frames=%d" % (t, num_frames))
    if t == num_frames:
        return clip, t
    pad = clip.new_zeros((num_frames - t,) + tuple(clip.shape[1:]))
    return torch.cat([clip, pad], 0), t


def to_float(clip: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float32 in [0, 1]; float clips are returned as float32."""
    if clip.dtype == torch.uint8:
        return clip.float().div_(255.0)
    if not clip.is_floating_point():
        raise TypeError("clip must be uint8 or floating point, got %s" % clip.dtype)
    return clip.float()


def _check_clip(clip: torch.Tensor) -> None:
    if clip.dim() != 4 or clip.shape[1] != 3:
        raise ValueError("expected a clip of shape [T, 3, H, W], got %s" % (tuple(clip.shape),))


def resize_short_side(clip: torch.Tensor, size: int) -> torch.Tensor:
    """Resizes `clip: [T, 3, H, W]` (float) so that min(H, W) == size, keeping the aspect ratio."""
    _check_clip(clip)
    h, w = clip.shape[-2:]
    if min(h, w) == size:
        return clip
    scale = size / min(h, w)
    new_hw = (max(size, round(h * scale)), max(size, round(w * scale)))
    return F.interpolate(clip, size=new_hw, mode="bilinear", align_corners=False,
                         antialias=scale < 1)


def center_crop(clip: torch.Tensor, size: int) -> torch.Tensor:
    """Central `size x size` crop of `clip: [T, 3, H, W]` (H, W >= size)."""
    h, w = clip.shape[-2:]
    if h < size or w < size:
        raise ValueError("cannot crop %dx%d out of %dx%d frames" % (size, size, h, w))
    top, left = (h - size) // 2, (w - size) // 2
    return clip[..., top:top + size, left:left + size]


def random_resized_crop_params(h: int, w: int, scale: Tuple[float, float],
                               ratio: Tuple[float, float],
                               generator: torch.Generator) -> Tuple[int, int, int, int]:
    """(top, left, height, width) of one random crop of an `h x w` frame, as torchvision's
    RandomResizedCrop.get_params draws it (from `generator`): area fraction uniform in `scale`,
    log aspect ratio (width / height) uniform in log `ratio`, position uniform over the frame;
    after 10 draws that do not fit, the largest central crop within `ratio`."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            pos = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
            top = int(pos[0] * (h - ch + 1))
            left = int(pos[1] * (w - cw + 1))
            return top, left, ch, cw
    # no valid draw: fall back to the largest central crop within `ratio`
    ch, cw = h, w
    if w / h < ratio[0]:
        ch = int(round(w / ratio[0]))
    elif w / h > ratio[1]:
        cw = int(round(h * ratio[1]))
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def random_resized_crop(clip: torch.Tensor, size: int, scale: Tuple[float, float],
                        ratio: Tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """One random crop (area fraction in `scale`, aspect in `ratio`) for all frames, resized to size.

    The box is random_resized_crop_params'; the resize is bilinear, antialiased where it shrinks
    (torchvision's resized_crop with antialias=True).
    """
    _check_clip(clip)
    top, left, ch, cw = random_resized_crop_params(clip.shape[-2], clip.shape[-1], scale, ratio,
                                                   generator)
    crop = clip[..., top:top + ch, left:left + cw]
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=max(ch, cw) > size)


def _grey(clip: torch.Tensor) -> torch.Tensor:
    """Luma `[..., 1, H, W]` of RGB `clip: [..., 3, H, W]` (torchvision's rgb_to_grayscale weights)."""
    r, g, b = clip.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def adjust_brightness(clip: torch.Tensor, factor: float) -> torch.Tensor:
    """`clip * factor`, clamped to [0, 1] (torchvision's adjust_brightness for float images)."""
    return (clip * factor).clamp_(0.0, 1.0)


def adjust_contrast(clip: torch.Tensor, factor: float) -> torch.Tensor:
    """Blends each frame with its mean grey level (the mean of its luma), clamped to [0, 1]
    (torchvision's adjust_contrast for float images)."""
    mean = _grey(clip).mean(dim=(-3, -2, -1), keepdim=True)  # per frame: [T, 1, 1, 1]
    return (clip * factor + mean * (1.0 - factor)).clamp_(0.0, 1.0)


def adjust_saturation(clip: torch.Tensor, factor: float) -> torch.Tensor:
    """Blends each pixel with its luma, clamped to [0, 1] (torchvision's adjust_saturation for
    float images)."""
    return (clip * factor + _grey(clip) * (1.0 - factor)).clamp_(0.0, 1.0)


def color_jitter_factors(strength: float, generator: torch.Generator) -> Tuple[float, float, float]:
    """The (brightness, contrast, saturation) factors color_jitter draws from `generator`, each
    uniform in [1 - strength, 1 + strength]."""
    b, c, s = (1 + strength * (2 * torch.rand(3, generator=generator, dtype=torch.float64) - 1)).tolist()
    return b, c, s


def color_jitter(clip: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Random brightness, contrast and saturation in [1 - strength, 1 + strength], same for all frames.

    `clip: [T, 3, H, W]` float in [0, 1]. The factors are color_jitter_factors'; they are applied in
    that order with adjust_brightness, adjust_contrast and adjust_saturation (torchvision's, each
    clamped to [0, 1]).
    """
    if strength <= 0:
        return clip
    b, c, s = color_jitter_factors(strength, generator)
    return adjust_saturation(adjust_contrast(adjust_brightness(clip, b), c), s)


def normalize(clip: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(clip - mean) / std per channel; `clip: [T, 3, H, W]`."""
    m = torch.tensor(mean, dtype=clip.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=clip.dtype).view(1, 3, 1, 1)
    return (clip - m) / s


@dataclass
class ClipTransform:
    """The spatial pipeline of a video data set: resize the short side, crop, jitter, normalise.

    train=True: random resized crop (area fraction `crop_scale`) + colour jitter (+ horizontal flip
    only when `hflip` is set). train=False: resize the short side to `resize_to` and crop the centre.
    Returns float32 `[T, 3, size, size]`.
    """
    size: int = 112
    resize_to: Optional[int] = None  # short side before the crop; default round(size * 8 / 7)
    train: bool = False
    crop_scale: Tuple[float, float] = (0.6, 1.0)
    crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    color_jitter: float = 0.2
    hflip: bool = False
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    def __call__(self, clip: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        _check_clip(clip)
        clip = to_float(clip)
        short = self.resize_to or int(round(self.size * 8 / 7))
        clip = resize_short_side(clip, short)
        if self.train:
            if generator is None:
                raise ValueError("a training transform needs a torch.Generator (for reproducible draws)")
            clip = random_resized_crop(clip, self.size, self.crop_scale, self.crop_ratio, generator)
            clip = color_jitter(clip, self.color_jitter, generator)
            if self.hflip and torch.rand((), generator=generator).item() < 0.5:
                clip = clip.flip(-1)
        else:
            clip = center_crop(clip, self.size)
        return normalize(clip.contiguous(), self.mean, self.std)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator whose stream depends only on (seed, epoch, index): worker- and order-independent."""
    # A simple multiplicative mix; distinct triples give distinct, well-spread 63-bit seeds.
    mixed = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB)
    mixed ^= mixed >> 31
    g = torch.Generator()
    g.manual_seed(mixed & 0x7FFFFFFFFFFFFFFF)
    return g
