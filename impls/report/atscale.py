"""The report's at-scale section (issue 24): what the big zoo models hold per rank on 8 to 512
ranks, measured by dry runs against the formulas, and how well the planner's step-time model
ranks layouts on this machine.

Its inputs are *cached artefacts*, not records of ``make bench``: a dry-run sweep
(``etbench dryrun-sweep --out``, kind :data:`impls.families.DRYRUN_SWEEP`: one rank of each run
built and stepped once on fake tensors under the fake process group, so a 70B model on 512 ranks
costs seconds and no memory) and the planner's calibration (``etbench plan-calibrate``, kind
:data:`impls.families.PLAN_CALIBRATION`: predicted against measured step times of small layouts).
Both take minutes to hours to write and do not change with a benchmark run, so they are committed
under ``results/atscale/`` and read from there:

* artefacts given to the report as paths (``etbench report RUNS results/atscale -o OUT``: routed
  by kind into :attr:`impls.report.records.Loaded.atscale`) are used as given;
* otherwise the section looks for the folder ``atscale/`` beside the ``runs`` folder its records
  sit in (``results/runs/<commit>/...`` -> ``results/atscale/``), which is what ``make bench``
  and the site's build see;
* where neither holds an artefact, ``summary.md`` says where it looked, in one line.

Outputs, only where there is data: ``atscale_sweep.csv`` (per model × world size × layout: this
rank's params/grads/optimizer bytes against the ZeRO formula, the saved activations of one
micro-batch against the planner's, the step's traffic against its formula, each ratio as the
sweep wrote it, the sweep's explanation of a ratio outside its tolerance, skipped points with
their reason), ``atscale_memory.png`` (bytes per rank by layout), ``atscale_calibration.csv`` and
``atscale_calibration.png`` (predicted vs measured step time, the 95% interval of each
measurement, and the record's Spearman ρ and errors in the title).
"""
from __future__ import annotations

import json
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from matplotlib.ticker import ScalarFormatter

from .. import families
from ..files import write_text
from .figures import new_figure, palette, save_figure
from .records import ATSCALE_KINDS, Loaded, RecordError, RecordWarning, validate_atscale
from .tables import markdown_safe, markdown_text
from .values import first_number, is_number

#: The folder of the artefacts, beside the ``runs`` folder of the records (``results/atscale``).
ATSCALE_DIR = "atscale"
RUNS_DIR = "runs"
#: Model-state components of a sweep row, in stacking order, then the saved activations.
STATE_PARTS = ("params", "grads", "optimizer")
MEMORY_PARTS = (*STATE_PARTS, "activations")
#: Each measured quantity of a sweep row: (measured, predicted, ratio) columns, the sweep's own
#: names (the ratios of params, grads and optimizer sit in its ``model_states_ratios``), and what
#: predicts it.
CHECKS = {
    "params": ("params_bytes", "params_formula_bytes", "params_ratio", "ZeRO formula"),
    "grads": ("grads_bytes", "grads_formula_bytes", "grads_ratio", "ZeRO formula"),
    "optimizer": ("optimizer_bytes", "optimizer_formula_bytes", "optimizer_ratio", "ZeRO formula"),
    "model states": ("model_states_bytes", "model_states_formula_bytes", "model_states_ratio", "ZeRO formula"),
    "activations": ("activation_bytes", "predicted_activation_bytes", "activation_ratio", "planner"),
    "traffic": ("traffic_bytes", "traffic_formula_bytes", "traffic_ratio", "traffic formula"),
}
#: The columns of :data:`MEMORY_PARTS` in a sweep frame.
MEMORY_COLUMNS = {part: CHECKS[part][0] for part in MEMORY_PARTS}
#: The planner's predicted step time by term (``predicted_components`` of a calibration row).
TIME_TERMS = ("compute", "tp_comm", "pp_p2p", "bubble", "dp_comm_exposed")
FILES = ("atscale_sweep.csv", "atscale_memory.png", "atscale_calibration.csv", "atscale_calibration.png")


class Artefacts(NamedTuple):
    """The at-scale artefacts found for a report: ``sweeps`` and ``calibrations`` (documents with
    ``source``), ``folder``: the folder read (None where the artefacts came as the report's paths,
    or no folder was found), ``skipped``: files there that are no usable artefact, each
    ``{"source", "reason"}``."""

    sweeps: list[dict]
    calibrations: list[dict]
    folder: Path | None
    skipped: list[dict]

    def empty(self) -> bool:
        return not self.sweeps and not self.calibrations

    def folders(self) -> list[str]:
        """The folders the artefacts were read from."""
        return sorted({str(Path(d["source"]).parent) for d in (*self.sweeps, *self.calibrations)})


def absent_note(found: Artefacts) -> str:
    """The one line saying where the section looked for artefacts and found none."""
    if found.folder is None:
        return (f"No at-scale artefacts: the records are under no {RUNS_DIR}/ folder, so there is no {ATSCALE_DIR}/ "
                f"beside it to read (give the artefacts as paths: etbench report RUNS results/{ATSCALE_DIR}).")
    return (f"No at-scale artefacts ({', '.join(ATSCALE_KINDS)}) in {found.folder}: etbench dryrun-sweep --out and "
            f"etbench plan-calibrate --out write them there.")


def record_sources(loaded: Loaded) -> list[Path]:
    """Every file the report read (records of any kind, and those it skipped)."""
    sources = list(loaded.runs["source"]) if "source" in loaded.runs else []
    for group in (loaded.refused, loaded.interleaved, loaded.extra, loaded.comm, loaded.storage, loaded.skipped):
        sources += [entry.get("source") for entry in group]
    return [Path(s) for s in sources if isinstance(s, str) and s]


def find_folder(loaded: Loaded) -> Path | None:
    """``atscale/`` beside the ``runs`` folder the records sit in: the nearest ancestor of a
    record named ``runs``, its sibling.  None where no record is under a ``runs`` folder (an
    arbitrary folder of records has no defined neighbour, so nothing is guessed)."""
    for source in record_sources(loaded):
        for ancestor in source.resolve().parents:
            if ancestor.name == RUNS_DIR:
                return ancestor.parent / ATSCALE_DIR
    return None


def read_folder(folder: Path) -> tuple[list[dict], list[dict]]:
    """The artefacts among the ``*.json`` files directly in ``folder`` (name order), and the
    files of an at-scale kind that do not read, with the reason (warned about too).  Files of
    other kinds are left alone: the folder may hold other commands' outputs; so are hidden ones
    (a sweep being written replaces its file through a hidden temporary beside it)."""
    found, skipped = [], []
    for path in sorted(Path(folder).glob("*.json")) if Path(folder).is_dir() else ():
        if path.name.startswith("."):  # an atomic write's temporary, or a lock: never an artefact
            continue
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            skipped.append({"source": str(path), "reason": f"cannot read JSON: {exc}"})
            continue
        if not isinstance(document, dict) or document.get("kind") not in ATSCALE_KINDS:
            continue
        try:
            validate_atscale(document)
        except RecordError as exc:
            skipped.append({"source": str(path), "reason": str(exc)})
            continue
        found.append({**document, "source": str(path), "family": Path(folder).name})
    for entry in skipped:
        warnings.warn(f"skipping {entry['source']}: {entry['reason']}", RecordWarning, stacklevel=2)
    return found, skipped


def artefacts(loaded: Loaded, folder: Path | None = None) -> Artefacts:
    """The section's artefacts: those in ``folder`` when given, else the ones given to the report
    as paths, else those of :func:`find_folder`."""
    if folder is None and loaded.atscale:
        found, skipped = list(loaded.atscale), []
    else:
        folder = folder if folder is not None else find_folder(loaded)
        if folder is None:
            return Artefacts([], [], None, [])
        found, skipped = read_folder(folder)
    sweeps = [d for d in found if d.get("kind") == families.DRYRUN_SWEEP]
    calibrations = [d for d in found if d.get("kind") == families.PLAN_CALIBRATION]
    return Artefacts(sweeps, calibrations, folder, skipped)


# --------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------

def _ratio(given, measured, formula):
    """The ratio the artefact wrote; measured ÷ formula where it wrote none."""
    value = first_number(given)
    if value is not None:
        return value
    measured, formula = first_number(measured), first_number(formula)
    return measured / formula if measured is not None and formula else None


def mesh_text(mesh) -> str | None:
    """``pp2·dp4·tp8``: the mesh dimensions larger than 1, outermost first (``dp1`` for none)."""
    if not isinstance(mesh, dict) or not mesh:  # a skipped point has none
        return None
    parts = [f"{k}{mesh[k]}" for k in ("pp", "dp", "cp", "tp") if is_number(mesh.get(k)) and mesh[k] > 1]
    return "·".join(parts) or "dp1"


def _outside(row: dict, tolerance) -> str:
    """The checks of a row whose ratio is further than the sweep's tolerance from 1 (the sweep
    explains those of the model states and the traffic; the activations' are flagged alike)."""
    if not is_number(tolerance):
        return ""
    return ", ".join(name for name in ("model states", "traffic", "activations")
                     if is_number(row.get(CHECKS[name][2])) and abs(row[CHECKS[name][2]] - 1) > tolerance)


def sweep_rows(sweep: dict) -> list[dict]:
    """One flat row per point of a sweep (skipped points with their reason and no numbers)."""
    out = []
    for raw in sweep.get("rows") or []:
        mesh = raw.get("mesh") or {}
        row = {"model": raw["model"], "world_size": int(raw["world_size"]), "layout": raw["layout"],
               "mesh": mesh_text(mesh), **{k: mesh.get(k) for k in ("pp", "dp", "tp")},
               "params": raw.get("params"), "precision": raw.get("precision")}
        ratios = raw.get("model_states_ratios") or {}
        for name, (measured, formula, ratio, _) in CHECKS.items():
            row[measured], row[formula] = raw.get(measured), raw.get(formula)
            given = ratios.get(name) if name in STATE_PARTS else raw.get(ratio)
            row[ratio] = _ratio(given, raw.get(measured), raw.get(formula))
        row.update(peak_bytes=raw.get("peak_bytes"), wall_seconds=raw.get("wall_seconds"),
                   outside_tolerance=_outside(row, sweep.get("tolerance")), explanation=raw.get("explanation"),
                   substituted=raw.get("substituted"), skipped=raw.get("skipped"),
                   batch_size=sweep.get("batch_size"), seq_len=sweep.get("seq_len"), rank=raw.get("rank"),
                   tolerance=sweep.get("tolerance"), git_commit=sweep.get("git_commit"), source=sweep.get("source"))
        out.append(row)
    return out


def sweep_frame(sweeps: list[dict]) -> pd.DataFrame:
    """Every point of the sweeps, ordered by model (as the sweeps list them), world size and
    layout (the sweep's own layout order)."""
    rows = [row for sweep in sweeps for row in sweep_rows(sweep)]
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    layouts = list(dict.fromkeys([name for s in sweeps for name in (s.get("layouts") or {})] + list(frame["layout"])))
    models = list(dict.fromkeys(frame["model"]))
    order = frame.assign(_m=frame["model"].map(models.index), _l=frame["layout"].map(layouts.index))
    return order.sort_values(["_m", "world_size", "_l"], kind="stable").drop(columns=["_m", "_l"]).reset_index(drop=True)


def calibration_label(record: dict) -> str:
    """The machine a calibration measured, as a short label (its CPU or device, and the cores)."""
    machine = record.get("machine") or {}
    name = machine.get("device") or machine.get("cpu") or machine.get("name") or Path(record.get("source", "?")).stem
    cores = machine.get("cores")
    return f"{name}, {cores} cores" if is_number(cores) else str(name)


def calibration_rows(record: dict) -> list[dict]:
    """One flat row per layout × world size of a calibration (unmeasured ones with their error)."""
    out = []
    for raw in record.get("rows") or []:
        ci = raw.get("measured_ci") if isinstance(raw.get("measured_ci"), list) else [None, None]
        components = raw.get("predicted_components") or {}
        load = raw.get("load") or {}
        out.append({"machine": calibration_label(record), "model": raw["model"], "name": raw.get("name"),
                    "layout": raw["layout"], "world_size": int(raw["world_size"]),
                    "predicted_seconds": first_number(raw.get("predicted_seconds")),
                    "measured_seconds": first_number(raw.get("measured_seconds")),
                    "ci_low": first_number(*ci[:1]), "ci_high": first_number(*ci[1:2]), "n": raw.get("n"),
                    "ratio": _ratio(raw.get("ratio"), raw.get("measured_seconds"), raw.get("predicted_seconds")),
                    "log_ratio": first_number(raw.get("log_ratio")), "fit": bool(raw.get("fit")),
                    "noisy": load.get("noisy"), "error": raw.get("error"),
                    **{f"predicted_{term}_seconds": first_number(components.get(term)) for term in TIME_TERMS},
                    "git_commit": record.get("git_commit"), "source": record.get("source")})
    return out


def calibration_frame(calibrations: list[dict]) -> pd.DataFrame:
    """Every row of the calibrations, in each file's order."""
    return pd.DataFrame([row for record in calibrations for row in calibration_rows(record)])


def calibration_summary(record: dict) -> dict:
    """What a calibration concludes, as the record states it: Spearman's ρ over the measured rows
    (and per world size), the median and largest |ln(measured/predicted)| over the rows not used
    for the fit, the worst layout, the MFU fit and the record's notes."""
    hardware = record.get("hardware") or {}
    skipped = record.get("skipped")
    return {"machine": calibration_label(record), "spearman": first_number(record.get("spearman")),
            "spearman_n": record.get("spearman_n"), "spearman_by_world_size": record.get("spearman_by_world_size") or {},
            "median_abs_error": first_number(record.get("median_abs_error")),
            "max_abs_error": first_number(record.get("max_abs_error")), "worst_layout": record.get("worst_layout"),
            "median_abs_pct_error": first_number(record.get("median_abs_pct_error")), "error_n": record.get("error_n"),
            "mfu": first_number(hardware.get("mfu")), "mfu_source": hardware.get("mfu_source"),
            "skipped": [s for s in skipped if isinstance(s, dict)] if isinstance(skipped, list) else [],
            "notes": record.get("notes"),
            "source": record.get("source")}


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------

def _number(value, fmt: str = ".3f") -> str:
    return format(value, fmt) if value is not None else "n/a"


def bytes_text(value) -> str | None:
    """Bytes in the largest binary unit that keeps the number ≥ 1."""
    value = first_number(value)
    if value is None:
        return None
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def written_date(record: dict) -> str:
    """When the artefact was written: its own ``date`` where it has one, else the file's
    modification time (a checkout's, where git wrote the file)."""
    for key in ("date", "created", "written_at"):
        if isinstance(record.get(key), str):
            return record[key]
    try:
        stamp = Path(record["source"]).stat().st_mtime
    except (OSError, KeyError):
        return "date unknown"
    return "file modified " + datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def provenance_text(record: dict) -> str:
    """One artefact's provenance: its file, the commit (and whether the tree had uncommitted
    changes), torch, when it was written and, for a calibration, the machine it measured."""
    commit = str(record.get("git_commit") or "unknown")[:12]
    dirty = " with uncommitted changes" if record.get("git_dirty") else ""
    torch = (record.get("versions") or {}).get("torch")
    machine = f"; measured on {calibration_label(record)}" if record.get("kind") == families.PLAN_CALIBRATION else ""
    return (f"{Path(record['source']).name}: commit {commit}{dirty}" + (f", torch {torch}" if torch else "")
            + f", {written_date(record)}{machine}")


def _sweep_table(frame: pd.DataFrame) -> str:
    done = frame[frame["skipped"].isna()] if "skipped" in frame else frame
    table = pd.DataFrame({
        "model": done["model"], "N": done["world_size"], "layout": done["layout"], "mesh": done["mesh"],
        "model states": done["model_states_bytes"].map(bytes_text), "states ÷ formula": done["model_states_ratio"],
        "activations": done["activation_bytes"].map(bytes_text), "activations ÷ planner": done["activation_ratio"],
        "traffic / step": done["traffic_bytes"].map(bytes_text), "traffic ÷ formula": done["traffic_ratio"],
        "outside tolerance": done["outside_tolerance"].fillna(""),
        "explained": done["explanation"].map(lambda e: "yes, below" if isinstance(e, str) else "")})
    return markdown_safe(table).to_markdown(index=False, floatfmt=".4f")


def sweep_markdown(frame: pd.DataFrame, sweeps: list[dict]) -> list[str]:
    """The sweep's part of the section: what it is, its table, its explanations and skipped points."""
    first = sweeps[0]
    parts = [f"Dry runs (`etbench dryrun-sweep`): rank {first.get('rank', 0)} of each run, batch "
             f"{first.get('batch_size')} × {first.get('seq_len')} tokens, built and stepped once on fake tensors; "
             f"per-rank model states against the ZeRO formula, the saved activations of one micro-batch against the "
             f"planner's, the step's traffic against its formula (tolerance ±{_number(first_number(first.get('tolerance')), '.0%')}).",
             "", *[f"- {markdown_text(provenance_text(s))}" for s in sweeps], ""]
    done = frame[frame["skipped"].isna()]
    if not done.empty:
        parts += [_sweep_table(frame), ""]
    for row in done[done["explanation"].notna()].to_dict("records"):
        parts.append(f"- {markdown_text(row['model'])} {markdown_text(row['layout'])} N={row['world_size']}: "
                     f"{markdown_text(row['explanation'])}")
    for row in frame[frame["skipped"].notna()].to_dict("records"):
        parts.append(f"- skipped {markdown_text(row['model'])} {markdown_text(row['layout'])} "
                     f"N={row['world_size']}: {markdown_text(row['skipped'])}")
    return [*parts, ""]


def short_summary(summary: dict) -> str:
    """Spearman's ρ and the median error of one calibration, for a figure's title."""
    n = summary["spearman_n"] if summary["spearman_n"] is not None else "?"
    return (f"Spearman ρ {_number(summary['spearman'], '.2f')} ({n} rows), median "
            f"|ln(measured/predicted)| {_number(summary['median_abs_error'], '.2f')}")


def summary_line(summary: dict) -> str:
    """Spearman's ρ and the errors of one calibration, as its record states them."""
    number = _number
    by_size = ", ".join(f"ws{n} {number(first_number(v))}" for n, v in summary["spearman_by_world_size"].items())
    return (f"{summary['machine']}: Spearman ρ {number(summary['spearman'])} over {summary['spearman_n'] or 0} "
            f"measured rows" + (f" ({by_size})" if by_size else "") + f"; |ln(measured/predicted)| median "
            f"{number(summary['median_abs_error'])}, largest {number(summary['max_abs_error'])}"
            + (f" ({summary['worst_layout']})" if summary.get("worst_layout") else "")
            + (f"; MFU {number(summary['mfu'])} ({summary['mfu_source']})" if summary["mfu"] is not None else ""))


def calibration_markdown(calib: pd.DataFrame, calibrations: list[dict]) -> list[str]:
    """The calibration's part: per record its provenance and summary, and the table of rows."""
    parts = ["Planner calibration (`etbench plan-calibrate`): the planner's predicted step time against the "
             "measured one of each layout on this machine (median over rounds, 95% interval).", ""]
    for record in calibrations:
        summary = calibration_summary(record)
        parts += [f"- {markdown_text(provenance_text(record))}", f"- {markdown_text(summary_line(summary))}"]
        grid = [s for s in summary["skipped"] if s.get("kind") == "grid"]
        parts += [f"- skipped {markdown_text(s.get('layout'))} ws{s.get('world_size')}: {markdown_text(s.get('reason'))}"
                  for s in summary["skipped"] if s not in grid]
        parts += [f"- {len(grid)} layout × world size points outside the grid (e.g. one-rank layouts at N > 1)"] if grid else []
    if not calib.empty:
        interval = [f"[{lo:.4g}, {hi:.4g}]" if lo is not None and hi is not None and lo == lo and hi == hi else ""
                    for lo, hi in zip(calib["ci_low"], calib["ci_high"])]
        table = pd.DataFrame({"machine": calib["machine"], "layout": calib["layout"], "N": calib["world_size"],
                              "predicted s": calib["predicted_seconds"], "measured s": calib["measured_seconds"],
                              "95% interval": interval, "measured ÷ predicted": calib["ratio"],
                              "fit point": calib["fit"].map(lambda f: "yes" if f else ""),
                              "not measured": calib["error"].fillna("")})
        parts += ["", markdown_safe(table).to_markdown(index=False, floatfmt=".4g")]
    return [*parts, ""]


def markdown(frame: pd.DataFrame, calib: pd.DataFrame, found: Artefacts) -> str:
    """The section of ``summary.md``: one line where there are no artefacts."""
    parts = ["", "## At scale: dry runs of the big models and the planner's calibration", ""]
    if found.empty():
        return "\n".join(parts + [markdown_text(absent_note(found)), ""])
    if found.sweeps:
        parts += sweep_markdown(frame, found.sweeps)
    if found.calibrations:
        parts += calibration_markdown(calib, found.calibrations)
    parts += [f"- not read: {markdown_text(s['source'])}: {markdown_text(s['reason'])}" for s in found.skipped]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# Figures and files
# --------------------------------------------------------------------------------------------

def byte_unit(largest: float) -> tuple[str, float]:
    """The binary unit a figure's axis uses: the largest keeping its biggest value ≥ 1."""
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if largest >= size:
            return unit, size
    return "B", 1.0


def memory_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The measured points of a sweep frame, long: one row per point and memory component."""
    done = frame[frame["skipped"].isna()] if "skipped" in frame else frame
    long = done.melt(id_vars=["model", "world_size", "layout", "mesh"], value_vars=list(MEMORY_COLUMNS.values()),
                     var_name="component", value_name="bytes")
    long["component"] = long["component"].map({v: k for k, v in MEMORY_COLUMNS.items()})
    return long[pd.to_numeric(long["bytes"], errors="coerce").notna()].reset_index(drop=True)


def plot_memory(frame: pd.DataFrame):
    """Bytes per rank by layout, stacked by component, one panel per model (rows) and world size
    (columns), each with its own scale: a replicated 70B model and a 512-way shard differ by
    three orders of magnitude."""
    long = memory_frame(frame)
    models, sizes = list(dict.fromkeys(long["model"])), sorted(set(long["world_size"]))
    unit, size = byte_unit(float(long.groupby(["model", "world_size", "layout"])["bytes"].sum().max()))
    fig = new_figure(3.4 * len(sizes), 2.6 * len(models))
    axes = fig.subplots(len(models), len(sizes), squeeze=False)
    colours = palette(MEMORY_PARTS)
    for (i, model), (j, n) in ((m, s) for m in enumerate(models) for s in enumerate(sizes)):
        ax, cell = axes[i, j], long[(long["model"] == model) & (long["world_size"] == n)]
        layouts = list(dict.fromkeys(cell["layout"]))
        bottom = np.zeros(len(layouts))
        for part in MEMORY_PARTS:
            values = np.array([float(cell[(cell["layout"] == lay) & (cell["component"] == part)]["bytes"].sum())
                               for lay in layouts]) / size
            ax.bar(range(len(layouts)), values, bottom=bottom, color=colours[part], label=part)
            bottom += values
        ax.set_xticks(range(len(layouts)), layouts, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{model}, N = {n}", fontsize=9)
        ax.set_ylabel(f"{unit} per rank" if j == 0 else "", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    axes[0, 0].legend(fontsize=6)
    fig.suptitle("Dry runs: bytes per rank by layout (activations: one micro-batch)", fontsize=10)
    return fig


def plot_calibration(calib: pd.DataFrame, summaries: list[dict]):
    """Measured against predicted step time per calibration (log-log), the 95% interval of each
    measurement as a bar, y = x dashed; the record's Spearman ρ and median error in the title."""
    measured = calib[(calib["measured_seconds"] > 0) & (calib["predicted_seconds"] > 0)]  # log axes
    machines = list(dict.fromkeys(measured["machine"]))
    fig = new_figure(5.2 * len(machines), 4.4)
    axes = fig.subplots(1, len(machines), squeeze=False)[0]
    colours = palette(str(n) for n in sorted(set(measured["world_size"])))
    for ax, machine in zip(axes, machines):
        rows = measured[measured["machine"] == machine]
        for n, group in rows.groupby("world_size"):
            low = (group["measured_seconds"] - group["ci_low"]).clip(lower=0).fillna(0)
            high = (group["ci_high"] - group["measured_seconds"]).clip(lower=0).fillna(0)
            ax.errorbar(group["predicted_seconds"], group["measured_seconds"], yerr=[low, high], fmt="o",
                        color=colours[str(n)], label=f"N = {n}", capsize=2, ms=4)
        values = rows[["predicted_seconds", "measured_seconds", "ci_low", "ci_high"]].to_numpy(dtype=float)
        values = values[np.isfinite(values) & (values > 0)]
        span = [float(values.min()) / 1.2, float(values.max()) * 1.2]
        ax.plot(span, span, ls="--", color="#444", lw=1, label="measured = predicted")
        ax.set(xscale="log", yscale="log", xlim=span, ylim=span)  # before the formatters: a scale resets them
        for axis, label in ((ax.xaxis, "predicted"), (ax.yaxis, "measured")):
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(ScalarFormatter())
            axis.set_label_text(f"{label} step time (s, log)")
        summary = next((s for s in summaries if s["machine"] == machine), None)
        ax.set_title(f"{machine}\n" + (short_summary(summary) if summary else ""), fontsize=8)
        ax.tick_params(labelsize=7, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("The planner's step time against this machine's", fontsize=10)
    return fig


def write_files(frame: pd.DataFrame, calib: pd.DataFrame, found: Artefacts, out_dir: Path) -> list[Path]:
    """The section's CSVs and figures, each only where it has data."""
    out_dir, written = Path(out_dir), []
    if not frame.empty:
        written.append(write_text(out_dir / "atscale_sweep.csv", frame.to_csv(index=False)))
        if not memory_frame(frame).empty:
            written.append(save_figure(out_dir / "atscale_memory.png", plot_memory(frame)))
    if not calib.empty:
        written.append(write_text(out_dir / "atscale_calibration.csv", calib.to_csv(index=False)))
        if ((calib["measured_seconds"] > 0) & (calib["predicted_seconds"] > 0)).any():
            summaries = [calibration_summary(r) for r in found.calibrations]
            written.append(save_figure(out_dir / "atscale_calibration.png", plot_calibration(calib, summaries)))
    return written


class AtscaleSection:
    """The at-scale section (:class:`impls.report.section.Section`): the dry-run sweep and the
    planner's calibration (see the module's docstring for where they are found).  ``folder``
    names the artefacts' folder outright (tests, other layouts)."""

    name = "atscale"

    def __init__(self, folder: Path | None = None):
        self.folder = folder

    def found(self, loaded: Loaded) -> Artefacts:
        return artefacts(loaded, self.folder)

    def frame(self, loaded: Loaded) -> pd.DataFrame:
        return sweep_frame(self.found(loaded).sweeps)

    def figures(self, frame: pd.DataFrame, loaded: Loaded, out_dir: Path) -> list[Path]:
        found = self.found(loaded)
        return write_files(frame, calibration_frame(found.calibrations), found, out_dir)

    def markdown(self, frame: pd.DataFrame, loaded: Loaded) -> str:
        found = self.found(loaded)
        return markdown(frame, calibration_frame(found.calibrations), found)


SECTION = AtscaleSection()
