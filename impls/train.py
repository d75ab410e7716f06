"""The one training loop of etbench.

A :class:`~impls.recipe.Recipe` names everything a run's result depends on (model, data,
optimizer, techniques, mesh, seed, length).  :func:`run` validates it completely before doing any
work (:func:`validate`), builds the run (:func:`prepare`: model on ``meta``, the techniques'
stages over a :class:`~impls.build.Build`, an engine from :mod:`impls.engines`), measures one
step (:func:`measure_step`: saved activations, counted FLOPs, the step budget, the peak FLOP/s),
trains in a loop that fits on one screen, and returns one JSON-able record
(:func:`make_record`); :func:`write_record` writes it atomically.

Ranks come from the ``torchrun`` environment; which of them are data-parallel replicas comes
from the build's named mesh dimensions (:mod:`impls.parallel`), never from the world size.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import data as data_lib
from . import dist, engines, optimizers, techniques, training_state, zoo
from . import init_from as init_from_lib
from . import recipe as recipe_lib
from .build import Build
from .files import clean_stale, write_text
from .measure import PeakMemory, device_name, model_flops_per_step, peak_flops
from .measure.peak import effective_peak
from .measure import timing as timing_lib
from .measure.comm import CommCounter
from .measure.energy import EnergyMeter, record_fields as energy_fields
from .parallel import ParallelDims
from .provenance import SCHEMA_VERSION, provenance
from .recipe import BUDGET_FLOPS, LR_SCALINGS, MLM_CORRUPTIONS, SCHEDULES, Recipe, RecipeError


__all__ = ["Recipe", "RecipeError", "Session", "Validated", "make_record", "measure_step", "prepare", "run",
           "validate", "write_record"]

# --------------------------------------------------------------------------- validation


def _world_size(ctx: dist.DistContext | None) -> int:
    return ctx.world_size if ctx else int(os.environ.get("WORLD_SIZE", "1"))


def check_recipe_fields(r: Recipe, world_size: int = 1) -> tuple[list[techniques.TechniqueSpec], techniques.StepPlan]:
    """The checks that need no data and no built model: names, every field's type and range
    (:func:`impls.recipe.check_values`), the model config's fields, technique options and
    combinations, the mesh, and techniques that would change nothing in the model's config.
    Returns the techniques (defaults such as DDP added) and the plan."""
    return _check(r, world_size)[:2]


def _check(r: Recipe, world_size: int):
    recipe_lib.check_values(r)  # every field's type and numeric range, from the Recipe's metadata
    if "vocab_size" in r.model_args:  # model_overrides would silently replace it
        raise RecipeError(f"model_args vocab_size={r.model_args['vocab_size']!r} cannot be set: vocab_size comes "
                          f"from the data (its vocabulary, +1 [MASK] token for an encoder); choose the data "
                          f"instead, e.g. synthetic:vocab=N")
    cfg = zoo.config(r.model, **r.model_args)  # unknown model or field, bad type or range -> ConfigError
    optimizers.check(r.optimizer)
    if r.lr_scaling not in LR_SCALINGS:
        raise RecipeError(f"unknown lr_scaling {r.lr_scaling!r}; valid: {', '.join(LR_SCALINGS)}")
    if r.budget_flops not in BUDGET_FLOPS:
        raise RecipeError(f"unknown budget_flops {r.budget_flops!r}; valid: {', '.join(BUDGET_FLOPS)}")
    if r.schedule not in SCHEDULES:
        raise RecipeError(f"unknown schedule {r.schedule!r}; valid: {', '.join(SCHEDULES)}")
    if r.mlm_corrupt not in MLM_CORRUPTIONS:
        raise RecipeError(f"unknown mlm_corrupt {r.mlm_corrupt!r}; valid: {', '.join(MLM_CORRUPTIONS)}")
    device = dist.resolve_device(r.device)
    if (r.steps is None) == (r.flops_budget is None):
        raise RecipeError("give exactly one of steps or flops_budget")
    specs = [techniques.parse(t) for t in r.techniques]
    dims = ParallelDims.from_recipe(r.mesh, world_size, techniques.usable_mesh_dims(specs))
    specs = techniques.with_defaults(specs, dims.dp)
    for spec in specs:
        spec.technique.check_mesh(dims, spec.options)
    plan = techniques.configure(specs, device.type)
    techniques.check_recipe(specs, r)  # e.g. an optimizer the technique's engine cannot run
    # A technique that would find nothing to change in this model is refused here, before any
    # work, rather than training a baseline under the technique's name.
    techniques.check_model(specs, cfg, r.seq_len)
    return specs, plan, dims


def model_overrides(r: Recipe, dataset: data_lib.TokenData) -> dict:
    """The model follows the data's vocabulary (+1 [MASK] token for a masked-LM encoder)."""
    causal = r.model_args.get("causal", zoo.CONFIGS[r.model][1].get("causal", True))
    return {**r.model_args, "vocab_size": dataset.vocab_size + (0 if causal else 1)}


@dataclass
class Validated:
    specs: list[techniques.TechniqueSpec]
    plan: techniques.StepPlan
    dims: ParallelDims
    dataset: data_lib.TokenData
    source: "init_from_lib.Source | None" = None  # --init-from's weights, read and checked
    meta: torch.nn.Module | None = None  # the model built on ``meta`` (no storage)


def validate(r: Recipe, world_size: int = 1) -> Validated:
    """Check everything that can be checked before training; return techniques, plan, mesh and data."""
    specs, plan, dims = _check(r, world_size)
    dataset = data_lib.load(r.data)
    meta = zoo.build(r.model, device="meta", **model_overrides(r, dataset))
    if r.seq_len > meta.cfg.block_size:
        raise RecipeError(f"seq_len {r.seq_len} exceeds model {r.model!r} block_size {meta.cfg.block_size}; "
                          f"lower seq_len or set model_args block_size")
    for split in ("train", "val"):
        row_len = getattr(dataset, split).shape[1]
        if row_len < r.seq_len + 1:
            raise RecipeError(f"data {dataset.name!r} {split} rows hold {row_len} tokens, fewer than "
                              f"seq_len + 1 = {r.seq_len + 1}")
    if r.flops_budget is not None:
        one_step = model_flops_per_step(meta, r.batch_size * plan.accum_steps * dims.dp, r.seq_len)
        if r.flops_budget < one_step:
            raise RecipeError(f"flops_budget {r.flops_budget:.3g} is smaller than one step "
                              f"({one_step:.3g} model FLOPs for {r.model}, batch "
                              f"{r.batch_size}×{plan.accum_steps}×{dims.dp}, seq_len {r.seq_len})")
        _check_step_count(r.flops_budget / one_step, r.flops_budget, f"{one_step:.3g} model FLOPs per step")
    planning = dist.planning() is not None  # a dry run for another device: its memory is checked by the planner
    if not planning:
        check_memory(r, meta, specs, plan, dims, world_size)  # before anything is allocated
    source = None
    if r.init_from is not None:  # read and checked here: a bad source fails before any work
        deferring = [s.name for s in specs if s.technique.defers_init]
        if deferring:
            raise RecipeError(f"init_from cannot be combined with {', '.join(deferring)}: it materialises the model "
                              f"only after its own stage, when the whole dense weights no longer fit the modules")
        if dims["pp"] > 1:
            raise RecipeError(f"init_from with pipeline stages (mesh pp={dims['pp']}) is not supported: the weights "
                              f"load into the whole model, and this rank builds only its stages; valid: pp=1")
        # (planning: the weights may be an earlier benchmark run's output, not written yet)
        if not (planning and not os.path.exists(r.init_from)):
            source = init_from_lib.read(r.init_from)
            init_from_lib.check(source, r, meta)
    return Validated(specs, plan, dims, dataset, source, meta)


def _check_step_count(steps: float, budget: float, per_step: str) -> None:
    """A FLOP budget that buys more steps than a run may take (:data:`impls.recipe.MAX_STEPS`)
    is refused: such a run would not end (nor would the budget's schedule solve)."""
    if steps > recipe_lib.MAX_STEPS:
        raise RecipeError(f"flops_budget {budget:.3g} buys {steps:.3g} steps ({per_step}), more than the "
                          f"{recipe_lib.MAX_STEPS:,} a run may take; valid: a budget of at most "
                          f"{budget / steps * recipe_lib.MAX_STEPS:.3g} FLOPs")


# --------------------------------------------------------------------------- memory before any work

#: ``--force`` sets it (to "1"), and the ranks and workers a command starts inherit it: run a
#: recipe although its predicted peak memory exceeds the memory of its device.
FORCE_ENV = "ETBENCH_FORCE"

# How techniques change the terms of the memory prediction (impls.measure.footprint, a lower
# bound of the peak).  The techniques named here leave every block's saved activations (resp. the
# block weights' model states) at least as large as the plain model's; any other technique -- one
# that recomputes, compresses, routes, drops or offloads activations, or replaces, slices or
# freezes the block weights, and any new technique until it is listed -- drops that term from the
# prediction, which so stays a lower bound: a recipe is never refused for memory it would not use.
_KEEP_BLOCK_ACTIVATIONS = frozenset({
    "attention", "bf16", "data-parallel", "ddp", "distill", "fairscale-fsdp", "fp16", "fsdp", "galore", "gmp",
    "grad_accum", "lowrank", "onebit", "oss", "prune", "prune_nm", "qat", "seqlen_warmup", "sparse_embedding",
    "zero", "zero-redundancy"})
_KEEP_BLOCK_STATES = frozenset({
    "actcompress", "attention", "bf16", "checkpoint", "data-parallel", "ddp", "distill", "fairscale-fsdp", "fp16",
    "fp8", "fsdp", "fuse", "gmp", "grad_accum", "int8", "mae", "mod", "mode", "moe", "offload", "onebit", "oss",
    "pp", "prune", "prune_nm", "qat", "random_ltd", "seqlen_warmup", "sparse_embedding", "token_drop", "tp", "zero",
    "zero-redundancy"})


def memory_footprint(r: Recipe, meta: torch.nn.Module, specs: list[techniques.TechniqueSpec], plan: techniques.StepPlan,
                     dims: ParallelDims, device: torch.device) -> "footprint.Footprint":
    """The predicted peak bytes of one rank of ``r`` (:func:`impls.measure.footprint.predict`),
    from the model built on ``meta`` and the validated techniques, plan and mesh."""
    from .measure import footprint

    names = {s.name for s in specs}
    tp_plain = all(not s.options.get("sp") for s in specs if s.name == "tp")  # SP splits the norms' inputs too
    outside = sum(p.numel() for name, p in meta.named_parameters() if not name.startswith("blocks."))
    return footprint.predict(
        meta.cfg, psi=meta.num_params(), seq_len=r.seq_len, micro_batch=r.batch_size, accum_steps=plan.accum_steps,
        dp=dims.dp, tp=dims["tp"], pp=dims["pp"], zero_stage=plan.sharding_stage, optimizer=r.optimizer,
        low_precision_params=plan.low_precision_params, autocast=plan.autocast_dtype is not None,
        block_activations=names <= _KEEP_BLOCK_ACTIVATIONS and tp_plain,
        block_states=names <= _KEEP_BLOCK_STATES, outside_block_params=outside,
        # ZeRO/FSDP offload keep the model states in host memory, not on the GPU
        states_on_device=not (device.type == "cuda" and any(v == "cpu" for s in specs for v in s.options.values())))


def check_memory(r: Recipe, meta: torch.nn.Module, specs: list[techniques.TechniqueSpec], plan: techniques.StepPlan,
                 dims: ParallelDims, world_size: int) -> None:
    """Refuse ``r`` before any work when its predicted peak memory per rank (a lower bound) exceeds
    what its device has: on a CPU the host's available memory, shared by the ranks on this host;
    on a GPU its free memory (read where CUDA may be initialised: not by the parent of --nproc
    ranks, whose ranks check it themselves).  ``--force`` (:data:`FORCE_ENV`) skips it."""
    from .measure import footprint

    if os.environ.get(FORCE_ENV, "") not in ("", "0"):
        return
    device = dist.resolve_device(r.device, int(os.environ.get("LOCAL_RANK", "0")))
    parent = world_size > 1 and "LOCAL_RANK" not in os.environ
    limit = footprint.available(device, may_init_cuda=not parent)
    if limit is None:
        return
    predicted = memory_footprint(r, meta, specs, plan, dims, device)
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) if device.type == "cpu" else 1
    if parent and device.type == "cpu":  # the ranks are not started yet: each will hold what this process does
        predicted = dataclasses.replace(predicted, runtime=footprint.this_process())
    if footprint.exceeds(predicted, limit[0], sharing):
        ranks = f" × {sharing} ranks on this host" if sharing > 1 else ""
        raise RecipeError(f"predicted peak memory {predicted.describe()}{ranks} exceeds {limit[1]}; lower "
                          f"--batch-size or --seq-len, shard or checkpoint, or --force to try anyway")


# --------------------------------------------------------------------------- building a run


class Batches:
    """Deterministic batches: a pure function of (seed, split, step, data-parallel rank), so any
    step can be replayed and a resumed run sees the data a straight run would have seen."""

    def __init__(self, dataset: data_lib.TokenData, recipe: Recipe, model_cfg, device: torch.device,
                 dp_rank: int = 0, accum_steps: int = 1):
        self.dataset, self.r, self.device, self.dp_rank = dataset, recipe, device, dp_rank
        self.rows = recipe.batch_size * accum_steps  # a step's sequences on this rank, all micro-batches
        # A bidirectional encoder trains on masked-LM; its [MASK] id is the token after the data's vocab.
        self.mlm_mask_id = None if model_cfg.causal else dataset.vocab_size

    def get(self, split: str, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.r
        x, y = self.dataset.batch(split, index, self.rows, r.seq_len, r.seed, shard=self.dp_rank)
        if self.mlm_mask_id is not None:
            # SeedSequence, not hash(): str hashes change per process (PYTHONHASHSEED).
            mask_seed = np.random.SeedSequence([r.seed, ("train", "val").index(split), index, self.dp_rank])
            g = torch.Generator().manual_seed(int(mask_seed.generate_state(1)[0]))
            x, y = data_lib.mask_for_mlm(x, self.dataset.vocab_size, self.mlm_mask_id, r.mlm_rate, g,
                                          corrupt=r.mlm_corrupt)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


@dataclass
class Session:
    """What a run trains: the validated recipe's build, engine, data and process context."""
    recipe: Recipe
    plan: techniques.StepPlan
    ctx: dist.DistContext
    dataset: data_lib.TokenData
    build: Build
    engine: engines.Engine
    batches: Batches

    @property
    def model(self) -> torch.nn.Module:
        """The whole model (on ``meta`` where this rank holds pipeline stages only)."""
        return self.build.whole_model

    @property
    def dims(self) -> ParallelDims:
        return self.build.dims


def prepare(recipe: Recipe, ctx: dist.DistContext | None = None) -> Session:
    """Validate ``recipe`` (before any work), then build the model on ``meta``, run the
    techniques' stages (materialising the model, seeded, where :mod:`impls.techniques` says),
    and create the engine and the batches."""
    checked = validate(recipe, _world_size(ctx))
    ctx = ctx or dist.init(recipe.device)
    torch.manual_seed(recipe.seed)
    model = zoo.build(recipe.model, device="meta", **model_overrides(recipe, checked.dataset))
    build = Build(dims=checked.dims, plan=checked.plan, device=ctx.device, model_parts=[model])
    if checked.source is not None:  # loaded when the model is materialised, before the surgery
        build.initial_state, build.init_from = checked.source.weights, checked.source.info
    techniques.assemble(build, checked.specs)
    engine = engines.create(build, recipe, total_steps=recipe.steps or 1)
    batches = Batches(checked.dataset, recipe, model.cfg, ctx.device,
                      checked.dims.rank_in("dp", ctx.device.type), checked.plan.accum_steps)
    return Session(recipe, checked.plan, ctx, checked.dataset, build, engine, batches)


# --------------------------------------------------------------------------- measuring one step


@dataclass
class StepMeasure:
    """What one step costs, measured before training."""
    tokens_per_step: int  # all data-parallel ranks
    flops_per_step: int  # counted, summed over all ranks (HFU's numerator)
    frozen_flops_per_step: int  # of them, frozen modules' (a teacher's forward)
    model_flops_per_step: float  # MFU's numerator: no recomputation, no frozen modules
    activations_bytes: int  # saved for backward by one micro-batch, this rank
    total_steps: int
    peak: dict  # the MFU denominator and its source
    # With a per-step schedule (``plan.seq_len_at`` or ``plan.phase_at``): each step's phase
    # value (its sequence length, or random-LTD's kept length), and the (counted, frozen, model)
    # FLOPs of one step at each value.  The per-step fields above are then the means over the
    # schedule, so steps × per-step = the run's totals.
    lengths: list[int] | None = None
    per_length: dict[int, tuple[int, int, float]] | None = None
    rows: int = 0  # sequences per step over all ranks: a step's tokens are rows × its length
    phase_is_length: bool = True  # False: the phase is not the batch's length (tokens per step fixed)

    def totals(self, done: int) -> dict:
        """Cumulative counted FLOPs, model FLOPs and tokens of the first ``done`` steps: exact
        over the schedule's lengths where there is one."""
        if self.lengths is None:
            return dict(flops=float(done * self.flops_per_step), model_flops=done * self.model_flops_per_step,
                        tokens=done * self.tokens_per_step)
        lengths = self.lengths[:done]
        return dict(flops=float(sum(self.per_length[t][0] for t in lengths)),
                    model_flops=float(sum(self.per_length[t][2] for t in lengths)),
                    tokens=self.rows * sum(lengths) if self.phase_is_length else done * self.tokens_per_step)



def _schedule_steps(per_step, length_at, budget: float) -> int:
    """The largest N whose schedule ``length_at(t, N)`` fits the budget: Σ_{t<N} per_step(L_t) ≤
    budget.  Bisection between the full-length count (every step at most full cost) and the
    shortest-length one; the cost grows with N up to the rounding of the lengths, so the search
    then steps on while one more step still fits."""
    def cost(n):
        return sum(per_step(length_at(t, n)) for t in range(n))

    lo = int(budget // per_step(length_at(10 ** 9, 10 ** 9)))  # every step at most the full length's cost
    hi = int(budget // per_step(length_at(0, 1))) + 1  # and at least the first length's
    lo = max(lo, 0)
    _check_step_count(lo, budget, "at the full length's cost")  # before summing a schedule that long
    hi = min(hi, recipe_lib.MAX_STEPS + 1)  # more is refused by the caller
    while cost(lo) > budget and lo > 0:
        lo -= 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost(mid) <= budget:
            lo = mid
        else:
            hi = mid
    while lo <= recipe_lib.MAX_STEPS and cost(lo + 1) <= budget:
        lo += 1
    return lo


def measure_step(session: Session) -> StepMeasure:
    """Saved activations of one micro-batch and counted FLOPs of one eager step, the steps the
    budget buys, and the peak FLOP/s.  Both passes run eagerly, so a compiled model compiles in
    its first (untimed, reported) step; the FLOP pass's gradients are discarded by step 0."""
    r, ctx, plan, engine = session.recipe, session.ctx, session.plan, session.engine
    dp = session.dims.dp
    step_rows = r.batch_size * plan.accum_steps * dp
    x0, y0 = session.batches.get("train", 0)
    # (cloned: a view would make the meter count the whole step's index storage)
    xm, ym = x0.chunk(plan.accum_steps)[0].clone(), y0.chunk(plan.accum_steps)[0].clone()
    with torch.compiler.set_stance("force_eager"):
        activations = engine.activation_bytes(xm, ym)
        counted = engine.count_flops(x0, y0)
    # Summed over ranks, not multiplied: tensor- or pipeline-parallel ranks count different work.
    flops = ctx.all_sum_int(counted["total"])
    frozen = ctx.all_sum_int(counted["frozen"])
    by_dtype = _flops_by_dtype(session, counted)
    # Model FLOPs exclude recomputation and frozen modules.  Conditional computation runs less
    # than the dense formula says: there the counted FLOPs stand in (recompute included, if any).
    if plan.dense_compute:
        model_flops = float(model_flops_per_step(session.model, step_rows, r.seq_len))
    else:
        model_flops = float(flops - frozen)
    if plan.seq_len_at is not None or plan.phase_at is not None:
        return _measure_schedule(session, x0, y0, step_rows, activations, (flops, frozen, model_flops), by_dtype)
    if r.steps is not None:
        total_steps = r.steps
    else:
        per_step = model_flops if r.budget_flops == "model" else flops
        total_steps = int(r.flops_budget // per_step)
        if total_steps < 1:
            raise RecipeError(f"flops_budget {r.flops_budget:.3g} is smaller than one step "
                              f"({per_step:.3g} {r.budget_flops} FLOPs)")
        _check_step_count(total_steps, r.flops_budget, f"{per_step:.3g} {r.budget_flops} FLOPs per step")
    engine.total_steps = total_steps
    session.build.total_steps = total_steps  # for hooks acting at a fraction of training
    return StepMeasure(step_rows * r.seq_len, flops, frozen, model_flops, activations, total_steps,
                       _peak(session, by_dtype))


def _compute_dtype(plan) -> str:
    """The run's compute dtype by name: the autocast dtype, else fp32."""
    return str(plan.autocast_dtype or torch.float32).removeprefix("torch.")


def _flops_by_dtype(session: Session, counted: dict) -> dict[str, int]:
    """The step's counted FLOPs split by the dtype each op ran in, summed over ranks
    ({dtype name: FLOPs}); FLOPs of ops without a classifiable operand (and all of them where an
    engine does not split its count) are the run's compute dtype's (:func:`_compute_dtype`).
    Gathered, not all-summed: ranks (pipeline stages) may see different dtypes."""
    compute = _compute_dtype(session.plan)
    local = counted.get("by_dtype") or {None: counted["total"]}
    merged: dict[str, int] = {}
    for part in session.ctx.all_gather_object({d: int(f) for d, f in local.items()}):
        for d, f in part.items():
            merged[d or compute] = merged.get(d or compute, 0) + f
    return merged


def _peak(session: Session, flops_by_dtype: dict[str, int]) -> dict:
    """The MFU/HFU denominator: every dtype's peak FLOP/s (:func:`peak_flops`), weighed by the
    step's counted FLOPs in that dtype (``flops_by_dtype``) into
    peak_eff = Σ_d F_d / Σ_d (F_d / P_d) (:func:`impls.measure.peak.effective_peak`), so each GEMM
    counts against the peak of the dtype it runs in: an fp8 run is not divided by the fp32 peak
    (MFU above 100%), nor a bf16 + fp8 run by the bf16 one.  A one-dtype run's denominator is that
    dtype's peak exactly, as before.  The peaks are probed (if not cached) before training by
    rank 0 alone while the other ranks wait, so concurrent ranks never disturb the probe; they then
    read its cache."""
    ctx = session.ctx
    if not any(f > 0 for f in flops_by_dtype.values()):  # nothing counted: the compute dtype's peak
        flops_by_dtype = {_compute_dtype(session.plan): 1}

    def probe() -> dict:
        return {d: peak_flops(ctx.device, getattr(torch, d)) for d in sorted(flops_by_dtype)}

    peaks = probe() if ctx.is_main else None
    ctx.barrier()
    if not ctx.is_main:
        peaks = probe()
    return effective_peak(flops_by_dtype, peaks)


def _measure_schedule(session: Session, x0, y0, step_rows: int, activations: int, full: tuple,
                      by_dtype: dict[str, int] | None = None) -> StepMeasure:
    """:func:`measure_step` under a per-step schedule of a "phase" value: the sequence length
    (``plan.seq_len_at``, sequence-length warm-up) or another value the model's cost depends on
    (``plan.phase_at``, with ``plan.in_phase(value)`` a context that puts the model into that
    phase: random-LTD's kept length).  The FLOPs of one step are counted at every value the
    schedule uses (for a length, the batch truncated to it, as the technique's ``on_batch`` hook
    does; otherwise the full batch inside ``in_phase``), model FLOPs are the analytic
    6N + 12·L·H·Q·T at that length (or the counted ones, without dense compute), and the steps a
    budget buys are the largest N with Σ_{t<N} FLOPs(phase_t) ≤ budget (:func:`_schedule_steps`)."""
    r, ctx, plan, engine = session.recipe, session.ctx, session.plan, session.engine
    is_length = plan.seq_len_at is not None
    schedule = plan.seq_len_at if is_length else plan.phase_at
    per_length = {r.seq_len: full}  # at full length / full phase: the step measure_step counted

    def at(value: int) -> tuple[int, int, float]:
        if value not in per_length:
            with torch.compiler.set_stance("force_eager"):
                if is_length:
                    counted = engine.count_flops(x0[:, :value], y0[:, :value])
                else:
                    with plan.in_phase(value):
                        counted = engine.count_flops(x0, y0)
            flops, frozen = ctx.all_sum_int(counted["total"]), ctx.all_sum_int(counted["frozen"])
            if plan.dense_compute:
                model = float(model_flops_per_step(session.model, step_rows, value if is_length else r.seq_len))
            else:
                model = float(flops - frozen)
            per_length[value] = (flops, frozen, model)
        return per_length[value]

    def length_at(t: int, n: int) -> int:
        return schedule(t, n, r.seq_len)

    if r.steps is not None:
        total_steps = r.steps
    else:
        index = 2 if r.budget_flops == "model" else 0
        total_steps = _schedule_steps(lambda length: at(length)[index], length_at, r.flops_budget)
        if total_steps < 1:
            raise RecipeError(f"flops_budget {r.flops_budget:.3g} is smaller than one step of the schedule")
        _check_step_count(total_steps, r.flops_budget, "over the schedule")
    lengths = [length_at(t, total_steps) for t in range(total_steps)]
    for length in set(lengths):
        at(length)
    engine.total_steps = total_steps
    session.build.total_steps = total_steps
    session.build.flops_by_phase = dict(per_length)
    if is_length:
        session.build.flops_by_length = dict(per_length)
    n = total_steps
    mean = [sum(per_length[t][i] for t in lengths) / n for i in range(3)]
    tokens = step_rows * sum(lengths) / n if is_length else step_rows * r.seq_len
    # The denominator weighs the dtypes by the full-length step's counted split (the lengths
    # change the attention share a little, not which dtype a GEMM runs in).
    by_dtype = by_dtype or {_compute_dtype(plan): 1}
    cost = StepMeasure(tokens, mean[0], mean[1], mean[2], activations, total_steps,
                       _peak(session, by_dtype), lengths=lengths, per_length=dict(per_length), rows=step_rows,
                       phase_is_length=is_length)
    return cost


# --------------------------------------------------------------------------- the loop


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(engine, batches: Batches, device: torch.device, step: int, seconds: list[float]) -> float:
    """One step of the loop: fetch the batch, train, append the step's seconds; returns the loss.
    The harness-overhead benchmark times exactly this against a bare loop."""
    x, y = batches.get("train", step)
    _sync(device)
    t0 = time.perf_counter()
    loss = engine.train_step(x, y, step)
    _sync(device)
    seconds.append(time.perf_counter() - t0)
    return loss


def _evaluate(engine, batches: Batches, ctx: dist.DistContext, n: int) -> float:
    losses = [engine.eval_loss(*batches.get("val", i)) for i in range(n)]
    return ctx.all_mean(sum(losses) / n)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="step", disable=not (enabled and sys.stderr.isatty()), leave=False)


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def _mean_finite(values: list) -> float | None:
    finite = [v for v in values if _finite(v)]
    return sum(finite) / len(finite) if finite else None


def run(recipe: Recipe, ctx: dist.DistContext | None = None, *, save_every: int | None = None,
        checkpoint: str | os.PathLike | None = None, resume: str | os.PathLike | None = None) -> dict:
    """Validate ``recipe``, train, and return the run record (identical on every rank).

    ``save_every`` N steps, the full training state goes to ``checkpoint`` (atomically): the path of
    the training-state file (:mod:`impls.training_state`; the CLI's ``--checkpoint``), which has
    nothing to do with activation checkpointing (the ``checkpoint`` technique); ``resume``
    continues from such a file, ending bit-identical to an uninterrupted run.

    Divergence is a status, not an exception: at the first step whose training loss (or an
    evaluation's validation loss) is not finite, on any rank, training stops (what follows a NaN
    is NaN: more steps would cost time and measure nothing), the curve gets that step with its
    non-finite loss, and the record's ``status`` says ``diverged at step N`` (``ok`` otherwise).
    The state file keeps the last finite state.
    """
    t_start = time.perf_counter()
    if save_every is not None and (save_every < 1 or checkpoint is None):
        raise RecipeError(f"save_every must be >= 1 and needs a checkpoint path, got {save_every}, {checkpoint}")
    if save_every is not None:
        clean_stale(checkpoint)  # temporaries of a process killed while saving
    resumed = training_state.load(resume, recipe, _world_size(ctx)) if resume else None
    load_start, cpu_start = timing_lib.load_average(), timing_lib.cpu_snapshot()
    session = prepare(recipe, ctx)
    cost = measure_step(session)
    ctx, engine, batches, total = session.ctx, session.engine, session.batches, cost.total_steps
    eval_every = recipe.eval_every or max(1, total // recipe.evaluations)
    clipping = recipe.grad_clip is not None
    if resumed:
        if resumed["step"] >= total:  # the run ended and saved; its record may not have been written
            return _record_of_finished(session, cost, resumed, ctx, total)
        engine.load_state_dict(training_state.engine_state(resumed, ctx.rank))
        start, curve, window = resumed["step"], resumed["curve"], resumed["window_losses"]
        norms = list(resumed.get("window_grad_norms") or [])
        training_state.restore_rng(resumed["rng"])
    else:
        start, window, norms = 0, [], []
        curve = [dict(step=0, flops=0.0, model_flops=0.0, tokens=0, train_loss=None,
                      val_loss=_evaluate(engine, batches, ctx, recipe.eval_batches))]
    # The first steps of this process are untimed: allocator and thread-pool warm-up, and the
    # compilation of a compiled model, whose time is reported on its own.
    warmup = min(recipe.timing_warmup, total - start - 1)
    seconds, state_bytes, status, done = [], None, "ok", start
    energy = EnergyMeter(ctx.device)  # NVML's energy counter around the timed steps (GPUs only)
    bar = _progress(total, ctx.is_main)
    bar.update(start)

    def point(done: int, train_loss, val_loss) -> dict:
        entry = dict(step=done, **cost.totals(done), train_loss=train_loss, val_loss=val_loss)
        if clipping:  # the mean pre-clip gradient norm since the last point (steps with a finite norm)
            entry["grad_norm"] = _mean_finite(norms)
        return entry

    comm, timing, wall, finished = None, None, None, None

    def measured_timing() -> dict:
        """The step times (the slowest rank's), load and other processes' cores of this process's
        timed steps (collective: every rank calls it at the same point)."""
        timed = seconds[max(warmup, 0):]
        if not timed:
            if status == "ok":
                raise RecipeError(f"nothing left to train: the checkpoint is at step {start} of {total}")
            timed = seconds  # diverged before the timed steps: the warm-up steps are all there is
        # A step lasts as long as its slowest rank.
        return dict(first_step_seconds=seconds[0], step_seconds=ctx.all_max(timed),
                    load_start=load_start, load_end=timing_lib.load_average(),
                    others=cores_of_other_processes(ctx, cpu_start, timing_lib.cpu_snapshot()),
                    energy=ctx.all_gather_object(energy.summary()))

    with PeakMemory(ctx.device) as peak:
        for step in range(start, total):
            if step == start and warmup > 0 and ctx.world_size > 1:
                # The collectives of one whole step (optimizer included), counted on an untimed
                # step: the counter sees every c10d operator, which costs time.
                with CommCounter() as counter:
                    loss = timed_step(engine, batches, ctx.device, step, seconds)
                comm = comm_check(session, counter.summary(), step)
            else:
                with energy.measuring(step - start >= warmup):  # the timed steps only
                    loss = timed_step(engine, batches, ctx.device, step, seconds)
            window.append(loss)
            if clipping:
                norms.append(engine.last_grad_norm)
            if state_bytes is None:  # after the first update: optimizer state exists, gradients still held
                state_bytes = session_state_bytes(session)
            done = step + 1
            # One verdict for all ranks (outside the timed step), so they stop together.
            bad = not _finite(loss)
            if ctx.world_size > 1:
                bad = ctx.all_max([float(bad)])[0] > 0
            if bad:
                status = f"diverged at step {done}"
                curve.append(point(done, ctx.all_mean(loss), None))
                break
            if done % eval_every == 0 or done == total:
                curve.append(point(done, ctx.all_mean(sum(window) / len(window)),
                                   _evaluate(engine, batches, ctx, recipe.eval_batches)))
                window, norms = [], []
                if not _finite(curve[-1]["val_loss"]):
                    status = f"diverged at step {done}"
                    break
                bar.set_postfix(val_loss=f"{curve[-1]['val_loss']:.3f}")
            if save_every and done == total:  # what the record is made of, so --resume can give it back
                timing, wall = measured_timing(), time.perf_counter() - t_start
                finished = dict(timing=timing, state_bytes=ctx.all_gather_object(state_bytes),
                                peak=dict(kind=peak.kind, bytes=ctx.all_gather_object(peak.current())),
                                comm=comm, resumed_from=start if resumed else None, peak_flops=cost.peak,
                                wall_seconds=wall)
            if save_every and (done % save_every == 0 or done == total):
                training_state.save(checkpoint, recipe, ctx, engine, step=done, curve=curve, window_losses=window,
                                    window_grad_norms=norms, finished=finished)
            bar.update()
    bar.close()
    timing = timing or measured_timing()
    wall = wall if wall is not None else time.perf_counter() - t_start  # a final save's: what --resume gives back
    if finished:  # the peak before the final state was serialised: the one --resume gives back
        peak.peak_bytes = finished["peak"]["bytes"][ctx.rank]
    return make_record(session, cost, curve, timing, state_bytes, peak, resumed_from=start if resumed else None,
                       wall_seconds=wall, status=status, steps_done=done, comm=comm)


def _record_of_finished(session: Session, cost: StepMeasure, state: dict, ctx: dist.DistContext, total: int) -> dict:
    """The record of a run whose final training state was saved but whose record was not
    written (killed in between): made from the measurements the state kept (step times, load,
    every rank's memory), so ``--resume`` gives it back instead of training nothing.  The
    record is the one the run would have written (``resumed_from_step`` says which steps this
    record's times cover, as for any resumed run)."""
    finished = state.get("finished")
    if not finished:
        raise RecipeError(f"nothing left to train: the checkpoint is at step {state['step']} of {total}, and it "
                          f"holds no measurements to make the record from (saved by an older etbench)")

    class _Peak:  # what make_record reads of a PeakMemory
        kind, peak_bytes = finished["peak"]["kind"], finished["peak"]["bytes"][ctx.rank]

    cost = dataclasses.replace(cost, peak=finished["peak_flops"])  # the MFU denominator the run divided by
    return make_record(session, cost, state["curve"], finished["timing"], finished["state_bytes"][ctx.rank], _Peak,
                       resumed_from=finished["resumed_from"], wall_seconds=finished["wall_seconds"],
                       steps_done=state["step"], comm=finished["comm"])


def cores_of_other_processes(ctx: dist.DistContext, start: dict | None, end: dict | None) -> float | None:
    """Cores other processes used during the run: the run's own CPU time is summed over its
    ranks (on one machine: several nodes would each see only their own ranks)."""
    if start is None or end is None:
        return None
    own = end["own"] - start["own"]
    if ctx.world_size > 1 and int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size)) == ctx.world_size:
        own = ctx.all_mean(own) * ctx.world_size
    return ctx.all_mean(timing_lib.other_cores(start, end, own) or 0.0)


def session_state_bytes(session: Session) -> dict:
    """This rank's model-state bytes as a run records them (after its first update): the engine's
    params/grads/optimizer bytes, the frozen modules' bytes and the optimizer state by kind."""
    engine = session.engine
    # 8-bit optimizers keep small tensors in fp32: which ones, and their bytes.
    return dict(**engine.state_bytes(), frozen_bytes=session.build.frozen_bytes(),
                optimizer_state=optimizers.state_bytes_by_kind(engine.optimizer, session.model))


def trainable_count(build: Build) -> int:
    """Ψ: the trainable parameters, whole (a sharded parameter counts its full size: a DTensor's
    ``numel`` is global, a ZeRO-3 partitioned one keeps it in ``ds_numel``)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in build.trainable_parameters())


def rank_psi(session: Session) -> float:
    """Ψ one rank's data-parallel formula applies to: the whole model's, or under tensor
    parallelism the replicated parameters plus 1/t of the sharded ones (what a tp rank holds
    before any dp sharding)."""
    tp = session.build.notes.get("tp")
    if tp and session.dims["tp"] > 1:
        return tp["replicated_params"] + tp["sharded_params"] / session.dims["tp"]
    return trainable_count(session.build)


def model_states_check(session: Session, measured: dict) -> dict:
    """This rank layout's model-state bytes against the ZeRO paper's formula for the stage the
    run's data-parallel technique declared (:mod:`impls.measure.model_states`).  ``measured``:
    the largest rank's params/grads/optimizer bytes."""
    from .measure import model_states

    plan = session.plan
    frozen = sum(int(getattr(p, "ds_numel", p.numel())) for part in session.build.model_parts
                 for p in part.parameters() if not p.requires_grad)
    if frozen:
        return dict(applies=False, reason=f"{frozen} frozen parameters (a LoRA base): the formula's (p+g+K)·Ψ assumes "
                                          f"every parameter trains; the technique's notes check its own formula")
    if plan.optimizer_state_formula:
        return dict(applies=False, reason=plan.optimizer_state_formula)
    try:
        return model_states.check_run(measured, rank_psi(session), session.dims.dp, plan.sharding_stage,
                                      optimizer=session.recipe.optimizer,
                                      low_precision_params=plan.low_precision_params,
                                      autocast=plan.autocast_dtype is not None)
    except Exception as e:  # a check must never cost the run its record
        return dict(error=f"{type(e).__name__}: {e}")


def layer_activations_check(session: Session) -> dict | None:
    """One micro-batch's saved bytes per layer (this rank) against the formulas of
    :mod:`impls.measure.activations` for the run's tensor-parallel layout."""
    from .measure import activations

    per_layer = session.build.layer_activation_bytes
    if not per_layer:
        return None
    try:
        tp = session.build.notes.get("tp", {})
        return activations.check(session.model.cfg, session.recipe.seq_len, session.recipe.batch_size, per_layer,
                                 t=session.dims["tp"], sp=bool(tp.get("sp")),
                                 element_bytes=2 if session.plan.autocast_dtype is not None else 4)
    except Exception as e:  # a check must never cost the run its record
        return dict(error=f"{type(e).__name__}: {e}")


def pp_comm_volume(session: Session, boundary_bytes: float) -> dict:
    """This rank's pipeline traffic per step (GPipe, Huang et al. 2019; Narayanan et al. 2021):
    each of its stages sends its output activations to the next stage and the gradient of its
    input to the previous one, every micro-batch -- per direction the step's (b, s, h) residual
    stream, ``boundary_bytes`` -- and, with tied embeddings, the first and last stage all-reduce
    the embedding's gradient (2 ranks: V·h elements each way)."""
    sends = 0
    for part in session.build.model_parts:
        index, stages = getattr(part, "index", None), getattr(part, "num_stages", None)
        if index is None:
            continue
        sends += (index < stages - 1) + (index > 0)
    p2p = sends * boundary_bytes
    tied = 0.0
    cfg = session.model.cfg
    holds_tied = any(getattr(part, "is_first", False) or getattr(part, "is_last", False)
                     for part in session.build.model_parts)
    if cfg.tie_embeddings and holds_tied:
        tied = cfg.vocab_size * cfg.d_model * 4.0  # fp32 gradient, all-reduce over 2 ranks: 2(n-1)/n = 1
    return dict(source="activations forward + input gradients backward per stage boundary, every micro-batch; "
                       "tied-embedding gradient all-reduce between first and last stage",
                stage_sends=sends, p2p_bytes=p2p, tied_embedding_bytes=tied, bytes=p2p + tied)


def comm_check(session: Session, summary: dict, step: int) -> dict:
    """The collectives of one step on this rank (:class:`~impls.measure.comm.CommCounter`),
    the largest rank's traffic, and that against the ZeRO paper's volume for the run's stage
    (2Ψ for replicated or stage-1/2 states, 3Ψ for stage 3 -- or the stage whose collectives the
    technique declares it issues, ``plan.comm_stage``; in bytes of the gradient dtype, the
    all-gathers in ``plan.comm_param_bytes`` where set, × (N_d − 1)/N_d for ring collectives)."""
    from .measure import model_states

    ctx, plan = session.ctx, session.plan
    traffic = ctx.all_max([float(summary["traffic_bytes"])])[0]
    width = 2.0 if plan.low_precision_params else 4.0
    stage = plan.sharding_stage if plan.comm_stage is None else plan.comm_stage
    out = dict(summary, step=step, traffic_bytes_max_rank=traffic, bytes_per_step=traffic, formula_stage=stage)
    try:
        check = model_states.comm_check(traffic, rank_psi(session), session.dims.dp, stage,
                                        grad_bytes=width, param_bytes=plan.comm_param_bytes or width)
        formula = check["formula"]["ring_bytes"]
        cfg, r = session.model.cfg, session.recipe
        act_bytes = 2.0 if plan.autocast_dtype is not None else 4.0
        tokens = r.batch_size * plan.accum_steps * r.seq_len  # this rank's tokens per step
        t = session.dims["tp"]
        if t > 1:  # tensor parallelism's activation all-reduces, on top of the dp gradients'
            layers = sum(len(part.blocks) for part in session.build.model_parts)  # this rank's (a stage's, under pp)
            tp = model_states.tp_comm_volume(layers, tokens, cfg.d_model, t, activation_bytes=act_bytes)
            check["tp"] = tp
            formula += tp["ring_bytes"]
        if session.dims["pp"] > 1:
            pp = pp_comm_volume(session, tokens * cfg.d_model * act_bytes)
            check["pp"] = pp
            formula += pp["bytes"]
        # the largest rank's formula, as the traffic is the largest rank's
        formula = ctx.all_max([float(formula)])[0] if ctx.world_size > 1 else formula
        out.update(check=check, formula_bytes=formula, ratio=traffic / formula if formula else None)
    except Exception as e:  # a check must never cost the run its record
        out.update(error=f"{type(e).__name__}: {e}", ratio=None)
    return out


def make_record(session: Session, cost: StepMeasure, curve: list, timing: dict, state_bytes: dict,
                peak: PeakMemory, resumed_from: int | None, wall_seconds: float, status: str = "ok",
                steps_done: int | None = None, comm: dict | None = None) -> dict:
    """The run record (schema :data:`SCHEMA_VERSION`): recipe, provenance, cost, time, memory, curve.

    ``status``: ``ok``, or ``diverged at step N`` (the curve ends at step N with a null loss, and
    ``final_val_loss`` is null); ``steps`` is the planned length, ``steps_done`` the steps trained."""
    recipe, ctx, plan, dataset, model = session.recipe, session.ctx, session.plan, session.dataset, session.model
    step_seconds = timing["step_seconds"]
    seconds_per_step = sum(step_seconds) / len(step_seconds)  # per-step times are already the slowest rank's
    achieved = 1.0 / seconds_per_step / ctx.world_size  # per-device steps/s
    memory = dict(state_bytes)
    optimizer_state = memory.pop("optimizer_state")
    # Sharded techniques (ZeRO, FSDP) leave ranks holding different bytes (uneven partitions):
    # every rank's numbers are kept, and the headline figures are the largest rank's, the one
    # that must fit on its device.
    per_rank = ctx.all_gather_object({k: v for k, v in memory.items() if isinstance(v, int)})
    for key in per_rank[0]:
        memory[key] = max(r[key] for r in per_rank)
    cores_in_use = min(os.cpu_count() or 1, torch.get_num_threads() * int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    record = dict(
        schema=SCHEMA_VERSION,
        label=recipe.label + (f"/ws{ctx.world_size}" if ctx.world_size > 1 else ""),
        status=status,
        recipe=dataclasses.asdict(recipe),
        **provenance(),
        device=dict(type=ctx.device.type, name=device_name(ctx.device), threads=torch.get_num_threads()),
        world_size=ctx.world_size,
        mesh=dict(session.dims.sizes),
        seed=recipe.seed,
        precision=plan.precision,
        accum_steps=plan.accum_steps,
        # sequences per optimizer step over all replicas: micro-batch × accumulation × N_d, what
        # --lr-scaling scales the learning rate by (against --base-batch)
        global_batch=recipe.batch_size * plan.accum_steps * session.dims.dp,
        peak_lr=session.engine.peak_lr,
        technique_notes=session.build.notes_for_record(),
        # --init-from: the weights the run started from (None: the seeded random initialisation)
        init_from=session.build.init_from,
        dataset=dict(name=dataset.name, hash=dataset.content_hash, vocab_size=dataset.vocab_size,
                     entropy_floor=dataset.entropy_floor, train_tokens=dataset.tokens("train"),
                     val_tokens=dataset.tokens("val")),
        params=model.num_params(),
        matmul_params=model.num_params(matmul_only=True),
        tokens_per_step=cost.tokens_per_step,
        steps=cost.total_steps,
        steps_done=cost.total_steps if steps_done is None else steps_done,
        resumed_from_step=resumed_from,
        flops_per_step=float(cost.flops_per_step),
        frozen_flops_per_step=float(cost.frozen_flops_per_step),
        model_flops_per_step=cost.model_flops_per_step,
        model_flops_source="analytic 6N+12LHQT" if plan.dense_compute else "counted (conditional computation)",
        peak_flops=cost.peak,
        tokens_per_second=cost.tokens_per_step / seconds_per_step,
        seconds_per_step=seconds_per_step,
        first_step_seconds=timing["first_step_seconds"],
        # joules per timed step from NVML (None, and why, where there is no counter)
        **energy_fields(timing.get("energy")),
        timed_steps=len(step_seconds),
        step_time=dict(**timing_lib.step_time_stats(step_seconds), samples=step_seconds),
        load=timing_lib.load_report(timing["load_start"], timing["load_end"], cores_in_use, timing.get("others")),
        # peak_flops.value: each dtype's peak weighed by its share of the counted FLOPs
        # (peak_flops.rule, peak_flops.by_dtype): Σ F_d / Σ (F_d / P_d), the dtype's peak in a one-dtype run
        mfu=cost.model_flops_per_step * achieved / cost.peak["value"],
        hfu=cost.flops_per_step * achieved / cost.peak["value"],
        memory=dict(**memory, activations_bytes=cost.activations_bytes, peak_bytes=int(peak.peak_bytes),
                    peak_kind=peak.kind, optimizer_state=optimizer_state,
                    **({"per_rank": per_rank} if ctx.world_size > 1 else {})),
        model_states=model_states_check(session, memory),
        # saved bytes per Transformer layer vs Korthikanti et al.'s formula and this suite's count
        layer_activations=layer_activations_check(session),
        # the collectives of one step (None on one rank, or when no step was untimed)
        comm=comm,
        curve=curve,
        final_val_loss=curve[-1]["val_loss"] if status == "ok" else None,
        wall_seconds=wall_seconds,
    )
    # Impossible values (an MFU above 100%) are errors of the record, never results: the report
    # refuses to plot a record that has any.
    record["consistency_errors"] = timing_lib.consistency_errors(record)
    return strict_json(record)  # as written: a diverged run's non-finite losses are null


def strict_json(value):
    """``value`` with every non-finite float (NaN, ±inf) replaced by None: what strict JSON can
    hold.  A record says why a number is missing (its ``status``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def dumps_record(record: dict) -> str:
    """``record`` as strict JSON (``allow_nan=False``: no bare NaN/Infinity tokens)."""
    return json.dumps(strict_json(record), indent=1, allow_nan=False)


def write_record(record: dict, path: str | os.PathLike) -> Path:
    """Write ``record`` as strict JSON atomically: a reader never sees a partial file, and a
    failed write (:class:`~impls.errors.WriteError`) leaves the previous file intact."""
    return write_text(path, dumps_record(record))
