"""The summary report of a checkpoint folder: markdown and PNG plots, from the files alone.

`summarize(dir)` reads every checkpoint once, one at a time, with tensor data memory-mapped
(`torch.load(mmap=True, weights_only=True)`), so folders of hundreds of 381 MB files cost little
memory; it keeps only metadata, metrics and histories. It then writes `summary.md` (architecture
and parameter count, training configuration, a table of every checkpoint with notes, the best
checkpoint and why, file sizes with anomalies, recommendations), `summary.json` (the same
findings for programs) and `loss.png`, `accuracy.png`, `lr.png`.

Notes per epoch: initial, best, drop (val acc falls by >= `drop_fraction` of its previous value),
recovery (val acc back to its level before the last drop), overfitting (after the best epoch,
train loss below its value at the best epoch while val acc stays below the best, for at least
`patience` epochs), NaN loss, frozen accuracy (the same val acc for >= `frozen_run` epochs).
"""
import json
import math
import pathlib
import statistics

from .checkpoint import (CheckpointError, HISTORY_FIELDS, describe_state_dict, epoch_from_name,
                         expected_file_bytes, find_checkpoints, is_buffer_name,
                         normalize_checkpoint, read_checkpoint, verify_checkpoint)
from .checkpoint.verify import nonfinite_tensors

__all__ = ["summarize", "scan_folder", "analyse"]

_SIZE_TOLERANCE = 0.02  # a file more than 2% off the median size of its siblings is flagged


def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _mib(n):
    """A file size in MiB, or KiB below 1 MiB."""
    return "%.1f MiB" % (n / 2 ** 20) if n >= 2 ** 20 else "%.0f KiB" % (n / 2 ** 10)


# --- reading -------------------------------------------------------------------------------------

def _scan_file(path, describe, check_weights):
    """What the report needs from one file; the mapped tensors are released on return."""
    entry = {"path": str(path), "name": path.name, "size": path.stat().st_size,
             "named_epoch": epoch_from_name(path), "error": None, "problems": []}
    try:
        ckpt = normalize_checkpoint(read_checkpoint(path, mmap=True))
    except CheckpointError as e:
        entry["error"] = str(e).replace(str(path) + ": ", "", 1)
        return entry, None
    sd = ckpt["model_state_dict"] or {}
    opt = ckpt["optimizer_state_dict"]
    entry.update({k: ckpt[k] for k in ("epoch", "val_acc", "val_f1", "train_loss", "lr",
                                       "train_acc", "val_loss", "best_val_acc", "best_val_f1",
                                       "best_epoch")})
    entry["has_model"] = bool(sd)
    # The model's layout (names, shapes, dtypes): files of a different model stand out.
    entry["layout"] = {k: (tuple(v.shape), str(v.dtype).replace("torch.", ""))
                       for k, v in sd.items() if hasattr(v, "shape")}
    entry["has_optimizer"] = bool(opt and opt.get("state"))
    entry["has_scheduler"] = ckpt["scheduler_state_dict"] is not None
    entry["param_count"] = sum(v.numel() for k, v in sd.items() if not is_buffer_name(k))
    entry["state_bytes"] = sum(v.numel() * v.element_size() for v in sd.values())
    entry["history"] = ckpt["history"]
    entry["config"] = ckpt["config"]
    groups = (opt or {}).get("param_groups") or []
    entry["optimizer"] = {k: v for k, v in groups[0].items()
                          if k not in ("params", "param_names")} if groups else None
    sched = ckpt["scheduler_state_dict"]
    entry["scheduler"] = {k: v for k, v in sched.items() if not k.startswith("_")} \
        if sched else None
    architecture = describe_state_dict(sd) if describe and sd else None
    if check_weights:
        entry["problems"] = verify_checkpoint(path)
    elif _is_named_model(path.name) and sd:
        # The files a user takes the model from are always checked for NaN/Inf weights (their
        # model tensors only: a fraction of the file); --check-weights checks every file fully.
        bad = nonfinite_tensors(sd.items())
        if bad:
            entry["problems"] = ["NaN/Inf in %d of %d model tensors: %s"
                                 % (len(bad), len(sd), ", ".join(bad[:6])
                                    + (" and %d more" % (len(bad) - 6) if len(bad) > 6 else ""))]
    entry["weights_checked"] = bool(check_weights or (_is_named_model(path.name) and sd))
    return entry, architecture


def _is_named_model(name):
    """best_checkpoint.pth, latest_checkpoint.pth and the like: the files a model is taken from."""
    low = name.lower()
    return "best" in low or "latest" in low or "last" in low


def scan_folder(checkpoint_dir, check_weights=False):
    """(entries, architecture): one metadata dict per checkpoint file, and the architecture read
    off the newest readable file. check_weights also runs verify_checkpoint on each file (reads
    all tensor data once: NaN/Inf, CRCs)."""
    files = find_checkpoints(checkpoint_dir)
    entries, architecture, longest = [], None, None
    # Newest first for the architecture, so a changed model is described as it ended.
    for path in reversed(files):
        entry, arch = _scan_file(path, describe=architecture is None, check_weights=check_weights)
        entries.append(entry)
        architecture = architecture or arch
        # Keep one history, the longest: per-file histories of a long run add up to O(epochs^2).
        if entry.get("history"):
            if longest is None or _history_length(entry) > _history_length(longest):
                if longest is not None:
                    longest["history"] = None
                longest = entry
            else:
                entry["history"] = None
    entries.reverse()
    return entries, architecture


def _history_length(entry):
    return max((len(v) for v in entry["history"].values() if isinstance(v, list)), default=0)


def _epoch_series(entries):
    """Per-epoch metrics {epoch: {field: value}} from the longest history, with each file's own
    values for its epoch taking precedence."""
    series = {}
    readable = [e for e in entries if e["error"] is None]
    with_history = [e for e in readable if e.get("history")]
    if with_history:
        longest = max(with_history, key=lambda e: (_history_length(e), e.get("epoch") or 0))
        history = longest["history"]
        length = max((len(v) for v in history.values() if isinstance(v, list)), default=0)
        epochs = history.get("epoch") if isinstance(history.get("epoch"), list) else None
        last = longest.get("epoch") if longest.get("epoch") is not None else length
        for i in range(length):
            epoch = int(epochs[i]) if epochs and i < len(epochs) else last - length + 1 + i
            row = series.setdefault(epoch, {})
            for field in HISTORY_FIELDS:
                values = history.get(field)
                if isinstance(values, list) and i < len(values) and \
                        isinstance(values[i], (int, float)):
                    row[field] = float(values[i])
    for e in readable:
        if e.get("epoch") is None:
            continue
        row = series.setdefault(e["epoch"], {})
        for field in HISTORY_FIELDS:
            if isinstance(e.get(field), (int, float)):
                row[field] = float(e[field])
    return dict(sorted(series.items()))


# --- analysis ------------------------------------------------------------------------------------

_CHANCE_TOLERANCE = 0.05  # train loss within 5% of ln(classes) is chance level


def analyse(series, patience=10, drop_fraction=0.10, frozen_run=5, num_classes=None) -> dict:
    """Findings from per-epoch metrics {epoch: {val_acc, train_loss, ...}}: best epoch, notes per
    epoch, NaN onset, overfitting onset, frozen-accuracy runs, early-stop epoch, and (with
    num_classes) whether the train loss never left chance level, ln(num_classes): a model that
    learnt nothing."""
    epochs = list(series)
    notes = {e: [] for e in epochs}
    acc = {e: series[e].get("val_acc") for e in epochs}
    loss = {e: series[e].get("train_loss") for e in epochs}
    result = {"epochs": len(epochs), "first_epoch": epochs[0] if epochs else None,
              "last_epoch": epochs[-1] if epochs else None, "best_epoch": None,
              "best_val_acc": None, "nan_epochs": [], "nan_onset": None,
              "overfitting_onset": None, "overfitting_epochs": [], "frozen_runs": [],
              "drops": [], "recoveries": [], "early_stop_epoch": None, "patience": patience,
              "chance_loss": None, "chance_epochs": [], "notes": notes}
    if not epochs:
        return result
    notes[epochs[0]].append("initial")

    nan = [e for e in epochs if loss[e] is not None and not _finite(loss[e])]
    result["nan_epochs"], result["nan_onset"] = nan, (nan[0] if nan else None)
    for e in nan:
        notes[e].append("NaN loss")

    # Best: the highest val acc among epochs whose loss is not NaN (earliest on ties).
    candidates = [e for e in epochs if _finite(acc[e]) and e not in nan]
    if candidates:
        best = max(candidates, key=lambda e: (acc[e], -e))
        result["best_epoch"], result["best_val_acc"] = best, acc[best]
        notes[best].append("best")

    # Drops and recoveries of val acc.
    previous, level_before_drop = None, None
    for e in epochs:
        if not _finite(acc[e]):
            continue
        if previous is not None and e not in nan:
            if acc[e] < acc[previous] * (1 - drop_fraction) and acc[previous] > 0:
                notes[e].append("drop")
                result["drops"].append(e)
                level_before_drop = max(level_before_drop or 0.0, acc[previous])
            elif level_before_drop is not None and acc[e] >= level_before_drop:
                notes[e].append("recovery")
                result["recoveries"].append(e)
                level_before_drop = None
        previous = e

    # Frozen accuracy: the same value for frozen_run or more consecutive epochs.
    run = []
    for e in epochs + [None]:
        if e is not None and run and _finite(acc[e]) and _finite(acc[run[-1]]) \
                and abs(acc[e] - acc[run[-1]]) <= 1e-9 * max(1.0, abs(acc[e])):
            run.append(e)
            continue
        if len(run) >= frozen_run:
            result["frozen_runs"].append((run[0], run[-1], acc[run[0]]))
            for r in run:
                notes[r].append("frozen accuracy")
        run = [e] if e is not None and _finite(acc[e]) else []

    # Overfitting: after the best epoch, train loss lower than at the best epoch while val acc
    # stays below the best; sustained for at least `patience` epochs.
    best = result["best_epoch"]
    if best is not None and _finite(loss.get(best)):
        over = [e for e in epochs if e > best and e not in nan and _finite(loss[e])
                and _finite(acc[e]) and loss[e] < loss[best] and acc[e] < acc[best]]
        if len(over) >= patience:
            result["overfitting_onset"], result["overfitting_epochs"] = over[0], over
            for e in over:
                notes[e].append("overfitting")
        if epochs[-1] >= best + patience:
            result["early_stop_epoch"] = best + patience

    # Chance level: every finite train loss at ln(classes) or above (within the tolerance), the
    # loss of uniform predictions: the run learnt nothing (labels, learning rate, data).
    if num_classes and num_classes >= 2:
        chance = math.log(num_classes)
        finite = [e for e in epochs if _finite(loss[e])]
        if finite and all(loss[e] >= chance * (1 - _CHANCE_TOLERANCE) for e in finite):
            result["chance_loss"], result["chance_epochs"] = chance, finite
            for e in finite:
                notes[e].append("chance-level loss")
    return result


def _accuracy_scale(series, entries):
    """100 when accuracies are stored as fractions (all <= 1), else 1 (already percent)."""
    values = [row.get(f) for row in series.values() for f in ("val_acc", "train_acc")]
    values += [e.get("best_val_acc") for e in entries if e["error"] is None]
    values = [v for v in values if _finite(v)]
    return 100.0 if values and max(values) <= 1.0 else 1.0


def _size_findings(entries, architecture):
    readable = [e for e in entries if e["error"] is None]
    sizes = [e["size"] for e in entries]
    median = statistics.median(sizes) if sizes else 0
    anomalies = {}
    for e in entries:
        if median and abs(e["size"] - median) > _SIZE_TOLERANCE * median:
            anomalies[e["name"]] = "%s, %+.0f%% against the median %s" % (
                _mib(e["size"]), 100.0 * (e["size"] - median) / median, _mib(median))
    expected = expected_file_bytes(architecture) if architecture else None
    return {"median": median, "total": sum(sizes), "expected": expected,
            "anomalies": anomalies, "readable": len(readable)}


# --- plots ---------------------------------------------------------------------------------------

def _plot(path, title, ylabel, curves, result, scale=1.0):
    # The object-oriented API with the Agg canvas: no pyplot, no global backend change.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, xs, ys in curves:
        if xs:
            ax.plot(xs, [y * scale for y in ys], label=label, linewidth=1.2)
    best = result["best_epoch"]
    if best is not None:
        ax.axvline(best, color="tab:green", linestyle="--", linewidth=1,
                   label="best (epoch %d)" % best)
        for label, xs, ys in curves:
            if label == "val acc" and best in xs and _finite(ys[xs.index(best)]):
                ax.plot([best], [ys[xs.index(best)] * scale], marker="*", markersize=12,
                        color="tab:green")
    if result["nan_onset"] is not None:
        ax.axvspan(result["nan_onset"] - 0.5, result["last_epoch"] + 0.5, color="tab:red",
                   alpha=0.12,
                   label="NaN loss (from epoch %d)" % result["nan_onset"])
    if result["early_stop_epoch"] is not None:
        ax.axvline(result["early_stop_epoch"], color="tab:gray", linestyle="-.", linewidth=1,
                   label="early stop, patience %d (epoch %d)" % (result["patience"],
                                                                 result["early_stop_epoch"]))
    if result["overfitting_onset"] is not None:
        ax.axvline(result["overfitting_onset"], color="tab:orange", linestyle=":", linewidth=1,
                   label="overfitting onset (epoch %d)" % result["overfitting_onset"])
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _curve(series, field):
    xs = [e for e, row in series.items() if field in row]
    return xs, [series[e][field] for e in xs]


def _plots(out_dir, series, result, scale):
    made = {}
    specs = [("loss.png", "Loss", "loss",
              [("train loss", "train_loss"), ("val loss", "val_loss")], 1.0),
             ("accuracy.png", "Accuracy", "accuracy (%)" if scale == 100 else "accuracy",
              [("train acc", "train_acc"), ("val acc", "val_acc"),
               ("val F1 x100" if scale == 100 else "val F1", "val_f1")], scale),
             ("lr.png", "Learning rate", "learning rate", [("lr", "lr")], 1.0)]
    for name, title, ylabel, fields, s in specs:
        curves = [(label,) + _curve(series, field) for label, field in fields]
        if any(xs for _, xs, _ in curves):
            _plot(out_dir / name, title, ylabel, curves, result, s)
            made[name] = title
    return made


# --- markdown ------------------------------------------------------------------------------------

def _fmt(value, scale=1.0, digits=2):
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value).replace("nan", "NaN").replace("inf", "Inf")
    if isinstance(value, float):
        return "%.*f" % (digits, value * scale)
    return str(value)


def _fmt_loss(value):
    return _fmt(value, digits=4)


def _fmt_lr(value):
    return "-" if value is None else ("%.3g" % value if _finite(value) else _fmt(value))


def _flatten(config, prefix=""):
    rows = []
    for k, v in config.items():
        if isinstance(v, dict):
            rows += _flatten(v, "%s%s." % (prefix, k))
        else:
            rows.append(("%s%s" % (prefix, k), v))
    return rows


def _scheduler_kind(sched):
    if not sched:
        return None
    for key, kind in (("T_max", "CosineAnnealingLR"), ("T_0", "CosineAnnealingWarmRestarts"),
                      ("milestones", "MultiStepLR"), ("step_size", "StepLR"),
                      ("total_steps", "OneCycleLR"), ("patience", "ReduceLROnPlateau"),
                      ("gamma", "ExponentialLR")):
        if key in sched:
            return kind
    return "unknown scheduler"


def _architecture_md(arch):
    if arch is None:
        return ["No readable checkpoint: the architecture could not be read."]
    lines = ["| part | what | parameters |", "| --- | --- | ---: |"]
    b = arch.get("backbone")
    if b:
        lines.append("| backbone `%s` | %s, %d features | %s |" % (
            b["prefix"] or ", ".join(b["modules"]), b["name"] or "unrecognised CNN",
            b["features"], f"{b['params']:,}"))
    p = arch.get("spatial_proj")
    if p:
        lines.append("| projection `%s` | Linear(%d, %d) | %s |" % (
            p["prefix"], p["in_features"], p["out_features"], f"{p['params']:,}"))
    s = arch.get("lstm")
    if s:
        lines.append("| LSTM `%s` | %d layer%s, %s, input %d, hidden %d | %s |" % (
            s["prefix"], s["num_layers"], "s" if s["num_layers"] > 1 else "",
            "bidirectional" if s["bidirectional"]
            else "one direction", s["input_size"], s["hidden_size"], f"{s['params']:,}"))
    t = arch.get("temporal_pool") or {}
    lines.append("| temporal pooling | %s | %s |" % (t.get("kind", "-"),
                                                     f"{t.get('params', 0):,}"))
    c = arch.get("classifier")
    if c:
        lines.append("| classifier `%s` | %s -> %d classes | %s |" % (
            c["prefix"], " -> ".join(str(i) for i, _ in c["linear_layers"]), c["num_classes"],
            f"{c['params']:,}"))
    for module, n in (arch.get("other") or {}).items():
        lines.append("| other `%s` | not recognised | %s |" % (module, f"{n:,}"))
    lines.append("| **total** | %s | **%s** |" % (", ".join(arch["dtypes"]),
                                                    f"{arch['param_count']:,}"))
    lines.append("")
    if arch.get("cnnlstm_config"):
        lines.append("Fits `cnnlstm_ext.CNNLSTM(%s)`." % ", ".join(
            "%s=%r" % kv for kv in arch["cnnlstm_config"].items()))
    else:
        lines.append("Does not fit `cnnlstm_ext.CNNLSTM` as it is: %s." % "; ".join(
            arch["mismatch"]))
    return lines


def _config_md(entries):
    newest = next((e for e in reversed(entries) if e["error"] is None), None)
    if newest is None:
        return ["No readable checkpoint."]
    rows = []
    if newest.get("config"):
        rows += [(k, v) for k, v in _flatten(newest["config"])]
    opt = newest.get("optimizer")
    if opt:
        rows += [("optimizer.%s" % k, v) for k, v in opt.items()
                 if k in ("lr", "initial_lr", "weight_decay", "betas", "eps", "momentum",
                          "amsgrad", "decoupled_weight_decay")]
    sched = newest.get("scheduler")
    if sched:
        rows.append(("scheduler", _scheduler_kind(sched)))
        rows += [("scheduler.%s" % k, v) for k, v in sched.items()
                 if k in ("T_max", "eta_min", "T_0", "step_size", "gamma", "milestones",
                          "last_epoch", "base_lrs")]
    lines = []
    if not newest.get("config"):
        lines.append("The files record no `config`; what follows is read off the optimizer and "
                     "scheduler state of `%s`." % newest["name"])
        lines.append("")
    else:
        lines.append("From `%s`." % newest["name"])
        lines.append("")
    lines += ["| setting | value |", "| --- | --- |"]
    lines += ["| %s | %s |" % (k, v) for k, v in rows]
    return lines


def _file_notes(e, sizes, best_epoch, last_epoch):
    notes = []
    if e["error"]:
        notes.append("**unreadable**: %s" % e["error"])
        return notes
    if not e.get("has_model"):
        notes.append("**no model state**")
    if not e.get("has_optimizer"):
        notes.append("**no optimizer state**")
    if e["named_epoch"] is not None and e.get("epoch") is not None \
            and e["named_epoch"] != e["epoch"]:
        notes.append("**name says epoch %d**" % e["named_epoch"])
    if e["named_epoch"] is None and e.get("epoch") is not None:
        if e["epoch"] == best_epoch:
            notes.append("holds the best epoch")
        elif e["epoch"] == last_epoch:
            notes.append("holds the last epoch")
    for p in e.get("problems") or []:
        notes.append("**%s**" % p)
    if e.get("model_differs"):
        notes.append("**different model: %s**" % e["model_differs"])
    if e["name"] in sizes["anomalies"]:
        notes.append("**size %s**" % sizes["anomalies"][e["name"]])
    return notes


def _table_md(entries, result, sizes, scale):
    lines = ["| file | epoch | best val acc | val acc | train loss | lr | val F1 | size | notes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for e in entries:
        epoch = e.get("epoch")
        notes = list(result["notes"].get(epoch, [])) if epoch is not None else []
        notes += _file_notes(e, sizes, result["best_epoch"], result["last_epoch"])
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            e["name"], _fmt(epoch), _fmt(e.get("best_val_acc"), scale),
            _fmt(e.get("val_acc"), scale), _fmt_loss(e.get("train_loss")),
            _fmt_lr(e.get("lr")), _fmt(e.get("val_f1"), 1.0, 4), _mib(e["size"]),
            ", ".join(notes)))
    return lines


def _best_md(entries, series, result, scale):
    best = result["best_epoch"]
    if best is None:
        return ["No epoch has a finite val acc and loss: there is no best checkpoint."]
    row = series[best]
    unit = "%" if scale == 100 else ""
    lines = ["Epoch **%d**: val acc %s%s, the highest of %d epochs%s." % (
        best, _fmt(row.get("val_acc"), scale), unit, result["epochs"],
        " with a finite loss" if result["nan_epochs"] else "")]
    if "val_f1" in row:
        lines[-1] += " Val F1 %s." % _fmt(row["val_f1"], 1.0, 4)
    if "train_loss" in row:
        lines[-1] += " Train loss %s." % _fmt_loss(row["train_loss"])
    files = [e["name"] for e in entries if e["error"] is None and e.get("epoch") == best]
    if files:
        lines.append("")
        lines.append("Files holding it: %s." % ", ".join("`%s`" % f for f in files))
    else:
        lines.append("")
        lines.append("**No readable file holds epoch %d.**" % best)
    named_best = [e for e in entries if "best" in e["name"].lower() and e["error"] is None]
    for e in named_best:
        if e.get("epoch") != best:
            lines.append("")
            lines.append("**`%s` holds epoch %s, not the best epoch %d.**"
                         % (e["name"], e.get("epoch"), best))
    return lines


def _sizes_md(entries, sizes):
    lines = ["%d files, %s in all; median %s." % (len(entries), _mib(sizes["total"]),
                                                   _mib(sizes["median"]))]
    if sizes["expected"]:
        ratio = sizes["median"] / sizes["expected"] if sizes["expected"] else 0
        lines[-1] += (" Expected for the parameters and buffers plus two float32 AdamW moments "
                      "per parameter: %s (the median is %.0f%% of it)."
                      % (_mib(sizes["expected"]), 100 * ratio))
    if sizes["anomalies"]:
        lines.append("")
        lines.append("Anomalies:")
        lines.append("")
        for name, what in sizes["anomalies"].items():
            entry = next(e for e in entries if e["name"] == name)
            why = "unreadable: %s" % entry["error"] if entry["error"] else (
                "no optimizer state" if not entry.get("has_optimizer") else
                "reads completely; check it with `cnnlstm-ext verify`")
            lines.append("- `%s`: %s (%s)" % (name, what, why))
    else:
        lines.append("")
        lines.append("No file is more than %d%% off the median." % (100 * _SIZE_TOLERANCE))
    return lines


def _recommendations(entries, series, result, sizes, scale):
    recs = []
    unit = "%" if scale == 100 else ""
    best, last = result["best_epoch"], result["last_epoch"]
    if result["early_stop_epoch"] is not None:
        wasted = last - result["early_stop_epoch"]
        recs.append("**Stop early.** Val acc peaked at epoch %d (%s%s); with early stopping "
                    "(patience %d) training would have ended at epoch %d, saving %d of %d epochs "
                    "(%.0f%%). Keep the epoch-%d checkpoint as the model." % (
                        best, _fmt(result["best_val_acc"], scale), unit, result["patience"],
                        result["early_stop_epoch"], wasted, result["epochs"],
                        100.0 * wasted / max(1, result["epochs"]), best))
    if result["nan_onset"] is not None:
        onset = result["nan_onset"]
        # The newest sound file before the onset, a per-epoch file before best/latest copies.
        sound = sorted((e for e in entries if e["error"] is None and e.get("epoch") is not None
                        and e["epoch"] < onset and e.get("has_optimizer")
                        and _finite(e.get("train_loss")) and not e.get("problems")),
                       key=lambda e: (e["epoch"], e["named_epoch"] is not None))
        frozen = [r for r in result["frozen_runs"] if r[1] >= onset]
        recs.append("**NaN loss from epoch %d** (%d epoch%s%s). The weights are poisoned from "
                    "there on; resume from %s with a lower learning rate, gradient clipping "
                    "and a NaN guard that rolls back to the last sound checkpoint." % (
                        onset, len(result["nan_epochs"]),
                        "s" if len(result["nan_epochs"]) > 1 else "",
                        ", val acc frozen at %s%s" % (_fmt(frozen[0][2], scale), unit)
                        if frozen else "",
                        "`%s` (epoch %d, the last sound file before it)"
                        % (sound[-1]["name"], sound[-1]["epoch"]) if sound
                        else "the last checkpoint before it"))
    if result["overfitting_onset"] is not None:
        onset = result["overfitting_onset"]
        over = result["overfitting_epochs"]
        recs.append("**Overfitting from epoch %d.** In %d epochs after the best, train loss is "
                    "below its value at epoch %d (%s, down to %s) while val acc stays below %s%s. "
                    "Add regularisation (dropout, stronger weight decay), augmentation, or stop "
                    "early." % (onset, len(over), best, _fmt_loss(series[best].get("train_loss")),
                                _fmt_loss(min(series[e]["train_loss"] for e in over)),
                                _fmt(result["best_val_acc"], scale), unit))
    for start, end, value in result["frozen_runs"]:
        if result["nan_onset"] is None or end < result["nan_onset"]:
            recs.append("**Val acc frozen at %s%s from epoch %d to %d**: predictions stopped "
                        "changing; check the learning rate (it may have decayed to nothing) and "
                        "the data pipeline." % (_fmt(value, scale), unit, start, end))
    if result.get("chance_loss") is not None:
        epochs = result["chance_epochs"]
        recs.append("**Train loss at chance level** (ln %d classes = %.4f) in every epoch (%d to "
                    "%d): the model predicts no better than uniformly. Check the labels, the "
                    "learning rate and the data pipeline." % (
                        round(math.exp(result["chance_loss"])), result["chance_loss"],
                        epochs[0], epochs[-1]))
    differ = [e for e in entries if e.get("model_differs")]
    if differ:
        recs.append("**Files of different models in one folder**: %s. Their metrics are not "
                    "those of one run: move them to their own folders." % ", ".join(
                        "`%s` (%s)" % (e["name"], e["model_differs"]) for e in differ))
    bad = [e for e in entries if e["error"] or not e.get("has_optimizer") or e.get("problems")]
    if bad:
        recs.append("**Replace or delete the damaged files**: %s. Write checkpoints atomically "
                    "(`cnnlstm_ext.checkpoint.save_checkpoint`: temp file, fsync, rename) so a "
                    "crash or a full disk cannot leave a partial file, and run "
                    "`cnnlstm-ext verify` after each save." % ", ".join(
                        "`%s` (%s)" % (e["name"], e["error"] or "; ".join(e.get("problems") or [])
                                       or "no optimizer state") for e in bad))
    if not recs:
        unchecked = [e for e in entries if e["error"] is None and not e.get("weights_checked")]
        recs.append("Nothing to fix: no NaN loss, no sustained overfitting, no damaged file%s." % (
            "; the weights of %d file%s were not checked for NaN/Inf (--check-weights checks "
            "them)" % (len(unchecked), "s" if len(unchecked) > 1 else "") if unchecked else ""))
    return ["- " + r for r in recs]


def _mark_different_models(entries):
    """Sets `model_differs` (what differs, one phrase) on each readable file whose model layout
    (parameter names, shapes, dtypes) is not the one most files share."""
    layouts = [e for e in entries if e["error"] is None and e.get("layout")]
    if len(layouts) < 2:
        return
    keyed = {}
    for e in layouts:
        keyed.setdefault(tuple(sorted(e["layout"].items())), []).append(e)
    if len(keyed) < 2:
        return
    common = max(keyed.values(), key=len)[0]
    ref, ref_params = common["layout"], common["param_count"]
    for e in layouts:
        lay = e["layout"]
        if lay == ref:
            continue
        what = []
        if e["param_count"] != ref_params:
            what.append("%s parameters against %s" % (f"{e['param_count']:,}", f"{ref_params:,}"))
        missing, extra = sorted(set(ref) - set(lay)), sorted(set(lay) - set(ref))
        shaped = sorted(k for k in set(ref) & set(lay) if lay[k][0] != ref[k][0])
        typed = sorted(k for k in set(ref) & set(lay) if lay[k][0] == ref[k][0]
                       and lay[k][1] != ref[k][1])
        if shaped:
            what.append("shape of %s %s instead of %s%s" % (
                shaped[0], list(lay[shaped[0]][0]), list(ref[shaped[0]][0]),
                " and %d more" % (len(shaped) - 1) if len(shaped) > 1 else ""))
        if missing:
            what.append("lacks %s%s" % (", ".join(missing[:3]), ", ..." if len(missing) > 3 else ""))
        if extra:
            what.append("has %s%s" % (", ".join(extra[:3]), ", ..." if len(extra) > 3 else ""))
        if typed:
            what.append("dtype of %s %s instead of %s" % (typed[0], lay[typed[0]][1],
                                                          ref[typed[0]][1]))
        e["model_differs"] = "; ".join(what) + " (the other files: `%s`)" % common["name"]


def _num_classes(architecture, entries):
    """The classes of the model, from its classifier or the newest config; None if unknown."""
    classifier = (architecture or {}).get("classifier") or {}
    if classifier.get("num_classes"):
        return int(classifier["num_classes"])
    for e in reversed(entries):
        model = (e.get("config") or {}).get("model") if e["error"] is None else None
        if isinstance(model, dict) and isinstance(model.get("num_classes"), int):
            return model["num_classes"]
    return None


def summarize(checkpoint_dir, out_dir=None, patience=10, check_weights=False,
              drop_fraction=0.10, frozen_run=5) -> pathlib.Path:
    """Write the summary report of a checkpoint folder; returns the markdown file's path.

    out_dir defaults to `<checkpoint_dir>/summary`. patience sets the early-stop epoch and how
    long overfitting must last; check_weights runs verify_checkpoint on every file (reads every
    tensor once: NaN/Inf in weights and moments, CRC errors).
    """
    checkpoint_dir = pathlib.Path(checkpoint_dir)
    entries, architecture = scan_folder(checkpoint_dir, check_weights=check_weights)
    if not entries:
        raise FileNotFoundError("no checkpoint files (*.pth, *.pt, *.ckpt, *.tar) in %s"
                                % checkpoint_dir)
    out_dir = pathlib.Path(out_dir) if out_dir is not None else checkpoint_dir / "summary"
    out_dir.mkdir(parents=True, exist_ok=True)
    _mark_different_models(entries)
    series = _epoch_series(entries)
    result = analyse(series, patience=patience, drop_fraction=drop_fraction,
                     frozen_run=frozen_run, num_classes=_num_classes(architecture, entries))
    scale = _accuracy_scale(series, entries)
    sizes = _size_findings(entries, architecture)
    plots = _plots(out_dir, series, result, scale)

    md = ["# Training summary: `%s`" % checkpoint_dir, ""]
    md.append("%d checkpoint files, epochs %s to %s; accuracies in %s." % (
        len(entries), _fmt(result["first_epoch"]), _fmt(result["last_epoch"]),
        "percent" if scale == 100 else "the files' units"))
    md += ["", "## Architecture and parameters", ""] + _architecture_md(architecture)
    md += ["", "## Training configuration", ""] + _config_md(entries)
    md += ["", "## Checkpoints", ""] + _table_md(entries, result, sizes, scale)
    md += ["", "## Best checkpoint", ""] + _best_md(entries, series, result, scale)
    md += ["", "## File sizes", ""] + _sizes_md(entries, sizes)
    md += ["", "## Recommendations", ""] + _recommendations(entries, series, result, sizes,
                                                              scale)
    if plots:
        md += ["", "## Plots", ""]
        md += ["![%s](%s)" % (title, name) for name, title in plots.items()]
    md.append("")
    path = out_dir / "summary.md"
    path.write_text("\n".join(md))

    findings = {k: v for k, v in result.items() if k != "notes"}
    findings["notes"] = {str(e): n for e, n in result["notes"].items() if n}
    findings["files"] = [{k: v for k, v in e.items() if k not in ("history", "config", "layout")}
                         for e in entries]
    findings["sizes"] = sizes
    findings["architecture"] = architecture
    findings["plots"] = list(plots)
    (out_dir / "summary.json").write_text(json.dumps(findings, indent=1, default=str,
                                                     allow_nan=True))
    return path
