"""The report's data- and token-efficiency section (issue 13): sequence-length warm-up, knowledge
distillation, masked-token dropping (MAE), random-LTD and BERT token dropping, each against the
baseline of its own comparison group (same model, data, length and budget: ``impls.report``'s
comparison key, which includes the masked-LM rate and corruption).

Outputs (each written atomically, only where there is data):

* ``tokens.csv``: per technique run, its knob, the FLOPs it saved -- *counted* (FlopCounterMode,
  from the technique's notes) and *analytic* (the technique's own formula over its schedule) and
  their ratio -- and the loss difference to the baseline two ways: at the same budget (the final
  validation losses; budgets are model FLOPs) and at **equal counted FLOPs**: both validation
  curves interpolated (in log FLOPs) at the smaller of the two runs' total counted FLOPs, so a
  technique whose model FLOPs differ from its counted ones (or a baseline whose counted FLOPs
  exceed its model-FLOP budget) is still compared at the same hardware work;
* ``tokens_speedup_vs_mask_rate.png``: the MAE-style encoder's speed-up over the full-sequence
  encoder per mask rate, with the interleaved comparisons' 95% intervals, beside the speed-up its
  counted FLOPs would give (baseline FLOPs per step ÷ mae's: encoder on the visible tokens plus
  the decoder on all of them);
* ``tokens_random_ltd_schedule.png``: random-LTD's kept tokens per middle layer over the steps
  (the schedule the run trained on), with the FLOPs it saved, counted and analytic;
* ``tokens_distill_sweep.png``: the distilled student's loss over temperature T per α, the
  student alone as a line.

Loss-vs-counted-FLOPs curves of each technique against its baseline are the report's per-family
``loss_vs_flops-<family>.png``.
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
from .runs import comparison_key, main_technique, run_techniques, technique_comparison
from .tables import markdown_safe
from .values import is_missing, nested_block

#: The families of this section, from :mod:`impls.families`.
FAMILIES = families.of_section("tokens")
#: technique -> (knob name, note/option keys holding it, first found wins)
KNOBS = {
    "seqlen_warmup": ("warm-up fraction", ("steps",)),
    "distill": ("T, alpha", ("temperature", "alpha")),
    "mae": ("mask rate", ("mask_rate",)),
    "random_ltd": ("start tokens", ("start",)),
    "token_drop": ("kept fraction", ("keep",)),
}
#: note keys of the counted and the analytic fraction of FLOPs saved (first found wins)
COUNTED_SAVED = ("counted_flops_saved", "flops_saved_counted")
ANALYTIC_SAVED = ("analytic_flops_saved", "flops_saved_analytic")


def _notes(run, name: str) -> dict:
    return (nested_block(run, "technique_notes") or {}).get(name) or {}


def _first(notes: dict, keys: Sequence[str]):
    for key in keys:
        value = notes.get(key)
        if not is_missing(value):
            return value
    return None


def _knob(run, name: str, options: dict) -> str | None:
    if name == "mae":  # the mask rate is the recipe's: the baseline of the pair has it too
        rate = run.get("recipe.mlm_rate")
        return None if is_missing(rate) else f"{rate:g}"
    if name not in KNOBS:
        return None
    notes = _notes(run, name)
    values = [_first(notes, (key,)) if _first(notes, (key,)) is not None else options.get(key)
              for key in KNOBS[name][1]]
    values = [v for v in values if v is not None]
    return ", ".join(f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in values) or None


def _short(specs: Sequence[str]) -> str:
    """The techniques as the table shows them: a path option (a teacher's record) by its file name."""
    def value(v: str) -> str:
        return Path(v).name if "/" in v else v

    return "+".join(",".join("=".join((k, value(v))) if v else k for k, _, v in (o.partition("=") for o in s.split(",")))
                    for s in specs)


def _curve(run) -> tuple[np.ndarray, np.ndarray]:
    """(counted FLOPs, validation loss) of a run's curve, points with a validation loss and > 0 FLOPs."""
    points = [p for p in (run.get("curve") or []) if p.get("val_loss") is not None and (p.get("flops") or 0) > 0]
    return (np.array([p["flops"] for p in points], dtype=float), np.array([p["val_loss"] for p in points], dtype=float))


def loss_at_equal_counted_flops(run, base) -> tuple[float, float]:
    """(loss difference, FLOPs): both validation curves interpolated linearly in log counted FLOPs at
    the smaller of the two runs' final counted FLOPs; NaN where a curve does not reach it."""
    fr, lr = _curve(run)
    fb, lb = _curve(base)
    if len(fr) < 2 or len(fb) < 2:
        return math.nan, math.nan
    at = min(fr[-1], fb[-1])
    if at < max(fr[0], fb[0]):
        return math.nan, math.nan
    interp = [float(np.interp(math.log(at), np.log(f), loss)) for f, loss in ((fr, lr), (fb, lb))]
    return interp[0] - interp[1], float(at)


def tokens_frame(runs: pd.DataFrame, interleaved: Sequence[dict] = ()) -> pd.DataFrame:
    """One row per technique run of the section's families, against its group's baseline."""
    if runs.empty or "family" not in runs:
        return pd.DataFrame()
    rows = []
    for family in FAMILIES:
        group = runs[runs["family"] == family].reset_index(drop=True)
        if group.empty:
            continue
        comparison = technique_comparison(group, [r for r in interleaved if r.get("family") == family])
        if comparison.empty:
            continue
        keys = comparison_key(group)
        bases = {}
        for i, run in group.iterrows():
            if not run_techniques(run) and run.get("recipe.optimizer", "adamw") == "adamw":
                bases.setdefault(keys[i], run)
        by_run = {run["run"]: (i, run) for i, run in group.iterrows()}
        for _, row in comparison.iterrows():
            i, run = by_run[row["run"]]
            base = bases.get(keys[i])
            name, options = main_technique(run)
            if name == "baseline" or base is None:
                continue
            notes = _notes(run, name)
            counted, analytic = _first(notes, COUNTED_SAVED), _first(notes, ANALYTIC_SAVED)
            delta, at = loss_at_equal_counted_flops(run, base)
            rows.append(dict(
                family=family, run=row["run"], technique=name, techniques=_short(run_techniques(run)),
                knob=KNOBS.get(name, ("",))[0], knob_value=_knob(run, name, options),
                budget_flops=run.get("recipe.budget_flops"), steps=run.get("steps"), baseline_steps=base.get("steps"),
                counted_flops_saved=counted, analytic_flops_saved=analytic,
                saved_counted_vs_analytic=(counted / analytic if counted is not None and analytic else math.nan),
                teacher_flops_per_step=notes.get("teacher_flops_per_step"),
                final_val_loss=run.get("final_val_loss"), baseline_val_loss=base.get("final_val_loss"),
                loss_delta_at_budget=row["loss delta"],
                loss_delta_at_equal_counted_flops=delta, equal_counted_flops=at,
                speed_ratio=row["speed ratio"], speed_lo=row["speed ratio lo"], speed_hi=row["speed ratio hi"]))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- plots


def mask_rate_speedups(interleaved: Sequence[dict]) -> pd.DataFrame:
    """Per interleaved comparison of family ``mae``: the mask rate (the variants' recipe) and each
    ``mae`` variant's speed-up over the full-sequence encoder, with its 95% interval and the
    visible fraction its notes give."""
    rows = []
    for record in interleaved:
        if record.get("family") != "mae":
            continue
        for name, variant in record.get("variants", {}).items():
            recipe = variant.get("recipe") or {}
            if name == record.get("baseline") or not any(str(t).startswith("mae") for t in recipe.get("techniques", [])):
                continue
            speed = variant.get("speedup") or {}
            low, high = (speed.get("ci95") or [math.nan, math.nan])[:2]
            notes = (variant.get("technique_notes") or {}).get("mae") or {}
            ratio = notes.get("counted_flops_ratio_vs_baseline")
            rows.append(dict(mask_rate=recipe.get("mlm_rate"), speedup=speed.get("value", math.nan), lo=low, hi=high,
                             visible_fraction=notes.get("visible_fraction", math.nan),
                             flops_speedup=1.0 / ratio if ratio else math.nan))
    return pd.DataFrame(rows).sort_values("mask_rate") if rows else pd.DataFrame()


def plot_speedup_vs_mask_rate(frame: pd.DataFrame):
    figure = new_figure(7.5, 4.2)
    ax = figure.subplots()
    x, y = frame["mask_rate"].to_numpy(float), frame["speedup"].to_numpy(float)
    err = np.array([y - frame["lo"].to_numpy(float), frame["hi"].to_numpy(float) - y])
    ax.errorbar(x, y, yerr=np.nan_to_num(err), marker="o", capsize=3, label="measured (interleaved, 95% interval)")
    if frame["flops_speedup"].notna().any():
        ax.plot(x, frame["flops_speedup"].to_numpy(float), marker="s", linestyle=":", color="grey",
                label="counted FLOPs ratio (the speed-up if time followed FLOPs)")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="full-sequence encoder")
    ax.set_xlabel("mask rate (masked tokens dropped from the encoder)")
    ax.set_ylabel("speed-up per token over the full-sequence encoder")
    ax.set_title("Masked-token dropping: speed-up vs mask rate")
    ax.legend(fontsize="small")
    return figure


def plot_random_ltd_schedule(runs: pd.DataFrame):
    """Kept tokens per middle layer over the steps, one line per random-LTD run."""
    figure = new_figure(8.5, 4.2)
    ax = figure.subplots()
    for _, run in runs.iterrows():
        notes = _notes(run, "random_ltd")
        schedule, steps = notes.get("schedule"), notes.get("total_steps") or run.get("steps")
        if not schedule or not steps:
            continue
        xs = [s for s, _ in schedule] + [steps]
        ys = [k for _, k in schedule] + [schedule[-1][1]]
        counted, analytic = _first(notes, COUNTED_SAVED), _first(notes, ANALYTIC_SAVED)
        label = run["run"]
        if counted is not None and analytic is not None:
            label += f": FLOPs saved {counted:.1%} counted, {analytic:.1%} analytic"
        ax.step(xs, ys, where="post", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("tokens kept per sequence in the middle layers")
    ax.set_title("random-LTD kept-length schedule")
    ax.legend(fontsize="small", loc="lower right")
    return figure


def plot_distill_sweep(frame: pd.DataFrame, runs: pd.DataFrame):
    """The distilled student's loss (equal student steps) over T, one line per α."""
    rows = []
    for _, run in runs[runs["family"] == "distill"].iterrows():
        notes = _notes(run, "distill")
        if notes and run.get("recipe.budget_flops", "model") == "model":
            rows.append(dict(T=notes.get("temperature"), alpha=notes.get("alpha"), loss=run.get("final_val_loss")))
    sweep = pd.DataFrame(rows)
    figure = new_figure(7.5, 4.2)
    ax = figure.subplots()
    for alpha, group in sweep.groupby("alpha"):
        group = group.sort_values("T")
        ax.plot(group["T"], group["loss"], marker="o", label=f"α = {alpha:g}")
    base = frame[frame["family"] == "distill"]["baseline_val_loss"].dropna()
    if not base.empty:
        ax.axhline(float(base.iloc[0]), color="black", linestyle="--", linewidth=0.9, label="student alone")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("temperature T")
    ax.set_ylabel("validation loss at the student's budget (nats/token)")
    ax.set_title("Distillation: α·CE + (1−α)·T²·KL, equal student steps")
    ax.legend(fontsize="small")
    return figure


# --------------------------------------------------------------------------- summary.md


def markdown(frame: pd.DataFrame) -> str:
    if frame.empty:
        return ""
    cols = ["family", "techniques", "knob_value", "budget_flops", "steps", "baseline_steps", "counted_flops_saved",
            "analytic_flops_saved", "saved_counted_vs_analytic", "loss_delta_at_budget",
            "loss_delta_at_equal_counted_flops", "speed_ratio", "speed_lo", "speed_hi"]
    table = frame[[c for c in cols if c in frame]]
    return "\n".join([
        "", "## Data and token efficiency", "",
        "Each technique against the baseline of its own group (same model, data, length, masking and budget). "
        "FLOPs saved: counted (FlopCounterMode over the steps as trained) and analytic (the technique's formula), "
        "with their ratio. Loss delta (nats/token) at the budget, and at equal counted FLOPs (both validation "
        "curves interpolated at the smaller run's total counted FLOPs). Speed ratio: baseline time per token ÷ "
        "the technique's, interleaved rounds with a 95% interval; blank where not timed.", "",
        markdown_safe(table).to_markdown(index=False, floatfmt=".4g"), ""])


def _write_files(frame: pd.DataFrame, runs: pd.DataFrame, interleaved: Sequence[dict], out_dir: Path) -> list[Path]:
    out_dir, written = Path(out_dir), []
    if not frame.empty:
        written.append(write_text(out_dir / "tokens.csv", frame.to_csv(index=False)))
        if (frame["technique"] == "distill").sum() > 1:
            written.append(save_figure(out_dir / "tokens_distill_sweep.png", plot_distill_sweep(frame, runs)))
    speed = mask_rate_speedups(interleaved)
    if not speed.empty:
        written.append(save_figure(out_dir / "tokens_speedup_vs_mask_rate.png", plot_speedup_vs_mask_rate(speed)))
    if not runs.empty and "family" in runs:
        ltd = runs[[bool(_notes(run, "random_ltd").get("schedule")) for _, run in runs.iterrows()]]
        if not ltd.empty:
            written.append(save_figure(out_dir / "tokens_random_ltd_schedule.png", plot_random_ltd_schedule(ltd)))
    return written


def write_tokens(runs: pd.DataFrame, interleaved: Sequence[dict], out_dir: Path) -> tuple[list[Path], str]:
    """Write the section's files; returns the written paths and the summary.md section."""
    frame = tokens_frame(runs, interleaved)
    return _write_files(frame, runs, interleaved, out_dir), markdown(frame)


class TokensSection:
    """The data- and token-efficiency section (:class:`impls.report.section.Section`): the training
    runs of :data:`FAMILIES` against their baselines, and the ``mae`` interleaved comparisons."""

    name = "tokens"

    def frame(self, loaded: Loaded) -> pd.DataFrame:
        return tokens_frame(loaded.runs, loaded.interleaved)

    def figures(self, frame: pd.DataFrame, loaded: Loaded, out_dir: Path) -> list[Path]:
        return _write_files(frame, loaded.runs, loaded.interleaved, out_dir)

    def markdown(self, frame: pd.DataFrame, loaded: Loaded) -> str:
        return markdown(frame)


SECTION = TokensSection()
