"""The training transforms of a ClipTransform, applied to a batch of uint8 clips on the device.

The loader yields uint8 clips on a square canvas (the short side the transform resizes to, the
long side cut to its centre) and, per clip, the parameters of its augmentation, drawn in the
data set from the clip's generator (seed, epoch, index) exactly as ClipTransform draws them:

    params [B, 8] float64: top, left, height, width of the crop box on the canvas,
                           brightness, contrast, saturation factors, flip (0 or 1)

`BatchAugment` then crops, resizes, jitters and normalises the whole batch in a few kernels on
the device the model trains on (`[B, T, H, W, 3]` uint8 -> `[B, T, 3, S, S]` float32): the
loader never makes float32 frames, and the same run gives the same clips wherever it runs.
"""
from typing import Optional, Tuple

import torch

from .transforms import ClipTransform, color_jitter_factors, random_resized_crop_params

NUM_PARAMS = 8


def canvas_size(transform: ClipTransform) -> int:
    """The side of the square uint8 canvas a clip is decoded to for `transform`."""
    return transform.resize_to or int(round(transform.size * 8 / 7))


def draw_params(transform: ClipTransform, height: int, width: int,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """One clip's augmentation `[8]` float64 (see the module docstring) for a `height x width`
    canvas, drawn from `generator` in ClipTransform's order (crop box, colour factors, flip).
    Without training augmentation: the central `size x size` box, factors 1, no flip."""
    s = transform.size
    if height < s or width < s:
        raise ValueError("cannot crop %dx%d out of %dx%d frames" % (s, s, height, width))
    if not transform.train:
        return torch.tensor([(height - s) // 2, (width - s) // 2, s, s, 1, 1, 1, 0],
                            dtype=torch.float64)
    if generator is None:
        raise ValueError("a training transform needs a torch.Generator (for reproducible draws)")
    top, left, ch, cw = random_resized_crop_params(height, width, transform.crop_scale,
                                                   transform.crop_ratio, generator)
    b = c = sat = 1.0
    if transform.color_jitter > 0:
        b, c, sat = color_jitter_factors(transform.color_jitter, generator)
    flip = 0.0
    if transform.hflip and torch.rand((), generator=generator).item() < 0.5:
        flip = 1.0
    return torch.tensor([top, left, ch, cw, b, c, sat, flip], dtype=torch.float64)


class BatchAugment:
    """Applies a batch's drawn augmentation on the batch's device; see the module docstring.

    Crop and resize are one `torchvision.ops.roi_align` call over all frames (bilinear samples
    averaged over each output pixel's footprint, so a shrinking resize is antialiased); colour
    jitter is torchvision's brightness, contrast and saturation (clamped to [0, 1] after each),
    as ClipTransform applies them.
    """

    def __init__(self, transform: ClipTransform):
        self.size = transform.size
        self.jitter = transform.train and transform.color_jitter > 0
        self.flip = transform.train and transform.hflip
        self.mean = tuple(float(m) for m in transform.mean)
        self.std = tuple(float(s) for s in transform.std)

    @torch.no_grad()
    def __call__(self, clips: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import roi_align

        if clips.dim() != 5 or clips.shape[-1] != 3 or clips.dtype != torch.uint8:
            raise ValueError("expected uint8 clips [B, T, H, W, 3], got %s %s"
                             % (clips.dtype, tuple(clips.shape)))
        B, T, H, W, _ = clips.shape
        dev = clips.device
        p = params.to(dev, torch.float32)                                       # [B, 8]
        x = clips.permute(0, 1, 4, 2, 3).reshape(B * T, 3, H, W).float()       # [B*T, 3, H, W]
        top, left, h, w = p[:, 0], p[:, 1], p[:, 2], p[:, 3]
        boxes = torch.stack([left, top, left + w, top + h], 1).repeat_interleave(T, 0)  # [B*T, 4]
        index = torch.arange(B * T, device=dev, dtype=torch.float32)[:, None]
        x = roi_align(x, torch.cat([index, boxes], 1), (self.size, self.size),
                      spatial_scale=1.0, sampling_ratio=-1, aligned=True)         # [B*T, 3, S, S]
        x = x.view(B, T, 3, self.size, self.size).div_(255.0)
        if self.jitter:
            x = _color_jitter(x, p[:, 4], p[:, 5], p[:, 6])
        if self.flip:
            flip = p[:, 7].view(B, 1, 1, 1, 1) > 0.5
            x = torch.where(flip, x.flip(-1), x)
        mean = torch.tensor(self.mean, device=dev).view(1, 1, 3, 1, 1)
        std = torch.tensor(self.std, device=dev).view(1, 1, 3, 1, 1)
        return x.sub_(mean).div_(std)                                            # [B, T, 3, S, S]


def _grey(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=2)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(2)                    # [B, T, 1, S, S]


def _color_jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                  saturation: torch.Tensor) -> torch.Tensor:
    """transforms.color_jitter with per-clip factors `[B]`; `x: [B, T, 3, S, S]` in [0, 1]."""
    view = (-1, 1, 1, 1, 1)
    x = (x * brightness.view(view)).clamp_(0.0, 1.0)
    c = contrast.view(view)
    mean = _grey(x).mean(dim=(2, 3, 4), keepdim=True)                             # per frame
    x = (x * c + mean * (1.0 - c)).clamp_(0.0, 1.0)
    s = saturation.view(view)
    return (x * s + _grey(x) * (1.0 - s)).clamp_(0.0, 1.0)


def reference_augment(clip: torch.Tensor, params: torch.Tensor, transform: ClipTransform
                      ) -> torch.Tensor:
    """One clip `[T, H, W, 3]` uint8 through ClipTransform's own per-clip functions with the drawn
    `params`: what BatchAugment computes, frame by frame (a test oracle)."""
    from .transforms import (adjust_brightness, adjust_contrast, adjust_saturation, normalize,
                             to_float)
    import torch.nn.functional as F

    top, left, h, w = (int(v) for v in params[:4].tolist())
    x = to_float(clip.permute(0, 3, 1, 2))[..., top:top + h, left:left + w]
    x = F.interpolate(x, size=(transform.size, transform.size), mode="bilinear",
                      align_corners=False, antialias=max(h, w) > transform.size)
    if transform.train and transform.color_jitter > 0:
        b, c, s = params[4:7].tolist()
        x = adjust_saturation(adjust_contrast(adjust_brightness(x, b), c), s)
    if transform.train and transform.hflip and params[7] > 0.5:
        x = x.flip(-1)
    return normalize(x.contiguous(), transform.mean, transform.std)


__all__ = ["BatchAugment", "draw_params", "canvas_size", "reference_augment", "NUM_PARAMS"]
