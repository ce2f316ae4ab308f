"""Classify videos with a trained checkpoint: the top-k classes and their probabilities per video.

    cnnlstm-ext predict outputs/my-videos/checkpoints/best_checkpoint.pth clip.mp4
    cnnlstm-ext predict best_checkpoint.pth new_videos/ --clips 5 --top 3
    cnnlstm-ext predict model.safetensors 'incoming/**/*.mp4' --json > predictions.json

Inputs are video files, folders of frame images (one video), folders (searched recursively for
both) and glob patterns. Each video is read as --clips K clips spread uniformly over it and the
class probabilities of its clips are averaged (K=1: the centred clip `evaluate` uses); frames
per clip, frame size and normalisation are the checkpoint's. Videos are decoded by --num-workers
processes, --batch-size videos at a time, and run through the model at most --batch-size clips
per call.

Output on stdout: a table (default), --json (a list of {path, clips, predictions: [{class,
probability}], error}) or --csv (path, clips, top1, p1, ..., error). A file that cannot be read
gets its error (and a line on stderr) while the other videos still get predictions, as does an
input that gives no video (a missing path, a glob with no match, a file that is not a video, a
folder without videos); the exit status is then 1 (0: every video predicted, 2: nothing to
predict, bad options or an unusable checkpoint: unreadable, NaN/Inf weights, or not a checkpoint,
e.g. the .pt2 program of `export --pt2`, which runs with torch.export.load(path).module()).
A folder is one video of frames when it holds
images and no video file at any depth; otherwise it is searched. A video named twice comes once.
"""
import csv
import json
import os
import sys


def add_arguments(parser):
    parser.add_argument("checkpoint", help="checkpoint (.pth, or .safetensors from export; "
                                           "not a .pt2 program)")
    parser.add_argument("inputs", nargs="+", metavar="VIDEO|FOLDER|GLOB",
                        help="video files, frame folders, folders to search, glob patterns")
    parser.add_argument("--top", type=int, default=5, metavar="K",
                        help="classes to show per video (default 5)")
    parser.add_argument("--clips", type=int, default=1, metavar="K",
                        help="clips per video, uniform over it, probabilities averaged (default 1)")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="JSON on stdout instead of a table")
    out.add_argument("--csv", action="store_true", help="CSV on stdout instead of a table")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N",
                        help="videos decoded per batch, and the most clips per model call (default 8)")
    parser.add_argument("--num-workers", type=int, default=None, metavar="N",
                        help="decoding processes (default: min(4, CPU count); 0: in this one)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--key-map", action="append", default=[], metavar="OLD=NEW",
                        help="rename the checkpoint's model keys (default: read off the file)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-integrity-check", dest="check_integrity", action="store_false",
                        help="skip the check of the checkpoint's checksum record")


def _error(text: str) -> None:
    print("error: %s" % " ".join(str(text).split()), file=sys.stderr)


def run(args) -> int:
    from ..checkpoint import CheckpointError, nonfinite_tensors
    from ..inference import find_inputs, load_model, predict_videos
    from ..train.distributed import DistContext
    from ..train.trainer import resolve_device, resolve_precision

    for name, value, low in (("--top", args.top, 1), ("--clips", args.clips, 1),
                             ("--batch-size", args.batch_size, 1)):
        if value < low:
            _error("%s must be >= %d, got %d" % (name, low, value))
            return 2
    if args.num_workers is not None and args.num_workers < 0:
        _error("--num-workers must be >= 0, got %d" % args.num_workers)
        return 2
    entries = find_inputs(args.inputs)
    videos = [path for path, error in entries if error is None]
    if not videos:  # nothing to predict: each input's reason, then exit 2
        for _, error in entries:
            _error(error)
        return 2
    try:
        device = resolve_device(args.device, DistContext())
        model = load_model(args.checkpoint, device, key_map=list(args.key_map) or None,
                           check_integrity=args.check_integrity)
    except (ValueError, OSError, RuntimeError, CheckpointError) as e:
        _error(e)
        return 2
    bad = nonfinite_tensors(model.state_dict().items())
    if bad:
        _error("%s holds NaN/Inf weights in %d tensors (%s): its predictions would be meaningless"
               % (args.checkpoint, len(bad), ", ".join(bad[:3])))
        return 2
    workers = args.num_workers if args.num_workers is not None else min(4, os.cpu_count() or 1)
    try:
        predicted = predict_videos(model, videos, clips=args.clips, topk=args.top,
                                   batch_size=args.batch_size,
                                   num_workers=min(workers, len(videos)),
                                   amp_dtype=resolve_precision(args.precision, device),
                                   progress=not args.no_progress)
    except RuntimeError as e:  # out of memory, a decoding worker that died: one line
        from ..ops import KernelsNotBuiltError
        if isinstance(e, KernelsNotBuiltError):
            raise  # the CLI's own line, naming the build command
        _error("prediction failed: %s" % (" ".join(str(e).split()) or type(e).__name__))
        return 1
    predicted = iter(predicted)
    results = [next(predicted) if error is None
               else {"path": path, "clips": 0, "top": [], "error": error}
               for path, error in entries]
    for r in results:
        if r["error"]:
            _error(r["error"] if r["clips"] == 0 and r["path"] in r["error"]
                   else "%s: %s" % (r["path"], r["error"]))
    if args.json:
        json.dump([{"path": r["path"], "clips": r["clips"],
                    "predictions": [{"class": c, "probability": p} for c, p in r["top"]],
                    "error": r["error"]} for r in results], sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.csv:
        k = min(args.top, len(model.classes))
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(["path", "clips"] + [f for i in range(1, k + 1) for f in ("top%d" % i,
                                                                               "p%d" % i)]
                   + ["error"])
        for r in results:
            cells = [x for c, p in r["top"] for x in (c, "%.6f" % p)]
            w.writerow([r["path"], r["clips"]] + cells + [""] * (2 * k - len(cells))
                       + [r["error"] or ""])
    else:
        _print_table(results)
    return 1 if any(r["error"] for r in results) else 0


def _print_table(results) -> None:
    width = max(len(r["path"]) for r in results)
    for r in results:
        if r["error"]:
            text = "error: %s" % r["error"]
        else:
            text = "  ".join("%s %.3f" % (c, p) for c, p in r["top"])
        print("%-*s  %s" % (width, r["path"], text))
