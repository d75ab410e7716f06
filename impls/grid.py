"""Grids of training runs as jobs (issue 25): what a point's job runs, what it asks its scheduler
for, how points share jobs, and the command-line flags that pick the executor.

A sweep (:mod:`impls.isoflop`, :mod:`impls.sweep`) turns its unfinished points into
:class:`GridPoint` s and calls :func:`run` with an executor (:mod:`impls.executors`: submitit's
local executor, Slurm, Ray).  Each job trains its points with :func:`run_points` -- the same
:func:`impls.train.run` as in-process, so a point's record is the one an in-process sweep writes
(same losses and counted FLOPs; timings differ) -- and writes every record itself, atomically,
where the sweep reads it: the store is the single source of truth, a point whose record exists is
never trained again, and a killed driver resumes by running the same command.

Resources come from the recipe (:func:`plan_point`): GPUs = the point's world size (its ranks
start inside the job, under torch's elastic agent as ``etbench run --nproc`` starts them), memory
from the planner's prediction (:func:`impls.predict.predict`, a lower bound) and the time limit
from its predicted time, each with a stated margin (:data:`MARGINS`).

One job per point, except points too short to pay for a job: a job starts a Python that imports
torch and the harness (~4 s on this suite's 2-core CPU, plus a cluster's queueing), so points
predicted under :data:`MIN_JOB_S` are packed, longest first, into as few jobs as keep every slot
busy (:func:`pack`).  ``make bench``'s quick isoFLOP sweep (~30 points of 1-3 s) runs as a few
jobs; a cluster study's points (minutes to hours) each get their own.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from . import executors, predict, train
from .errors import ConfigError
from .executors.base import Resources, Task
from .recipe import Recipe, to_argv

#: Margins over the planner's predictions, stated in every sweep's first line: the predicted peak
#: memory is a lower bound (allocator slack, the interpreter: ~0.9 GB a process, measured in
#: issue 24), and the time model's worst calibration ratio on this CPU was ×2.55 (issue 24).
HOST_BASE_GIB = 1.5  # per rank: Python, torch and the harness, before the model
MEM_MARGIN = 1.5
TIME_MARGIN = 3.0
JOB_START_S = 120.0  # added to every time limit: start-up, imports, a node's first CUDA context
MARGINS = dict(host_base_gib=HOST_BASE_GIB, mem=MEM_MARGIN, time=TIME_MARGIN, job_start_s=JOB_START_S)

#: Host cores per GPU rank: its data loading, the launcher and torch's host-side work.
GPU_CPUS_PER_RANK = 8

#: A point predicted shorter than this shares its job with others (see the module docstring).
MIN_JOB_S = 30.0


@dataclass(frozen=True)
class GridPoint:
    """One run of a grid: ``recipe`` on ``nproc`` ranks, its record written to ``record``."""
    key: str  # filesystem-safe, unique in the grid
    recipe: Recipe
    nproc: int
    record: Path
    predicted_s: float = 0.0
    resources: Resources = dataclasses.field(default_factory=Resources)
    compare_spec: str | None = None  # an interleaved comparison (its spec file) instead of ``recipe``

    def payload(self) -> dict:
        return dict(key=self.key, recipe=dataclasses.asdict(self.recipe), nproc=self.nproc, record=str(self.record),
                    compare_spec=self.compare_spec)


def run_points(payload: dict) -> dict:
    """The job: train each point of ``payload["points"]`` whose record is not there yet and write
    its record; return ``{"done": [keys], "refused": {key: line}}`` -- a point its recipe refuses
    (a ConfigError: the same input fails the same way, so it is not retried) does not stop the
    job's other points.

    ``threads``: torch's intra-op threads (the job's share of its node; a Ray worker would otherwise
    get ``OMP_NUM_THREADS`` = its CPUs, and a different thread count changes a run's floating-point
    sums).  ``force``: train points predicted over the device's memory (``--force``)."""
    import torch

    if payload.get("threads"):
        torch.set_num_threads(int(payload["threads"]))
    if payload.get("force"):
        os.environ[train.FORCE_ENV] = "1"
    done, refused = [], {}
    for point in payload["points"]:
        out = Path(point["record"])
        if not out.exists():  # a finished point is never rerun (an earlier attempt wrote it)
            try:
                if point.get("compare_spec"):
                    record = _compared(point["compare_spec"], point["nproc"])
                else:
                    recipe = Recipe(**point["recipe"])
                    record = train.run(recipe) if point["nproc"] == 1 else _launched(recipe, point["nproc"])
            except ConfigError as e:
                refused[point["key"]] = str(e)
                continue
            train.write_record(record, out)
        done.append(point["key"])
    return {"done": done, "refused": refused}


def _launched(recipe: Recipe, nproc: int) -> dict:
    """A multi-rank point: ``etbench run --nproc`` inside the job (one rank per GPU of the job)."""
    return _command(["run", "--nproc", str(nproc), "--allow-divergence", *to_argv(recipe)], f"etbench run --nproc {nproc}")


def _compared(spec: str, nproc: int) -> dict:
    """An interleaved comparison: in the job's process on one rank, else ``etbench compare --nproc``."""
    if nproc == 1:
        from . import compare

        return compare.measure(compare.load_spec(spec))
    return _command(["compare", spec, "--nproc", str(nproc)], f"etbench compare --nproc {nproc}")


def _command(args: list[str], what: str) -> dict:
    """``python -m impls.cli ARGS --out TMP``'s record; its one-line refusal as a ConfigError."""
    with tempfile.TemporaryDirectory(prefix="etbench-point-") as tmp:
        out = Path(tmp) / "record.json"
        done = subprocess.run([sys.executable, "-m", "impls.cli", *args, "--out", str(out)], capture_output=True,
                              text=True)
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
        if done.returncode == 2:
            raise ConfigError(last or "bad input")
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"{what} failed (status {done.returncode}): {last}")
        return json.loads(out.read_text())


def plan_point(recipe: Recipe, nproc: int, *, cpus_per_rank: int | None = None,
               force: bool = False) -> tuple[float, Resources]:
    """The point's predicted seconds and the resources its job asks for (module docstring;
    ``cpus_per_rank`` default: 1 on a CPU, :data:`GPU_CPUS_PER_RANK` beside a GPU).  A recipe the
    planner refuses is refused here, before any job is submitted."""
    from . import dist

    device = recipe.device if recipe.device != "auto" else ("cuda" if dist.cuda_available() else "cpu")
    if device == "cuda":
        target = dist.Target(type="cuda", count=nproc)
    else:
        import psutil

        target = dist.Target(type="cpu", count=nproc, name="CPU", memory_bytes=float(psutil.virtual_memory().total))
    p = predict.predict(recipe, nproc, target, predict.DEFAULT_RATES[device])
    if p.error:
        raise ConfigError(p.error)
    if device == "cuda" and not force and not predict.fits(p, target.memory_bytes):
        raise ConfigError(f"{recipe.label}: predicted peak {p.memory_bytes / 2**30:.1f} GiB per rank exceeds the "
                          f"{target.memory_bytes / 2**30:.0f} GiB of a {target.name}; shard it, or --force")
    cpus_per_rank = cpus_per_rank or (GPU_CPUS_PER_RANK if device == "cuda" else 1)
    host_gib = HOST_BASE_GIB + (p.memory_bytes / 2**30 if device == "cpu" else 0.0)
    resources = Resources(gpus=nproc if device == "cuda" else 0, cpus=max(1, cpus_per_rank * nproc),
                          mem_gb=_rounded_gb(nproc * host_gib * MEM_MARGIN), time_min=_time_limit(p.seconds))
    return p.seconds, resources


#: Time limits are rounded up to these minutes (then whole days), memory to a multiple of 4 GB, so
#: that points of similar cost ask for the same resources and go to Slurm as one array.
TIME_STEPS_MIN = (5, 10, 15, 30, 45, 60, 90, 120, 180, 240, 360, 480, 720, 1440)


def _time_limit(seconds: float) -> int:
    minutes = math.ceil((seconds * TIME_MARGIN + JOB_START_S) / 60)
    return next((m for m in TIME_STEPS_MIN if m >= minutes), 1440 * math.ceil(minutes / 1440))


def _rounded_gb(gib: float) -> int:
    return max(4, 4 * math.ceil(gib / 4))


def pack(points: Sequence[GridPoint], slots: int | None, min_job_s: float = MIN_JOB_S) -> list[list[GridPoint]]:
    """Jobs of points: one each, except points predicted under ``min_job_s`` (with the same
    resources; a point of unknown cost, predicted 0, keeps its own job), which share jobs -- longest first into the least-loaded of ``n`` jobs, ``n`` the
    fewest that keep ``slots`` busy and give each job ``min_job_s`` of work (LPT scheduling)."""
    # A point of unknown cost (predicted 0: a comparison spec) is never packed.
    jobs: list[list[GridPoint]] = [[p] for p in points if not 0 < p.predicted_s < min_job_s]
    short: dict[Resources, list[GridPoint]] = {}
    for p in points:
        if 0 < p.predicted_s < min_job_s:
            short.setdefault(p.resources, []).append(p)
    for group in short.values():
        total = sum(p.predicted_s for p in group)
        n = min(len(group), max(slots or 1, math.ceil(total / min_job_s)))
        bins: list[list[GridPoint]] = [[] for _ in range(n)]
        loads = [0.0] * n
        for p in sorted(group, key=lambda p: -p.predicted_s):
            i = min(range(n), key=lambda j: (loads[j], len(bins[j])))
            bins[i].append(p)
            loads[i] += p.predicted_s
        jobs.extend(b for b in bins if b)
    return jobs


def job_resources(job: Sequence[GridPoint]) -> Resources:
    """A packed job's resources: its points', the time limit summed."""
    first = job[0].resources
    if len(job) == 1:
        return first
    return dataclasses.replace(first, time_min=max(first.time_min, _time_limit(sum(p.predicted_s for p in job))))


def run(points: Sequence[GridPoint], executor, *, journal: Path, on_done: Callable[[GridPoint], None],
        on_failed: Callable[[GridPoint, list[str]], None], retries: int = 2, threads: int | None = None,
        force: bool = False, what: str = "sweep", progress: bool = True, min_job_s: float = MIN_JOB_S) -> dict:
    """Train ``points`` as jobs on ``executor``; call ``on_done(point)`` once its record is written
    (the caller reads it and updates its table), ``on_failed(point, reasons)`` once its retries are
    spent.  Returns the driver's summary."""
    from .executors import driver

    by_key = {}
    tasks = []
    for job in pack(points, executor.slots, min_job_s):
        key = job[0].key if len(job) == 1 else f"{job[0].key}+{len(job) - 1}"
        by_key[key] = job
        tasks.append(Task(key=key, fn=run_points, resources=job_resources(job),
                          predicted_s=sum(p.predicted_s for p in job),
                          payload=dict(points=[p.payload() for p in job], threads=threads, force=force)))

    def done(task: Task, value: dict) -> None:
        refused = value.get("refused", {})
        for p in by_key[task.key]:
            if p.key in refused:
                on_failed(p, [refused[p.key]])
            else:
                on_done(p)

    def failed(task: Task, reasons: list[str]) -> None:
        for p in by_key[task.key]:
            if p.record.exists():  # trained before a later point of the same job failed
                on_done(p)
            else:
                on_failed(p, reasons)

    return driver.run_all(tasks, executor, journal=journal, on_done=done, on_failed=failed, retries=retries,
                          progress=progress, what=what)


# ------------------------------------------------------------------------------ the flags

def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--executor`` and its options, shared by every grid command (isoflop, sweep)."""
    g = p.add_argument_group("executor", "where the points' jobs run (default: in this process, one after another)")
    g.add_argument("--executor", choices=executors.EXECUTORS,
                   help="local: submitit's local executor (--jobs at once); slurm: one array per resource shape "
                        "(pip install 'etbench[slurm]'); ray: one task per job (pip install 'etbench[ray]')")
    g.add_argument("--jobs", type=int, metavar="N", help="jobs at once (local default: 1; ray: the cluster's CPUs)")
    g.add_argument("--retries", type=int, default=2, metavar="N",
                   help="attempts after a job's first failure, preemption or timeout (default 2); each reason "
                        "is kept in <out>/jobs.json")
    g.add_argument("--cpus-per-rank", type=int, metavar="N",
                   help="threads per rank (default: local, the cores / --jobs; slurm and ray: 1 on CPU, 8 on GPU)")
    g.add_argument("--ray-address", metavar="ADDR", help="an existing Ray cluster (default: start a local one)")
    for name, kind, doc in (("partition", str, "Slurm partition"), ("account", str, "Slurm account"),
                            ("qos", str, "Slurm QoS"), ("array-parallelism", int, "array elements running at once"),
                            ("config", str, "JSON file of Slurm settings (the flags win)")):
        g.add_argument(f"--slurm-{name}", type=kind, help=doc)
    g.add_argument("--slurm-setup", action="append", metavar="CMD", help="a shell line run before each job (repeatable)")


def check_arguments(args: argparse.Namespace) -> None:
    """Bad executor flags, as one line each, before any work."""
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
    if args.retries < 0:
        raise ConfigError(f"--retries must be >= 0, got {args.retries}")
    if args.cpus_per_rank is not None and args.cpus_per_rank < 1:
        raise ConfigError(f"--cpus-per-rank must be >= 1, got {args.cpus_per_rank}")
    slurm = [f"--slurm-{k.removeprefix('slurm_').replace('_', '-')}" for k, v in vars(args).items()
             if k.startswith("slurm_") and v is not None]
    if slurm and args.executor != "slurm":
        raise ConfigError(f"{slurm[0]} is a Slurm option; give --executor slurm, or drop it")
    if args.ray_address and args.executor != "ray":
        raise ConfigError("--ray-address is a Ray option; give --executor ray, or drop it")
    if args.executor is None and args.jobs is not None:
        raise ConfigError("--jobs needs --executor (local, slurm or ray)")


def make_executor(args: argparse.Namespace, folder: Path):
    """The executor the flags name (None: train in this process)."""
    if args.executor is None:
        return None
    if args.executor == "slurm":
        from .executors.slurm import SlurmConfig

        config = SlurmConfig.load(args.slurm_config) if args.slurm_config else SlurmConfig()
        config = config.merged(dict(partition=args.slurm_partition, account=args.slurm_account, qos=args.slurm_qos,
                                    array_parallelism=args.slurm_array_parallelism, setup=args.slurm_setup))
        return executors.make("slurm", folder, config=config)
    if args.executor == "ray":
        return executors.make("ray", folder, jobs=args.jobs, address=args.ray_address)
    return executors.make("local", folder, jobs=args.jobs or 1)


def threads_for(args: argparse.Namespace, executor) -> int | None:
    """torch's threads in each job: --cpus-per-rank, else the local cores / jobs at once."""
    if args.cpus_per_rank:
        return args.cpus_per_rank
    if executor is None:
        return None
    if executor.name == "local":
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        return max(1, cores // (executor.slots or 1))
    return 1
