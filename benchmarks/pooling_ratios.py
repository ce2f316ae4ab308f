"""Prints the fused/unfused table of a pytest-benchmark JSON written by bench_pooling.py.

    python benchmarks/pooling_ratios.py pool.json [more.json ...] [--markdown]

One row per benchmark: the best round of the fused op and of the unfused sequence (per call), the
speedup (unfused / fused), and for CUDA cases the achieved bandwidth and its fraction of the copy
bandwidth measured in the same session.
"""
import argparse
import json
import sys


def rows(paths):
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        machine = data.get("machine_info", {})
        cpu = machine.get("cpu", {}).get("brand_raw", machine.get("processor", "?"))
        for bench in data.get("benchmarks", []):
            info = bench.get("extra_info", {})
            if "speedup" not in info:
                continue
            device = info.get("device", "?")
            if device.startswith("cpu"):
                device = "%s, %s" % (cpu, device)
            yield {
                "name": bench["name"],
                "device": device,
                "fused_ms": info["fused_ms"],
                "unfused_ms": info["unfused_ms"],
                "speedup": info["speedup"],
                "GBps": info.get("fused_GBps", ""),
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
    header = ["benchmark", "fused ms", "unfused ms", "speedup", "fused GB/s", "of copy BW"]
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
