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
    assert sorted(p.name for p in written) == [
        "loss_vs_flops-other.png", "loss_vs_flops-results.png", "summary.csv", "summary.md",
        "technique_comparison-results.csv", "technique_comparison-results.png",
        "throughput_memory-other.png", "throughput_memory-results.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)  # no temps

    csv = pd.read_csv(out / "summary.csv").set_index("label")
    assert csv.loc["nano/adamw/fp32 (fp32)", "tokens/s"] == 1000.0
    assert csv.loc["nano/adamw/fp32 (fp32)", "grads MiB"] == 2.0
    assert csv.loc["nano/adamw/bf16", "MFU"] == pytest.approx(0.31)

    markdown = (out / "summary.md").read_text().splitlines()
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
    assert len(captured.out.splitlines()) == 8  # every written file, one per line
    assert "warning: skipping" in captured.err and "broken.json" in captured.err


def test_records_frame_rejects_invalid_records():
    record = make_record("x", HASH_A)
    del record["dataset"]["hash"]
    with pytest.raises(report.RecordError, match="dataset.hash"):
        report.records_frame([record])


def test_technique_comparison_is_normalised_to_the_baseline(results):
    runs, _ = load(results)
    comparison = report.technique_comparison(runs[runs["family"] == "results"]).set_index("run")
    bf16, base = comparison.loc["nano/adamw/bf16"], comparison.loc["nano/adamw/fp32 (fp32)"]
    assert bf16["speed ratio"] == pytest.approx(2.0) and base["speed ratio"] == 1.0
    assert bf16["loss delta"] == pytest.approx(0.25)  # 2.75 - 2.5
    # Memory components as fractions of the baseline's total exact memory (2+2+4+1.5 MiB).
    assert bf16["optimizer state / baseline memory"] == pytest.approx(4 / 9.5)
    assert sum(base[f"{n} / baseline memory"] for n in report.MEMORY_COMPONENTS.values()) == pytest.approx(1.0)
    # A run on another dataset is never compared with this baseline.
    assert "nano/adamw/fp32 (fp32-b)" not in comparison.index
