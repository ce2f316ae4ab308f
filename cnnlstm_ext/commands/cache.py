"""Build (or bring up to date) the decoded-clip cache of a training config.

Every clip of the config's training and validation sets is decoded once into uint8 frames at a
stored short side (default: what the transform needs, round(frame_size * 8 / 7) or
data.resize_to) in a folder of memory-mapped files; training with data.cache=FOLDER then reads
its crops out of the cache instead of decoding the videos every epoch:

    cnnlstm-ext cache --config configs/wlasl100.toml --out /data/wlasl-cache
    cnnlstm-ext train --config configs/wlasl100.toml --set data.cache=/data/wlasl-cache

Run it again after adding or changing videos: only those (told by size and mtime) are decoded.
--rebuild decodes every clip again (needed for a cache that is damaged or of another version).
Under torchrun, or with RANK and WORLD_SIZE set, each process decodes its share. The source
videos are only read.
"""
import os
import sys


def add_arguments(parser):
    parser.add_argument("--config", metavar="FILE", help="the training config (.toml, .yaml, .json)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one config field (repeatable)")
    parser.add_argument("--data", metavar="PATH",
                        help="a folder of class folders, or a WLASL JSON file (as train --data)")
    parser.add_argument("--videos", metavar="DIR", help="with a WLASL JSON file: its videos")
    parser.add_argument("--out", metavar="DIR", help="the cache folder (default: data.cache)")
    parser.add_argument("--short-side", type=int, metavar="N",
                        help="stored short side (default: data.cache_short_side, else what the "
                             "transform needs)")
    parser.add_argument("--rebuild", action="store_true", help="decode every clip again")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _config(args):
    from ..train.config import Config, apply_dict, apply_overrides, load_config_file, validate
    from .train import apply_data_argument

    cfg = Config()
    if args.config:
        apply_dict(cfg, load_config_file(args.config))
    d = cfg.data
    apply_data_argument(d, args.data, args.videos)
    apply_overrides(cfg, args.overrides)
    if args.out:
        d.cache = args.out
    if args.short_side is not None:
        d.cache_short_side = args.short_side
    if d.dataset == "synthetic":
        raise ValueError("the clip cache holds video files: give --config with data.dataset=folder "
                         "or wlasl, or --data PATH")
    if not d.cache:
        raise ValueError("no cache folder: give --out DIR or set data.cache")
    validate(cfg)
    return cfg


def run(args) -> int:
    from ..data.batch_transforms import canvas_size
    from ..data.cache import CacheError, ClipCache, build_cache
    from ..data.datasets import build_datasets
    from .train import setup_logging

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    setup_logging(False, rank)
    try:
        cfg = _config(args)
        d = cfg.data
        train, val, _ = build_datasets(d, seed=cfg.train.seed)
        side = d.cache_short_side or canvas_size(train.transform)
        records = list(train.records) + list(val.records)
        summary = build_cache(d.cache, records, side, rebuild=args.rebuild or d.cache_rebuild,
                              rank=rank, world_size=world, progress=not args.no_progress,
                              orientation=d.orientation)
        cache = ClipCache(d.cache)
    except (ValueError, OSError, CacheError, ImportError) as e:
        print("error: %s" % " ".join(str(e).split()), file=sys.stderr)
        return 2
    if rank == 0:
        clips_dir = os.path.join(d.cache, "clips")
        size = sum(os.path.getsize(os.path.join(clips_dir, n)) for n in os.listdir(clips_dir)
                   if n.endswith(".clip"))
        print("clip cache     %s" % d.cache)
        decoded = sum(1 for e in cache.entries.values() if "error" not in e)
        print("clips          %d of this config (%d decoded in the cache), short side %d"
              % (summary["entries"], decoded, side))
        print("decoded now    %d in %.1f s%s" % (summary["built"], summary["seconds"],
                                                  " (this process's share of %d)" % world
                                                  if world > 1 else ""))
        print("size           %.1f MB" % (size / 1e6))
        unreadable = cache.unreadable(records)
        if unreadable:
            print("unreadable     %d (training skips them; retried when their file changes)%s"
                  % (unreadable, "; see the warnings above" if summary["failed"] else ""))
        print("train with     --set data.cache=%s" % d.cache)
    return 0
