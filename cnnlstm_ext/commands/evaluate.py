"""Evaluate a checkpoint on a data set: print accuracy, macro-F1, top-5 and per-class accuracy,
and write the predictions.

    cnnlstm-ext evaluate outputs/synthetic/checkpoints/best_checkpoint.pth synthetic
    cnnlstm-ext evaluate best_checkpoint.pth path/to/videos          (class-per-folder)
    cnnlstm-ext evaluate best_checkpoint.pth WLASL_v0.3.json --split test --videos videos/

DATA is "synthetic" (the run's validation clips; --split test for clips never seen), a folder of
class folders, or a WLASL JSON file. Clips are prepared as in the checkpoint's training config
(frames per clip, frame size, normalisation), without augmentation, exactly as the run's
validation prepared them (with data.batch_augment, the default: decoded to the uint8 canvas,
then cropped and normalised by BatchAugment; without it, full-size frames through ClipTransform). A checkpoint of another
training script works too: its architecture is read off its weights.

On the data the run trained on (its data.root, its WLASL file, or a folder holding some of its
recorded validation clips) only the run's validation clips are scored, as the first lines say:
the clips the checkpoint records (a held-out data.val_fraction; those DATA holds, the missing
ones counted), else the run's val split. --all scores every clip of every split, training clips
included (every instance of a WLASL file; train/, val/ and any other split folder of class
folders, e.g. test/). Any other DATA is scored whole (a folder holding none of the recorded
clips, saying so).

--clips K reads each video as K clips spread uniformly over it and averages their class
probabilities (as `cnnlstm-ext predict`); the model runs at most --batch-size clips per call. A
video that cannot be read is reported on stderr and left out of the metrics (exit status 1; an
error while the model runs, such as running out of memory, is one error line, exit 1). Exit
status 2: bad options or data, an unusable checkpoint (unreadable, NaN/Inf weights), or no video
that could be read (then nothing is written).

Writes to --out (default: <run folder>/evaluation/<DATA name>[-<split>]/, -val or -all on the
run's data): predictions.csv (one row per clip: true class, predicted class, confidence, top-5,
and the clip's frames as WLASL numbers them: frame_start 1-based, frame_end inclusive or -1),
metrics.json, confusion_matrix.csv, per_class_accuracy.csv and confusion_matrix.png, each file
replaced whole.
"""
import csv
import os
import sys


def add_arguments(parser):
    parser.add_argument("checkpoint", help="checkpoint file (.pth)")
    parser.add_argument("data", help="'synthetic', a folder of class folders, or a WLASL JSON file")
    parser.add_argument("--split", help="WLASL split (default: the config's val split), a "
                                        "sub-folder of DATA, or 'test' for the synthetic set")
    parser.add_argument("--videos", metavar="DIR", help="with a WLASL JSON file: its videos")
    parser.add_argument("--all", dest="all_clips", action="store_true",
                        help="on the data the run trained on: score every clip of every split, "
                             "training clips included (default: the run's validation clips "
                             "only)")
    parser.add_argument("--clips", type=int, default=1, metavar="K",
                        help="clips per video, uniform over it, probabilities averaged (default 1)")
    parser.add_argument("--out", metavar="DIR", help="output folder (see above)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N",
                        help="videos per batch, and the most clips per model call (default 16)")
    parser.add_argument("--num-workers", type=int, default=None, metavar="N")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--key-map", action="append", default=[], metavar="OLD=NEW",
                        help="rename the checkpoint's model keys (default: read off the file)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override a config field (e.g. data.num_frames=16)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-integrity-check", dest="check_integrity", action="store_false",
                        help="skip the check of the checkpoint's checksum record (faster for a "
                             "large file you trust; a damaged file then loads unnoticed)")


def default_out_dir(checkpoint: str, data: str, split=None) -> str:
    """<run folder>/evaluation/<data name>[-<split>] (the run folder holds checkpoints/)."""
    ckpt_dir = os.path.dirname(os.path.abspath(checkpoint))
    run_dir = os.path.dirname(ckpt_dir) if os.path.basename(ckpt_dir) == "checkpoints" else ckpt_dir
    name = os.path.splitext(os.path.basename(os.path.normpath(data)))[0] or "data"
    return os.path.join(run_dir, "evaluation", name + ("-" + split if split else ""))


def _same_path(a, b) -> bool:
    try:
        return bool(a and b) and os.path.samefile(a, b)
    except OSError:
        return False


def _relative(path, root) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.abspath(root)).replace(os.sep, "/")


def recorded_clips_held(data, recorded):
    """The clips of the checkpoint's record (`trainer_state.val_split`) that folder `data` holds:
    the file exists and, where the record has their sizes (`sizes`, bytes), is that size."""
    sizes = recorded.get("sizes")
    sizes = sizes if isinstance(sizes, list) and len(sizes) == len(recorded["clips"]) else None
    held = []
    for i, clip in enumerate(recorded["clips"]):
        path = os.path.join(data, clip)
        try:
            if sizes is not None and os.path.isfile(path) and os.path.getsize(path) != sizes[i]:
                continue
        except OSError:
            continue
        if os.path.exists(path):
            held.append(clip)
    return held


def _other_splits(d, classes):
    """(name, records) of the split folders of a folder layout other than its train and val
    ones (e.g. test/): the sub-folders of d.root whose class folders are the run's classes."""
    from ..data.video_folder import scan_class_folders

    found = []
    for name in sorted(os.listdir(d.root)):
        folder = os.path.join(d.root, name)
        if name.startswith(".") or name in (d.train_split, d.val_split) or not os.path.isdir(folder):
            continue
        try:
            records, _ = scan_class_folders(folder, classes)
        except (ValueError, OSError):
            continue  # not a split of class folders
        found.append((name, records))
    return found


def run_data(cfg, data, split=None, all_clips=False, val_split=None, video_root=None):
    """(records, classes, note) when DATA is the data the run trained on, else None, or
    (None, None, note) for a folder that holds none of the checkpoint's recorded validation
    clips (scored whole; the note says so).

    records: the run's validation clips (those `val_split`, the checkpoint's record, lists when
    it has one, and DATA holds; else the validation set the run's config makes of DATA), or
    every clip of every split with `all_clips`; note: the line that says which.
    """
    import copy

    from ..data.datasets import build_datasets
    from ..data.video_folder import read_wlasl

    d = copy.deepcopy(cfg.data)
    recorded = val_split if isinstance(val_split, dict) and val_split.get("clips") else None
    if split is not None or data == "synthetic":
        return None
    held = None
    if d.dataset == "folder" and os.path.isdir(data):
        same_root = _same_path(data, d.root) or (recorded and _same_path(data, recorded["root"]))
        if not same_root:
            if not recorded:
                return None
            held = recorded_clips_held(data, recorded)
            if not held:
                return None, None, ("scoring every clip of %s: it holds none of the run's %d "
                                    "recorded validation clips" % (data, len(recorded["clips"])))
        d.root = data
    elif d.dataset == "wlasl" and (_same_path(data, d.annotations) or _same_path(data, d.root)):
        if os.path.isfile(data):
            d.annotations, d.root = data, video_root or d.root
    else:
        return None
    train, val, classes = build_datasets(d, seed=cfg.train.seed)
    everything = list(train.records) + list(val.records)
    if all_clips:
        splits = ""
        if d.dataset == "wlasl":  # every instance of the file, whatever its split
            everything = read_wlasl(d.annotations, d.root, None, d.max_classes)[0]
            names = _wlasl_splits(d.annotations, d.max_classes)
            splits = " (splits %s)" % ", ".join(names) if names else ""
        elif os.path.isdir(os.path.join(d.root, d.val_split)) and os.path.isdir(
                os.path.join(d.root, d.train_split)):
            others = _other_splits(d, classes)
            for _, records in others:
                everything += records
            splits = " (split folders %s)" % ", ".join(
                [d.train_split, d.val_split] + [name for name, _ in others])
        return everything, classes, ("scoring all %d clips of the data the run trained on%s, "
                                     "training clips included (--all)" % (len(everything), splits))
    if d.dataset == "folder" and recorded and not os.path.isdir(os.path.join(d.root, d.val_split)):
        wanted = set(held if held is not None else recorded["clips"])
        records = [r for r in everything if _relative(r.path, d.root) in wanted]
        note = ("scoring the run's %d validation clips (recorded in the checkpoint) of the %d "
                "clips in %s; --all scores every clip" % (len(records), len(everything), data))
        missing = len(recorded["clips"]) - len(records)
        if missing:
            note += "; %d recorded clips are not there" % missing
        if not records:
            raise ValueError("%s holds none of the run's %d validation clips (e.g. %s)"
                             % (data, len(recorded["clips"]), recorded["clips"][0]))
        return records, classes, note
    records = list(val.records)
    if d.dataset == "folder" and not os.path.isdir(os.path.join(d.root, d.val_split)):
        how = ("the checkpoint records no split: held out again with data.val_fraction=%s and "
               "train.seed=%d" % (d.val_fraction, cfg.train.seed))
    else:
        how = "its %r split" % d.val_split
    return records, classes, ("scoring the run's %d validation clips (%s) of the %d clips it "
                              "trained on; --all scores every clip" % (len(records), how,
                                                                       len(everything)))


def _wlasl_splits(annotations, max_classes):
    """The split names of a WLASL file's instances, sorted."""
    from ..data.video_folder import read_wlasl_entries

    entries = read_wlasl_entries(annotations, max_classes)
    return sorted({str(i.get("split")) for e in entries for i in e.get("instances") or []
                   if i.get("split") is not None})


def run(args) -> int:
    from torch.utils.data import DataLoader

    from ..checkpoint import CheckpointError, load_checkpoint, normalize_checkpoint, read_checkpoint
    from ..data.datasets import build_eval_dataset
    from ..models import CNNLSTM, weights_config
    from ..train.guards import nonfinite_tensors
    from ..train.config import apply_overrides, check_output_dir, config_from_checkpoint, validate
    from ..train.distributed import DistContext
    from ..train.trainer import evaluate_model, resolve_device, resolve_precision

    for name, value in (("--batch-size", args.batch_size), ("--clips", args.clips)):
        if value < 1:
            print("error: %s must be >= 1, got %d" % (name, value), file=sys.stderr)
            return 2
    if args.num_workers is not None and args.num_workers < 0:
        print("error: --num-workers must be >= 0, got %d" % args.num_workers, file=sys.stderr)
        return 2
    try:
        if args.out:
            check_output_dir(args.out, "output folder")
        # The file's checksum is checked once, here; the load below reads it again unchecked.
        peek = normalize_checkpoint(read_checkpoint(args.checkpoint, mmap=True,
                                                    check_integrity=args.check_integrity))
        cfg, key_map, _ = config_from_checkpoint(peek, list(args.key_map) or None)
        apply_overrides(cfg, args.overrides)
        validate(cfg)
        state = peek.get("trainer_state") if isinstance(peek.get("trainer_state"), dict) else {}
        classes = state.get("classes")
        seed = cfg.train.seed
        del peek
        if args.all_clips and args.data == "synthetic":
            raise ValueError("--all: the synthetic training clips are drawn afresh every epoch; "
                             "score the validation clips (the default) or --split test")
        if args.clips > 1 and args.data == "synthetic":
            raise ValueError("--clips %d: synthetic clips are generated at data.num_frames; "
                             "multi-clip evaluation needs videos" % args.clips)
        ours = run_data(cfg, args.data, args.split, args.all_clips, state.get("val_split"),
                        args.videos)
        note = None
        if ours is not None and ours[0] is None:  # a folder without the recorded clips
            note, ours = ours[2], None
        if ours is not None:
            records, data_classes, note = ours
            if classes and list(data_classes) != list(classes):
                raise ValueError("the run's classes (%s...) differ from those of %s (%s...)"
                                 % (", ".join(classes[:5]), args.data,
                                    ", ".join(data_classes[:5])))
            classes = list(data_classes)
            dataset = None
        else:
            dataset = build_eval_dataset(cfg.data, args.data, classes=classes, seed=seed,
                                         split=args.split, video_root=args.videos)
            records = getattr(dataset, "records", None)
            classes = list(getattr(dataset, "classes", None) or classes or [])
        split_name = args.split or (None if ours is None else "all" if args.all_clips else "val")
        out = args.out or default_out_dir(args.checkpoint, args.data, split_name)
        check_output_dir(out, "output folder")
        model_cfg = weights_config(cfg.model)  # the checkpoint holds the backbone's weights
        if model_cfg.get("num_classes") is None:
            model_cfg["num_classes"] = len(classes)
        if classes and len(classes) != model_cfg["num_classes"]:
            raise ValueError("the checkpoint's model has %d classes, the data %d (%s...)"
                             % (model_cfg["num_classes"], len(classes), ", ".join(classes[:5])))
        if not classes:
            classes = [str(i) for i in range(model_cfg["num_classes"])]
        model = CNNLSTM(**model_cfg)
        load_checkpoint(args.checkpoint, model=model, key_map=key_map, check_integrity=False)
    except (ValueError, OSError, MemoryError, CheckpointError) as e:
        print("error: %s" % " ".join(str(e).split()), file=sys.stderr)
        return 2
    bad = nonfinite_tensors(model.state_dict().items())
    if bad:  # every metric would be NaN or meaningless: refuse, as verify does
        print("error: %s holds NaN/Inf weights in %d tensor%s (%s%s): nothing to evaluate; "
              "`cnnlstm-ext verify` finds the sound checkpoints of its run"
              % (args.checkpoint, len(bad), "s" if len(bad) > 1 else "", ", ".join(bad[:3]),
                 ", ..." if len(bad) > 3 else ""), file=sys.stderr)
        return 2  # an unusable checkpoint, as for predict

    try:
        device = resolve_device(args.device, DistContext())
    except RuntimeError as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    if note:
        print(note)
    amp_dtype = resolve_precision(args.precision, device)
    model.to(device)
    from ..data.loader import resolve_num_workers
    workers = args.num_workers if args.num_workers is not None else resolve_num_workers(cfg.data)
    unreadable = []
    try:
        if records is not None:  # videos: read as --clips clips each; a bad file is left out
            metrics, predictions, unreadable, scored = _evaluate_videos(
                model, records, cfg.data, len(classes), args, device, amp_dtype, workers)
            paths = [r.path for r in scored]
            frames = [_wlasl_frames(r) for r in scored]
            for r, error in unreadable:  # the range and annotation tell instances of a file apart
                first, last = _wlasl_frames(r)
                where = "" if (r.start, r.end) == (0, None) else " (frames %d to %s)" % (
                    first, "the end" if last == -1 else last)
                if r.annotation:
                    where += " (%s)" % r.annotation
                print("error: %s%s: %s" % (r.path, where, error), file=sys.stderr)
        else:
            loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                num_workers=workers, pin_memory=device.type == "cuda")
            metrics, predictions = evaluate_model(model, loader, device, len(classes), amp_dtype,
                                                  collect_predictions=True,
                                                  progress=not args.no_progress, desc="evaluate")
            paths = ["%s[%d]" % (args.data, i) for i in range(len(predictions))]
            frames = [("", "")] * len(predictions)
    except RuntimeError as e:  # out of memory, a loader process that died: one line
        from ..ops import KernelsNotBuiltError
        if isinstance(e, KernelsNotBuiltError):
            raise  # the CLI's own line, naming the build command
        print("error: evaluation failed: %s" % (" ".join(str(e).split()) or type(e).__name__),
              file=sys.stderr)
        return 1
    if not predictions:
        print("error: no video could be read (%d unreadable, named above): nothing to score, "
              "no metrics written" % len(unreadable) if unreadable else
              "error: %s holds no clips to score" % args.data, file=sys.stderr)
        return 2

    _write_outputs(out, metrics, classes, {
        "checkpoint": os.path.abspath(args.checkpoint), "data": args.data, "split": args.split,
        "scored": note or "every clip of DATA", "clips_per_video": args.clips,
        "unreadable": [dict(zip(("clip", "frame_start", "frame_end", "error"),
                                (r.path, *_wlasl_frames(r), error))) for r, error in unreadable]},
        paths, frames, predictions)

    print("%s on %s%s: %d clips%s" % (
        args.checkpoint, args.data, " (%s)" % args.split if args.split else "", metrics["count"],
        ", %d per video" % args.clips if args.clips > 1 else ""))
    if unreadable:
        print("%d unreadable video%s left out (listed on stderr)"
              % (len(unreadable), "s" if len(unreadable) > 1 else ""))
    print("accuracy   %.4f" % metrics["acc"])
    print("macro-F1   %.4f" % metrics["f1"])
    print("top-%d      %.4f" % (metrics["topk"], metrics["top5"]))
    if metrics["loss"] is not None:
        print("loss       %.4f" % metrics["loss"])
    print("per class:")
    width = max(len(c) for c in classes)
    for name, acc, row in zip(classes, metrics["per_class_acc"], metrics["confusion"]):
        print("  %-*s  %s  (%d clips)" % (width, name, "-" if acc is None else "%.4f" % acc, sum(row)))
    print("wrote %s" % os.path.join(out, "predictions.csv"))
    return 1 if unreadable else 0


def _write_outputs(out, metrics, classes, extra, paths, frames, predictions) -> None:
    """metrics.json, predictions.csv and write_metrics' tables and plot in `out`, each file
    replaced whole (written beside it, then renamed over it): an interrupted run leaves the
    previous file or the new one, never a partial one."""
    import io
    import shutil
    import tempfile

    from ..checkpoint import atomic_write
    from ..train.trainer import write_metrics

    os.makedirs(out, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".evaluate-", dir=out)
    try:
        write_metrics(staging, metrics, classes, extra=extra, json_name="metrics.json")
        text = io.StringIO()
        w = csv.writer(text)
        w.writerow(["index", "clip", "label", "label_name", "prediction", "prediction_name",
                    "confidence", "correct", "top5", "frame_start", "frame_end"])
        for i, (path, (first, last), p) in enumerate(zip(paths, frames, predictions)):
            w.writerow([i, path, p["label"], classes[p["label"]], p["prediction"],
                        classes[p["prediction"]], "%.6f" % p["confidence"],
                        int(p["label"] == p["prediction"]),
                        " ".join(classes[k] for k in p["topk"]), first, last])
        data = text.getvalue().encode("utf-8")
        atomic_write(os.path.join(out, "predictions.csv"), lambda f: f.write(data))
        for name in sorted(os.listdir(staging)):
            with open(os.path.join(staging, name), "rb") as f:
                content = f.read()
            atomic_write(os.path.join(out, name), lambda f, c=content: f.write(c))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _wlasl_frames(record):
    """(frame_start, frame_end) of a clip in WLASL's numbering (1-based, inclusive, -1: to the
    end), as predictions.csv gives them: instances cut out of one video share its path."""
    return record.start + 1, -1 if record.end is None else record.end


def _evaluate_videos(model, records, data_cfg, num_classes, args, device, amp_dtype, workers):
    """(metrics, predictions, unreadable [(record, error)], the records scored) of `records`
    read as args.clips clips each, their class probabilities averaged per video."""
    import torch
    from torch.utils.data import DataLoader

    from ..inference import (PREPROCESSING_FIELDS, VideoClips, collate_videos, predict_loader,
                             progress_bar)
    from ..train.metrics import ClassificationMeter

    prep = {f: getattr(data_cfg, f) for f in PREPROCESSING_FIELDS}
    dataset = VideoClips([(r.path, r.start, r.end) for r in records], prep, clips=args.clips,
                         labels=[r.label for r in records],
                         batch_augment=data_cfg.batch_augment)  # as the run validated
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                        num_workers=min(workers, len(dataset)), collate_fn=collate_videos)
    bar = None if args.no_progress else progress_bar(len(dataset), "evaluate")
    done, unreadable = {}, []
    try:
        for index, probs, _, label, error in predict_loader(model, loader, device, amp_dtype, bar):
            if error is not None:
                unreadable.append((records[index], error))
            else:
                done[index] = (probs, label)
    finally:
        if bar is not None:
            bar.close()
    meter = ClassificationMeter(num_classes)
    order = sorted(done)
    predictions = []
    if order:
        # log of the mean probability: the loss and the ranking of the averaged prediction
        logp = torch.stack([done[i][0] for i in order]).clamp_min(1e-12).log()    # [N, C]
        labels = torch.tensor([done[i][1] for i in order])                        # [N]
        meter.update(logp, labels, torch.nn.functional.nll_loss(logp, labels, reduction="sum"))
        conf, pred = logp.exp().max(1)
        top = logp.topk(min(5, num_classes), dim=1).indices
        predictions = [{"label": int(labels[j]), "prediction": int(pred[j]),
                        "confidence": float(conf[j]), "topk": top[j].tolist()}
                       for j in range(len(order))]
    return meter.compute(), predictions, unreadable, [records[i] for i in order]
