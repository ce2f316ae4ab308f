"""Export a checkpoint for sharing and deployment.

    cnnlstm-ext export FILE --safetensors OUT.safetensors [--key-map OLD=NEW ...]
    cnnlstm-ext export FILE --onnx model.onnx [--pt2 model.pt2] [--lengths] [--frames T]

--safetensors writes only the model state dict (no optimizer or scheduler state), with the
epoch, best metrics, the config, the class names and the architecture read off the weights as
string metadata: `cnnlstm_ext.load_model` and `cnnlstm-ext predict` read the file alone.

--onnx and --pt2 write the model for inference: clips [B, T, 3, S, S] (float32, normalised as in
training) -> logits [B, num_classes], B and T dynamic; with --lengths the model also takes
lengths [B] (int64, each in [1, T]). The ONNX file uses standard operators only (onnxruntime
runs it without this package); the .pt2 program (torch.export) keeps this package's fused ops,
so `import cnnlstm_ext` before `torch.export.load`. Both carry the class names and the
preprocessing (frames, frame size, resize, mean, std, orientation) as metadata.

Exit status: 0 written; 2 bad options, or an input file that cannot be read or is not a model's
checkpoint (as for predict, evaluate and train); 1 an output that cannot be written or an export
that fails.
"""
import contextlib
import json
import os
import sys
from typing import Optional

from ..checkpoint import (CheckpointError, CheckpointWriteError, apply_key_map, atomic_write,
                          describe_state_dict, normalize_checkpoint, read_checkpoint)


def add_arguments(parser):
    parser.add_argument("file", help="checkpoint file (.pth; --onnx/--pt2 also read a .safetensors "
                                     "export)")
    parser.add_argument("--safetensors", metavar="OUT",
                        help="write the weights to this .safetensors file")
    parser.add_argument("--onnx", metavar="OUT",
                        help="write the model to this ONNX file (standard operators only)")
    parser.add_argument("--pt2", metavar="OUT",
                        help="write the model as a torch.export program (torch.export.load)")
    parser.add_argument("--lengths", action="store_true",
                        help="--onnx/--pt2: the model also takes lengths [B] (clips of fewer "
                             "valid frames than T)")
    parser.add_argument("--frames", type=int, default=None, metavar="T",
                        help="--onnx/--pt2: frames per clip of the example the export traces "
                             "(default: the checkpoint's data.num_frames; any T runs later)")
    parser.add_argument("--frame-size", type=int, default=None, metavar="S",
                        help="--onnx/--pt2: frame height and width (default: the checkpoint's "
                             "data.frame_size; fixed in the exported model and its "
                             "preprocessing metadata)")
    parser.add_argument("--opset", type=int, default=18, help="--onnx: the ONNX opset (>= 18)")
    parser.add_argument("--key-map", action="append", default=[], metavar="OLD=NEW",
                        help="rename keys with this prefix (re:REGEX=REPL for a regex); repeatable")
    parser.add_argument("--no-integrity-check", dest="check_integrity", action="store_false",
                        help="skip the check of the checkpoint's checksum record (faster for a "
                             "large file you trust; a damaged file then loads unnoticed)")


def export_safetensors(path, out, key_map=None, check_integrity=True) -> dict:
    """Write path's model weights to `out` (safetensors); returns the metadata written."""
    return write_safetensors(out, *safetensors_content(path, key_map, check_integrity))


def write_safetensors(out, tensors, metadata) -> dict:
    """safetensors_content's (tensors, metadata) written to `out` atomically; returns metadata."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    atomic_write(out, lambda f: f.write(data))
    return metadata


def safetensors_content(path, key_map=None, check_integrity=True):
    """(tensors, string metadata) of the safetensors export of path's model weights."""
    ckpt = normalize_checkpoint(read_checkpoint(path, mmap=True, check_integrity=check_integrity))
    sd = ckpt["model_state_dict"]
    if sd is None:
        raise CheckpointError("%s: no model state dict to export" % path)
    sd = apply_key_map(sd, key_map)
    tensors, seen = {}, set()
    for k, v in sd.items():
        v = v.detach().contiguous()
        # safetensors refuses tensors sharing memory: give each its own copy.
        if v.untyped_storage().data_ptr() in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        tensors[k] = v
    info = describe_state_dict(sd)
    metadata = {"format": "pt", "source": os.path.basename(str(path)),
                "param_count": str(info["param_count"])}
    for k in ("epoch", "best_val_acc", "best_val_f1", "best_epoch", "val_acc", "val_f1"):
        if ckpt.get(k) is not None:
            metadata[k] = str(ckpt[k])
    if ckpt.get("config"):
        metadata["config"] = json.dumps(ckpt["config"], default=str)
    state = ckpt.get("trainer_state")
    if isinstance(state, dict) and state.get("classes"):  # for load_model: the output names
        metadata["classes"] = json.dumps([str(c) for c in state["classes"]])
    if info["cnnlstm_config"]:
        metadata["cnnlstm_config"] = json.dumps(info["cnnlstm_config"])
    return tensors, metadata


class _UnusableInput(Exception):
    """The input file cannot be read or is not a model's checkpoint (exit 2)."""


@contextlib.contextmanager
def _reading_input():
    """Failures to read the input file become _UnusableInput: missing, unreadable, truncated, not
    a checkpoint (a .pt2, safetensors where a checkpoint is needed), weights that do not fit."""
    try:
        yield
    except CheckpointWriteError:
        raise
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise _UnusableInput(str(e)) from e


def _error(e) -> None:
    print("error: %s" % " ".join(str(e).split()), file=sys.stderr)


def exported_preprocessing(preprocessing: dict, frame_size: int) -> dict:
    """The preprocessing of a model exported at `frame_size` (--frame-size): the clips it takes,
    not the checkpoint's. A run's resize_to (the short side before the centre crop) is scaled with
    the frame size, so that the crop keeps its share of the frame (and is never larger than the
    resized frame); num_frames stays the run's (T is dynamic, --frames only shapes the trace)."""
    prep = dict(preprocessing)
    trained = int(prep["frame_size"])
    prep["frame_size"] = int(frame_size)
    if prep.get("resize_to") is not None and frame_size != trained:
        scaled = int(round(prep["resize_to"] * frame_size / trained))
        prep["resize_to"] = max(int(frame_size), scaled)
    return prep


def deployment_metadata(model, source: str, lengths: bool,
                        frame_size: Optional[int] = None) -> dict:
    """What a deployed model's user needs besides the weights, as strings: inputs, classes,
    preprocessing, architecture; `frame_size`: the S the model was exported at (default: the
    checkpoint's)."""
    prep = exported_preprocessing(model.preprocessing,
                                  frame_size or int(model.preprocessing["frame_size"]))
    size = prep["frame_size"]
    return {"source": os.path.basename(source),
            "inputs": "clips [B, T, 3, %d, %d] float32" % (size, size)
                      + (", lengths [B] int64" if lengths else ""),
            "outputs": "logits [B, num_classes]",
            "classes": json.dumps(list(model.classes)),
            "preprocessing": json.dumps(prep),
            "cnnlstm_config": json.dumps(model.config)}


def _check_arguments(args) -> None:
    if not (args.safetensors or args.onnx or args.pt2):
        raise ValueError("nothing to export: give --safetensors, --onnx and/or --pt2")
    outputs = [o for o in (args.safetensors, args.onnx, args.pt2) if o]
    if len({os.path.abspath(o) for o in outputs}) != len(outputs):
        raise ValueError("--safetensors, --onnx and --pt2 must name different files")
    # A file named for another of the formats is a mix-up (--pt2 model.onnx would write a .pt2
    # program that onnxruntime then refuses); names of no known format are the user's choice.
    formats = {"safetensors": (".safetensors", "safetensors weights"),
               "onnx": (".onnx", "an ONNX model"), "pt2": (".pt2", "a .pt2 program")}
    for flag, out in (("safetensors", args.safetensors), ("onnx", args.onnx), ("pt2", args.pt2)):
        ext = os.path.splitext(out or "")[1].lower()
        other = next((f for f, (e, _) in formats.items() if e == ext and f != flag), None)
        if other is not None:
            raise ValueError("--%s %s: --%s writes %s, not a %s file; give a name ending in %s, "
                             "or --%s %s to write %s" % (flag, out, flag, formats[flag][1], ext,
                                                         formats[flag][0], other, out,
                                                         formats[other][1]))
    if args.frames is not None and args.frames < 1:
        raise ValueError("--frames must be >= 1, got %d" % args.frames)
    if args.frame_size is not None and args.frame_size < 8:
        raise ValueError("--frame-size must be >= 8, got %d" % args.frame_size)
    if args.onnx:
        if args.opset < 18:
            raise ValueError("--opset must be >= 18 (the exporter's lowest), got %d" % args.opset)
        import importlib.util
        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise ValueError("--onnx needs the %s package%s: pip install %s"
                             % (" and ".join(missing), "s" if len(missing) > 1 else "",
                                " ".join(missing)))


def run(args) -> int:
    from ..train.config import check_output_dir

    try:
        _check_arguments(args)
    except ValueError as e:  # a usage error
        _error(e)
        return 2
    try:
        for flag in ("safetensors", "onnx", "pt2"):  # before anything is read or traced
            out = getattr(args, flag)
            if out:
                if os.path.isdir(out):
                    raise ValueError("--%s %s is a folder; give a file name" % (flag, out))
                check_output_dir(os.path.dirname(os.path.abspath(out)), "--" + flag)
        if args.safetensors:
            with _reading_input():
                content = safetensors_content(args.file, args.key_map or None,
                                              check_integrity=args.check_integrity)
            metadata = write_safetensors(args.safetensors, *content)
            del content
            print("wrote %s (%s parameters, epoch %s)" % (
                args.safetensors, f"{int(metadata['param_count']):,}", metadata.get("epoch", "?")))
        if args.onnx or args.pt2:
            _export_model(args)
    except _UnusableInput as e:  # an unreadable input file: 2, as for predict, evaluate and train
        _error(e)
        return 2
    except (CheckpointError, OSError, ValueError, TypeError, RuntimeError) as e:
        _error(e)
        return 1
    return 0


def _export_model(args) -> None:
    import time

    from ..export import save_onnx, save_pt2
    from ..inference import load_model
    from ..ops import _require_kernels

    _require_kernels("export")  # before the checkpoint is read: the export needs the ops
    with _reading_input():
        model = load_model(args.file, key_map=list(args.key_map) or None,
                           check_integrity=args.check_integrity and not args.safetensors)
    frames = args.frames or int(model.preprocessing["num_frames"])
    size = args.frame_size or int(model.preprocessing["frame_size"])
    metadata = deployment_metadata(model, args.file, args.lengths, frame_size=size)
    shape = "clips [B, T, 3, %d, %d]%s" % (size, size, " + lengths [B]" if args.lengths else "")
    for flag, save in (("onnx", save_onnx), ("pt2", save_pt2)):
        out = getattr(args, flag)
        if out:
            start = time.perf_counter()
            save(model, out, frames=frames, frame_size=size, lengths=args.lengths,
                 metadata=metadata, **({"opset": args.opset} if flag == "onnx" else {}))
            print("wrote %s (%s, B and T dynamic; %.1f s)"
                  % (out, shape, time.perf_counter() - start))
