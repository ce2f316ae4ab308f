"""Train a CNN-LSTM video classifier.

With no arguments this is the main job: a small CNN-LSTM on the built-in synthetic data set
(clips whose class is a motion, generated on the fly), on the CPU, in a few minutes. It leaves
everything in outputs/synthetic/: checkpoints, config.json, train.log, history.csv, TensorBoard
logs, final_metrics.json with the confusion matrix, and summary/ (report and plots).

Your own videos, one folder per class (optionally split into train/ and val/ sub-folders):

    cnnlstm-ext train --data path/to/videos --set model.backbone=resnet18 \\
        --set model.spatial_dim=512 --set model.temporal_dim=512 --set model.num_layers=3 \\
        --set data.frame_size=112 --set data.num_frames=16 --epochs 100 --run-name mine

WLASL-style annotations (a JSON file of glosses and instances; videos in --videos):

    cnnlstm-ext train --data WLASL_v0.3.json --videos videos/ --set data.max_classes=100 ...

Or put all of that in a config file (TOML, YAML or JSON; see configs/ for examples) and run
`cnnlstm-ext train --config run.toml`. Options on the command line override the file; every
field can be set with --set section.key=value (sections: model, data, optim, train).

Continue a run (ours, or a checkpoint of another training script) with --resume FILE. On
several GPUs or nodes, launch with torchrun:

    torchrun --nproc_per_node 4 -m cnnlstm_ext train --config run.toml

The guards: steps with a NaN/Inf loss or gradient are skipped; after train.max_bad_steps in a
row the run rolls back to its last good checkpoint with a lower learning rate; training stops
early when train.monitor (val_acc) has not improved for train.patience epochs.

Ctrl-C, or SIGTERM (what a cluster scheduler sends before it kills a job), stops the run: the
epoch under way is abandoned (a step is never half-applied), latest_checkpoint.pth keeps the last
completed epoch, and the command prints the --resume line that continues the run (exit code 130
for Ctrl-C, 143 for SIGTERM).
"""
import contextlib
import logging
import os
import signal
import sys
import threading



def apply_data_argument(d, data, videos) -> None:
    """--data (and --videos) into the data config d: 'synthetic', a WLASL JSON file (its videos
    in --videos, else a `videos` folder beside it) or a folder of class folders."""
    if data:
        if data == "synthetic":
            d.dataset = "synthetic"
        elif data.lower().endswith(".json"):
            d.dataset, d.annotations = "wlasl", data
            d.root = videos or os.path.join(os.path.dirname(os.path.abspath(data)), "videos")
        else:
            d.dataset, d.root = "folder", data
    elif videos:
        d.root = videos

def add_arguments(parser):
    g = parser.add_argument_group("configuration")
    g.add_argument("--config", metavar="FILE", help="config file (.toml, .yaml, .yml or .json)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config field, e.g. --set optim.lr=3e-4 (repeatable)")
    g = parser.add_argument_group("data")
    g.add_argument("--data", metavar="PATH",
                   help="'synthetic' (default), a folder of class folders, or a WLASL JSON file")
    g.add_argument("--videos", metavar="DIR",
                   help="with a WLASL JSON file: the folder of its videos (default: videos/ beside it)")
    g.add_argument("--num-workers", type=int, metavar="N",
                   help="data loader worker processes (default: min(cores, 8) for video files, "
                        "0 for the synthetic set)")
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=int, metavar="N", help="planned epochs (the cosine schedule spans them)")
    g.add_argument("--batch-size", type=int, metavar="N", help="global batch size")
    g.add_argument("--lr", type=float, metavar="LR", help="learning rate (AdamW)")
    g.add_argument("--patience", type=int, metavar="N",
                   help="early stopping: epochs without improvement (0: off)")
    g.add_argument("--device", metavar="DEV", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                   help="auto (default): bf16 autocast on GPUs, fp32 on the CPU")
    g.add_argument("--seed", type=int, metavar="N", help="seed of weights, data order and data")
    g = parser.add_argument_group("output and resume")
    g.add_argument("--run-name", metavar="NAME", help="run folder name (default: synthetic)")
    g.add_argument("--output-dir", metavar="DIR", help="parent of the run folder (default: outputs)")
    g.add_argument("--overwrite", action="store_true",
                   help="reuse an existing run folder (default: a new -2, -3, ... folder)")
    g.add_argument("--resume", metavar="FILE",
                   help="continue from this checkpoint (ours or a legacy one); by default the "
                        "run continues in the run folder the file lies in")
    g.add_argument("--key-map", action="append", default=[], metavar="OLD=NEW",
                   help="rename a legacy checkpoint's model keys (prefix rule, repeatable); "
                        "default: read off the file")
    g.add_argument("--no-integrity-check", dest="check_integrity", action="store_false",
                   help="--resume without checking the file's checksum record (faster for a "
                        "large file you trust; a damaged file then loads unnoticed)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")


class _TqdmHandler(logging.Handler):
    """Log lines through tqdm.write, so that they do not tear the progress bars."""

    def emit(self, record):
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=sys.stderr)
        except ImportError:
            print(self.format(record), file=sys.stderr)


def setup_logging(quiet: bool = False, rank: int = 0) -> None:
    """Console logging: INFO on rank 0 (WARNING with quiet, and on the other ranks).

    The level sits on the console handler, so that train.log still gets every INFO line.
    """
    logger = logging.getLogger("cnnlstm_ext")
    handler = next((h for h in logger.handlers if isinstance(h, _TqdmHandler)), None)
    if handler is None:
        handler = _TqdmHandler()
        logger.addHandler(handler)
    handler.setFormatter(logging.Formatter("%(message)s" if rank == 0 else
                                           "[rank %d] %%(message)s" % rank))
    handler.setLevel(logging.WARNING if quiet or rank != 0 else logging.INFO)
    logger.setLevel(logging.INFO)


def build_config(args):
    """The Config of this run: defaults < the resumed checkpoint's config < --config < options.

    Returns (config, key_map, explicit_run_dir) where explicit_run_dir says whether the user
    named the run folder.
    """
    from ..checkpoint import normalize_checkpoint, read_checkpoint
    from ..train.config import (Config, absolute_data_paths, apply_dict, apply_overrides,
                                config_from_checkpoint, load_config_file)

    cfg = Config()
    key_map = list(args.key_map) or None
    if args.resume:
        # The file's checksum is checked once, here; Trainer.resume reads it again unchecked.
        ckpt = normalize_checkpoint(read_checkpoint(args.resume, mmap=True,
                                                    check_integrity=args.check_integrity))
        cfg, key_map, ours = config_from_checkpoint(ckpt, key_map)
        if not ours:
            logging.getLogger("cnnlstm_ext.train").info(
                "%s has no config of ours: model read off its weights: %s%s", args.resume,
                cfg.model, "; key map %s" % key_map if key_map else "")
    if args.config:
        apply_dict(cfg, load_config_file(args.config))
    d, t, o = cfg.data, cfg.train, cfg.optim
    apply_data_argument(d, args.data, args.videos)
    if args.num_workers is not None:
        d.num_workers = args.num_workers
    for attr, value in (("epochs", args.epochs), ("batch_size", args.batch_size),
                        ("device", args.device), ("precision", args.precision), ("seed", args.seed),
                        ("run_name", args.run_name), ("output_dir", args.output_dir)):
        if value is not None:
            setattr(t, attr, value)
    if args.patience is not None:
        t.patience = args.patience if args.patience > 0 else None
    if args.lr is not None:
        o.lr = args.lr
    if args.no_progress:
        t.progress = False
    apply_overrides(cfg, args.overrides)
    absolute_data_paths(cfg)
    explicit = bool(args.run_name or args.output_dir or any(
        o.startswith(("train.run_name=", "train.output_dir=")) for o in args.overrides))
    return cfg, key_map, explicit


def _optim_fields_set(args):
    """The optim.* fields the user set (--lr, --set optim.KEY=..., an optim section of --config):
    on --resume of a file without a config of ours, these replace what its optimizer holds."""
    from ..train.config import load_config_file, parse_override

    fields = {"lr"} if args.lr is not None else set()
    if args.config:
        optim = load_config_file(args.config).get("optim")
        fields |= set(optim) if isinstance(optim, dict) else set()
    for item in args.overrides:
        section, key, _ = parse_override(item)
        if section == "optim":
            fields.add(key)
    return fields


def choose_run_dir(cfg, args, explicit: bool) -> None:
    """Where the run writes: a resumed run stays in its folder; a new run never mixes its
    checkpoints with an older run's (unless --overwrite)."""
    t = cfg.train
    if args.resume and not explicit:
        ckpt_dir = os.path.dirname(os.path.abspath(args.resume))
        if os.path.basename(ckpt_dir) == "checkpoints":
            run_dir = os.path.dirname(ckpt_dir)
            t.output_dir, t.run_name = os.path.dirname(run_dir), os.path.basename(run_dir)
            return
    if args.overwrite:
        return
    if args.resume and os.path.abspath(os.path.dirname(args.resume)) == \
            os.path.abspath(os.path.join(t.output_dir, t.run_name, "checkpoints")):
        return  # resuming into the run folder the file came from, named explicitly
    base, n = t.run_name, 1
    while os.path.isdir(os.path.join(t.output_dir, t.run_name, "checkpoints")) and \
            os.listdir(os.path.join(t.output_dir, t.run_name, "checkpoints")):
        n += 1
        t.run_name = "%s-%d" % (base, n)
    if n > 1:
        logging.getLogger("cnnlstm_ext.train").warning(
            "%s already holds a run: writing to %s (--overwrite reuses the folder)",
            os.path.join(t.output_dir, base), os.path.join(t.output_dir, t.run_name))


def run(args) -> int:
    import torch

    from ..checkpoint import CheckpointError
    from ..train.config import validate
    from ..train.distributed import init_distributed, shutdown_distributed
    from ..train.trainer import StopRequested, Trainer

    rank = int(os.environ.get("RANK", "0"))
    setup_logging(args.quiet, rank)
    try:
        cfg, key_map, explicit = build_config(args)
        validate(cfg)
    except (ValueError, OSError, CheckpointError, ImportError) as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    ctx = init_distributed(cfg.train.device)
    try:
        if ctx.is_main:
            choose_run_dir(cfg, args, explicit)
        names = ctx.broadcast_object((cfg.train.output_dir, cfg.train.run_name))
        cfg.train.output_dir, cfg.train.run_name = names
        try:
            trainer = Trainer(cfg, ctx=ctx, resuming=bool(args.resume))
            if args.resume:
                trainer.resume(args.resume, key_map=key_map, optim_changes=_optim_fields_set(args),
                               check_integrity=False)
            if ctx.is_main:
                _create_run_folder(trainer.ckpt_dir)
        except (ValueError, OSError, MemoryError, RuntimeError, CheckpointError) as e:
            hint = ("; the resumed run's config names it (runs before this version kept "
                    "relative paths, read from the current folder): give --data PATH"
                    if args.resume and isinstance(e, FileNotFoundError) else "")
            print("error: %s%s" % (_one_line(e), hint), file=sys.stderr)
            return 2
        try:
            with _stop_on_sigterm(trainer):
                result = trainer.fit()
        except StopRequested as e:
            print("\n%s" % _resume_hint("terminated (%s)" % e.reason, trainer, args),
                  file=sys.stderr)
            return 128 + signal.SIGTERM
        except KeyboardInterrupt:
            print("\n%s" % _resume_hint("interrupted", trainer, args), file=sys.stderr)
            return 130
        except (OSError, MemoryError, torch.OutOfMemoryError) as e:
            # Disk full, a vanished folder, out of memory: the files written before stay whole
            # (every file is written to a temporary name and renamed).
            latest = os.path.join(trainer.ckpt_dir, "latest_checkpoint.pth")
            saved = trainer.saved_epoch
            hint = ("; the checkpoint of epoch %d stays: continue with: cnnlstm-ext train "
                    "--resume %s" % (saved, latest)) if saved and os.path.isfile(latest) else ""
            print("error: %s%s" % (_one_line(e), hint), file=sys.stderr)
            return 1
        if ctx.is_main:
            _print_result(result)
            if result.get("error"):  # the run went on but validated nothing
                print("error: %s" % result["error"], file=sys.stderr)
        return 1 if result["stop_reason"] == "diverged" or result.get("error") else 0
    finally:
        shutdown_distributed(ctx)


def _create_run_folder(path) -> None:
    """Create the run's checkpoint folder before the run starts (the trainer would at its first
    epoch), so that one the system refuses (a path under /proc, a name too long, a folder removed
    meanwhile) is a ValueError saying what could not be created and why, not a bare OSError."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        reason = e.strerror or _one_line(e)
        if e.filename and os.path.abspath(os.fsdecode(e.filename)) != os.path.abspath(path):
            reason += " (%s)" % os.fsdecode(e.filename)
        raise ValueError("cannot create the run folder %s: %s" % (path, reason)) from None


@contextlib.contextmanager
def _stop_on_sigterm(trainer):
    """SIGTERM (what a cluster scheduler sends before it kills a job) asks the trainer to stop at
    the next step boundary; a second SIGTERM acts as the signal's default (ends the process)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        trainer.request_stop("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _resume_hint(what: str, trainer, args) -> str:
    """`what` after epoch N, and the command that continues the run."""
    latest = os.path.join(trainer.ckpt_dir, "latest_checkpoint.pth")
    if trainer.saved_epoch is not None and os.path.isfile(latest):
        return ("%s after epoch %d; continue with: cnnlstm-ext train --resume %s"
                % (what, trainer.saved_epoch, latest))
    if args.resume:
        return ("%s before an epoch ended; continue with: cnnlstm-ext train --resume %s"
                % (what, args.resume))
    return "%s before the first epoch ended; nothing to resume: start the run again" % what


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _print_result(result) -> None:
    run_dir = result["run_dir"]
    m = result.get("final_metrics") or {}
    print("")
    print("run folder     %s" % run_dir)
    n = result["epochs_completed"]
    print("stopped        %s after %d epoch%s" % (result["stop_reason"], n, "" if n == 1 else "s"))
    if result.get("best_epoch") is not None:
        print("best epoch     %d: val acc %.4f, macro-F1 %.4f, top-%d %.4f"
              % (result["best_epoch"], m.get("acc", float("nan")), m.get("f1", float("nan")),
                 m.get("topk", 5), m.get("top5", float("nan"))))
    if result["skipped_steps"] or result["rollbacks"]:
        print("NaN/Inf guard  %d steps skipped, %d rollbacks (learning rate x%g)"
              % (result["skipped_steps"], result["rollbacks"], result["lr_scale"]))
    print("checkpoints    %s" % os.path.join(run_dir, "checkpoints"))
    if result.get("report"):
        print("report         %s" % result["report"])
    if result.get("final_metrics") is not None:
        print("metrics        %s" % os.path.join(run_dir, "final_metrics.json"))
