"""What ``etbench plan-calibrate`` (:mod:`impls.calibration`) measures, as launched etbench commands.

* step times: ``etbench compare`` once per world size (every layout built in the same ranks and
  timed in rotated rounds: :mod:`impls.compare`), or ``etbench run`` per layout -- both launched
  with ``--nproc N`` as a user would (:func:`impls.ranks.launch`), ``--oversubscribe`` on a CPU
  with fewer cores than ranks;
* the link: ``etbench comm`` (:mod:`impls.commbench`), the all-reduce bus bandwidth per message size;
* the per-rank peak: the repo's GEMM probe (:func:`impls.measure.peak.peak_flops`) at the threads a
  rank runs with, times the rank's share of the cores.

Each command runs in a child process with this repository on its path and DeepSpeed's prebuilt
ops where ``make setup`` put them (``.cache/torch_extensions``: without it every DeepSpeed launch
rebuilds its shared-memory op, a minute on this machine).  A command that fails is a
``RuntimeError`` with the last lines of its stderr, which the calibration records against the
layouts it would have measured.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the calibration's types (it imports this module)
    from .calibration import Point, Settings

REPO = Path(__file__).resolve().parents[1]
#: Seconds one launched command may take (a whole world size of layouts under ``compare``).
LAUNCH_TIMEOUT_S = 1800


def _launch(args: list[str], what: str, settings: Settings, timeout: float = LAUNCH_TIMEOUT_S) -> None:
    """``python -m impls.cli ARGS`` in a child process (this repo on its path, DeepSpeed's
    prebuilt ops found where ``make setup`` put them, on a CPU ``settings.threads`` threads per
    rank); its failure is a RuntimeError with the last lines of its stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    if settings.device == "cpu":
        env["OMP_NUM_THREADS"] = str(settings.threads)
    proc = subprocess.run([sys.executable, "-m", "impls.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        tail = " | ".join(line for line in proc.stderr.strip().splitlines()[-3:] if line.strip())
        raise RuntimeError(f"{what} exited {proc.returncode}: {tail[-600:]}")


def _nproc_args(n: int, device: str) -> list[str]:
    if n == 1:
        return []
    from . import ranks

    over = ["--oversubscribe"] if device == "cpu" and n > ranks.cores() else []
    return ["--nproc", str(n), *over]


def _from_compare(variant: dict) -> dict:
    t = variant["seconds_per_step"]
    return dict(seconds=t["median"], ci=list(t["ci95"]), n=t["n"], samples=t["per_round"],
                coverage=t.get("coverage"), tokens_per_step=variant["tokens_per_step"],
                traffic_bytes=(variant.get("comm") or {}).get("bytes_per_step"),
                method="etbench compare: median over rounds of each round's median step, order-statistic interval")


def _from_run(record: dict) -> dict:
    t = record["step_time"]
    return dict(seconds=t["median"], ci=list(t["ci95"]) if t["ci95"] else None, n=t["n"], samples=t["samples"],
                coverage=0.95,
                tokens_per_step=record["tokens_per_step"], traffic_bytes=(record.get("comm") or {}).get("bytes_per_step"),
                load=record.get("load"), method="etbench run: median of the timed steps, bootstrap interval")


def measure_world_size(points: list[Point], settings: Settings, folder: Path) -> dict[str, dict]:
    """Every point of one world size measured: name -> timing (or ``error``)."""
    n = points[0].world_size
    out: dict[str, dict] = {}
    if settings.harness == "compare" and len(points) > 1:
        spec = dict(baseline=points[0].name, rounds=settings.rounds, steps=settings.steps, warmup=settings.warmup,
                    common={}, variants={p.name: {k: v for k, v in dataclasses.asdict(p.recipe).items()
                                                  if k not in ("steps", "flops_budget")} for p in points})
        spec_file, target = folder / f"spec-ws{n}.json", folder / f"compare-ws{n}.json"
        spec_file.write_text(json.dumps(spec))
        try:
            _launch(["compare", str(spec_file), *_nproc_args(n, settings.device), "--out", str(target)],
                    f"etbench compare at world size {n}", settings)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            return {p.name: dict(error=str(e)) for p in points}
        record = json.loads(target.read_text())
        for p in points:
            out[p.name] = dict(_from_compare(record["variants"][p.name]), load=record["load"])
        return out
    from .recipe import to_argv

    for p in points:
        target = folder / f"run-{p.name}-ws{n}.json"
        try:
            _launch(["run", *_nproc_args(n, settings.device), "--out", str(target), *to_argv(p.recipe)],
                    f"etbench run {p.name} at world size {n}", settings)
            out[p.name] = _from_run(json.loads(target.read_text()))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            out[p.name] = dict(error=str(e))
    return out


def measure_links(n: int, sizes: list[int], settings: Settings, folder: Path) -> dict[int, float]:
    """All-reduce bus bandwidth (bytes/s) at world size ``n`` per message size (``etbench comm``)."""
    target = folder / f"comm-ws{n}.json"
    _launch(["comm", *_nproc_args(n, settings.device), "--sizes", ",".join(map(str, sorted(set(sizes)))),
             "--schemes", "allreduce", "--iters", str(settings.comm_iters), "--warmup", "2",
             "--device", settings.device, "--out", str(target)], f"etbench comm at world size {n}", settings)
    record = json.loads(target.read_text())
    return {r["size_bytes"]: r["busbw_Bps"]["median"] for r in record["results"] if r["scheme"] == "allreduce"}


def rank_peak(n: int, settings: Settings, cores: int) -> dict:
    """Per-rank peak FLOP/s at world size ``n``: the probe at the t = ``settings.threads`` threads
    every rank runs with, times its share of the C cores, min(1, C/(N·t)) (on a GPU the probe
    itself: one GPU per rank)."""
    import torch

    from .measure.peak import peak_flops

    dtype = torch.bfloat16 if settings.precision == "mixed" else torch.float32
    if settings.device != "cpu":
        probe = peak_flops(torch.device(settings.device), dtype)
        return dict(value=probe["value"], source=probe["source"], threads=None, share=1.0)
    threads = settings.threads
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        probe = peak_flops(torch.device("cpu"), dtype)
    finally:
        torch.set_num_threads(before)
    share = min(1.0, cores / (n * threads))
    return dict(value=probe["value"] * share, probe=probe["value"], source=probe["source"], threads=threads,
                share=share, rule=f"P({threads} threads) x min(1, {cores} cores / ({n} ranks x {threads}))")
