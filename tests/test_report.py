"""Tests for impls.report: loading run records, the summary table and the plots."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from impls import report

HASH_A = "a" * 12 + "1" * 52
HASH_B = "b" * 12 + "2" * 52
DATASET = "synthetic:vocab=64,order=2"


def make_record(label: str, digest: str, *, floor: float | None = 1.234, speed: float = 1000.0,
                scale: float = 1.0, techniques: tuple = ()) -> dict:
    """A schema-1 run record with a 4-point curve (val_loss missing at step 5)."""
    return {
        "schema": 1,
        "label": label,
        "recipe": {"model": "nano", "data": "synthetic", "optimizer": "adamw", "lr": 1e-3,
                   "batch_size": 8, "seq_len": 64, "techniques": list(techniques),
                   "seed": 0, "steps": 15, "flops_budget": None, "eval_every": 10,
                   "eval_batches": 4},
        "git_commit": "abc123", "git_dirty": False,
        "versions": {"python": "3.11.7", "torch": "2.13.0+cpu"},
        "device": {"type": "cpu", "name": "Test CPU", "threads": 2},
        "world_size": 1, "seed": 0,
        "dataset": {"name": DATASET, "hash": digest, "vocab_size": 64, "entropy_floor": floor,
                    "train_tokens": 2_000_000, "val_tokens": 200_000},
        "params": 124_672, "matmul_params": 116_480,
        "tokens_per_step": 512,
        "flops_per_step": 1.2e9, "model_flops_per_step": 1.19e9,
        "peak_flops": {"value": 1.0e11, "source": "probe:cpu/float32/matmul-2048/2threads"},
        "tokens_per_second": speed, "seconds_per_step": 512 / speed,
        "mfu": 0.31, "hfu": 0.32,
        "memory": {"params_bytes": 2 * report.MIB, "grads_bytes": 2 * report.MIB,
                   "optimizer_bytes": 4 * report.MIB, "activations_bytes": 3 * report.MIB // 2,
                   "peak_bytes": 300 * report.MIB, "peak_kind": "cpu_rss"},
        "curve": [
            {"step": 0, "flops": 0.0, "tokens": 0, "train_loss": None, "val_loss": 4.2 * scale},
            {"step": 5, "flops": 6e9, "tokens": 2560, "train_loss": 3.6, "val_loss": None},
            {"step": 10, "flops": 1.2e10, "tokens": 5120, "train_loss": 3.1,
             "val_loss": 3.0 * scale},
            {"step": 15, "flops": 1.8e10, "tokens": 7680, "train_loss": 2.9,
             "val_loss": 2.5 * scale},
        ],
        "final_val_loss": 2.5 * scale,
        "wall_seconds": 12.3,
    }


@pytest.fixture
def results(tmp_path):
    """Two runs on dataset A, one (same name, other hash, no floor) in a subdirectory, and two
    JSON files that are not run records."""
    root = tmp_path / "results"
    (root / "other").mkdir(parents=True)
    records = {
        root / "fp32.json": make_record("nano/adamw/fp32", HASH_A, speed=1000.0),
        root / "bf16.json": make_record("nano/adamw/bf16", HASH_A, speed=2000.0, scale=1.1, techniques=["bf16"]),
        root / "other" / "fp32-b.json": make_record("nano/adamw/fp32", HASH_B, floor=None),
    }
    for path, record in records.items():
        path.write_text(json.dumps(record))
    (root / "broken.json").write_text('{"schema": 1, "label": ')
    (root / "other" / "meta.json").write_text(json.dumps({"asv": "config"}))
    return root


def load(root):
    with pytest.warns(report.RecordWarning) as caught:
        runs = report.load_records([root])
    return runs, [str(w.message) for w in caught]


def test_load_records_copies_values_and_skips_bad_files(results):
    runs, skipped = load(results)
    assert len(runs) == 3
    assert len(skipped) == 2
    assert any("broken.json" in m for m in skipped) and any("meta.json" in m for m in skipped)

    fp32 = runs.set_index("run").loc["nano/adamw/fp32 (fp32)"]
    assert fp32["tokens_per_second"] == 1000.0
    assert fp32["memory.optimizer_bytes"] == 4 * report.MIB
    assert fp32["peak_flops.source"] == "probe:cpu/float32/matmul-2048/2threads"
    assert fp32["dataset.hash"] == HASH_A
    # The label shared by two runs is disambiguated by file stem; the unique one is kept as is.
    assert set(runs["run"]) == {"nano/adamw/fp32 (fp32)", "nano/adamw/fp32 (fp32-b)",
                                "nano/adamw/bf16"}
    assert set(runs["dataset_key"]) == {f"{DATASET} [{'a' * 12}]", f"{DATASET} [{'b' * 12}]"}


def test_load_records_accepts_files_and_dedupes(results):
    file = results / "bf16.json"
    runs = report.load_records([file, results / "." / "bf16.json"])
    assert list(runs["run"]) == ["nano/adamw/bf16"]


def test_invalid_field_type_is_rejected(tmp_path):
    record = make_record("x", HASH_A)
    record["tokens_per_second"] = "fast"
    (tmp_path / "bad.json").write_text(json.dumps(record))
    with pytest.warns(report.RecordWarning, match=r"bad\.json.*tokens_per_second"):
        assert report.load_records([tmp_path]).empty


def test_curve_frame_has_one_row_per_point(results):
    runs, _ = load(results)
    curves = report.curve_frame(runs)
    assert len(curves) == 3 * 4
    bf16 = curves[curves["run"] == "nano/adamw/bf16"].sort_values("step")
    assert list(bf16["step"]) == [0, 5, 10, 15]
    assert bf16["val_loss"].isna().tolist() == [False, True, False, False]
    assert bf16["val_loss"].iloc[-1] == pytest.approx(2.75)
    assert math.isnan(bf16["train_loss"].iloc[0])
    assert (bf16["dataset.hash"] == HASH_A).all()
    assert (bf16["dataset.entropy_floor"] == 1.234).all()


def test_summary_table_numbers(results):
    runs, _ = load(results)
    table = report.summary_table(runs).set_index("label")
    assert len(table) == 3
    row = table.loc["nano/adamw/bf16"]
    assert row["tokens/s"] == 2000.0
    assert row["s/step"] == pytest.approx(0.256)
    assert row["params MiB"] == 2.0 and row["optimizer state MiB"] == 4.0
    assert row["activations MiB"] == 1.5 and row["peak MiB"] == 300.0
    assert row["final val loss"] == pytest.approx(2.75)
    assert row["dataset"] == f"{DATASET} [{'a' * 12}]"
    assert row["device"] == "cpu: Test CPU"
    assert pd.isna(table.loc["nano/adamw/fp32 (fp32-b)", "entropy floor"])


def test_write_report_outputs(results, tmp_path):
    out = tmp_path / "report"
    with pytest.warns(report.RecordWarning):
        written = report.write_report([results], out)
    # One set of plots per family (the folder a record sits in); the technique comparison where a
    # family holds a baseline and a technique run.
    # The findings files (impls.report.findings: bf16 against its baseline).
    assert sorted(p.name for p in written) == [
        "claims.csv", "findings.csv", "findings.json",
        "loss_vs_flops-other.png", "loss_vs_flops-results.png", "summary.csv", "summary.md",
        "technique_comparison-results.csv", "technique_comparison-results.png",
        "throughput_memory-other.png", "throughput_memory-results.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)  # no temps

    csv = pd.read_csv(out / "summary.csv").set_index("label")
    assert csv.loc["nano/adamw/fp32 (fp32)", "tokens/s"] == 1000.0
    assert csv.loc["nano/adamw/fp32 (fp32)", "grads MiB"] == 2.0
    assert csv.loc["nano/adamw/bf16", "MFU"] == pytest.approx(0.31)

    # the runs' table, before the next section's heading (at scale: a line saying it found no artefacts)
    markdown = (out / "summary.md").read_text().split("\n## ")[0].strip().splitlines()
    assert len(markdown) == 2 + 3
    assert markdown[0].startswith("| family | label | model | params | dataset |")
    bf16 = next(line for line in markdown if line.startswith("| results | nano/adamw/bf16 |"))
    for cell in ("124,672", "2,000", "31.00%", "32.00%", "2.00", "1.50", "2.7500", "1.2340"):
        assert f"| {cell} |" in bf16
    assert "| n/a |" in next(line for line in markdown if "(fp32-b)" in line)

    for name in ("loss_vs_flops-results.png", "throughput_memory-results.png", "technique_comparison-results.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 20_000


def test_mixed_dataset_hashes_are_separate_facets(results):
    runs, _ = load(results)
    figure = report.plot_loss_vs_flops(runs)
    panels = {ax.get_title(): [t.get_text() for t in ax.get_legend().get_texts()]
              for ax in figure.axes}
    assert panels == {
        f"dataset {DATASET} [{'a' * 12}]": ["nano/adamw/bf16", "nano/adamw/fp32 (fp32)",
                                            "entropy floor (H = 1.234 nats)"],
        f"dataset {DATASET} [{'b' * 12}]": ["nano/adamw/fp32 (fp32-b)"],
    }
    for ax in figure.axes:
        assert ax.get_xscale() == "log"


def test_empty_directory_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main([str(empty), "-o", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(empty) in err[0] and "no valid run records" in err[0]
    assert not (tmp_path / "out").exists()


def test_cli_writes_report_and_reports_skipped_files(results, tmp_path, capsys):
    out = tmp_path / "cli"
    assert report.main([str(results), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 8 + 3  # every written file, one per line (3: the findings)
    assert "warning: skipping" in captured.err and "broken.json" in captured.err


def test_records_frame_rejects_invalid_records():
    record = make_record("x", HASH_A)
    del record["dataset"]["hash"]
    with pytest.raises(report.RecordError, match="dataset.hash"):
        report.records_frame([record])


def test_technique_comparison_is_normalised_to_the_baseline(results):
    runs, _ = load(results)
    group = runs[runs["family"] == "results"]
    untimed = report.technique_comparison(group).set_index("run")
    # Two separately timed runs give no speed ratio: only an interleaved record does.
    assert untimed["speed ratio"].isna().all()
    interleaved = {"variants": {"base": {"label": "nano/adamw", "speedup": {"value": 1.0, "ci95": [1.0, 1.0]}},
                                "bf16": {"label": "nano/adamw/bf16", "speedup": {"value": 2.0, "ci95": [1.8, 2.2]}}}}
    comparison = report.technique_comparison(group, [interleaved]).set_index("run")
    bf16, base = comparison.loc["nano/adamw/bf16"], comparison.loc["nano/adamw/fp32 (fp32)"]
    assert bf16["speed ratio"] == pytest.approx(2.0) and base["speed ratio"] == 1.0
    assert (bf16["speed ratio lo"], bf16["speed ratio hi"]) == (1.8, 2.2)
    assert bf16["loss delta"] == pytest.approx(0.25)  # 2.75 - 2.5
    # Memory components as fractions of the baseline's total exact memory (2+2+4+1.5 MiB).
    assert bf16["optimizer state / baseline memory"] == pytest.approx(4 / 9.5)
    assert sum(base[f"{n} / baseline memory"] for n in report.MEMORY_COMPONENTS.values()) == pytest.approx(1.0)
    # A run on another dataset is never compared with this baseline.
    assert "nano/adamw/fp32 (fp32-b)" not in comparison.index


# --------------------------------------------------------------------------------------------
# Refused records, interleaved comparisons, the compare view
# --------------------------------------------------------------------------------------------

def make_interleaved(family: str = "technique", *, noisy: bool = False) -> dict:
    """An interleaved-comparison record as ``etbench compare`` writes it: a baseline (speedup 1),
    one variant clearly faster, one whose interval holds 1."""
    def stat(median, lo, hi):
        return {"median": median, "ci95": [lo, hi], "per_round": [lo, median, hi]}

    def variant(label, sps, speed, lo, hi, activations):
        return {"label": label, "recipe": {"model": "nano", "techniques": [] if label == "nano" else [label]},
                "tokens_per_step": 1024, "seconds_per_step": stat(sps, sps * 0.95, sps * 1.05),
                "tokens_per_second": stat(1024 / sps, 1024 / sps * 0.95, 1024 / sps * 1.05),
                "speedup": stat(speed, lo, hi),
                "memory": {"params_bytes": 1, "grads_bytes": 1, "optimizer_bytes": 2, "activations_bytes": 4},
                "memory_ratio": {"params_bytes": 1.0, "grads_bytes": 1.0, "optimizer_bytes": 1.0,
                                 "activations_bytes": activations}}

    return {"schema": 1, "kind": "interleaved", "family": family, "baseline": "baseline",
            "rounds": 5, "steps_per_round": 3, "warmup_steps": 2,
            "ci_method": "bootstrap percentile 95% interval of the median over rounds (10000 resamples)",
            "load": {"load1_start": 0.8, "load1_end": 1.1, "cores_in_use": 2, "noisy": noisy},
            "device": {"type": "cpu", "name": "Test CPU", "threads": 2}, "world_size": 1, "git_commit": "abc",
            "variants": {"baseline": variant("nano", 0.03, 1.0, 1.0, 1.0, 1.0),
                         "bf16": variant("nano+bf16", 0.02, 1.5, 1.4, 1.6, 0.5),
                         "fuse": variant("nano+fuse", 0.0299, 1.01, 0.97, 1.05, 1.0)}}


def make_refused(label: str = "nano/adamw/fp16") -> dict:
    record = make_record(label, HASH_A, techniques=["fp16"])
    record.update(mfu=2.8, hfu=2.9, consistency_errors=["MFU 280.0% exceeds 100%: peak too low"])
    return record


@pytest.fixture
def mixed(tmp_path):
    """A runs dir with two training runs, a refused one and an interleaved comparison."""
    family = tmp_path / "runs" / "technique"
    family.mkdir(parents=True)
    (family / "technique-baseline.json").write_text(json.dumps(make_record("nano/adamw", HASH_A)))
    (family / "technique-bf16.json").write_text(json.dumps(
        make_record("nano/adamw/bf16", HASH_A, speed=1500.0, techniques=["bf16"])))
    (family / "technique-fp16.json").write_text(json.dumps(make_refused()))
    (family / "compare-technique.json").write_text(json.dumps(make_interleaved()))
    return tmp_path / "runs"


def test_load_all_routes_runs_refused_and_interleaved(mixed):
    loaded = report.load_all([mixed])
    assert sorted(loaded.runs["run"]) == ["nano/adamw", "nano/adamw/bf16"]
    assert [r["label"] for r in loaded.refused] == ["nano/adamw/fp16"]
    assert loaded.refused[0]["reasons"] == ["MFU 280.0% exceeds 100%: peak too low"]
    assert [r["family"] for r in loaded.interleaved] == ["technique"]
    # load_records keeps its contract: runs only, the refused one warned about, the interleaved
    # record not taken for a broken run record.
    with pytest.warns(report.RecordWarning) as caught:
        runs = report.load_records([mixed])
    assert len(runs) == 2
    assert [str(w.message) for w in caught] == [
        f"skipping {mixed / 'technique' / 'technique-fp16.json'}: inconsistent record, not plotted: "
        "MFU 280.0% exceeds 100%: peak too low"]


def test_interleaved_table_verdicts_and_ratios():
    table = report.interleaved_table(make_interleaved()).set_index("variant")
    assert list(table.index) == ["baseline", "bf16", "fuse"]  # baseline first
    assert table.loc["bf16", "verdict"] == "faster"
    assert table.loc["fuse", "verdict"] == "no clear difference"  # [0.97, 1.05] holds 1
    assert table.loc["bf16", "speedup [95% CI]"] == "1.500 [1.400, 1.600]"
    assert table.loc["bf16", "activations ratio"] == 0.5
    slower = make_interleaved()
    slower["variants"]["fuse"]["speedup"]["ci95"] = [0.8, 0.9]
    assert report.interleaved_table(slower).set_index("variant").loc["fuse", "verdict"] == "slower"


@pytest.mark.parametrize("damage, message", [
    (lambda r: r.update(baseline="nope"), "baseline 'nope'"),
    (lambda r: r["variants"]["bf16"]["speedup"].update(median="fast"), r"bf16\.speedup has no number"),
    (lambda r: r["variants"]["bf16"]["speedup"].update(ci95=[1.0]), r"bf16\.speedup\.ci95"),
])
def test_invalid_interleaved_record_is_skipped_with_reason(tmp_path, damage, message):
    record = make_interleaved()
    damage(record)
    (tmp_path / "compare-x.json").write_text(json.dumps(record))
    with pytest.warns(report.RecordWarning, match=message):
        assert report.load_all([tmp_path]).interleaved == []


def test_write_report_includes_interleaved_and_refused(mixed, tmp_path):
    out = tmp_path / "out"
    with pytest.warns(report.RecordWarning, match="not plotted"):
        written = {p.name for p in report.write_report([mixed], out)}
    assert {"interleaved-technique.png", "interleaved-technique.csv"} <= written
    assert (out / "interleaved-technique.png").read_bytes().startswith(b"\x89PNG")
    markdown = (out / "summary.md").read_text()
    assert "### Refused records" in markdown and "nano/adamw/fp16" in markdown and "280.0%" in markdown
    assert "### Interleaved comparison: technique (baseline baseline)" in markdown
    assert "| bf16 | nano+bf16 |" in markdown and "1.500 [1.400, 1.600]" in markdown
    # The refused record is not a row of the results table.
    table_rows = [line for line in markdown.split("\n## Findings")[0].splitlines() if line.startswith("| technique |")]
    assert len(table_rows) == 2 and not any("fp16" in line for line in table_rows)


def test_two_families_comparisons_of_one_file_name_both_reach_the_report(mixed, tmp_path):
    """``parallel/compare-ws2.json`` and ``model_parallel/compare-ws2.json`` (what make bench
    writes) once both wrote ``interleaved-ws2.*``, the second silently replacing the first."""
    for family in ("parallel", "model_parallel"):
        (mixed / family).mkdir()
        (mixed / family / "compare-ws2.json").write_text(json.dumps(make_interleaved(family)))
    out = tmp_path / "out"
    with pytest.warns(report.RecordWarning, match="not plotted"):
        written = {p.name for p in report.write_report([mixed], out)}
    assert {"interleaved-parallel-ws2.csv", "interleaved-model_parallel-ws2.csv",
            "interleaved-technique.csv"} <= written
    assert not any(name.startswith("interleaved-ws2") for name in written)


def test_two_outputs_of_one_name_move_nothing(tmp_path):
    """The staging folder refuses to move two outputs of one name (one would replace the other):
    nothing reaches the output folder."""
    from impls.errors import WriteError

    out = tmp_path / "out"
    with pytest.raises(WriteError, match="written twice; none moved"):
        with report.staged_outputs(out) as stage:
            a = report.write_text(stage.folder / "a.csv", "1")
            stage.add(a, report.write_text(stage.folder / "b.csv", "2"), a)
    assert not out.exists()


def test_bootstrap_ratio_of_medians():
    a = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02]
    ratio, low, high = report.bootstrap_ratio(a, [2 * x for x in a], resamples=2000)
    assert ratio == pytest.approx(2.0)
    assert 1.6 < low <= 2.0 <= high < 2.5  # clearly excludes 1
    ratio, low, high = report.bootstrap_ratio(a, a, resamples=2000)
    assert ratio == 1.0 and low < 1.0 < high
    # The interval is that of the ratio of resampled medians: within the extreme ratios possible.
    assert low >= min(a) / max(a) and high <= max(a) / min(a)
    # Reproducible (seeded), and the seed matters.
    assert report.bootstrap_ratio(a, a[::-1], resamples=500) == report.bootstrap_ratio(a, a[::-1], resamples=500)
    with pytest.raises(ValueError):
        report.bootstrap_ratio([], a)


def _timed(label, samples, *, noisy=False):
    record = make_record(label, HASH_A)
    if samples:
        median = float(sorted(samples)[len(samples) // 2])
        record["step_time"] = {"median": median, "ci95": [min(samples), max(samples)], "samples": samples}
        record["seconds_per_step"] = median
    record["load"] = {"noisy": noisy}
    return record


def test_compare_table_verdicts(tmp_path):
    base = [0.100, 0.101, 0.099, 0.102, 0.098, 0.100, 0.1005]
    sides = {
        "a": {"slow": _timed("slow", base), "same": _timed("same", base), "bare": _timed("bare", None),
              "few": _timed("few", [0.1, 0.1]), "gone": _timed("gone", base), "refused": make_refused("refused")},
        "b": {"slow": _timed("slow", [1.5 * x for x in base]), "same": _timed("same", base[::-1], noisy=True),
              "bare": _timed("bare", None), "few": _timed("few", [0.2, 0.2]), "new": _timed("new", base),
              "refused": _timed("refused", base)},
    }
    for side, records in sides.items():
        (tmp_path / side / "fam").mkdir(parents=True)
        for stem, record in records.items():
            (tmp_path / side / "fam" / f"{stem}.json").write_text(json.dumps(record))
    table = report.compare_table(tmp_path / "a", tmp_path / "b", resamples=2000).set_index("record")
    assert table.loc["fam/slow", "verdict"] == "slower"
    assert table.loc["fam/slow", "ratio B/A"] == pytest.approx(1.5)
    assert table.loc["fam/slow", "ratio lo"] > 1
    assert table.loc["fam/same", "verdict"] == "no change"
    assert table.loc["fam/same", "ratio lo"] <= 1 <= table.loc["fam/same", "ratio hi"]
    assert bool(table.loc["fam/same", "noisy"]) and table.loc["fam/same", "B noisy"]
    assert not table.loc["fam/slow", "noisy"]
    assert table.loc["fam/bare", "verdict"] == "no samples"
    assert table.loc["fam/bare", "ratio B/A"] == pytest.approx(1.0)  # point values, no interval
    assert math.isnan(table.loc["fam/bare", "ratio lo"])
    assert table.loc["fam/few", "verdict"] == "too few samples (2)"  # no degenerate zero-width interval
    assert table.loc["fam/gone", "verdict"] == "only in A" and table.loc["fam/new", "verdict"] == "only in B"
    assert table.loc["fam/refused", "verdict"].startswith("refused: MFU 280.0%")


def test_compare_cli_writes_page_and_rejects_bad_dirs(tmp_path, capsys):
    for side, scale in (("a", 1.0), ("b", 1.3)):
        (tmp_path / side / "fam").mkdir(parents=True)
        samples = [scale * x for x in (0.10, 0.11, 0.09, 0.10, 0.105)]
        (tmp_path / side / "fam" / "run.json").write_text(json.dumps(_timed("nano/adamw", samples)))
    out = tmp_path / "out"
    assert report.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out)]) == 0
    page = (out / "compare.html").read_text()
    assert '<table class="sortable" id=\'compare\'>' in page and "slower" in page
    assert "http://" not in page and "https://" not in page  # standalone, works offline
    assert "1.300 [" in (out / "compare.md").read_text()
    capsys.readouterr()

    missing = tmp_path / "nope"
    assert report.main(["--compare", str(missing), str(tmp_path / "b"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0] and "RUNS_A" in err[0]
    assert report.main([str(missing), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0]


def test_html_table_sorts_by_numbers_and_escapes():
    html = report.html_table(
        [{"name": "<b>x</b>", "v": 1234.5, "ci": ("0.5 [0.4, 0.6]", 0.5), "link": '<a href="#a">a</a>'},
         {"name": "y", "v": float("nan"), "ci": (None, None), "link": ""}],
        ["name", "v", "ci", "link"], formats={"v": "{:,.0f}"}, raw_html=("link",), text_columns=("name",))
    assert '<table class="sortable">' in html
    assert "&lt;b&gt;x&lt;/b&gt;" in html and '<a href="#a">a</a>' in html
    assert '<td data-sort="1234.5">1,234</td>' in html
    assert '<td data-sort="0.5">0.5 [0.4, 0.6]</td>' in html
    assert html.count('data-sort="">n/a</td>') == 2


def test_records_as_impls_compare_writes_them(tmp_path):
    """impls.compare's records carry no family (the folder gives it), estimate the geometric mean
    (``value``/``geomean``, with the t interval) beside the median, may be several per family, and
    the harness-overhead record is another kind: routed, reported, never warned about."""
    record = make_interleaved()
    del record["family"]
    record["variants"]["bf16"]["speedup"] = {"value": 1.45, "median": 1.5, "ci95": [1.4, 1.5], "n": 5,
                                             "per_round": [1.4, 1.5, 1.45, 1.5, 1.42]}
    record["variants"]["bf16"]["seconds_per_step"]["geomean"] = 0.021
    record["variants"]["fuse"]["memory_ratio"]["activations_bytes"] = None
    family = tmp_path / "runs" / "isoflop"
    family.mkdir(parents=True)
    (family / "compare-isoflop-1e10.json").write_text(json.dumps(record))
    (family / "compare-isoflop-3e10.json").write_text(json.dumps(record))
    overhead = tmp_path / "runs" / "overhead"
    overhead.mkdir()
    (overhead / "harness-overhead.json").write_text(json.dumps({
        "kind": "harness_overhead", "label": "small/adamw", "rounds": 7, "steps_per_round": 5,
        "ci_method": "t interval", "overhead": {"value": 0.004, "ci95": [-0.002, 0.011]}}))

    import warnings as _warnings
    with _warnings.catch_warnings():
        _warnings.simplefilter("error", report.RecordWarning)
        loaded = report.load_all([tmp_path / "runs"])
    assert [r["family"] for r in loaded.interleaved] == ["isoflop", "isoflop"]
    assert [r["label"] for r in loaded.extra] == ["small/adamw"]
    table = report.interleaved_table(loaded.interleaved[0]).set_index("variant")
    assert table.loc["bf16", "speedup"] == 1.45 and table.loc["bf16", "speedup [95% CI]"] == "1.450 [1.400, 1.500]"
    assert table.loc["bf16", "s/step"] == 0.021
    assert math.isnan(table.loc["fuse", "activations ratio"])

    out = tmp_path / "out"
    written = {p.name for p in report.write_report([tmp_path / "runs"], out)}
    assert {"interleaved-isoflop-1e10.png", "interleaved-isoflop-3e10.png"} <= written
    markdown = (out / "summary.md").read_text()
    assert "### Interleaved comparison: isoflop-3e10" in markdown
    assert "- small/adamw: +0.40% [-0.20%, +1.10%] over 7 rounds" in markdown


def test_interleaved_ratios_of_two_runs_agree_or_differ(tmp_path):
    """Two benchmark runs' interleaved speed-ups: overlapping intervals agree, disjoint ones are
    flagged ``differ``; the baseline (1 by definition) is not listed."""
    for name, bf16 in (("a", (1.5, 1.4, 1.6)), ("b", (1.2, 1.1, 1.3))):
        family = tmp_path / name / "technique"
        family.mkdir(parents=True)
        record = make_interleaved(noisy=name == "b")
        record["variants"]["bf16"]["speedup"] = {"value": bf16[0], "ci95": list(bf16[1:])}
        (family / "compare-technique.json").write_text(json.dumps(record))
    table = report.ratio_agreement(tmp_path / "a", tmp_path / "b").set_index("variant")
    assert list(table.index) == ["bf16", "fuse"]
    assert table.loc["bf16", "verdict"] == "differ" and table.loc["fuse", "verdict"] == "agree"
    assert table.loc["bf16", "B noisy"] and not table.loc["bf16", "A noisy"]
    text = report.ratio_agreement_markdown(table.reset_index(), "a", "b")
    assert "**differ**" in text and "1 agree, 1 differ" in text


# --------------------------------------------------------------------------------------------
# Data-parallel and sharded training (issue 10): synthetic records with model_states and comm
# --------------------------------------------------------------------------------------------

DP_PSI = 124_672


def make_dp_record(technique: str, n: int, stage: int, speed: float, *, params_factor: float = 1.0,
                   comm_bytes: float | None = None, cpu_count: int = 2) -> dict:
    """A run record of a data-parallel technique at world size ``n`` (fp32 AdamW: 4Ψ + 4Ψ + 8Ψ),
    its measured parameter bytes ``params_factor`` × the formula, step-time CI ±10%."""
    from impls.measure import model_states as ms

    record = make_record(f"nano/{technique or 'none'}/ws{n}", HASH_A, speed=speed,
                         techniques=[technique] if technique else [])
    record["world_size"] = n
    record["device"]["threads"] = 1
    record["load"] = {"cpu_count": cpu_count, "noisy": False}
    record["step_time"] = {"median": 512 / speed, "ci95": [0.9 * 512 / speed, 1.1 * 512 / speed]}
    f = ms.formula(DP_PSI, n, stage, param_bytes=4, grad_bytes=4, k=8)
    measured = {"params_bytes": f["params"] * params_factor, "grads_bytes": f["grads"], "optimizer_bytes": f["optimizer"]}
    record["model_states"] = ms.check_run(measured, DP_PSI, n, stage, optimizer="adamw")
    if comm_bytes is not None:
        record["comm"] = {"calls": 3, "bytes": comm_bytes}
    return record


def make_comm_record(world_size: int = 2) -> dict:
    """An ``etbench comm`` record: ring all-reduce and a parameter server, 3 message sizes."""
    return {"kind": "comm", "schema": 1, "world_size": world_size, "schemes": {
        "ring": [{"bytes": 1024 * 8 ** i, "seconds": {"median": 1e-3 * 2 ** i}} for i in range(3)],
        "param_server": [{"bytes": 1024 * 8 ** i, "seconds": {"median": 2e-3 * 2 ** i}, "algbw": 10.0, "busbw": 20.0}
                         for i in range(3)]}}


@pytest.fixture
def dp_runs(tmp_path):
    """DDP at 1, 2, 4 ranks, ZeRO-3 at 2 and 4 ranks (no 1-rank run: falls back to the run without
    techniques), a 1-rank run without techniques, and a comm record; 2 cores."""
    family = tmp_path / "runs" / "dataparallel"
    family.mkdir(parents=True)
    psi = DP_PSI
    records = {
        "ddp-1": make_dp_record("ddp", 1, 0, 1000.0, comm_bytes=0),
        "ddp-2": make_dp_record("ddp", 2, 0, 1800.0, comm_bytes=4 * psi),  # one all-reduce of Ψ fp32 grads
        "ddp-4": make_dp_record("ddp", 4, 0, 2000.0, comm_bytes=4 * psi),
        "zero3-2": make_dp_record("zero:stage=3", 2, 3, 1500.0, params_factor=1.01, comm_bytes=3 * 4 * psi),
        "zero3-4": make_dp_record("zero:stage=3", 4, 3, 1600.0, comm_bytes=3 * 4 * psi * 1.1),
        "none-1": make_dp_record("", 1, 0, 1100.0),
    }
    for name, record in records.items():
        (family / f"{name}.json").write_text(json.dumps(record))
    (tmp_path / "runs" / "comm").mkdir()
    (tmp_path / "runs" / "comm" / "comm-ws2.json").write_text(json.dumps(make_comm_record()))
    return tmp_path / "runs"


def _dp(dp_runs):
    loaded = report.load_all([dp_runs])
    return loaded, report.data_parallel_frame(loaded.runs)


def test_data_parallel_frame_reads_model_states_and_comm(dp_runs):
    loaded, frame = _dp(dp_runs)
    assert [r["kind"] for r in loaded.comm] == ["comm"] and len(loaded.runs) == 6
    row = frame.set_index(["technique", "n_d"]).loc[("zero:stage=3", 2)]
    assert row["stage"] == 3 and row["stage_name"] == "ZeRO-3 P_os+g+p" and row["psi"] == DP_PSI
    assert row["formula_total"] == 16 * DP_PSI / 2 and row["formula_params"] == 4 * DP_PSI / 2
    assert row["measured_params"] == pytest.approx(1.01 * 4 * DP_PSI / 2)
    assert row["ratio_total"] == pytest.approx((1.01 * 4 + 12) / 16)
    assert row["comm_measured"] == 12 * DP_PSI and row["comm_paper"] == 12 * DP_PSI  # 3Ψ fp32
    assert row["comm_ring"] == 12 * DP_PSI * 0.5 and row["tokens_per_rank"] == 750.0
    over = frame.set_index(["technique", "n_d"])["oversubscribed"]
    assert over[("ddp", 2)] == False and over[("ddp", 4)] == True  # noqa: E712 (4 ranks × 1 thread > 2 cores)
    # Formula lines: every world size from 1 to the largest measured, the technique's own formula.
    lines = report.model_states_lines(frame)
    z3 = lines[lines["technique"] == "zero:stage=3"].set_index("n_d")
    assert list(z3.index) == [1, 2, 3, 4]
    assert z3.loc[3, "total"] == pytest.approx(16 * DP_PSI / 3) and z3.loc[1, "total"] == 16 * DP_PSI
    ddp = lines[lines["technique"] == "ddp"]
    assert (ddp["total"] == 16 * DP_PSI).all()


def test_model_states_plot_draws_formula_lines_over_measured_points(dp_runs):
    _, frame = _dp(dp_runs)
    lines = report.model_states_lines(frame)
    figure = report.plot_model_states(frame, lines)
    axes = figure.axes[:4]
    assert [ax.get_title() for ax in axes] == ["parameters", "gradients", "optimizer state", "total model states"]
    total = axes[3]
    line = next(a for a in total.lines if a.get_gid() == "formula:zero:stage=3")
    assert list(line.get_xdata()) == [1, 2, 3, 4]
    assert line.get_ydata() == pytest.approx([16 * DP_PSI / n / report.MIB for n in (1, 2, 3, 4)])
    points = next(c for c in axes[0].collections if c.get_gid() == "measured:zero:stage=3")
    offsets = [tuple(map(float, xy)) for xy in points.get_offsets()]
    assert [x for x, _ in offsets] == [2, 4]
    assert [y for _, y in offsets] == pytest.approx([1.01 * 4 * DP_PSI / 2 / report.MIB, 4 * DP_PSI / 4 / report.MIB])


def test_scaling_efficiency_per_technique(dp_runs):
    _, frame = _dp(dp_runs)
    table = report.scaling_efficiency(frame).set_index(["technique", "n_d"])
    assert table.loc[("ddp", 1), "efficiency"] == 1.0 and table.loc[("ddp", 1), "lo"] == 1.0
    assert table.loc[("ddp", 2), "efficiency"] == pytest.approx(0.9)  # 1800/2 ÷ 1000
    assert table.loc[("ddp", 2), "lo"] == pytest.approx((900 / 1.1) / (1000 / 0.9))
    assert table.loc[("ddp", 2), "hi"] == pytest.approx((900 / 0.9) / (1000 / 1.1))
    assert table.loc[("ddp", 4), "efficiency"] == pytest.approx(0.5) and bool(table.loc[("ddp", 4), "oversubscribed"])
    # ZeRO-3 has no 1-rank run: measured against the run without techniques (1100 tokens/s).
    assert table.loc[("zero:stage=3", 2), "reference"] == "no technique, 1 rank"
    assert table.loc[("zero:stage=3", 2), "efficiency"] == pytest.approx(750 / 1100)
    figure = report.plot_scaling_efficiency(table.reset_index())
    ax = figure.axes[0]
    ddp = next(a for a in ax.lines if a.get_gid() == "efficiency:ddp")
    assert ddp.get_ydata() == pytest.approx([1.0, 0.9, 0.5])
    assert sum(t.get_text() == "oversubscribed" for t in ax.texts) == 2  # ddp and ZeRO-3 at 4 ranks


def test_comm_volume_measured_vs_formula(dp_runs):
    _, frame = _dp(dp_runs)
    comm = report.comm_volume_table(frame).set_index(["technique", "n_d"])
    assert 1 not in comm.index.get_level_values("n_d")  # one rank communicates nothing
    assert comm.loc[("ddp", 2), "ratio_paper"] == 0.5  # a counter of payloads sees Ψ, the paper counts 2Ψ
    assert comm.loc[("ddp", 2), "ratio_payload"] == 1.0 and comm.loc[("ddp", 2), "ratio_ring"] == 1.0
    assert comm.loc[("ddp", 4), "ratio_ring"] == pytest.approx(4 / 6)
    assert comm.loc[("zero:stage=3", 4), "ratio_paper"] == pytest.approx(1.1)
    figure = report.plot_comm_volume(comm.reset_index())
    bars = figure.axes[0].patches
    assert [b.get_width() for b in bars] == pytest.approx(list(comm["comm_measured"] / report.MIB))


def test_comm_bandwidth_frame_tolerates_layouts_and_computes_busbw(tmp_path):
    bw = report.comm_bandwidth_frame([make_comm_record(4)]).set_index(["scheme", "bytes"])
    ring = bw.loc[("ring", 8192)]
    assert ring["algbw"] == 8192 / 2e-3 and ring["busbw"] == pytest.approx(8192 / 2e-3 * 2 * 3 / 4)
    ps = bw.loc[("param_server", 1024)]
    assert ps["busbw"] == pytest.approx(2 * 1024 / 2e-3)  # the record's own busbw/algbw factor (2)
    listed = {"kind": "comm", "schemes": [{"scheme": "ring", "points": [
        {"bytes": 100, "world_size": 2, "algbw": 5.0}]}]}
    flat = {"kind": "comm", "world_size": 8, "results": [{"scheme": "ring", "size": 64, "seconds": 0.5}]}
    both = report.comm_bandwidth_frame([listed, flat])
    assert both[["world_size", "bytes", "algbw"]].values.tolist() == [[2, 100, 5.0], [8, 64, 128.0]]
    assert both["busbw"].tolist() == pytest.approx([5.0, 128.0 * 2 * 7 / 8])
    figure = report.plot_bus_bandwidth(report.comm_bandwidth_frame([make_comm_record(4)]))
    line = next(a for a in figure.axes[0].lines if a.get_gid() == "busbw:4:ring")
    assert line.get_ydata() == pytest.approx([1024 * 8 ** i / (1e-3 * 2 ** i) * 1.5 / 1e9 for i in range(3)])
    (tmp_path / "bad.json").write_text(json.dumps({"kind": "comm", "schemes": {"ring": [{"bytes": 1}]}}))
    with pytest.warns(report.RecordWarning, match="comm record without a point"):
        assert report.load_all([tmp_path]).comm == []


def test_write_report_data_parallel_outputs(dp_runs, tmp_path):
    out = tmp_path / "out"
    written = {p.name for p in report.write_report([dp_runs], out)}
    assert {"data_parallel_model_states.png", "data_parallel_scaling.png", "data_parallel_comm.png",
            "comm_busbw.png", "data_parallel_memory.csv", "data_parallel_model_states.csv"} <= written
    assert (out / "data_parallel_model_states.png").read_bytes().startswith(b"\x89PNG")
    markdown = (out / "summary.md").read_text()
    assert "## Data-parallel and sharded training" in markdown
    assert "| zero:stage=3 | ZeRO-3 P_os+g+p | 2 | 0.240 / 0.238 |" in markdown
    assert "| ddp | DDP | 2 | 124,672 | 498,688 | 997,376 | 498,688 | 498,688 | 0.500 | 1.000 | 1.000 |" in markdown
    assert "| llama-7b | 6.738B | DDP | 100.41 ✗ |" in markdown
    memory = pd.read_csv(out / "data_parallel_memory.csv")
    llama = memory[(memory["model"] == "llama-7b") & (memory["stage"] == 3) & (memory["n_d"] == 64)].iloc[0]
    assert llama["total_bytes"] == pytest.approx(16 * llama["psi"] / 64) and bool(llama["fits"])
    # A comm record alone is enough for a report; runs without model_states give no data-parallel files.
    only = tmp_path / "only-comm"
    only.mkdir()
    (only / "comm.json").write_text(json.dumps(make_comm_record()))
    assert "comm_busbw.png" in {p.name for p in report.write_report([only], tmp_path / "out2")}
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "run.json").write_text(json.dumps(make_record("nano/adamw", HASH_A)))
    names = {p.name for p in report.write_report([plain], tmp_path / "out3")}
    assert not any(n.startswith(("data_parallel", "comm_")) for n in names)
    assert "Data-parallel" not in (tmp_path / "out3" / "summary.md").read_text()


def test_the_bus_bandwidth_frame_reads_etbench_comm_records():
    """The layout `etbench comm` writes (impls/commbench.py): a flat ``results`` list with
    ``size_bytes``, ``time_s`` and ``*_Bps`` summaries; the ring all-reduce's bus bandwidth is
    algbw × 2(n−1)/n and the parameter server's is its root link's rate (``link_Bps``)."""
    def summary(v):
        return {"median": v, "ci95": [v * 0.9, v * 1.1]}

    record = {"kind": "comm", "world_size": 4, "schemes": ["allreduce", "ps"], "results": [
        {"scheme": "allreduce", "size_bytes": 1 << 20, "time_s": summary(0.01), "algbw_Bps": summary((1 << 20) / 0.01),
         "busbw_Bps": summary(1.5 * (1 << 20) / 0.01), "link_Bps": summary(1.5 * (1 << 20) / 0.01)},
        {"scheme": "ps", "size_bytes": 1 << 20, "time_s": summary(0.02), "algbw_Bps": summary((1 << 20) / 0.02),
         "link_Bps": summary(3 * (1 << 20) / 0.02)}]}
    frame = report.comm_bandwidth_frame([record]).set_index("scheme")
    assert frame.loc["allreduce", "algbw"] == pytest.approx((1 << 20) / 0.01)
    assert frame.loc["allreduce", "busbw"] == pytest.approx(1.5 * (1 << 20) / 0.01)
    assert frame.loc["ps", "busbw"] == pytest.approx(3 * (1 << 20) / 0.02)  # the root's link
    assert set(frame["bytes"]) == {1 << 20}
