"""benchmarks/data_ratios.py: the data pipeline's goals computed from a pytest-benchmark JSON."""
import importlib.util
import json
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "data_ratios.py")


@pytest.fixture(scope="module")
def ratios():
    spec = importlib.util.spec_from_file_location("data_ratios", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(kind, median, clips=8, T=16, transform=None):
    return {"name": "test_%s" % kind, "stats": {"median": median},
            "extra_info": {"kind": kind, "clips": clips, "T": T, "transform": transform}}


def report(files_s=0.1, ceiling_s=0.08, long_s=0.3, short_s=0.12, cache_s=0.009, feat_s=0.1,
           frozen_s=2.5):
    b = []
    for T in (16, 32):
        b.append(bench("ceiling", ceiling_s, T=T))
        b += [bench("files", files_s, T=T, transform=tf) for tf in ("train", "eval")]
        b.append(bench("cache", cache_s, T=T, transform="train"))
    b += [bench("long_clip", long_s, clips=4, T=32, transform="train"),
          bench("short_clip", short_s, clips=4, T=32, transform="train"),
          bench("features", feat_s, clips=32), bench("frozen", frozen_s, clips=32)]
    return {"benchmarks": b}


def by_goal(rows):
    return {r["goal"]: r for r in rows}


def test_goal_ratios_are_rates_of_the_same_run(ratios):
    g = by_goal(ratios.goals(report()))
    assert g["files / ceiling, T=16 train"]["value"] == pytest.approx(0.8)
    assert g["files / ceiling, T=16 train"]["ok"]
    assert g["long clip / short clip (cost)"]["value"] == pytest.approx(2.5)
    assert g["long clip / short clip (cost)"]["ok"]
    assert g["cache / files, T=32"]["value"] == pytest.approx(0.1 / 0.009)
    assert g["features / frozen (epoch)"]["value"] == pytest.approx(25.0)


@pytest.mark.parametrize("change, goal", [
    (dict(files_s=0.2), "files / ceiling, T=32 eval"),          # 0.4 of the ceiling
    (dict(long_s=0.5), "long clip / short clip (cost)"),        # a cost of 4.2x: above 3
    (dict(cache_s=0.02), "cache / files, T=16"),                # 5x
    (dict(frozen_s=1.0), "features / frozen (epoch)"),          # 10x
])
def test_a_missed_goal_fails(ratios, change, goal):
    assert by_goal(ratios.goals(report(**change)))[goal]["ok"] is False


def test_main_exits_1_on_a_missing_case(ratios, tmp_path, capsys):
    doc = report()
    doc["benchmarks"] = [b for b in doc["benchmarks"] if b["extra_info"]["kind"] != "cache"]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(doc))
    assert ratios.main([str(path)]) == 1
    out = capsys.readouterr().out
    cache_line = next(line for line in out.splitlines() if line.startswith("cache / files, T=16"))
    assert "MISSING" in cache_line and ">= 10" in cache_line
    doc["benchmarks"] = [b for b in doc["benchmarks"] if b["extra_info"]["kind"] != "long_clip"]
    path.write_text(json.dumps(doc))
    assert ratios.main([str(path)]) == 1
    long_line = next(line for line in capsys.readouterr().out.splitlines()
                     if line.startswith("long clip"))
    assert "MISSING" in long_line and "<= 3" in long_line  # a missing upper bound reads as one
    path.write_text(json.dumps(report()))
    assert ratios.main([str(path), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| files / ceiling, T=16 train | 0.80 | separate | >= 0.7 | PASS |" in out


def test_the_baseline_timed_between_the_rounds_is_preferred(ratios):
    """An entry that timed its goal's baseline between its rounds is compared with that, not with
    the baseline's own entry (run minutes earlier, under another load)."""
    doc = report(files_s=0.1, ceiling_s=0.08, long_s=0.3, short_s=0.12, feat_s=0.1, frozen_s=2.5)
    # kind: (baseline median s, baseline clips); the files' baseline read 16 clips in its rounds
    interleaved = {"files": (0.25, 16), "long_clip": (0.075, 4), "cache": (0.2, 8),
                   "features": (1.0, 32)}
    for b in doc["benchmarks"]:
        info = b["extra_info"]
        if info["kind"] in interleaved:
            s, clips = interleaved[info["kind"]]
            info.update(baseline_interleaved_median_s=s, baseline_clips=clips)
    g = by_goal(ratios.goals(doc))
    assert g["files / ceiling, T=32 eval"]["value"] == pytest.approx(1.25)   # 0.8 separately
    assert g["files / ceiling, T=32 eval"]["basis"] == "interleaved"
    assert g["long clip / short clip (cost)"]["value"] == pytest.approx(4.0)  # 2.5 separately
    assert g["long clip / short clip (cost)"]["ok"] is False
    assert g["cache / files, T=16"]["value"] == pytest.approx(0.2 / 0.009)
    assert g["features / frozen (epoch)"]["value"] == pytest.approx(10.0)    # 25 separately
    assert g["features / frozen (epoch)"]["ok"] is False
    assert by_goal(ratios.goals(report()))["features / frozen (epoch)"]["basis"] == "separate"
    # without the baselines' own entries the goals still stand on the interleaved ones
    doc["benchmarks"] = [b for b in doc["benchmarks"]
                         if b["extra_info"]["kind"] not in ("ceiling", "short_clip", "frozen")]
    g = by_goal(ratios.goals(doc))
    assert g["files / ceiling, T=16 train"]["value"] == pytest.approx(1.25)
    assert g["long clip / short clip (cost)"]["basis"] == "interleaved"
    assert g["features / frozen (epoch)"]["ok"] is False


def test_decoding_alone_of_the_long_clip_is_shown_but_never_fails(ratios, tmp_path, capsys):
    doc = report()
    decode_only = bench("long_decode", 0.4, clips=4, T=32)
    decode_only["extra_info"].update(baseline_interleaved_median_s=0.1, baseline_clips=4)
    doc["benchmarks"].append(decode_only)
    row = by_goal(ratios.goals(doc))["long clip / short clip, decoding alone"]
    assert row["value"] == pytest.approx(4.0) and row["ok"] is None and row["info"]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(doc))
    assert ratios.main([str(path)]) == 0  # every goal passes; the row is information
    line = next(x for x in capsys.readouterr().out.splitlines() if "decoding alone" in x)
    assert "4.00" in line and "(info)" in line
    assert ratios.main([str(path), "--markdown"]) == 0
    assert "| long clip / short clip, decoding alone | 4.00 | interleaved | - | (info) |" \
        in capsys.readouterr().out
