"""The findings page's tables (impls/report/findings.py): one row per technique variant against its
own baseline, and the claims checked, each measured ÷ formula with a status that can say "differs"."""
from __future__ import annotations

import json
import math
import warnings

import pandas as pd
import pytest
from test_report import HASH_A, make_interleaved, make_record, make_refused

from impls import report
from impls.report import findings as F


def _write(root, family, name, record):
    (root / family).mkdir(parents=True, exist_ok=True)
    (root / family / f"{name}.json").write_text(json.dumps(record))


@pytest.fixture
def runs(tmp_path):
    """A technique family (baseline, bf16 timed interleaved, checkpointing untimed, both with
    seeds), a parallel family with interleaved-only ZeRO variants (one off its formula)."""
    root = tmp_path / "runs"
    base = make_record("nano/adamw", HASH_A)
    base["seeds"] = {"n": 3, "mean": 2.5, "std": 0.01, "seeds": [0, 1, 2]}
    bf16 = make_record("nano/adamw/bf16", HASH_A, speed=1500.0, scale=1.1, techniques=["bf16"])
    bf16["seeds"] = {"n": 3, "mean": 2.75, "std": 0.02, "seeds": [0, 1, 2]}
    bf16["memory"]["activations_bytes"] //= 2
    ckpt = make_record("nano/adamw/checkpoint:every=1", HASH_A, techniques=["checkpoint:every=1"])
    ckpt["flops_per_step"] = ckpt["model_flops_per_step"] * 4 / 3
    ckpt["model_states"] = {"covered": True, "ratio": {"total": 1.0}, "stage_name": "DDP"}
    for name, record in (("technique-baseline", base), ("technique-bf16", bf16), ("technique-ckpt", ckpt)):
        _write(root, "technique", name, record)
    timed = make_interleaved("technique")
    timed["variants"]["baseline"]["label"] = "nano/adamw"
    timed["variants"]["bf16"]["label"] = "nano/adamw/bf16"
    _write(root, "technique", "compare-technique", timed)
    parallel = make_interleaved("parallel")
    parallel["world_size"] = 2
    for name, total, grads in (("bf16", 1.0, True), ("fuse", 1.24, False)):
        parallel["variants"][name]["model_states"] = {
            "covered": True, "stage_name": "ZeRO-2", "ratio": {"total": total, "grads": 1.18 if not grads else 1.0},
            "within_tolerance": {"total": total < 1.02, "grads": grads}}
        parallel["variants"][name]["comm"] = {
            "calls": {"all_reduce": 4, "all_gather": 2},
            "check": {"ratio_ring": 1.5 if not grads else 1.0,
                      "formula": {"stage_name": "ZeRO-2", "collectives": [{"op": "reduce_scatter"}, {"op": "all_gather"}]}}}
    _write(root, "parallel", "compare-ws2", parallel)
    return root


def _loaded(root):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return report.load_all([root])


def test_one_row_per_variant_against_its_baseline(runs):
    frame = F.findings_frame(_loaded(runs)).set_index(["family", "variant"])
    bf16 = frame.loc[("technique", "bf16")]
    # speed only from the interleaved record (its 95% interval), never from the runs' own timings
    assert (bf16["speed"], bf16["speed lo"], bf16["speed hi"]) == (1.5, 1.4, 1.6)
    assert bf16["activations"] == pytest.approx(0.5) and bf16["optimizer"] == pytest.approx(1.0)
    assert bf16["loss delta"] == pytest.approx(0.25)
    # Welch's interval from the seeds: Δ 0.25 ± t(df)·sqrt(0.01²/3 + 0.02²/3)
    se = math.sqrt(0.01 ** 2 / 3 + 0.02 ** 2 / 3)
    assert bf16["loss delta lo"] < 0.25 - 1.96 * se and bf16["loss delta hi"] > 0.25 + 1.96 * se
    assert bf16["loss delta hi"] - bf16["loss delta lo"] == pytest.approx(2 * 4.303 * se, rel=0.3)
    ckpt = frame.loc[("technique", "checkpoint:every=1")]
    assert math.isnan(ckpt["speed"])  # not timed interleaved: no speed claimed
    assert ckpt["flops/step"] == pytest.approx(4 / 3 * 1.19 / 1.2)
    assert ckpt["counted/analytic"] == pytest.approx(4 / 3)
    assert math.isnan(ckpt["loss delta lo"])  # one seed: no interval
    assert ckpt["device"] and ckpt["parameters"] == 124_672 and ckpt["world size"] == 1
    # interleaved-only variants of a family without runs still get a row (speed, memory, no loss)
    zero = frame.loc[("parallel", "fuse")]
    assert zero["speed"] == pytest.approx(1.01) and math.isnan(zero["loss delta"]) and zero["world size"] == 2
    assert ("technique", "baseline") not in frame.index
    # families in the families table's order
    assert list(dict.fromkeys(f for f, _ in frame.index)) == ["technique", "parallel"]


def test_claims_hold_or_differ_with_the_reason(runs):
    checks = F.claim_checks(_loaded(runs))
    claims = F.claims_frame(checks).set_index("claim")
    states = claims.loc["ZeRO model states per rank"]
    assert states["n"] == 3 and states["status"] == "differs: 1 of 3"
    assert "fuse: ×1.240" in states["outside tolerance"] and "grads ×1.180" in states["outside tolerance"]
    traffic = claims.loc["Data-parallel traffic per step"]
    assert traffic["status"] == "differs: 1 of 2" and "all_reduce×4" in traffic["outside tolerance"]
    recompute = claims.loc["Checkpointing recompute"]
    assert recompute["status"] == "holds" and recompute["ratio median"] == pytest.approx(1.0)
    mfu = claims.loc["MFU ≤ 1"]
    assert mfu["status"] == "holds" and mfu["ratio max"] == pytest.approx(0.31)
    assert "LoRA optimizer state" not in claims.index  # no record checks it: no row, no made-up status


def test_mfu_over_one_is_a_differing_claim(runs):
    """A record with MFU above 100% is refused by the report -- and shows here as the claim failing."""
    _write(runs, "technique", "technique-fp16", make_refused())
    claims = F.claims_frame(F.claim_checks(_loaded(runs))).set_index("claim")
    mfu = claims.loc["MFU ≤ 1"]
    assert mfu["status"] == "differs: 1 of 4" and mfu["ratio max"] == pytest.approx(2.8)
    assert "refused: MFU 280.0% exceeds 100%" in mfu["outside tolerance"]


def test_variant_names():
    assert F.variant_name("nano/adamw/checkpoint:every=1") == "checkpoint:every=1"
    assert F.variant_name("micro/adamw8bit") == "adamw8bit"
    assert F.variant_name("nano/adamw/distill:teacher=/x/y/t.json,alpha=0.5 (distill-x)") == \
        "distill:teacher=t.json,alpha=0.5"


def test_write_findings_files(runs, tmp_path):
    written, findings, claims = F.write_findings(_loaded(runs), tmp_path / "out")
    markdown = F.markdown(findings, claims)
    names = sorted(p.name for p in written)
    assert names == ["claims.csv", "findings.csv", "findings.json"]
    document = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert document["kind"] == "findings" and document["schema"] == report.SCHEMA_VERSION
    assert {r["variant"] for r in document["findings"]} >= {"bf16", "checkpoint:every=1", "fuse"}
    assert all(set(r) >= {"claim", "status", "ratio median"} for r in document["claims"])
    csv = pd.read_csv(tmp_path / "out" / "findings.csv")
    assert list(csv.columns) == list(F.FINDINGS_COLUMNS)
    assert "## Claims checked" in markdown and "ZeRO model states per rank" in markdown


def test_the_report_writes_the_findings(runs, tmp_path):
    """``python -m impls.report`` writes the findings files and ends summary.md with both tables;
    summary.csv is the runs' table as before."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        written = report.write_report([runs], tmp_path / "plots")
    names = {p.name for p in written}
    assert {"findings.csv", "claims.csv", "findings.json", "summary.csv", "summary.md"} <= names
    summary = (tmp_path / "plots" / "summary.md").read_text()
    assert "## Findings: what each technique buys" in summary and "## Claims checked" in summary
    assert len(pd.read_csv(tmp_path / "plots" / "summary.csv")) == 3


def test_site_section_opens_the_page_with_both_tables(runs, tmp_path):
    """The front page's first section: the filterable findings table (family links into its
    section), the claims table, and the three citation files beside index.html."""
    from types import SimpleNamespace

    from impls import site
    from impls.site.sections.findings import FindingsSection

    assert site.SECTIONS[0].name == "findings"
    html_dir = tmp_path / "html"
    html_dir.mkdir()
    rendered = FindingsSection().html(SimpleNamespace(loaded=_loaded(runs), html_dir=html_dir))
    assert [a for a, _ in rendered.anchors] == ["findings", "claims"]
    text = rendered.html
    assert 'data-filter-for="findings-table"' in text and 'data-filter id=' in text
    assert '<a href="#family-parallel"' in text and "1.5 [1.4, 1.6]" in text
    assert "ZeRO model states per rank" in text and "differs: 1 of 3" in text
    assert sorted(p.name for p in html_dir.iterdir()) == ["claims.csv", "findings.csv", "findings.json"]
    nothing = report.Loaded(pd.DataFrame(columns=["family", "label"]), [], [], [], [], [], [])
    empty = FindingsSection().html(SimpleNamespace(loaded=nothing, html_dir=html_dir))
    assert empty.html == "" and empty.anchors == []
