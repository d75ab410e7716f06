"""Dry-run sweeps: one :func:`impls.dryrun.dry_run` per (model, world size, layout), each row's
per-rank bytes and traffic against their formulas (``etbench dryrun-sweep``).

Layouts (:data:`LAYOUTS`), N ranks, the mesh outermost first (pp, dp, tp; torchtitan's order):

* ``ddp`` -- data parallelism, dp = N (whole model states per rank; the dry run builds torch's
  composable ``replicate``, DDP's semantics: :func:`impls.dryrun._fake_ready` says why);
* ``fsdp`` -- FSDP2 / ZeRO-3 over dp = N;
* ``tp`` -- tensor parallelism over tp = N (where the heads divide);
* ``fsdp+tp`` -- 2-D: tp = 8 inside a node (N/2 below 16 ranks), FSDP over dp = N/tp;
* ``tp+pp`` -- tp = 8 (N/2 below 16), pipeline over pp = N/tp stages (1F1B, m = pp micro-batches);
* ``dp+tp+pp`` -- 3-D: tp = 8, pp = 4 (2 and 2 below 32 ranks), dp = the rest by the default
  data parallelism (replicate over the TP DTensors), 1F1B with m = pp.

Each row: this rank's params/grads/optimizer bytes and their ZeRO formula (Rajbhandari et al.
2020, §5, on the Ψ the rank's stage and TP shard hold), the step's traffic against the
2Ψ/3Ψ + Megatron TP + pipeline p2p formula (:func:`impls.train.comm_check`), the saved activations
of one micro-batch measured against the planner's Korthikanti et al. (2022) prediction for this
rank's stage (:func:`impls.planner.stage_activations` with one micro-batch in flight), the
tracked peak where torch's tracker runs, and the seconds.  A ratio outside 1 ± :data:`TOLERANCE`
gets an ``explanation`` computed from the numbers (FSDP2's dim-0 padding, Adam's per-tensor step
counters, collectives outside the formula).  Rows are written as they finish (``progress``), so a
long sweep shows its table line by line.
"""
from __future__ import annotations

import math

from . import train
from .dryrun import check, dry_run
from .errors import ConfigError
from .measure import model_states as _model_states
from .recipe import Recipe

__all__ = ["LAYOUTS", "TOLERANCE", "layout_mesh", "parse_sweep", "sweep", "table", "table_line"]

#: Layouts a sweep runs: name -> what it is (:func:`layout_mesh` sizes them).
LAYOUTS = {
    "ddp": "data parallelism over all N ranks (dp = N; the dry run builds torch's composable replicate)",
    "fsdp": "FSDP2 (ZeRO-3) over all N ranks (dp = N)",
    "tp": "tensor parallelism over all N ranks (tp = N)",
    "fsdp+tp": "FSDP2 over dp = N/tp, tensor parallelism tp = 8 inside a node (N/2 below 16 ranks)",
    "tp+pp": "tensor parallelism tp = 8 (N/2 below 16 ranks), pipeline pp = N/tp stages (1F1B, m = pp)",
    "dp+tp+pp": "tp = 8, pp = 4 (2 and 2 below 32 ranks), data parallelism over the rest (1F1B, m = pp)",
}
#: Tensor parallelism stays inside a node of this many devices (Megatron-LM's practice).
NODE = 8
#: A row whose model-state or traffic ratio is further than this from 1 carries an ``explanation``
#: (the tolerance of :mod:`impls.measure.model_states`' checks).
TOLERANCE = _model_states.TOLERANCE


def layout_mesh(layout: str, n: int) -> dict[str, int]:
    """The mesh sizes (pp, dp, tp) of ``layout`` on ``n`` ranks (see :data:`LAYOUTS`)."""
    inner = NODE if n >= 2 * NODE else max(1, n // 2)
    if layout in ("ddp", "fsdp"):
        return dict(pp=1, dp=n, tp=1)
    if layout == "tp":
        return dict(pp=1, dp=1, tp=n)
    if layout == "fsdp+tp":
        return dict(pp=1, dp=n // inner, tp=inner)
    if layout == "tp+pp":
        return dict(pp=n // inner, dp=1, tp=inner)
    tp, pp = (NODE, 4) if n >= 4 * NODE else (2, 2)
    return dict(pp=pp, dp=n // (tp * pp), tp=tp)


def _skip(cfg, layout: str, n: int) -> str | None:
    """Why ``layout`` cannot split ``cfg`` over ``n`` ranks (None: it can)."""
    mesh = layout_mesh(layout, n)
    if mesh["pp"] * mesh["dp"] * mesh["tp"] != n:
        return f"{layout} needs N divisible into {mesh}; N={n} is not"
    if layout in ("fsdp+tp", "dp+tp+pp") and mesh["dp"] < 2:
        return f"{layout} at N={n} leaves dp={mesh['dp']} (nothing to shard or replicate over)"
    for dim in ("tp", "pp"):
        if dim in layout.split("+") and mesh[dim] < 2:
            return f"{layout} at N={n} leaves {dim}={mesh[dim]} (nothing to split over)"
    t = mesh["tp"]
    kv = cfg.n_kv_head or cfg.n_head
    if t > cfg.n_head:
        return f"tp={t} exceeds the model's {cfg.n_head} heads"
    for what, size in (("heads", cfg.n_head), ("KV heads", kv), ("d_ff", cfg.d_ff)):
        if size % t:
            return f"tp={t} does not divide the model's {size} {what}"
    if mesh["pp"] > 1 and cfg.n_layer % mesh["pp"]:
        return f"pp={mesh['pp']} does not divide the model's {cfg.n_layer} layers"
    return None


def _sweep_recipe(model: str, cfg, world_size: int, layout: str, batch_size: int, seq_len: int,
                  fields: dict) -> Recipe:
    """The recipe of one sweep point.  The data default to a synthetic source over the model's own
    vocabulary (the model follows the data's vocabulary, so the recipe's default, 64 symbols, would
    shrink a 50K-token embedding to 64 rows).  A pipeline runs 1F1B with m = pp micro-batches of
    ``batch_size`` rows (torch's 1F1B needs m >= pp)."""
    mesh = layout_mesh(layout, world_size)
    names = [name for name in ("fsdp", "tp") if name in layout.split("+")]
    if mesh["pp"] > 1:
        names.append(f"pp:schedule=1f1b,microbatches={mesh['pp']}")
        batch_size *= mesh["pp"]
    extra = dict(techniques=names, mesh={k: v for k, v in mesh.items() if k != "dp" and v > 1})
    vocab = cfg.vocab_size - (0 if cfg.causal else 1)  # an encoder's [MASK] token is added to the data's
    return Recipe(**{**dict(model=model, data=f"synthetic:vocab={vocab},order=1", batch_size=batch_size,
                            seq_len=seq_len, device="cpu", steps=1, eval_batches=1), **fields, **extra})


def _counts(record: dict):
    """The planner's parameter counts of the model the dry run built (its config, the data's
    vocabulary included)."""
    from . import planner, zoo

    return planner.counts_of_config(zoo.TransformerConfig(**record["model_config"]))


def _local_shapes(counts, record: dict) -> list[tuple[int, ...]]:
    """The shapes this rank's pipeline stage and tensor-parallel shard hold
    (:func:`impls.planner.stage_tensors`), before data-parallel sharding."""
    from . import planner

    mesh, n = record["mesh"], record["world_size"]
    pp, tp = mesh.get("pp", 1), mesh.get("tp", 1)
    return planner.stage_tensors(counts, tp, pp, record["rank"] // (n // pp))


def _dp_rank(record: dict) -> int:
    """This rank's index along ``dp`` (mesh order pp, dp, cp, tp: tp varies fastest)."""
    mesh = record["mesh"]
    return (record["rank"] // (mesh.get("cp", 1) * mesh.get("tp", 1))) % mesh.get("dp", 1)


def _fsdp_elements(shapes, n: int, rank: int) -> tuple[int, int]:
    """(elements of this rank's padded shards, of its unpadded rows): FSDP2 splits each parameter's
    dim 0 into chunks of ceil(d0/n) rows and pads every rank's shard to that size."""
    padded = held = 0
    for shape in shapes:
        d0, rest = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
        chunk = -(-d0 // n)
        padded += chunk * rest
        held += max(0, min(chunk, d0 - rank * chunk)) * rest
    return padded, held


def _pct(a: float, b: float) -> str:
    return f"{(a / b - 1) * 100:+.2f}%" if b else "n/a"


def _explain(record: dict, layout: str, shapes) -> str | None:
    """Why a ratio is outside 1 ± TOLERANCE, from the record's own numbers (None: none is)."""
    states, comm = record.get("model_states") or {}, record.get("comm") or {}
    ratios = dict(states.get("ratio") or {})
    off_states = {k: r for k, r in ratios.items() if r is not None and abs(r - 1) > TOLERANCE}
    off_comm = comm.get("ratio") is not None and abs(comm["ratio"] - 1) > TOLERANCE
    if not off_states and not off_comm:
        return None
    n, rank, mem = record["mesh"].get("dp", 1), _dp_rank(record), record["memory"]
    pb, gb, k = states.get("param_bytes", 4.0), states.get("grad_bytes", 4.0), states.get("k", 8.0)
    tensors = sum(kind.get("tensors", 0) for kind in (mem.get("optimizer_state") or {}).get("kinds", {}).values())
    parts = []
    if off_states:
        measured, formula = states["measured"], states["formula"]
        why = [f"model states ×{ratios.get('total', float('nan')):.4f} of the formula "
               f"({', '.join(f'{c} {_pct(measured[c], formula[c])}' for c in ('params', 'grads', 'optimizer'))})"]
        if "fsdp" in layout:
            padded, held = _fsdp_elements(shapes, n, rank)
            psi_n = states["psi"] / states["n_d"]
            local = mem["params_bytes"] / pb
            exact = "exactly the measured" if padded == local else f"vs {local:.0f} measured"
            why.append(f"FSDP2 pads each parameter's dim 0 to a multiple of N_d={n}: this rank's shards hold "
                       f"sum ceil(d0/N_d)*rest = {padded} elements ({exact}) vs Psi/N_d = {psi_n:.1f} "
                       f"({_pct(padded, psi_n)}); params and grads are stored padded")
            steps = mem["optimizer_bytes"] - k * held
            why.append(f"optimizer = {k:g} B x {held} unpadded elements + {steps:.0f} B"
                       + (f" = {tensors} per-tensor step counters x 4 B" if steps == 4 * tensors
                          else " (not step counters alone)")
                       + f"; vs K*Psi/N_d {_pct(mem['optimizer_bytes'], k * psi_n)}")
        else:
            steps = 4 * tensors
            rest = measured["optimizer"] - formula["optimizer"]
            why.append(f"optimizer {rest:+.0f} B vs the formula, of which {steps} B are {tensors} per-tensor step "
                       f"counters x 4 B")
        parts.append("; ".join(why))
    if off_comm:
        by_op = comm.get("traffic_bytes_by_op") or {}
        why = [f"traffic ×{comm['ratio']:.4f} of the formula ({comm['bytes_per_step']:.0f} B vs "
               f"{comm['formula_bytes']:.0f} B; by op: {', '.join(f'{op} {b:.0f} B' for op, b in by_op.items())})"]
        if layout == "fsdp":
            shard = mem["params_bytes"]
            ag, rs = by_op.get("all_gather", 0), by_op.get("reduce_scatter", 0)
            other = comm["bytes_per_step"] - ag - rs
            padded, formula = 3 * (n - 1) * shard, 3 * (n - 1) / n * states["psi"] * pb
            why.append(f"all-gathers = {ag / ((n - 1) * shard):.3f} x and reduce-scatters = "
                       f"{rs / ((n - 1) * mem['grads_bytes']):.3f} x (N-1) x the padded shard ({shard} B): padded "
                       f"3(N-1) x shard = {padded} B vs 3(N-1)/N x Psi x {pb:g} B = {formula:.0f} B "
                       f"({_pct(padded, formula)}); other ops {other:.0f} B")
        else:
            tp = (comm.get("check") or {}).get("tp") or {}
            why.append(f"formula: {tp.get('all_reduces')} activation all-reduces = {tp.get('ring_bytes', 0):.0f} B; "
                       f"measured minus formula {comm['bytes_per_step'] - comm['formula_bytes']:+.0f} B")
        parts.append("; ".join(why))
    return " | ".join(parts)


def _predicted_activations(counts, record: dict, micro_rows: int, seq_len: int) -> dict:
    """The planner's saved activations of one micro-batch on this rank
    (:func:`impls.planner.stage_activations`: Korthikanti et al. 2022, §4, Eq. 1–2, with the fused
    attention's log-sum-exp), for the record's mesh and this rank's pipeline stage (pp is the
    outermost mesh dimension: stage = rank // (N/pp)), one micro-batch in flight -- what the dry
    run's meter measures."""
    from . import planner

    precision = record["precision"]
    if precision not in planner.PRECISIONS:
        return dict(bytes=None, reason=f"the planner has no precision {precision!r}")
    mesh, n = record["mesh"], record["world_size"]
    pp, tp, dp = mesh.get("pp", 1), mesh.get("tp", 1), mesh.get("dp", 1)
    stage = record["rank"] // (n // pp)
    zero = 3 if "fsdp" in record["techniques"] else 0
    plan = planner.Layout(dp, tp, pp, zero, "gpipe" if pp > 1 else "none", 1, micro_rows, 1, False)
    total, _, names = planner.stage_activations(counts, plan, stage, seq_len, planner.PRECISIONS[precision], "flash")
    return dict(bytes=total, formulas=names, stage=stage)


def _row(record: dict, model: str, layout: str, shapes, predicted: dict) -> dict:
    states, comm, mem = record.get("model_states") or {}, record.get("comm") or {}, record["memory"]
    formula, ratio = states.get("formula") or {}, states.get("ratio") or {}
    row = dict(model=model, world_size=record["world_size"], layout=layout, mesh=record["mesh"], rank=record["rank"],
               params=record["params"], precision=record["precision"],
               params_bytes=mem["params_bytes"], params_formula_bytes=formula.get("params"),
               grads_bytes=mem["grads_bytes"], grads_formula_bytes=formula.get("grads"),
               optimizer_bytes=mem["optimizer_bytes"], optimizer_formula_bytes=formula.get("optimizer"),
               model_states_bytes=(states.get("measured") or {}).get("total"),
               model_states_formula_bytes=formula.get("total"), model_states_ratio=ratio.get("total"),
               model_states_ratios={k: ratio.get(k) for k in ("params", "grads", "optimizer")},
               traffic_bytes=comm.get("bytes_per_step"), traffic_formula_bytes=comm.get("formula_bytes"),
               traffic_ratio=comm.get("ratio"), traffic_bytes_by_op=comm.get("traffic_bytes_by_op"),
               peak_bytes=record["peak"].get("bytes"), peak_bytes_by_kind=record["peak"].get("bytes_by_kind"),
               predicted_activation_bytes=predicted.get("bytes"),
               predicted_activation_formulas=predicted.get("formulas"),
               activation_bytes=record.get("activation_bytes"),
               activation_ratio=(record["activation_bytes"] / predicted["bytes"]
                                 if record.get("activation_bytes") and predicted.get("bytes") else None),
               build_seconds=record["build_seconds"], wall_seconds=record["wall_seconds"])
    if record.get("substituted"):
        row["substituted"] = record["substituted"]
    explanation = _explain(record, layout, shapes)
    if explanation:
        row["explanation"] = explanation
    return row


def _check_list(values, what: str, valid=None) -> list:
    values = list(values)
    if not values:
        raise ConfigError(f"{what}: give at least one")
    bad = [v for v in values if valid is not None and v not in valid]
    if bad:
        raise ConfigError(f"unknown {what} {', '.join(map(repr, bad))}; valid: {', '.join(valid)}")
    return values


def _plan_sweep(models, world_sizes, layouts, batch_size, seq_len, rank, fields) -> list[tuple]:
    """Every (model, world size, layout, recipe or None, skip reason), checked before any work."""
    from . import zoo

    models = _check_list(models, "model", list(zoo.CONFIGS))
    layouts = _check_list(layouts, "layout", list(LAYOUTS))
    world_sizes = _check_list(world_sizes, "world size")
    for n in world_sizes:
        if not (isinstance(n, int) and not isinstance(n, bool) and n >= 2):
            raise ConfigError(f"world size must be an integer >= 2, got {n!r}")
    overrides = dict(fields.get("model_args") or {})
    jobs = []
    for model in models:
        cfg = zoo.config(model, **overrides)
        for n in world_sizes:
            for layout in layouts:
                skip = _skip(cfg, layout, n)
                recipe = None
                if skip is None:
                    recipe = _sweep_recipe(model, cfg, n, layout, batch_size, seq_len, fields)
                    check(recipe, n, rank)  # bad input: one line, before any run
                jobs.append((model, n, layout, recipe, skip))
    return jobs


def sweep(models, world_sizes, layouts, *, batch_size: int = 1, seq_len: int = 1024, rank: int = 0,
          fields: dict | None = None, progress=None, done: list[dict] | None = None) -> list[dict]:
    """One :func:`dry_run` per (model, world size, layout) (:data:`LAYOUTS`); one row each
    (``skipped`` with the reason where the layout cannot split the model over N ranks).  ``fields``: further Recipe fields (``data``, ``model_args``...).  Every
    combination is checked before the first run (bad input: one-line :class:`ConfigError`).
    ``progress``: called with each row as it is done; ``done``: rows of an earlier run of the same
    sweep (same batch, sequence, rank and fields: the caller checks), reused, not rerun."""
    fields = dict(fields or {})
    jobs = _plan_sweep(models, world_sizes, layouts, batch_size, seq_len, rank, fields)
    finished = {(r["model"], r["world_size"], r["layout"]): r for r in done or () if not r.get("skipped")}
    rows = []
    for model, n, layout, recipe, skip in jobs:
        if (model, n, layout) in finished:
            row = finished[(model, n, layout)]
        elif recipe is None:
            row = dict(model=model, world_size=n, layout=layout, skipped=skip)
        else:
            record = dry_run(recipe, n, rank)
            counts = _counts(record)
            shapes = _local_shapes(counts, record)
            predicted = _predicted_activations(counts, record, batch_size, seq_len)
            row = _row(record, model, layout, shapes, predicted)
        rows.append(train.strict_json(row))
        if progress is not None:
            progress(rows[-1])
    return rows


def parse_sweep(models: str, world_sizes: str, layouts: str) -> tuple[list[str], list[int], list[str]]:
    """The comma-separated flags of ``etbench dryrun-sweep``; a bad value is a one-line ConfigError."""
    def split(text: str, flag: str) -> list[str]:
        items = [t.strip() for t in (text or "").split(",")]
        if not text or any(not t for t in items):
            raise ConfigError(f"{flag}: give a comma-separated list without empty items, got {text!r}")
        return items

    sizes = []
    for item in split(world_sizes, "--world-sizes"):
        try:
            sizes.append(int(item))
        except ValueError:
            raise ConfigError(f"--world-sizes: {item!r} is not an integer") from None
    return split(models, "--model"), sizes, split(layouts, "--layouts")


def _mib(x) -> str:
    return "-" if x is None else f"{x / (1 << 20):.1f}"


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def table_line(row: dict) -> str:
    """One row as a line of text (``etbench dryrun-sweep``)."""
    head = f"{row['model']:<10} {row['layout']:<8} N={row['world_size']:<5}"
    if row.get("skipped"):
        return f"{head} skipped: {row['skipped']}"
    return (f"{head} params {_mib(row['params_bytes'])} MiB (formula {_mib(row['params_formula_bytes'])}), "
            f"grads {_mib(row['grads_bytes'])}, optimizer {_mib(row['optimizer_bytes'])} MiB; "
            f"states ×{_ratio(row['model_states_ratio'])}; traffic {_mib(row['traffic_bytes'])} MiB/step "
            f"(formula {_mib(row['traffic_formula_bytes'])}) ×{_ratio(row['traffic_ratio'])}; "
            f"activations {_mib(row['activation_bytes'])} MiB (planner {_mib(row['predicted_activation_bytes'])}) "
            f"×{_ratio(row['activation_ratio'])}; peak {_mib(row['peak_bytes'])} MiB; "
            f"{row['wall_seconds']:.1f} s" + (" [explanation]" if row.get("explanation") else ""))


def table(rows: list[dict]) -> str:
    """Every row, one line each, then each explanation."""
    lines = [table_line(row) for row in rows]
    for row in rows:
        if row.get("explanation"):
            lines.append(f"{row['model']} {row['layout']} N={row['world_size']}: {row['explanation']}")
    return "\n".join(lines)
