"""`cnnlstm-ext` (also `python -m cnnlstm_ext`): one sub-command per module in cnnlstm_ext/commands/.

Each command module has a docstring (its help), `add_arguments(parser)` and `run(args) -> int`.
Modules are imported only when their command runs, so `--help` stays fast.
"""
import argparse
import importlib
import os
import sys

from .ops import KernelsNotBuiltError

COMMANDS = {
    "train": "train a CNN-LSTM classifier (no arguments: the built-in synthetic data set on the CPU)",
    "evaluate": "evaluate a checkpoint on a data set, print metrics and write predictions",
    "predict": "classify videos with a checkpoint: top-k classes and probabilities per video",
    "summarize": "write a markdown report and plots for a folder of checkpoints",
    "inspect": "show what a checkpoint holds: epoch, metrics, architecture, sizes",
    "verify": "check checkpoint files for truncation, missing state and NaN/Inf",
    "export": "export a checkpoint: ONNX, a torch.export program (.pt2) or safetensors weights",
    "bench": "time a training step of the fused model against the stock one",
    "cache": "decode a config's videos once into the clip cache that training reads",
}


def build_parser(load_all=True):
    parser = argparse.ArgumentParser(
        prog="cnnlstm-ext",
        description="Fused CNN-LSTM video classifiers: train, evaluate and manage checkpoints.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, summary in COMMANDS.items():
        if not load_all and name not in sys.argv[1:2]:
            sub.add_parser(name, help=summary)
            continue
        module = importlib.import_module("cnnlstm_ext.commands." + name)
        p = sub.add_parser(name, help=summary, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


# The exit status when the reader of stdout has gone (`cnnlstm-ext inspect F | head -3`): 141, i.e.
# 128 + SIGPIPE (13), what the shell reports for cat, grep, git or ls ended by SIGPIPE in the same
# pipe, so that `set -o pipefail` scripts see this command as they see those. Nothing is printed:
# the reader stopped reading on purpose. (Python ignores SIGPIPE, so the closed pipe arrives here
# as a BrokenPipeError instead of ending the process.)
EXIT_BROKEN_PIPE = 128 + 13


def _stdout_closed() -> int:
    """Python's documented recipe: stdout's remaining buffer would fail again when the interpreter
    flushes it at exit ("Exception ignored ... BrokenPipeError"), so point stdout at devnull."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor
        pass
    return EXIT_BROKEN_PIPE


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(load_all=False) if not argv or argv[0] not in COMMANDS else None
    if parser is None:
        # Load only the command that runs.
        name = argv[0]
        module = importlib.import_module("cnnlstm_ext.commands." + name)
        parser = argparse.ArgumentParser(prog="cnnlstm-ext " + name, description=module.__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(parser)
        args = parser.parse_args(argv[1:])
        try:
            rc = int(module.run(args) or 0)
            if sys.stdout is not None:
                sys.stdout.flush()  # a closed pipe shows here, not in the flush at exit
            return rc
        except BrokenPipeError:
            return _stdout_closed()
        except (OSError, MemoryError, KernelsNotBuiltError) as e:
            # What a command did not foresee of the machine (a full disk, a folder that is a
            # file, no memory left, an install without the compiled kernels): one line, not a
            # traceback.
            text = " ".join(str(e).split()) or type(e).__name__
            print("error: %s" % text, file=sys.stderr)
            return 1
    if not argv:
        parser.print_help()
        return 0
    parser.parse_args(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
