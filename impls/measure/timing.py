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
"""
from __future__ import annotations

import os
import time

import numpy as np

LOAD_MARGIN = 0.5
BOOTSTRAP_RESAMPLES = 2000


def step_time_stats(seconds: list[float], seed: int = 0) -> dict:
    """Median and 95% bootstrap interval of the median of ``seconds`` (at least one sample)."""
    x = np.asarray(seconds, dtype=float)
    if x.size == 0:
        raise ValueError("no timed steps")
    median = float(np.median(x))
    if x.size == 1:
        low = high = median
    else:
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
