"""Prints the fused/unfused table of a pytest-benchmark JSON written by bench_pooling.py.

    python benchmarks/pooling_ratios.py pool.json [more.json ...] [--markdown]

One row per fused benchmark: median time per call of the fused op and of its baseline (the unfused
sequence, same group, same run), the speedup (baseline / fused), and the bandwidth the fused op
reaches counting bytes read and written once, with its share of the copy bandwidth measured in the
same session (CUDA). benchmarks/ratios.py gives the speedups of every benchmark of the project;
this table adds the bandwidth columns of the pooling goals.
"""
import argparse
import json
import sys


def rows(paths):
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        cpu = data.get("machine_info", {}).get("cpu", {}).get("brand_raw", "?")
        benches = data.get("benchmarks", [])
        per_call = {}  # group -> {impl: median seconds per call}
        for bench in benches:
            info = bench.get("extra_info", {})
            if info.get("impl") in ("fused", "baseline"):
                calls = info.get("calls_per_round", 1)
                per_call.setdefault(bench["group"], {})[info["impl"]] = bench["stats"]["median"] / calls
        for bench in benches:
            info = bench.get("extra_info", {})
            times = per_call.get(bench["group"], {})
            if info.get("impl") != "fused" or "baseline" not in times:
                continue
            device = info.get("device", "?")
            yield {
                "name": bench["group"],
                "device": "%s, %s" % (cpu, device) if device.startswith("cpu") else device,
                "fused_ms": 1e3 * times["fused"],
                "unfused_ms": 1e3 * times["baseline"],
                "speedup": times["baseline"] / times["fused"],
                "GBps": info.get("GBps", ""),
                "copy": info.get("copy_fraction", ""),
            }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json output")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    table = list(rows(args.json))
    if not table:
        print("no fused/unfused benchmarks found", file=sys.stderr)
        return 1
    header = ["case", "fused ms", "unfused ms", "speedup", "fused GB/s", "of copy BW"]
    devices = sorted({r["device"] for r in table})
    for device in devices:
        body = [[r["name"], "%.3f" % r["fused_ms"], "%.3f" % r["unfused_ms"], "%.2fx" % r["speedup"],
                 str(r["GBps"]), ("%.0f%%" % (100 * r["copy"])) if r["copy"] != "" else ""]
                for r in table if r["device"] == device]
        print("device: %s" % device)
        if args.markdown:
            print("| " + " | ".join(header) + " |")
            print("|" + "---|" * len(header))
            for line in body:
                print("| " + " | ".join(line) + " |")
        else:
            widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
            for line in [header] + body:
                print("  ".join(str(c).ljust(w) for c, w in zip(line, widths)))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
