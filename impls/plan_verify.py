"""``etbench plan --verify K``: the planner's top K layouts dry-run, measured beside predicted.

The planner (:mod:`impls.planner`) predicts a layout's per-device memory by component and its
traffic from formulas; :func:`impls.dryrun.dry_run` builds rank 0 of the same layout as an
etbench run would (``train.prepare`` on fake tensors under the fake process group) and steps it
once, so the bytes it holds and the collectives it issues are measured, not modelled.  This
module maps a planner :class:`~impls.planner.Layout` to an etbench
:class:`~impls.recipe.Recipe` (:func:`layout_recipe`), dry-runs the top K (:func:`verify`) and
puts the two side by side (:func:`table`), each measured value with its ratio to the prediction.

The mapping (:func:`layout_recipe`)
-----------------------------------
* data parallelism: ZeRO stage 0 is etbench's default data parallelism (``ddp`` at dp > 1: no
  technique named); stages 1-3 by :data:`ZERO_TECHNIQUES` -- by default ZeRO-1/2 are DeepSpeed's
  ``zero:stage=1|2`` (the flat ⌈Ψ/dp⌉ partition the planner assumes, :data:`planner.FORMULAS`
  ``zero_flat_partition``) and ZeRO-3 is ``fsdp`` (FSDP2, whose dim-0 padding the planner's
  stage-3 formula follows); ``impl="native"`` takes ``zero-redundancy`` (torch) and ``oss``
  (fairscale) for stages 1-2, ``impl="deepspeed"`` DeepSpeed for all three;
* tensor parallelism: ``tp`` (``tp:sp=true`` with sequence parallelism), mesh ``tp=t``;
* pipeline parallelism: ``pp:schedule=S,microbatches=m[,chunks=v]``, mesh ``pp=p``; the
  recipe's ``batch_size`` is then b·m (etbench's pipeline cuts the rank's batch into m);
* m > 1 micro-batches without a pipeline: ``grad_accum:steps=m``, ``batch_size`` b;
* full activation checkpointing: ``checkpoint`` (every block, policy full);
* precision: the planner's ``fp32`` is etbench's default (fp32 parameters, gradients and AdamW
  states: 4 + 4 + 8 bytes per parameter and a 4-byte step per tensor), exactly;
  ``mixed`` (the ZeRO paper's 2 + 2 + 12) is the ``bf16`` technique, which only DeepSpeed turns
  into 16-bit parameters and gradients with an fp32 master copy (the paper's layout); elsewhere it
  is autocast over fp32 parameters (4 + 4 + 8), and under FSDP2 (``fsdp:mp=bf16``) bf16 gathered
  parameters over fp32 shards -- each mapping's ``notes`` say what differs, and the measured
  ratios show it (parameters ×2, optimizer ×8/12 where the states stay fp32);
* the data: a synthetic source over the model's own vocabulary (the model follows the data's
  vocabulary, so the recipe default of 64 symbols would shrink a 32K-token embedding).

What is compared (:func:`verify`, one row per layout, rank 0)
-------------------------------------------------------------
Rank 0 sits on pipeline stage 0 and holds the largest FSDP2 shard, so its predicted bytes are the
planner's formulas for stage 0 (:func:`planner.model_state_bytes` of
:func:`planner.stage_tensors`, :func:`planner.stage_activations`), not the worst stage the
ranking uses.  Traffic: the dry run's ring bytes per step (nccl-tests' bus factors,
:mod:`impls.measure.comm`) against the planner's DP + TP + PP bytes, recovered exactly from its
times (each component is bytes / bandwidth: ``dp_comm_total`` × link, ``tp_comm`` × TP link,
``pp_p2p`` × link).  Activations where the record has them (``activation_bytes``: what one
micro-batch's forward saves on rank 0) against the planner's stage-0 terms for one micro-batch in
flight, without the recomputed layer's working set (the planner's memory column, all in-flight
micro-batches, is kept beside it as ``activations_in_flight``); the terms follow the plan's
``--attention`` (``stored`` counts the s×s scores, which etbench's fused attention does not keep).

What a dry run cannot do (it raises :class:`~impls.errors.ConfigError`: DeepSpeed's engines, a
technique conflict such as ZeRO with a pipeline, ...) is recorded as ``not verified: <reason>``;
any other error of a dry run as ``failed: <type>: <message>`` -- one layout's failure never costs
the plan its other rows.
"""
from __future__ import annotations

import dataclasses
import time

from . import planner
from .errors import ConfigError
from .recipe import Recipe

#: The etbench technique of each ZeRO stage at dp > 1, by implementation (stage 0: the default
#: data parallelism, DDP, no technique named).
ZERO_TECHNIQUES = {
    "default": {1: "zero:stage=1", 2: "zero:stage=2", 3: "fsdp"},
    "deepspeed": {1: "zero:stage=1", 2: "zero:stage=2", 3: "zero:stage=3"},
    "native": {1: "zero-redundancy", 2: "oss", 3: "fsdp"},
}
#: What etbench holds per parameter wherever the states stay fp32 (the notes of the mixed mappings).
_FP32_STATES = "fp32 parameters, gradients and AdamW moments (4 + 4 + 8 B/param, + 4 B step per tensor)"


def _data(cfg, seq_len: int) -> str:
    """A synthetic source over the model's own vocabulary, rows long enough for ``seq_len``."""
    vocab = cfg.vocab_size - (0 if cfg.causal else 1)  # an encoder's [MASK] token is added to the data's
    rows = f",row_len={seq_len + 1}" if seq_len + 1 > 4096 else ""
    return f"synthetic:vocab={vocab},order=1{rows}"


def _dp_technique(layout: planner.Layout, precision: str, impl: str) -> tuple[list[str], list[str]]:
    """(techniques, notes) of the layout's data parallelism and precision."""
    if impl not in ZERO_TECHNIQUES:
        raise ConfigError(f"ZeRO implementation {impl!r} is not valid; valid: {', '.join(ZERO_TECHNIQUES)}")
    zero = ZERO_TECHNIQUES[impl].get(layout.zero_stage) if layout.dp > 1 else None
    deepspeed = zero is not None and zero.startswith("zero:")
    techniques, notes = [], []
    if precision == "mixed":
        if zero == "fsdp":
            zero = "fsdp:mp=bf16"
            notes.append("mixed -> fsdp:mp=bf16: bf16 gathered parameters and compute over " + _FP32_STATES
                         + ", not 2 + 2 + 12; all-gathers move bf16, reduce-scatters fp32")
        else:
            techniques.append("bf16")
            notes.append("mixed -> DeepSpeed bf16 mode: 16-bit parameters and gradients, fp32 master copy and "
                         "moments (2 + 2 + 12 B/param, the planner's)" if deepspeed else
                         "mixed -> bf16 autocast over " + _FP32_STATES + ", not 2 + 2 + 12; activations a mix of "
                         "bf16 (matmul outputs) and fp32 (norms, softmax)")
    elif deepspeed:
        notes.append("DeepSpeed keeps an fp32 master partition even in fp32: optimizer 12 B/param over dp, "
                     "not the planner's 8")
    if zero in ("zero-redundancy", "oss"):
        notes.append(f"{zero} balances whole tensors over the ranks, not the planner's flat ceil(Psi/dp) split")
    if zero is not None:
        techniques.append(zero)
    return techniques, notes


def layout_recipe(layout: planner.Layout, model: str, seq_len: int, *, precision: str = "fp32",
                  impl: str = "default", model_overrides: dict | None = None, **fields) -> tuple[Recipe, list[str]]:
    """The etbench :class:`Recipe` of a planner ``layout`` (see the module's docstring) and the
    notes on what it holds differently from the planner's assumptions; ``fields``: further Recipe
    fields (``steps``, ``device``, ``data``...).  An unknown precision or ZeRO implementation is a
    one-line ConfigError; whether etbench can run the combination is checked where it runs."""
    from . import zoo

    if precision not in planner.PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not valid; valid: {', '.join(planner.PRECISIONS)}")
    cfg = zoo.config(model, **(model_overrides or {}))
    techniques, notes = _dp_technique(layout, precision, impl)
    mesh = {}
    if layout.tp > 1:
        techniques.append("tp:sp=true" if layout.sequence_parallel else "tp")
        mesh["tp"] = layout.tp
    batch = layout.micro_batch_size
    if layout.pp > 1:
        options = f"schedule={layout.schedule},microbatches={layout.micro_batches}"
        techniques.append(f"pp:{options}" + (f",chunks={layout.chunks}" if layout.schedule == "interleaved" else ""))
        mesh["pp"] = layout.pp
        batch *= layout.micro_batches
    elif layout.micro_batches > 1:
        techniques.append(f"grad_accum:steps={layout.micro_batches}")
    if layout.checkpointing:
        techniques.append("checkpoint")
    base = dict(model=model, data=_data(cfg, seq_len), batch_size=batch, seq_len=seq_len, device="cpu", steps=1,
                eval_batches=1, model_args=dict(model_overrides or {}))
    return Recipe(**{**base, **fields, "techniques": techniques, "mesh": mesh}), notes


def predicted_rank0(counts: planner.ModelCounts, prediction: planner.Prediction, hw: planner.Hardware,
                    seq_len: int, precision: planner.Precision, attention: str) -> dict:
    """The planner's numbers for rank 0 (pipeline stage 0, the largest FSDP2 shard): model states
    and activations by the stage-0 formulas, traffic by component recovered from its times."""
    lay, tm = prediction.layout, prediction.time
    shapes = planner.stage_tensors(counts, lay.tp, lay.pp, 0, lay.chunks)
    states = planner.model_state_bytes(shapes, lay.dp, lay.zero_stage, precision)
    in_flight, _, _ = planner.stage_activations(counts, lay, 0, seq_len, precision, attention)
    # what the dry run meters: the tensors one micro-batch's forward saves (1F1B with m = 1 holds
    # exactly one on every stage), without the layer a recomputing backward rebuilds
    one = dataclasses.replace(lay, schedule="1f1b" if lay.pp > 1 else "none", chunks=1, micro_batches=1)
    activations, terms, _ = planner.stage_activations(counts, one, 0, seq_len, precision, attention)
    activations -= terms.get("recompute_working_layer", 0.0)
    traffic = {"dp": tm["dp_comm_total"] * hw.link_bytes_per_s, "tp": tm["tp_comm"] * hw.tp_bytes_per_s,
               "pp": tm["pp_p2p"] * hw.link_bytes_per_s}
    return dict(states, activations=activations, activations_in_flight=in_flight, traffic=sum(traffic.values()),
                traffic_by_component=traffic)


def measured_of(record: dict) -> dict:
    """A dry run's per-rank bytes and traffic (None where it has none: traffic at one rank)."""
    mem, comm = record["memory"], record.get("comm") or {}
    activations = record.get("activation_bytes", mem.get("activations_bytes"))
    return dict(params=mem["params_bytes"], grads=mem["grads_bytes"], optimizer=mem["optimizer_bytes"],
                activations=activations, traffic=comm.get("bytes_per_step"),
                traffic_by_op=comm.get("traffic_bytes_by_op"))


def _ratio(measured, predicted):
    if measured is None or predicted is None:
        return None
    if predicted == 0:
        return 1.0 if measured == 0 else None
    return measured / predicted


def verify_one(prediction: planner.Prediction, result: planner.LayoutRanking, *, impl: str = "default",
               rank: int = 0) -> dict:
    """Dry-run one ranked layout and compare (a row of :func:`verify`)."""
    from . import dryrun

    lay, hw = prediction.layout, result.hardware
    counts = planner.model_counts(result.model)
    predicted = predicted_rank0(counts, prediction, hw, result.seq_len, result.precision, result.attention)
    row = dict(label=lay.label, layout=dataclasses.asdict(lay), world_size=hw.devices, rank=rank,
               predicted=predicted, predicted_step_seconds=prediction.step_time)
    t0 = time.perf_counter()
    try:
        recipe, notes = layout_recipe(lay, result.model, result.seq_len, precision=result.precision.name, impl=impl)
        row.update(techniques=list(recipe.techniques), mesh=dict(recipe.mesh), batch_size=recipe.batch_size,
                   notes=notes)
        record = dryrun.dry_run(recipe, hw.devices, rank)
    except ConfigError as e:
        row.update(status="not verified", reason=str(e), seconds=time.perf_counter() - t0)
        return row
    except Exception as e:  # noqa: BLE001 - one layout's failure is its row's, not the plan's
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        row.update(status="failed", reason=f"{type(e).__name__}: {first[:300]}", seconds=time.perf_counter() - t0)
        return row
    measured = measured_of(record)
    row.update(status="verified", measured=measured, seconds=record["wall_seconds"],
               ratio={k: _ratio(measured[k], predicted[k])
                      for k in ("params", "grads", "optimizer", "activations", "traffic")},
               params_counted=record["params"], precision_measured=record["precision"],
               model_states_vs_zero_formula=(record.get("model_states") or {}).get("ratio"))
    return row


def verify(result: planner.LayoutRanking, k: int, *, impl: str = "default", rank: int = 0, progress=None) -> list[dict]:
    """Dry-run the top ``k`` ranked layouts of ``result`` as rank ``rank`` (one row each, best
    first); ``progress`` is called with each row as it is done."""
    if not (isinstance(k, int) and not isinstance(k, bool) and k >= 0):
        raise ConfigError(f"--verify {k!r} is invalid; valid: an integer >= 0")
    rows = []
    for i, prediction in enumerate(result.ranked[:k], 1):
        row = dict(plan_rank=i, **verify_one(prediction, result, impl=impl, rank=rank))
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

def _cell(row: dict, key: str, unit: float) -> str:
    """``pred/meas xratio`` in ``unit`` bytes (``-`` where there is no measurement)."""
    pred, meas = row["predicted"].get(key), row["measured"].get(key)
    if meas is None:
        return f"{pred / unit:.2f}/-" if pred is not None else "-"
    ratio = row["ratio"].get(key)
    return f"{pred / unit:.2f}/{meas / unit:.2f}" + (f" x{ratio:.3f}" if ratio is not None else "")


_UNITS = (("GiB", planner.GIB), ("MiB", 1 << 20), ("KiB", 1 << 10))


def table(rows: list[dict]) -> str:
    """The verified rows: each component predicted/measured (GiB, MiB or KiB: the largest unit
    under the largest predicted value) and measured/predicted, for rank 0."""
    cols = ("params", "grads", "optimizer", "traffic", "activations")
    largest = max([row["predicted"][c] for row in rows for c in cols] + [0])
    name, unit = next(((n, u) for n, u in _UNITS if largest >= u), _UNITS[-1])
    head = f"{'#':>3}  {'layout':<42} " + " ".join(f"{c + ' p/m ' + name:<24}" for c in cols) + f" {'dry s':>6}"
    lines = [f"verified: the top {len(rows)} dry-run as rank {rows[0]['rank'] if rows else 0} of "
             f"{rows[0]['world_size'] if rows else '-'} (impls.dryrun: fake tensors, fake process group); "
             "predicted = the planner's formulas for that rank (pipeline stage 0); traffic = ring bytes/step; "
             "x = measured/predicted", head, "-" * len(head)]
    for row in rows:
        start = f"{row['plan_rank']:>3}  {row['label']:<42} "
        if row["status"] != "verified":
            lines.append(start + f"{row['status']}: {row['reason']}")
            continue
        lines.append(start + " ".join(f"{_cell(row, c, unit):<24}" for c in cols) + f" {row['seconds']:>6.1f}")
    for row in rows:
        for note in row.get("notes") or []:
            lines.append(f"  note ({row['label']}): {note}")
    return "\n".join(lines)
