"""Checkpoints: the on-disk format of docs/checkpoint_format.md, and every common variant of it.

A checkpoint is a `torch.save` dict of plain Python types and tensors, so that
`torch.load(path, weights_only=True)` reads it in a script that knows nothing of this package:

    epoch, model_state_dict, optimizer_state_dict, scheduler_state_dict, history,
    best_val_acc, best_val_f1, best_epoch, val_acc, val_f1, train_loss, lr, config

- `save_checkpoint` writes it atomically (temp file in the same folder, fsync, rename) with a
  checksum of its tensors and its metadata (`integrity`), which every read checks by default
  (`check_integrity=False` skips it).
- `load_checkpoint` reads it with weights_only=True, whatever aliases it was written with
  (`state_dict`/`model`, `optimizer`/`scheduler`, `train_history`/`training_history`, a nested
  `best_metrics`, a bare state dict, a `module.` prefix), renames keys with `key_map` rules, says
  exactly which keys do not fit, and places optimizer moments by parameter name.
- `verify_checkpoint` lists what is wrong with a file; `inspect_checkpoint` says what it holds.
  Both also take the safetensors weights of `cnnlstm-ext export --safetensors`; every reader
  names a torch.export program (.pt2) or safetensors file given as a checkpoint as such.

The modules, each importing only those above it:

    integrity.py the checksum record (compute_integrity, integrity_problems); imports nothing here
    format.py   the keys, the errors, plain types, read_checkpoint, atomic_write, file names
    legacy.py   aliases (normalize_checkpoint), strip_prefixes, key maps
    inspect.py  describe_state_dict, canonical_names, inspect_checkpoint
    io.py       save_checkpoint, load_checkpoint (optimizer moments by parameter name)
    safetensors_file.py  the safetensors files of export: header, checks, description
    verify.py   verify_checkpoint, nonfinite_tensors

(inspect.py reads the backbones of cnnlstm_ext/models/cnnlstm.py, which imports inspect.py, when
first called, not while loading.)
"""
# The public names of checkpoint.py before it became this package, plus the shared helpers
# (strip_prefixes, nonfinite_tensors, describe_state_dict...); __all__ is checkpoint.py's.
from .integrity import INTEGRITY_KEY, compute_integrity, integrity_problems  # noqa: F401
from .format import (BEST_FIELDS, CHECKPOINT_SUFFIXES, HISTORY_FIELDS, METRIC_FIELDS,  # noqa: F401
                     CheckpointError, CheckpointMismatchError, CheckpointWriteError, atomic_write,
                     epoch_from_name, file_format, find_checkpoints, read_checkpoint,
                     remove_stale_temp_files)
from .legacy import (HISTORY_KEYS, MODEL_KEYS, OPTIMIZER_KEYS, SCHEDULER_KEYS,  # noqa: F401
                     apply_key_map, invert_key_map, normalize_checkpoint, parse_key_map,
                     strip_prefixes)
from .inspect import (canonical_names, describe_state_dict, expected_file_bytes,  # noqa: F401
                      inspect_checkpoint, is_buffer_name)
from .io import load_checkpoint, save_checkpoint
from .safetensors_file import inspect_safetensors, verify_safetensors  # noqa: F401
from .verify import nonfinite_tensors, verify_checkpoint  # noqa: F401

__all__ = ["CheckpointError", "CheckpointMismatchError", "save_checkpoint", "load_checkpoint",
           "normalize_checkpoint", "read_checkpoint", "verify_checkpoint", "inspect_checkpoint",
           "apply_key_map", "parse_key_map", "invert_key_map", "expected_file_bytes",
           "find_checkpoints", "epoch_from_name", "atomic_write", "HISTORY_FIELDS",
           "CheckpointWriteError", "remove_stale_temp_files", "INTEGRITY_KEY"]
