"""Video data sets: class-per-folder and WLASL-style videos, the synthetic set, clip transforms."""
from .batch_transforms import BatchAugment
from .cache import CacheError, ClipCache, build_cache
from .datasets import build_datasets, build_eval_dataset
from .synthetic import MOTIONS, SyntheticVideos
from .transforms import ClipTransform, sample_indices
from .video_folder import VideoFolder
from .video_io import (ClipReadError, read_frame_folder, read_video_frames, write_frame_folder,
                       write_video)

__all__ = ["VideoFolder", "SyntheticVideos", "MOTIONS", "ClipTransform", "sample_indices",
           "build_datasets", "build_eval_dataset", "read_video_frames", "read_frame_folder",
           "write_video", "write_frame_folder", "ClipReadError", "BatchAugment", "ClipCache",
           "CacheError", "build_cache"]
