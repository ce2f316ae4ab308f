"""Safetensors weights files (`cnnlstm-ext export --safetensors`), for `verify` and `inspect`.

A safetensors file is an 8-byte little-endian header length, the header (a JSON object: per
tensor its dtype, shape and the [begin, end) byte range of its data after the header, and an
optional `__metadata__` map of strings), then the tensors' bytes, back to back. The header is
read and checked here without the safetensors package, so that a damaged file gets a sentence
saying what is wrong (truncated: a tensor's bytes beyond the end of the file) rather than the
package's error code; the tensors themselves are then read with the package.

`cnnlstm-ext export --safetensors` writes the model state dict and, as string metadata, `format`
("pt"), `source`, `param_count`, the epoch and metrics it has (`epoch`, `best_val_acc`, ...),
`config`, `classes` and `cnnlstm_config` (JSON); `cnnlstm_ext.load_model` reads those.
"""
import json
import math
import os
from typing import List

import torch

from .format import (BEST_FIELDS, METRIC_FIELDS, SAFETENSORS_MAX_HEADER, CheckpointError,
                     _names, _one_line)
from .inspect import describe_state_dict, is_buffer_name

# safetensors' dtype names; those this torch lacks are left out (their tensors are not read).
_DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
    ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"),
    ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("BOOL", "bool"),
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("C64", "complex64"))
    if hasattr(torch, attr)}
# Bits per element of every dtype safetensors writes (the byte count of a tensor's range).
_BITS = {"F64": 64, "I64": 64, "U64": 64, "C64": 64, "F32": 32, "I32": 32, "U32": 32,
         "F16": 16, "BF16": 16, "I16": 16, "U16": 16, "I8": 8, "U8": 8, "BOOL": 8,
         "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4}
_INT_FIELDS = ("epoch", "best_epoch", "param_count")
_FLOAT_FIELDS = tuple(f for f in METRIC_FIELDS + BEST_FIELDS if f not in _INT_FIELDS)
_JSON_FIELDS = {"config": dict, "classes": list, "cnnlstm_config": dict}


def read_header(path):
    """(tensors {name: {"dtype", "shape", "data_offsets"}} in the header's order, metadata
    {str: str}, byte offset of the tensor data, file size) of a safetensors file.

    Raises FileNotFoundError, CheckpointError naming the file when the header cannot be read:
    cut short, not JSON, entries of the wrong form. The tensors' byte ranges are not checked
    against the file here (layout_problems does that).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError("no safetensors file at %s" % path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError("%s: truncated (%d bytes): a safetensors file starts with an "
                                  "8-byte header length" % (path, size))
        n = int.from_bytes(head, "little")
        if n > SAFETENSORS_MAX_HEADER:
            raise CheckpointError("%s: corrupt: its header length (%s bytes) is beyond the 100 MB "
                                  "safetensors allows" % (path, f"{n:,}"))
        if 8 + n > size:
            raise CheckpointError("%s: truncated (%s bytes): its header alone takes %s bytes, so "
                                  "the write stopped before the file was complete"
                                  % (path, f"{size:,}", f"{8 + n:,}"))
        text = f.read(n)
    try:
        header = json.loads(text.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointError("%s: corrupt: its safetensors header is not JSON (%s)"
                              % (path, _one_line(e))) from None
    if not isinstance(header, dict):
        raise CheckpointError("%s: corrupt: its safetensors header is a JSON %s, not an object"
                              % (path, type(header).__name__))
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError("%s: corrupt: its __metadata__ is not a map of strings" % path)
    for name, entry in header.items():
        ok = isinstance(entry, dict) and isinstance(entry.get("dtype"), str) \
            and isinstance(entry.get("shape"), list) \
            and all(type(d) is int and d >= 0 for d in entry["shape"]) \
            and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2 \
            and all(type(o) is int for o in entry["data_offsets"]) \
            and 0 <= entry["data_offsets"][0] <= entry["data_offsets"][1]
        if not ok:
            raise CheckpointError("%s: corrupt: the header entry of tensor %r is not {dtype, "
                                  "shape, data_offsets}: %s" % (path, name, str(entry)[:120]))
    return header, metadata, 8 + n, size


def _numel(shape) -> int:
    return math.prod(shape) if shape else 1


def layout_problems(tensors, data_bytes) -> List[str]:
    """What is wrong with the tensors' byte ranges in a file holding `data_bytes` bytes after
    its header: ranges past the end (a truncated file), sizes that do not fit dtype and shape,
    unknown dtypes, overlaps, gaps and trailing bytes (the package refuses those files too)."""
    problems = []
    beyond = [name for name, e in tensors.items() if e["data_offsets"][1] > data_bytes]
    if beyond:
        needed = max(tensors[name]["data_offsets"][1] for name in beyond)
        problems.append("truncated: the bytes of %d of %d tensors (%s) lie beyond its end (the "
                        "header needs %s bytes of tensor data, the file holds %s), so the write "
                        "stopped before the file was complete"
                        % (len(beyond), len(tensors), _names(beyond), f"{needed:,}",
                           f"{data_bytes:,}"))
    for name, e in tensors.items():
        bits = _BITS.get(e["dtype"])
        begin, end = e["data_offsets"]
        if bits is None:
            problems.append("tensor %s has an unknown dtype %r" % (name, e["dtype"]))
        elif end - begin != (_numel(e["shape"]) * bits + 7) // 8:
            problems.append("tensor %s: %s bytes in the file, but %s %s needs %s" % (
                name, f"{end - begin:,}", e["dtype"], e["shape"],
                f"{(_numel(e['shape']) * bits + 7) // 8:,}"))
    if not beyond:
        position = 0
        for begin, end, name in sorted((e["data_offsets"][0], e["data_offsets"][1], name)
                                       for name, e in tensors.items()):
            if begin != position:
                problems.append("tensor %s starts at byte %s of the data, where %s was expected "
                                "(%s)" % (name, f"{begin:,}", f"{position:,}",
                                          "an overlap" if begin < position else "a gap"))
                break
            position = end
        else:
            if position != data_bytes:
                problems.append("%s bytes after the last tensor's data"
                                % f"{data_bytes - position:,}")
    return problems


def metadata_problems(metadata, tensors) -> List[str]:
    """What is wrong with the metadata `cnnlstm-ext export --safetensors` writes, where a file
    has it: numbers that are not numbers, JSON fields that are not JSON of their type, a
    parameter count or class names that do not fit the tensors. Other keys are not looked at."""
    problems = []
    for field in _INT_FIELDS + _FLOAT_FIELDS:
        if field in metadata and _number(metadata[field]) is None:
            problems.append("metadata %s is %r, not a number" % (field, metadata[field][:40]))
    parsed = {}
    for field, kind in _JSON_FIELDS.items():
        if field in metadata:
            try:
                parsed[field] = json.loads(metadata[field])
            except ValueError as e:
                problems.append("metadata %s is not JSON (%s)" % (field, _one_line(e)))
                continue
            if not isinstance(parsed[field], kind):
                problems.append("metadata %s is a JSON %s, not %s" % (
                    field, type(parsed[field]).__name__, "an object" if kind is dict else "a list"))
                del parsed[field]
    if "param_count" in metadata and _number(metadata["param_count"]) is not None:
        count = sum(_numel(e["shape"]) for k, e in tensors.items() if not is_buffer_name(k))
        if _number(metadata["param_count"]) != count:
            problems.append("metadata param_count is %s, but the tensors hold %s parameters"
                            % (metadata["param_count"], f"{count:,}"))
    classes, config = parsed.get("classes"), parsed.get("cnnlstm_config")
    if classes is not None and isinstance(config, dict) \
            and isinstance(config.get("num_classes"), int) \
            and len(classes) != config["num_classes"]:
        problems.append("metadata names %d classes, but its cnnlstm_config has %d"
                        % (len(classes), config["num_classes"]))
    return problems


def verify_safetensors(path) -> List[str]:
    """What is wrong with a safetensors file, one sentence each; empty when it is sound.

    Checks: the header (length, JSON, entries), every tensor's byte range within the file and
    fitting its dtype and shape, the ranges back to back, the metadata export writes (where
    present), every tensor read by the safetensors package, and no NaN/Inf in floating-point
    tensors (one tensor in memory at a time). A header that cannot be read raises
    CheckpointError (or FileNotFoundError), as read_checkpoint does.
    """
    path = os.fspath(path)
    tensors, metadata, start, size = read_header(path)
    problems = layout_problems(tensors, size - start) + metadata_problems(metadata, tensors)
    if problems:
        return problems  # the package would refuse the file, or read it wrongly
    from safetensors import safe_open

    bad, read = [], 0
    try:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                read += 1
                if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                    bad.append(name)
                del t
    except Exception as e:  # SafetensorError, a dtype this torch lacks, ...
        return ["the safetensors package cannot read it (%d of %d tensors read): %s"
                % (read, len(tensors), _one_line(e))]
    if bad:
        problems.append("NaN/Inf in %d of %d tensors: %s" % (len(bad), len(tensors), _names(bad)))
    return problems


def _number(text):
    """A metadata string as an int or a float (str() of either), or None."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None


def _metadata_value(metadata, field):
    if field not in metadata:
        return None
    value = _number(metadata[field])
    return metadata[field] if value is None else value


def inspect_safetensors(path) -> dict:
    """What a safetensors file holds, as a plain dict (from its header: no tensor data is read):
    the tensors (name, dtype, shape, in the header's order), dtypes, the metadata (raw, and
    epoch, metrics, config and classes read off it), and the architecture read off the shapes.
    Raises CheckpointError for a file whose header cannot be read or whose tensors do not fit
    in it (truncated)."""
    path = os.fspath(path)
    tensors, metadata, start, size = read_header(path)
    layout = layout_problems(tensors, size - start)
    if layout:
        raise CheckpointError("%s: %s" % (path, "; ".join(layout)))
    dtypes = {}
    for e in tensors.values():
        dtypes[e["dtype"]] = dtypes.get(e["dtype"], 0) + 1
    info = None
    if tensors and all(e["dtype"] in _DTYPES for e in tensors.values()):
        # Shapes without data (the meta device) are all describe_state_dict needs.
        info = describe_state_dict({k: torch.empty(e["shape"], dtype=_DTYPES[e["dtype"]],
                                                   device="meta") for k, e in tensors.items()})
    parsed = {}
    for field in _JSON_FIELDS:
        try:
            parsed[field] = json.loads(metadata[field]) if field in metadata else None
        except ValueError:
            parsed[field] = None
    data_bytes = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in tensors.values())
    return {
        "path": path, "size_bytes": size, "format": "safetensors", "header_bytes": start,
        "tensor_count": len(tensors), "tensor_bytes": data_bytes, "dtypes": dtypes,
        "tensors": [{"name": k, "dtype": e["dtype"], "shape": list(e["shape"])}
                    for k, e in tensors.items()],
        "metadata": dict(metadata),
        "source": metadata.get("source"),
        "epoch": _metadata_value(metadata, "epoch"),
        "metrics": {k: _metadata_value(metadata, k) for k in METRIC_FIELDS},
        "best": {k: _metadata_value(metadata, k) for k in BEST_FIELDS},
        "classes": parsed["classes"] if isinstance(parsed["classes"], list) else None,
        "config": parsed["config"] if isinstance(parsed["config"], dict) else None,
        "param_count": info["param_count"] if info else sum(
            _numel(e["shape"]) for k, e in tensors.items() if not is_buffer_name(k)),
        "architecture": info,
    }
