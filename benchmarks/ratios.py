"""Speed and memory ratios of fused kernels against their baselines, from pytest-benchmark JSON.

Usage:
    python -m pytest benchmarks/bench_lstm_cpu.py --benchmark-json=lstm_cpu.json
    python benchmarks/ratios.py lstm_cpu.json [more.json ...] [--markdown]

Convention, followed by every benchmark in benchmarks/:

* One pytest-benchmark *group* per case: everything that differs between the compared calls is
  the implementation, nothing else (``benchmark.group = "lstm_cpu:training"``).
* Each benchmark names the implementation it times in ``extra_info["impl"]``: ``"baseline"``
  (the PyTorch implementation compared against; one per group) or ``"fused"`` (ours; a group may
  hold several, told apart by name). When ``extra_info`` has no ``"impl"``, the parametrize id of
  the test decides: ``test_x[training-fused]`` is fused, ``test_x[training-baseline]`` the
  baseline (the words are matched as whole ``-``/``_``-separated parts of the id).
* ``extra_info["peak_bytes"]`` (optional): the peak memory of one call of that implementation, in
  bytes, measured the same way for both; it gives the memory ratio.
* ``extra_info["baseline_interleaved_median_s"]`` (optional, on a fused entry): the median of
  baseline calls timed between that test's own rounds. It replaces the baseline test's median
  (basis "interleaved"): on a shared machine the load changes between two tests.

A benchmark may instead time its baseline itself, in the same test (bench_pooling.py does: the
unfused sequence runs before each round of the fused op): it records ``extra_info["fused_ms"]``
and ``extra_info["unfused_ms"]`` (or ``"baseline_ms"``), the best round of each, and is a row of
its own (basis "best round").

For every fused benchmark the table shows the times (basis "median" for pairs),
``speedup = baseline / fused`` (above 1: fused is faster) and ``memory = fused / baseline`` peak
(below 1: fused needs less). Ratios are formed only within one JSON file (one run, one machine),
never across files.
"""
import argparse
import json
import re
import sys
from typing import Dict, List, Optional

IMPLS = ("fused", "baseline")


def impl_of(bench: dict) -> Optional[str]:
    """'fused', 'baseline' or None (not part of a comparison)."""
    impl = (bench.get("extra_info") or {}).get("impl")
    if impl in IMPLS:
        return impl
    match = re.search(r"\[(.*)\]$", bench.get("name", ""))
    if match:
        parts = re.split(r"[-_]", match.group(1))
        found = [p for p in parts if p in IMPLS]
        if len(found) == 1:
            return found[0]
    return None


def inline_row(bench: dict, source: str) -> Optional[Dict]:
    """The row of a benchmark that timed its own baseline (fused_ms / unfused_ms), else None."""
    info = bench.get("extra_info") or {}
    fused_ms = info.get("fused_ms")
    base_ms = info.get("unfused_ms", info.get("baseline_ms"))
    if fused_ms is None or base_ms is None:
        return None
    group = bench.get("group") or ""
    return {
        "source": source, "group": group, "name": bench["name"],
        "label": f"{group} {bench['name']}", "basis": "best round",
        "fused_s": fused_ms / 1e3, "baseline_s": base_ms / 1e3,
        "speedup": base_ms / fused_ms if fused_ms > 0 else float("nan"),
        "fused_peak_bytes": None, "baseline_peak_bytes": None, "memory_ratio": None,
        "extra_info": info,
    }


def ratio_rows(report: dict, source: str) -> List[Dict]:
    """One row per fused benchmark that has a baseline in its group, and one per benchmark that
    timed its own baseline."""
    groups: Dict[str, Dict[str, list]] = {}
    rows = []
    for bench in report.get("benchmarks", []):
        impl = impl_of(bench)
        if impl is not None:
            groups.setdefault(bench.get("group") or "", {"fused": [], "baseline": []})[impl].append(bench)
        else:
            row = inline_row(bench, source)
            if row is not None:
                rows.append(row)
    for group, members in groups.items():
        if len(members["baseline"]) != 1:
            if members["fused"]:
                print(f"{source}: group {group!r} has {len(members['baseline'])} baselines, "
                      f"expected 1; skipped", file=sys.stderr)
            continue
        base = members["baseline"][0]
        base_median = base["stats"]["median"]
        base_peak = (base.get("extra_info") or {}).get("peak_bytes")
        for fused in members["fused"]:
            median = fused["stats"]["median"]
            info = fused.get("extra_info") or {}
            peak = info.get("peak_bytes")
            baseline_s = info.get("baseline_interleaved_median_s", base_median)
            rows.append({
                "source": source,
                "group": group,
                "name": fused["name"],
                # Several fused variants in one group are told apart by their names.
                "label": group if len(members["fused"]) == 1 else f"{group} {fused['name']}",
                "basis": "interleaved" if "baseline_interleaved_median_s" in info else "median",
                "fused_s": median,
                "baseline_s": baseline_s,
                "speedup": baseline_s / median if median > 0 else float("nan"),
                "fused_peak_bytes": peak,
                "baseline_peak_bytes": base_peak,
                "memory_ratio": (peak / base_peak) if peak is not None and base_peak else None,
                "extra_info": info,  # the fused entry's
            })
    rows.sort(key=lambda r: (r["source"], r["group"], r["name"]))
    return rows


def machine_line(report: dict) -> str:
    info = report.get("machine_info") or {}
    cpu = (info.get("cpu") or {}).get("brand_raw") or info.get("processor") or "?"
    return f"{info.get('node', '?')}: {cpu}, {info.get('system', '?')} {info.get('machine', '?')}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def _mib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def format_table(rows: List[Dict], markdown: bool) -> str:
    header = ["group", "basis", "fused (ms)", "baseline (ms)", "speedup", "fused peak (MiB)",
              "baseline peak (MiB)", "memory"]
    body = []
    for r in rows:
        body.append([r["label"], r["basis"], _ms(r["fused_s"]), _ms(r["baseline_s"]),
                     f"{r['speedup']:.2f}x", _mib(r["fused_peak_bytes"]),
                     _mib(r["baseline_peak_bytes"]),
                     "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}"])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(row) for row in body])


def json_files_cli(description: str, argv=None, markdown: bool = False):
    """The command line of this script and of targets.py: the parsed arguments, and (path,
    report) for each pytest-benchmark JSON file named."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("json_files", nargs="+", help="pytest-benchmark --benchmark-json output")
    if markdown:
        parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)

    def reports():
        for path in args.json_files:
            with open(path) as f:
                yield path, json.load(f)
    return args, reports()


def main(argv=None) -> int:
    args, reports = json_files_cli(__doc__.split("\n")[0], argv, markdown=True)
    status = 0
    for path, report in reports:
        rows = ratio_rows(report, path)
        print(f"{path} ({machine_line(report)})")
        if not rows:
            print("  no fused/baseline pairs found")
            status = 1
            continue
        print(format_table(rows, args.markdown))
        print()
    return status


if __name__ == "__main__":
    sys.exit(main())
