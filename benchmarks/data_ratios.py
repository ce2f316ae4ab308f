"""The goals of benchmarks/bench_data.py, as ratios within one pytest-benchmark JSON (one run).

    python benchmarks/data_ratios.py data.json [--markdown]

Rates are clips per second: extra_info["clips"] / the median round. Where the numerator's entry
timed its baseline interleaved with its rounds (extra_info["baseline_interleaved_median_s"] and
"baseline_clips", bench_data.py), the goal is computed from that baseline (basis "interleaved"),
else from the baseline's own entry (basis "separate"). Goals (issue 20):

  files >= 0.7 x ceiling       per T and transform: the loader against pure decoding (same frames)
  long_clip <= 3 x short_clip  seconds per clip: a clip cut out of a 60 s video against a short one
  cache >= 10 x files          per T, train transform: the decoded-clip cache against the files
  features >= 20 x frozen      an epoch of LSTM + head on cached features against the frozen
                               backbone run on the frames

and, for information (no target): long_decode, the cost of only decoding the long clip's frames
against a short video's: what its 4.7 times larger frames cost on one decoding thread (the
reader's costs per clip, the same for both, pull the goal's ratio below it).

Exit status 1 when a goal fails or a case is missing.
"""
import argparse
import json
import sys
from typing import Dict, List


def _entries(report: dict):
    for bench in report.get("benchmarks", []):
        info = bench.get("extra_info") or {}
        if "kind" in info and bench["stats"]["median"] > 0:
            yield (info["kind"], info.get("T"), info.get("transform")), bench, info


def rates(report: dict) -> Dict[tuple, float]:
    """{(kind, T, transform): clips per second} of a pytest-benchmark report."""
    return {key: info["clips"] / bench["stats"]["median"] for key, bench, info in _entries(report)}


def interleaved_baseline_rates(report: dict) -> Dict[tuple, float]:
    """{(kind, T, transform) of an entry: clips per second of the baseline timed between its
    rounds}, for the entries that timed one."""
    return {key: info["baseline_clips"] / info["baseline_interleaved_median_s"]
            for key, _, info in _entries(report)
            if info.get("baseline_interleaved_median_s", 0) > 0 and info.get("baseline_clips")}


def goals(report: dict) -> List[dict]:
    """One row per goal: name, value (the ratio), target, ok (None: a case is missing)."""
    r, interleaved = rates(report), interleaved_baseline_rates(report)
    rows = []

    def row(name, num, den, target, at_least=True, invert=False):
        if num in r and num in interleaved:
            base, basis = interleaved[num], "interleaved"
        elif num in r and den in r:
            base, basis = r[den], "separate"
        else:
            rows.append({"goal": name, "value": None, "target": target, "ok": None,
                         "at_least": at_least})
            return
        value = base / r[num] if invert else r[num] / base
        ok = value >= target if at_least else value <= target
        rows.append({"goal": name, "value": value, "target": target, "ok": ok,
                     "at_least": at_least, "basis": basis})

    for T in (16, 32):
        for tf in ("train", "eval"):
            row("files / ceiling, T=%d %s" % (T, tf), ("files", T, tf), ("ceiling", T, None), 0.7)
    # cost per clip = 1 / rate: long / short = short rate / long rate
    row("long clip / short clip (cost)", ("long_clip", 32, "train"), ("short_clip", 32, "train"),
        3.0, at_least=False, invert=True)
    for T in (16, 32):
        row("cache / files, T=%d" % T, ("cache", T, "train"), ("files", T, "train"), 10.0)
    row("features / frozen (epoch)", ("features", 16, None), ("frozen", 16, None), 20.0)
    key = ("long_decode", 32, None)
    if key in r and key in interleaved:
        rows.append({"goal": "long clip / short clip, decoding alone",
                     "value": interleaved[key] / r[key], "target": None, "ok": None,
                     "info": True, "basis": "interleaved"})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    with open(args.json) as f:
        report = json.load(f)
    r = rates(report)
    if args.markdown:
        print("| kind | T | transform | clips/s |\n| --- | ---: | --- | ---: |")
        for (kind, T, tf), v in sorted(r.items(), key=lambda kv: (str(kv[0][1]), kv[0][0])):
            print("| %s | %s | %s | %.1f |" % (kind, T or "", tf or "", v))
        print("\n| goal | ratio | basis | target | |\n| --- | ---: | --- | ---: | --- |")
    failed = False
    for g in goals(report):
        value = "-" if g["value"] is None else "%.2f" % g["value"]
        status = "MISSING" if g["ok"] is None else ("PASS" if g["ok"] else "FAIL")
        target = "%s %g" % (">=" if g.get("at_least", True) else "<=", g["target"]) \
            if g["target"] is not None else "-"
        basis = g.get("basis", "-")
        if g.get("info"):
            status = "(info)"
        else:
            failed |= g["ok"] is not True
        if args.markdown:
            print("| %s | %s | %s | %s | %s |" % (g["goal"], value, basis, target, status))
        else:
            print("%-34s %8s  %-11s  target %s   %s" % (g["goal"], value, basis, target, status))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
