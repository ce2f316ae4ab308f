"""The checksum every checkpoint of this package carries (docs/checkpoint_format.md, "Integrity").

`save_checkpoint` adds one reserved top-level key, `integrity`:

    {"algorithm": "sha256", "version": 1,
     "tensors": [hex digest of each tensor, in the order of a depth-first walk of the dict],
     "metadata": hex digest of everything else (structure, keys, numbers, strings, the tensors'
                 dtypes and shapes), serialised canonically}

A tensor's digest covers its dtype, shape, strides, requires_grad and bytes; the metadata digest
covers every key and value but the tensors' bytes, typed (1 and 1.0 and True differ, floats by
their 8 bytes). The walk follows the dict's own order, which pickle keeps. `integrity_problems`
recomputes both from a loaded checkpoint and says what differs. Nothing here imports the rest of
the package, so format.py reads a file and checks it in one place.
"""
import hashlib
import struct
from typing import List, Optional

import torch

INTEGRITY_KEY = "integrity"
ALGORITHM = "sha256"
VERSION = 1
_RECORD_KEYS = ("algorithm", "version", "tensors", "metadata")


def _tensor_digest(t: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(repr((str(t.dtype), tuple(t.shape), tuple(t.stride()) if t.layout == torch.strided
                   else None, bool(t.requires_grad), str(t.layout))).encode())
    data = t.detach()
    if data.layout != torch.strided:
        data = data.to_dense()
    if data.is_quantized:
        data = data.int_repr()
    if data.device.type == "meta":
        return h.hexdigest()
    if data.device.type != "cpu":
        data = data.cpu()
    data = data.contiguous().reshape(-1)
    if data.numel():
        h.update(data.view(torch.uint8).numpy())
    return h.hexdigest()


def _feed(h, tag: bytes, payload: bytes = b""):
    h.update(tag + struct.pack(">Q", len(payload)) + payload)


def _walk(obj, path, meta, tensors, skip_top_key=None):
    """Feed obj's canonical form to `meta`; append (path, tensor) of every tensor to `tensors`."""
    if isinstance(obj, torch.Tensor):
        _feed(meta, b"T", repr((str(obj.dtype), tuple(obj.shape))).encode())
        tensors.append((path, obj))
    elif obj is None:
        _feed(meta, b"N")
    elif type(obj) is bool:
        _feed(meta, b"B", b"1" if obj else b"0")
    elif type(obj) is int:
        _feed(meta, b"I", str(obj).encode())
    elif type(obj) is float:
        _feed(meta, b"F", struct.pack(">d", obj))
    elif type(obj) is complex:
        _feed(meta, b"C", struct.pack(">dd", obj.real, obj.imag))
    elif type(obj) is str:
        _feed(meta, b"S", obj.encode("utf-8", "surrogatepass"))
    elif type(obj) in (bytes, bytearray):
        _feed(meta, b"Y", bytes(obj))
    elif isinstance(obj, dict):
        items = [(k, v) for k, v in obj.items() if not (skip_top_key is not None
                                                         and k == skip_top_key)]
        _feed(meta, b"D", ("%s:%d" % (type(obj).__name__, len(items))).encode())
        for k, v in items:
            _walk(k, path + "/<key>", meta, [])  # keys are never tensors
            _walk(v, "%s[%r]" % (path, k), meta, tensors)
    elif isinstance(obj, (list, tuple)):
        _feed(meta, b"L", ("%s:%d" % (type(obj).__name__, len(obj))).encode())
        for i, v in enumerate(obj):
            _walk(v, "%s[%d]" % (path, i), meta, tensors)
    else:  # not written by save_checkpoint (plain types only); its repr at least
        _feed(meta, b"?", ("%s.%s:%r" % (type(obj).__module__, type(obj).__qualname__,
                                         obj)).encode("utf-8", "surrogatepass"))


def _digests(checkpoint: dict):
    meta = hashlib.sha256()
    tensors = []
    _walk(checkpoint, "checkpoint", meta, tensors, skip_top_key=INTEGRITY_KEY)
    return meta.hexdigest(), tensors


def compute_integrity(checkpoint: dict) -> dict:
    """The `integrity` record of a checkpoint dict (its own `integrity` key left out)."""
    metadata, tensors = _digests(checkpoint)
    return {"algorithm": ALGORITHM, "version": VERSION,
            "tensors": [_tensor_digest(t) for _, t in tensors], "metadata": metadata}


def looks_like_record(value) -> bool:
    """A dict shaped like an integrity record (to spot one whose key was damaged)."""
    return isinstance(value, dict) and sum(k in value for k in _RECORD_KEYS) >= 2


def integrity_problems(checkpoint) -> Optional[List[str]]:
    """What differs between a loaded checkpoint and its integrity record: [] when all matches,
    None when the checkpoint has no record (a file written without one)."""
    if not isinstance(checkpoint, dict):
        return None
    if INTEGRITY_KEY not in checkpoint:
        damaged = [k for k, v in checkpoint.items() if looks_like_record(v)]
        if damaged:
            return ["the checksum record is stored under a damaged key %r" % (damaged[0],)]
        return None
    record = checkpoint[INTEGRITY_KEY]
    if not isinstance(record, dict) or set(record) != set(_RECORD_KEYS):
        return ["the checksum record is damaged (%s)" % (
            "keys %s" % sorted(map(str, record)) if isinstance(record, dict)
            else "a %s, not a dict" % type(record).__name__)]
    if record["algorithm"] != ALGORITHM or record["version"] != VERSION:
        return ["the checksum record names an unknown algorithm %r version %r"
                % (record["algorithm"], record["version"])]
    stored = record["tensors"]
    if not isinstance(stored, list) or not all(isinstance(d, str) for d in stored) \
            or not isinstance(record["metadata"], str):
        return ["the checksum record is damaged (its digests are not strings)"]
    metadata, tensors = _digests(checkpoint)
    problems = []
    if metadata != record["metadata"]:
        problems.append("metadata (keys, config, history, metrics or other non-tensor values) "
                        "does not match its checksum")
    if len(tensors) != len(stored):
        problems.append("the file holds %d tensors, its checksum record %d"
                        % (len(tensors), len(stored)))
    else:
        bad = [path for (path, t), digest in zip(tensors, stored) if _tensor_digest(t) != digest]
        if bad:
            problems.append("%d tensor%s do%s not match %s checksum%s: %s%s" % (
                len(bad), "s" if len(bad) > 1 else "", "" if len(bad) > 1 else "es",
                "their" if len(bad) > 1 else "its", "s" if len(bad) > 1 else "",
                ", ".join(bad[:5]), " and %d more" % (len(bad) - 5) if len(bad) > 5 else ""))
    return problems
