"""The report's model-parallel section (issue 11): tensor/sequence/pipeline-parallel layouts from
the interleaved comparisons of the ``model_parallel`` family (and any compare variant whose mesh
has a tp or pp dimension > 1), the planner's per-device memory for the big zoo models.

Outputs (each written atomically, only where there is data):

* ``model_parallel_layouts.csv``: per layout and world size, the largest rank's bytes by
  component, the model-state formula ratio, collectives (calls, bytes, ratio to formula),
  per-layer activations against Korthikanti et al., speed per token vs DDP with its interval,
  and for pipelines the bubble measured and from the formula;
* ``model_parallel_activations.png``: saved bytes per layer per rank, no parallelism vs TP vs
  TP+SP, next to the paper's formula scaled to the unsharded measurement (its *shape* of
  reduction) and the implementation's exact count;
* ``model_parallel_bubble.png``: pipeline bubble fraction vs micro-batches m per schedule, the
  formula (p−1)/(m+p−1) (÷ v for interleaved) drawn as curves, measured points on them;
* ``model_parallel_memory.png``/``.csv``: the planner's per-device bytes by component for
  representative layouts of GPT-2 1.5B and Llama-7B on 64 devices of 80 GiB.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .. import families
from ..files import write_text
from .figures import save_figure
from .records import Loaded
from .tables import markdown_safe

#: The families of this section, from :mod:`impls.families`.
FAMILIES = families.of_section("model_parallel")
GIB = 2 ** 30
PLANNER_MODELS = ("gpt2-xl", "llama-7b")
PLANNER_DEVICES = 64
#: (tp, pp) of the model-parallel layouts the memory plot shows (with ZeRO-1 over the remaining dp)
LAYOUT_GRID = ((2, 1), (8, 1), (1, 2), (1, 8), (2, 4), (8, 8))


def _is_model_parallel(record: dict, variant: dict) -> bool:
    mesh = variant.get("mesh") or (variant.get("recipe") or {}).get("mesh") or {}
    return record.get("family") in FAMILIES or any(mesh.get(d, 1) > 1 for d in ("tp", "pp"))


def layouts_frame(interleaved: Sequence[dict]) -> pd.DataFrame:
    """One row per (compare record, variant) of a model-parallel comparison."""
    rows = []
    for record in interleaved:
        variants = record.get("variants") or {}
        if not any(_is_model_parallel(record, v) for v in variants.values()):
            continue
        for name, v in variants.items():
            memory, comm = v.get("memory") or {}, v.get("comm") or {}
            layer = v.get("layer_activations") or {}
            notes = v.get("technique_notes") or {}
            pp = notes.get("pp") or {}
            speed = v.get("speedup") or {}
            mesh = v.get("mesh") or (v.get("recipe") or {}).get("mesh") or {}
            states = (v.get("model_states") or {}).get("ratio") or {}
            rows.append(dict(
                layout=name, world_size=record.get("world_size"), tp=mesh.get("tp", 1), pp=mesh.get("pp", 1),
                dp=mesh.get("dp"), techniques="+".join((v.get("recipe") or {}).get("techniques") or []) or "ddp",
                model=(v.get("recipe") or {}).get("model"),
                params_bytes=memory.get("params_bytes"), grads_bytes=memory.get("grads_bytes"),
                optimizer_bytes=memory.get("optimizer_bytes"), activations_bytes=memory.get("activations_bytes"),
                model_states_vs_formula=states.get("total"),
                layer_bytes=layer.get("measured_bytes_per_layer"),
                layer_formula_bytes=layer.get("implementation_formula_bytes"),
                layer_vs_formula=layer.get("measured_over_implementation"),
                paper_reduction=layer.get("paper_reduction_vs_no_parallelism"),
                implementation_reduction=layer.get("implementation_reduction_vs_no_parallelism"),
                sp=layer.get("sp"),
                collective_calls=sum((comm.get("calls") or {}).values()) if comm else None,
                comm_bytes_per_step=comm.get("bytes_per_step"), comm_vs_formula=comm.get("ratio"),
                time_per_token_vs_ddp=(1.0 / speed["value"]) if speed.get("value") else None,
                speedup_ci_low=(speed.get("ci95") or [None, None])[0], speedup_ci_high=(speed.get("ci95") or [None, None])[1],
                schedule=pp.get("schedule"), microbatches=pp.get("microbatches"), chunks=pp.get("chunks"),
                bubble_formula=pp.get("bubble_formula"), bubble_schedule=pp.get("schedule_bubble_max"),
                bubble_measured=(max(pp["measured_idle"]) if pp.get("measured_idle") else None),
                stashed_microbatches=(max(pp["stash"]) if pp.get("stash") else None),
                device=(record.get("device") or {}).get("name"), noisy=(record.get("load") or {}).get("noisy"),
                source=record.get("source")))
    return pd.DataFrame(rows)


def plot_activations(frame: pd.DataFrame):
    """Bytes saved per layer per rank: measured bars, the implementation's count and the paper's
    formula scaled to the unsharded measurement (markers)."""
    import matplotlib.pyplot as plt

    rows = frame[frame["layer_bytes"].notna()].drop_duplicates(["layout", "world_size"])
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r.layout} (ws{r.world_size})" for r in rows.itertuples()]
    x = np.arange(len(rows))
    ax.bar(x, rows["layer_bytes"] / 1024, color="#4c72b0", label="measured (this rank)")
    ax.scatter(x, rows["layer_formula_bytes"] / 1024, color="black", marker="_", s=400, zorder=3,
               label="implementation count (fp32, fused SDPA, no dropout)")
    unsharded = rows[(rows["tp"] == 1)]["layer_bytes"]
    if not unsharded.empty:
        base = float(unsharded.iloc[0])
        ax.scatter(x, base * rows["paper_reduction"] / 1024, color="#dd8452", marker="D", zorder=4,
                   label="paper shape: unsharded × Korthikanti ratio")
    ax.set_xticks(x, labels, rotation=20, ha="right")
    ax.set_ylabel("saved activations per layer (KiB)")
    ax.set_title("Activation bytes per layer per rank: TP vs TP+SP (Korthikanti et al. 2022)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def bubble_curve(schedule: str, p: int, m: np.ndarray, v: int = 1) -> np.ndarray:
    """Idle share of a step: (p−1)/(m+p−1) for GPipe and 1F1B; interleaved 1F1B divides the
    bubble *time* by v (Narayanan et al. 2021: (1/v)·(p−1)/m of the ideal time), i.e. a share
    (p−1)/(v·m+p−1), when m is a multiple of p."""
    v = v if schedule.startswith("interleaved") else 1
    return (p - 1) / (v * m + p - 1)


def schedule_bubbles(schedule: str, p: int, v: int, ms=(1, 2, 4, 8)) -> list[tuple[int, float]]:
    """(m, bubble) of torch's own action order for each m it accepts, replayed offline with
    t_b = 2·t_f (:func:`impls.engines.pipeline_engine.simulate`): no ranks needed."""
    from ..engines.pipeline_engine import planned_order, simulate

    out = []
    for m in ms:
        try:
            order = planned_order(schedule, p, m, v)
            out.append((m, max(simulate(order, p * v, v)["idle"].values())))
        except Exception:  # an m the schedule refuses (1F1B needs m >= p)
            continue
    return out


def plot_bubble(frame: pd.DataFrame):
    import matplotlib.pyplot as plt

    rows = frame[frame["microbatches"].notna() & frame["schedule"].notna()]
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {"gpipe": "#4c72b0", "1f1b": "#55a868", "interleaved": "#c44e52"}
    for (schedule, p, v), group in rows.groupby(["schedule", "pp", rows["chunks"].fillna(1)]):
        color = colors.get(schedule, None)
        p, v = int(p), int(v)
        m = np.linspace(1, max(8, group["microbatches"].max()), 100)
        ax.plot(m, bubble_curve(schedule, p, m, v), color=color, lw=1,
                label=f"{schedule} p={p}" + (f" v={v}" if v > 1 else "") + ": formula")
        offline = schedule_bubbles(schedule, p, v)
        if offline:
            ax.scatter([x for x, _ in offline], [b for _, b in offline], color=color, marker="o", facecolors="none",
                       label=f"{schedule}: torch's schedule, replayed")
        if group["bubble_measured"].notna().any():
            ax.scatter(group["microbatches"], group["bubble_measured"], color=color, marker="x",
                       label=f"{schedule}: measured idle time (wall clock)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("micro-batches m")
    ax.set_ylabel("bubble (idle) fraction")
    ax.set_title("Pipeline bubble vs micro-batches")
    ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def planner_memory(models: Sequence[str] = PLANNER_MODELS, devices: int = PLANNER_DEVICES) -> pd.DataFrame:
    """Representative layouts of the planner's per-device memory: per model, the smallest-total
    layout of each (tp, pp, ZeRO stage) without checkpointing, plus DDP over all devices."""
    from .. import planner

    frame = planner.memory_by_layout(list(models), devices, checkpointing=(False,))
    if frame.empty:
        return frame
    keep = frame.sort_values("total").groupby(["model", "tp", "pp", "zero_stage"], as_index=False).first()
    pure_dp = (keep["tp"] == 1) & (keep["pp"] == 1)  # DDP and ZeRO-1/2/3 over all devices
    model_parallel = keep["zero_stage"].eq(1) & keep[["tp", "pp"]].apply(tuple, axis=1).isin(LAYOUT_GRID)
    return keep[pure_dp | model_parallel].sort_values(["model", "tp", "pp", "zero_stage"]).reset_index(drop=True)


def plot_planner_memory(frame: pd.DataFrame):
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(frame["model"]))
    fig, axes = plt.subplots(len(models), 1, figsize=(9, 3.2 * len(models)), squeeze=False)
    parts = ["params", "grads", "optimizer", "activations"]
    colors = ["#4c72b0", "#55a868", "#c44e52", "#8172b3"]
    for ax, model in zip(axes[:, 0], models):
        rows = frame[frame["model"] == model]
        x, bottom = np.arange(len(rows)), np.zeros(len(rows))
        for part, color in zip(parts, colors):
            values = rows[part].to_numpy(dtype=float) / GIB
            ax.bar(x, values, bottom=bottom, color=color, label=part)
            bottom += values
        ax.axhline(80, color="black", ls="--", lw=1, label="80 GiB device")
        ax.set_xticks(x, rows["label"], rotation=30, ha="right", fontsize=6)
        ax.set_ylabel("GiB per device")
        ax.set_title(f"{model} on {PLANNER_DEVICES} devices: planner's per-device memory by layout", fontsize=9)
        ax.legend(fontsize=6, ncol=5)
    fig.tight_layout()
    return fig


def markdown(frame: pd.DataFrame, memory: pd.DataFrame) -> str:
    parts = ["", "## Model parallelism: tensor, sequence and pipeline parallel", ""]
    if not frame.empty:
        cols = ["layout", "world_size", "tp", "pp", "params_bytes", "activations_bytes", "layer_vs_formula",
                "implementation_reduction", "paper_reduction", "collective_calls", "comm_vs_formula",
                "time_per_token_vs_ddp", "bubble_formula", "bubble_schedule", "bubble_measured"]
        table = frame[[c for c in cols if c in frame]].copy()
        parts += ["Per layout (largest rank's bytes; `layer_vs_formula` = measured saved bytes per layer ÷ the "
                  "implementation's count; `*_reduction` = per-layer bytes ÷ the unsharded layer's, measured "
                  "count vs Korthikanti et al.'s formula; `comm_vs_formula` = measured ring bytes ÷ (dp gradient "
                  "volume + 4 all-reduces of (b, s, h) per layer); time per token ÷ DDP's from the same "
                  "interleaved rounds):", "", markdown_safe(table).to_markdown(index=False, floatfmt=".3g"), ""]
    if not memory.empty:
        fit = memory[memory["fits"]].sort_values("total").groupby("model").first()
        parts += [f"Planner (`etbench plan`), {PLANNER_DEVICES} devices × 80 GiB, smallest per-device memory that fits:", ""]
        for model, row in fit.iterrows():
            parts.append(f"- {model}: {row['label']} — {row['total'] / GIB:.1f} GiB")
        parts.append("")
    return "\n".join(parts)


def _write_files(frame: pd.DataFrame, memory: pd.DataFrame, out_dir: Path) -> list[Path]:
    out_dir, written = Path(out_dir), []
    written.append(write_text(out_dir / "model_parallel_layouts.csv", frame.to_csv(index=False)))
    if frame["layer_bytes"].notna().any():
        written.append(save_figure(out_dir / "model_parallel_activations.png", plot_activations(frame)))
    if frame["microbatches"].notna().any():
        written.append(save_figure(out_dir / "model_parallel_bubble.png", plot_bubble(frame)))
    if not memory.empty:
        written += [write_text(out_dir / "model_parallel_memory.csv", memory.to_csv(index=False)),
                    save_figure(out_dir / "model_parallel_memory.png", plot_planner_memory(memory))]
    return written


def write_model_parallel(interleaved: Sequence[dict], out_dir: Path) -> tuple[list[Path], str]:
    """Write the section's files; returns the written paths and the summary.md section (nothing
    when no record has a model-parallel layout)."""
    frame = layouts_frame(interleaved)
    if frame.empty:
        return [], ""
    memory = planner_memory()
    return _write_files(frame, memory, out_dir), markdown(frame, memory)


class ModelParallelSection:
    """The model-parallel section (:class:`impls.report.section.Section`): the interleaved
    comparisons with a tensor- or pipeline-parallel layout, and the planner's memory at scale
    (only when some record has such a layout)."""

    name = "model_parallel"

    def frame(self, loaded: Loaded) -> pd.DataFrame:
        return layouts_frame(loaded.interleaved)

    def figures(self, frame: pd.DataFrame, loaded: Loaded, out_dir: Path) -> list[Path]:
        return [] if frame.empty else _write_files(frame, planner_memory(), out_dir)

    def markdown(self, frame: pd.DataFrame, loaded: Loaded) -> str:
        return "" if frame.empty else markdown(frame, planner_memory())


SECTION = ModelParallelSection()
