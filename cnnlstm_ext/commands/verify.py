"""Check checkpoint files: exits 0 when every file is sound, 1 when any is not, saying why.

A file is not sound when it is truncated or corrupt (no zip end record, a CRC error, unreadable),
has no model or optimizer state, has optimizer moments that do not match the parameters' shapes,
holds NaN/Inf in weights or moments, records a NaN/Inf train loss, or holds another epoch than its
name says. For a folder, files whose size is far from their siblings' median are also noted.
Every tensor is read once (memory-mapped, one file at a time).

A .safetensors file of `cnnlstm-ext export --safetensors` (recognised by its content) is sound when
its header reads, every tensor's bytes lie within the file and fit its dtype and shape, the
metadata export writes (epoch, metrics, parameter count, classes, config) is well formed and fits
the tensors, and no tensor holds NaN/Inf.
"""
import os
import pathlib
import statistics
import sys

from ..checkpoint import find_checkpoints, verify_checkpoint

_SIZE_TOLERANCE = 0.02


def add_arguments(parser):
    parser.add_argument("path", help="a checkpoint file (or a .safetensors export) or a folder "
                                     "of them")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the bad files")


def run(args) -> int:
    if os.path.isdir(args.path):
        files = find_checkpoints(args.path) + sorted(
            p for p in pathlib.Path(args.path).iterdir()
            if p.is_file() and p.name.endswith(".safetensors") and not p.name.startswith("."))
        if not files:
            print("error: no checkpoint files (*.pth, *.pt, *.ckpt, *.tar, *.safetensors) in %s"
                  % args.path, file=sys.stderr)
            return 2
    elif os.path.isfile(args.path):
        files = [args.path]
    else:
        print("error: no such file or folder: %s" % args.path, file=sys.stderr)
        return 2
    # Sizes are compared among checkpoints only (an export's weights are a fraction of one).
    sizes = {str(f): os.path.getsize(f) for f in files if not str(f).endswith(".safetensors")}
    median = statistics.median(sizes.values()) if sizes else 0
    bad = 0
    for f in files:
        problems = verify_checkpoint(f)
        name = os.path.basename(str(f))
        if problems:
            bad += 1
            print("BAD  %s" % name)
            for p in problems:
                print("     - %s" % p.replace(str(f) + ": ", "", 1))
        elif not args.quiet:
            print("OK   %s" % name)
        size = sizes.get(str(f))
        if size is not None and len(sizes) > 2 and abs(size - median) > _SIZE_TOLERANCE * median:
            print("     note: %s bytes, %+.0f%% against the median of its siblings (%s bytes)"
                  % (f"{size:,}", 100.0 * (size - median) / median, f"{int(median):,}"))
    print("%d file%s checked, %d bad" % (len(files), "s" if len(files) != 1 else "", bad))
    return 1 if bad else 0
