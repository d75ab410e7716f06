"""Interleaved comparisons (impls.compare): ratio statistics, spec validation, a real measurement,
the harness-overhead measurement, the CLI's refusals; and the seed summary of the suites."""
import importlib
import json
import math
import sys
from pathlib import Path

import pytest

from impls import cli, compare, train
from impls.recipe import RecipeError

TINY = dict(model="nano", data="synthetic", batch_size=2, seq_len=32, eval_batches=1, device="cpu")


def test_ratio_stats_median_with_order_statistic_interval_and_geometric_mean():
    stats = compare.ratio_stats([2.0, 2.0, 2.0])
    assert stats["value"] == pytest.approx(2.0) and stats["ci95"] == pytest.approx([2.0, 2.0])
    x = [1.0, 1.2, 0.9, 1.1, 1.05, 1.02, 0.98, 30.0, 1.01, 0.97, 1.03, 0.2]  # two rounds hit by bursts
    stats = compare.ratio_stats(x)
    ordered = sorted(x)
    assert stats["value"] == pytest.approx((1.01 + 1.02) / 2)
    assert stats["ci95"] == [ordered[2], ordered[9]] and stats["coverage"] == pytest.approx(1 - 2 * 79 / 4096)
    assert 0.9 < stats["ci95"][0] and stats["ci95"][1] < 1.2  # the bursts move neither end
    logs = [math.log(v) for v in x]
    mean = sum(logs) / 12
    sd = (sum((v - mean) ** 2 for v in logs) / 11) ** 0.5
    assert stats["geomean"] == pytest.approx(math.exp(mean))
    assert stats["geomean_ci95"][1] == pytest.approx(math.exp(mean + 2.201 * sd / 12 ** 0.5))  # t(0.975, 11)
    assert stats["per_round"] == x
    assert compare.ratio_stats([1.5])["ci95"] == [1.5, 1.5]
    with pytest.raises(ValueError):
        compare.ratio_stats([1.0, 0.0])
    assert compare.t975(1) == 12.706 and compare.t975(100) == 1.96
    # Order-statistic ranks: n=7 -> 1st and 7th (98.4%); n=20 -> 6th and 15th (95.9%); n=5 -> extremes (93.8%).
    assert compare.median_interval(7)[:2] == (1, 7) and compare.median_interval(7)[2] == pytest.approx(1 - 2 / 128)
    assert compare.median_interval(20)[:2] == (6, 15) and compare.median_interval(20)[2] > 0.95
    assert compare.median_interval(5)[2] == pytest.approx(1 - 2 / 32)


@pytest.mark.parametrize("raw, message", [
    ([], "JSON object"),
    (dict(baseline="a", variants={"a": {}}), "at least two"),
    (dict(baseline="c", variants={"a": {}, "b": {}}), "baseline 'c' is not a variant; valid: a, b"),
    (dict(baseline="a", variants={"a": {}, "b": {}}, rounds=1), "rounds must be an integer >= 2"),
    (dict(baseline="a", variants={"a": {}, "b": {}}, steps="3"), "steps must be an integer >= 1"),
    (dict(baseline="a", variants={"a": {}, "b": {"lr_typo": 1}}), "unknown recipe field 'lr_typo'"),
    (dict(baseline="a", variants={"a": {}, "b": {"flops_budget": 1e9}}), "drop flops_budget"),
    (dict(baseline="a", variants={"a": {}, "b": {}}, colour=1), "unknown spec key 'colour'"),
    (dict(baseline="a", variants={"a": {"device": "cpu"}, "b": {"device": "auto"}}), "share one device"),
])
def test_bad_specs_are_refused_with_one_line(raw, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(")):
        compare.parse_spec(raw)


@pytest.fixture(scope="module")
def measured(one_thread):
    spec = compare.parse_spec(dict(baseline="base", rounds=3, steps=2, warmup=1, common=TINY,
                                   variants={"base": {}, "ckpt": {"techniques": ["checkpoint:every=1"]},
                                             "accum": {"techniques": ["grad_accum:steps=2"], "batch_size": 1}}))
    return compare.measure(spec)


def test_interleaved_record(measured):
    r = measured
    assert r["kind"] == "interleaved" and r["baseline"] == "base" and r["rounds"] == 3
    # Rotated order: every variant takes every position once in three rounds.
    assert r["order"] == [["base", "ckpt", "accum"], ["ckpt", "accum", "base"], ["accum", "base", "ckpt"]]
    base, ckpt, accum = (r["variants"][k] for k in ("base", "ckpt", "accum"))
    assert base["speedup"]["per_round"] == [1.0, 1.0, 1.0] and base["speedup"]["ci95"] == pytest.approx([1, 1])
    for v in (ckpt, accum):
        assert len(v["speedup"]["per_round"]) == len(v["seconds_per_step"]["per_round"]) == 3
        low, high = v["speedup"]["ci95"]
        assert 0 < low <= v["speedup"]["value"] <= high
        # Per round: tokens/s of the variant over the baseline's, from the same round.
        expected = [(v["tokens_per_step"] / s) / (base["tokens_per_step"] / b)
                    for s, b in zip(v["seconds_per_step"]["per_round"], base["seconds_per_step"]["per_round"])]
        assert v["speedup"]["per_round"] == pytest.approx(expected)
    # Exact memory: checkpointing keeps fewer activations, the same parameters; accumulation
    # processes the same tokens per step as the baseline in half-size micro-batches.
    assert ckpt["memory_ratio"]["activations_bytes"] < 0.5 and ckpt["memory_ratio"]["params_bytes"] == 1.0
    assert accum["tokens_per_step"] == base["tokens_per_step"] == 64
    assert accum["memory_ratio"]["activations_bytes"] == pytest.approx(0.5, rel=0.05)
    assert set(r["load"]) >= {"noisy", "load1_start", "load1_end"} and "order statistics" in r["ci_method"]
    json.dumps(r, allow_nan=False)  # strict JSON


def test_harness_overhead_record(one_thread):
    r = compare.harness_overhead(train.Recipe(**TINY, steps=1), rounds=3, steps=2)
    assert r["kind"] == "harness_overhead" and len(r["ratio"]["per_round"]) == 3
    assert r["overhead"]["value"] == pytest.approx(r["ratio"]["value"] - 1)
    assert r["overhead"]["ci95"][0] <= r["overhead"]["value"] <= r["overhead"]["ci95"][1]
    low, high = r["mfu"]["ci95"]
    assert 0 < low <= r["mfu"]["value"] <= high <= 1  # the loop's MFU, its interval from the rounds'
    assert r["mfu"]["value"] == pytest.approx(
        r["model_flops_per_step"] / r["loop_seconds_per_step"]["value"] / r["peak_flops"]["value"])
    with pytest.raises(RecipeError, match="plain recipe"):
        compare.harness_overhead(train.Recipe(**TINY, steps=1, techniques=["bf16"]))


def test_cli_refuses_bad_specs_before_work(tmp_path, capsys):
    out = tmp_path / "out.json"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(dict(baseline="a", common=TINY, variants={"a": {}, "b": {"optimizer": "adamx"}})))
    for argv, message in (([str(tmp_path / "missing.json")], "cannot read comparison spec"),
                          ([str(spec)], "unknown optimizer 'adamx'"),
                          ([str(tmp_path / "out.json.d")], "cannot read")):
        assert cli.main(["compare", *argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err
    spec.write_text("{not json")
    assert cli.main(["compare", str(spec), "--out", str(out)]) == 2
    assert "is not JSON" in capsys.readouterr().err
    good = tmp_path / "good.json"
    good.write_text(json.dumps(dict(baseline="a", common=TINY, variants={"a": {}, "b": {"lr": 1e-3}})))
    (tmp_path / "adir").mkdir()
    assert cli.main(["compare", str(good), "--out", str(tmp_path / "adir")]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert not out.exists()


def test_seed_summary_of_the_suites():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        del sys.modules[name]
    common = importlib.import_module("benchmarks.common")
    one = common.seed_summary([dict(seed=0, final_val_loss=2.0)])
    assert one["n"] == 1 and one["ci95"] is None and "one seed" in one["note"]
    three = common.seed_summary([dict(seed=s, final_val_loss=v) for s, v in enumerate([2.0, 2.2, 2.1])])
    assert three["mean"] == pytest.approx(2.1) and three["std"] == pytest.approx(0.1)
    assert three["ci95"] == pytest.approx([2.1 - 4.303 * 0.1 / 3 ** 0.5, 2.1 + 4.303 * 0.1 / 3 ** 0.5])
    assert len(common.PROFILES["full"]["seeds"]) >= 3 and common.PROFILES["quick"]["seeds"] == [0]
