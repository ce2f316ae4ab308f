"""Show what a checkpoint holds: epoch, metrics, parameter count, the architecture read off its
state dict (backbone, LSTM layers, hidden size, directions, classes), optimizer and scheduler
state, and the file size against the size expected for the parameters plus AdamW moments.

Tensor data is memory-mapped, not read: inspecting a large file is fast.
"""
import json

from ..checkpoint import CheckpointError, canonical_names, inspect_checkpoint


def add_arguments(parser):
    parser.add_argument("file", help="checkpoint file (.pth)")
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
        lines.append("parameters: %s (%s in buffers; %s)" % (
            _num(a["param_count"]), _num(a["buffer_count"]), ", ".join(a["dtypes"])))
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
            lines.append("  lstm        %-52s %12s" % ("%d layers x %d direction%s, input %d, "
                                                       "hidden %d under %s" % (
                x["num_layers"], 2 if x["bidirectional"] else 1,
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


def run(args) -> int:
    try:
        report = inspect_checkpoint(args.file, check_integrity=args.check_integrity)
    except (CheckpointError, FileNotFoundError) as e:
        print("error: %s" % e)
        return 1
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        print(format_report(report))
    return 0
