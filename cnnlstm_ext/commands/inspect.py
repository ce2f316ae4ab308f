"""Show what a checkpoint holds: epoch, metrics, parameter count, the architecture read off its
state dict (backbone, LSTM layers, hidden size, directions, classes), optimizer and scheduler
state, and the file size against the size expected for the parameters plus AdamW moments.

A .safetensors file of `cnnlstm-ext export --safetensors` shows its tensors (names, dtypes,
shapes), its metadata (source, epoch, metrics, classes, config) and the architecture read off it.

Tensor data is memory-mapped, not read: inspecting a large file is fast. Exit status 0; 2 when the
file cannot be read or is not a checkpoint (as for predict, evaluate and export).
"""
import json
import sys

from ..checkpoint import CheckpointError, canonical_names, inspect_checkpoint


def add_arguments(parser):
    parser.add_argument("file", help="checkpoint file (.pth), or a .safetensors export")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.add_argument("--no-integrity-check", dest="check_integrity", action="store_false",
                        help="skip the check of the checkpoint's checksum record (faster for a "
                             "large file you trust; a damaged file then loads unnoticed)")


def _num(n):
    return f"{n:,}"


def _mib(n):
    return "%.1f MiB" % (n / 2 ** 20)


def format_report(r) -> str:
    """The human-readable form of inspect_checkpoint's dict."""
    lines = ["%s  (%s bytes = %s, %s format)" % (r["path"], _num(r["size_bytes"]),
                                                   _mib(r["size_bytes"]), r["format"])]
    lines.append("top-level keys: %s" % ", ".join(r["keys"]))
    lines.append("checksum: %s" % (r.get("integrity") or "none (written without a checksum record)"))
    m, b = r["metrics"], r["best"]
    lines.append("epoch %s: " % r["epoch"] + ", ".join(
        "%s %s" % (k, "%.6g" % v if isinstance(v, float) else v)
        for k, v in m.items() if v is not None))
    if any(v is not None for v in b.values()):
        lines.append("best: " + ", ".join("%s %s" % (k, "%.6g" % v if isinstance(v, float) else v)
                                          for k, v in b.items() if v is not None))
    a = r["architecture"]
    if a is None:
        lines.append("no model state dict")
    else:
        lines += _architecture_lines(a)
    o = r["optimizer"]
    if o is None:
        lines.append("optimizer: none saved")
    else:
        lines.append("optimizer: %s, %d param group(s), state for %d parameters (%s), "
                     "moments %s%s" % (o["kind"], len(o["param_groups"]), o["states"],
                                       ", ".join(o["moments"]) or "no moments",
                                       _mib(o["moment_bytes"]),
                                       ", named" if o["param_names"] else ""))
        for i, g in enumerate(o["param_groups"]):
            lines.append("  group %d: %s" % (i, ", ".join("%s %s" % kv for kv in g.items())))
    s = r["scheduler"]
    lines.append("scheduler: none saved" if s is None else
                 "scheduler: " + ", ".join("%s %s" % kv for kv in s.items()))
    h = r["history"]
    if h:
        lines.append("history: %d epochs of %s" % (h["epochs"], ", ".join(h["fields"])))
    if r.get("config"):
        lines.append("config: %s" % json.dumps(r["config"], default=str))
    if "expected_size_bytes" in r:
        lines.append("file size %s; expected for params + buffers + 2 AdamW moments: %s (%.1f%%)"
                     % (_mib(r["size_bytes"]), _mib(r["expected_size_bytes"]),
                        100 * r["size_ratio"]))
    return "\n".join(lines)


def _architecture_lines(a) -> list:
    """describe_state_dict's findings (a checkpoint's model state dict, a safetensors file's
    tensors), as inspect prints them."""
    lines = ["parameters: %s (%s in buffers; %s)" % (
        _num(a["param_count"]), _num(a["buffer_count"]), ", ".join(a["dtypes"]))]
    lines.append("architecture (read off the state dict):")
    if a["backbone"]:
        x = a["backbone"]
        lines.append("  backbone    %-52s %12s" % (
            "%s under %s, %d features" % (x["name"] or "unrecognised CNN",
                                          x["prefix"] or x["modules"], x["features"]),
            _num(x["params"])))
    if a["spatial_proj"]:
        x = a["spatial_proj"]
        lines.append("  projection  %-52s %12s" % ("Linear(%d, %d) under %s" % (
            x["in_features"], x["out_features"], x["prefix"]), _num(x["params"])))
    if a["lstm"]:
        x = a["lstm"]
        lines.append("  lstm        %-52s %12s" % ("%d layer%s x %d direction%s, input %d, "
                                                   "hidden %d under %s" % (
            x["num_layers"], "" if x["num_layers"] == 1 else "s", 2 if x["bidirectional"] else 1,
            "s" if x["bidirectional"] else "", x["input_size"], x["hidden_size"],
            x["prefix"] or "(top level)"), _num(x["params"])))
    x = a["temporal_pool"]
    lines.append("  pooling     %-52s %12s" % (x["kind"], _num(x["params"])))
    if a["classifier"]:
        x = a["classifier"]
        lines.append("  classifier  %-52s %12s" % ("%s -> %d classes under %s" % (
            " -> ".join(str(i) for i, _ in x["linear_layers"]), x["num_classes"],
            x["prefix"] or "(top level)"), _num(x["params"])))
    for module, n in a["other"].items():
        lines.append("  other       %-52s %12s" % (module, _num(n)))
    if a["cnnlstm_config"]:
        lines.append("  fits CNNLSTM(%s)" % ", ".join("%s=%r" % kv
                                                    for kv in a["cnnlstm_config"].items()))
        rules = canonical_names(a)
        if rules:
            lines.append("  load with key_map=%r" % (rules,))
    else:
        lines.append("  does not fit CNNLSTM: " + "; ".join(a["mismatch"]))
    return lines


_TENSOR_LINES = 20  # tensors listed by the report of a safetensors file (--json: all)


def _value(v):
    return "%.6g" % v if isinstance(v, float) else str(v)


def format_safetensors_report(r) -> str:
    """The human-readable form of inspect_safetensors' dict."""
    lines = ["%s  (%s bytes = %s, safetensors format: a %s-byte header, then the tensors)" % (
        r["path"], _num(r["size_bytes"]), _mib(r["size_bytes"]), _num(r["header_bytes"]))]
    lines.append("tensors: %d (%s), %s of data" % (
        r["tensor_count"], ", ".join("%d %s" % (n, d) for d, n in sorted(r["dtypes"].items())),
        _mib(r["tensor_bytes"])))
    shown = r["tensors"][:_TENSOR_LINES]
    width = max((len(t["name"]) for t in shown), default=0)
    for t in shown:
        lines.append("  %-*s  %-4s %s" % (width, t["name"], t["dtype"], t["shape"]))
    if len(r["tensors"]) > len(shown):
        lines.append("  ... and %d more (--json lists every tensor)"
                     % (len(r["tensors"]) - len(shown)))
    m = r["metadata"]
    if not m:
        lines.append("metadata: none")
    else:
        lines.append("metadata: %s" % ", ".join(
            "%s %s" % (k, m[k]) if len(m[k]) <= 40 and "\n" not in m[k]
            else "%s (%d chars)" % (k, len(m[k])) for k in sorted(m)))
    known = [(k, v) for k, v in r["metrics"].items() if v is not None]
    if r["epoch"] is not None or known:
        lines.append("epoch %s" % _value(r["epoch"]) + (": " if known else "") + ", ".join(
            "%s %s" % (k, _value(v)) for k, v in known))
    best = [(k, v) for k, v in r["best"].items() if v is not None]
    if best:
        lines.append("best: " + ", ".join("%s %s" % (k, _value(v)) for k, v in best))
    if r["classes"] is not None:
        lines.append("classes: %d (%s%s)" % (len(r["classes"]), ", ".join(
            str(c) for c in r["classes"][:10]), ", ..." if len(r["classes"]) > 10 else ""))
    if r["architecture"] is not None:
        lines += _architecture_lines(r["architecture"])
    if r.get("config"):
        lines.append("config: %s" % json.dumps(r["config"], default=str))
    return "\n".join(lines)


def run(args) -> int:
    try:
        report = inspect_checkpoint(args.file, check_integrity=args.check_integrity)
    except (CheckpointError, FileNotFoundError) as e:
        print("error: %s" % " ".join(str(e).split()), file=sys.stderr)
        return 2  # an unreadable input file: 2, as for predict, evaluate, train and export
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    elif report["format"] == "safetensors":
        print(format_safetensors_report(report))
    else:
        print(format_report(report))
    return 0
