"""Interleaved comparisons (records of kind ``interleaved``, written by :mod:`impls.compare`): the
variants of one family timed in alternating rounds A B A B ..., so drift of the machine (clock,
load, thermals) hits every variant alike.  The speed-up of a variant is the median over rounds of
the per-round ratio ``baseline s/step ÷ variant s/step`` with its 95% interval; a difference is
claimed only where that interval excludes 1.  Also the harness-overhead records (the training
loop against a bare loop, timed the same way)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from .figures import new_figure
from .records import MEMORY_COMPONENTS
from .values import estimate, is_number
from .tables import markdown_table, markdown_text


def _ci_text(stat: dict | None, fmt: str = "{:.4g}") -> str | None:
    """``"median [lo, hi]"`` of a ``{"median", "ci95"}`` statistic (median alone without CI)."""
    point = estimate(stat)
    if point is None:
        return None
    ci = stat.get("ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return f"{fmt.format(point)} [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"
    return fmt.format(point)


def _ci_bounds(stat: dict | None) -> tuple[float, float]:
    """``(lo, hi)`` of a statistic's 95% interval, NaN where it has none."""
    ci = stat.get("ci95") if isinstance(stat, dict) else None
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return float(ci[0]), float(ci[1])
    return math.nan, math.nan


def interleaved_table(record: dict) -> pd.DataFrame:
    """One row per variant of an interleaved comparison, the baseline first: the estimate over the
    rounds (the record's ``value``: the median) with its 95% interval, the speed-up vs the baseline (per-round ratios) and whether
    its interval excludes 1, and the memory ratios per component."""
    rows = []
    names = sorted(record["variants"], key=lambda n: (n != record["baseline"], n))
    for name in names:
        v = record["variants"][name]
        speed_lo, speed_hi = _ci_bounds(v["speedup"])
        if name == record["baseline"]:
            verdict = "baseline"
        elif math.isnan(speed_lo):
            verdict = "no interval"
        elif speed_lo > 1:
            verdict = "faster"
        elif speed_hi < 1:
            verdict = "slower"
        else:
            verdict = "no clear difference"
        row = {
            "family": record["family"], "variant": name, "label": v["label"],
            "s/step": estimate(v["seconds_per_step"]),
            "s/step [95% CI]": _ci_text(v["seconds_per_step"]),
            "tokens/s": estimate(v["tokens_per_second"]),
            "tokens/s [95% CI]": _ci_text(v["tokens_per_second"], "{:,.0f}"),
            "speedup": estimate(v["speedup"]), "speedup lo": speed_lo, "speedup hi": speed_hi,
            "speedup [95% CI]": _ci_text(v["speedup"], "{:.3f}"),
            "verdict": verdict,
        }
        for column, short in MEMORY_COMPONENTS.items():
            ratio = (v.get("memory_ratio") or {}).get(column.split(".", 1)[1])
            row[f"{short} ratio"] = np.nan if ratio is None else float(ratio)
        rows.append(row)
    return pd.DataFrame(rows)


def interleaved_name(record: dict) -> str:
    """File name stem of a comparison's outputs: ``interleaved-<name>``, the name taken from the
    record's file (``compare-<name>.json``; a family may hold several), else its family.  A name
    that does not start with its family gets it in front (``interleaved-parallel-ws2``): two
    families' ``compare-ws2.json`` would otherwise write the same files, one silently replacing
    the other's."""
    source = record.get("source")
    stem = Path(source).stem if source else ""
    family = record.get("family") or ""
    name = stem[len("compare-"):] if stem.startswith("compare-") else (stem or family or "comparison")
    if family and not name.startswith(family):
        name = f"{family}-{name}"
    return f"interleaved-{name}"


def interleaved_markdown(record: dict) -> str:
    """A paragraph on how the comparison was measured, then its table (markdown)."""
    table = interleaved_table(record)
    columns = ["variant", "label", "s/step [95% CI]", "tokens/s [95% CI]", "speedup [95% CI]", "verdict",
               *[f"{short} ratio" for short in MEMORY_COMPONENTS.values()]]
    load = record.get("load") or {}
    head = (f"### Interleaved comparison: {markdown_text(interleaved_name(record).removeprefix('interleaved-'))} "
            f"(baseline {markdown_text(record['baseline'])})\n\n"
            f"{record.get('rounds', '?')} rounds of {record.get('steps_per_round', '?')} steps per variant, "
            f"run interleaved; {record.get('ci_method', 'interval method not recorded')}. "
            f"Load: {'**noisy**' if load.get('noisy') else 'quiet'}"
            f" (1-min load {load.get('load1_start', '?')} → {load.get('load1_end', '?')}, "
            f"{load.get('cores_in_use', '?')} cores in use).\n\n")
    formats = {f"{short} ratio": "{:.3f}" for short in MEMORY_COMPONENTS.values()}
    return head + markdown_table(table[columns], formats)


def plot_interleaved(record: dict) -> Figure:
    """Speed-up vs the baseline with its 95% interval (log x), and memory ratios per component."""
    table = interleaved_table(record)
    figure = new_figure(14.0, 1.8 + 0.45 * max(len(table), 1))
    with sns.axes_style("whitegrid"):
        ax_speed, ax_memory = figure.subplots(1, 2, sharey=True)
    y = np.arange(len(table))
    speed = table["speedup"].to_numpy()
    lo = np.where(np.isnan(table["speedup lo"]), speed, table["speedup lo"])
    hi = np.where(np.isnan(table["speedup hi"]), speed, table["speedup hi"])
    colours = {"faster": "#55a868", "slower": "#c44e52"}
    ax_speed.barh(y, speed, color=[colours.get(v, "#8c8c8c") for v in table["verdict"]], alpha=0.8)
    ax_speed.errorbar(speed, y, xerr=[speed - lo, hi - speed], fmt="none", ecolor="black", capsize=4)
    ax_speed.axvline(1.0, color="0.3", linestyle="--", linewidth=1)
    for yi, text in zip(y, table["speedup [95% CI]"]):
        ax_speed.annotate(f"{text}×", (hi[yi], yi), xytext=(4, 0), textcoords="offset points",
                          va="center", fontsize="small")
    ax_speed.set_yticks(y, table["label"])
    ax_speed.invert_yaxis()
    ax_speed.margins(x=0.35)
    ax_speed.set_title("Speed-up vs baseline over rounds, 95% CI")
    ax_speed.set_xlabel("baseline s/step ÷ variant s/step")

    components = list(MEMORY_COMPONENTS.values())
    height = 0.8 / len(components)
    for i, (short, colour) in enumerate(zip(components, sns.color_palette("Set2", len(components)))):
        ax_memory.barh(y - 0.4 + height * (i + 0.5), table[f"{short} ratio"].fillna(0.0), height=height,
                       color=colour, label=short)
    ax_memory.axvline(1.0, color="0.3", linestyle="--", linewidth=1)
    ax_memory.set_title("Memory vs baseline, per component")
    ax_memory.set_xlabel("bytes ÷ baseline bytes")
    ax_memory.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    load = record.get("load") or {}
    figure.suptitle(f"{record['family']}: interleaved comparison, {record.get('rounds', '?')} rounds"
                    + (" (NOISY: load exceeded the cores in use)" if load.get("noisy") else ""))
    return figure


def overhead_markdown(records: Sequence[dict]) -> str:
    """The harness-overhead measurements (loop vs bare loop), one line each; empty if none."""
    if not records:
        return ""
    lines = ["", "### Harness overhead (training loop vs a bare loop, interleaved)", ""]
    for r in records:
        o = r["overhead"]
        ci = o.get("ci95") or [math.nan, math.nan]
        lines.append(f"- {markdown_text(r.get('label', '?'))}: {o['value']:+.2%} [{ci[0]:+.2%}, {ci[1]:+.2%}] over "
                     f"{r.get('rounds', '?')} rounds; {r.get('ci_method', '')}")
        mfu = r.get("mfu")
        if isinstance(mfu, dict) and is_number(mfu.get("value")):
            lo, hi = mfu.get("ci95") or [math.nan, math.nan]
            if mfu["value"] > 1:
                lines.append(f"  - MFU {mfu['value']:.1%} exceeds 100%: the peak it was divided by is wrong; not a result")
            else:
                lines.append(f"  - the loop's MFU: {mfu['value']:.1%} [{lo:.1%}, {hi:.1%}] (model FLOPs ÷ median "
                             f"s/step ÷ peak {r['peak_flops']['value'] / 1e9:.1f} GFLOP/s, {r['peak_flops']['source']})")
    return "\n".join(lines) + "\n"
