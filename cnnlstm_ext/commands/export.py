"""Export a checkpoint's model weights, for sharing without pickle.

    cnnlstm-ext export FILE --safetensors OUT.safetensors [--key-map OLD=NEW ...]

Writes only the model state dict (no optimizer or scheduler state) as safetensors, with the
epoch, best metrics, the config, the class names and the architecture read off the weights as
string metadata: `cnnlstm_ext.load_model` and `cnnlstm-ext predict` read the file alone.
"""
import json
import os

from ..checkpoint import (CheckpointError, apply_key_map, atomic_write, describe_state_dict,
                          normalize_checkpoint, read_checkpoint)


def add_arguments(parser):
    parser.add_argument("file", help="checkpoint file (.pth)")
    parser.add_argument("--safetensors", required=True, metavar="OUT",
                        help="write the weights to this .safetensors file")
    parser.add_argument("--key-map", action="append", default=[], metavar="OLD=NEW",
                        help="rename keys with this prefix (re:REGEX=REPL for a regex); repeatable")
    parser.add_argument("--no-integrity-check", dest="check_integrity", action="store_false",
                        help="skip the check of the checkpoint's checksum record (faster for a "
                             "large file you trust; a damaged file then loads unnoticed)")


def export_safetensors(path, out, key_map=None, check_integrity=True) -> dict:
    """Write path's model weights to `out` (safetensors); returns the metadata written."""
    from safetensors.torch import save

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
    data = save(tensors, metadata=metadata)
    atomic_write(out, lambda f: f.write(data))
    return metadata


def run(args) -> int:
    from ..train.config import check_output_dir

    try:
        check_output_dir(os.path.dirname(os.path.abspath(args.safetensors)), "--safetensors")
        metadata = export_safetensors(args.file, args.safetensors, args.key_map or None,
                                      check_integrity=args.check_integrity)
    except (CheckpointError, OSError, ValueError, TypeError) as e:
        print("error: %s" % " ".join(str(e).split()))
        return 1
    print("wrote %s (%s parameters, epoch %s)" % (args.safetensors,
                                                 f"{int(metadata['param_count']):,}",
                                                 metadata.get("epoch", "?")))
    return 0
