"""Step-time statistics, machine load, and the consistency checks a record must pass.

One mean of step times hides how noisy they were.  A record keeps every timed step (after the
warm-up) and summarises them by the median with a 95% confidence interval obtained by a
percentile bootstrap of the median (Efron & Tibshirani 1993, ch. 13): resample the timed steps
with replacement, take each resample's median, report the 2.5th and 97.5th percentiles.  It is a
*within-run* interval: steps of one run share the machine's state, so load that lasts the whole
run shifts all of them alike and is not in the interval — that is what the load flag and
interleaved comparisons (several runs, A B A B …) are for.

Load, two ways.  (1) The CPU time other processes took while the run was timed: the machine's
busy time from ``/proc/stat`` minus the run's own CPU time (all its ranks), per second of wall
time -- immediate and exact where Linux provides it.  (2) The 1-minute load average at the start
and the end, against the cores the run uses (threads per rank × ranks on this machine); it lags
by about a minute, so it alone misses load that just began.  The run is flagged ``noisy`` when
other processes used more than :data:`LOAD_MARGIN` cores on average, or the load average exceeds
the cores in use by more than :data:`LOAD_MARGIN` (another CPU-bound process on one core adds ~1).

Consistency: MFU and HFU are fractions of a peak; a value above 1 means the peak in the
denominator is wrong (typically a probe taken while the machine was busy), never that the run
beat the hardware.  :func:`consistency_errors` names every such violation; the record carries
them and the report refuses to plot such a record.

Ratios over rounds: :func:`ratio_stats` summarises per-round ratios (variant/baseline step time in
an interleaved comparison, :mod:`impls.compare`; sparse/dense matmul time,
:mod:`impls.measure.sparse_storage`) by their median with the distribution-free order-statistic
95% interval (:func:`median_interval`), and the geometric mean with its Student-t interval (:func:`t975`).
"""
from __future__ import annotations

import math
import os
import time

import numpy as np

LOAD_MARGIN = 0.5
BOOTSTRAP_RESAMPLES = 2000


def step_time_stats(seconds: list[float], seed: int = 0) -> dict:
    """Median and 95% bootstrap interval of the median of ``seconds`` (at least one sample).  One
    sample has no interval (``ci95`` None): ``[x, x]`` would read as an exact measurement."""
    x = np.asarray(seconds, dtype=float)
    if x.size == 0:
        raise ValueError("no timed steps")
    median = float(np.median(x))
    if x.size == 1:
        return dict(n=1, median=median, ci95=None, mean=median, min=median, max=median,
                    method="one timed sample: no interval")
    rng = np.random.default_rng(seed)
    medians = np.median(x[rng.integers(0, x.size, size=(BOOTSTRAP_RESAMPLES, x.size))], axis=1)
    low, high = (float(v) for v in np.percentile(medians, [2.5, 97.5]))
    return dict(n=int(x.size), median=median, ci95=[low, high], mean=float(x.mean()),
                min=float(x.min()), max=float(x.max()),
                method=f"percentile bootstrap of the median, {BOOTSTRAP_RESAMPLES} resamples, within run")


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def cpu_snapshot() -> dict | None:
    """Wall clock, the machine's busy CPU seconds (all cores, ``/proc/stat``: user, nice, system,
    irq, softirq, steal) and this process's CPU seconds (children included); None without
    ``/proc/stat``."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:]]
    busy = sum(ticks[i] for i in (0, 1, 2, 5, 6, 7) if i < len(ticks)) / os.sysconf("SC_CLK_TCK")
    t = os.times()
    return dict(wall=time.monotonic(), busy=busy, own=t.user + t.system + t.children_user + t.children_system)


def other_cores(start: dict | None, end: dict | None, own_seconds: float | None = None) -> float | None:
    """Cores' worth of CPU time other processes used between two :func:`cpu_snapshot` calls: busy
    time minus the run's own (``own_seconds``, e.g. summed over ranks; default this process's),
    per wall second.  Clock-tick granularity (10 ms) makes short spans imprecise."""
    if start is None or end is None or end["wall"] <= start["wall"]:
        return None
    own = end["own"] - start["own"] if own_seconds is None else own_seconds
    return max(0.0, (end["busy"] - start["busy"]) - own) / (end["wall"] - start["wall"])


def load_report(start: float | None, end: float | None, cores_in_use: int, others: float | None = None) -> dict:
    """The run's load figures and its ``noisy`` flag (None when the OS reports neither)."""
    loads = [v for v in (start, end) if v is not None]
    votes = ([max(loads) > cores_in_use + LOAD_MARGIN] if loads else []) + (
        [others > LOAD_MARGIN] if others is not None else [])
    return dict(load1_start=start, load1_end=end, cores_in_use=cores_in_use, cpu_count=os.cpu_count(),
                other_processes_cores=others, noisy=any(votes) if votes else None,
                rule=f"noisy when other processes used > {LOAD_MARGIN} cores during the run, or the 1-min load "
                     f"exceeds the cores in use by > {LOAD_MARGIN}")


def consistency_errors(record: dict) -> list[str]:
    """One line per impossible value in ``record`` (empty when it is consistent)."""
    errors = []
    peak = record.get("peak_flops") or {}
    for key in ("mfu", "hfu"):
        value = record.get(key)
        if isinstance(value, (int, float)) and value > 1:
            errors.append(f"{key.upper()} {value:.1%} exceeds 100%: the peak it was divided by "
                          f"({peak.get('value', float('nan')) / 1e9:.1f} GFLOP/s, {peak.get('source')}) is too low, "
                          f"e.g. a probe taken under load; re-probe with 'etbench peak --reprobe'")
    return errors


# Two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30; beyond, the normal 1.96 is
# within 2% (no scipy dependency for 30 numbers).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t975(df: int) -> float:
    return _T975[df - 1] if df <= len(_T975) else 1.96


def median_interval(n: int) -> tuple[int, int, float]:
    """1-based ranks (k, n-k+1) of the order statistics bracketing the median with coverage >= 95%
    (the largest k with P(Binomial(n, 1/2) < k) <= 2.5%), and the exact coverage.  Below 6 values
    no pair reaches 95%: the extremes are returned with their (lower) coverage."""
    k, tail = 1, 0.5 ** n  # tail = P(X < k) for k = 1
    while k < n // 2:
        nxt = tail + math.comb(n, k) * 0.5 ** n
        if nxt > 0.025:
            break
        k, tail = k + 1, nxt
    return k, n - k + 1, 1 - 2 * tail


def ratio_stats(per_round: list[float]) -> dict:
    """Median of positive per-round values with its order-statistic 95% interval; the geometric
    mean and its Student-t interval (on logs) beside them."""
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.log(np.asarray(per_round, dtype=float))
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError(f"ratios must be positive and finite, got {per_round}")
    ordered = np.sort(np.exp(x))
    lo, hi, coverage = median_interval(x.size)
    mean = float(x.mean())
    half = t975(x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size) if x.size > 1 else 0.0
    return dict(value=float(np.median(ordered)), ci95=[float(ordered[lo - 1]), float(ordered[hi - 1])],
                coverage=coverage, geomean=math.exp(mean), geomean_ci95=[math.exp(mean - half), math.exp(mean + half)],
                n=int(x.size), per_round=[float(v) for v in per_round])
