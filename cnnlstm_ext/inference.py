"""Using a trained model: `load_model`, videos read as K clips each, and class probabilities.

    model = cnnlstm_ext.load_model("outputs/run/checkpoints/best_checkpoint.pth")
    results = predict_videos(model, ["a.mp4", "frames_of_b/"], clips=3)

`load_model` reads any checkpoint this package reads (our `.pth`, another training script's
`.pth`, an exported `.safetensors`) and needs no other file: the weights, the model's settings,
the class names and the preprocessing (frames per clip, frame size, normalisation) all come from
the file.

Multi-clip inference: a model trained here sees T frames spread over the whole video (one frame
per each of T equal segments, at a random place in its segment when training, at the centre when
evaluating). K clips take, in every segment, the frames at fractions (k + 0.5) / K of it, so
together they cover the video uniformly, each clip still spanning the whole video as in training
(windows over parts of the video would show the model what it never saw: half a sign). The
class probabilities of the K clips are averaged. K=1 is the single centred clip of `evaluate`.

A clip is prepared as the run's validation clips were (`data.batch_augment`, on by default): its
frames decoded by swscale to the square canvas of the transform's short side (uint8), then
cropped, resized and normalised by BatchAugment, the functions training calls. A run trained
with data.batch_augment=false validated on full-size frames through ClipTransform; its clips are
prepared that way.
"""
import json
import os
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils.data import Dataset

__all__ = ["load_model", "clip_indices", "VideoClips", "collate_videos", "predict_loader",
           "predict_videos", "find_inputs", "find_videos", "progress_bar", "PREPROCESSING_FIELDS"]

# The data settings a model's input is prepared with (cnnlstm_ext.train.config.DataConfig).
PREPROCESSING_FIELDS = ("num_frames", "frame_size", "resize_to", "mean", "std", "orientation")


def _read_weights(path: str, check_integrity: bool):
    """(state dict, saved config dict or None, class names or None) of a checkpoint file."""
    from .checkpoint import CheckpointError, file_format, normalize_checkpoint, read_checkpoint

    named = str(path).lower().endswith(".safetensors")
    if named and not os.path.isfile(path):
        raise FileNotFoundError("checkpoint not found: %s" % path)
    # safetensors weights by their name or by their content (whatever the file is named)
    if named or (os.path.isfile(path) and file_format(path) == "safetensors"):
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
            config = json.loads(metadata["config"]) if "config" in metadata else None
            classes = json.loads(metadata["classes"]) if "classes" in metadata else None
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError("%s: not a readable safetensors file: %s"
                                  % (path, " ".join(str(e).split()))) from e
        return sd, config, classes
    ckpt = normalize_checkpoint(read_checkpoint(path, map_location="cpu",
                                                check_integrity=check_integrity))
    if ckpt["model_state_dict"] is None:
        raise CheckpointError("%s: no model state dict" % path)
    state = ckpt.get("trainer_state")
    classes = state.get("classes") if isinstance(state, dict) else None
    return ckpt["model_state_dict"], ckpt.get("config"), classes


def load_model(path, device=None, *, key_map=None, check_integrity: bool = True):
    """The `CNNLSTM` a checkpoint holds, weights loaded, in eval mode, on `device` (None: CPU).

    `path`: our `.pth` (its saved config), a `.pth` of another training script (the architecture
    and the key map read off its weights; `key_map` overrides that map), or a `.safetensors` file
    written by `cnnlstm-ext export` (its metadata carries the config and the classes).
    `model.backbone_weights` of a run's config is not read: the checkpoint holds those weights.

    The model carries what inference needs: `model.classes` (class names in output order; the
    class indices as strings when the file does not name them) and `model.preprocessing`
    (num_frames, frame_size, resize_to, mean, std: the run's data settings, the defaults of
    `DataConfig` for a file without our config) and `model.batch_augment` (the run's
    data.batch_augment: which of the two ways of preparing clips it validated with).

    Raises FileNotFoundError, CheckpointError (unreadable file; CheckpointMismatchError listing
    the keys that do not fit), ValueError (weights that are not a CNN-LSTM's).
    """
    from .checkpoint import apply_key_map, strip_prefixes
    from .checkpoint.io import _check_model_fit
    from .models import CNNLSTM, weights_config
    from .train.config import config_from_checkpoint

    path = os.fspath(path)
    state_dict, saved, classes = _read_weights(path, check_integrity)
    state_dict = strip_prefixes(state_dict)
    cfg, key_map, _ = config_from_checkpoint({"config": saved, "model_state_dict": state_dict},
                                             key_map)
    mapped = apply_key_map(state_dict, key_map)
    model_cfg = weights_config(cfg.model)
    if model_cfg.get("num_classes") is None and "classifier.weight" in mapped:
        model_cfg["num_classes"] = int(mapped["classifier.weight"].shape[0])  # [C, D]
    model = CNNLSTM(**model_cfg)
    _check_model_fit(path, model.state_dict(), mapped, True, "CNNLSTM", state_dict)
    model.load_state_dict(mapped)
    if not classes or len(classes) != model_cfg["num_classes"]:
        classes = [str(i) for i in range(model_cfg["num_classes"])]
    model.classes = [str(c) for c in classes]
    model.preprocessing = {k: (list(v) if isinstance(v, tuple) else v)
                           for k, v in ((f, getattr(cfg.data, f)) for f in PREPROCESSING_FIELDS)}
    model.batch_augment = bool(cfg.data.batch_augment)  # how its validation clips were made
    return model.to(torch.device(device) if device is not None else "cpu").eval()


# --- reading videos as clips ----------------------------------------------------------------------

def clip_indices(num_available: int, num_frames: int, clips: int = 1) -> torch.Tensor:
    """Frame indices `[K, T]` of K clips of T frames uniform over a video of `num_available`
    frames (see the module docstring); clip 0 of K=1 is `sample_indices`' centred pick. A video
    of at most T frames gives one clip `[1, num_available]` of all its frames (K copies of it
    would all be the same)."""
    if num_available < 1:
        raise ValueError("a video needs at least one frame, got %d" % num_available)
    if num_frames < 1 or clips < 1:
        raise ValueError("num_frames and clips must be >= 1, got %d and %d" % (num_frames, clips))
    if num_available <= num_frames:
        return torch.arange(num_available)[None]
    seg = num_available / num_frames
    starts = torch.arange(num_frames, dtype=torch.float64) * seg                  # [T]
    offsets = (torch.arange(clips, dtype=torch.float64) + 0.5) / clips * seg      # [K]
    idx = torch.floor(starts[None, :] + offsets[:, None]).long()                 # [K, T]
    return idx.clamp_(0, num_available - 1)


def find_inputs(inputs: Sequence[str]) -> List[tuple]:
    """`(path, None)` for each video file and frame folder that `inputs` (files, folders, glob
    patterns) name, in the order given, each folder's content sorted, and `(input, error)` for an
    input that gives no video: a missing path, a glob with no match, a file that is not a video,
    a folder holding none. A video named twice (a.mp4 and ./a.mp4) comes once.

    A folder is one video (its frames) when it holds images and no video file, at any depth;
    any other folder is searched recursively."""
    import glob

    from .data.video_io import VIDEO_EXTENSIONS, find_clips, is_frame_folder, is_video_file

    def search(root):
        return [root] if is_frame_folder(root) else find_clips(root)

    entries, seen = [], set()
    for item in inputs:
        if os.path.isfile(item):
            if not is_video_file(item):
                entries.append((item, "%s is not a video file (%s) or a folder"
                                % (item, ", ".join(VIDEO_EXTENSIONS))))
                continue
            found = [item]
        elif os.path.isdir(item):
            found = search(item)
            if not found:
                entries.append((item, "%s holds no video files or frame folders" % item))
                continue
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True)
                           if (os.path.isfile(p) and is_video_file(p))
                           or (os.path.isdir(p) and is_frame_folder(p)))
            if not found:
                entries.append((item, "%s matches no video file or frame folder" % item))
                continue
        else:
            entries.append((item, "no such file or folder: %s" % item))
            continue
        for p in found:
            key = os.path.realpath(p)
            if key not in seen:
                seen.add(key)
                entries.append((p, None))
    return entries


def find_videos(inputs: Sequence[str]) -> List[str]:
    """The videos of `find_inputs(inputs)`. Raises FileNotFoundError for an input that names
    nothing (a missing path, a glob with no match, a folder without videos), ValueError for a
    file that is not a video."""
    videos = []
    for path, error in find_inputs(inputs):
        if error is None:
            videos.append(path)
        elif os.path.isfile(path):
            raise ValueError(error)
        else:
            raise FileNotFoundError(error)
    return videos


class VideoClips(Dataset):
    """Videos read as K clips each, prepared as a model's `preprocessing` says.

    Item i: a dict with `index`, `clips` float32 `[k, T, 3, S, S]` (k = K, or 1 for a video of
    at most T frames), `lengths` int64 `[k]` (frames before the zero padding), `label` (or -1),
    and `error`: None, or why the video could not be read (then `clips` is None): a bad file
    never stops the others.

    Args:
        videos: paths (video files or frame folders), or (path, start, end) frame ranges.
        preprocessing: num_frames, frame_size, resize_to, mean, std and orientation (default
            "display") (`model.preprocessing`).
        clips: K.
        labels: optional label per video (evaluation).
        batch_augment: prepare clips as the validation of a run with data.batch_augment on
            (frames decoded to the uint8 canvas, then BatchAugment) or off (full-size frames
            through ClipTransform); None: `preprocessing["batch_augment"]`, else on (the
            default of DataConfig). `model.batch_augment` says which a model was trained with.
    """

    def __init__(self, videos: Sequence, preprocessing: Dict, clips: int = 1,
                 labels: Optional[Sequence[int]] = None, batch_augment: Optional[bool] = None):
        from .data.batch_transforms import BatchAugment
        from .data.transforms import ClipTransform
        from .data.video_io import display_wanted

        if clips < 1:
            raise ValueError("clips must be >= 1, got %d" % clips)
        self.videos = [v if isinstance(v, (tuple, list)) else (v, 0, None) for v in videos]
        self.labels = list(labels) if labels is not None else None
        self.num_frames = int(preprocessing["num_frames"])
        self.orientation = preprocessing.get("orientation", "display")
        display_wanted(self.orientation)  # a ValueError for another value, before any reading
        self.clips = int(clips)
        self.transform = ClipTransform(size=int(preprocessing["frame_size"]),
                                       resize_to=preprocessing.get("resize_to"), train=False,
                                       mean=tuple(preprocessing["mean"]),
                                       std=tuple(preprocessing["std"]))
        if batch_augment is None:
            batch_augment = preprocessing.get("batch_augment", True)
        self.batch_augment = bool(batch_augment)
        self.augment = BatchAugment(self.transform) if self.batch_augment else None

    def __len__(self) -> int:
        return len(self.videos)

    def read(self, index: int):
        """(clips [k, T, 3, S, S], lengths [k]) of video `index`; raises on a bad file."""
        from .data.batch_transforms import canvas_size, draw_params
        from .data.transforms import pad_clip
        from .data.video_io import read_frame_folder, read_video_frames

        path, start, end = self.videos[index]
        picked = {}

        def select(n):  # decode once; convert only the frames some clip uses
            picked["idx"] = clip_indices(n, self.num_frames, self.clips)         # [k, t]
            picked["used"], picked["pos"] = picked["idx"].unique(return_inverse=True)
            return picked["used"].tolist()

        reader = read_frame_folder if os.path.isdir(path) else read_video_frames
        if self.augment is not None:  # as VideoFolder.load_canvas, then BatchAugment
            side = canvas_size(self.transform)
            frames = reader(path, start, end, select, short_side=side, square=True,
                            channels_last=True, orientation=self.orientation)   # [U, C, C, 3]
            clips = frames[picked["pos"]]                                        # [k, t, C, C, 3]
            t = clips.shape[1]
            clips = torch.stack([pad_clip(c, self.num_frames)[0] for c in clips])  # [k, T, C, C, 3]
            params = draw_params(self.transform, clips.shape[2], clips.shape[3], None)  # [8]
            clips = self.augment(clips, params.expand(clips.shape[0], -1))      # [k, T, 3, S, S]
            return clips, torch.full((clips.shape[0],), t, dtype=torch.int64)
        frames = reader(path, start, end, select, orientation=self.orientation)  # [U, 3, H, W]
        frames = self.transform(frames)                                          # [U, 3, S, S]
        clips = frames[picked["pos"]]                                            # [k, t, 3, S, S]
        t = clips.shape[1]
        clips = torch.stack([pad_clip(c, self.num_frames)[0] for c in clips])   # [k, T, 3, S, S]
        return clips, torch.full((clips.shape[0],), t, dtype=torch.int64)

    def __getitem__(self, index: int):
        label = self.labels[index] if self.labels is not None else -1
        try:
            clips, lengths = self.read(index)
        except Exception as e:  # any decoder or image error: reported for this file only
            text = " ".join(str(e).split()) or type(e).__name__
            return {"index": index, "clips": None, "lengths": None, "label": label,
                    "error": text}
        return {"index": index, "clips": clips, "lengths": lengths, "label": label,
                "error": None}


def collate_videos(items):
    """A batch of VideoClips items: every clip of the readable videos in one tensor.

    Returns a dict: `clips` [N, T, 3, S, S] (None when no video of the batch was readable),
    `lengths` [N], `owner` [N] (the position in `index` of each clip's video), `index` [B] and
    `label` [B] of the readable videos, and `errors`: (index, message) of the others.
    """
    good = [it for it in items if it["error"] is None]
    errors = [(it["index"], it["error"]) for it in items if it["error"] is not None]
    if not good:
        return {"clips": None, "lengths": None, "owner": None, "index": [], "label": None,
                "errors": errors}
    counts = [it["clips"].shape[0] for it in good]
    return {"clips": torch.cat([it["clips"] for it in good]),
            "lengths": torch.cat([it["lengths"] for it in good]),
            "owner": torch.repeat_interleave(torch.arange(len(good)), torch.tensor(counts)),
            "index": [it["index"] for it in good],
            "label": torch.tensor([it["label"] for it in good], dtype=torch.int64),
            "errors": errors}


@torch.no_grad()
def predict_loader(model, loader, device=None, amp_dtype: Optional[torch.dtype] = None,
                   progress=None, max_clips: Optional[int] = None):
    """Runs `model` over a DataLoader of VideoClips (collate_fn=collate_videos); yields one
    `(index, probabilities [C] float32 CPU or None, clips, label, error)` per video, batch by
    batch (a batch's unreadable videos first); the probabilities are the mean of the softmax of
    the video's clips.
    `progress`: a tqdm-like bar advanced by the videos of each batch. `max_clips`: the most
    clips one forward call runs (default: the loader's batch size, so a batch of B videos of K
    clips each runs as K calls of B clips, not one of B x K)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    step = max(1, int(max_clips or getattr(loader, "batch_size", None) or 1))
    model.eval()
    for batch in loader:
        for index, error in batch["errors"]:
            yield index, None, 0, None, error
        if batch["clips"] is not None:
            parts = []
            for start in range(0, batch["clips"].shape[0], step):  # at most `step` clips a call
                clips = batch["clips"][start:start + step].to(device, non_blocking=True)
                lengths = batch["lengths"][start:start + step]                   # on the CPU
                full = bool((lengths == clips.shape[1]).all())
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                    enabled=amp_dtype is not None):
                    logits = model(clips, None if full else lengths)             # [n, C]
                parts.append(logits.float().softmax(1).cpu())
            probs = torch.cat(parts)                                             # [N, C]
            owner = batch["owner"]
            B = len(batch["index"])
            sums = torch.zeros(B, probs.shape[1]).index_add_(0, owner, probs)    # [B, C]
            counts = torch.bincount(owner, minlength=B)                          # [B]
            mean = sums / counts[:, None]
            for b, index in enumerate(batch["index"]):
                yield index, mean[b], int(counts[b]), int(batch["label"][b]), None
        if progress is not None:
            progress.update(len(batch["index"]) + len(batch["errors"]))


def progress_bar(total: int, desc: str):
    """A tqdm bar counting `total` videos on stderr, or None without tqdm (bars are optional)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="video", leave=False, dynamic_ncols=True)


def predict_videos(model, videos: Sequence[str], clips: int = 1, topk: int = 5,
                   batch_size: int = 8, num_workers: int = 0, device=None,
                   amp_dtype: Optional[torch.dtype] = None, progress: bool = False):
    """Top-k predictions of `model` (from load_model) for each video file or frame folder.

    Returns one dict per video, in input order: `path`, `clips` (how many were averaged),
    `top` [(class name, probability), ...] (best first; empty for a bad file) and `error`
    (None, or why the file could not be read).
    """
    from torch.utils.data import DataLoader

    dataset = VideoClips(videos, model.preprocessing, clips=clips,
                         batch_augment=getattr(model, "batch_augment", None))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_videos)
    bar = progress_bar(len(dataset), "predict") if progress else None
    k = min(topk, len(model.classes))
    results = [None] * len(dataset)
    try:
        for index, probs, n, _, error in predict_loader(model, loader, device, amp_dtype, bar):
            top = []
            if probs is not None:
                p, c = probs.topk(k)
                top = [(model.classes[int(i)], float(v)) for v, i in zip(p, c)]
            results[index] = {"path": dataset.videos[index][0], "clips": n, "top": top,
                              "error": error}
    finally:
        if bar is not None:
            bar.close()
    return results
