"""The report's compression section (issue 12): pruning, quantized training, low-rank, activation
compression and sparse storage, each technique against the baseline of its own family, trained
to the same model-FLOP budget.

Outputs (each written atomically, only where there is data):

* ``compression.csv``: per technique run, its family and main knob (sparsity, rank, bits,
  saved-tensor dtype), the loss gap to the family's baseline at the same budget, every memory
  component as a ratio to the baseline's same component, and the speed ratio with its 95%
  interval from the family's interleaved comparison (absent where that technique was not timed);
* ``compression_memory.png``: memory by component per technique, as fractions of its family
  baseline's total exact memory (the baseline is 1);
* ``compression_loss_vs_sparsity.png``: loss at the budget vs achieved sparsity, per pruning
  method, the dense baseline at sparsity 0;
* ``compression_loss_vs_rank.png``: loss at the budget vs rank for factorised layers, LoRA and
  GaLore, the full-rank baseline as a line;
* ``compression_sparse_crossover.png``: bytes of COO/CSR/BSR vs density against dense storage,
  and sparse×dense matmul time over dense (from the ``sparse_storage`` record).

The knob of a run is read from its technique notes (what the technique measured, e.g. the achieved
sparsity) and, failing that, from the technique's options in the recipe (what was asked).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .. import families
from ..files import write_text
from .figures import new_figure, save_figure
from .records import Loaded
from .records import validate_storage  # noqa: F401  (its home was this module)
from .runs import comparison_key, main_technique, run_techniques, technique_comparison
from .tables import markdown_safe, markdown_text
from .values import is_missing, nested_block

#: The families of this section, from :mod:`impls.families` (``datacomp`` has no training runs,
#: only its ``data_compression`` record).
FAMILIES = families.of_section("compression")
#: family -> the knob its curves are drawn over, and the note/option keys that hold it (first found wins)
KNOBS = {
    "pruning": ("sparsity", ("overall_sparsity", "achieved_sparsity", "sparsity", "target_sparsity")),
    "lowrank": ("rank", ("rank",)),
    "quant": ("bits", ("weight_bits", "bits")),
    "actmem": ("dtype", ("dtype",)),
    "sparse": ("density", ("density",)),
}
COMPONENTS = {"memory.params_bytes": "params", "memory.grads_bytes": "grads",
              "memory.optimizer_bytes": "optimizer state", "memory.activations_bytes": "activations"}
STORAGE_KIND = families.SPARSE_STORAGE
DATA_KIND = families.DATA_COMPRESSION  # impls.measure.data_throughput: token storage formats, loader vs step
STORAGE_KINDS = (STORAGE_KIND, DATA_KIND)


def _knob(run, family: str, name: str, options: dict):
    if family not in KNOBS or name == "baseline":
        return None
    _, keys = KNOBS[family]
    notes = (nested_block(run, "technique_notes") or {}).get(name) or {}
    for key in keys:
        value = notes.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            return value
    for key in keys:
        if key in options:
            return options[key]
    return None


def compression_frame(runs: pd.DataFrame, interleaved: Sequence[dict] = ()) -> pd.DataFrame:
    """One row per run of a compression family, relative to that family's baseline (the run with
    no technique in the same comparison group, :func:`impls.report.technique_comparison`)."""
    rows = []
    if runs.empty or "family" not in runs:
        return pd.DataFrame()
    for family in FAMILIES:
        group = runs[runs["family"] == family].reset_index(drop=True)
        if group.empty:
            continue
        comparison = technique_comparison(group, [r for r in interleaved if r.get("family") == family])
        if comparison.empty:
            continue
        by_run = {run["run"]: run for _, run in group.iterrows()}
        keys = comparison_key(group)
        bases = {}  # the first run without techniques of each group, as technique_comparison takes
        for i, run in group.iterrows():
            if not run_techniques(run) and run.get("recipe.optimizer", "adamw") == "adamw":
                bases.setdefault(keys[i], run)
        for _, row in comparison.iterrows():
            run = by_run[row["run"]]
            base = bases.get(keys[group.index[group["run"] == row["run"]][0]])
            name, options = main_technique(run)
            init_from = run.get("recipe.init_from")
            model_args = ",".join(f"{c[len('recipe.model_args.'):]}={run[c]}" for c in sorted(run.index)
                                  if isinstance(c, str) and c.startswith("recipe.model_args.") and not is_missing(run[c]))
            out = dict(family=family, run=row["run"], technique=name,
                       init_from=None if is_missing(init_from) else init_from, model_args=model_args,
                       techniques="+".join(run_techniques(run)) or "baseline",
                       knob=KNOBS.get(family, ("", ()))[0], knob_value=_knob(run, family, name, options),
                       final_val_loss=run.get("final_val_loss"), loss_delta=row["loss delta"],
                       speed_ratio=row["speed ratio"], speed_lo=row["speed ratio lo"], speed_hi=row["speed ratio hi"],
                       tokens_per_second=run.get("tokens_per_second"), steps=run.get("steps"),
                       flops_per_step=run.get("flops_per_step"), model_flops_per_step=run.get("model_flops_per_step"))
            for column, label in COMPONENTS.items():
                out[f"{label} / baseline"] = (run.get(column) / base[column]
                                              if base is not None and base.get(column) else math.nan)
                out[f"{label} / baseline memory"] = row[f"{label} / baseline memory"]
            if base is not None and base.get("flops_per_step"):
                out["counted flops / baseline"] = run.get("flops_per_step") / base["flops_per_step"]
            rows.append(out)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- plots


def _label(row) -> str:
    """The run's techniques; for a reference run, what it is the reference of."""
    if row["techniques"] != "baseline":
        return row["techniques"]
    label = f"{row['family']} baseline"
    if not is_missing(row.get("init_from")):
        label = f"{row['family']} full fine-tuning (from trained weights)"
    return label + (f" [{row['model_args']}]" if row.get("model_args") else "")


def plot_memory(frame: pd.DataFrame):
    """Stacked memory components per run, as fractions of the family baseline's total."""
    frame = frame.reset_index(drop=True)
    figure = new_figure(11.0, 1.4 + 0.36 * max(len(frame), 1))
    ax = figure.subplots()
    y = np.arange(len(frame))
    left = np.zeros(len(frame))
    colours = dict(zip(COMPONENTS.values(), ("#4c72b0", "#dd8452", "#55a868", "#c44e52")))
    for label in COMPONENTS.values():
        values = frame[f"{label} / baseline memory"].to_numpy(float)
        values = np.nan_to_num(values)
        ax.barh(y, values, left=left, color=colours[label], label=label)
        left += values
    ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_yticks(y, [f"{_label(r)}" for _, r in frame.iterrows()], fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("exact memory / the family baseline's total (params + grads + optimizer + activations)")
    ax.set_title("Memory by component, normalised to each family's baseline")
    ax.legend(fontsize="small", loc="lower right")
    return figure


def plot_loss_vs_knob(frame: pd.DataFrame, family: str, *, log_x: bool = False):
    """Loss at the family's budget vs its knob, one line per technique; the baseline as a
    horizontal line (and, for sparsity, the point at 0)."""
    knob = KNOBS[family][0]
    rows = frame[frame["family"] == family]
    figure = new_figure(9.5, 4.2)
    ax = figure.subplots()
    base = rows[rows["technique"] == "baseline"]
    for technique, group in rows[rows["technique"] != "baseline"].groupby("technique", sort=True):
        group = group[pd.to_numeric(group["knob_value"], errors="coerce").notna()]
        if group.empty:
            continue
        x = pd.to_numeric(group["knob_value"]).to_numpy(float)
        y = group["final_val_loss"].to_numpy(float)
        order = np.argsort(x)
        ax.plot(x[order], y[order], marker="o", label=technique)
    for (_, ref), style in zip(base.iterrows(), ("--", ":", "-.")):
        loss = float(ref["final_val_loss"])
        what = ("baseline: dense, from scratch" if is_missing(ref.get("init_from"))
                else "full fine-tuning from the trained weights\n(LoRA's reference)")
        ax.axhline(loss, color="black", linestyle=style, linewidth=0.9, label=what)
        if knob == "sparsity" and is_missing(ref.get("init_from")):
            ax.plot([0.0], [loss], marker="s", color="black")
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(knob)
    ax.set_ylabel("validation loss at the budget (nats/token)")
    ax.set_title(f"{family}: loss vs {knob} at the same model-FLOP budget")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return figure


# --------------------------------------------------------------------------- sparse storage


def data_markdown(record: dict) -> str:
    """Bytes per token on disk and in memory per format, the loader's throughput over the training
    step's need, and whether every format read back the same tokens."""
    lines = ["", "### Compressed training data (bytes per token, loader vs the training step's need)", "",
             "| data | format | disk B/token | memory B/token | disk ÷ int64 | loader tokens/s | loader ÷ step need "
             "| same hash and batches |", "|---|---|---|---|---|---|---|---|"]
    for spec, data in record["datasets"].items():
        for row in data["formats"]:
            same = row.get("batches_match") and row.get("hash_matches_raw") in (None, True)
            lines.append(f"| {markdown_text(spec)} | {markdown_text(row['format'])} | {row['disk_bytes_per_token']:.3g} | "
                         f"{row.get('memory_bytes_per_token', float('nan')):.3g} | {row.get('disk_vs_int64', float('nan')):.3g} "
                         f"| {row['loader']['tokens_per_s']:.3g} | {row['loader_vs_step_need']:.3g} | "
                         f"{'yes' if same else 'NO'} |")
    lines += ["", f"The step needs {record['step_need']['tokens_per_s']:.3g} tokens/s; the slowest loader is "
                  f"{record.get('min_loader_vs_step_need', float('nan')):.3g}× that.", ""]
    return "\n".join(lines)


def storage_markdown(record: dict) -> str:
    """The crossover densities: measured vs analytic bytes, and matmul speed."""
    m, n = record["matrix"]["shape"]
    lines = ["", f"### Sparse storage ({record['matrix']['model']} {record['matrix']['weight']}, {m}×{n}, fp32 values)",
             "", "| pattern | format | bytes crossover (measured) | as torch builds it | analytic | measured ÷ analytic |",
             "|---|---|---|---|---|---|"]

    def fmt(v):
        return "n/a" if v is None else f"{v:.4g}"

    for pattern, data in record["bytes"]["patterns"].items():
        for name, c in data["crossover"].items():
            lines.append(f"| {markdown_text(pattern)} | {markdown_text(name.upper())} | {fmt(c.get('measured'))} | {fmt(c.get('measured_as_built'))} "
                         f"| {fmt(c.get('analytic'))} | {fmt(c.get('measured_over_analytic'))} |")
    speed = record["speed"]
    lines += ["", f"Sparse×dense matmul is faster than dense below density (time ratio crosses 1; "
                  f"{speed['pattern']} pattern, {speed['tokens']} columns): "
              + ", ".join(f"{name.upper()} {fmt(v)}" for name, v in speed["crossover"].items()), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- summary.md


def markdown(frame: pd.DataFrame) -> str:
    if frame.empty:
        return ""
    cols = ["family", "techniques", "knob", "knob_value", "loss_delta", "speed_ratio", "speed_lo", "speed_hi",
            *[f"{label} / baseline" for label in COMPONENTS.values()], "counted flops / baseline"]
    table = frame[[c for c in cols if c in frame]]
    return "\n".join([
        "", "## Compression techniques", "",
        "Each technique against the baseline of its own family, at the same model-FLOP budget: loss gap "
        "(nats/token), speed ratio (baseline time per token ÷ the technique's, interleaved rounds with a 95% "
        "interval; blank where not timed), and each memory component ÷ the baseline's.", "",
        markdown_safe(table).to_markdown(index=False, floatfmt=".4g"), ""])


def _first_of_kind(storage: Sequence[dict], kind: str) -> list[dict]:
    """The first storage record of ``kind`` (a list of none or one): one measurement per report."""
    return [r for r in storage if r.get("kind") == kind][:1]


def _write_files(frame: pd.DataFrame, storage: Sequence[dict], out_dir: Path) -> list[Path]:
    out_dir, written = Path(out_dir), []
    if not frame.empty:
        written.append(write_text(out_dir / "compression.csv", frame.to_csv(index=False)))
        written.append(save_figure(out_dir / "compression_memory.png", plot_memory(frame)))
        for family, name, log_x in (("pruning", "compression_loss_vs_sparsity.png", False),
                                    ("lowrank", "compression_loss_vs_rank.png", True)):
            rows = frame[(frame["family"] == family) & (frame["technique"] != "baseline")]
            if pd.to_numeric(rows["knob_value"], errors="coerce").notna().any():
                written.append(save_figure(out_dir / name, plot_loss_vs_knob(frame, family, log_x=log_x)))
    for record in _first_of_kind(storage, STORAGE_KIND):
        from ..measure.sparse_storage import plot_sparse_crossover

        written.append(save_figure(out_dir / "compression_sparse_crossover.png", plot_sparse_crossover(record)))
    for record in _first_of_kind(storage, DATA_KIND):
        from ..measure.data_throughput import plot_data_compression

        written.append(save_figure(out_dir / "compression_data.png", plot_data_compression(record)))
    return written


def _section_markdown(frame: pd.DataFrame, storage: Sequence[dict]) -> str:
    section = markdown(frame)
    section += "".join(storage_markdown(record) for record in _first_of_kind(storage, STORAGE_KIND))
    return section + "".join(data_markdown(record) for record in _first_of_kind(storage, DATA_KIND))


def write_compression(runs: pd.DataFrame, interleaved: Sequence[dict], storage: Sequence[dict],
                      out_dir: Path) -> tuple[list[Path], str]:
    """Write the section's files; returns the written paths and the summary.md section."""
    frame = compression_frame(runs, interleaved)
    return _write_files(frame, storage, out_dir), _section_markdown(frame, storage)


class CompressionSection:
    """The compression section (:class:`impls.report.section.Section`): the training runs of the
    families of :data:`FAMILIES` against their baselines, and the storage-format records."""

    name = "compression"

    def frame(self, loaded: Loaded) -> pd.DataFrame:
        return compression_frame(loaded.runs, loaded.interleaved)

    def figures(self, frame: pd.DataFrame, loaded: Loaded, out_dir: Path) -> list[Path]:
        return _write_files(frame, loaded.storage, out_dir)

    def markdown(self, frame: pd.DataFrame, loaded: Loaded) -> str:
        return _section_markdown(frame, loaded.storage)


SECTION = CompressionSection()
