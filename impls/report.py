"""Reporting: turn etbench run records into a summary table and seaborn plots.

Every training run writes one JSON *run record* (schema 1).  ``make bench`` ends with::

    python -m impls.report RESULTS_DIR_OR_FILES... -o OUT_DIR

which writes into ``OUT_DIR``

* ``summary.csv`` / ``summary.md``: one row per run (throughput, MFU/HFU, memory, final loss);
* ``loss_vs_flops.png``: validation loss against cumulative FLOPs, one panel per dataset;
* ``throughput_memory.png``: tokens/s and the exact memory breakdown of every run.

Runs share an axes only when their dataset *hashes* agree: losses measured on different token
streams are not comparable, even when the dataset names match.  All figures are drawn on the Agg
canvas directly, so importing this module never changes the pyplot backend of the caller.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .files import atomic_path, write_text

SCHEMA_VERSION = 1
MIB = 1 << 20
DPI = 120
#: Characters of the dataset hash shown next to its name; enough to tell datasets apart.
HASH_PREFIX = 12

#: Byte counts of the exact memory breakdown (flattened record fields), in stacking order.
MEMORY_COMPONENTS = {
    "memory.params_bytes": "params",
    "memory.grads_bytes": "grads",
    "memory.optimizer_bytes": "optimizer state",
    "memory.activations_bytes": "activations",
}

# Record fields used as numbers.  A record holding anything else there is rejected when it is
# read, instead of failing halfway through a plot.
_NUMERIC_FIELDS = (
    "params", "world_size", "tokens_per_second", "seconds_per_step", "mfu", "hfu",
    "peak_flops.value", "final_val_loss", "dataset.entropy_floor", "memory.peak_bytes",
    *MEMORY_COMPONENTS,
)
# Text fields the table reads; like the numeric ones they may be absent from a record.
_TEXT_FIELDS = ("recipe.model", "device.type", "device.name", "peak_flops.source",
                "memory.peak_kind")
_POINT_NUMERIC_FIELDS = ("step", "flops", "tokens", "train_loss", "val_loss")
# Run columns repeated on every row of the curve frame.
_CURVE_RUN_COLUMNS = ("run", "label", "dataset_key", "dataset.name", "dataset.hash",
                      "dataset.entropy_floor", "world_size")

# Display format of each numeric column of the markdown summary; the CSV keeps full precision.
_MARKDOWN_FORMATS = {
    "params": "{:,.0f}",
    "world_size": "{:.0f}",
    "tokens/s": "{:,.0f}",
    "s/step": "{:.4g}",
    "MFU": "{:.2%}",
    "HFU": "{:.2%}",
    "peak FLOP/s": "{:.3g}",
    **{f"{name} MiB": "{:,.2f}" for name in MEMORY_COMPONENTS.values()},
    "peak MiB": "{:,.1f}",
    "final val loss": "{:.4f}",
    "entropy floor": "{:.4f}",
}


class RecordError(ValueError):
    """A JSON document that is not a valid run record."""


class RecordWarning(UserWarning):
    """A file was skipped because it is not a valid run record."""


class NoRecordsError(RuntimeError):
    """No valid run record was found, so there is nothing to report."""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def _lookup(record: dict, dotted: str):
    """The value at ``"a.b"`` in a nested record, or None where any level is missing."""
    value = record
    for key in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _is_number(value) -> bool:
    # bool is an int subclass, but ``true`` is never a valid count or rate.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_record(record) -> None:
    """Raise :class:`RecordError` unless ``record`` is a schema-1 run record this module can use.

    Only what the report reads is checked: a label, a dataset name and hash, a curve whose points
    have numeric ``step`` and ``flops``, and numbers (or null) wherever numbers are expected.
    """
    if not isinstance(record, dict):
        raise RecordError("top level is not a JSON object")
    if record.get("schema") != SCHEMA_VERSION:
        raise RecordError(f"schema is {record.get('schema')!r}, expected {SCHEMA_VERSION}")
    for key in ("label", "dataset.name", "dataset.hash"):
        value = _lookup(record, key)
        if not isinstance(value, str) or not value:
            raise RecordError(f"{key!r} is missing or not a non-empty string")
    for key in _NUMERIC_FIELDS:
        value = _lookup(record, key)
        if value is not None and not _is_number(value):
            raise RecordError(f"{key!r} is {value!r}, expected a number or null")
    errors = record.get("consistency_errors")
    if errors is None:  # records written before the check existed: check them here
        from .measure.timing import consistency_errors

        errors = consistency_errors(record)
    if errors:
        raise RecordError("inconsistent record, not plotted: " + "; ".join(map(str, errors)))
    curve = record.get("curve")
    if not isinstance(curve, list):
        raise RecordError("'curve' is missing or not a list")
    for i, point in enumerate(curve):
        if not isinstance(point, dict):
            raise RecordError(f"curve[{i}] is not an object")
        for key in _POINT_NUMERIC_FIELDS:
            value = point.get(key)
            required = key in ("step", "flops")
            if (value is None and required) or (value is not None and not _is_number(value)):
                raise RecordError(f"curve[{i}].{key} is {value!r}, expected a number")


def read_record(path: Path) -> dict:
    """Parse and validate one run record file; raise :class:`RecordError` if it is not one."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"cannot read JSON: {exc}") from exc
    validate_record(record)
    return record


def _find_json_files(paths: Iterable[Path]) -> list[Path]:
    """Files named directly plus every ``*.json`` under the directories, each file once."""
    found: dict[Path, Path] = {}
    for path in map(Path, paths):
        if path.is_dir():
            candidates = sorted(p for p in path.rglob("*.json") if p.is_file())
        elif path.is_file():
            candidates = [path]
        else:
            warnings.warn(f"skipping {path}: no such file or directory", RecordWarning,
                          stacklevel=3)
            continue
        for candidate in candidates:
            # A file reached through two arguments must not count as two runs.
            found.setdefault(candidate.resolve(), candidate)
    return list(found.values())


def load_records(paths: Sequence[Path]) -> pd.DataFrame:
    """Load run records from files and directories (searched recursively for ``*.json``).

    Files that are not valid run records are skipped with a :class:`RecordWarning` naming the
    file.  Returns the run frame of :func:`records_frame` (empty if nothing valid was found).
    """
    records, sources = [], []
    for path in _find_json_files(paths):
        try:
            records.append(read_record(path))
        except RecordError as exc:
            warnings.warn(f"skipping {path}: {exc}", RecordWarning, stacklevel=2)
            continue
        sources.append(path)
    return records_frame(records, sources)


def _unique_run_names(labels: Sequence[str], sources: Sequence[Path | None]) -> list[str]:
    """Display names: the label, with the record's file stem appended when several runs share
    it, so no two runs merge into one line or bar; a counter settles any remaining tie."""
    counts = Counter(labels)
    names = [label if counts[label] == 1 or source is None else f"{label} ({Path(source).stem})"
             for label, source in zip(labels, sources)]
    counts, seen, unique = Counter(names), Counter(), []
    for name in names:
        if counts[name] > 1:
            seen[name] += 1
            name = f"{name} #{seen[name]}"
        unique.append(name)
    return unique


def records_frame(records: Iterable[dict],
                  sources: Iterable[Path | None] | None = None) -> pd.DataFrame:
    """One row per run, nested fields flattened to dotted columns (``"memory.params_bytes"``).

    Added columns: ``run`` (unique display name, see :func:`_unique_run_names`), ``dataset_key``
    (``"name [hash prefix]"``), ``source`` (the record's file, if known) and ``curve`` (the raw
    list of curve points).  Every field the report reads is present, NaN/None where a record
    lacks it.  Rows are sorted by dataset, then run, so runs to compare sit together.
    """
    records = list(records)
    for record in records:
        validate_record(record)
    sources = list(sources) if sources is not None else [None] * len(records)

    runs = pd.json_normalize([{k: v for k, v in r.items() if k != "curve"} for r in records])
    for column in _NUMERIC_FIELDS:
        runs[column] = pd.to_numeric(runs[column]) if column in runs else np.nan
    for column in ("label", "dataset.name", "dataset.hash", *_TEXT_FIELDS):
        if column not in runs:
            runs[column] = None

    runs["run"] = _unique_run_names(list(runs["label"]), sources)
    runs["dataset_key"] = [f"{name} [{digest[:HASH_PREFIX]}]"
                           for name, digest in zip(runs["dataset.name"], runs["dataset.hash"])]
    runs["source"] = [str(s) if s is not None else None for s in sources]
    # The benchmark family is the folder a record sits in (results/runs/<commit>/<family>/).
    runs["family"] = [Path(s).parent.name if s is not None else "runs" for s in sources]
    runs["curve"] = pd.Series([r["curve"] for r in records], index=runs.index, dtype=object)
    return runs.sort_values(["family", "dataset_key", "run"], kind="stable").reset_index(drop=True)


def curve_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """Tidy long-form curves: one row per curve point of every run in ``runs``.

    Columns: the run's ``run``, ``label``, ``dataset_key``, ``dataset.name``, ``dataset.hash``,
    ``dataset.entropy_floor`` and ``world_size``, then the point fields ``step``, ``flops``,
    ``tokens``, ``train_loss``, ``val_loss`` (NaN where null) and any extra point fields.
    """
    pieces = []
    for _, run in runs.iterrows():
        points = pd.DataFrame(run["curve"])
        extra = [c for c in points.columns if c not in _POINT_NUMERIC_FIELDS]
        points = points.reindex(columns=[*_POINT_NUMERIC_FIELDS, *extra])
        for column in reversed(_CURVE_RUN_COLUMNS):
            points.insert(0, column, run[column])
        pieces.append(points)
    if not pieces:
        return pd.DataFrame(columns=[*_CURVE_RUN_COLUMNS, *_POINT_NUMERIC_FIELDS])
    curves = pd.concat(pieces, ignore_index=True)
    for column in _POINT_NUMERIC_FIELDS:
        # null losses arrive as None in object columns; NaN keeps them plottable and droppable.
        curves[column] = pd.to_numeric(curves[column])
    return curves


# --------------------------------------------------------------------------------------------
# Summary table
# --------------------------------------------------------------------------------------------

def _describe_device(kind, name) -> str | None:
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
        "device": [_describe_device(k, n) for k, n in zip(runs["device.type"], runs["device.name"])],
        "tokens/s": runs["tokens_per_second"],
        "s/step": runs["seconds_per_step"],
        "s/step median [95% CI]": [_median_ci(m, ci) for m, ci in zip(_column(runs, "step_time.median"),
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


def _median_ci(median, ci) -> str | None:
    if median is None or median != median or not isinstance(ci, (list, tuple)):
        return None
    return f"{median:.4g} [{ci[0]:.4g}, {ci[1]:.4g}]"


def _markdown_cell(value, fmt: str | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = fmt.format(value) if fmt else str(value)
    # A bare "|" would split the cell; labels and device names are free text.
    return text.replace("|", r"\|")


def markdown_table(table: pd.DataFrame) -> str:
    """GitHub-flavoured markdown for :func:`summary_table`, numeric columns right-aligned."""
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---:" if c in _MARKDOWN_FORMATS else "---" for c in table.columns) + "|"
    rows = ["| " + " | ".join(_markdown_cell(v, _MARKDOWN_FORMATS.get(c))
                              for c, v in zip(table.columns, row)) + " |"
            for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------

def _new_figure(width: float, height: float) -> Figure:
    """A figure on the non-interactive Agg canvas, independent of pyplot's global state."""
    figure = Figure(figsize=(width, height), dpi=DPI, layout="tight")
    FigureCanvasAgg(figure)
    return figure


def _run_palette(runs: pd.DataFrame) -> dict[str, tuple]:
    """One colour per run, shared by all figures so a run looks the same everywhere."""
    names = list(runs["run"])
    return dict(zip(names, sns.color_palette("tab10" if len(names) <= 10 else "husl",
                                             len(names))))


def plot_loss_vs_flops(runs: pd.DataFrame) -> Figure:
    """Validation loss against cumulative FLOPs (log x), one panel per dataset hash.

    Each panel has one line per run and, when the records give one, a dashed line at the
    dataset's entropy floor.  Points without a validation loss are dropped, as is the 0-FLOP
    start point, which a log axis cannot show.
    """
    curves = curve_frame(runs)
    curves = curves[curves["val_loss"].notna() & (curves["flops"] > 0)]
    palette = _run_palette(runs)
    hashes = list(dict.fromkeys(runs["dataset.hash"]))

    ncols = max(1, min(len(hashes), 3))
    nrows = max(1, math.ceil(len(hashes) / ncols))
    figure = _new_figure(6.0 * ncols, 4.5 * nrows)
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
    figure = _new_figure(14.0, 1.6 + 0.45 * max(len(runs), 1))
    with sns.axes_style("whitegrid"):
        ax_speed, ax_memory = figure.subplots(1, 2, sharey=True)
    order = list(runs["run"])

    sns.barplot(data=runs, y="run", x="tokens_per_second", hue="run", order=order,
                hue_order=order, palette=_run_palette(runs), legend=False, ax=ax_speed)
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


def _comparison_key(runs: pd.DataFrame) -> pd.Series:
    """Runs comparable with one another: same model, data, sequence length, FLOP budget and
    world size (batch may differ: accumulation keeps the effective batch with smaller ones)."""
    columns = ["recipe.model", "dataset.hash", "recipe.seq_len", "recipe.flops_budget", "world_size"]
    keys = runs.reindex(columns=columns)
    return pd.Series(["|".join(map(str, row)) for row in keys.itertuples(index=False)], index=runs.index)


def technique_comparison(runs: pd.DataFrame) -> pd.DataFrame:
    """Each technique run relative to the baseline of its comparison group (the run without
    techniques, optimizer AdamW): throughput ratio, memory components as fractions of the
    baseline's total exact memory, and the loss difference at the same FLOP budget."""
    runs = runs.assign(_key=_comparison_key(runs))
    is_baseline = runs["recipe.techniques"].map(lambda t: isinstance(t, list) and not t) & (
        runs.get("recipe.optimizer", pd.Series("adamw", index=runs.index)) == "adamw")
    rows = []
    for _, group in runs.groupby("_key", sort=False):
        baselines = group[is_baseline.loc[group.index]]
        if baselines.empty or len(group) < 2:
            continue
        base = baselines.iloc[0]
        base_total = sum(base[c] for c in MEMORY_COMPONENTS)
        for _, run in group.iterrows():
            row = {"run": run["run"], "speed ratio": run["tokens_per_second"] / base["tokens_per_second"],
                   "loss delta": run["final_val_loss"] - base["final_val_loss"]}
            for column, name in MEMORY_COMPONENTS.items():
                row[f"{name} / baseline memory"] = run[column] / base_total
            rows.append(row)
    return pd.DataFrame(rows)


def plot_technique_comparison(comparison: pd.DataFrame) -> Figure:
    """Three panels per technique, normalised to the baseline: speed ratio, the exact memory
    breakdown as stacked fractions of the baseline's total, and the loss delta at equal FLOPs."""
    figure = _new_figure(16.0, 1.6 + 0.42 * max(len(comparison), 1))
    with sns.axes_style("whitegrid"):
        ax_speed, ax_memory, ax_loss = figure.subplots(1, 3, sharey=True)
    y = np.arange(len(comparison))
    ax_speed.barh(y, comparison["speed ratio"], color="#4c72b0")
    ax_speed.axvline(1.0, color="0.3", linestyle="--", linewidth=1)
    ax_speed.bar_label(ax_speed.containers[0], fmt="{:.2f}×", padding=3, fontsize="small")
    ax_speed.set_yticks(y, comparison["run"])
    ax_speed.invert_yaxis()
    ax_speed.margins(x=0.2)
    ax_speed.set_title("Throughput vs baseline")
    ax_speed.set_xlabel("tokens/s ÷ baseline (log scale)")
    ax_speed.set_xscale("log")

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
# Writing
# --------------------------------------------------------------------------------------------

def _write_figure(destination: Path, figure: Figure) -> Path:
    with atomic_path(destination) as temporary:
        figure.savefig(temporary, format="png", dpi=DPI)
    return destination


def write_report(paths: Sequence[Path], out_dir: Path) -> list[Path]:
    """Load the records under ``paths`` and write the summary and plots into ``out_dir``.

    Every file is written atomically.  Returns the written paths; raises
    :class:`NoRecordsError` when no valid record is found.
    """
    paths = [Path(p) for p in paths]
    runs = load_records(paths)
    if runs.empty:
        looked = ", ".join(str(p) for p in paths) or "(no paths given)"
        raise NoRecordsError(f"no valid run records found in {looked} "
                             "(searched recursively for *.json)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = summary_table(runs)
    written = [write_text(out_dir / "summary.csv", table.to_csv(index=False)),
               write_text(out_dir / "summary.md", markdown_table(table) + _peak_log_markdown(out_dir))]
    # One set of plots per benchmark family: dozens of runs in one axes would be unreadable.
    families = list(dict.fromkeys(runs["family"]))
    for family in families:
        group = runs[runs["family"] == family].reset_index(drop=True)
        suffix = f"-{family}" if len(families) > 1 else ""
        written += [_write_figure(out_dir / f"loss_vs_flops{suffix}.png", plot_loss_vs_flops(group)),
                    _write_figure(out_dir / f"throughput_memory{suffix}.png", plot_throughput_memory(group))]
        comparison = technique_comparison(group)
        if len(comparison) > 1:
            written += [write_text(out_dir / f"technique_comparison{suffix}.csv", comparison.to_csv(index=False)),
                        _write_figure(out_dir / f"technique_comparison{suffix}.png",
                                      plot_technique_comparison(comparison))]
    return written


def _peak_log_markdown(out_dir: Path) -> str:
    """The peak FLOP/s probed at the start and end of the benchmark run (``peak.json``, written
    by ``make bench``), as a paragraph under the table; empty when there is no log."""
    try:
        log = json.loads((Path(out_dir) / "peak.json").read_text())
    except (OSError, ValueError):
        return ""
    lines = ["", "Peak FLOP/s probed around the benchmark run (the MFU denominator):", ""]
    for phase in ("start", "end"):
        if phase in log:
            p = log[phase]
            peaks = ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in p["peaks"].items())
            lines.append(f"- {phase} ({p['time']}, 1-min load {p['load1']}): {peaks}")
    if "drift" in log:
        drift = ", ".join(f"{k} {v:+.1%}" for k, v in log["drift"].items())
        lines.append(f"- drift {drift}: **{'noisy' if log['noisy'] else 'quiet'}** ({log['rule']})")
    return "\n".join(lines) + "\n"


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Show a warning as one plain line on stderr; the source line is noise on a CLI."""
    print(f"warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m impls.report RESULTS_DIR_OR_FILES... -o OUT_DIR``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m impls.report",
        description="Summarise etbench run records as a table (CSV, markdown) and PNG plots.")
    parser.add_argument("paths", nargs="+", type=Path, metavar="RESULTS_DIR_OR_FILE",
                        help="run record files, or directories searched recursively for *.json")
    parser.add_argument("-o", "--out", type=Path, required=True, metavar="OUT_DIR",
                        help="directory the report is written to (created if missing)")
    args = parser.parse_args(argv)

    with warnings.catch_warnings():
        warnings.simplefilter("always", RecordWarning)
        warnings.showwarning = _print_warning
        try:
            written = write_report(args.paths, args.out)
        except NoRecordsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
