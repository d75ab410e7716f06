"""``etbench plan-calibrate`` (:mod:`impls.calibration`): Spearman's rank correlation, the grid,
predictions on measured speeds against stand-in measurements, a tiny real calibration, and bad
input refused before any work."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from impls import calibration, planner
from impls.calibration import Settings, spearman
from impls.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_spearman_exact_with_ties():
    assert spearman([1, 2, 3, 4, 5], [2, 4, 6, 8, 10]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4, 5], [10, 8, 6, 4, 2]) == pytest.approx(-1.0)
    # y ranks (ties averaged): 5 -> 1, 6 -> 2, 7 and 7 -> 3.5, 8 -> 5; rho = 8 / sqrt(10 * 9.5)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95), abs=1e-12)
    # ties on both sides: x ranks 1.5 1.5 3 4, y ranks 1 2.5 2.5 4 -> sxy 3.75, sxx 4.5, syy 4.5
    assert spearman([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(3.75 / 4.5, abs=1e-12)
    assert spearman([3.0], [1.0]) is None and spearman([1, 1, 1], [1, 2, 3]) is None
    with pytest.raises(ValueError):
        spearman([1, 2], [1])


@pytest.mark.parametrize("name,n,expected", [
    ("single", 1, (1, 1, 1, 0, "none", 1, 8, 1, False)),
    ("ckpt", 1, (1, 1, 1, 0, "none", 1, 8, 1, True)),
    ("ddp", 2, (2, 1, 1, 0, "none", 1, 4, 1, False)),
    ("zero2", 4, (4, 1, 1, 2, "none", 1, 2, 1, False)),
    ("fsdp", 4, (4, 1, 1, 3, "none", 1, 2, 1, False)),
    ("tp-sp", 2, (1, 2, 1, 0, "none", 1, 8, 1, False, True)),
    ("pp-interleaved", 2, (1, 1, 2, 0, "interleaved", 2, 2, 4, False)),
    ("dp-tp", 4, (2, 2, 1, 0, "none", 1, 4, 1, False)),
    ("dp-pp", 4, (2, 1, 2, 0, "1f1b", 1, 1, 4, False)),
])
def test_grid_layouts_keep_the_global_batch(name, n, expected):
    layout, _ = calibration.grid_layout(name, n, 8, 4)
    assert layout == planner.Layout(*expected)
    assert layout.dp * layout.micro_batch_size * layout.micro_batches == 8


def test_grid_skips_with_reasons():
    assert "world size 1 only" in calibration.grid_layout("single", 2, 8, 4)
    assert "world size >= 2" in calibration.grid_layout("tp", 1, 8, 4)
    assert ">= 4" in calibration.grid_layout("dp-tp", 2, 8, 4)
    points, skipped = calibration.plan_grid(["single", "pp-interleaved", "tp"], [1, 2],
                                            Settings(model="nano", model_args=(), seq_len=16, global_batch=4))
    assert [(p.name, p.world_size) for p in points] == [("single", 1), ("tp", 2)]
    why = {(s["layout"], s["world_size"]): s["reason"] for s in skipped}
    assert "layers 2 % (p*v)=4" in why[("pp-interleaved", 2)]  # nano has 2 layers: no 2 x 2 chunks
    assert set(why) == {("pp-interleaved", 1), ("pp-interleaved", 2), ("tp", 1), ("single", 2)}


def test_calibrate_with_stand_ins():
    """Predictions use the per-rank peak and the bus bandwidth at each layout's own message size;
    the MFU is fitted on 'single' (its ratio 1); ratios, log errors and Spearman follow from the
    numbers; a failed measurement is a row without a measured time, left out of the statistics."""
    settings = Settings(model="nano", model_args=(), seq_len=16, global_batch=4, micro_batches=2)
    peaks = {1: 4e9, 2: 2e9}
    tokens = settings.global_batch * settings.seq_len

    def peak_of(n, s, cores):
        return dict(value=peaks[n], source="stand-in")

    def links_of(n, sizes, s, folder):
        return {size: 1e6 * (i + 1) for i, size in enumerate(sizes)}  # each size its own bandwidth

    seconds = {"single": 0.5, "ddp": 0.2, "tp": 0.9, "pp-1f1b": 0.3}

    def measure(points, s, folder):
        out = {p.name: dict(seconds=seconds[p.name], ci=[0.1, 1.0], n=3, samples=[seconds[p.name]] * 3,
                            tokens_per_step=tokens, method="stand-in") for p in points if p.name in seconds}
        out.update({p.name: dict(error="it broke") for p in points if p.name not in seconds})
        return out

    record = calibration.calibrate(["single", "ddp", "tp", "pp-1f1b", "fsdp"], [1, 2], settings, measure=measure,
                                   links_of=links_of, peak_of=peak_of)
    rows = {r["name"]: r for r in record["rows"]}
    assert rows["single"]["fit"] and rows["single"]["ratio"] == pytest.approx(1.0)
    assert record["hardware"]["mfu_source"].startswith("fitted at world size 1")
    for name, row in rows.items():
        assert row["predicted_seconds"] > 0
        if name == "fsdp":
            assert row["measured_seconds"] is None and row["error"] == "it broke"
            continue
        assert row["ratio"] == pytest.approx(seconds[name] / row["predicted_seconds"])
        assert row["log_ratio"] == pytest.approx(math.log(row["ratio"]))
    sizes = sorted({b for r in record["rows"] for b in r["message_bytes"].values()})
    bandwidth = {size: 1e6 * (i + 1) for i, size in enumerate(sizes)}  # what links_of gave for ws2
    assert rows["ddp"]["link_bytes_per_s"] == bandwidth[rows["ddp"]["message_bytes"]["dp"]]
    assert rows["tp"]["tp_link_bytes_per_s"] == bandwidth[rows["tp"]["message_bytes"]["tp"]]
    assert rows["pp-1f1b"]["link_bytes_per_s"] == bandwidth[rows["pp-1f1b"]["message_bytes"]["pp"]]
    # the prediction is the planner's on those speeds
    hw = planner.Hardware(2, float(1 << 50), peaks[2], rows["tp"]["tp_link_bytes_per_s"] * 8 / 1e9,
                          rows["tp"]["tp_link_bytes_per_s"] * 8 / 1e9, record["hardware"]["mfu"])
    pred = planner.predict(planner.model_counts("nano"), planner.Layout(**rows["tp"]["planner_layout"]), hw, 16, 4,
                           planner.PRECISIONS["fp32"], attention="flash")
    assert rows["tp"]["predicted_seconds"] == pytest.approx(pred.step_time)
    done = [rows[n] for n in seconds]
    assert record["spearman"] == pytest.approx(spearman([r["predicted_seconds"] for r in done], list(seconds.values())))
    errors = sorted(abs(r["log_ratio"]) for r in done if not r["fit"])
    assert record["median_abs_error"] == pytest.approx(errors[1]) and record["max_abs_error"] == pytest.approx(errors[-1])
    assert record["spearman_n"] == 4 and record["error_n"] == 3
    text = calibration.table(record)
    assert "failed: it broke" in text and "Spearman rho" in text


def test_a_run_training_other_tokens_is_an_error_row():
    settings = Settings(model="nano", model_args=(), seq_len=16, global_batch=4)

    def measure(points, s, folder):
        return {p.name: dict(seconds=0.1, ci=[0.1, 0.1], n=2, samples=[0.1, 0.1], tokens_per_step=1, method="x")
                for p in points}

    record = calibration.calibrate(["single"], [1], settings, measure=measure, links_of=None,
                                   peak_of=lambda n, s, c: dict(value=1e9, source="x"))
    (row,) = record["rows"]
    assert row["measured_seconds"] is None and "the mapping is wrong" in row["error"]
    assert record["spearman"] is None and record["median_abs_error"] is None


def _calibrate(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "impls.cli", "plan-calibrate", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)


def test_tiny_real_calibration(tmp_path):
    """Two layouts at world size 1, two timed rounds of one step: the record's structure, positive
    times, ratios = measured / predicted (timings are not asserted)."""
    out = tmp_path / "calibration.json"
    proc = _calibrate("--model", "nano", "--model-args", "", "--layouts", "single,ckpt", "--world-sizes", "1",
                      "--rounds", "2", "--steps", "1", "--warmup", "1", "--seq-len", "16", "--global-batch", "2",
                      "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    record = json.loads(out.read_text())
    assert record["kind"] == "plan-calibration" and record["schema"] >= 1 and record["git_commit"]
    assert set(record["machine"]) >= {"cpu", "cores", "load_before", "load_after"}
    assert set(record["hardware"]) >= {"peak_flops", "peak_source", "link_bytes_per_s", "mfu"}
    assert record["hardware"]["peak_flops"]["1"] > 0 and 0 < record["hardware"]["mfu"]
    assert [r["name"] for r in record["rows"]] == ["single", "ckpt"]
    for row in record["rows"]:
        assert row["world_size"] == 1 and row["model"] == "nano" and isinstance(row["layout"], str)
        assert row["predicted_seconds"] > 0 and row["measured_seconds"] > 0 and row["n"] == 2
        assert row["ratio"] == pytest.approx(row["measured_seconds"] / row["predicted_seconds"])
        lo, hi = row["measured_ci"]
        assert lo <= row["measured_seconds"] <= hi
        assert set(row["predicted_components"]) >= {"compute", "tp_comm", "pp_p2p", "bubble", "dp_comm_exposed"}
    assert record["rows"][0]["fit"] and record["rows"][0]["ratio"] == pytest.approx(1.0)
    assert record["spearman"] in (1.0, -1.0, None) and isinstance(record["notes"], str)
    assert "Spearman rho" in proc.stdout and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("flag,value,named", [
    ("--layouts", "ddp,warp", "--layouts 'warp'"),
    ("--world-sizes", "1,0", "--world-sizes '0'"),
    ("--world-sizes", "1,x", "--world-sizes 'x'"),
    ("--rounds", "1", "--rounds '1'"),
    ("--mfu", "2", "--mfu '2'"),
    ("--precision", "fp64", "--precision 'fp64'"),
    ("--harness", "asv", "--harness 'asv'"),
    ("--threads", "0", "--threads '0'"),
    ("--model", "gpt5", "unknown model 'gpt5'"),
    ("--model-args", "n_layer", "bad option 'n_layer'"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, flag, value, named):
    out = tmp_path / "sub" / "calibration.json"
    status = calibration.main([flag, value, "--out", str(out)])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and named in lines[0], lines
    assert "valid" in lines[0] or "expected KEY=VALUE" in lines[0], lines
    assert captured.out == "" and not (tmp_path / "sub").exists()


def test_bad_input_through_etbench(tmp_path):
    out = tmp_path / "calibration.json"
    proc = _calibrate("--world-sizes", "2,-4", "--out", str(out))
    assert proc.returncode == 2 and proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1
    assert "--world-sizes '-4'" in proc.stderr and not out.exists()


def test_unwritable_out_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    status = calibration.main(["--model", "nano", "--model-args", "", "--layouts", "single", "--world-sizes", "1",
                               "--out", str(blocker / "calibration.json")])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert blocker.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
