"""``etbench plan-calibrate``: the planner's step-time model against measured runs on this machine.

For every layout of a grid (:data:`LAYOUTS`: one rank with and without checkpointing, DDP, ZeRO-1/2/3
through DeepSpeed, FSDP2, TP, TP + SP, GPipe, 1F1B and interleaved 1F1B pipelines, DP×TP, DP×PP) at
world sizes 1, 2 and 4, it trains the layout's etbench recipe (:func:`impls.plan_verify.layout_recipe`,
the mapping of ``etbench plan --verify``) for a few steps, predicts the same layout with
:func:`impls.planner.predict` on this machine's measured speeds, and reports Spearman's rank
correlation of predicted and measured step times (does the planner rank layouts as the machine
does?) and each prediction's error |ln(measured / predicted)|.  The record (kind
:data:`impls.families.PLAN_CALIBRATION`) is written atomically to ``--out``.

The planner's time model: step = compute + TP comm + PP p2p + bubble + exposed DP comm, compute =
executed FLOPs / (N · peak · MFU) with (6Ψ_mm + 12·L·H·Q·T)·tokens model FLOPs (× 4/3 recomputed),
bubble (p−1)/(v·m) of the pipeline's time, each transfer ring bytes / link bandwidth.  Its inputs
here are measured:

* peak: the repo's fp32 GEMM probe (:func:`impls.measure.peak.peak_flops`, ``etbench peak``: the best
  rate probed at that thread count) per rank.  Every rank, the single one included, runs ``--threads``
  t = 1 (``OMP_NUM_THREADS``, what :func:`impls.ranks.launch` gives launched ranks): all world sizes
  then run the same one-thread GEMMs, so an MFU fitted at one rank carries over, and no rank waits in
  OpenMP barriers for a thread another process took (a 2-thread rank sharing a core with a neighbour
  ran 6x slower here).  N ranks of t threads share C cores: per-rank peak = P(t) · min(1, C/(N·t)),
  at N = 4 on 2 cores half the one-thread probe;
* link: the gloo all-reduce bus bandwidth of ``etbench comm`` (busbw = S/t · 2(n−1)/n, nccl-tests'
  per-link rate of a ring) at that world size and at each layout's own message size: DP the
  planner's gradient bucket min(25 MiB, Ψ·g_b), TP and PP one activation s·b·h·e;
* MFU: fitted on the plain one-rank layout (``single``): predicted(MFU = 1) / measured, so that
  row's ratio is 1 by construction and the errors leave it out; or ``--mfu`` (planner default 0.4).

Measurement: ``--harness compare`` (default) launches ``etbench compare`` once per world size
(``--nproc N``, the launcher of ``etbench run --nproc N``): every layout is built in the same ranks by
``train.prepare`` and stepped by the same ``engine.train_step`` as a run, ``--warmup`` untimed steps,
then ``--rounds`` rounds of ``--steps`` steps in rotated order, so load on a shared machine hits
every layout alike.  Its step time is the median over rounds of each round's median (slowest rank),
with the order-statistic 95% interval of :func:`impls.measure.timing.median_interval` (the extremes
below 6 rounds, coverage recorded).  ``--harness run`` launches ``etbench run`` per layout: the
median of its timed steps with the bootstrap interval of :func:`impls.measure.timing.step_time_stats`
(also used for a world size with one layout).  More ranks than cores are oversubscribed (the ranks
take turns: the per-rank peak accounts for it).  Spearman's ρ is Pearson's correlation of the ranks,
ties given their average rank (:func:`spearman`), over all rows and within each world size.

Load: on a shared machine other processes take cores the planner's peak assumes are the run's.
The record keeps the load average before and after, each measurement's load report, and a second,
``load_adjusted`` series: the same predictions on the cores the others left during that
measurement (o, from /proc/stat: :func:`impls.measure.timing.other_cores`), per-rank peak
P(t) · min(1, max(C − o, 0.1)/(N·t)), MFU refitted -- what separates the model's error from the
neighbours'.

GPU
---
On a GPU box (one rank per GPU, NCCL): ``etbench plan-calibrate --device cuda --precision mixed
--model gpt2-medium --model-args '' --seq-len 1024 --global-batch 64 --micro-batches 8
--world-sizes 1,8 --out results/atscale/calibration-gpu.json``.  The per-rank peak is the GPU probe
(:func:`impls.measure.peak.peak_flops` on ``cuda``: CUDA-event timed GEMMs in the run's matmul dtype,
bf16 under ``--precision mixed``, with the datasheet cross-check), not shared; the link is NCCL's
bus bandwidth from ``etbench comm --device cuda --nproc N`` at the same message sizes (NVLink: TP
and DP on one link).  World sizes above the GPUs are skipped before any work, with the reason.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import families, plan_verify, planner
from .calibration_runs import measure_links, measure_world_size, rank_peak
from .errors import ConfigError

DEFAULT_OUT = "results/atscale/calibration.json"
#: The grid: name -> what it is (``etbench plan-calibrate --layouts``).
LAYOUTS = {
    "single": "one rank, no parallelism (world size 1; the MFU fit point)",
    "ckpt": "one rank with full activation checkpointing (world size 1)",
    "ddp": "DDP over all N ranks (ZeRO-0)",
    "zero1": "ZeRO-1 over all N ranks, DeepSpeed zero:stage=1",
    "zero2": "ZeRO-2 over all N ranks, DeepSpeed zero:stage=2",
    "zero3": "ZeRO-3 over all N ranks, DeepSpeed zero:stage=3",
    "fsdp": "ZeRO-3 over all N ranks, torch FSDP2",
    "zero1-torch": "ZeRO-1 over all N ranks, torch ZeroRedundancyOptimizer (not in the default grid)",
    "zero2-fairscale": "ZeRO-2 over all N ranks, fairscale OSS + ShardedDDP (not in the default grid)",
    "tp": "tensor parallelism over all N ranks",
    "tp-sp": "tensor + sequence parallelism over all N ranks",
    "pp-gpipe": "an N-stage pipeline, GPipe",
    "pp-1f1b": "an N-stage pipeline, 1F1B",
    "pp-interleaved": "an N-stage pipeline, interleaved 1F1B with 2 chunks per rank",
    "dp-tp": "DDP over N/2 x tensor parallelism over 2 (N >= 4)",
    "dp-pp": "DDP over N/2 x a 2-stage 1F1B pipeline (N >= 4)",
}
DEFAULT_LAYOUTS = tuple(n for n in LAYOUTS if n not in ("zero1-torch", "zero2-fairscale"))
_DP = {"ddp": (0, "default"), "zero1": (1, "deepspeed"), "zero2": (2, "deepspeed"), "zero3": (3, "deepspeed"),
       "fsdp": (3, "default"), "zero1-torch": (1, "native"), "zero2-fairscale": (2, "native")}
HARNESSES = ("compare", "run")
MAX_WORLD_SIZE = 64


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every layout of a calibration shares.  The defaults: the zoo's CPU ``small`` (d 384)
    with 4 layers of 4 heads, so that t = 2, 4 split the heads, p = 2, 4 the layers and the
    interleaved schedule 2 chunks of 1 layer over 2 stages; 8 sequences of 128 tokens per step
    (~47 GFLOP: ~0.35 s on this 2-core CPU at one rank, so compute, not launch overhead, dominates)."""

    model: str = "small"
    model_args: tuple = (("n_layer", 4), ("n_head", 4))  # 4 layers: 2 stages of 2, 4 of 1, 2 chunks of 1
    seq_len: int = 128
    global_batch: int = 8
    micro_batches: int = 4  # m of the pipelines
    precision: str = "fp32"
    device: str = "cpu"
    harness: str = "compare"
    rounds: int = 6
    steps: int = 2
    warmup: int = 2
    comm_iters: int = 10
    mfu: float | None = None  # None: fitted at world size 1
    threads: int = 1  # CPU threads per rank (OMP_NUM_THREADS), the single rank's too

    @property
    def overrides(self) -> dict:
        return dict(self.model_args)


@dataclasses.dataclass
class Point:
    name: str
    world_size: int
    layout: planner.Layout
    impl: str
    recipe: object = None  # Recipe
    notes: tuple = ()

    @property
    def label(self) -> str:
        return f"{self.layout.label} [{self.name}]"


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------

def grid_layout(name: str, n: int, global_batch: int, m: int) -> tuple[planner.Layout, str] | str:
    """The planner layout and ZeRO implementation of grid ``name`` at world size ``n``, or why it
    does not run there."""
    L = planner.Layout
    if name in ("single", "ckpt"):
        return (L(1, 1, 1, 0, "none", 1, global_batch, 1, name == "ckpt"), "default") if n == 1 \
            else "runs at world size 1 only"
    if n == 1:
        return "needs world size >= 2"
    if name in _DP:
        stage, impl = _DP[name]
        return (L(n, 1, 1, stage, "none", 1, global_batch // n, 1, False), impl) if global_batch % n == 0 \
            else f"global batch {global_batch} does not divide over dp={n}"
    if name in ("tp", "tp-sp"):
        return L(1, n, 1, 0, "none", 1, global_batch, 1, False, name == "tp-sp"), "default"
    if name.startswith("pp-"):
        schedule = name[3:]
        if global_batch % m:
            return f"global batch {global_batch} does not divide into m={m} micro-batches"
        return L(1, 1, n, 0, schedule, 2 if schedule == "interleaved" else 1, global_batch // m, m, False), "default"
    if n < 4 or n % 2:
        return "needs an even world size >= 4 (dp = N/2 x 2)"
    dp = n // 2
    if name == "dp-tp":
        return (L(dp, 2, 1, 0, "none", 1, global_batch // dp, 1, False), "default") if global_batch % dp == 0 \
            else f"global batch {global_batch} does not divide over dp={dp}"
    if global_batch % (dp * m):
        return f"global batch {global_batch} does not divide over dp={dp} x m={m}"
    return L(dp, 1, 2, 0, "1f1b", 1, global_batch // (dp * m), m, False), "default"


def plan_grid(names, world_sizes, settings: Settings) -> tuple[list[Point], list[dict]]:
    """Every (layout, world size) of the grid: the points that run, and the others with the
    reason (the planner's divisibility, etbench's own checks of the recipe).  Nothing is run."""
    from . import ranks, train, zoo

    cfg = zoo.config(settings.model, **settings.overrides)
    points, skipped = [], []
    for n in world_sizes:
        for name in names:
            got = grid_layout(name, n, settings.global_batch, settings.micro_batches)
            if isinstance(got, str):
                skipped.append(dict(layout=name, world_size=n, reason=got, kind="grid"))
                continue
            layout, impl = got
            why = planner.divisibility(cfg, layout, settings.global_batch)
            if why:
                skipped.append(dict(layout=name, world_size=n, reason="planner: " + "; ".join(why), kind="refused"))
                continue
            try:  # more ranks than GPUs (CPU ranks above the cores are oversubscribed instead)
                if settings.device != "cpu":
                    ranks.check_fit(n, {settings.device}, oversubscribe=False)
            except ConfigError as e:
                skipped.append(dict(layout=name, world_size=n, reason=str(e), kind="refused"))
                continue
            recipe, notes = plan_verify.layout_recipe(
                layout, settings.model, settings.seq_len, precision=settings.precision, impl=impl,
                model_overrides=settings.overrides, device=settings.device, eval_batches=1, evaluations=1,
                steps=settings.warmup + settings.rounds * settings.steps, timing_warmup=settings.warmup)
            try:
                train.validate(recipe, world_size=n)
            except ConfigError as e:
                skipped.append(dict(layout=name, world_size=n, reason=f"etbench refuses it: {e}", kind="refused"))
                continue
            points.append(Point(name, n, layout, impl, recipe, tuple(notes)))
    return points, skipped


# --------------------------------------------------------------------------------------------
# Prediction and statistics
# --------------------------------------------------------------------------------------------

def message_sizes(point: Point, settings: Settings) -> dict[str, int]:
    """The bytes of one collective of each kind the planner prices for ``point``: DP the gradient
    bucket min(25 MiB, Ψ·g_b) (its ``bucket_mb``), TP and PP one activation s·b·h·e (a multiple of
    4 bytes, as ``etbench comm`` sends fp32 elements)."""
    counts = planner.model_counts(settings.model, **settings.overrides)
    prec = planner.PRECISIONS[settings.precision]
    lay = point.layout
    psi = sum(math.prod(s) for s in planner.stage_tensors(counts, lay.tp, lay.pp, 0, lay.chunks))
    act = settings.seq_len * lay.micro_batch_size * counts.cfg.d_model * prec.act_bytes
    act = -(-int(act) // 4) * 4
    sizes = {}
    if lay.dp > 1:
        sizes["dp"] = -(-int(min(25 * 2 ** 20, psi * prec.grad_bytes)) // 4) * 4
    if lay.tp > 1:
        sizes["tp"] = act
    if lay.pp > 1:
        sizes["pp"] = act
    return sizes


def hardware(point: Point, peak: float, links: dict[int, float], settings: Settings, mfu: float) -> tuple:
    """(planner Hardware, the bandwidths used) of ``point``: the DP/PP link at the DP message size
    (the PP one without DP), the TP link at the TP message size; an unused link is set to a used
    one (it prices nothing)."""
    sizes = message_sizes(point, settings)
    used = {kind: links[size] for kind, size in sizes.items()}
    link = used.get("dp", used.get("pp"))
    tp_link = used.get("tp")
    fallback = link or tp_link or 1e9 / 8  # no collective at all (one rank): priced at nothing
    hw = planner.Hardware(devices=point.world_size, device_mem=float(1 << 50), device_flops=peak,
                          link_gbps=(link or fallback) * 8 / 1e9, tp_link_gbps=(tp_link or fallback) * 8 / 1e9,
                          mfu=mfu)
    return hw, dict(message_bytes=sizes, link_bytes_per_s=link, tp_link_bytes_per_s=tp_link)


def predict(point: Point, hw: planner.Hardware, settings: Settings) -> planner.Prediction:
    counts = planner.model_counts(settings.model, **settings.overrides)
    return planner.predict(counts, point.layout, hw, settings.seq_len, settings.global_batch,
                           planner.PRECISIONS[settings.precision], attention="flash", overlap="dp")


def _ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties given the average of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation: Pearson's r of the (tie-averaged) ranks; None with fewer than
    two pairs or when either side is constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs pairs: {len(x)} x values, {len(y)} y values")
    if len(x) < 2:
        return None
    rx, ry = _ranks(list(x)), _ranks(list(y))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def _median(values: list[float]) -> float | None:
    s = sorted(values)
    if not s:
        return None
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def summary(rows: list[dict], series: str = "") -> dict:
    """Spearman's ρ of predicted vs measured over the measured rows (all, and within each world
    size, where one launch's load hit every layout alike), and the errors |ln ratio| (median,
    worst) and |ratio − 1| (median) over those not used to fit the MFU.  ``series``: the suffix of
    the prediction's keys ("" nominal, "_load_adjusted")."""
    key, log, ratio = "predicted_seconds" + series, "log_ratio" + series, "ratio" + series
    done = [r for r in rows if r.get("measured_seconds") is not None and r.get(key) is not None]
    sizes = sorted({r["world_size"] for r in done})
    by_size = {str(n): spearman([r[key] for r in done if r["world_size"] == n],
                                [r["measured_seconds"] for r in done if r["world_size"] == n]) for n in sizes}
    scored = [r for r in done if not r.get("fit")]
    worst = max(scored, key=lambda r: abs(r[log]), default=None)
    return dict(spearman=spearman([r[key] for r in done], [r["measured_seconds"] for r in done]),
                spearman_n=len(done), spearman_by_world_size=by_size,
                median_abs_error=_median([abs(r[log]) for r in scored]),
                max_abs_error=abs(worst[log]) if worst else None,
                worst_layout=f"{worst['layout']} ws{worst['world_size']}" if worst else None,
                median_abs_pct_error=_median([abs(r[ratio] - 1) for r in scored]), error_n=len(scored))


def fit_mfu(points: list[Point], timings: dict, peak, settings: Settings) -> tuple[float, str]:
    """``(MFU, where it came from)``: ``settings.mfu`` when given, else predicted(MFU = 1) /
    measured of the plain one-rank layout (``peak(point)``: its per-rank peak), else the
    planner's default."""
    if settings.mfu is not None:
        return settings.mfu, "given (--mfu)"
    single = next((p for p in points if p.name == "single"), None)
    timing = timings.get(("single", 1)) or {}
    if single is not None and timing.get("seconds"):
        hw, _ = hardware(single, peak(single), {}, settings, 1.0)
        mfu = predict(single, hw, settings).step_time / timing["seconds"]
        return mfu, ("fitted at world size 1: predicted compute at MFU 1 / measured step of 'single' "
                     f"({timing['seconds']:.4f} s); that row's ratio is 1 by construction")
    default = next(f.default for f in dataclasses.fields(planner.Hardware) if f.name == "mfu")
    return default, "the planner's default (no measured 'single' run at world size 1 to fit)"


def predictions(points: list[Point], timings: dict, peak, links: dict, settings: Settings) -> tuple[dict, float, str]:
    """Every point predicted at ``peak(point)`` FLOP/s per rank, its links and the fitted MFU:
    ``({(name, N): (Prediction, links used)}, MFU, its source)``."""
    mfu, source = fit_mfu(points, timings, peak, settings)
    out = {}
    for p in points:
        hw, used = hardware(p, peak(p), links.get(p.world_size, {}), settings, mfu)
        out[(p.name, p.world_size)] = (predict(p, hw, settings), used)
    return out, mfu, source


def _row(point: Point, pred: planner.Prediction, links: dict, timing: dict, settings: Settings) -> dict:
    row = dict(layout=point.label, name=point.name, world_size=point.world_size, model=settings.model,
               model_args=settings.overrides, planner_layout=dataclasses.asdict(point.layout),
               techniques=list(point.recipe.techniques), mesh=dict(point.recipe.mesh),
               batch_size=point.recipe.batch_size, notes=list(point.notes),
               predicted_seconds=pred.step_time, predicted_components=dict(pred.time),
               predicted_mfu=pred.predicted_mfu, **links)
    if "error" in timing:
        return dict(row, measured_seconds=None, error=timing["error"])
    expected = settings.global_batch * settings.seq_len
    if timing["tokens_per_step"] != expected:
        return dict(row, measured_seconds=None, error=f"the run trained {timing['tokens_per_step']} tokens per step, "
                                                      f"the layout {expected}: the mapping is wrong")
    ratio = timing["seconds"] / pred.step_time
    return dict(row, measured_seconds=timing["seconds"], measured_ci=timing["ci"], n=timing["n"],
                measured_samples=timing["samples"], ci_coverage=timing.get("coverage"), method=timing["method"],
                traffic_bytes=timing.get("traffic_bytes"), load=timing.get("load"), ratio=ratio,
                log_ratio=math.log(ratio), fit=settings.mfu is None and point.name == "single")


def _load_adjusted(points, rows, timings, peaks, links, settings, cores) -> dict | None:
    """The same predictions with each rank's share of the cores *left by other processes* during
    its measurement (``other_processes_cores``, /proc/stat: :func:`impls.measure.timing.other_cores`):
    P(t) · min(1, max(C − others, 0.1)/(N·t)); the MFU refitted on it.  CPU only (None elsewhere)."""
    if settings.device != "cpu":
        return None

    def others(p):
        return ((timings.get((p.name, p.world_size)) or {}).get("load") or {}).get("other_processes_cores")

    def peak(p):
        info, busy = peaks[p.world_size], others(p) or 0.0
        return info["probe"] * min(1.0, max(cores - busy, 0.1) / (p.world_size * info["threads"]))

    kept = [p for p in points if others(p) is not None]
    preds, mfu, source = predictions(kept, timings, peak, links, settings)
    for p, row in zip(points, rows):
        if p in kept:
            step = preds[(p.name, p.world_size)][0].step_time
            row.update(other_processes_cores=others(p), peak_load_adjusted=peak(p), predicted_seconds_load_adjusted=step)
            if row.get("measured_seconds") is not None:
                ratio = row["measured_seconds"] / step
                row.update(ratio_load_adjusted=ratio, log_ratio_load_adjusted=math.log(ratio))
    return dict(mfu=mfu, mfu_source=source, **summary(rows, "_load_adjusted"),
                rule="per-rank peak P(t) x min(1, max(C - o, 0.1)/(N t)), o = the cores other processes used during "
                     "the layout's measurement (its load report); MFU refitted on 'single'")


def calibrate(names, world_sizes, settings: Settings, *, progress=None, measure=measure_world_size,
              links_of=measure_links, peak_of=rank_peak) -> dict:
    """Measure and predict every runnable point of the grid; return the record (not written).
    ``measure``, ``links_of`` and ``peak_of`` are what launch runs, ``etbench comm`` and probe the
    peak (tests pass stand-ins)."""
    import torch

    from . import ranks
    from .measure import device_name
    from .measure.timing import load_average
    from .provenance import SCHEMA_VERSION, provenance

    say = progress or (lambda line: None)
    t0 = time.time()
    points, skipped = plan_grid(names, world_sizes, settings)
    if not points:
        raise ConfigError("no layout of the grid runs at the given world sizes; skipped: "
                          + "; ".join(f"{s['layout']} ws{s['world_size']}: {s['reason']}" for s in skipped))
    cores, load_before = ranks.cores(), load_average()
    sizes = sorted({p.world_size for p in points})
    peaks = {n: peak_of(n, settings, cores) for n in sizes}
    links, timings = {}, {}
    with tempfile.TemporaryDirectory(prefix="etbench-calibration-") as tmp:
        for n in sizes:
            here = [p for p in points if p.world_size == n]
            wanted = sorted({b for p in here for b in message_sizes(p, settings).values()})
            try:
                links[n] = links_of(n, wanted, settings, Path(tmp)) if wanted else {}
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                timings.update({(p.name, n): dict(error=f"link not measured: {e}") for p in here})
                continue
            if links[n]:
                say(f"ws{n}: bus bandwidth " + ", ".join(f"{s} B {bw / 1e9:.2f} GB/s" for s, bw in links[n].items()))
            measured = measure(here, settings, Path(tmp))
            timings.update({(name, n): t for name, t in measured.items()})
            say(f"ws{n}: " + ", ".join(f"{name} {t['seconds'] * 1e3:.0f} ms" if "seconds" in t else f"{name} failed"
                                       for name, t in measured.items()))
    nominal, mfu, mfu_source = predictions(points, timings, lambda p: peaks[p.world_size]["value"], links, settings)
    rows = [_row(p, *nominal[(p.name, p.world_size)], timings.get((p.name, p.world_size)) or dict(error="not measured"),
                 settings) for p in points]
    adjusted = _load_adjusted(points, rows, timings, peaks, links, settings, cores)
    device = torch.device(settings.device)
    return dict(
        kind=families.PLAN_CALIBRATION, schema=SCHEMA_VERSION, **provenance(),
        machine=dict(cpu=device_name(torch.device("cpu")), device=device_name(device), cores=cores,
                     threads_per_rank=settings.threads if settings.device == "cpu" else None,
                     load_before=load_before, load_after=load_average()),
        hardware=dict(peak_flops={str(n): peaks[n]["value"] for n in sizes},
                      peak_source={str(n): peaks[n] for n in sizes},
                      link_bytes_per_s={str(n): {str(s): bw for s, bw in links[n].items()} for n in links},
                      link_source="etbench comm all-reduce bus bandwidth (median), at each layout's message size",
                      mfu=mfu, mfu_source=mfu_source),
        settings=dict(dataclasses.asdict(settings), model_args=settings.overrides, layouts=list(names),
                      world_sizes=list(world_sizes)),
        rows=rows, skipped=skipped, **summary(rows), load_adjusted=adjusted, wall_seconds=time.time() - t0,
        notes=_notes(settings, cores))


def _notes(settings: Settings, cores: int) -> str:
    return (f"{settings.model} {settings.overrides}, global batch {settings.global_batch} x {settings.seq_len} tokens "
            f"per step for every layout, {settings.precision}; harness {settings.harness} ({settings.warmup} warm-up "
            f"steps, {settings.rounds} x {settings.steps} timed). Predicted: impls.planner.predict with the per-rank "
            f"peak P(t) x min(1, cores/(N t)) ({cores} cores, t = {settings.threads} thread(s) per rank), the gloo bus "
            f"bandwidth at each layout's message size, the MFU of hardware.mfu_source. Errors: |ln(measured/"
            f"predicted)| over the rows not used for the fit; spearman over all measured rows, spearman_by_world_size "
            f"within one launch each. World sizes above the cores are oversubscribed. The machine may be shared: "
            f"machine.load_*, each row's load, and load_adjusted (the same predictions on the cores other processes "
            f"left) say how much that moved the times.")


def table(record: dict) -> str:
    """Predicted against measured, one line per row, then the statistics."""
    head = (f"{'layout':<50} {'N':>2} {'pred s':>7} {'meas s':>7} {'95% interval':>15} {'ratio':>6}  {'adj s':>6} "
            f"{'ratio':>5} {'others':>6}  {'comp':>5} {'dp':>5} {'tp':>5} {'pp':>5} {'bubble':>6}")
    lines = [head, "-" * len(head)]
    for r in record["rows"]:
        start = f"{r['layout']:<50} {r['world_size']:>2} {r['predicted_seconds']:>7.3f} "
        if r.get("measured_seconds") is None:
            lines.append(start + f"failed: {r['error']}")
            continue
        c, (lo, hi) = r["predicted_components"], r["measured_ci"] or (float("nan"), float("nan"))
        adj = (f"{r['predicted_seconds_load_adjusted']:>6.3f} {r['ratio_load_adjusted']:>5.2f} "
               f"{r['other_processes_cores']:>6.2f}") if r.get("ratio_load_adjusted") is not None else f"{'-':>20}"
        lines.append(start + f"{r['measured_seconds']:>7.3f} [{lo:>6.3f},{hi:>6.3f}] {r['ratio']:>5.2f}{'*' if r['fit'] else ' '}"
                     f"  {adj}  " + " ".join(f"{c[k]:>5.3f}" for k in ("compute", "dp_comm_exposed", "tp_comm", "pp_p2p"))
                     + f" {c['bubble']:>6.3f}")
    grid = [s for s in record["skipped"] if s.get("kind") == "grid"]
    lines += [f"skipped {s['layout']} ws{s['world_size']}: {s['reason']}" for s in record["skipped"] if s not in grid]
    hw, m, adj = record["hardware"], record["machine"], record.get("load_adjusted")

    def stats(d):
        f = (lambda v, spec=".3f": "-" if v is None else format(v, spec))
        return (f"Spearman rho {f(d['spearman'])} over {d['spearman_n']} rows (within a world size: "
                + ", ".join(f"ws{n} {f(v)}" for n, v in d["spearman_by_world_size"].items())
                + f"); |ln(measured/predicted)| median {f(d['median_abs_error'])}, worst {f(d['max_abs_error'])} "
                f"({d['worst_layout']}); median |ratio - 1| {f(d['median_abs_pct_error'], '.1%')}")

    lines += [f"({len(grid)} layout x world size pairs not in the grid)", "",
              f"MFU {hw['mfu']:.3f} ({hw['mfu_source']}); * = the fit point",
              "per-rank peak GFLOP/s: " + ", ".join(f"ws{n} {v / 1e9:.1f}" for n, v in hw["peak_flops"].items()),
              "nominal: " + stats(record)]
    if adj:
        lines.append(f"load-adjusted (adj s: peak on the cores others left, 'others' cores; MFU {adj['mfu']:.3f}): "
                     + stats(adj))
    lines.append(f"load average before {m['load_before']:.2f}, after {m['load_after']:.2f} on {m['cores']} cores; "
                 f"{record['wall_seconds']:.0f} s")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Settings()
    p.add_argument("--layouts", default=",".join(DEFAULT_LAYOUTS),
                   help=f"comma-separated grid layouts (default: %(default)s); valid: {', '.join(LAYOUTS)}")
    p.add_argument("--world-sizes", default="1,2,4", help="comma-separated (default %(default)s)")
    p.add_argument("--model", default=d.model, help="zoo model (default %(default)s)")
    p.add_argument("--model-args", default=",".join(f"{k}={v}" for k, v in d.model_args),
                   help="model config overrides K=V,... (default %(default)s; '' for none)")
    p.add_argument("--seq-len", default=str(d.seq_len), help="tokens per sequence (default %(default)s)")
    p.add_argument("--global-batch", default=str(d.global_batch), help="sequences per step, all ranks (default %(default)s)")
    p.add_argument("--micro-batches", default=str(d.micro_batches), help="pipelines' m (default %(default)s)")
    p.add_argument("--precision", default=d.precision, help=f"{' | '.join(planner.PRECISIONS)} (default %(default)s)")
    p.add_argument("--device", default=d.device, help="cpu | cuda (default %(default)s)")
    p.add_argument("--harness", default=d.harness, help=f"{' | '.join(HARNESSES)} (default %(default)s)")
    p.add_argument("--rounds", default=str(d.rounds), help="timed rounds (compare) (default %(default)s)")
    p.add_argument("--steps", default=str(d.steps), help="timed steps per round (default %(default)s)")
    p.add_argument("--warmup", default=str(d.warmup), help="untimed steps first (default %(default)s)")
    p.add_argument("--comm-iters", default=str(d.comm_iters), help="etbench comm timed rounds (default %(default)s)")
    p.add_argument("--mfu", help="use this MFU instead of fitting it at world size 1")
    p.add_argument("--threads", default=str(d.threads), help="CPU threads per rank, one rank included (default %(default)s)")
    p.add_argument("--out", default=DEFAULT_OUT, help="the record (JSON, atomically; default %(default)s)")


def _int(text, flag: str, low: int, high: int | None = None) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        raise ConfigError(f"{flag} {text!r} is invalid; valid: an integer >= {low}"
                          + (f" and <= {high}" if high is not None else ""))
    return value


def _choice(text: str, flag: str, valid) -> str:
    if text not in valid:
        raise ConfigError(f"{flag} {text!r} is not valid; valid: {', '.join(valid)}")
    return text


def from_args(args) -> tuple[list[str], list[int], Settings]:
    """The checked inputs (a one-line ConfigError naming the first bad one and the valid values)."""
    from . import kv, zoo

    names = [x.strip() for x in args.layouts.split(",")]
    bad = [x for x in names if x not in LAYOUTS]
    if bad or not names:
        raise ConfigError(f"--layouts {(bad or [''])[0]!r} is not a grid layout; valid: {', '.join(LAYOUTS)}")
    sizes = [_int(x, "--world-sizes", 1, MAX_WORLD_SIZE) for x in args.world_sizes.split(",")]
    zoo.config(args.model)  # unknown model: one line with the valid names
    overrides = tuple((k, kv.guess(v)) for k, v in kv.split(args.model_args or "", "--model-args").items())
    mfu = None
    if args.mfu is not None:
        try:
            mfu = float(args.mfu)
        except ValueError:
            mfu = float("nan")
        if not 0 < mfu <= 1:
            raise ConfigError(f"--mfu {args.mfu!r} is invalid; valid: a number in (0, 1]")
    settings = Settings(model=args.model, model_args=overrides, seq_len=_int(args.seq_len, "--seq-len", 1),
                        global_batch=_int(args.global_batch, "--global-batch", 1),
                        micro_batches=_int(args.micro_batches, "--micro-batches", 1),
                        precision=_choice(args.precision, "--precision", tuple(planner.PRECISIONS)),
                        device=_choice(args.device, "--device", ("cpu", "cuda")),
                        harness=_choice(args.harness, "--harness", HARNESSES),
                        rounds=_int(args.rounds, "--rounds", 2, 1000), steps=_int(args.steps, "--steps", 1, 1000),
                        warmup=_int(args.warmup, "--warmup", 1, 1000),
                        comm_iters=_int(args.comm_iters, "--comm-iters", 1, 10_000), mfu=mfu,
                        threads=_int(args.threads, "--threads", 1, 1024))
    zoo.config(settings.model, **settings.overrides)  # a bad override: one line
    return list(dict.fromkeys(names)), list(dict.fromkeys(sizes)), settings


def run_cli(args) -> int:
    """``etbench plan-calibrate``: inputs and the output path checked (exit 2, nothing run or
    written), the grid planned and checked, then measured, predicted, printed and written."""
    from . import train
    from .files import check_writable, exclusive

    names, sizes, settings = from_args(args)
    check_writable(args.out)
    with exclusive(args.out):
        record = calibrate(names, sizes, settings, progress=lambda line: print(line, flush=True))
        print(table(record))
        train.write_record(record, args.out)
        print(f"-> {args.out}")
    return 0


def main(argv=None) -> int:
    """``python -m impls.calibration`` (= ``etbench plan-calibrate``)."""
    from .errors import EXIT_BAD_INPUT, EXIT_FAILED, OneLineParser, WriteError

    parser = OneLineParser(prog="etbench plan-calibrate", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run_cli(args)
    except ConfigError as e:
        print(f"etbench: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except WriteError as e:
        print(f"etbench: error: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
