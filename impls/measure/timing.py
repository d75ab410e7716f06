"""Step-time statistics, machine load, and the consistency checks a record must pass.

One mean of step times hides how noisy they were.  A record keeps every timed step (after the
warm-up) and summarises them by the median with a 95% confidence interval obtained by a
percentile bootstrap of the median (Efron & Tibshirani 1993, ch. 13): resample the timed steps
with replacement, take each resample's median, report the 2.5th and 97.5th percentiles.  It is a
*within-run* interval: steps of one run share the machine's state, so load that lasts the whole
run shifts all of them alike and is not in the interval — that is what the load flag and
interleaved comparisons (several runs, A B A B …) are for.

Load: the 1-minute load average at the start and the end of the run, against the cores the run
uses (threads per rank × ranks on this machine).  The run's own threads contribute about that
many runnable tasks, so the run is flagged ``noisy`` when the load exceeds the cores in use by
more than :data:`LOAD_MARGIN` (another CPU-bound process on one core adds ~1).

Consistency: MFU and HFU are fractions of a peak; a value above 1 means the peak in the
denominator is wrong (typically a probe taken while the machine was busy), never that the run
beat the hardware.  :func:`consistency_errors` names every such violation; the record carries
them and the report refuses to plot such a record.
"""
from __future__ import annotations

import os

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


def load_report(start: float | None, end: float | None, cores_in_use: int) -> dict:
    """The run's load figures and its ``noisy`` flag (None when the OS reports no load)."""
    loads = [v for v in (start, end) if v is not None]
    noisy = None if not loads else max(loads) > cores_in_use + LOAD_MARGIN
    return dict(load1_start=start, load1_end=end, cores_in_use=cores_in_use, cpu_count=os.cpu_count(),
                noisy=noisy, rule=f"noisy when the 1-min load exceeds the cores in use by > {LOAD_MARGIN}")


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
