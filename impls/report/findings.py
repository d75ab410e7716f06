"""What each technique buys, and which paper claims hold: the findings page's two tables.

**Findings** -- one row per technique variant of every family, against the baseline of its own
comparison group (same model, data, sequence length, FLOP budget, world size; see
:func:`impls.report.comparison_key`):

* speed × baseline: baseline time per token ÷ the variant's, only from interleaved rounds (A B A B
  ..., a ratio per round, median with its 95% interval) -- never from two separately timed runs;
* each memory component × the baseline's (exact bytes: parameters, gradients, optimizer state,
  saved activations; peak where both runs measured one);
* counted FLOPs per step × baseline, and counted ÷ analytic model FLOPs of the run (6N + 12·L·H·Q·T,
  PaLM App. B; > 1 means hardware FLOPs the model function does not need, e.g. recomputation);
* loss Δ at equal model FLOPs (both runs train to the same model-FLOP budget), with a Welch 95%
  interval where both sides have several seeds;
* the device and scale (parameters, tokens trained, world size) it was measured at.

Variants timed interleaved without a training run of their own (data- and model-parallel layouts,
conditional computation) get a row with their speed and memory and no loss.

**Claims checked** -- every formula the suite checks a measurement against (ZeRO model states and
traffic, Megatron TP/SP activations and collectives, pipeline traffic and bubble, checkpointing's
recompute cost, counted vs analytic FLOPs saved by MAE / random-LTD / sequence-length warm-up /
token dropping, LoRA / GaLore / low-rank / 8-bit optimizer state, sparse gradient and storage
bytes, activation compression, MFU ≤ 1): the paper, how many measurements, the measured ÷ formula
ratio (median, range) and whether every one is within the claim's tolerance.  A ratio outside the
tolerance is reported as ``differs`` with what the records say about it -- never hidden.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import pandas as pd

from .. import families
from ..files import write_text
from ..provenance import SCHEMA_VERSION
from .runs import comparison_key, describe_device, technique_comparison
from .tables import markdown_safe, markdown_table

#: Memory components compared, record column -> short name.
COMPONENTS = {"memory.params_bytes": "params", "memory.grads_bytes": "grads",
              "memory.optimizer_bytes": "optimizer", "memory.activations_bytes": "activations",
              "memory.peak_bytes": "peak"}
#: Two-sided 95% Student-t quantiles by degrees of freedom (Welch's interval on loss Δ); 1.96 beyond.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
       10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}

FINDINGS_COLUMNS = ("family", "variant", "speed", "speed lo", "speed hi", "params", "grads", "optimizer",
                    "activations", "peak", "flops/step", "counted/analytic", "loss delta", "loss delta lo",
                    "loss delta hi", "device", "model", "parameters", "tokens", "world size", "label", "source")


def _number(value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number


def _ratio(a, b) -> float:
    a, b = _number(a), _number(b)
    return a / b if b and b == b and a == a else math.nan


def variant_name(label: str) -> str:
    """A run's label without its model name (and without ``adamw/`` when techniques follow), option
    values that are paths cut to their file name: what differs from the baseline, e.g.
    ``checkpoint:every=1``, ``adamw8bit`` or ``distill:teacher=distill-teacher.json,alpha=0.5``."""
    parts = str(label).split(" (")[0].split("/")
    # a path option (teacher=/a/b/c.json) contains slashes: rejoin the pieces after the model
    text = "/".join(parts[1:])
    text = re.sub(r"=(/[^,/]+)+/([^,/]+)", r"=\2", text)
    pieces = text.split("/")
    if len(pieces) > 1 and pieces[0] == "adamw":
        pieces = pieces[1:]
    return "/".join(pieces) or "baseline"


def _disambiguate(rows: list[dict]) -> None:
    """Two rows of one family with one variant name (the same technique at two mask rates, or a
    re-run) get the record's run name appended, e.g. ``mae [mae-mae-0.4]``."""
    seen: dict[tuple, int] = {}
    for row in rows:
        seen[(row["family"], row["variant"])] = seen.get((row["family"], row["variant"]), 0) + 1
    for row in rows:
        if seen[(row["family"], row["variant"])] > 1:
            run = str(row.get("run") or "")
            tag = run[run.index(" (") + 2:-1] if " (" in run else Path(str(row.get("source") or "")).stem
            row["variant"] = f"{row['variant']} [{tag}]"


def _t95(dof: float) -> float:
    keys = [k for k in sorted(T95) if k <= dof]
    return T95[keys[-1]] if keys and dof < 30 else 1.96 if dof >= 30 else T95[1]


def loss_delta_interval(run, base) -> tuple[float, float]:
    """Welch's 95% interval of mean(run) − mean(base) over their seeds (``seeds.*`` of the
    records); NaN unless both sides have two seeds or more."""
    n1, n2 = _number(run.get("seeds.n")), _number(base.get("seeds.n"))
    s1, s2 = _number(run.get("seeds.std")), _number(base.get("seeds.std"))
    if not (n1 >= 2 and n2 >= 2 and s1 == s1 and s2 == s2):
        return math.nan, math.nan
    v1, v2 = s1 * s1 / n1, s2 * s2 / n2
    se = math.sqrt(v1 + v2)
    dof = (v1 + v2) ** 2 / (v1 * v1 / (n1 - 1) + v2 * v2 / (n2 - 1)) if v1 + v2 > 0 else n1 + n2 - 2
    delta = _number(run.get("seeds.mean")) - _number(base.get("seeds.mean"))
    half = _t95(dof) * se
    return delta - half, delta + half


def _scale(run) -> dict:
    tokens = _number(run.get("tokens_per_step")) * _number(run.get("steps_done"))
    return {"device": describe_device(run.get("device.type"), run.get("device.name")),
            "model": run.get("recipe.model"), "parameters": _number(run.get("params")),
            "tokens": tokens, "world size": _number(run.get("world_size"))}


def _run_rows(group: pd.DataFrame, interleaved: Sequence[dict]) -> Iterator[dict]:
    """Rows of one family's training runs, each against its comparison group's baseline."""
    speeds = technique_comparison(group, interleaved)
    speed_of = {r["run"]: r for r in speeds.to_dict("records")} if not speeds.empty else {}
    group = group.assign(_key=comparison_key(group))
    is_base = group["recipe.techniques"].map(lambda t: isinstance(t, list) and not t) & (
        group.get("recipe.optimizer", pd.Series("adamw", index=group.index)) == "adamw")
    for _, members in group.groupby("_key", sort=False):
        bases = members[is_base.loc[members.index]]
        if bases.empty or len(members) < 2:
            continue
        base = bases.iloc[0]
        for index, run in members.iterrows():
            if index == base.name:
                continue
            speed = speed_of.get(run["run"], {})
            low, high = loss_delta_interval(run, base)
            yield {"family": run["family"], "variant": variant_name(run["label"]),
                   "speed": _number(speed.get("speed ratio")), "speed lo": _number(speed.get("speed ratio lo")),
                   "speed hi": _number(speed.get("speed ratio hi")),
                   **{name: _ratio(run.get(col), base.get(col)) for col, name in COMPONENTS.items()},
                   "flops/step": _ratio(run.get("flops_per_step"), base.get("flops_per_step")),
                   "counted/analytic": _ratio(run.get("flops_per_step"), run.get("model_flops_per_step")),
                   "loss delta": _number(run.get("final_val_loss")) - _number(base.get("final_val_loss")),
                   "loss delta lo": low, "loss delta hi": high, **_scale(run),
                   "label": run["label"], "run": run["run"], "source": run.get("source")}


def _interleaved_rows(record: dict, known: set[str]) -> Iterator[dict]:
    """Rows of the variants of one interleaved record that have no training run of their own."""
    base = record.get("baseline")
    for name, variant in (record.get("variants") or {}).items():
        label = variant.get("label")
        if name == base or label in known:
            continue
        speed, ratio = variant.get("speedup") or {}, variant.get("memory_ratio") or {}
        ci = speed.get("ci95") or [math.nan, math.nan]
        recipe = variant.get("recipe") or {}
        device = record.get("device") or {}
        estimate = speed.get("value", speed.get("median"))  # records before 2026-11 have only the median
        yield {"family": record["family"], "variant": name, "speed": _number(estimate),
               "speed lo": _number(ci[0]), "speed hi": _number(ci[1]),
               **{short: _number(ratio.get(f"{short}_bytes")) for short in ("params", "grads", "optimizer", "activations")},
               "peak": math.nan, "flops/step": math.nan, "counted/analytic": math.nan,
               "loss delta": math.nan, "loss delta lo": math.nan, "loss delta hi": math.nan,
               "device": describe_device(device.get("type"), device.get("name")), "model": recipe.get("model"),
               "parameters": math.nan, "tokens": math.nan, "world size": _number(record.get("world_size")),
               "label": label, "source": record.get("source")}


def findings_frame(loaded) -> pd.DataFrame:
    """One row per technique variant across every family (see the module's docstring), families
    in site order (:mod:`impls.families`), then by variant."""
    runs = loaded.runs
    rows: list[dict] = []
    names = set(runs["family"]) if not runs.empty else set()
    names |= {r["family"] for r in loaded.interleaved}
    for family in sorted(names, key=families.order_key):
        group = runs[runs["family"] == family].reset_index(drop=True) if not runs.empty else runs
        interleaved = [r for r in loaded.interleaved if r["family"] == family]
        found = list(_run_rows(group, interleaved)) if not group.empty else []
        known = {r["label"] for r in found} | (set(group["label"]) if not group.empty else set())
        for record in interleaved:
            found += list(_interleaved_rows(record, known))
            known |= {r["label"] for r in found}
        rows += found
    _disambiguate(rows)
    return pd.DataFrame(rows, columns=list(FINDINGS_COLUMNS))


# --------------------------------------------------------------------------------------------
# Claims checked
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Claim:
    """One formula the suite checks. ``measure(loaded)`` yields ``(family, subject, ratio,
    note)``: ratio = measured ÷ formula for one record (1.0 = the claim holds exactly)."""
    name: str
    paper: str
    formula: str
    tolerance: float
    measure: Callable[[object], Iterable[tuple[str, str, float, str]]]


def _run_values(loaded, column: str, where: Callable[[dict], bool] = lambda r: True):
    """(family, label, value, row) of every run with a number in ``column``."""
    runs = loaded.runs
    if runs.empty or column not in runs.columns:
        return
    for row in runs.to_dict("records"):
        value = _number(row.get(column))
        if value == value and where(row):
            yield row["family"], row["label"], value, row


def _variant_values(loaded, path: Sequence[str], where: Callable[[dict, dict], bool] = lambda r, v: True):
    """(family, variant name, value, record, variant) of every interleaved variant with a number at
    ``path`` (nested keys)."""
    for record in loaded.interleaved:
        for name, variant in (record.get("variants") or {}).items():
            value = variant
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            number = _number(value)
            if number == number and where(record, variant):
                yield record["family"], name, number, record, variant


def _note(*pairs) -> str:
    return "; ".join(f"{k} {v}" for k, v in pairs if v not in (None, "", {}))


def _model_states(loaded):
    for family, label, ratio, row in _run_values(loaded, "model_states.ratio.total",
                                                 lambda r: r.get("model_states.covered") is True):
        yield family, label, ratio, _note(("stage", row.get("model_states.stage_name")))
    for family, name, ratio, _, v in _variant_values(loaded, ("model_states", "ratio", "total"),
                                                     lambda r, v: (v.get("model_states") or {}).get("covered")):
        ms = v["model_states"]
        off = [k for k, ok in (ms.get("within_tolerance") or {}).items() if ok is False and k != "total"]
        yield family, name, ratio, _note(("stage", ms.get("stage_name")),
                                         ("off:", ", ".join(f"{k} ×{ms['ratio'][k]:.3f}" for k in off)))


def _ops(calls: dict) -> str:
    return ", ".join(f"{op}×{n}" for op, n in sorted((calls or {}).items()))


def _dp_traffic(loaded):
    for family, name, ratio, _, v in _variant_values(
            loaded, ("comm", "check", "ratio_ring"),
            lambda r, v: ((v.get("mesh") or {}).get("tp", 1) == 1 and (v.get("mesh") or {}).get("pp", 1) == 1)):
        check = v["comm"]["check"]
        wanted = ", ".join(c["op"] for c in (check.get("formula") or {}).get("collectives") or [])
        yield family, name, ratio, _note(("stage", (check.get("formula") or {}).get("stage_name")),
                                         ("measured ops", _ops(v["comm"].get("calls"))), ("formula ops", wanted))


def _tp_collectives(loaded):
    for family, name, measured, _, v in _variant_values(loaded, ("comm", "check", "measured_bytes"),
                                                        lambda r, v: "tp" in ((v.get("comm") or {}).get("check") or {})):
        tp = v["comm"]["check"]["tp"]
        yield family, name, measured / tp["bytes"], _note(("measured ops", _ops(v["comm"].get("calls"))),
                                                          ("formula", f"{tp.get('all_reduces')} all-reduces"))


def _pp_traffic(loaded):
    for family, name, measured, _, v in _variant_values(loaded, ("comm", "check", "measured_bytes"),
                                                        lambda r, v: "pp" in ((v.get("comm") or {}).get("check") or {})):
        yield family, name, measured / v["comm"]["check"]["pp"]["bytes"], ""


#: Techniques that leave a layer's saved activations as the formula counts them (parallelism only).
PLAIN = frozenset({"ddp", "zero", "fsdp", "fairscale_fsdp", "oss", "zero-redundancy", "zero_redundancy", "tp",
                   "data_parallel"})


def _plain(techniques) -> bool:
    return isinstance(techniques, list) and all(str(t).split(":")[0] in PLAIN for t in techniques)


def _activations(loaded):
    """Runs and variants whose techniques keep the formula's activations (others change them on
    purpose: compression, checkpointing, sparse attention -- their effect is in the findings)."""
    for family, label, ratio, _ in _run_values(loaded, "layer_activations.measured_over_implementation",
                                               lambda r: _plain(r.get("recipe.techniques"))):
        yield family, label, ratio, ""
    for family, name, ratio, _, _ in _variant_values(
            loaded, ("layer_activations", "measured_over_implementation"),
            lambda r, v: _plain((v.get("recipe") or {}).get("techniques"))):
        yield family, name, ratio, ""


def _tp_reduction(loaded):
    for family, name, impl, _, v in _variant_values(
            loaded, ("layer_activations", "implementation_reduction_vs_no_parallelism"),
            lambda r, v: (v.get("layer_activations") or {}).get("t", 1) > 1):
        layer = v["layer_activations"]
        yield family, name, impl / layer["paper_reduction_vs_no_parallelism"], _note(
            ("t", layer.get("t")), ("sp", layer.get("sp")), ("why", "fp32 and no dropout here; the paper counts fp16 with dropout masks"))


def _bubble(loaded, field: str):
    for family, name, value, _, v in _variant_values(loaded, ("technique_notes", "pp", "bubble_formula")):
        pp = v["technique_notes"]["pp"]
        other = max(pp["measured_idle"]) if field == "measured_idle" and pp.get("measured_idle") else pp.get(field)
        if _number(other) == _number(other) and value:
            yield family, name, _number(other) / value, _note(("schedule", pp.get("schedule")),
                                                              ("m", pp.get("microbatches")), ("v", pp.get("chunks")))


def _checkpoint(loaded):
    """Full recomputation (every block) costs one extra forward of the blocks: counted FLOPs ×4/3."""
    runs = loaded.runs
    if runs.empty:
        return
    for row in runs.to_dict("records"):
        techniques = row.get("recipe.techniques")
        if not (isinstance(techniques, list) and techniques == ["checkpoint:every=1"]):
            continue
        ratio = _number(row.get("flops_per_step")) / _number(row.get("model_flops_per_step"))
        base = _number(row.get("model_flops_per_step"))
        if base == base and ratio == ratio:
            yield row["family"], row["label"], ratio / (4 / 3), "embedding and LM head are outside the checkpointed blocks"


def _note_ratio(technique: str, key: str):
    def measure(loaded):
        column = f"technique_notes.{technique}.{key}"
        for family, label, ratio, _ in _run_values(loaded, column):
            yield family, label, ratio, ""
        for family, name, ratio, _, _ in _variant_values(loaded, ("technique_notes", technique, key)):
            yield family, name, ratio, ""
    return measure


def _mae_encoder(loaded):
    for family, label, ratio, row in _run_values(loaded, "technique_notes.mae.encoder_flops_ratio"):
        expected = _number(row.get("technique_notes.mae.encoder_flops_ratio_expected"))
        if expected:
            yield family, label, ratio / expected, _note(("mask rate", row.get("technique_notes.mae.mask_rate")))


def _eight_bit(loaded):
    for family, label, nbytes, row in _run_values(loaded, "memory.optimizer_state.kinds.8bit.bytes"):
        elements = _number(row.get("memory.optimizer_state.kinds.8bit.elements"))
        if elements:
            yield family, label, nbytes / (2 * elements), "per-block absmax/quantile maps add a little"


def _actcompress(loaded):
    for family, label, ratio, row in _run_values(loaded, "technique_notes.actcompress.compressed_tensors_ratio"):
        expected = _number(row.get("technique_notes.actcompress.dtype_ratio_with_row_scales"))
        if expected:
            yield family, label, ratio / expected, _note(("dtype", row.get("technique_notes.actcompress.dtype")))


def _sparse_storage(loaded):
    for record in loaded.storage:
        for pattern, info in ((record.get("bytes") or {}).get("patterns") or {}).items():
            for fmt, cross in (info.get("crossover") or {}).items():
                ratio = _number((cross or {}).get("measured_over_analytic"))
                if ratio == ratio:
                    yield record["family"], f"{pattern} {fmt}", ratio, _note(("crossover density", cross.get("analytic")))


def _mfu(loaded):
    """Accepted runs, and the refused ones: a refused record's MFU above 1 is exactly what this
    claim is there to show."""
    for family, label, mfu, _ in _run_values(loaded, "mfu"):
        yield family, label, mfu, ""
    for refused in loaded.refused:
        mfu = _number((refused.get("record") or {}).get("mfu"))
        if mfu == mfu:
            yield refused["family"], refused["label"], mfu, "refused: " + "; ".join(refused.get("reasons") or [])


CLAIMS: tuple[Claim, ...] = (
    Claim("ZeRO model states per rank", "Rajbhandari et al. 2020, §3.1/§5",
          "(2+2+K)Ψ, 4Ψ+KΨ/Nd, 2Ψ+(2+K)Ψ/Nd, (2+2+K)Ψ/Nd", 0.02, _model_states),
    Claim("Data-parallel traffic per step", "Rajbhandari et al. 2020, §7",
          "ring bytes of the stage's collectives (2Ψ; stage 3: 3Ψ)", 0.02, _dp_traffic),
    Claim("Megatron TP collectives", "Shoeybi et al. 2019, §3", "2 all-reduces forward + 2 backward per layer",
          0.02, _tp_collectives),
    Claim("Pipeline stage-boundary traffic", "Huang et al. 2019 / Narayanan et al. 2021",
          "activations forward + input gradients backward per boundary and micro-batch", 0.02, _pp_traffic),
    Claim("Activation bytes per layer", "Korthikanti et al. 2022, §4",
          "sbh(34 + 5as/h) adapted to this implementation's dtypes", 0.02, _activations),
    Claim("TP/SP activation reduction", "Korthikanti et al. 2022, Table 2",
          "sbh(10 + 24/t + 5as/(ht)), SP sbh(34/t + 5as/(ht)) ÷ no parallelism", 0.10, _tp_reduction),
    Claim("Pipeline bubble (schedule)", "GPipe; Narayanan et al. 2021",
          "(p−1)/(m+p−1); interleaved ÷ v", 0.02, lambda loaded: _bubble(loaded, "schedule_bubble_max")),
    Claim("Pipeline bubble (measured idle)", "GPipe; Narayanan et al. 2021",
          "(p−1)/(m+p−1); interleaved ÷ v (measured idle also holds send/recv time)", 0.25,
          lambda loaded: _bubble(loaded, "measured_idle")),
    Claim("Checkpointing recompute", "Chen et al. 2016", "one extra forward: ≈ +33% training FLOPs", 0.10,
          _checkpoint),
    Claim("MAE encoder FLOPs", "He et al. 2021", "encoder FLOPs × visible fraction", 0.02, _mae_encoder),
    Claim("MAE FLOPs counted vs analytic", "He et al. 2021", "analytic encoder + decoder FLOPs", 0.05,
          _note_ratio("mae", "counted_vs_analytic_total")),
    Claim("Random-LTD FLOPs saved", "Yao et al. 2022", "analytic saving of the kept-token schedule", 0.05,
          _note_ratio("random_ltd", "counted_vs_analytic_saved")),
    Claim("Sequence-length warm-up FLOPs", "Li et al. 2022", "analytic FLOPs at the short length", 0.05,
          _note_ratio("seqlen_warmup", "counted_vs_analytic_at_short")),
    Claim("Token dropping FLOPs saved", "Hou et al. 2022", "analytic saving of the dropped tokens", 0.05,
          _note_ratio("token_drop", "saved_counted_vs_analytic")),
    Claim("LoRA optimizer state", "Hu et al. 2021", "Adam state of r(m+n) per adapted m×n weight", 0.02,
          _note_ratio("lora", "optimizer_ratio")),
    Claim("GaLore optimizer state", "Zhao et al. 2024", "Adam state of the rank-r projection", 0.02,
          _note_ratio("galore", "optimizer_ratio")),
    Claim("Low-rank factor state", "Sainath et al. 2013 (factorised layers)", "Adam state of r(m+n) factors",
          0.02, _note_ratio("lowrank", "optimizer_ratio")),
    Claim("8-bit optimizer state", "Dettmers et al. 2021", "2 bytes per parameter (two 8-bit states)", 0.05,
          _eight_bit),
    Claim("Sparse embedding gradient", "PyTorch sparse gradients (COO)", "unique rows × (row bytes + index)",
          0.02, _note_ratio("sparse_embedding", "embedding_grad.measured_over_formula")),
    Claim("Sparse storage crossover", "CSR/COO storage formulas", "density where sparse bytes = dense bytes",
          0.02, _sparse_storage),
    Claim("Activation compression", "Chen et al. 2021 (ActNN)", "bytes × dtype ratio (+ row scales)", 0.02,
          _actcompress),
    Claim("MFU ≤ 1", "Chowdhery et al. 2022, App. B", "model FLOP/s ÷ peak ≤ 1", 0.0, _mfu),
)


def claim_checks(loaded) -> pd.DataFrame:
    """Every single check: claim, family, subject (run or variant), measured ÷ formula, note."""
    rows = []
    for claim in CLAIMS:
        for family, subject, ratio, note in claim.measure(loaded):
            rows.append({"claim": claim.name, "family": family, "subject": str(subject), "ratio": ratio,
                         "within": _within(claim, ratio), "note": note})
    return pd.DataFrame(rows, columns=["claim", "family", "subject", "ratio", "within", "note"])


def _within(claim: Claim, ratio: float) -> bool:
    if claim.name == "MFU ≤ 1":
        return ratio <= 1.0
    return abs(ratio - 1.0) <= claim.tolerance + 1e-12


def claims_frame(checks: pd.DataFrame) -> pd.DataFrame:
    """One row per claim with measurements: paper, formula, n, median/min/max ratio, tolerance,
    status (``holds`` when every check is within tolerance, else ``differs: k of n``) and the
    notes of the checks outside it."""
    rows = []
    for claim in CLAIMS:
        mine = checks[checks["claim"] == claim.name]
        if mine.empty:
            continue
        off = mine[~mine["within"].astype(bool)]
        notes = sorted({f"{r.subject}: ×{r.ratio:.3f}" + (f" ({r.note})" if r.note else "")
                        for r in off.itertuples()})
        rows.append({"claim": claim.name, "paper": claim.paper, "formula": claim.formula,
                     "families": ", ".join(sorted(set(mine["family"]), key=families.order_key)),
                     "n": len(mine), "ratio median": float(mine["ratio"].median()),
                     "ratio min": float(mine["ratio"].min()), "ratio max": float(mine["ratio"].max()),
                     "tolerance": claim.tolerance,
                     "status": "holds" if off.empty else f"differs: {len(off)} of {len(mine)}",
                     "outside tolerance": "; ".join(notes[:6]) + (f"; … {len(notes) - 6} more" if len(notes) > 6 else "")})
    return pd.DataFrame(rows)


def markdown(findings: pd.DataFrame, claims: pd.DataFrame) -> str:
    """The two tables for summary.md."""
    parts = ["\n## Findings: what each technique buys (× its family baseline)\n"]
    if not findings.empty:
        shown = findings.drop(columns=["source", "label"])
        parts.append(markdown_table(markdown_safe(shown)))
    parts.append("\n## Claims checked (measured ÷ paper formula)\n")
    if not claims.empty:
        parts.append(markdown_table(markdown_safe(claims)))
    return "\n".join(parts) + "\n"


def _json_rows(frame: pd.DataFrame) -> list[dict]:
    return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
            for row in frame.to_dict("records")]


def write_files(out_dir: Path, findings: pd.DataFrame, checks: pd.DataFrame, claims: pd.DataFrame) -> list[Path]:
    """``findings.csv``, ``claims.csv`` and ``findings.json`` (both tables, every single check, the
    schema version and what each column means) in ``out_dir``, for citation."""
    document = {"schema": SCHEMA_VERSION, "kind": "findings",
                "columns": {"speed": "baseline time per token ÷ the variant's, interleaved rounds, 95% interval",
                            "memory": "each component ÷ the baseline's (exact bytes)",
                            "flops/step": "counted FLOPs per step ÷ the baseline's",
                            "counted/analytic": "counted FLOPs ÷ analytic model FLOPs (6N + 12LHQT)",
                            "loss delta": "final validation loss − the baseline's at the same model-FLOP budget"},
                "findings": _json_rows(findings), "claims": _json_rows(claims), "checks": _json_rows(checks)}
    return [write_text(out_dir / "findings.csv", findings.to_csv(index=False)),
            write_text(out_dir / "claims.csv", claims.to_csv(index=False)),
            write_text(out_dir / "findings.json", json.dumps(document, indent=1, allow_nan=False) + "\n")]


def write_findings(loaded, out_dir: Path) -> tuple[list[Path], pd.DataFrame, pd.DataFrame]:
    """Compute both tables and write their files into ``out_dir``; returns the files, the findings
    and the claims."""
    findings, checks = findings_frame(loaded), claim_checks(loaded)
    claims = claims_frame(checks)
    return write_files(Path(out_dir), findings, checks, claims), findings, claims


class FindingsSection:
    """The report's findings section (:class:`impls.report.section.Section`): the files for
    citation and the two tables at the end of ``summary.md``."""

    name = "findings"

    def frame(self, loaded) -> pd.DataFrame:
        return findings_frame(loaded)

    def figures(self, frame: pd.DataFrame, loaded, out_dir: Path) -> list[Path]:
        if frame.empty:
            return []
        checks = claim_checks(loaded)
        return write_files(out_dir, frame, checks, claims_frame(checks))

    def markdown(self, frame: pd.DataFrame, loaded) -> str:
        return markdown(frame, claims_frame(claim_checks(loaded))) if not frame.empty else ""


SECTION = FindingsSection()
