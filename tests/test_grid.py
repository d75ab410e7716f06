"""Grids as jobs (issue 25): packing, resources from the recipe, etbench sweep, and isoFLOP sweeps
on submitit's local executor and on Ray equal to the in-process sweep."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from impls import executors, grid, isoflop, predict
from impls.executors.base import Resources
from impls.recipe import Recipe

REPO = Path(__file__).resolve().parents[1]
TINY = dict(data="synthetic", seq_len=16, batch_size=2, eval_batches=1)


def _point(key: str, seconds: float, resources: Resources = Resources()) -> grid.GridPoint:
    return grid.GridPoint(key=key, recipe=Recipe(), nproc=1, record=Path(key), predicted_s=seconds,
                          resources=resources)


def test_short_points_share_jobs_longest_first_and_long_points_get_their_own():
    points = [_point(f"s{i}", s) for i, s in enumerate([9, 8, 7, 6, 5, 4, 3, 2])] + [_point("long", 100)]
    jobs = grid.pack(points, slots=2, min_job_s=30)
    assert [[p.key for p in job] for job in jobs if len(job) == 1 and job[0].key == "long"] == [["long"]]
    short = [job for job in jobs if job[0].key != "long"]
    # 44 s of short points: max(2 slots, ceil(44 / 30)) = 2 jobs, balanced by LPT (9+6+5+2, 8+7+4+3)
    assert sorted(sum(p.predicted_s for p in job) for job in short) == [22, 22]
    assert sorted(p.key for job in short for p in job) == sorted(f"s{i}" for i in range(8))
    # no slots (Slurm): as few jobs as give each 30 s; another resource shape never shares a job
    other = _point("gpu", 5, Resources(gpus=1))
    jobs = grid.pack([*points[:8], other], slots=None, min_job_s=30)
    assert len([j for j in jobs if j[0].key != "gpu"]) == 2 and [j for j in jobs if j[0].key == "gpu"] == [[other]]
    assert grid.pack([_point("a", 1)], slots=4) == [[_point("a", 1)]]  # never more jobs than points


def test_resources_come_from_the_recipe_with_the_stated_margins(monkeypatch):
    seen = {}

    def fake_predict(recipe, nproc, target, rates, **_):
        seen["target"] = target
        return predict.Prediction("x", nproc, seconds=600.0, memory_bytes=2 * 2**30)

    monkeypatch.setattr(predict, "predict", fake_predict)
    seconds, res = grid.plan_point(Recipe(device="cpu"), 2, cpus_per_rank=3)
    assert seconds == 600.0 and res.gpus == 0 and res.cpus == 6
    # 2 ranks x (1.5 + 2 GiB) x 1.5 = 10.5 -> 12 GB; (600 s x 3 + 120 s) = 32 min -> the 45 min step
    assert res.mem_gb == 12 and 2 * (grid.HOST_BASE_GIB + 2) * grid.MEM_MARGIN == 10.5
    assert res.time_min == 45 and (600 * grid.TIME_MARGIN + grid.JOB_START_S) / 60 == 32
    seconds, res = grid.plan_point(Recipe(device="cuda"), 4)
    assert res.gpus == 4 and res.cpus == 4 * grid.GPU_CPUS_PER_RANK and seen["target"].count == 4
    assert res.mem_gb == 12  # 4 x 1.5 GiB x 1.5 = 9 -> 12: GPU memory is not the host's

    def too_big(recipe, nproc, target, rates, **_):
        return predict.Prediction("x", nproc, seconds=1.0, memory_bytes=200e9)

    monkeypatch.setattr(predict, "predict", too_big)
    with pytest.raises(Exception, match="exceeds the 75 GiB"):
        grid.plan_point(Recipe(device="cuda"), 1)
    assert grid.plan_point(Recipe(device="cuda"), 1, force=True)[1].gpus == 1


def _reference(tmp_path: Path, budgets, sizes):
    """The in-process sweep, on one thread (each job runs on one thread below: the same sums)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return isoflop.sweep(tmp_path / "inproc", budgets, ["baseline"], sizes, progress=False, **TINY)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_an_isoflop_sweep_on_the_local_executor_equals_the_in_process_sweep(tmp_path):
    budgets, sizes = [2e8], ["L2-D8", "L2-D16", "L2-D24"]
    reference = _reference(tmp_path, budgets, sizes)
    out = tmp_path / "local"
    executor = executors.make("local", out / ".jobs", jobs=2)
    points = isoflop.sweep(out, budgets, ["baseline"], sizes, progress=False, executor=executor, threads=1, **TINY)
    assert list(points["status"]) == ["ok"] * 3
    assert list(points["final_val_loss"]) == list(reference["final_val_loss"])
    assert list(points["flops_per_step"]) == list(reference["flops_per_step"])
    journal = json.loads((out / "jobs.json").read_text())
    assert journal and all(e["attempts"][-1]["outcome"] == "ok" for e in journal.values())
    # a rerun submits nothing: every point's record is in the store
    again = isoflop.sweep(out, budgets, ["baseline"], sizes, progress=False,
                          executor=executors.make("local", out / ".jobs", jobs=2), threads=1, **TINY)
    assert json.loads((out / "jobs.json").read_text()) == journal
    assert list(again["final_val_loss"]) == list(reference["final_val_loss"])


@pytest.mark.slow
def test_an_isoflop_sweep_on_ray_equals_the_in_process_sweep(tmp_path):
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'etbench[ray]'")
    budgets, sizes = [2e8], ["L2-D8", "L2-D16"]
    reference = _reference(tmp_path, budgets, sizes)
    executor = executors.make("ray", tmp_path / "ray" / ".jobs", jobs=2)
    try:
        points = isoflop.sweep(tmp_path / "ray", budgets, ["baseline"], sizes, progress=False, executor=executor,
                               threads=1, **TINY)
    finally:
        executor.close()
    assert list(points["final_val_loss"]) == list(reference["final_val_loss"])
    assert list(points["flops_per_step"]) == list(reference["flops_per_step"])


def _etbench(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "impls.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO)


def test_etbench_sweep_runs_a_recipe_grid_and_resumes_without_rerunning(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"common": dict(model="nano", steps=2, evaluations=1, **TINY),
                                "grid": {"lr": [1e-3, 3e-3]}}))
    out = tmp_path / "out"
    done = _etbench("sweep", spec, "--out", out)
    assert done.returncode == 0, done.stderr
    table = (out / "points.csv").read_text()
    records = sorted((out / "runs").glob("*.json"))
    assert len(records) == 2 and table.count(",ok,") == 2
    losses = {json.loads(r.read_text())["recipe"]["lr"]: json.loads(r.read_text())["final_val_loss"] for r in records}
    assert set(losses) == {1e-3, 3e-3} and losses[1e-3] != losses[3e-3]
    stamps = [r.stat().st_mtime_ns for r in records]
    again = _etbench("sweep", spec, "--out", out)
    assert again.returncode == 0 and [r.stat().st_mtime_ns for r in records] == stamps  # nothing retrained
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"common": dict(model="nano", steps=2, **TINY), "grid": {"lr": [1e-2]}}))
    refused = _etbench("sweep", other, "--out", out)
    assert refused.returncode == 2 and "holds another sweep" in refused.stderr


@pytest.mark.parametrize("spec, flags, message", [
    ({"grid": {"lr": [1e-3]}, "bogus": 1}, [], "unknown sweep spec key 'bogus'; valid: common, grid, nproc, compare"),
    ({"grid": {"lr": []}}, [], "must be a non-empty list"),
    ({"grid": {"lrr": [1e-3]}}, [], "valid fields:"),
    ({"grid": {"lr": [1e-3]}, "compare": ["x.json"]}, [], "either 'grid'"),
    ({"grid": {"lr": [1e-3]}}, ["--slurm-partition", "gpu"], "--slurm-partition is a Slurm option; give --executor slurm"),
    ({"grid": {"lr": [1e-3]}}, ["--jobs", "2"], "--jobs needs --executor"),
    ({"grid": {"lr": [1e-3]}}, ["--executor", "local", "--jobs", "0"], "--jobs must be >= 1, got 0"),
])
def test_bad_sweep_input_is_one_line_exit_2_and_nothing_written(tmp_path, spec, flags, message):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    out = tmp_path / "out"
    done = _etbench("sweep", path, "--out", out, *flags)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert not out.exists() or not any(out.iterdir())


def test_a_missing_executor_package_is_refused_in_one_line_naming_the_extra(monkeypatch):
    from impls import requires

    real = requires.installed
    monkeypatch.setattr(requires, "installed", lambda module: module != "ray" and real(module))
    with pytest.raises(Exception, match=r"executor 'ray' needs the package ray .*etbench\[ray\]"):
        executors.make("ray", Path("unused"))


def test_isoflop_predict_prints_a_studys_jobs_and_device_hours_and_writes_nothing(tmp_path):
    out = tmp_path / "study"
    done = _etbench("isoflop", "--budgets", "1e16,1e17", "--variants", "baseline,mod", "--data", "synthetic",
                    "--batch-size", "64", "--seq-len", "128", "--device", "cuda", "--out", out, "--predict")
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("20 points (2 budgets x 2 variants, 5 starting sizes each") and "GPU-hours" in first
    hours = float(first.split(": ")[-1].split()[0])
    assert hours > 0 and "1 GPU, 8 CPU" in done.stdout
    assert not out.exists()


@pytest.mark.slow
def test_a_job_killed_mid_way_is_retried_and_the_sweep_completes_with_the_same_losses(tmp_path):
    """SIGKILL a job's process while it trains (the started marker names its pid): the driver sees
    it killed, resubmits it, the retry trains only the points whose records are missing, and the
    sweep's losses equal the in-process sweep's."""
    import os
    import signal
    import threading
    import time

    budgets, sizes = [2e8], ["L2-D8", "L2-D16", "L2-D24"]
    reference = _reference(tmp_path, budgets, sizes)
    out = tmp_path / "killed"
    executor = executors.make("local", out / ".jobs", jobs=1)
    result = {}

    def sweep_in_thread():
        result["points"] = isoflop.sweep(out, budgets, ["baseline"], sizes, progress=False, executor=executor,
                                         threads=1, **TINY)

    thread = threading.Thread(target=sweep_in_thread)
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list((out / ".jobs").rglob("*.started")):
        time.sleep(0.05)
    marker = next((out / ".jobs").rglob("*.started"))
    time.sleep(0.5)  # into its imports or its first point
    os.kill(json.loads(marker.read_text())["pid"], signal.SIGKILL)
    thread.join(timeout=120)
    assert not thread.is_alive()
    points = result["points"]
    assert list(points["status"]) == ["ok"] * 3
    assert list(points["final_val_loss"]) == list(reference["final_val_loss"])
    attempts = [a["outcome"] for e in json.loads((out / "jobs.json").read_text()).values() for a in e["attempts"]]
    assert attempts == ["killed", "ok"], attempts


@pytest.mark.slow
def test_etbench_sweep_runs_a_list_of_comparisons_one_job_each_on_the_local_executor(tmp_path):
    """A comparison interleaves its variants in one process, so it is one job, never split; the
    table holds each variant's speed-up over its spec's baseline."""
    common = dict(model="nano", data="synthetic", seq_len=16, batch_size=2)
    for name, technique in (("ckpt", "checkpoint:every=1"), ("accum", "grad_accum:steps=2")):
        (tmp_path / f"{name}.json").write_text(json.dumps(dict(
            baseline="base", rounds=2, steps=1, warmup=1, common=common,
            variants={"base": {}, name: {"techniques": [technique]}})))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"compare": ["ckpt.json", "accum.json"]}))
    out = tmp_path / "out"
    done = _etbench("sweep", spec, "--out", out, "--executor", "local", "--jobs", "2")
    assert done.returncode == 0, done.stderr
    import csv

    rows = list(csv.DictReader((out / "points.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    speedups = [json.loads(r["speedups"]) for r in rows]
    assert set(speedups[0]) == {"base", "ckpt"} and set(speedups[1]) == {"base", "accum"}
    assert speedups[0]["base"] == 1.0 and speedups[0]["ckpt"] > 0
    records = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    assert all(r["kind"] == "interleaved" and r["rounds"] == 2 for r in records)
    journal = json.loads((out / "jobs.json").read_text())
    assert len(journal) == 2 and all(e["attempts"][-1]["outcome"] == "ok" for e in journal.values())


def test_a_sweep_recipe_the_planner_refuses_is_one_line_before_anything_is_written(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"common": dict(model="nano", steps=2, **TINY), "grid": {"seq_len": [16, 4096]}}))
    out = tmp_path / "out"
    done = _etbench("sweep", spec, "--out", out)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "seq_len 4096" in done.stderr, done.stderr
    assert not out.exists() or not any(out.iterdir())


def test_a_refused_point_does_not_stop_the_other_points_of_its_job(tmp_path):
    good = grid.GridPoint(key="good", recipe=Recipe(model="nano", steps=2, evaluations=1, **TINY), nproc=1,
                          record=tmp_path / "good.json")
    bad = grid.GridPoint(key="bad", recipe=Recipe(model="nano", steps=2, **{**TINY, "seq_len": 4096}), nproc=1,
                         record=tmp_path / "bad.json")
    value = grid.run_points(dict(points=[bad.payload(), good.payload()], threads=1))
    assert value["done"] == ["good"] and list(value["refused"]) == ["bad"] and "seq_len 4096" in value["refused"]["bad"]
    assert good.record.exists() and not bad.record.exists()
