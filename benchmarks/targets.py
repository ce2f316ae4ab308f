"""The issues' speed goals, checked against pytest-benchmark JSON (each file one run, one machine).

    python benchmarks/targets.py benchmarks.json [more.json ...]

One line per goal: the measured value (the worst case where a goal covers several cases, with
that case named), the goal, and PASS, FAIL or MISSING (the file holds none of its cases). Exit
status 1 if any goal fails. Ratios come from benchmarks/ratios.py (fused against the baseline of
the same group, same file).

Goals of the fused LSTM on CUDA (bench_lstm_cuda.py: I = H = 512, 3 layers, bidirectional,
against cuDNN's nn.LSTM): a training step at B=32, T=32 >= 2.5x in bfloat16 and >= 1.5x in
float32; inference at B in {1, 8}, T=32 >= 4x in both dtypes; every point of the grid >= 1.0x;
the peak memory of training at most cuDNN's.

Goals of the pooling ops (bench_pooling.py, against the unfused PyTorch sequence; the cost-of-a-
call cases are host time on tiny inputs and count for none): >= 1.5x on the CPU; >= 2x on a GPU,
and >= 85% of the card's copy bandwidth (bytes read and written once) where a case counts them.
"""
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ratios import json_files_cli, ratio_rows  # noqa: E402

Row = Dict
# (goal, the rows it covers, the value of a row, the bound, True if the value must be at least it)
Goal = Tuple[str, Callable[[Row], bool], Callable[[Row], Optional[float]], float, bool]


def _lstm(dtype: Optional[str] = None, case: Optional[str] = None, batches=None, steps=None):
    """Selects bench_lstm_cuda.py's groups lstm_cuda:{dtype}:{case}:B{batch}:T{steps}."""
    def select(row: Row) -> bool:
        parts = row["group"].split(":")
        if len(parts) != 5 or parts[0] != "lstm_cuda":
            return False
        _, d, c, b, t = parts
        return ((dtype is None or d == dtype) and (case is None or c == case)
                and (batches is None or int(b[1:]) in batches)
                and (steps is None or int(t[1:]) in steps))
    return select


def _pool(device: str) -> Callable[[Row], bool]:
    def select(row: Row) -> bool:
        group = row["group"]
        return (group.startswith(("frame_pool %s" % device, "temporal_pool %s" % device))
                and "call cost" not in group)
    return select


def _speedup(row: Row) -> float:
    return row["speedup"]


def _memory(row: Row) -> Optional[float]:
    return row["memory_ratio"]


def _copy_fraction(row: Row) -> Optional[float]:
    return row["extra_info"].get("copy_fraction")  # bench_pooling.py's CUDA entries


GOALS: List[Goal] = [
    ("LSTM CUDA training B=32 T=32 bfloat16, speedup", _lstm("bfloat16", "training", [32], [32]),
     _speedup, 2.5, True),
    ("LSTM CUDA training B=32 T=32 float32, speedup", _lstm("float32", "training", [32], [32]),
     _speedup, 1.5, True),
    ("LSTM CUDA inference B in {1, 8} T=32, speedup", _lstm(None, "inference", [1, 8], [32]),
     _speedup, 4.0, True),
    ("LSTM CUDA every point of the grid, speedup", _lstm(), _speedup, 1.0, True),
    ("LSTM CUDA training, peak memory / cuDNN's", _lstm(None, "training"), _memory, 1.0, False),
    ("pooling CPU, speedup", _pool("cpu"), _speedup, 1.5, True),
    ("pooling CUDA, speedup", _pool("cuda"), _speedup, 2.0, True),
    ("pooling CUDA, share of copy bandwidth", _pool("cuda"), _copy_fraction, 0.85, True),
]


def check(rows: List[Row]) -> List[Dict]:
    """One verdict per goal: value and case of the worst row it covers, and the result."""
    verdicts = []
    for name, covers, value, bound, at_least in GOALS:
        measured = [(value(r), r["label"]) for r in rows if covers(r) and value(r) is not None]
        if not measured:
            verdicts.append({"goal": name, "bound": bound, "at_least": at_least, "value": None,
                             "case": None, "failing": 0, "cases": 0, "result": "MISSING"})
            continue
        worst = min(measured) if at_least else max(measured)
        failing = sum(1 for v, _ in measured if (v < bound if at_least else v > bound))
        verdicts.append({"goal": name, "bound": bound, "at_least": at_least, "value": worst[0],
                         "case": worst[1], "failing": failing, "cases": len(measured),
                         "result": "FAIL" if failing else "PASS"})
    return verdicts


def main(argv=None) -> int:
    _, reports = json_files_cli(__doc__.split("\n")[0], argv)
    status = 0
    for path, report in reports:
        print(path)
        for v in check(ratio_rows(report, path)):
            goal = "%s %s %g" % (v["goal"], ">=" if v["at_least"] else "<=", v["bound"])
            if v["result"] == "MISSING":
                print("  MISSING  %s: no case in this file" % goal)
                continue
            print("  %-7s  %s: worst %.3g (%s); %d of %d cases fail"
                  % (v["result"], goal, v["value"], v["case"], v["failing"], v["cases"]))
            status |= v["result"] == "FAIL"
    return status


if __name__ == "__main__":
    sys.exit(main())
