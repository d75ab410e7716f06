"""Dry runs at scale: one rank of an N-rank run, in one process, without allocating memory.

:func:`dry_run` joins PyTorch's ``fake`` process group (``FakeStore``: every collective returns at
once and moves nothing) as rank ``rank`` of ``world_size``, and inside a
``torch._subclasses.fake_tensor.FakeTensorMode`` runs the very build a real run does
(:func:`impls.train.prepare`: validation, the model on ``meta``, the techniques' stages -- FSDP2's
``fully_shard``, DTensor tensor parallelism -- and the engine), then one training step of the
engine (:meth:`train_step`: forward, backward, optimizer step).  Tensors are fake: shapes, dtypes
and storages without data, so a 64-rank FSDP run of a billion-parameter model is planned on a
laptop.  The record (kind :data:`impls.families.DRYRUN`) holds what a real run measures of its
first step and what does not depend on values:

* ``memory``: this rank's params/grads/optimizer bytes after the first update
  (:func:`impls.train.session_state_bytes`, the meters a real run uses), and ``model_states``:
  those against the ZeRO paper's formula (:func:`impls.train.model_states_check`);
* ``comm``: the collectives of the step as :class:`~impls.measure.comm.CommCounter` counts them
  (calls and bytes per op) and their check against the 2Ψ/3Ψ volumes
  (:func:`impls.train.comm_check`) -- in a real run the counted step is the first (untimed) one,
  as here;
* ``peak``: the step's peak bytes from torch's ``MemTracker`` (``FSDPMemTracker`` under FSDP2),
  where it runs, else why not, and by kind at the peak (``bytes_by_kind``).  The first dry run of a
  model's shapes in a process tracks more optimizer bytes than a repeat of it (torch 2.13: AdamW's
  foreach ops are dispatched twice on fake tensors the first time, with extra ``empty_strided``
  outputs; micro fsdp/ws2 18.8 vs 8.5 MB), so a peak is the first-encounter one;
* ``wall_seconds``: the dry run's own time.

:func:`sweep` runs one dry run per (model, world size, layout) -- ``fsdp`` (dp = N) or ``tp``
(tp = N) -- and returns one row each: the per-rank model-state bytes and traffic against their
formulas, the tracked peak, the planner's predicted activations for the layout, the seconds, and,
where a ratio is outside 1 ± :data:`TOLERANCE`, an ``explanation`` computed from the numbers (FSDP2's
dim-0 padding of uneven shards, the optimizer's per-tensor step counters, collectives outside the
formula).  ``etbench dryrun-sweep`` prints the table.

Values are fake: where code reads one (``loss.item()``, the gradient norm, Adam's step count)
it reads 1, so the losses, norms and anything data-dependent are not measured.  Techniques whose
engine or wrapper needs real storage are refused before any work (:data:`REFUSED`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import dist, techniques, train
from .errors import ConfigError
from .families import DRYRUN
from .measure import model_states as _model_states
from .measure.comm import CommCounter
from .provenance import SCHEMA_VERSION, provenance
from .recipe import Recipe

__all__ = ["LAYOUTS", "REFUSED", "TOLERANCE", "check", "dry_run", "parse_sweep", "sweep", "table", "table_line"]

#: Techniques a dry run refuses, and why (before any work).
REFUSED = {
    "ddp": "DistributedDataParallel's C++ reducer verifies and buckets real parameter storage (fake tensors have "
           "none); dry-run data parallelism with fsdp",
    "zero-redundancy": "it wraps the model in DistributedDataParallel, whose C++ reducer needs real storage",
    "zero": "DeepSpeed's engine initialises its own process group and flat buffers on real storage",
    "onebit": "DeepSpeed's engine initialises its own process group and flat buffers on real storage",
    "oss": "fairscale's OSS/ShardedDDP broadcast and reduce real storage",
    "fairscale-fsdp": "fairscale's FullyShardedDataParallel needs CUDA and real flat buffers",
    "data-parallel": "nn.DataParallel replicates over real local GPUs, not ranks",
    "pp": "the pipeline engine exchanges activations with point-to-point sends that the fake process group does "
          "not pair",
}


class _OneScalar(TorchDispatchMode):
    """Answer every read of a fake tensor's value (``.item()``, ``float(t)``) with 1: the loss, the
    gradient norm, Adam's step count.  Nothing measured here depends on them."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return 1.0 if args[0].dtype.is_floating_point else 1
        return func(*args, **(kwargs or {}))


def check(recipe: Recipe, world_size: int, rank: int = 0) -> list[techniques.TechniqueSpec]:
    """Refuse, before any work, what a dry run cannot do (one-line :class:`ConfigError`); returns
    the recipe's techniques with the defaults a real run adds (DDP for data parallelism)."""
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ConfigError(f"world size must be an integer >= 1, got {world_size!r}")
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise ConfigError(f"rank must be an integer in 0..{world_size - 1}, got {rank!r}")
    named = [techniques.parse(t).name for t in recipe.techniques]  # before the techniques' own checks
    for name in named:
        if name in REFUSED:
            raise ConfigError(f"dry run cannot run technique {name!r}: {REFUSED[name]}")
    specs, _ = train.check_recipe_fields(recipe, world_size)
    for spec in specs:  # a default one (DDP for data parallelism)
        if spec.name in REFUSED:
            raise ConfigError(f"dry run cannot run technique {spec.name!r} (the default data parallelism at world "
                              f"size {world_size}; name fsdp instead): {REFUSED[spec.name]}")
    if {"fsdp", "tp"} <= {spec.name for spec in specs}:
        raise ConfigError("dry run cannot run fsdp with tp yet: fully_shard over a 2-D mesh raises "
                          "DynamicOutputShapeException on fake tensors (torch 2.13); dry-run each alone")
    if dist.resolve_device(recipe.device).type != "cpu":
        raise ConfigError(f"dry run plans on fake CPU tensors; got device {recipe.device!r} resolving to a GPU: "
                          f"use --device cpu")
    if torch.distributed.is_initialized():
        raise ConfigError("dry run needs its own (fake) process group, and this process already joined one")
    return specs


@contextlib.contextmanager
def _fake_group(world_size: int, rank: int):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch.distributed.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def _env(**values):
    """``os.environ`` with ``values`` set inside the block (what a launched rank would see)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _peak(session: train.Session, step) -> dict:
    """Peak bytes of ``step()`` from torch's memory tracker (FSDPMemTracker under FSDP2)."""
    try:
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
        from torch.distributed._tools.mem_tracker import MemTracker
        from torch.distributed.fsdp import FSDPModule

        model, optimizer = session.model, session.engine.local_optimizer
        if isinstance(model, FSDPModule):
            tracker, name = FSDPMemTracker(model, optimizer), "FSDPMemTracker"
        else:
            tracker, name = MemTracker(), "MemTracker"
            tracker.track_external(model, optimizer)
    except Exception as e:  # noqa: BLE001 - the tracker is optional: the byte counts stand without it
        return dict(error=f"{type(e).__name__}: {e}"), step()
    with tracker:
        result = step()
    try:
        peak = tracker.get_tracker_snapshot("peak")
        by_device = {str(dev): int(sum(v for k, v in kinds.items() if str(k) == "Total")) for dev, kinds in peak.items()}
        by_kind: dict[str, int] = {}  # at the peak: sharded/unsharded params, grads, activations, optimizer...
        for kinds in peak.values():
            for k, v in kinds.items():
                if str(k) != "Total":
                    key = str(k).rsplit(".", 1)[-1]
                    by_kind[key] = by_kind.get(key, 0) + int(v)
        out = dict(tracker=name, bytes_by_device=by_device, bytes=sum(by_device.values()), bytes_by_kind=by_kind)
        return out, result
    except Exception as e:  # noqa: BLE001
        return dict(tracker=name, error=f"{type(e).__name__}: {e}"), result


def dry_run(recipe: Recipe, world_size: int, rank: int = 0) -> dict:
    """Rank ``rank`` of ``recipe`` at ``world_size`` ranks, built and stepped once on fake
    tensors under the fake process group; returns its record (see the module's docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    t0 = time.perf_counter()
    check(recipe, world_size, rank)
    recipe = dataclasses.replace(recipe, device="cpu")
    ctx = dist.DistContext(rank, rank, world_size, torch.device("cpu"))
    # The launch environment of that rank; the memory check of the host is skipped (nothing is allocated).
    env = dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world_size, LOCAL_WORLD_SIZE=world_size)
    env[train.FORCE_ENV] = 1
    with _env(**env), _fake_group(world_size, rank):
        with FakeTensorMode(allow_non_fake_inputs=True), _OneScalar():
            session = train.prepare(recipe, ctx)
            with unset_fake_temporarily():  # the data are real: the step reads them as a real run does
                x, y = session.batches.get("train", 0)
            build_seconds = time.perf_counter() - t0
            counter = CommCounter()

            def step():
                with counter:
                    return session.engine.train_step(x, y, 0)

            peak, _ = _peak(session, step)
            state = train.session_state_bytes(session)
        with unset_fake_temporarily():  # the checks' max over ranks: this rank's (the fake group moves nothing)
            summary = counter.summary()
            comm = train.comm_check(session, summary, 0) if world_size > 1 else None
            memory = dict(state)
            optimizer_state = memory.pop("optimizer_state")
            model_states = train.model_states_check(session, memory)
        specs = [s.name for s in train.check_recipe_fields(recipe, world_size)[0]]
        record = dict(
            kind=DRYRUN,
            schema=SCHEMA_VERSION,
            label=recipe.label + f"/ws{world_size}/rank{rank}",
            recipe=dataclasses.asdict(recipe),
            **provenance(),
            world_size=world_size,
            rank=rank,
            mesh=dict(session.dims.sizes),
            techniques=specs,
            precision=session.plan.precision,
            accum_steps=session.plan.accum_steps,
            params=session.model.num_params(),
            model_config=dataclasses.asdict(session.model.cfg),  # the data's vocabulary included
            memory=dict(**memory, optimizer_state=optimizer_state),
            model_states=model_states,
            comm=comm,
            peak=peak,
            build_seconds=build_seconds,
            wall_seconds=time.perf_counter() - t0,
            notes="fake tensors and the fake process group: byte counts and collectives are exact for this rank; "
                  "values (losses, norms) are not computed (every read value is 1)",
        )
    return train.strict_json(record)


# --------------------------------------------------------------------------------------------
# Sweeps: one dry run per (model, world size, layout)
# --------------------------------------------------------------------------------------------

#: Layouts a sweep runs: name -> what it is.
LAYOUTS = {"fsdp": "FSDP2 (ZeRO-3) over all N ranks (dp = N)", "tp": "tensor parallelism over all N ranks (tp = N)"}
#: A row whose model-state or traffic ratio is further than this from 1 carries an ``explanation``
#: (the tolerance of :mod:`impls.measure.model_states`' checks).
TOLERANCE = _model_states.TOLERANCE


def _sweep_recipe(model: str, cfg, world_size: int, layout: str, batch_size: int, seq_len: int,
                  fields: dict) -> Recipe:
    """The recipe of one sweep point.  The data default to a synthetic source over the model's own
    vocabulary (the model follows the data's vocabulary, so the recipe's default, 64 symbols, would
    shrink a 50K-token embedding to 64 rows)."""
    extra = dict(techniques=["fsdp"]) if layout == "fsdp" else dict(techniques=["tp"], mesh={"tp": world_size})
    vocab = cfg.vocab_size - (0 if cfg.causal else 1)  # an encoder's [MASK] token is added to the data's
    return Recipe(**{**dict(model=model, data=f"synthetic:vocab={vocab},order=1", batch_size=batch_size,
                            seq_len=seq_len, device="cpu", steps=1, eval_batches=1), **fields, **extra})


def _tp_skip(cfg, n: int) -> str | None:
    """Why tensor parallelism cannot split ``cfg`` over ``n`` ranks (None: it can)."""
    kv = cfg.n_kv_head or cfg.n_head
    if n > cfg.n_head:
        return f"tp={n} exceeds the model's {cfg.n_head} heads"
    if cfg.n_head % n:
        return f"tp={n} does not divide the model's {cfg.n_head} heads"
    if kv % n:
        return f"tp={n} does not divide the model's {kv} KV heads"
    if cfg.d_ff % n:
        return f"tp={n} does not divide the model's d_ff {cfg.d_ff}"
    return None


def _counts(record: dict):
    """The planner's parameter counts of the model the dry run built (its config, the data's
    vocabulary included)."""
    from . import planner, zoo

    return planner.counts_of_config(zoo.TransformerConfig(**record["model_config"]))


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
    n, rank, mem = record["world_size"], record["rank"], record["memory"]
    pb, gb, k = states.get("param_bytes", 4.0), states.get("grad_bytes", 4.0), states.get("k", 8.0)
    tensors = sum(kind.get("tensors", 0) for kind in (mem.get("optimizer_state") or {}).get("kinds", {}).values())
    parts = []
    if off_states:
        measured, formula = states["measured"], states["formula"]
        why = [f"model states ×{ratios.get('total', float('nan')):.4f} of the formula "
               f"({', '.join(f'{c} {_pct(measured[c], formula[c])}' for c in ('params', 'grads', 'optimizer'))})"]
        if layout == "fsdp":
            padded, held = _fsdp_elements(shapes, n, rank)
            psi_n = states["psi"] / states["n_d"]
            local = mem["params_bytes"] / pb
            exact = "exactly the measured" if padded == local else f"vs {local:.0f} measured"
            why.append(f"FSDP2 pads each parameter's dim 0 to a multiple of N={n}: this rank's shards hold "
                       f"sum ceil(d0/N)*rest = {padded} elements ({exact}) vs Psi/N = {psi_n:.1f} "
                       f"({_pct(padded, psi_n)}); params and grads are stored padded")
            steps = mem["optimizer_bytes"] - k * held
            why.append(f"optimizer = {k:g} B x {held} unpadded elements + {steps:.0f} B"
                       + (f" = {tensors} per-tensor step counters x 4 B" if steps == 4 * tensors
                          else " (not step counters alone)")
                       + f"; vs K*Psi/N {_pct(mem['optimizer_bytes'], k * psi_n)}")
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


def _predicted_activations(counts, layout: str, n: int, batch_size: int, seq_len: int, precision: str) -> dict:
    """The planner's activations per rank (:func:`impls.planner.stage_activations`, Korthikanti et al.
    2022 with the fused attention's log-sum-exp) for this layout: one micro-batch, no pipeline."""
    from . import planner

    if precision not in planner.PRECISIONS:
        return dict(bytes=None, reason=f"the planner has no precision {precision!r}")
    dp, tp = (n, 1) if layout == "fsdp" else (1, n)
    plan = planner.Layout(dp, tp, 1, 3 if layout == "fsdp" else 0, "none", 1, batch_size, 1, False)
    total, _, names = planner.stage_activations(counts, plan, 0, seq_len, planner.PRECISIONS[precision], "flash")
    return dict(bytes=total, formulas=names)


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
               build_seconds=record["build_seconds"], wall_seconds=record["wall_seconds"])
    if record.get("activation_bytes") is not None:
        row["activation_bytes"] = record["activation_bytes"]
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
                skip = _tp_skip(cfg, n) if layout == "tp" else None
                recipe = None
                if skip is None:
                    recipe = _sweep_recipe(model, cfg, n, layout, batch_size, seq_len, fields)
                    check(recipe, n, rank)  # bad input: one line, before any run
                jobs.append((model, n, layout, recipe, skip))
    return jobs


def sweep(models, world_sizes, layouts, *, batch_size: int = 1, seq_len: int = 1024, rank: int = 0,
          fields: dict | None = None, progress=None) -> list[dict]:
    """One :func:`dry_run` per (model, world size, layout), ``layout`` ``fsdp`` (dp = N) or ``tp``
    (tp = N); one row each (``skipped`` with the reason where tensor parallelism cannot split the
    model over N ranks).  ``fields``: further Recipe fields (``data``, ``model_args``...).  Every
    combination is checked before the first run (bad input: one-line :class:`ConfigError`).
    ``progress``: called with each row as it is done."""
    fields = dict(fields or {})
    jobs = _plan_sweep(models, world_sizes, layouts, batch_size, seq_len, rank, fields)
    rows = []
    for model, n, layout, recipe, skip in jobs:
        if recipe is None:
            row = dict(model=model, world_size=n, layout=layout, skipped=skip)
        else:
            record = dry_run(recipe, n, rank)
            counts = _counts(record)
            shapes = [t.shape for t in counts.tensors if not t.tied_copy]
            predicted = _predicted_activations(counts, layout, n, batch_size, seq_len, record["precision"])
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
    head = f"{row['model']:<10} {row['layout']:<5} N={row['world_size']:<5}"
    if row.get("skipped"):
        return f"{head} skipped: {row['skipped']}"
    return (f"{head} params {_mib(row['params_bytes'])} MiB (formula {_mib(row['params_formula_bytes'])}), "
            f"grads {_mib(row['grads_bytes'])}, optimizer {_mib(row['optimizer_bytes'])} MiB; "
            f"states ×{_ratio(row['model_states_ratio'])}; traffic {_mib(row['traffic_bytes'])} MiB/step "
            f"(formula {_mib(row['traffic_formula_bytes'])}) ×{_ratio(row['traffic_ratio'])}; "
            f"peak {_mib(row['peak_bytes'])} MiB; predicted activations {_mib(row['predicted_activation_bytes'])} MiB; "
            f"{row['wall_seconds']:.1f} s" + (" [explanation]" if row.get("explanation") else ""))


def table(rows: list[dict]) -> str:
    """Every row, one line each, then each explanation."""
    lines = [table_line(row) for row in rows]
    for row in rows:
        if row.get("explanation"):
            lines.append(f"{row['model']} {row['layout']} N={row['world_size']}: {row['explanation']}")
    return "\n".join(lines)
