"""Evaluate a checkpoint on a data set: print accuracy, macro-F1, top-5 and per-class accuracy,
and write the predictions.

    cnnlstm-ext evaluate outputs/synthetic/checkpoints/best_checkpoint.pth synthetic
    cnnlstm-ext evaluate best_checkpoint.pth path/to/videos          (class-per-folder)
    cnnlstm-ext evaluate best_checkpoint.pth WLASL_v0.3.json --split test --videos videos/

DATA is "synthetic" (the run's validation clips; --split test for clips never seen), a folder of
class folders, or a WLASL JSON file. Clips are prepared as in the checkpoint's training config
(frames per clip, frame size, normalisation), without augmentation. A checkpoint of another
training script works too: its architecture is read off its weights.

Writes to --out (default: <run folder>/evaluation/<DATA name>[-<split>]/): predictions.csv (one row per
clip: true class, predicted class, confidence, top-5), metrics.json, confusion_matrix.csv,
per_class_accuracy.csv and confusion_matrix.png.
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
    parser.add_argument("--out", metavar="DIR", help="output folder (see above)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N")
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


def run(args) -> int:
    from torch.utils.data import DataLoader

    from ..checkpoint import CheckpointError, load_checkpoint, normalize_checkpoint, read_checkpoint
    from ..data.datasets import build_eval_dataset
    from ..models import CNNLSTM
    from ..train.guards import nonfinite_tensors
    from ..train.config import apply_overrides, check_output_dir, config_from_checkpoint, validate
    from ..train.distributed import DistContext
    from ..train.trainer import evaluate_model, resolve_device, resolve_precision, write_metrics

    if args.batch_size < 1:
        print("error: --batch-size must be >= 1, got %d" % args.batch_size, file=sys.stderr)
        return 2
    if args.num_workers is not None and args.num_workers < 0:
        print("error: --num-workers must be >= 0, got %d" % args.num_workers, file=sys.stderr)
        return 2
    out = args.out or default_out_dir(args.checkpoint, args.data, args.split)
    try:
        check_output_dir(out, "output folder")
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
        dataset = build_eval_dataset(cfg.data, args.data, classes=classes, seed=seed,
                                     split=args.split, video_root=args.videos)
        classes = list(getattr(dataset, "classes", None) or classes or [])
        model_cfg = dict(cfg.model)
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
        return 1

    try:
        device = resolve_device(args.device, DistContext())
    except RuntimeError as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    amp_dtype = resolve_precision(args.precision, device)
    model.to(device)
    workers = args.num_workers if args.num_workers is not None else cfg.data.num_workers
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    metrics, predictions = evaluate_model(model, loader, device, len(classes), amp_dtype,
                                          collect_predictions=True, progress=not args.no_progress,
                                          desc="evaluate")

    write_metrics(out, metrics, classes, extra={"checkpoint": os.path.abspath(args.checkpoint),
                                                "data": args.data, "split": args.split},
                  json_name="metrics.json")
    paths = [r.path for r in dataset.records] if hasattr(dataset, "records") else None
    with open(os.path.join(out, "predictions.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "clip", "label", "label_name", "prediction", "prediction_name",
                    "confidence", "correct", "top5"])
        for i, p in enumerate(predictions):
            w.writerow([i, paths[i] if paths else "%s[%d]" % (args.data, i), p["label"],
                        classes[p["label"]], p["prediction"], classes[p["prediction"]],
                        "%.6f" % p["confidence"], int(p["label"] == p["prediction"]),
                        " ".join(classes[k] for k in p["topk"])])

    print("%s on %s%s: %d clips" % (args.checkpoint, args.data,
                                    " (%s)" % args.split if args.split else "", metrics["count"]))
    print("accuracy   %.4f" % metrics["acc"])
    print("macro-F1   %.4f" % metrics["f1"])
    print("top-%d      %.4f" % (metrics["topk"], metrics["top5"]))
    print("loss       %.4f" % metrics["loss"])
    print("per class:")
    width = max(len(c) for c in classes)
    for name, acc, row in zip(classes, metrics["per_class_acc"], metrics["confusion"]):
        print("  %-*s  %s  (%d clips)" % (width, name, "-" if acc is None else "%.4f" % acc, sum(row)))
    print("wrote %s" % os.path.join(out, "predictions.csv"))
    return 0
