"""The compression section of the report and site: every run against its family's baseline,
its knob read from what the technique measured, and the curves written."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from impls import report, site
from impls.report import compression as rc

from test_report import HASH_A, make_record


def _run(root, family, name, techniques=(), notes=None, scale=1.0, optimizer_mib=4, init_from=None,
         model_args=None):
    record = make_record(f"nano/{name}", HASH_A, techniques=tuple(techniques), scale=scale)
    record["recipe"]["init_from"] = init_from
    record["recipe"]["model_args"] = model_args or {}
    record["memory"]["optimizer_bytes"] = optimizer_mib * report.MIB
    if notes:
        record["technique_notes"] = notes
    path = root / family / f"{family}-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


@pytest.fixture
def runs_dir(tmp_path):
    root = tmp_path / "runs"
    _run(root, "pruning", "baseline")
    for sparsity, scale in ((0.5, 1.02), (0.9, 1.2)):
        _run(root, "pruning", f"prune-{sparsity}", [f"prune:sparsity={sparsity}"],
             notes={"prune": {"achieved_sparsity": sparsity}}, scale=scale)
    _run(root, "lowrank", "baseline")
    # LoRA fine-tunes the baseline's weights: its reference is full fine-tuning from them
    _run(root, "lowrank", "finetune", init_from="base.json", scale=0.8)
    for rank, scale in ((4, 0.9), (16, 0.85)):
        _run(root, "lowrank", f"lora-{rank}", [f"lora:rank={rank}"], notes={"lora": {"rank": rank}},
             scale=scale, optimizer_mib=1, init_from="base.json")
    # sparse embeddings need an untied table: their reference is the untied model, not the tied baseline
    _run(root, "sparse", "baseline", scale=1.0)
    _run(root, "sparse", "untied", model_args={"tie_embeddings": False}, scale=0.9)
    _run(root, "sparse", "sparse_embedding", ["sparse_embedding"], model_args={"tie_embeddings": False}, scale=0.95)
    # not a compression family: never in the section
    _run(root, "technique", "baseline")
    _run(root, "technique", "bf16", ["bf16"], scale=1.01)
    return root


def test_frame_is_relative_to_each_family_baseline(runs_dir):
    loaded = report.load_all([runs_dir])
    frame = rc.compression_frame(loaded.runs, loaded.interleaved)
    assert set(frame["family"]) == {"pruning", "lowrank", "sparse"}
    sparse = frame[frame["family"] == "sparse"].set_index("run")
    assert set(sparse.index) == {"nano/untied", "nano/sparse_embedding"}  # the tied baseline has no peer
    assert sparse.loc["nano/sparse_embedding", "loss_delta"] == pytest.approx(2.5 * 0.95 - 2.5 * 0.9)
    row = frame[frame["techniques"] == "prune:sparsity=0.9"].iloc[0]
    assert row["knob"] == "sparsity" and row["knob_value"] == 0.9
    assert row["loss_delta"] == pytest.approx(2.5 * 1.2 - 2.5)
    lora = frame[frame["techniques"] == "lora:rank=4"].iloc[0]
    assert lora["optimizer state / baseline"] == pytest.approx(1 / 4)
    assert lora["params / baseline"] == pytest.approx(1.0)
    assert lora["loss_delta"] == pytest.approx(2.5 * 0.9 - 2.5 * 0.8)  # vs fine-tuning, not from scratch
    finetune = frame[(frame["family"] == "lowrank") & (frame["technique"] == "baseline")].iloc[0]
    assert finetune["run"] == "nano/finetune" and finetune["loss_delta"] == 0 and pd.isna(finetune["knob_value"])


def test_report_and_site_show_the_curves_and_table(runs_dir, tmp_path):
    out = tmp_path / "plots"
    written = {p.name for p in report.write_report([runs_dir], out)}
    assert {"compression.csv", "compression_memory.png", "compression_loss_vs_sparsity.png",
            "compression_loss_vs_rank.png"} <= written
    assert "## Compression techniques" in (out / "summary.md").read_text()
    loaded = report.load_all([runs_dir])
    html = site.compression_section(loaded, written, "plots/x")
    assert 'id="compression"' in html and "prune:sparsity=0.5" in html and "lora:rank=16" in html
    assert "compression_loss_vs_rank.png" in html and "bf16" not in html


def test_figures_render(runs_dir, tmp_path):
    loaded = report.load_all([runs_dir])
    frame = rc.compression_frame(loaded.runs)
    for figure in (rc.plot_memory(frame), rc.plot_loss_vs_knob(frame, "pruning"),
                   rc.plot_loss_vs_knob(frame, "lowrank", log_x=True)):
        figure.savefig(tmp_path / "x.png")


def test_sparse_storage_record_is_routed_plotted_and_tabled(tmp_path):
    from impls.measure import sparse_storage as ss

    record = ss.measure("nano", densities=[0.05, 0.5, 1.0], speed_densities=[0.05, 0.5], tokens=16, rounds=3)
    runs = tmp_path / "runs"
    ss.write(record, runs / "sparse" / "sparse-storage.json")
    loaded = report.load_all([runs])
    assert len(loaded.storage) == 1 and loaded.runs.empty and not loaded.interleaved
    out = tmp_path / "plots"
    written = {p.name for p in report.write_report([runs], out)}
    assert "compression_sparse_crossover.png" in written
    summary = (out / "summary.md").read_text()
    assert "### Sparse storage" in summary and "| unstructured | CSR |" in summary
    html = site.compression_section(loaded, written, "plots/x")
    assert "compression_sparse_crossover.png" in html
    broken = json.loads((runs / "sparse" / "sparse-storage.json").read_text())
    del broken["speed"]
    (runs / "sparse" / "sparse-storage.json").write_text(json.dumps(broken))
    with pytest.warns(report.RecordWarning, match="sparse_storage record lacks 'speed'"):
        assert not report.load_all([runs]).storage


def test_data_compression_record_is_routed_plotted_and_tabled(tmp_path):
    from impls.measure import data_throughput

    need = dict(tokens_per_s=1000.0, tokens_per_step=1024, step_seconds=1.024, source="test")
    record = data_throughput.measure(["synthetic:train_tokens=60000,val_tokens=8000,row_len=2000"],
                                     batch_size=4, seq_len=64, need=need, levels=(1,))
    runs = tmp_path / "runs"
    data_throughput.write(record, runs)
    loaded = report.load_all([runs])
    assert [r["kind"] for r in loaded.storage] == ["data_compression"] and not loaded.interleaved
    out = tmp_path / "plots"
    written = {p.name for p in report.write_report([runs], out)}
    assert "compression_data.png" in written
    summary = (out / "summary.md").read_text()
    assert "### Compressed training data" in summary and "| zstd-1 |" in summary and "| NO |" not in summary
    assert "compression_data.png" in site.compression_section(loaded, written, "plots/x")
