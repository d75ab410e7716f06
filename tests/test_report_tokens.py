"""The data- and token-efficiency section of the report: each technique against the baseline of its
own group (the masked-LM rate is part of the group), FLOPs saved counted vs analytic, the loss at
equal counted FLOPs from the curves, and the section's figures."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from impls import report
from impls.report import tokens as rt

from test_report import HASH_A, make_record


def _run(root, family, name, techniques=(), notes=None, scale=1.0, mlm_rate=0.15, flops_scale=1.0):
    record = make_record(f"nano/{name}", HASH_A, techniques=tuple(techniques), scale=scale)
    record["recipe"]["mlm_rate"] = mlm_rate
    for point in record["curve"]:
        point["flops"] *= flops_scale
    if notes:
        record["technique_notes"] = notes
    path = root / family / f"{family}-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return record


@pytest.fixture
def runs_dir(tmp_path):
    root = tmp_path / "runs"
    _run(root, "seqlen", "baseline")
    _run(root, "seqlen", "warmup", ["seqlen_warmup:start=32,steps=0.3"], scale=0.98,
         notes={"seqlen_warmup": {"steps": 0.3, "counted_flops_saved": 0.16, "analytic_flops_saved": 0.15}})
    for rate, scale in ((0.15, 1.05), (0.75, 0.9)):  # each mask rate its own task and baseline
        _run(root, "mae", f"baseline-{rate}", mlm_rate=rate, scale=1.0 + rate)
        _run(root, "mae", f"mae-{rate}", ["mae"], mlm_rate=rate, scale=(1.0 + rate) * scale,
             notes={"mae": {"visible_fraction": 1 - rate}})
    _run(root, "ltd", "baseline")
    _run(root, "ltd", "ltd", ["random_ltd:start=32"], scale=0.99, flops_scale=0.8,
         notes={"random_ltd": {"start": 32, "schedule": [[0, 32], [4, 64], [8, 128]], "total_steps": 15,
                               "counted_flops_saved": 0.21, "analytic_flops_saved": 0.2}})
    _run(root, "pruning", "baseline")  # not in the section
    _run(root, "pruning", "prune", ["prune:sparsity=0.5"])
    return root


def test_frame_pairs_each_run_with_its_group_baseline(runs_dir):
    loaded = report.load_all([runs_dir])
    frame = rt.tokens_frame(loaded.runs, loaded.interleaved).set_index("run")
    assert set(frame["family"]) == {"seqlen", "mae", "ltd"}
    warm = frame.loc["nano/warmup"]
    assert warm["saved_counted_vs_analytic"] == pytest.approx(0.16 / 0.15)
    assert warm["loss_delta_at_budget"] == pytest.approx(2.5 * 0.98 - 2.5)
    for rate, scale in ((0.15, 1.05), (0.75, 0.9)):
        row = frame.loc[f"nano/mae-{rate}"]
        assert row["knob_value"] == f"{rate:g}"
        assert row["loss_delta_at_budget"] == pytest.approx(2.5 * (1 + rate) * (scale - 1))


def test_loss_at_equal_counted_flops_interpolates_both_curves(runs_dir):
    """ltd ran 0.8x the baseline's counted FLOPs: the baseline's curve is read there, in log FLOPs."""
    loaded = report.load_all([runs_dir])
    ltd = loaded.runs[loaded.runs["family"] == "ltd"]
    plain = ltd["recipe.techniques"].map(len) == 0
    delta, at = rt.loss_at_equal_counted_flops(ltd[~plain].iloc[0], ltd[plain].iloc[0])
    assert at == pytest.approx(0.8 * 1.8e10)
    base = float(np.interp(math.log(at), np.log([1.2e10, 1.8e10]), [3.0, 2.5]))
    assert delta == pytest.approx(2.5 * 0.99 - base)
    assert delta < 2.5 * 0.99 - 2.5  # worse than the loss at the budget says: the baseline had more FLOPs


def test_report_writes_the_section_and_figures(runs_dir, tmp_path):
    out = tmp_path / "plots"
    written = {p.name for p in report.write_report([runs_dir], out)}
    assert {"tokens.csv", "tokens_random_ltd_schedule.png"} <= written
    assert "tokens_speedup_vs_mask_rate.png" not in written  # no interleaved mae comparison here
    summary = (out / "summary.md").read_text()
    assert "## Data and token efficiency" in summary and "random_ltd:start=32" in summary
    assert "prune:sparsity" not in summary.split("## Data and token efficiency")[1]


def test_speedup_vs_mask_rate_reads_interleaved_records(tmp_path):
    def record(rate, value):
        return {"family": "mae", "baseline": "baseline", "variants": {
            "baseline": {"recipe": {"mlm_rate": rate, "techniques": []}, "speedup": {"value": 1.0, "ci95": [1, 1]}},
            "mae": {"recipe": {"mlm_rate": rate, "techniques": ["mae"]}, "speedup": {"value": value, "ci95": [value - 0.1, value + 0.1]},
                    "technique_notes": {"mae": {"visible_fraction": 1 - rate}}}}}

    frame = rt.mask_rate_speedups([record(0.75, 2.0), record(0.15, 1.1), {"family": "distill", "variants": {}}])
    assert list(frame["mask_rate"]) == [0.15, 0.75] and list(frame["speedup"]) == [1.1, 2.0]
    rt.plot_speedup_vs_mask_rate(frame).savefig(tmp_path / "x.png")


def test_site_section_shows_the_table_and_figures(runs_dir, tmp_path):
    from impls import site

    out = tmp_path / "plots"
    written = {p.name for p in report.write_report([runs_dir], out)}
    html = site.tokens_section(report.load_all([runs_dir]), written, "plots/x")
    assert 'id="tokens"' in html and "random_ltd:start=32" in html and "seqlen_warmup" in html
    assert "tokens_random_ltd_schedule.png" in html and "prune:sparsity" not in html
    assert site.tokens_section(report.load_all([runs_dir / "pruning"]), set(), "plots/x") == ""


def test_speed_ratio_is_matched_by_mask_rate(runs_dir):
    """The same encoder technique timed once per mask rate (one label for all): each run gets its
    own rate's ratio."""
    loaded = report.load_all([runs_dir])
    mae = loaded.runs[loaded.runs["family"] == "mae"].reset_index(drop=True)
    mae["label"] = ["encoder-nano/adamw/mae" if t else "encoder-nano/adamw" for t in mae["recipe.techniques"]]

    def record(rate, value):
        return {"family": "mae", "variants": {"mae": {"label": "encoder-nano/adamw/mae", "recipe": {"mlm_rate": rate},
                                                      "speedup": {"value": value, "ci95": [value - 0.1, value + 0.1]}}}}

    comparison = report.technique_comparison(mae, [record(0.15, 0.7), record(0.75, 1.1)])
    speed = dict(zip(comparison["run"], comparison["speed ratio"]))
    assert speed["nano/mae-0.15"] == pytest.approx(0.7) and speed["nano/mae-0.75"] == pytest.approx(1.1)
