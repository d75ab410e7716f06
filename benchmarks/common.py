"""Shared settings of the asv suites: the profile switch and the one way to produce a run record.

``ETBENCH_PROFILE=quick`` (the default, what ``make bench`` runs on a laptop CPU) keeps every
suite to small models, short budgets and few repeats; ``full`` is for GPU boxes.  Every training
run goes through ``etbench run`` in a child process (under ``torchrun`` for several ranks), so a
benchmark measures exactly what a user's command measures, and its JSON record is kept under
``results/runs/<commit>/`` for the plots.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROFILES = {
    "quick": dict(
        models=["nano", "micro", "small"],
        world_sizes=[1, 2],
        # Counted FLOPs per run (all ranks): the same budget for every size is an isoFLOP slice.
        flops_budget=5e11,
        batch_size=8,
        seq_len=128,
        lr={"nano": 3e-3, "micro": 2e-3, "small": 1e-3},
        device="cpu",
        data="synthetic",
        # asv timing of time_/peakmem_: one call per sample, a few samples.
        timing=dict(number=1, repeat=(1, 5, 10.0), rounds=1, warmup_time=0.5),
    ),
    "full": dict(
        models=["small", "gpt2", "gpt2-medium"],
        world_sizes=[1, 2, 4, 8],
        flops_budget=1e16,
        batch_size=16,
        seq_len=1024,
        lr={"small": 1e-3, "gpt2": 6e-4, "gpt2-medium": 3e-4},
        device="auto",
        data="pycode",
        timing=dict(number=1, repeat=(2, 10, 30.0), rounds=2, warmup_time=2.0),
    ),
}


def profile_name() -> str:
    name = os.environ.get("ETBENCH_PROFILE", "quick")
    if name not in PROFILES:
        raise ValueError(f"unknown ETBENCH_PROFILE {name!r}; valid: {', '.join(PROFILES)}")
    return name


PROFILE = PROFILES[profile_name()]


def unsupported_world_size(world_size: int) -> str | None:
    """Why this machine cannot run ``world_size`` ranks of the profile (None if it can).  The
    grids list the profile's world sizes on every machine (fixed grids, as numpy's and pandas'
    suites keep them); a class's ``setup`` raises ``NotImplementedError`` with this reason, asv's
    way of skipping a combination."""
    if world_size in usable_world_sizes():
        return None
    return f"world size {world_size} needs {world_size} devices (one rank per GPU or CPU core); this machine has fewer"


def usable_world_sizes() -> list[int]:
    """The profile's rank counts that this machine can run: one rank per GPU, or per CPU core."""
    import torch

    if PROFILE["device"] != "cpu" and torch.cuda.is_available():
        limit = torch.cuda.device_count()
    else:
        limit = os.cpu_count() or 1
    return [w for w in PROFILE["world_sizes"] if w <= limit]


@functools.cache  # one folder per benchmark run, even if HEAD moves while it runs
def runs_dir() -> Path:
    """Where this benchmark run keeps its records: ``ETBENCH_RUNS_DIR``, else results/runs/<commit>."""
    if os.environ.get("ETBENCH_RUNS_DIR"):
        return Path(os.environ["ETBENCH_RUNS_DIR"])
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unversioned"
    return REPO / "results" / "runs" / commit


def train_record(name: str, *, nproc: int = 1, **recipe) -> dict:
    """Run ``etbench run`` with ``recipe`` (Recipe field names) on ``nproc`` ranks; return its record.

    The record is kept as ``<runs dir>/<family>/<name>.json``, the family being the name's first
    dash-separated word, so the report plots each benchmark family on its own.
    """
    from impls.recipe import Recipe, to_argv  # imported on use, as the suites import impls

    out = runs_dir() / name.split("-")[0] / f"{name}.json"
    args = [sys.executable, "-m", "impls.cli", "run", "--nproc", str(nproc), "--out", str(out),
            *to_argv(Recipe(**recipe))]
    # asv strips PYTHONPATH from benchmark processes: hand the child our import path explicitly.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"etbench run {name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def apply_timing(cls):
    """Class decorator: the profile's asv timing attributes (number, repeat, rounds, warmup)."""
    for key, value in PROFILE["timing"].items():
        setattr(cls, key, value)
    return cls


def tracked_field(*path: str, unit: str):
    """An asv ``track_`` method returning ``record[path...]`` of the parametrised run, for classes
    whose ``setup_cache`` returns records keyed by the tuple of parameter values."""
    def track_field(self, records, *params):
        value = records[params]
        for key in path:
            value = value[key]
        return value

    track_field.unit = unit
    return track_field


def seconds_per_mtok(self, records, *params):
    """Throughput as asv can track it: lower is better, so seconds per million tokens."""
    return 1e6 / records[params]["tokens_per_second"]


seconds_per_mtok.unit = "s/Mtok"
