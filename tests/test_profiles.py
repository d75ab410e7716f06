"""Every profile's recipes, validated before any device time is spent (issue 22).

``python -m benchmarks.dry_run`` runs each asv class's ``setup_cache`` with the benchmarks'
dry-run hook set: the benchmarks' own code builds every recipe, and each is validated on ``meta``
for the target device (block_size, techniques, mesh vs world size), its peak memory per rank and
its time predicted (:mod:`impls.predict`).  One process per profile (the profile is chosen at
import).  Also here: the CUDA-path findings that a CPU can check (the forkserver preload never
touches CUDA, more ranks than GPUs is one line, NCCL's watchdog abort is named).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from impls import dist, ranks
from impls.errors import ConfigError
from impls.predict import DEFAULT_RATES, predict
from impls.recipe import Recipe

REPO = Path(__file__).resolve().parents[1]
H100 = dist.Target(type="cuda", count=1, capability=(9, 0), name="NVIDIA H100 80GB HBM3", memory_bytes=80 * 2 ** 30)


def _dry_run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    out = tmp_path / "plan.json"
    env = {**os.environ, "ETBENCH_RUNS_DIR": str(tmp_path / "runs"), "ETBENCH_CACHE": str(tmp_path / "cache")}
    env.pop("ETBENCH_PROFILE", None)
    with tempfile.TemporaryFile() as sink:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.dry_run", *args, "--json", str(out)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=sink, text=True,
                              timeout=900)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.parametrize("profile,args", [("quick", []), ("full", []), ("gpu", []), ("gpu", ["--gpus", "8"])],
                         ids=["quick", "full", "gpu-1xH100", "gpu-8xH100"])
def test_every_recipe_of_every_profile_is_valid_fits_and_finishes(tmp_path, profile, args):
    proc, report = _dry_run(tmp_path, "--profile", profile, *args)
    assert report is not None, proc.stderr
    assert report["invalid"] == [], report["invalid"][:5]
    assert report["over_memory"] == []
    assert report["over_timeout"] == []
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # every asv class of every benchmark module was planned, and nothing was trained or written
    import ast

    classes = set()
    for path in (REPO / "benchmarks").glob("bench_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                methods = {n.name for n in node.body if isinstance(n, ast.FunctionDef)} | {
                    t.id for n in node.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
                if any(m.startswith(("time_", "track_", "peakmem_")) or m == "setup_cache" for m in methods):
                    classes.add(f"{path.stem.removeprefix('bench_')}.{node.name}")
    # classes defined under a profile condition (datacomp's trainings: not in quick) may be absent
    planned = {c["name"] for c in report["classes"]}
    assert planned <= classes and len(classes - planned) <= (2 if profile == "quick" else 0), classes - planned
    assert not (tmp_path / "runs").exists()
    runs = [r for c in report["classes"] for r in c["runs"]]
    assert runs and all(r["seconds"] > 0 for r in runs)
    if profile == "gpu" and not args:
        assert report["total_seconds"] <= 60 * 60, report["total_seconds"] / 60  # the 1×H100 budget
        # bf16 by default on CUDA: every training run of a non-fp32 family computes in bf16 or narrower
        fp32 = {r["label"] for c in report["classes"] for r in c["runs"] if r.get("dtype") == "float32"
                and c["family"] not in ("quant", "techniques", "actmem", "mod")}
        assert not fp32, sorted(fp32)[:5]
        # multi-GPU classes plan nothing on one GPU (they skip with the reason)
        assert {c["name"]: len(c["runs"]) for c in report["classes"]}["model_parallel.ModelParallel"] == 0
    if profile == "gpu" and args:
        assert {c["name"]: len(c["runs"]) for c in report["classes"]}["model_parallel.ModelParallel"] > 0


def test_dry_run_finds_invalid_oversized_and_slow_recipes():
    rates = DEFAULT_RATES["cuda"]
    base = dict(data="synthetic", device="cuda", lr=1e-3)
    # block_size: the full profile's old bug (small holds 256 positions)
    p = predict(Recipe(model="small", seq_len=1024, batch_size=16, flops_budget=1e15, **base), 1, H100, rates)
    assert p.error and "block_size" in p.error
    # memory: LargeBatch's old recipe, gpt2 at one micro-batch of 256 × 1024 tokens in fp32
    p = predict(Recipe(model="gpt2", seq_len=1024, batch_size=256, flops_budget=1e16, **base), 1, H100, rates)
    assert p.error is None and p.memory_bytes > H100.memory_bytes
    # time: the same budget takes ~8.75x longer at the stated fp32 rate than at bf16
    fp32 = predict(Recipe(model="gpt2", seq_len=1024, batch_size=16, flops_budget=1e16, **base), 1, H100, rates)
    bf16 = predict(Recipe(model="gpt2", seq_len=1024, batch_size=16, flops_budget=1e16, techniques=["bf16"], **base),
                   1, H100, rates)
    assert fp32.dtype == "float32" and bf16.dtype == "bfloat16" and fp32.steps == bf16.steps
    assert fp32.seconds > 5 * bf16.seconds
    # the mesh against the world size, and a GPU-only technique on the target (fp8 on Hopper: valid)
    p = predict(Recipe(model="gpt2", seq_len=256, batch_size=4, steps=2, techniques=["tp"], mesh={"tp": 2}, **base),
                3, dist.Target(count=4), rates)
    assert p.error
    ok = predict(Recipe(model="gpt2", seq_len=256, batch_size=4, steps=2, techniques=["fp8"], **base), 1, H100, rates)
    assert ok.error is None and ok.dtype == "float8"
    ampere = dist.Target(capability=(8, 0), name="NVIDIA A100-SXM4-80GB")
    p = predict(Recipe(model="gpt2", seq_len=256, batch_size=4, steps=2, techniques=["fp8"], **base), 1, ampere, rates)
    assert p.error and "8.9" in p.error and "A100" in p.error


@pytest.mark.parametrize("args,needle", [
    (["--profile", "bogus"], "'bogus'"),
    (["--profile", "gpu", "--memory", "lots"], "'lots'"),
    (["--profile", "gpu", "--flops", "bfloat16=-3"], "bfloat16"),
    (["--profile", "gpu", "--flops", "tf99=1e12"], "'tf99'"),
    (["--profile", "gpu", "--gpus", "0"], "--gpus 0"),
    (["--profile", "gpu", "--capability", "nine"], "'nine'"),
    (["--profile", "gpu", "--only", "("], "'('"),
])
def test_dry_run_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    proc, report = _dry_run(tmp_path, *args)
    assert proc.returncode == 2 and report is None
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_dry_run_json_to_a_fifo_is_refused(tmp_path):
    fifo = tmp_path / "plan.fifo"
    os.mkfifo(fifo)
    env = {**os.environ, "ETBENCH_RUNS_DIR": str(tmp_path / "runs")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.dry_run", "--profile", "quick", "--json", str(fifo)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "FIFO" in proc.stderr and fifo.is_fifo()


# --------------------------------------------------------------------------- CUDA paths on a CPU

def test_forkserver_preload_never_initialises_cuda(tmp_path):
    """Finding 7: asv forks every benchmark from a server that imported the suites; a process that
    initialised CUDA cannot fork safely.  With every CUDA entry point that initialises the driver
    made to fail, importing every suite of the GPU profile and asking which world sizes run works."""
    code = """
import sys, torch
def boom(*a, **k):
    raise SystemExit("CUDA was initialised: " + repr(a))
torch.cuda.is_available = boom
torch.cuda.init = boom
torch.cuda._lazy_init = boom
torch._C._cuda_getDeviceCount = boom
torch.cuda.device_count = lambda: 1   # NVML's count: does not initialise CUDA
import importlib, pathlib
from benchmarks import common
assert common.profile_name() == "gpu"
for p in sorted(pathlib.Path("benchmarks").glob("bench_*.py")):
    importlib.import_module("benchmarks." + p.stem)
print(common.usable_world_sizes(), common.unsupported_world_size(8))
assert not torch.cuda.is_initialized()
"""
    env = {**os.environ, "ETBENCH_PROFILE": "gpu", "ETBENCH_RUNS_DIR": str(tmp_path / "runs")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("[1] world size 8 needs 8 GPUs") and "this machine has 1" in proc.stdout


def test_more_ranks_than_gpus_is_refused_before_any_work(monkeypatch):
    """Finding 4: --nproc above the GPUs is one line (the launcher), and a rank started by hand
    beyond the GPUs gets one line instead of 'invalid device ordinal'."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"--nproc 2 is more ranks than the 1 CUDA device"):
        ranks.check_fit(2, {"cuda"}, oversubscribe=False)
    with dist.planning_for(dist.Target(count=1)):
        assert dist.resolve_device("cuda", 0) == torch.device("cuda", 0)
        with pytest.raises(ConfigError, match=r"local rank 1 has no GPU: this machine has 1 CUDA device"):
            dist.resolve_device("auto", 1)


def test_nccl_timeouts_are_reported_not_aborted(monkeypatch):
    """Finding 9: blocking wait and communicator-only abort by default (the rank reports the
    collective it waited in), a user's setting kept; a rank the watchdog aborted anyway is named."""
    env = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}
    assert dist.nccl_environment(env) == {"TORCH_NCCL_BLOCKING_WAIT": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}
    assert dist.nccl_environment({})["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"
    monkeypatch.setenv("ETBENCH_DIST_TIMEOUT", "8")
    aborted = SimpleNamespace(exitcode=-signal.SIGABRT, timestamp=1.0, signal_name=lambda: "SIGABRT")
    stopped = SimpleNamespace(exitcode=-signal.SIGTERM, timestamp=2.0, signal_name=lambda: "SIGTERM")
    status, line = ranks.summarise_failure({0: aborted, 1: stopped}, [])
    assert status == 1 and line.startswith("rank 0 was aborted (SIGABRT): NCCL's watchdog") and "8 s" in line
    assert "\n" not in line
