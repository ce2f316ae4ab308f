"""Data: temporal sampling, clip transforms, the synthetic set, video files (PyAV), VideoFolder
(class folders, frame folders, WLASL JSON), and worker-independent loading."""
import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader

from cnnlstm_ext.data import (MOTIONS, ClipTransform, SyntheticVideos, VideoFolder, build_datasets,
                              read_frame_folder, read_video_frames, sample_indices,
                              write_frame_folder, write_video)
from cnnlstm_ext.data import video_folder
from cnnlstm_ext.data.synthetic import size_phase
from cnnlstm_ext.data.transforms import (adjust_brightness, adjust_contrast, adjust_saturation,
                                         center_crop, color_jitter, color_jitter_factors, pad_clip,
                                         random_resized_crop, random_resized_crop_params,
                                         resize_short_side, sample_generator, to_float)
from cnnlstm_ext.data.video_folder import ClipRecord
from cnnlstm_ext.data.video_io import ClipReadError
from cnnlstm_ext.train.config import DataConfig


# --- temporal sampling -------------------------------------------------------------------------

@pytest.mark.parametrize("available,frames,expected", [
    (16, 4, [2, 6, 10, 14]),   # segment centres
    (10, 5, [1, 3, 5, 7, 9]),
    (7, 7, [0, 1, 2, 3, 4, 5, 6]),
])
def test_sample_indices_uniform_without_jitter(available, frames, expected):
    assert sample_indices(available, frames).tolist() == expected


def test_sample_indices_jitter_stays_in_each_segment():
    g = torch.Generator().manual_seed(3)
    draws = set()
    for _ in range(50):
        idx = sample_indices(100, 8, jitter=True, generator=g).tolist()
        for k, i in enumerate(idx):  # segment k covers frames [12.5 k, 12.5 (k + 1))
            assert math.floor(12.5 * k) <= i <= math.ceil(12.5 * (k + 1)) - 1
        draws.add(tuple(idx))
    assert len(draws) > 40  # the jitter does move the picks


# Segment k of a clip of a (`available`) frames cut into f (`frames`) segments covers
# [k a / f, (k+1) a / f); the frames it can pick are those that interval touches:
# floor(k a / f) .. ceil((k+1) a / f) - 1.
SEGMENT_GRID = [(100, 8), (16, 4), (30, 7), (9, 8), (50, 3), (100, 7)]


def _segment_frames(available, frames, k):
    return set(range(k * available // frames, -(-(k + 1) * available // frames)))


@pytest.mark.parametrize("available,frames", SEGMENT_GRID)
def test_sample_indices_jitter_reaches_every_frame_of_every_segment(available, frames):
    # Over many draws each segment's picks are exactly its frames: all of them, the second half
    # of the segment included, and none of another segment's.
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_indices(available, frames, jitter=True, generator=g)
                         for _ in range(3000)])  # [draws, frames]
    for k in range(frames):
        assert set(draws[:, k].tolist()) == _segment_frames(available, frames, k), k


@pytest.mark.parametrize("available,frames", SEGMENT_GRID)
def test_sample_indices_without_jitter_picks_each_segment_centre(available, frames):
    # The centre of segment k is (k + 1/2) a / f; the pick is the frame that contains it.
    expected = [(2 * k + 1) * available // (2 * frames) for k in range(frames)]
    assert sample_indices(available, frames).tolist() == expected


def test_sample_indices_without_jitter_ignores_the_generator():
    picks = {tuple(sample_indices(100, 8, generator=torch.Generator().manual_seed(s)).tolist())
             for s in range(5)}
    assert len(picks) == 1


def _index_folder(monkeypatch, tmp_path, available, frames, train):
    """One-clip VideoFolder whose frame i reads as the value i: items show the indices picked."""
    def read_indices(path, start, end, select, orientation):
        idx = torch.tensor(select(available), dtype=torch.float32)
        return idx.view(-1, 1, 1, 1).expand(-1, 3, 1, 1)

    monkeypatch.setattr(video_folder, "read_frame_folder", read_indices)
    return VideoFolder(str(tmp_path), frames, transform=lambda clip, g: clip, classes=["c"],
                       records=[ClipRecord(str(tmp_path), 0)], train=train, seed=7)


def test_video_folder_training_jitter_reaches_every_frame_of_every_segment(monkeypatch, tmp_path):
    available, frames = 30, 7
    ds = _index_folder(monkeypatch, tmp_path, available, frames, train=True)
    picks = []
    for epoch in range(400):
        ds.set_epoch(epoch)
        picks.append(ds[0][0][:, 0, 0, 0].long())
    picks = torch.stack(picks)
    for k in range(frames):
        assert set(picks[:, k].tolist()) == _segment_frames(available, frames, k), k


def test_video_folder_eval_picks_segment_centres_in_every_epoch(monkeypatch, tmp_path):
    available, frames = 30, 7
    ds = _index_folder(monkeypatch, tmp_path, available, frames, train=False)
    expected = [(2 * k + 1) * available // (2 * frames) for k in range(frames)]
    for epoch in range(5):
        ds.set_epoch(epoch)
        assert ds[0][0][:, 0, 0, 0].long().tolist() == expected


def test_sample_indices_short_clip_gives_all_frames_once():
    assert sample_indices(3, 8).tolist() == [0, 1, 2]



@pytest.mark.parametrize("available,frames,expected", [(1, 4, [0]), (7, 1, [3]), (1, 1, [0])])
def test_sample_indices_takes_one_frame_or_one_pick(available, frames, expected):
    assert sample_indices(available, frames).tolist() == expected


def test_sample_indices_rejects_zero_picks():
    with pytest.raises(ValueError) as e:
        sample_indices(5, 0)
    assert str(e.value) == "num_frames must be >= 1, got 0"

def test_sample_indices_rejects_empty_clip():
    with pytest.raises(ValueError, match="at least one frame"):
        sample_indices(0, 4)


def test_pad_clip_reports_length_and_zero_pads():
    clip = torch.rand(3, 3, 4, 4) + 1
    padded, length = pad_clip(clip, 5)
    assert length == 3 and padded.shape == (5, 3, 4, 4)
    assert torch.equal(padded[:3], clip) and not padded[3:].any()



def test_pad_clip_refuses_a_clip_longer_than_num_frames():
    clip = torch.rand(6, 3, 4, 4) + 1
    with pytest.raises(ValueError) as e:
        pad_clip(clip, 5)
    assert str(e.value) == "clip has 6 frames, more than num_frames=5"

# --- spatial transforms ------------------------------------------------------------------------

def _ramp_clip(frames=4, h=40, w=48):
    """A uint8 clip brighter on the left: [frames, 3, h, w]."""
    ramp = torch.linspace(255, 0, w).round().to(torch.uint8)
    return ramp.view(1, 1, 1, w).expand(frames, 3, h, w).contiguous()


def test_clip_transform_eval_shape_and_normalisation():
    t = ClipTransform(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    out = t(torch.full((4, 3, 40, 60), 255, dtype=torch.uint8))
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    assert torch.allclose(out, torch.full_like(out, 2.0))  # (1 - 0.5) / 0.25


def test_clip_transform_train_same_crop_and_colour_for_every_frame():
    clip = torch.randint(0, 256, (1, 3, 40, 48), dtype=torch.uint8).expand(6, 3, 40, 48)
    out = ClipTransform(size=24, train=True, color_jitter=0.4)(clip, torch.Generator().manual_seed(0))
    assert out.shape == (6, 3, 24, 24)
    for t in range(1, 6):
        assert torch.equal(out[t], out[0])


def test_clip_transform_train_is_reproducible_from_the_generator():
    clip = torch.randint(0, 256, (4, 3, 40, 48), dtype=torch.uint8)
    t = ClipTransform(size=24, train=True)
    a = t(clip, torch.Generator().manual_seed(5))
    b = t(clip, torch.Generator().manual_seed(5))
    c = t(clip, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_clip_transform_never_flips_by_default():
    # Handedness matters in sign language: the bright side must stay on the left.
    t = ClipTransform(size=24, train=True, crop_scale=(0.8, 1.0), color_jitter=0.0)
    for seed in range(20):
        out = t(_ramp_clip(), torch.Generator().manual_seed(seed))
        assert out[..., :4].mean() > out[..., -4:].mean()


def test_clip_transform_hflip_option_flips_some_clips():
    t = ClipTransform(size=24, train=True, crop_scale=(0.8, 1.0), color_jitter=0.0, hflip=True)
    flipped = sum(bool(t(_ramp_clip(), torch.Generator().manual_seed(s))[..., :4].mean()
                       < t(_ramp_clip(), torch.Generator().manual_seed(s))[..., -4:].mean())
                  for s in range(20))
    assert 0 < flipped < 20


def test_color_jitter_keeps_range_and_changes_pixels():
    clip = torch.rand(2, 3, 8, 8)
    out = color_jitter(clip, 0.5, torch.Generator().manual_seed(1))
    assert out.min() >= 0 and out.max() <= 1 and not torch.allclose(out, clip)


def _noise_clip(frames, h, w, seed=0):
    """Float clip [frames, 3, h, w] of independent uniform pixels: all of its detail is fine."""
    return torch.rand(frames, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("h,w,size,expected_hw", [
    (64, 80, 16, (16, 20)), (60, 90, 40, (40, 60)), (47, 33, 20, (28, 20)), (20, 30, 36, (36, 54)),
])
def test_resize_short_side_sets_the_short_side_and_keeps_the_aspect_ratio(h, w, size, expected_hw):
    assert resize_short_side(_noise_clip(1, h, w), size).shape[-2:] == expected_hw


@pytest.mark.parametrize("h,w,size", [(64, 80, 16), (60, 90, 40), (47, 33, 20), (20, 30, 36)])
def test_resize_short_side_matches_torchvision_antialiased_resize(h, w, size):
    clip = _noise_clip(2, h, w)
    out = resize_short_side(clip, size)
    expected = TF.resize(clip, list(out.shape[-2:]), antialias=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("h,w,size", [(64, 80, 16), (60, 90, 40), (47, 33, 20)])
def test_resize_short_side_downscale_is_not_the_aliased_resize(h, w, size):
    # On fine detail, plain bilinear sampling keeps a few input pixels; antialiasing averages them.
    clip = _noise_clip(2, h, w)
    out = resize_short_side(clip, size)
    aliased = TF.resize(clip, list(out.shape[-2:]), antialias=False)
    assert (out - aliased).abs().mean() > 0.03


def test_random_resized_crop_params_reach_every_origin():
    # A crop of fixed size (20 x 20 out of 40 x 56) lies anywhere in the frame: every top in
    # 0..20 and every left in 0..36, not only the central one.
    h, w = 40, 56
    scale = (400 / (h * w),) * 2
    g = torch.Generator().manual_seed(0)
    boxes = [random_resized_crop_params(h, w, scale, (1.0, 1.0), g) for _ in range(1500)]
    assert {(ch, cw) for _, _, ch, cw in boxes} == {(20, 20)}
    assert {top for top, _, _, _ in boxes} == set(range(h - 20 + 1))
    assert {left for _, left, _, _ in boxes} == set(range(w - 20 + 1))


CROP_GRID = [  # (h, w, scale, ratio)
    (40, 56, (0.3, 1.0), (3 / 4, 4 / 3)),
    (27, 38, (0.6, 1.0), (3 / 4, 4 / 3)),
    (64, 48, (0.08, 1.0), (0.5, 2.0)),
    (48, 56, (0.2, 0.5), (1.0, 1.5)),
]


def _draw_boxes(h, w, scale, ratio, n=1000):
    g = torch.Generator().manual_seed(0)
    return [random_resized_crop_params(h, w, scale, ratio, g) for _ in range(n)]


@pytest.mark.parametrize("h,w,scale,ratio", CROP_GRID)
def test_random_resized_crop_params_fit_the_frame_with_area_and_aspect_in_range(h, w, scale, ratio):
    # Sides are rounded to whole pixels, so area and aspect are within range up to half a pixel.
    for top, left, ch, cw in _draw_boxes(h, w, scale, ratio):
        assert 0 <= top <= h - ch and 0 <= left <= w - cw
        assert (ch + 0.5) * (cw + 0.5) >= scale[0] * h * w
        assert (ch - 0.5) * (cw - 0.5) <= scale[1] * h * w
        assert (cw + 0.5) / (ch - 0.5) >= ratio[0] and (cw - 0.5) / (ch + 0.5) <= ratio[1]


@pytest.mark.parametrize("h,w,scale,ratio", [
    (64, 48, (0.08, 1.0), (0.5, 2.0)),
    (48, 56, (0.2, 0.5), (1.0, 1.5)),
    (40, 40, (0.3, 1.0), (3 / 4, 4 / 3)),
])
def test_random_resized_crop_params_span_the_configured_ranges(h, w, scale, ratio):
    # The frame's own aspect is within `ratio`, so every area fraction in `scale` can be drawn.
    boxes = _draw_boxes(h, w, scale, ratio)
    areas = [ch * cw / (h * w) for _, _, ch, cw in boxes]
    aspects = [cw / ch for _, _, ch, cw in boxes]
    slack = 0.05 * (scale[1] - scale[0])
    assert min(areas) <= scale[0] + slack and max(areas) >= scale[1] - slack
    assert min(aspects) <= ratio[0] * 1.05 and max(aspects) >= ratio[1] / 1.05


def test_random_resized_crop_params_fall_back_to_the_largest_central_crop_in_ratio():
    # No area fraction of 2 to 3 fits: the crop is central, as large as the ratio allows.
    g = torch.Generator().manual_seed(0)
    assert random_resized_crop_params(40, 80, (2.0, 3.0), (0.75, 4 / 3), g) == (0, 13, 40, 53)
    assert random_resized_crop_params(80, 40, (2.0, 3.0), (0.75, 4 / 3), g) == (13, 0, 53, 40)



def test_random_resized_crop_params_fall_back_to_the_whole_frame_when_its_ratio_fits():
    g = torch.Generator().manual_seed(0)
    assert random_resized_crop_params(40, 44, (2.0, 3.0), (0.75, 4 / 3), g) == (0, 0, 40, 44)


@pytest.mark.parametrize("h,w", [(20, 10), (10, 20)])
def test_random_resized_crop_params_take_a_crop_as_high_or_as_wide_as_the_frame(h, w):
    # Half the area at aspect 1: a 10 x 10 crop, the frame's full width (or height), placed
    # anywhere along the other side, not only at the centre of the fallback.
    boxes = _draw_boxes(h, w, (0.5, 0.5), (1.0, 1.0), n=200)
    assert {(ch, cw) for _, _, ch, cw in boxes} == {(10, 10)}
    assert {(top, left) for top, left, _, _ in boxes} == {(t * (h > w), t * (w > h)) for t in range(11)}


def test_random_resized_crop_params_draw_top_and_left_independently():
    boxes = _draw_boxes(40, 40, (0.25, 0.25), (1.0, 1.0), n=200)
    assert {(ch, cw) for _, _, ch, cw in boxes} == {(20, 20)}
    assert len({(top, left) for top, left, _, _ in boxes}) > 21

@pytest.mark.parametrize("h,w,size,scale,ratio", [
    pytest.param(64, 64, 16, (0.5, 1.0), (3 / 4, 4 / 3), id="shrinks"),
    pytest.param(24, 30, 32, (0.3, 1.0), (3 / 4, 4 / 3), id="grows"),
    pytest.param(48, 48, 24, (0.15, 0.35), (0.5, 2.0), id="mostly-one-side-shrinks-one-grows"),
])
def test_random_resized_crop_equals_torchvision_resized_crop_of_its_box(h, w, size, scale, ratio):
    clip = _noise_clip(2, h, w)
    for seed in range(20):
        box = random_resized_crop_params(h, w, scale, ratio, torch.Generator().manual_seed(seed))
        out = random_resized_crop(clip, size, scale, ratio, torch.Generator().manual_seed(seed))
        expected = TF.resized_crop(clip, *box, [size, size], antialias=True)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5,
                                   msg=lambda m: "box %s: %s" % (box, m))


def test_clip_transform_train_crop_is_torchvision_resized_crop_of_a_random_box():
    # Short side 40 -> round(24 * 8 / 7) = 27 (so 56 -> 38), then the random box resized to 24.
    clip = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))
    t = ClipTransform(size=24, train=True, color_jitter=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    resized = TF.resize(to_float(clip), [27, 38], antialias=True)
    for seed in range(20):
        box = random_resized_crop_params(27, 38, t.crop_scale, t.crop_ratio,
                                         torch.Generator().manual_seed(seed))
        expected = TF.resized_crop(resized, *box, [24, 24], antialias=True)
        out = t(clip, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5,
                                   msg=lambda m: "box %s: %s" % (box, m))


def _colour_clip(seed=0):
    """Float clip [3, 3, 16, 16] in [0, 1] with unequal channel means (reddish), random pixels."""
    g = torch.Generator().manual_seed(seed)
    low = torch.tensor([0.5, 0.2, 0.0]).view(1, 3, 1, 1)
    return low + 0.5 * torch.rand(3, 3, 16, 16, generator=g)


COLOUR_FACTORS = [0.0, 0.5, 0.8, 1.0, 1.3, 1.7]


@pytest.mark.parametrize("factor", COLOUR_FACTORS)
def test_adjust_brightness_matches_torchvision(factor):
    clip = _colour_clip()
    torch.testing.assert_close(adjust_brightness(clip, factor), TF.adjust_brightness(clip, factor),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("factor", COLOUR_FACTORS)
def test_adjust_contrast_matches_torchvision(factor):
    # Each frame is blended with the mean of its luma (grey level), not with per-channel means.
    clip = _colour_clip()
    torch.testing.assert_close(adjust_contrast(clip, factor), TF.adjust_contrast(clip, factor),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("factor", COLOUR_FACTORS)
def test_adjust_saturation_matches_torchvision(factor):
    clip = _colour_clip()
    torch.testing.assert_close(adjust_saturation(clip, factor), TF.adjust_saturation(clip, factor),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("strength", [0.2, 0.5])
def test_color_jitter_factors_span_one_plus_or_minus_strength(strength):
    draws = torch.tensor([color_jitter_factors(strength, torch.Generator().manual_seed(s))
                          for s in range(500)])  # [500, 3]: brightness, contrast, saturation
    assert draws.min() >= 1 - strength and draws.max() <= 1 + strength
    assert (draws.amin(0) < 1 - 0.9 * strength).all() and (draws.amax(0) > 1 + 0.9 * strength).all()


@pytest.mark.parametrize("strength", [0.2, 0.5])
def test_color_jitter_is_torchvision_brightness_contrast_saturation_with_its_factors(strength):
    clip = _colour_clip()
    for seed in range(20):
        b, c, s = color_jitter_factors(strength, torch.Generator().manual_seed(seed))
        expected = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(clip, b), c), s)
        out = color_jitter(clip, strength, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)



def test_to_float_converts_float_clips_to_float32(rng):
    clip = torch.rand(3, 3, 5, 6, generator=rng, dtype=torch.float64)
    out = to_float(clip)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, clip.float(), rtol=0, atol=0)


def test_to_float_refuses_integer_clips_other_than_uint8():
    with pytest.raises(TypeError) as e:
        to_float(torch.randint(1, 255, (3, 3, 5, 6), dtype=torch.int16))
    assert str(e.value) == "clip must be uint8 or floating point, got torch.int16"


def test_clip_transform_for_training_needs_a_generator():
    with pytest.raises(ValueError) as e:
        ClipTransform(size=8, train=True)(_ramp_clip(h=12, w=12))
    assert str(e.value) == "a training transform needs a torch.Generator (for reproducible draws)"


def test_clip_transform_flip_draws_from_the_generator_only():
    """Same generator seed, different global RNG states: the same clip, flipped or not alike."""
    transform = ClipTransform(size=8, train=True, hflip=True, color_jitter=0.0)
    clip = _ramp_clip(h=12, w=12)
    for seed in range(4):
        outs = []
        for global_seed in range(8):
            torch.manual_seed(global_seed)
            outs.append(transform(clip, torch.Generator().manual_seed(seed)))
        assert all(torch.equal(o, outs[0]) for o in outs[1:]), seed

def test_clip_transform_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\[T, 3, H, W\]"):
        ClipTransform(size=8)(torch.zeros(4, 1, 16, 16, dtype=torch.uint8))



@pytest.mark.parametrize("h,w", [(20, 32), (8, 20), (20, 8), (8, 8)])
def test_center_crop_matches_torchvision(h, w):
    """Even margins (torchvision rounds half a pixel to even), including none on either side."""
    clip = torch.rand(3, 3, h, w) + 0.5
    torch.testing.assert_close(center_crop(clip, 8), TF.center_crop(clip, [8, 8]), rtol=0, atol=0)


@pytest.mark.parametrize("h,w", [(7, 20), (20, 7)])
def test_center_crop_refuses_frames_smaller_than_the_crop_on_either_side(h, w):
    with pytest.raises(ValueError) as e:
        center_crop(torch.rand(3, 3, h, w) + 0.5, 8)
    assert str(e.value) == "cannot crop 8x8 out of %dx%d frames" % (h, w)

def test_sample_generator_depends_on_seed_epoch_and_index():
    draws = {(s, e, i): torch.rand(2, generator=sample_generator(s, e, i)).tolist()
             for s in (0, 1) for e in (0, 1) for i in (0, 1)}
    assert len({tuple(v) for v in draws.values()}) == 8
    assert torch.rand(2, generator=sample_generator(1, 0, 1)).tolist() == draws[(1, 0, 1)]


# --- the synthetic data set --------------------------------------------------------------------

@pytest.mark.parametrize("motion", range(len(MOTIONS)))
def test_synthetic_single_frame_size_is_uniform_whatever_the_class(motion):
    # Each frame's size phase is uniform over [0, 1) for every class: a frame alone says nothing.
    n, frames = 600, 12
    phases = np.stack([size_phase(motion, frames, (k + 0.5) / n) for k in range(n)])  # [n, T]
    for t in range(frames):
        counts = np.histogram(phases[:, t], bins=10, range=(0.0, 1.0))[0]
        assert counts.min() >= n // 10 - 1 and counts.max() <= n // 10 + 1, (t, counts)


def test_synthetic_motion_sets_the_direction_of_size_change():
    steps = {name: np.diff(size_phase(i, 12, 0.3)) for i, name in enumerate(MOTIONS)}
    wrap = lambda d: (d + 0.5) % 1.0 - 0.5  # noqa: E731 (a sawtooth restart is a small step)
    assert (wrap(steps["approach"]) > 0).all() and (wrap(steps["recede"]) < 0).all()
    assert (wrap(steps["approach-fast"]) > wrap(steps["approach"])).all()
    assert np.allclose(steps["still"], 0)
    assert (steps["bounce"] > 0).any() and (steps["bounce"] < 0).any()


def _disc_area(clip):
    """Foreground pixels per frame of an un-normalised, noise-free clip: [T]."""
    background = clip[:, :, 0, 0].view(-1, 3, 1, 1)
    return ((clip - background).abs().sum(1) > 0.3).float().sum((1, 2))


def test_synthetic_rendered_disc_follows_the_class_motion():
    ds = SyntheticVideos(12, num_classes=6, num_frames=10, frame_size=32, noise=0.0, normalize=False)
    for i in range(12):
        clip, label, length = ds[i]
        area = _disc_area(clip)
        steps = area[1:] - area[:-1]
        name = MOTIONS[label]
        if name in ("approach", "approach-fast"):
            assert (steps > 0).sum() >= 6, (name, area)
        elif name in ("recede", "recede-fast"):
            assert (steps < 0).sum() >= 6, (name, area)
        elif name == "still":
            assert (area.max() - area.min()) <= 0.15 * area.mean(), area


def test_synthetic_is_a_function_of_seed_split_epoch_and_index():
    a = SyntheticVideos(8, num_frames=4, frame_size=16, seed=1)
    b = SyntheticVideos(8, num_frames=4, frame_size=16, seed=1)
    assert torch.equal(a[3][0], b[3][0])
    assert not torch.equal(a[3][0], SyntheticVideos(8, num_frames=4, frame_size=16, seed=2)[3][0])
    assert not torch.equal(a[3][0], SyntheticVideos(8, num_frames=4, frame_size=16, seed=1,
                                                    split="val")[3][0])
    a.set_epoch(5)  # no resampling: the epoch changes nothing
    assert torch.equal(a[3][0], b[3][0])
    fresh = SyntheticVideos(8, num_frames=4, frame_size=16, seed=1, resample_each_epoch=True)
    first = fresh[3][0].clone()
    fresh.set_epoch(1)
    assert not torch.equal(first, fresh[3][0]) and fresh[3][1] == a[3][1]


def test_synthetic_items_shapes_and_balanced_labels():
    ds = SyntheticVideos(18, num_classes=6, num_frames=5, frame_size=20)
    clip, label, length = ds[7]
    assert clip.shape == (5, 3, 20, 20) and clip.dtype == torch.float32 and length == 5
    assert [ds[i][1] for i in range(18)] == [i % 6 for i in range(18)]
    assert ds.classes == list(MOTIONS)


def test_synthetic_min_frames_gives_shorter_zero_padded_clips():
    ds = SyntheticVideos(30, num_frames=8, frame_size=16, min_frames=3)
    lengths = [ds[i][2] for i in range(30)]
    assert min(lengths) >= 3 and max(lengths) <= 8 and len(set(lengths)) > 1
    for i in range(30):
        clip, _, length = ds[i]
        assert not clip[length:].any() and clip[length - 1].abs().sum() > 0


@pytest.mark.parametrize("kwargs,match", [
    ({"num_classes": 1}, "num_classes"), ({"num_classes": 7}, "num_classes"),
    ({"split": "dev"}, "split"), ({"num_frames": 2}, "num_frames"),
    ({"min_frames": 20}, "min_frames"), ({"frame_size": 4}, "frame_size"),
])
def test_synthetic_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticVideos(**kwargs)


def test_synthetic_index_out_of_range():
    with pytest.raises(IndexError):
        SyntheticVideos(4)[4]


# --- video files -------------------------------------------------------------------------------

def _frames(n, h=32, w=48, seed=0):
    """uint8 [n, 3, h, w]: smooth random content whose brightness encodes the frame index."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(torch.rand(1, 3, h // 8, w // 8, generator=g),
                                           size=(h, w), mode="bilinear")[0]
    frames = [(base * 80 + 20 * i).clamp(0, 255) for i in range(n)]
    return torch.stack(frames).round().to(torch.uint8)


def test_video_round_trip_through_pyav(tmp_path):
    frames = _frames(10)
    path = str(tmp_path / "clip.mp4")
    write_video(path, frames, fps=10)
    back = read_video_frames(path)
    assert back.shape == frames.shape and back.dtype == torch.uint8
    assert (back.float() - frames.float()).abs().mean() < 2.0


def test_video_frame_range_and_selection(tmp_path):
    frames = _frames(10)
    path = str(tmp_path / "clip.mp4")
    write_video(path, frames)
    part = read_video_frames(path, start=2, end=7, select=lambda n: [0, n - 1])
    assert part.shape[0] == 2
    assert (part.float() - frames[[2, 6]].float()).abs().mean() < 2.0


def test_video_missing_or_broken_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_video_frames(str(tmp_path / "none.mp4"))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    with pytest.raises(RuntimeError, match="broken.mp4"):
        read_video_frames(str(broken))


def test_frame_folder_round_trip_in_natural_order(tmp_path):
    frames = _frames(12)
    write_frame_folder(str(tmp_path / "f"), frames)
    back = read_frame_folder(str(tmp_path / "f"))
    assert torch.equal(back, frames)  # PNG is lossless; frame_10 sorts after frame_9


def test_folder_of_videos_read_as_a_frame_folder_says_how_to_read_them(tmp_path):
    write_video(str(tmp_path / "a.mp4"), _frames(4))
    write_video(str(tmp_path / "b.mp4"), _frames(4))
    with pytest.raises(ClipReadError, match=r"holds 2 video file\(s\).*find_videos"):
        read_frame_folder(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ClipReadError, match=r"no frame images \(.*\) in .*empty$"):
        read_frame_folder(str(empty))


# --- VideoFolder -------------------------------------------------------------------------------

@pytest.fixture
def class_tree(tmp_path):
    """root/{apple,book}/: two mp4 clips per class, plus a frame folder and a 3-frame clip."""
    root = tmp_path / "videos"
    for c, cls in enumerate(["book", "apple"]):
        (root / cls).mkdir(parents=True)
        for k in range(2):
            write_video(str(root / cls / ("clip%d.mp4" % k)), _frames(8, seed=10 * c + k))
    write_frame_folder(str(root / "apple" / "frames_clip"), _frames(6, seed=99))
    write_video(str(root / "book" / "short.mp4"), _frames(3, seed=7))
    (root / "book" / "notes.txt").write_text("not a clip")
    return root


def test_video_folder_classes_records_and_items(class_tree):
    ds = VideoFolder(str(class_tree), num_frames=4,
                     transform=ClipTransform(size=16, mean=(0, 0, 0), std=(1, 1, 1)))
    assert ds.classes == ["apple", "book"]
    assert len(ds) == 6 and sorted(ds.labels) == [0, 0, 0, 1, 1, 1]
    for i in range(len(ds)):
        clip, label, length = ds[i]
        assert clip.shape == (4, 3, 16, 16) and label == ds.records[i].label
    short = [i for i, r in enumerate(ds.records) if r.path.endswith("short.mp4")][0]
    clip, _, length = ds[short]
    assert length == 3 and not clip[3:].any() and clip[:3].abs().sum() > 0


def test_video_folder_training_items_depend_on_epoch_and_are_reproducible(class_tree):
    ds = VideoFolder(str(class_tree), num_frames=4, transform=ClipTransform(size=16, train=True),
                     train=True, seed=3)
    a = ds[0][0]
    assert torch.equal(a, ds[0][0])
    ds.set_epoch(1)
    assert not torch.equal(a, ds[0][0])


def test_video_folder_finds_clips_at_any_depth_of_a_class_folder(class_tree):
    """root/<class>/<session>/<clip>.mp4 (a recording session per folder) and frame folders
    below it are clips of that class, as torchvision's DatasetFolder and `predict` search; a
    frame folder's own sub-folders are not searched."""
    session = class_tree / "apple" / "session1"
    session.mkdir()
    write_video(str(session / "take1.mp4"), _frames(8, seed=5))
    write_frame_folder(str(session / "take2"), _frames(6, seed=6))
    write_frame_folder(str(session / "take2" / "thumbs"), _frames(2, seed=8))
    ds = VideoFolder(str(class_tree), num_frames=4, transform=ClipTransform(size=16))
    apple = sorted(os.path.relpath(r.path, class_tree) for r in ds.records if r.label == 0)
    assert apple == ["apple/clip0.mp4", "apple/clip1.mp4", "apple/frames_clip",
                     "apple/session1/take1.mp4", "apple/session1/take2"]
    assert len(ds) == 8


def test_video_folder_rejects_unknown_class_and_empty_root(class_tree, tmp_path):
    with pytest.raises(ValueError, match="not among"):
        VideoFolder(str(class_tree), classes=["apple"])
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no clips"):
        VideoFolder(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError):
        VideoFolder(str(tmp_path / "nowhere"))


def test_wlasl_annotations_splits_frame_ranges_and_missing_videos(tmp_path, caplog):
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(str(videos / "00001.mp4"), _frames(10, seed=1))
    write_video(str(videos / "00002.mp4"), _frames(10, seed=2))
    write_frame_folder(str(videos / "00003"), _frames(5, seed=3))
    annotations = [
        {"gloss": "book", "instances": [
            {"video_id": "00001", "split": "train", "frame_start": 3, "frame_end": 6},
            {"video_id": "00404", "split": "train", "frame_start": 1, "frame_end": -1}]},
        {"gloss": "drink", "instances": [
            {"video_id": "00002", "split": "val", "frame_start": 1, "frame_end": -1},
            {"video_id": "00003", "split": "train", "frame_start": 1, "frame_end": -1}]},
        {"gloss": "computer", "instances": []},
    ]
    json_file = tmp_path / "WLASL.json"
    json_file.write_text(json.dumps(annotations))
    ds = VideoFolder.from_wlasl(str(json_file), str(videos), split="train", num_frames=4,
                                transform=ClipTransform(size=16))
    assert ds.classes == ["book", "drink", "computer"]
    assert [(os.path.basename(r.path), r.label, r.start, r.end) for r in ds.records] == [
        ("00001.mp4", 0, 2, 6), ("00003", 1, 0, None)]
    assert ds.missing == ["00404"]
    # named in a warning, never left out silently
    warned = [r.getMessage() for r in caplog.records if r.name == "cnnlstm_ext.data"]
    assert len(warned) == 1 and "1 of the train split's listed videos" in warned[0]
    assert "00404" in warned[0] and str(videos) in warned[0]
    # frames 3..6 (1-based, inclusive) are 0-based 2..5: exactly the 4 frames sampled
    raw = ds.load_frames(0)
    assert (raw.float() - _frames(10, seed=1)[2:6].float()).abs().mean() < 2.0
    val = VideoFolder.from_wlasl(str(json_file), str(videos), split="val", max_classes=2)
    assert val.classes == ["book", "drink"] and [r.label for r in val.records] == [1]


def test_wlasl_rejects_other_json(tmp_path):
    f = tmp_path / "x.json"
    f.write_text(json.dumps({"not": "wlasl"}))
    with pytest.raises(ValueError, match="WLASL"):
        VideoFolder.from_wlasl(str(f), str(tmp_path))


def _wlasl_file(tmp_path, instances, name="WLASL.json", prefix=b""):
    """A WLASL file of one gloss, "book", with `instances` (and an empty tmp_path/videos/)."""
    (tmp_path / "videos").mkdir(exist_ok=True)
    json_file = tmp_path / name
    json_file.write_bytes(prefix + json.dumps([{"gloss": "book", "instances": instances}]).encode())
    return str(json_file)


def test_wlasl_null_frame_numbers_mean_the_whole_video(tmp_path):
    json_file = _wlasl_file(tmp_path, [
        {"video_id": "00001", "split": "train", "frame_start": 3, "frame_end": None},
        {"video_id": "00001", "split": "train", "frame_start": None, "frame_end": 4}])
    videos = tmp_path / "videos"
    write_video(str(videos / "00001.mp4"), _frames(6, seed=1))
    records, _, _ = video_folder.read_wlasl(json_file, str(videos), "train")
    assert [(r.start, r.end) for r in records] == [(2, None), (0, 4)]  # null: -1 and 1


def test_wlasl_instance_without_video_id_refuses_the_file_naming_gloss_and_position(tmp_path):
    json_file = _wlasl_file(tmp_path, [
        {"video_id": "00001", "split": "train", "frame_start": 1, "frame_end": -1},
        {"split": "test", "frame_start": 1, "frame_end": -1}])  # another split: still refused
    with pytest.raises(ValueError) as e:
        VideoFolder.from_wlasl(json_file, str(tmp_path), split="train")
    assert str(e.value).startswith(
        "%s: instance 2 of gloss 'book' (counting from 1) has no \"video_id\"" % json_file)


def test_wlasl_finds_videos_whatever_the_case_of_their_extension(tmp_path):
    json_file = _wlasl_file(tmp_path, [
        {"video_id": vid, "split": "train", "frame_start": 1, "frame_end": -1}
        for vid in ("00001", "00002", "00003")])
    videos = tmp_path / "videos"
    write_video(str(videos / "00001.MP4"), _frames(6, seed=1))
    write_video(str(videos / "00002.Mkv"), _frames(6, seed=2), codec="ffv1")
    records, _, missing = video_folder.read_wlasl(json_file, str(videos), "train")
    assert [os.path.basename(r.path) for r in records] == ["00001.MP4", "00002.Mkv"]
    assert missing == ["00003"]


def test_wlasl_clip_without_frames_is_named_in_the_json_frame_numbers(tmp_path):
    json_file = _wlasl_file(tmp_path, [
        {"video_id": "00001", "split": "train", "frame_start": 8, "frame_end": 10},  # past its end
        {"video_id": "00002", "split": "train", "frame_start": 5, "frame_end": -1},  # past its end
        {"video_id": "00001", "split": "train", "frame_start": 4, "frame_end": 2}])  # end < start
    videos = tmp_path / "videos"
    write_video(str(videos / "00001.mp4"), _frames(6, seed=1))
    write_frame_folder(str(videos / "00002"), _frames(4, seed=2))
    ds = VideoFolder.from_wlasl(json_file, str(videos), split="train", num_frames=2,
                                transform=ClipTransform(size=16))
    where = "no frames for gloss 'book', video_id %s of " + json_file
    expected = [(where % "00001") + ": its frame_start 8 is past the end of %s (6 frames)"
                % (videos / "00001.mp4"),
                (where % "00002") + ": its frame_start 5 is past the end of %s (4 frames)"
                % (videos / "00002"),
                (where % "00001") + ": its frame_end 2 is before its frame_start 4"]
    for i, message in enumerate(expected):
        for load in (ds.load_frames, ds.load_canvas):  # the training reader and the cache's
            with pytest.raises(ClipReadError) as e:
                load(i)
            assert str(e.value) == message


def test_wlasl_json_that_does_not_parse_is_named_and_a_bom_is_accepted(tmp_path):
    instances = [{"video_id": "00001", "split": "train", "frame_start": 1, "frame_end": -1}]
    bom = _wlasl_file(tmp_path, instances, "bom.json", prefix=b"\xef\xbb\xbf")
    write_video(str(tmp_path / "videos" / "00001.mp4"), _frames(4, seed=1))
    assert len(VideoFolder.from_wlasl(bom, str(tmp_path / "videos"), split="train")) == 1
    cut = tmp_path / "cut.json"
    cut.write_bytes(open(bom, "rb").read()[:40])
    with pytest.raises(ValueError, match=r"^%s is not valid JSON: Unterminated string"
                       % re.escape(str(cut))):
        VideoFolder.from_wlasl(str(cut), str(tmp_path / "videos"))


def test_build_datasets_holds_out_a_seeded_stratified_fraction(class_tree):
    cfg = DataConfig(dataset="folder", root=str(class_tree), val_fraction=0.34, num_frames=4,
                     frame_size=16)
    train, val, classes = build_datasets(cfg, seed=0)
    assert classes == ["apple", "book"]
    assert sorted(val.labels) == [0, 1] and len(train) == 4
    assert not {r.path for r in train.records} & {r.path for r in val.records}
    assert train.train and not val.train
    again = build_datasets(cfg, seed=0)[1]
    assert [r.path for r in again.records] == [r.path for r in val.records]


def test_loader_workers_do_not_change_the_data(class_tree):
    ds = VideoFolder(str(class_tree), num_frames=4, transform=ClipTransform(size=16, train=True),
                     train=True, seed=1)
    ds.set_epoch(2)
    batches = []
    for workers in (0, 2):
        loader = DataLoader(ds, batch_size=3, num_workers=workers)
        batches.append([b[0] for b in loader])
    for a, b in zip(*batches):
        assert torch.equal(a, b)


def test_evaluation_data_that_does_not_exist_is_named_as_not_found(tmp_path):
    from cnnlstm_ext.data.datasets import build_eval_dataset
    from cnnlstm_ext.train import Config
    with pytest.raises(FileNotFoundError, match=r"^evaluation data not found: .*nope"):
        build_eval_dataset(Config().data, str(tmp_path / "nope"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="expected 'synthetic', a class-per-folder"):
        build_eval_dataset(Config().data, str(tmp_path / "notes.txt"))
