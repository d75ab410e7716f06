"""The generic section: every benchmark family's training runs, one set of outputs per family.

* ``summary.csv`` / the table of ``summary.md``: one row per run (throughput, MFU/HFU, memory,
  final loss), then the refused records with their reasons, the interleaved comparisons and the
  harness overhead;
* ``loss_vs_flops[-<family>].png``: validation loss against cumulative FLOPs, one panel per
  dataset hash (losses measured on different token streams are not comparable, even when the
  dataset names match);
* ``throughput_memory[-<family>].png``: tokens/s and the exact memory breakdown of every run;
* ``technique_comparison[-<family>].png``/``.csv``: each run normalised to its comparison group's
  baseline, the speed ratio only from interleaved rounds;
* ``interleaved-<name>.png``/``.csv`` per interleaved comparison (:mod:`.interleaved`).

Laying out and rasterising these figures is most of a report's time: they are drawn in forked
workers, one job per family and per comparison (:func:`run_jobs`).
"""
from __future__ import annotations

import concurrent.futures
import json
import math
import multiprocessing
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from ..files import write_text
from .figures import new_figure, run_palette, save_figure
from .interleaved import interleaved_markdown, interleaved_name, interleaved_table, overhead_markdown, plot_interleaved
from .records import MEMORY_COMPONENTS, MIB, Loaded, curve_frame
from .tables import markdown_table, markdown_text, median_ci
from .values import estimate, is_number

# --------------------------------------------------------------------------------------------
# Summary table
# --------------------------------------------------------------------------------------------

def describe_device(kind, name) -> str | None:
    """``"cpu: AMD EPYC ..."`` from the record's device type and name, either of which may lack."""
    parts = [str(p) for p in (kind, name) if p is not None and not pd.isna(p)]
    return ": ".join(parts) or None


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run with the headline numbers, in the run frame's order.

    Numbers are kept at full precision (memory converted to MiB, MFU/HFU as fractions); the
    markdown rendering rounds them for reading.
    """
    table = pd.DataFrame({
        "family": runs["family"],
        "label": runs["run"],
        "model": runs["recipe.model"],
        "params": runs["params"],
        "dataset": runs["dataset_key"],
        "world_size": runs["world_size"],
        "device": [describe_device(k, n) for k, n in zip(runs["device.type"], runs["device.name"])],
        "tokens/s": runs["tokens_per_second"],
        "s/step": runs["seconds_per_step"],
        "s/step median [95% CI]": [median_ci(m, ci) for m, ci in zip(_column(runs, "step_time.median"),
                                                                        _column(runs, "step_time.ci95"))],
        "noisy": [None if v is None or v != v else bool(v) for v in _column(runs, "load.noisy")],
        "MFU": runs["mfu"],
        "HFU": runs["hfu"],
        "peak FLOP/s": runs["peak_flops.value"],
        "peak FLOP/s source": runs["peak_flops.source"],
        **{f"{name} MiB": runs[column] / MIB for column, name in MEMORY_COMPONENTS.items()},
        "peak MiB": runs["memory.peak_bytes"] / MIB,
        "peak kind": runs["memory.peak_kind"],
        "final val loss": runs["final_val_loss"],
        "entropy floor": runs["dataset.entropy_floor"],
    })
    return table.reset_index(drop=True)


def _column(runs: pd.DataFrame, name: str) -> list:
    """A column of the run frame, or Nones for records written before it existed."""
    return list(runs[name]) if name in runs else [None] * len(runs)


def refused_markdown(refused: Sequence[dict]) -> str:
    """The records the report refused to plot, with the reason (markdown); empty if none."""
    if not refused:
        return ""
    lines = ["", "### Refused records (diverged, or failed the consistency check; not plotted)", ""]
    lines += [f"- {markdown_text(r['family'])} / {markdown_text(r['label'])} (`{markdown_text(Path(r['source']).name)}`): "
              + markdown_text("; ".join(r["reasons"])) for r in refused]
    return "\n".join(lines) + "\n"


def peak_log_markdown(out_dir: Path) -> str:
    """The peak FLOP/s probed at the start and end of the benchmark run (``peak.json``, written
    by ``make bench``), as a paragraph under the table; empty when there is no log."""
    try:
        log = json.loads((Path(out_dir) / "peak.json").read_text())
    except (OSError, ValueError):
        return ""
    lines = ["", "Peak FLOP/s probed around the benchmark run (MFU divides by the best probe kept, "
             "never by a lower one taken under load):", ""]
    for phase in ("start", "end"):
        if phase in log:
            p = log[phase]
            peaks = ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in p["peaks"].items())
            kept = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in p.get("kept", {}).items())
            lines.append(f"- {phase} ({p['time']}, 1-min load {p['load1']}): {peaks}"
                         + (f" (denominator kept: {kept} GFLOP/s)" if kept else ""))
    if "drift" in log:
        drift = ", ".join(f"{k} {v:+.1%}" for k, v in log["drift"].items())
        lines.append(f"- drift {drift}: **{'noisy' if log['noisy'] else 'quiet'}** ({log['rule']})")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------

def plot_loss_vs_flops(runs: pd.DataFrame) -> Figure:
    """Validation loss against cumulative FLOPs (log x), one panel per dataset hash.

    Each panel has one line per run and, when the records give one, a dashed line at the
    dataset's entropy floor.  Points without a validation loss are dropped, as is the 0-FLOP
    start point, which a log axis cannot show.
    """
    curves = curve_frame(runs)
    curves = curves[curves["val_loss"].notna() & (curves["flops"] > 0)]
    palette = run_palette(runs)
    hashes = list(dict.fromkeys(runs["dataset.hash"]))

    ncols = max(1, min(len(hashes), 3))
    nrows = max(1, math.ceil(len(hashes) / ncols))
    figure = new_figure(6.0 * ncols, 4.5 * nrows)
    with sns.axes_style("whitegrid"):
        axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(hashes):]:
        ax.remove()

    for ax, digest in zip(axes, hashes):
        dataset_runs = runs[runs["dataset.hash"] == digest]
        points = curves[curves["dataset.hash"] == digest]
        if points.empty:
            ax.text(0.5, 0.5, "no validation points", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set(xticks=[], yticks=[])  # unit ticks on an empty panel would look like data
        else:
            order = [r for r in dataset_runs["run"] if r in set(points["run"])]
            sns.lineplot(data=points, x="flops", y="val_loss", hue="run", hue_order=order,
                         palette={r: palette[r] for r in order}, estimator=None, sort=True,
                         marker="o", markersize=4, ax=ax)
            ax.set_xscale("log")
        floors = dataset_runs["dataset.entropy_floor"].dropna()
        if not floors.empty:
            floor = floors.iloc[0]
            ax.axhline(floor, color="0.25", linestyle="--", linewidth=1.2,
                       label=f"entropy floor (H = {floor:.3f} nats)")
        if ax.get_legend_handles_labels()[0]:
            # Rebuilt after axhline so the floor joins seaborn's run entries.
            ax.legend(title="run", loc="best", fontsize="small", title_fontsize="small")
        # Full specs (every option spelled out) overflow a panel: wrap them; the hash still tells
        # corpora apart.
        ax.set_title("dataset " + textwrap.fill(dataset_runs["dataset_key"].iloc[0], 70), fontsize="small")
        ax.set_xlabel("cumulative training FLOPs (log scale)")
        ax.set_ylabel("validation loss (nats/token)")
    figure.suptitle("Validation loss vs compute")
    return figure


def plot_throughput_memory(runs: pd.DataFrame) -> Figure:
    """Two panels sharing the run axis: tokens/s per run, and the exact memory breakdown
    (params, grads, optimizer state, activations) as stacked bars in MiB with the total."""
    figure = new_figure(14.0, 1.6 + 0.45 * max(len(runs), 1))
    with sns.axes_style("whitegrid"):
        ax_speed, ax_memory = figure.subplots(1, 2, sharey=True)
    order = list(runs["run"])

    sns.barplot(data=runs, y="run", x="tokens_per_second", hue="run", order=order,
                hue_order=order, palette=run_palette(runs), legend=False, ax=ax_speed)
    for bars in ax_speed.containers:
        ax_speed.bar_label(bars, fmt="{:,.0f}", padding=3, fontsize="small")
    ax_speed.margins(x=0.15)
    ax_speed.set_title("Throughput")
    ax_speed.set_xlabel("tokens / second")
    ax_speed.set_ylabel("run")

    # seaborn placed run i at y = i (first run on top); stack the memory bars on the same rows.
    mib = runs[list(MEMORY_COMPONENTS)].reset_index(drop=True) / MIB
    left = np.zeros(len(runs))
    colours = sns.color_palette("Set2", len(MEMORY_COMPONENTS))
    for (column, name), colour in zip(MEMORY_COMPONENTS.items(), colours):
        widths = mib[column].fillna(0.0).to_numpy()
        bars = ax_memory.barh(np.arange(len(runs)), widths, left=left, height=0.8,
                              color=colour, label=name)
        left += widths
    # A total over a missing component would understate memory, so it reads "n/a" instead.
    totals = mib.sum(axis=1, min_count=len(MEMORY_COMPONENTS))
    ax_memory.bar_label(bars, labels=[f"{t:,.2f} MiB" if pd.notna(t) else "n/a" for t in totals],
                        padding=3, fontsize="small")
    ax_memory.margins(x=0.2)
    ax_memory.yaxis.grid(False)  # whitegrid's row lines would run through the stacked bars
    ax_memory.set_title("Exact memory breakdown")
    ax_memory.set_xlabel("MiB")
    ax_memory.legend(title="component", fontsize="small", title_fontsize="small",
                     loc="center left", bbox_to_anchor=(1.01, 0.5))
    return figure


def comparison_key(runs: pd.DataFrame) -> pd.Series:
    """Runs comparable with one another: same model and model_args, data, sequence length, FLOP
    budget, world size, starting weights and masked-LM task (rate and corruption: a masked-LM loss
    at another rate is another task) (batch may differ: accumulation keeps the effective batch with
    smaller ones).  A run started ``--init-from`` trained weights (LoRA) is compared with full
    fine-tuning from the same weights, not with training from scratch."""
    columns = ["recipe.model", "dataset.hash", "recipe.seq_len", "recipe.flops_budget", "world_size",
               "recipe.init_from", "recipe.mlm_rate", "recipe.mlm_corrupt"]
    keys = runs.reindex(columns=columns)
    # model_args change the architecture (an untied embedding is another model): flattened to
    # recipe.model_args.<k> columns, so every such column is part of the key
    args = runs[sorted(c for c in runs.columns if isinstance(c, str) and c.startswith("recipe.model_args"))]
    keys = pd.concat([keys, args], axis=1)
    return pd.Series(["|".join(map(str, row)) for row in keys.itertuples(index=False)], index=runs.index)


def _timing_key(label, mlm_rate, mlm_corrupt) -> tuple:
    """What an interleaved timing of a variant is matched on: its label (model, optimizer,
    techniques) and its masked-LM task -- the same encoder technique is timed once per mask rate,
    and a causal model's defaults (rate 0.15, ``bert``) match records that predate the fields."""
    rate = 0.15 if mlm_rate is None or (isinstance(mlm_rate, float) and math.isnan(mlm_rate)) else float(mlm_rate)
    corrupt = mlm_corrupt if isinstance(mlm_corrupt, str) else "bert"
    return label, round(rate, 6), corrupt


def run_techniques(run) -> list[str]:
    """The recipe's technique specs of a run-frame row (empty for a baseline run)."""
    value = run.get("recipe.techniques")
    return list(value) if isinstance(value, (list, tuple)) else []


def main_technique(run) -> tuple[str, dict]:
    """(name, options) of the run's first technique that is not a reference precision/recompute
    setting -- the technique the run measures (the compression and tokens sections' knob is read
    from its notes and options); ("baseline", {}) for none."""
    from .. import techniques

    specs = []
    for text in run_techniques(run):
        try:
            specs.append(techniques.parse(text))
        except Exception:  # a record of another commit may name a technique this one lacks
            name, _, _ = text.partition(":")
            specs.append(techniques.TechniqueSpec(name, {}))
    if not specs:
        return "baseline", {}
    return specs[0].name, dict(specs[0].options)


def technique_comparison(runs: pd.DataFrame, interleaved: Sequence[dict] = ()) -> pd.DataFrame:
    """Each technique run relative to the baseline of its comparison group (the run without
    techniques, optimizer AdamW): memory components as fractions of the baseline's total exact
    memory, the loss difference at the same FLOP budget, and the speed ratio -- taken only from
    an interleaved comparison (``interleaved`` records, matched by label and masked-LM task:
    rounds A B A B ..., with its 95% interval), never from two separately timed runs; NaN where no
    such timing exists."""
    timed = {}
    for record in interleaved:
        for variant in record.get("variants", {}).values():
            speedup = variant.get("speedup") or {}
            if is_number(estimate(speedup)):
                ci = speedup.get("ci95") or [math.nan, math.nan]
                recipe = variant.get("recipe") or {}
                key = _timing_key(variant.get("label"), recipe.get("mlm_rate"), recipe.get("mlm_corrupt"))
                timed.setdefault(key, (estimate(speedup), ci[0], ci[1]))
    runs = runs.assign(_key=comparison_key(runs))
    is_baseline = runs["recipe.techniques"].map(lambda t: isinstance(t, list) and not t) & (
        runs.get("recipe.optimizer", pd.Series("adamw", index=runs.index)) == "adamw")
    rows = []
    for _, group in runs.groupby("_key", sort=False):
        baselines = group[is_baseline.loc[group.index]]
        if baselines.empty or len(group) < 2:
            continue
        base = baselines.iloc[0]
        base_total = sum(base[c] for c in MEMORY_COMPONENTS)
        for index, run in group.iterrows():
            speed, low, high = timed.get(_timing_key(run.get("label"), run.get("recipe.mlm_rate"),
                                                     run.get("recipe.mlm_corrupt")), (math.nan, math.nan, math.nan))
            if index == base.name and timed:  # the reference itself: 1 by definition
                speed, low, high = 1.0, 1.0, 1.0
            row = {"run": run["run"], "speed ratio": speed, "speed ratio lo": low, "speed ratio hi": high,
                   "loss delta": run["final_val_loss"] - base["final_val_loss"]}
            for column, name in MEMORY_COMPONENTS.items():
                row[f"{name} / baseline memory"] = run[column] / base_total
            rows.append(row)
    return pd.DataFrame(rows)


def plot_technique_comparison(comparison: pd.DataFrame) -> Figure:
    """Three panels per technique, normalised to the baseline: speed ratio, the exact memory
    breakdown as stacked fractions of the baseline's total, and the loss delta at equal FLOPs."""
    figure = new_figure(16.0, 1.6 + 0.42 * max(len(comparison), 1))
    with sns.axes_style("whitegrid"):
        ax_speed, ax_memory, ax_loss = figure.subplots(1, 3, sharey=True)
    y = np.arange(len(comparison))
    speed = comparison["speed ratio"].to_numpy(float)
    timed = np.isfinite(speed)
    if timed.any():
        err = np.abs(np.vstack([speed - comparison["speed ratio lo"], comparison["speed ratio hi"] - speed]))
        ax_speed.errorbar(speed[timed], y[timed], xerr=err[:, timed], fmt="o", color="#4c72b0", capsize=3)
        for yi, value in zip(y[timed], speed[timed]):
            ax_speed.annotate(f"{value:.2f}×", (value, yi), textcoords="offset points", xytext=(6, 4), fontsize="small")
        ax_speed.set_xscale("log")
    for yi in y[~timed]:
        ax_speed.text(0.02, yi, "not timed interleaved", transform=ax_speed.get_yaxis_transform(),
                      va="center", fontsize="small", color="0.4")
    ax_speed.axvline(1.0, color="0.3", linestyle="--", linewidth=1)
    ax_speed.set_yticks(y, comparison["run"])
    ax_speed.invert_yaxis()
    ax_speed.margins(x=0.2)
    ax_speed.set_title("Throughput vs baseline (interleaved rounds, 95% CI)")
    ax_speed.set_xlabel("tokens/s ÷ baseline (log scale)")

    left = np.zeros(len(comparison))
    for (column, name), colour in zip(MEMORY_COMPONENTS.items(), sns.color_palette("Set2", len(MEMORY_COMPONENTS))):
        widths = comparison[f"{name} / baseline memory"].fillna(0.0).to_numpy()
        bars = ax_memory.barh(y, widths, left=left, height=0.8, color=colour, label=name)
        left += widths
    ax_memory.bar_label(bars, labels=[f"{t:.2f}" for t in left], padding=3, fontsize="small")
    ax_memory.axvline(1.0, color="0.3", linestyle="--", linewidth=1)
    ax_memory.margins(x=0.15)
    ax_memory.set_title("Exact memory vs baseline")
    ax_memory.set_xlabel("bytes ÷ baseline total")
    ax_memory.legend(fontsize="small", loc="lower right")

    colours = ["#c44e52" if d > 0 else "#55a868" for d in comparison["loss delta"]]
    ax_loss.barh(y, comparison["loss delta"], color=colours)
    ax_loss.axvline(0.0, color="0.3", linewidth=1)
    ax_loss.bar_label(ax_loss.containers[0], fmt="{:+.3f}", padding=3, fontsize="small")
    ax_loss.margins(x=0.25)
    ax_loss.set_title("Validation loss at the same FLOP budget")
    ax_loss.set_xlabel("loss − baseline loss (nats/token)")
    figure.suptitle("Techniques normalised to the baseline")
    return figure


# --------------------------------------------------------------------------------------------
# The section
# --------------------------------------------------------------------------------------------

def _family_files(group: pd.DataFrame, interleaved: list[dict], out_dir: Path, suffix: str) -> list[Path]:
    """One family's loss-vs-FLOPs, throughput/memory and (with a baseline) technique comparison."""
    written = [save_figure(out_dir / f"loss_vs_flops{suffix}.png", plot_loss_vs_flops(group)),
               save_figure(out_dir / f"throughput_memory{suffix}.png", plot_throughput_memory(group))]
    comparison = technique_comparison(group, interleaved)
    if len(comparison) > 1:
        written += [write_text(out_dir / f"technique_comparison{suffix}.csv", comparison.to_csv(index=False)),
                    save_figure(out_dir / f"technique_comparison{suffix}.png", plot_technique_comparison(comparison))]
    return written


def _interleaved_files(record: dict, out_dir: Path) -> list[Path]:
    name = interleaved_name(record)
    return [write_text(out_dir / f"{name}.csv", interleaved_table(record).to_csv(index=False)),
            save_figure(out_dir / f"{name}.png", plot_interleaved(record))]


def run_jobs(jobs: list[tuple]) -> list[list[Path]]:
    """``[fn(*args) for fn, args in jobs]``, on the machine's cores: laying out and rasterising the
    per-family figures is most of a report's time, and each job writes its own files (atomically).
    Forked workers (this process has run no torch kernel, so no thread pool is copied mid-use);
    results come back in the jobs' order.  One core, or ``ETBENCH_REPORT_WORKERS=1``: in process."""
    workers = min(len(jobs), int(os.environ.get("ETBENCH_REPORT_WORKERS", os.cpu_count() or 1)))
    if workers <= 1 or sys.platform == "win32":
        return [fn(*args) for fn, args in jobs]
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(fn, *args) for fn, args in jobs]
        return [future.result() for future in futures]


class RunsSection:
    """The generic section (:class:`impls.report.section.Section`): the summary table of every
    training run, and per family its figures (one set per family: dozens of runs in one axes would
    be unreadable; no family suffix when the records hold one family only)."""

    name = "runs"

    def frame(self, loaded: Loaded) -> pd.DataFrame:
        return summary_table(loaded.runs)

    def figures(self, frame: pd.DataFrame, loaded: Loaded, out_dir: Path) -> list[Path]:
        runs, interleaved = loaded.runs, loaded.interleaved
        written = [write_text(out_dir / "summary.csv", frame.to_csv(index=False))]
        families = list(dict.fromkeys(runs["family"]))
        multi = len(set(families) | {r["family"] for r in interleaved}) > 1
        jobs = [(_family_files, (runs[runs["family"] == family].reset_index(drop=True),
                                 [r for r in interleaved if r["family"] == family], out_dir,
                                 f"-{family}" if multi else ""))
                for family in families]
        jobs += [(_interleaved_files, (record, out_dir)) for record in interleaved]
        for paths in run_jobs(jobs):
            written += paths
        return written

    def markdown(self, frame: pd.DataFrame, loaded: Loaded) -> str:
        markdown = markdown_table(frame) + refused_markdown(loaded.refused)
        markdown += "".join("\n" + interleaved_markdown(record) for record in loaded.interleaved)
        return markdown + overhead_markdown(loaded.extra)


SECTION = RunsSection()
