"""Data-parallel and sharded training (issue 10): per-rank model states and communication against
the ZeRO formulas (Rajbhandari et al. 2020), scaling efficiency, collective bus bandwidth (records of
kind ``comm``), and the model-state memory of big models.

Model states per rank of ZeRO stage s over N_d ranks, Ψ parameters, p_b/g_b bytes per parameter and
gradient element, K bytes of optimizer state per parameter (:func:`impls.measure.model_states.formula`):
stage 0 keeps (p_b + g_b + K)Ψ on every rank, stage 1 shards the optimizer state (K Ψ / N_d),
stage 2 the gradients too, stage 3 the parameters too.  Communication per rank per step (ZeRO §7):
2Ψ elements for stages 0-2 (a reduce-scatter and an all-gather, or one all-reduce), 3Ψ for stage 3;
a ring moves (N−1)/N of that.

Outputs (:data:`DATA_PARALLEL_FILES`): ``data_parallel_model_states.png``/``.csv`` (measured points,
the formula drawn as a line over them), ``data_parallel_scaling.png``/``.csv`` (tokens/s per rank vs
1 rank), ``data_parallel_comm.png``/``.csv`` (bytes measured vs formula), ``comm_busbw.png``/``.csv``
(bus bandwidth vs message size) and ``data_parallel_memory.csv`` (GPT-2 1.5B / Llama-7B model states
per technique and N_d).
"""
from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from .. import families
from ..files import write_text
from .figures import new_figure, palette, save_figure
from .records import MIB, Loaded, comm_rows
from .tables import markdown_table
from .values import first_number, is_number, nested_block

#: File names of the data-parallel outputs (no family suffix: the techniques of every family
#: that has ``model_states`` records share one set of plots).
DATA_PARALLEL_FILES = {
    "model_states": "data_parallel_model_states",
    "scaling": "data_parallel_scaling",
    "comm": "data_parallel_comm",
    "busbw": "comm_busbw",
    "memory": "data_parallel_memory",
}
#: Components of the model-state plot: (record key in model_states.measured/formula, title).
DP_COMPONENTS = (("params", "parameters"), ("grads", "gradients"), ("optimizer", "optimizer state"),
                 ("total", "total model states"))
#: Models of the memory table (GPT-2 1.5B, Llama-7B) and its data-parallel degrees.
MEMORY_TABLE_MODELS = ("gpt2-xl", "llama-7b")
MEMORY_TABLE_N_DS = (1, 8, 64, 1024)
SCALING_NOTE = ("tokens/s per rank at N ranks ÷ tokens/s of the same technique on 1 rank (else of the run without "
                "techniques on 1 rank); separately timed runs, not interleaved rounds: the interval combines each run's "
                "own step-time 95% CI and is no substitute for an interleaved comparison; oversubscribed CPU runs "
                "(ranks × threads > cores) measure contention, not scaling")


def _technique_label(techniques) -> str:
    """The recipe's techniques joined by ``+``; ``none`` for plain data parallel."""
    if isinstance(techniques, (list, tuple)) and techniques:
        return "+".join(map(str, techniques))
    return "none"


def _comm_measured(comm: dict | None):
    """Per-rank bytes of one step from a record's ``comm`` block, tolerant of the key the counter
    uses (``bytes_per_step``, ``measured_bytes``, ``bytes``, ``total_bytes``, or ``check.measured_bytes``)."""
    if not isinstance(comm, dict):
        return None
    check = comm.get("check") if isinstance(comm.get("check"), dict) else {}
    return first_number(comm.get("bytes_per_step"), comm.get("measured_bytes"), comm.get("bytes"),
                         comm.get("total_bytes"), check.get("measured_bytes"))


def interleaved_parallel_runs(interleaved: Sequence[dict]) -> pd.DataFrame:
    """The variants of interleaved comparisons that carry a ``model_states`` block (the
    data-parallel family times every technique of a world size in one comparison) as rows like
    :func:`records_frame`'s, for :func:`data_parallel_frame`: per-rank bytes, the collectives of
    one step and tokens/s from the interleaved rounds' median step time (its interval from theirs)."""
    rows = []
    for record in interleaved:
        if record.get("family") in families.of_section("model_parallel"):  # its own section
            continue
        for name, v in record.get("variants", {}).items():
            if not isinstance(v.get("model_states"), dict) or "error" in v["model_states"]:
                continue
            seconds = v.get("seconds_per_step") or {}
            median = seconds.get("median")
            if not is_number(median) or median <= 0:
                continue
            rows.append({"run": f"{name}/ws{record.get('world_size')} [{Path(record.get('source') or '').stem}]",
                         "family": record.get("family"), "recipe": v.get("recipe") or {},
                         "world_size": record.get("world_size"), "tokens_per_step": v.get("tokens_per_step"),
                         "tokens_per_second": v["tokens_per_step"] / median,
                         "step_time": {"ci95": seconds.get("ci95")}, "device": record.get("device") or {},
                         "load": record.get("load") or {}, "model_states": v["model_states"],
                         "comm": v.get("comm")})
    return pd.json_normalize(rows) if rows else pd.DataFrame()


_FRAME_COLUMNS = [
    "run", "family", "model", "optimizer", "technique", "n_d", "world_size", "stage", "stage_name", "psi",
    "param_bytes", "grad_bytes", "k", "covered", *[f"{w}_{c}" for c, _ in DP_COMPONENTS for w in ("measured", "formula")],
    "ratio_total", "tokens_per_second", "tokens_per_rank", "tokens_per_rank_lo", "tokens_per_rank_hi",
    "cpu_count", "threads", "oversubscribed", "comm_measured", "comm_paper", "comm_ring", "comm_payload",
    "batch_size", "seq_len"]


def data_parallel_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run that has a ``model_states`` block (records of data-parallel techniques).

    Columns: ``run``, ``family``, ``model``, ``optimizer``, ``technique`` (the recipe's techniques
    joined by ``+``, the model appended when several models are present), ``n_d`` (the block's
    data-parallel degree, else the record's world size), ``world_size``, ``stage``, ``stage_name``,
    ``psi``, ``param_bytes``, ``grad_bytes``, ``k``, ``covered``, ``measured_<c>`` and ``formula_<c>``
    (bytes per rank, c in params/grads/optimizer/total), ``ratio_total``, ``tokens_per_second``,
    ``tokens_per_rank``, ``tokens_per_rank_lo``/``_hi`` (from the step-time 95% CI), ``cpu_count``,
    ``threads``, ``oversubscribed`` (CPU runs with ranks × threads > cores), ``comm_measured``
    (bytes per rank per step), ``comm_paper``, ``comm_ring``, ``comm_payload`` (the formula in the
    three conventions of :func:`impls.measure.model_states.comm_volume`)."""
    rows = [row for row in (_model_states_row(run) for _, run in runs.iterrows()) if row is not None]
    frame = pd.DataFrame(rows, columns=_FRAME_COLUMNS)
    if frame.empty:
        return frame
    frame = _parallel_and_references(frame)
    if frame["model"].nunique() > 1:
        frame["technique"] = [f"{t} [{m}]" for t, m in zip(frame["technique"], frame["model"])]
    return frame.sort_values(["technique", "n_d", "run"], kind="stable").reset_index(drop=True)


def _model_states_row(run) -> dict | None:
    """:func:`data_parallel_frame`'s row of one run; None without a usable ``model_states`` block."""
    from ..measure import model_states as ms

    block = nested_block(run, "model_states")
    if not block or not all(is_number(block.get(k)) for k in ("psi", "n_d", "stage")):
        return None
    psi, n_d, stage = float(block["psi"]), int(block["n_d"]), int(block["stage"])
    p_b, g_b, k = block.get("param_bytes"), block.get("grad_bytes"), block.get("k")
    formula = block.get("formula") if isinstance(block.get("formula"), dict) else None
    if formula is None and all(is_number(v) for v in (p_b, g_b, k)):
        formula = ms.formula(psi, n_d, stage, param_bytes=p_b, grad_bytes=g_b, k=k)
    measured = block.get("measured") or {}
    world_size = run.get("world_size")
    world_size = int(world_size) if is_number(world_size) and world_size == world_size else n_d
    tps = run.get("tokens_per_second")
    tokens, ci = run.get("tokens_per_step"), run.get("step_time.ci95")
    lo = hi = math.nan
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and is_number(tokens) and ci[0] > 0:
        lo, hi = tokens / ci[1] / world_size, tokens / ci[0] / world_size
    cpus, threads = run.get("load.cpu_count"), run.get("device.threads")
    oversubscribed = None
    if run.get("device.type") == "cpu" and is_number(cpus) and cpus == cpus:
        per_rank = int(threads) if is_number(threads) and threads == threads else 1
        oversubscribed = world_size * max(per_rank, 1) > cpus
    comm = nested_block(run, "comm")
    comm_formula = None
    if comm:
        comm_formula = comm.get("formula") or (comm.get("check") or {}).get("formula")
    if comm and not isinstance(comm_formula, dict) and is_number(g_b):
        comm_formula = ms.comm_volume(psi, n_d, stage, grad_bytes=g_b, param_bytes=p_b if is_number(p_b) else None)
    row = {"run": run["run"], "family": run["family"], "model": run.get("recipe.model"),
           "batch_size": run.get("recipe.batch_size"), "seq_len": run.get("recipe.seq_len"),
           "optimizer": run.get("recipe.optimizer"), "technique": _technique_label(run.get("recipe.techniques")),
           "n_d": n_d, "world_size": world_size, "stage": stage,
           "stage_name": block.get("stage_name") or ms.STAGES[stage][0], "psi": psi,
           "param_bytes": p_b, "grad_bytes": g_b, "k": k, "covered": formula is not None,
           "tokens_per_second": tps,
           "tokens_per_rank": tps / world_size if is_number(tps) and tps == tps else math.nan,
           "tokens_per_rank_lo": lo, "tokens_per_rank_hi": hi, "cpu_count": cpus, "threads": threads,
           "oversubscribed": oversubscribed, "comm_measured": _comm_measured(comm),
           "comm_paper": (comm_formula or {}).get("bytes"), "comm_ring": (comm_formula or {}).get("ring_bytes"),
           "comm_payload": (comm_formula or {}).get("payload_bytes")}
    for key, _ in DP_COMPONENTS:
        row[f"measured_{key}"] = first_number(measured.get(key))
        row[f"formula_{key}"] = first_number((formula or {}).get(key))
    if row["measured_total"] is None and all(row[f"measured_{c}"] is not None for c, _ in DP_COMPONENTS[:3]):
        row["measured_total"] = sum(row[f"measured_{c}"] for c, _ in DP_COMPONENTS[:3])
    row["ratio_total"] = (row["measured_total"] / row["formula_total"]
                          if row["measured_total"] is not None and row["formula_total"] else math.nan)
    return row


def _parallel_and_references(frame: pd.DataFrame) -> pd.DataFrame:
    """Every record checks its model states, single-process ones included: the section shows the
    data-parallel runs, and of the one-rank runs only those that are a multi-rank run's reference
    (same model, batch and sequence length), for the scaling efficiency."""
    config = ["family", "model", "batch_size", "seq_len"]
    parallel = (frame["n_d"] > 1) | (frame["stage"] > 0)
    key = frame[config].astype(str).apply(tuple, axis=1)
    wanted = {(k, t) for k, t in zip(key[parallel], frame.loc[parallel, "technique"])}
    # a one-rank reference: same family and config, and the same technique or none
    reference = [(k, t) in wanted or (t == "none" and any(k == w for w, _ in wanted))
                 for k, t in zip(key, frame["technique"])]
    return frame[parallel | pd.Series(reference, index=frame.index)].reset_index(drop=True)


def _n_grid(n_max: int, measured: Iterable[int]) -> list[int]:
    """World sizes to draw a formula line at: every integer up to 64, powers of two beyond, and
    the measured ones."""
    grid = set(range(1, min(n_max, 64) + 1)) | {2 ** i for i in range(int(math.log2(max(n_max, 1))) + 1)}
    return sorted(n for n in grid | set(measured) if n <= n_max)


def model_states_lines(frame: pd.DataFrame) -> pd.DataFrame:
    """The formula of each technique (its Ψ, stage, p_b, g_b, K) evaluated from 1 rank to the
    largest world size measured: columns ``technique``, ``n_d``, ``params``, ``grads``,
    ``optimizer``, ``total`` (bytes per rank)."""
    from ..measure import model_states as ms

    rows = []
    for technique, group in frame[frame["covered"]].groupby("technique", sort=False):
        first = group.iloc[0]
        if not all(is_number(first[c]) for c in ("param_bytes", "grad_bytes", "k")):
            continue  # a block with its formula only: the measured world sizes carry it
        for n in _n_grid(int(group["n_d"].max()), group["n_d"]):
            f = ms.formula(first["psi"], n, int(first["stage"]), param_bytes=first["param_bytes"],
                           grad_bytes=first["grad_bytes"], k=first["k"])
            rows.append({"technique": technique, "n_d": n, **f})
    return pd.DataFrame(rows, columns=["technique", "n_d", "params", "grads", "optimizer", "total"])


def scaling_efficiency(frame: pd.DataFrame) -> pd.DataFrame:
    """Per data-parallel run: tokens/s per rank ÷ the 1-rank tokens/s of the same technique (else
    of the same model's run without techniques), with the interval from both runs' step-time 95%
    CIs (lo: slowest N vs fastest 1; hi: the reverse) where both have one.  Columns ``technique``,
    ``n_d``, ``tokens_per_rank``, ``reference`` (which 1-rank run), ``efficiency``, ``lo``, ``hi``,
    ``oversubscribed``."""
    rows = []
    for _, r in frame.iterrows():
        # the same tokens per rank and step: same model, batch and sequence length
        config = ((frame["model"] == r["model"]) & (frame["batch_size"].astype(str) == str(r["batch_size"]))
                  & (frame["seq_len"].astype(str) == str(r["seq_len"])) & (frame["family"] == r["family"]))
        same = frame[(frame["technique"] == r["technique"]) & (frame["n_d"] == 1) & config]
        reference = "same technique, 1 rank"
        if same.empty:
            same = frame[(frame["technique"].str.split(" ").str[0] == "none") & (frame["n_d"] == 1) & config]
            reference = "no technique, 1 rank"
        if same.empty:
            rows.append({"technique": r["technique"], "n_d": r["n_d"], "tokens_per_rank": r["tokens_per_rank"],
                         "reference": "no 1-rank run", "efficiency": math.nan, "lo": math.nan, "hi": math.nan,
                         "oversubscribed": r["oversubscribed"]})
            continue
        ref = same.iloc[0]
        eff = r["tokens_per_rank"] / ref["tokens_per_rank"]
        if ref["run"] == r["run"]:  # the reference itself: 1 by definition
            lo = hi = 1.0
        else:
            lo = r["tokens_per_rank_lo"] / ref["tokens_per_rank_hi"]
            hi = r["tokens_per_rank_hi"] / ref["tokens_per_rank_lo"]
        rows.append({"technique": r["technique"], "n_d": r["n_d"], "tokens_per_rank": r["tokens_per_rank"],
                     "reference": reference, "efficiency": eff, "lo": lo, "hi": hi,
                     "oversubscribed": r["oversubscribed"]})
    return pd.DataFrame(rows, columns=["technique", "n_d", "tokens_per_rank", "reference", "efficiency", "lo", "hi",
                                       "oversubscribed"])


def comm_volume_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Runs with communication bytes: measured bytes per rank per step against the formula in the
    paper's convention (2Ψ / 3Ψ elements in bytes), the ring convention (× (N−1)/N) and the
    collective payloads, with measured/formula ratios.  One-rank runs are left out: a single
    rank communicates nothing, and the paper's 2Ψ assumes N_d > 1."""
    table = frame[frame["comm_measured"].notna() & frame["comm_paper"].notna() & (frame["n_d"] > 1)]
    out = table[["technique", "stage_name", "n_d", "psi", "comm_measured", "comm_paper", "comm_ring",
                 "comm_payload"]].reset_index(drop=True).astype({"comm_measured": float, "comm_paper": float,
                                                                  "comm_ring": float, "comm_payload": float})
    with np.errstate(divide="ignore", invalid="ignore"):
        out["ratio_paper"] = out["comm_measured"] / out["comm_paper"].replace(0, np.nan)
        out["ratio_ring"] = out["comm_measured"] / out["comm_ring"].replace(0, np.nan)
        out["ratio_payload"] = out["comm_measured"] / out["comm_payload"].replace(0, np.nan)
    return out



def comm_bandwidth_frame(records: Sequence[dict]) -> pd.DataFrame:
    """One row per (record, scheme, message size) of ``etbench comm`` records
    (:func:`impls.report.records.comm_rows`: ``algbw`` = bytes / median seconds, ``busbw`` = algbw
    × 2(n−1)/n for a ring all-reduce, else the record's own factor), by world size, scheme, size."""
    rows = [row for record in records for row in comm_rows(record)]
    frame = pd.DataFrame(rows, columns=["source", "world_size", "scheme", "bytes", "seconds", "algbw", "busbw"])
    return frame.sort_values(["world_size", "scheme", "bytes"], kind="stable").reset_index(drop=True)


def data_parallel_memory_table(models: Sequence[str] = MEMORY_TABLE_MODELS,
                               n_ds: Sequence[int] = MEMORY_TABLE_N_DS, gpu_bytes: float = 80e9) -> pd.DataFrame:
    """:func:`impls.measure.model_states.memory_table` as a frame (Ψ counted on ``meta``)."""
    from ..measure import model_states as ms

    return pd.DataFrame(ms.memory_table(tuple(models), tuple(n_ds), gpu_bytes))


def plot_model_states(frame: pd.DataFrame, lines: pd.DataFrame) -> Figure:
    """Per-rank model-state bytes (MiB) vs data-parallel world size, one panel per component
    (parameters, gradients, optimizer state, total): measured points per technique, the ZeRO
    formula of the same technique drawn as a line over them (``gid`` = the technique)."""
    colours = palette(frame["technique"])
    figure = new_figure(16.0, 4.4)
    with sns.axes_style("whitegrid"):
        axes = figure.subplots(1, len(DP_COMPONENTS))
    for ax, (key, title) in zip(axes, DP_COMPONENTS):
        for technique, colour in colours.items():
            line = lines[lines["technique"] == technique]
            if not line.empty:
                (artist,) = ax.plot(line["n_d"], line[key] / MIB, color=colour, linewidth=1.4, alpha=0.8,
                                    label=f"{technique} (formula)")
                artist.set_gid(f"formula:{technique}")
            points = frame[(frame["technique"] == technique) & frame[f"measured_{key}"].notna()]
            if not points.empty:
                artist = ax.scatter(points["n_d"], points[f"measured_{key}"].astype(float) / MIB, color=colour,
                                    edgecolor="black", zorder=3, s=36, label=f"{technique} (measured)")
                artist.set_gid(f"measured:{technique}")
        ax.set_xscale("log", base=2)
        ax.set_title(title)
        ax.set_xlabel("data-parallel ranks N_d (log2)")
        ax.set_ylabel("MiB per rank")
    handles, labels = axes[-1].get_legend_handles_labels()
    if handles:
        axes[-1].legend(handles, labels, fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.suptitle("Per-rank model states vs world size: measured (points) and ZeRO formula (lines; "
                    "Rajbhandari et al. 2020)")
    return figure


def plot_scaling_efficiency(table: pd.DataFrame) -> Figure:
    """Tokens/s per rank at N ranks ÷ 1 rank per technique, with the interval of
    :func:`scaling_efficiency`; oversubscribed CPU runs hollow and annotated."""
    colours = palette(table["technique"])
    figure = new_figure(9.0, 5.4)
    with sns.axes_style("whitegrid"):
        ax = figure.subplots()
    for technique, colour in colours.items():
        rows = table[(table["technique"] == technique) & table["efficiency"].notna()].sort_values("n_d")
        if rows.empty:
            continue
        (line,) = ax.plot(rows["n_d"], rows["efficiency"], color=colour, label=technique, marker=None)
        line.set_gid(f"efficiency:{technique}")
        over = rows["oversubscribed"].fillna(False).astype(bool).to_numpy()
        ax.errorbar(rows["n_d"], rows["efficiency"],
                    yerr=np.abs(np.vstack([rows["efficiency"] - rows["lo"], rows["hi"] - rows["efficiency"]])),
                    fmt="none", ecolor=colour, capsize=3)
        ax.scatter(rows["n_d"][~over], rows["efficiency"][~over], color=colour, zorder=3)
        ax.scatter(rows["n_d"][over], rows["efficiency"][over], facecolor="none", edgecolor=colour, zorder=3)
        for n, eff in zip(rows["n_d"][over], rows["efficiency"][over]):
            ax.annotate("oversubscribed", (n, eff), xytext=(4, 4), textcoords="offset points", fontsize="x-small",
                        color="0.35")
    ax.axhline(1.0, color="0.3", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("data-parallel ranks N (log2)")
    ax.set_ylabel("tokens/s per rank ÷ 1 rank")
    ax.set_title("Scaling efficiency (hollow: oversubscribed CPU run)", fontsize="medium")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    # Under the axes, inside the tight layout (a figure.text would overlap the x label).
    ax.annotate(textwrap.fill(SCALING_NOTE, 130), (0, 0), xycoords="axes fraction", xytext=(0, -42),
                textcoords="offset points", va="top", fontsize="x-small", color="0.35")
    return figure


def plot_comm_volume(table: pd.DataFrame) -> Figure:
    """Measured communication bytes per rank per step (bars) with the formula in the paper's
    convention (black |), the ring convention (red x) and the collective payloads (blue o)."""
    labels = [f"{t} · N={n}" for t, n in zip(table["technique"], table["n_d"])]
    figure = new_figure(11.0, 1.8 + 0.45 * max(len(table), 1))
    with sns.axes_style("whitegrid"):
        ax = figure.subplots()
    y = np.arange(len(table))
    bars = ax.barh(y, table["comm_measured"] / MIB, color="#8da0cb", label="measured")
    ax.bar_label(bars, labels=[f"{r:.2f}× paper" if r == r else "" for r in table["ratio_paper"]], padding=3,
                 fontsize="small")
    ax.scatter(table["comm_paper"] / MIB, y, marker="|", s=400, color="black", zorder=3,
               label="formula, paper (2Ψ / 3Ψ)")
    ax.scatter(table["comm_ring"] / MIB, y, marker="x", s=60, color="#c44e52", zorder=3,
               label="formula × (N−1)/N (ring)")
    ax.scatter(table["comm_payload"] / MIB, y, marker="o", s=30, facecolor="none", edgecolor="#4c72b0", zorder=3,
               label="collective payloads (all-reduce once)")
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.margins(x=0.25)
    ax.set_xlabel("MiB per rank per step")
    ax.set_title("Communication volume: measured vs ZeRO §7 formula")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return figure


def plot_bus_bandwidth(bw: pd.DataFrame) -> Figure:
    """Bus bandwidth vs message size (log-log), one panel per world size, one line per scheme
    (nccl-tests' definitions; a parameter server's root link saturates as N grows)."""
    sizes = sorted(bw["world_size"].unique())
    figure = new_figure(5.5 * max(len(sizes), 1), 4.4)
    with sns.axes_style("whitegrid"):
        axes = figure.subplots(1, max(len(sizes), 1), squeeze=False).ravel()
    colours = palette(bw["scheme"])
    for ax, n in zip(axes, sizes):
        for scheme, colour in colours.items():
            rows = bw[(bw["world_size"] == n) & (bw["scheme"] == scheme)].sort_values("bytes")
            column = "busbw" if rows["busbw"].notna().any() else "algbw"
            rows = rows[rows[column].notna()]
            if rows.empty:
                continue
            (line,) = ax.plot(rows["bytes"], rows[column] / 1e9, marker="o", color=colour,
                              label=scheme + ("" if column == "busbw" else " (algbw)"))
            line.set_gid(f"busbw:{n}:{scheme}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{n} ranks")
        ax.set_xlabel("message size (bytes, log2)")
        ax.set_ylabel("bus bandwidth (GB/s)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    figure.suptitle("Collective bandwidth vs message size\n(algbw = bytes/time; all-reduce busbw = algbw·2(n−1)/n)",
                    fontsize="medium")
    return figure


def data_parallel_markdown(frame: pd.DataFrame, scaling: pd.DataFrame, comm: pd.DataFrame,
                           memory: pd.DataFrame) -> str:
    """The summary.md section: measured vs formula model states per run, scaling efficiency,
    communication volume, and the big-model memory table; empty without data-parallel data."""
    from ..measure import model_states as ms

    if frame.empty and comm.empty and memory.empty:
        return ""
    parts = ["", "## Data-parallel and sharded training", ""]
    if not frame.empty:
        table = pd.DataFrame({
            "technique": frame["technique"], "stage": frame["stage_name"], "N_d": frame["n_d"],
            **{f"{name} MiB (measured / formula)": [
                "n/a" if m is None or m != m else f"{m / MIB:,.3f} / " + ("n/a" if f is None or f != f else f"{f / MIB:,.3f}")
                for m, f in zip(frame[f"measured_{key}"], frame[f"formula_{key}"])] for key, name in DP_COMPONENTS},
            "ratio": frame["ratio_total"],
            "oversubscribed": frame["oversubscribed"],
        })
        parts += [f"Per-rank model states against the ZeRO formulas ({ms.SOURCE}; tolerance {ms.TOLERANCE:.0%}):", "",
                  markdown_table(table, {"N_d": "{:.0f}", "ratio": "{:.4f}"})]
    if not scaling.empty:
        parts += ["Scaling efficiency: " + SCALING_NOTE + ".", "",
                  markdown_table(scaling, {"n_d": "{:.0f}", "tokens_per_rank": "{:,.0f}", "efficiency": "{:.3f}",
                                           "lo": "{:.3f}", "hi": "{:.3f}"})]
    if not comm.empty:
        parts += ["Communication per rank per step vs ZeRO §7 (paper: 2Ψ/3Ψ elements in bytes; ring: × (N−1)/N; "
                  "payload: tensor sizes handed to the collectives):", "",
                  markdown_table(comm, {c: "{:,.0f}" for c in ("n_d", "psi", "comm_measured", "comm_paper", "comm_ring",
                                                               "comm_payload")}
                                 | {c: "{:.3f}" for c in ("ratio_paper", "ratio_ring", "ratio_payload")})]
    if not memory.empty:
        parts += ["Model-state memory of big zoo models (Ψ counted on the meta device):", "",
                  ms.memory_table_markdown(memory.to_dict("records"))]
    return "\n".join(parts) + "\n"


def _write_files(frame: pd.DataFrame, bw: pd.DataFrame, out_dir: Path) -> list[Path]:
    """The files of :data:`DATA_PARALLEL_FILES` that have data (the memory table always, once the
    section has any data)."""
    if frame.empty and bw.empty:
        return []
    out_dir, names, written = Path(out_dir), DATA_PARALLEL_FILES, []
    scaling, comm = scaling_efficiency(frame), comm_volume_table(frame)
    if not frame.empty:
        lines = model_states_lines(frame)
        written += [write_text(out_dir / f"{names['model_states']}.csv", frame.to_csv(index=False)),
                    save_figure(out_dir / f"{names['model_states']}.png", plot_model_states(frame, lines))]
        if scaling["efficiency"].notna().any():
            written += [write_text(out_dir / f"{names['scaling']}.csv", scaling.to_csv(index=False)),
                        save_figure(out_dir / f"{names['scaling']}.png", plot_scaling_efficiency(scaling))]
        if not comm.empty:
            written += [write_text(out_dir / f"{names['comm']}.csv", comm.to_csv(index=False)),
                        save_figure(out_dir / f"{names['comm']}.png", plot_comm_volume(comm))]
    if not bw.empty:
        written += [write_text(out_dir / f"{names['busbw']}.csv", bw.to_csv(index=False)),
                    save_figure(out_dir / f"{names['busbw']}.png", plot_bus_bandwidth(bw))]
    written.append(write_text(out_dir / f"{names['memory']}.csv", data_parallel_memory_table().to_csv(index=False)))
    return written


def _section_markdown(frame: pd.DataFrame, bw: pd.DataFrame) -> str:
    if frame.empty and bw.empty:
        return ""
    return data_parallel_markdown(frame, scaling_efficiency(frame), comm_volume_table(frame),
                                  data_parallel_memory_table())


def write_data_parallel(runs: pd.DataFrame, comm_records: Sequence[dict], out_dir: Path) -> tuple[list[Path], str]:
    """Write the data-parallel plots and tables (:data:`DATA_PARALLEL_FILES`) for the runs with a
    ``model_states`` block and the ``etbench comm`` records; returns the written paths and the
    summary.md section (nothing when there are neither)."""
    frame, bw = data_parallel_frame(runs), comm_bandwidth_frame(comm_records)
    return _write_files(frame, bw, out_dir), _section_markdown(frame, bw)


class DataParallelSection:
    """The data-parallel section (:class:`impls.report.section.Section`): the training runs with a
    ``model_states`` block and the interleaved variants carrying one (not the model-parallel
    family's: their own section), and the ``etbench comm`` records."""

    name = "data_parallel"

    def frame(self, loaded: Loaded) -> pd.DataFrame:
        runs = pd.concat([loaded.runs, interleaved_parallel_runs(loaded.interleaved)], ignore_index=True)
        return data_parallel_frame(runs)

    def figures(self, frame: pd.DataFrame, loaded: Loaded, out_dir: Path) -> list[Path]:
        return _write_files(frame, comm_bandwidth_frame(loaded.comm), out_dir)

    def markdown(self, frame: pd.DataFrame, loaded: Loaded) -> str:
        return _section_markdown(frame, comm_bandwidth_frame(loaded.comm))


SECTION = DataParallelSection()
