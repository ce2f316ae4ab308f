"""Write the summary report of a checkpoint folder: summary.md with the architecture and
parameter count, the training configuration, a table of every checkpoint (epoch, best and current
val acc, train loss, learning rate, val F1, notes: initial, best, drop, recovery, overfitting,
NaN loss, frozen accuracy), the best checkpoint and why, file sizes with anomalies, and
recommendations (early-stop epoch, NaN onset, overfitting onset); loss.png, accuracy.png and
lr.png (best epoch marked); summary.json with the same findings.

Files are read one at a time with tensor data memory-mapped: folders of hundreds of large
checkpoints are fine. The model weights of best/latest files are always checked for NaN/Inf
(--check-weights checks every file fully); files of a different model than the rest, and a train
loss that never left chance level (ln of the number of classes), are named in the report. Exit
code 1, with a warning line per file, when a file holds NaN/Inf weights or broken state.
"""
import sys

from ..checkpoint import CheckpointError
from ..report import summarize


def add_arguments(parser):
    parser.add_argument("dir", help="folder of checkpoints (e.g. outputs/<run>/checkpoints)")
    parser.add_argument("--out", default=None,
                        help="folder for the report (default: DIR/summary)")
    parser.add_argument("--patience", type=int, default=10,
                        help="epochs without improvement before early stopping, and how long "
                             "overfitting must last to be reported (default 10)")
    parser.add_argument("--check-weights", action="store_true",
                        help="also verify every file's tensors (NaN/Inf, CRC); reads all data")


def run(args) -> int:
    if args.patience < 1:
        print("error: --patience must be at least 1", file=sys.stderr)
        return 2
    try:
        path = summarize(args.dir, args.out, patience=args.patience,
                         check_weights=args.check_weights)
    except (FileNotFoundError, NotADirectoryError, CheckpointError) as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    print("wrote %s" % path)
    import json
    try:
        files = json.loads((path.parent / "summary.json").read_text())["files"]
    except (OSError, ValueError, KeyError):
        files = []
    for f in files:
        if f.get("error"):
            print("warning: %s: unreadable: %s" % (f["name"], f["error"]), file=sys.stderr)
    damaged = [f for f in files if f.get("problems")]
    for f in damaged:  # what verify reports: NaN/Inf weights, broken optimizer state
        print("warning: %s: %s" % (f["name"], "; ".join(f["problems"])), file=sys.stderr)
    return 1 if damaged else 0
