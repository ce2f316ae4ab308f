"""benchmarks/ratios.py pairs fused and baseline benchmarks by the convention at its top."""
import importlib.util
import json
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                     "ratios.py")


@pytest.fixture(scope="module")
def ratios():
    spec = importlib.util.spec_from_file_location("benchmark_ratios", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(name, group, median, extra=None):
    return {"name": name, "group": group, "stats": {"median": median}, "extra_info": extra or {}}


def test_ratios_pairs_by_extra_info_impl(ratios):
    report = {"benchmarks": [
        bench("test_lstm[training-baseline]", "lstm:training", 0.3,
              {"impl": "baseline", "peak_bytes": 200}),
        bench("test_lstm[training-fused]", "lstm:training", 0.1, {"impl": "fused", "peak_bytes": 100}),
        bench("test_lstm[inference-fused]", "lstm:inference", 0.2, {"impl": "fused"}),
        bench("test_lstm[inference-baseline]", "lstm:inference", 0.1, {"impl": "baseline"}),
    ]}
    rows = {r["group"]: r for r in ratios.ratio_rows(report, "x.json")}
    assert rows["lstm:training"]["speedup"] == pytest.approx(3.0)
    assert rows["lstm:training"]["memory_ratio"] == pytest.approx(0.5)
    assert rows["lstm:inference"]["speedup"] == pytest.approx(0.5)
    assert rows["lstm:inference"]["memory_ratio"] is None


def test_ratios_prefers_the_interleaved_baseline(ratios):
    report = {"benchmarks": [
        bench("test_lstm[training-baseline]", "lstm:training", 0.6, {"impl": "baseline"}),
        bench("test_lstm[training-fused]", "lstm:training", 0.2,
              {"impl": "fused", "baseline_interleaved_median_s": 0.3}),
    ]}
    (row,) = ratios.ratio_rows(report, "x.json")
    assert row["basis"] == "interleaved"
    assert row["baseline_s"] == pytest.approx(0.3)
    assert row["speedup"] == pytest.approx(1.5)


def test_ratios_pairs_by_parametrize_id_without_extra_info(ratios):
    report = {"benchmarks": [
        bench("test_pool[avg-fused]", "pool:avg", 0.5),
        bench("test_pool[avg-baseline]", "pool:avg", 1.0),
        bench("test_pool_other[x]", "pool:avg", 9.0),  # neither: ignored
        bench("test_pool[max_fused]", "pool:max", 2.0),  # no baseline in its group: no row
    ]}
    rows = ratios.ratio_rows(report, "x.json")
    assert [(r["group"], r["speedup"]) for r in rows] == [("pool:avg", pytest.approx(2.0))]


def test_ratios_skips_group_with_two_baselines(ratios, capsys):
    report = {"benchmarks": [bench("a[baseline]", "g", 1.0), bench("b[baseline]", "g", 1.0),
                             bench("c[fused]", "g", 1.0)]}
    assert ratios.ratio_rows(report, "x.json") == []
    assert "2 baselines" in capsys.readouterr().err


def test_ratios_main_prints_table(ratios, tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"machine_info": {"node": "box", "cpu": {"brand_raw": "CPU X"}},
                                "benchmarks": [bench("t[fused]", "g", 0.002, {"peak_bytes": 2**20}),
                                               bench("t[baseline]", "g", 0.004,
                                                     {"peak_bytes": 2**21})]}))
    assert ratios.main([str(path), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "CPU X" in out
    assert "| g | median | 2.000 | 4.000 | 2.00x | 1.0 | 2.0 | 0.50 |" in out


def test_ratios_reads_benchmarks_that_time_their_own_baseline(ratios):
    # bench_pooling.py's form: one benchmark, the unfused time beside the fused one.
    report = {"benchmarks": [
        bench("test_frame_pool_cpu[256-avg-contiguous]", "frame_pool cpu avg contiguous", 0.001,
              {"fused_ms": 0.5, "unfused_ms": 1.5, "speedup": 3.0}),
        bench("test_other[x]", "other", 0.001, {"speedup": 2.0}),  # no times: ignored
    ]}
    rows = ratios.ratio_rows(report, "x.json")
    assert len(rows) == 1
    assert rows[0]["speedup"] == pytest.approx(3.0)
    assert rows[0]["basis"] == "best round" and rows[0]["fused_s"] == pytest.approx(5e-4)


@pytest.fixture(scope="module")
def targets():
    path = os.path.join(os.path.dirname(_PATH), "targets.py")
    spec = importlib.util.spec_from_file_location("benchmark_targets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lstm_pair(dtype, case, batch, steps, base_s, fused_s, base_peak=100, fused_peak=90):
    group = "lstm_cuda:%s:%s:B%d:T%d" % (dtype, case, batch, steps)
    return [bench("b", group, base_s, {"impl": "baseline", "peak_bytes": base_peak}),
            bench("f", group, fused_s, {"impl": "fused", "peak_bytes": fused_peak})]


def test_targets_checks_each_goal_on_its_worst_case(targets):
    report = {"benchmarks": [
        *lstm_pair("bfloat16", "training", 32, 32, 3.0, 1.0),             # 3.0x
        *lstm_pair("float32", "training", 32, 32, 1.4, 1.0),              # 1.4x: below 1.5x
        *lstm_pair("float32", "inference", 1, 32, 5.0, 1.0),
        *lstm_pair("bfloat16", "inference", 8, 32, 4.5, 1.0),
        *lstm_pair("float32", "training", 128, 64, 1.2, 1.0, 100, 101),   # memory 1.01
        bench("b", "frame_pool cuda float32 avg contiguous 256", 2.0, {"impl": "baseline"}),
        bench("f", "frame_pool cuda float32 avg contiguous 256", 1.0,
              {"impl": "fused", "copy_fraction": 0.5}),
        bench("b", "frame_pool cpu call cost forward", 1.0, {"impl": "baseline"}),
        bench("f", "frame_pool cpu call cost forward", 2.0, {"impl": "fused"}),  # not a goal's case
    ]}
    verdicts = {v["goal"]: v for v in targets.check(targets.ratio_rows(report, "x.json"))}
    bf16 = verdicts["LSTM CUDA training B=32 T=32 bfloat16, speedup"]
    assert bf16["result"] == "PASS" and bf16["value"] == pytest.approx(3.0)
    fp32 = verdicts["LSTM CUDA training B=32 T=32 float32, speedup"]
    assert fp32["result"] == "FAIL" and fp32["value"] == pytest.approx(1.4)
    inference = verdicts["LSTM CUDA inference B in {1, 8} T=32, speedup"]
    assert inference["result"] == "PASS" and inference["cases"] == 2
    assert inference["value"] == pytest.approx(4.5)
    grid = verdicts["LSTM CUDA every point of the grid, speedup"]
    assert grid["result"] == "PASS" and grid["cases"] == 5 and grid["value"] == pytest.approx(1.2)
    memory = verdicts["LSTM CUDA training, peak memory / cuDNN's"]
    assert memory["result"] == "FAIL" and memory["failing"] == 1
    assert memory["case"] == "lstm_cuda:float32:training:B128:T64"
    assert verdicts["pooling CUDA, speedup"]["result"] == "PASS"
    copy = verdicts["pooling CUDA, share of copy bandwidth"]
    assert copy["result"] == "FAIL" and copy["value"] == pytest.approx(0.5)
    assert verdicts["pooling CPU, speedup"]["result"] == "MISSING"  # call cost counts for none


def test_targets_main_exits_1_when_a_goal_fails(targets, tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"benchmarks": lstm_pair("float32", "training", 32, 32, 1.4, 1.0)}))
    assert targets.main([str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL     LSTM CUDA training B=32 T=32 float32, speedup >= 1.5: worst 1.4" in out
    assert "MISSING  pooling CPU, speedup >= 1.5" in out
    path.write_text(json.dumps({"benchmarks": lstm_pair("float32", "training", 32, 32, 1.6, 1.0)}))
    assert targets.main([str(path)]) == 0
