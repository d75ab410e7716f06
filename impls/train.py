"""The one training loop of etbench.

A :class:`Recipe` names everything a run's result depends on (model, data, optimizer, techniques,
seed, length); techniques turn into model surgery plus a :class:`~impls.techniques.Plan` the engine
executes (autocast dtype, loss scaling, micro-batches).  :func:`run` validates it completely before doing any work, trains under the
``torchrun`` environment (one process or many), measures FLOPs, memory and time with
:mod:`impls.measure`, and returns one JSON-able record; :func:`write_record` writes it atomically.

The optimizer, precision and backward belong to an *engine* (:class:`TorchEngine` here); an engine
that owns all three itself, such as DeepSpeed's, plugs in by implementing the same methods.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import data as data_lib
from . import dist, optimizers, techniques, training_state, zoo
from .errors import ConfigError
from .files import write_text
from .measure import (PeakMemory, SavedActivations, count_flops, device_name, model_flops_per_step,
                      model_state_bytes, peak_flops)

SCHEDULES = ("cosine", "constant")
LR_SCALINGS = ("none", "linear", "sqrt")
SCHEMA_VERSION = 1


@dataclass
class Recipe:
    model: str = "nano"
    data: str = "synthetic"
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    schedule: str = "cosine"  # linear warm-up, then cosine decay to 10% at the last step (Chinchilla)
    lr_warmup: int = 0
    # Large batch (Goyal et al. 2017): lr is tuned for base_batch sequences; "linear" scales it by
    # global batch / base_batch, "sqrt" by its square root (Krizhevsky 2014; Hoffer et al. 2017).
    lr_scaling: str = "none"
    base_batch: int = 8
    batch_size: int = 8  # sequences per rank per micro-batch (grad_accum multiplies the step's batch)
    seq_len: int = 64
    techniques: list[str] = field(default_factory=list)
    seed: int = 0
    steps: int | None = None
    flops_budget: float | None = None  # counted FLOPs, all ranks; the run stops before exceeding it
    eval_every: int | None = None  # None: ten evaluations per run
    eval_batches: int = 4
    timing_warmup: int = 2  # first steps excluded from timing (allocator, thread-pool warm-up)
    mlm_rate: float = 0.15  # masked-LM encoders only (BERT)
    device: str = "auto"
    model_args: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return "/".join([self.model, self.optimizer, *self.techniques])


class RecipeError(ConfigError):
    """Invalid recipe: the message is one line naming the bad value and the valid choices."""


# --------------------------------------------------------------------------- validation


def check_recipe_fields(r: Recipe) -> tuple[list[techniques.TechniqueSpec], techniques.Plan]:
    """The checks that need no data and no model: names, values, technique options and combinations."""
    zoo.config(r.model, **r.model_args)  # unknown model or field -> ConfigError naming the valid ones
    optimizers.check(r.optimizer)
    if r.lr_scaling not in LR_SCALINGS:
        raise RecipeError(f"unknown lr_scaling {r.lr_scaling!r}; valid: {', '.join(LR_SCALINGS)}")
    if r.schedule not in SCHEDULES:
        raise RecipeError(f"unknown schedule {r.schedule!r}; valid: {', '.join(SCHEDULES)}")
    dist.resolve_device(r.device)
    if (r.steps is None) == (r.flops_budget is None):
        raise RecipeError("give exactly one of steps or flops_budget")
    for name, value in (("steps", r.steps), ("batch_size", r.batch_size), ("seq_len", r.seq_len),
                        ("eval_batches", r.eval_batches), ("eval_every", r.eval_every),
                        ("base_batch", r.base_batch)):
        if value is not None and value < 1:
            raise RecipeError(f"{name} must be >= 1, got {value}")
    if r.flops_budget is not None and not r.flops_budget > 0:
        raise RecipeError(f"flops_budget must be > 0, got {r.flops_budget}")
    if not 0 < r.mlm_rate < 1:
        raise RecipeError(f"mlm_rate must be in (0, 1), got {r.mlm_rate}")
    specs = [techniques.parse(t) for t in r.techniques]
    return specs, techniques.configure(specs)


def model_overrides(r: Recipe, dataset: data_lib.TokenData) -> dict:
    """The model follows the data's vocabulary (+1 [MASK] token for a masked-LM encoder)."""
    causal = r.model_args.get("causal", zoo.CONFIGS[r.model][1].get("causal", True))
    return {**r.model_args, "vocab_size": dataset.vocab_size + (0 if causal else 1)}


def validate(r: Recipe, world_size: int = 1) -> tuple[list[techniques.TechniqueSpec], techniques.Plan,
                                                      data_lib.TokenData]:
    """Check everything that can be checked before training; return techniques, plan and data."""
    specs, plan = check_recipe_fields(r)
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
        one_step = model_flops_per_step(meta, r.batch_size * plan.accum_steps, r.seq_len) * world_size
        if r.flops_budget < one_step:
            raise RecipeError(f"flops_budget {r.flops_budget:.3g} is smaller than one step "
                              f"({one_step:.3g} model FLOPs for {r.model}, batch "
                              f"{r.batch_size}×{plan.accum_steps}×{world_size}, seq_len {r.seq_len})")
    return specs, plan, dataset


# --------------------------------------------------------------------------- engine


class TorchEngine:
    """Plain PyTorch: autograd backward, a ``torch.optim`` optimizer, data parallel (DDP) on >1
    rank, and the plan's autocast dtype, dynamic loss scaling and micro-batches."""

    def __init__(self, model: torch.nn.Module, recipe: Recipe, plan: techniques.Plan, ctx: dist.DistContext,
                 total_steps: int):
        self.module = model
        self.model = model
        if ctx.world_size > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        self.optimizer = optimizers.build(recipe.optimizer, model, recipe.lr, recipe.weight_decay)
        # fp16 gradients underflow below 2^-24: scale the loss up, unscale before the update, skip
        # steps whose gradients overflowed and back the scale off (Micikevicius et al. 2018, §3.2).
        self.scaler = torch.amp.GradScaler(ctx.device.type) if plan.loss_scaling else None
        self.recipe, self.plan, self.ctx, self.total_steps = recipe, plan, ctx, total_steps
        global_batch = recipe.batch_size * plan.accum_steps * ctx.world_size
        ratio = global_batch / recipe.base_batch
        self.peak_lr = recipe.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[recipe.lr_scaling]

    def lr_at(self, step: int) -> float:
        r, peak = self.recipe, self.peak_lr
        if step < r.lr_warmup:
            return peak * (step + 1) / r.lr_warmup
        if r.schedule == "constant":
            return peak
        progress = (step - r.lr_warmup) / max(1, self.total_steps - r.lr_warmup)
        return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    def autocast(self):
        dtype = self.plan.autocast_dtype
        return torch.autocast(self.ctx.device.type, dtype=dtype, enabled=dtype is not None)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradients of the mean loss over all target tokens of the step's ``accum_steps``
        micro-batches; returns that loss.

        Each micro-batch contributes its loss *sum* divided by the step's total target-token
        count, so padded or masked micro-batches of different lengths weigh exactly as in one
        large batch (a mean of per-micro-batch means would not).  Across ranks the count is the
        global one, times the world size that DDP's gradient averaging divides by again.
        """
        self.optimizer.zero_grad(set_to_none=True)
        n_targets = (y != zoo.IGNORE_INDEX).sum()
        if self.ctx.world_size > 1:
            torch.distributed.all_reduce(n_targets)
            n_targets = n_targets / self.ctx.world_size
        n_targets = n_targets.clamp(min=1)
        chunks = list(zip(x.chunk(self.plan.accum_steps), y.chunk(self.plan.accum_steps)))
        total = torch.zeros((), device=x.device)
        for i, (xm, ym) in enumerate(chunks):
            # Only the last micro-batch all-reduces gradients under DDP.
            sync = i == len(chunks) - 1 or not hasattr(self.model, "no_sync")
            with (contextlib.nullcontext() if sync else self.model.no_sync()), self.autocast():
                _, loss_sum = self.model(xm, ym, loss_sum=True)
                loss = loss_sum / n_targets
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
        return total

    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        loss = self.forward_backward(x, y)
        if self.scaler:
            self.scaler.step(self.optimizer)  # skipped when the gradients hold inf/NaN
            self.scaler.update()
        else:
            self.optimizer.step()
        return loss.item()

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.module.eval()
        with self.autocast():
            _, loss = self.module(x, y)
        self.module.train()
        return loss.item()

    def state_bytes(self) -> dict[str, int]:
        return model_state_bytes(self.module, self.optimizer)

    def state_dict(self) -> dict:
        return dict(model=self.module.state_dict(), optimizer=self.optimizer.state_dict(),
                    scaler=self.scaler.state_dict() if self.scaler else None)

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler:
            self.scaler.load_state_dict(state["scaler"])


# --------------------------------------------------------------------------- the loop


class Batches:
    """Deterministic batches: a pure function of (seed, split, step, rank), so any step can be
    replayed and a resumed run sees the data a straight run would have seen."""

    def __init__(self, dataset: data_lib.TokenData, recipe: Recipe, model_cfg, ctx: dist.DistContext,
                 accum_steps: int = 1):
        self.dataset, self.r, self.ctx = dataset, recipe, ctx
        self.rows = recipe.batch_size * accum_steps  # a step's sequences on this rank, all micro-batches
        # A bidirectional encoder trains on masked-LM; its [MASK] id is the token after the data's vocab.
        self.mlm_mask_id = None if model_cfg.causal else dataset.vocab_size

    def get(self, split: str, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.r
        x, y = self.dataset.batch(split, index, self.rows, r.seq_len, r.seed, shard=self.ctx.rank)
        if self.mlm_mask_id is not None:
            # SeedSequence, not hash(): str hashes change per process (PYTHONHASHSEED).
            mask_seed = np.random.SeedSequence([r.seed, ("train", "val").index(split), index, self.ctx.rank])
            g = torch.Generator().manual_seed(int(mask_seed.generate_state(1)[0]))
            x, y = data_lib.mask_for_mlm(x, self.dataset.vocab_size, self.mlm_mask_id, r.mlm_rate, g)
        return x.to(self.ctx.device, non_blocking=True), y.to(self.ctx.device, non_blocking=True)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _evaluate(engine, batches: Batches, ctx: dist.DistContext, n: int) -> float:
    losses = [engine.eval_loss(*batches.get("val", i)) for i in range(n)]
    return ctx.all_mean(sum(losses) / n)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="step", disable=not (enabled and sys.stderr.isatty()), leave=False)


@dataclass
class Session:
    """What a run trains: the validated recipe's model, engine, data and process context."""
    recipe: Recipe
    plan: techniques.Plan
    ctx: dist.DistContext
    dataset: data_lib.TokenData
    model: torch.nn.Module
    engine: TorchEngine
    batches: Batches


def prepare(recipe: Recipe, ctx: dist.DistContext | None = None) -> Session:
    """Validate ``recipe`` (before any work), then build model, techniques, engine and batches."""
    world_size = ctx.world_size if ctx else int(os.environ.get("WORLD_SIZE", "1"))
    specs, plan, dataset = validate(recipe, world_size)
    ctx = ctx or dist.init(recipe.device)
    torch.manual_seed(recipe.seed)
    model = zoo.build(recipe.model, device=ctx.device, **model_overrides(recipe, dataset))
    model = techniques.apply_all(model, specs, plan)
    engine = TorchEngine(model, recipe, plan, ctx, total_steps=recipe.steps or 1)
    batches = Batches(dataset, recipe, model.cfg, ctx, plan.accum_steps)
    return Session(recipe, plan, ctx, dataset, model, engine, batches)


def run(recipe: Recipe, ctx: dist.DistContext | None = None, *, save_every: int | None = None,
        checkpoint: str | os.PathLike | None = None, resume: str | os.PathLike | None = None) -> dict:
    """Validate ``recipe``, train, and return the run record (identical on every rank).

    ``save_every`` N steps, the full training state goes to ``checkpoint`` (atomically);
    ``resume`` continues from such a file, ending bit-identical to an uninterrupted run.
    """
    t_start = time.perf_counter()
    if save_every is not None and (save_every < 1 or checkpoint is None):
        raise RecipeError(f"save_every must be >= 1 and needs a checkpoint path, got {save_every}, {checkpoint}")
    world_size = ctx.world_size if ctx else int(os.environ.get("WORLD_SIZE", "1"))
    resumed = training_state.load(resume, recipe, world_size) if resume else None
    session = prepare(recipe, ctx)
    ctx, plan, dataset, model, engine, batches = (session.ctx, session.plan, session.dataset, session.model,
                                                  session.engine, session.batches)
    step_rows = recipe.batch_size * plan.accum_steps * ctx.world_size
    tokens_per_step = step_rows * recipe.seq_len

    # Activations: what one micro-batch's forward keeps for backward (the peak, since each
    # micro-batch's graph is freed by its backward).  FLOPs: one eager step, all micro-batches;
    # its gradients are discarded by the first real step's zero_grad.
    x0, y0 = batches.get("train", 0)
    # (cloned: a view would make the meter count the whole step's index storage).  Both passes
    # run eagerly, so a compiled model compiles in its first (untimed, reported) step.
    xm, ym = x0.chunk(plan.accum_steps)[0].clone(), y0.chunk(plan.accum_steps)[0].clone()
    with torch.compiler.set_stance("force_eager"):
        with SavedActivations(model.parameters()) as saved, engine.autocast():
            model(xm, ym)
        flops_rank, _ = count_flops(lambda: engine.forward_backward(x0, y0))
    flops_per_step = flops_rank * ctx.world_size
    # Model FLOPs exclude recomputation (MFU's numerator).  Conditional computation runs less than
    # the dense formula says: there the counted FLOPs stand in (recompute included, if any).
    model_flops = model_flops_per_step(model, step_rows, recipe.seq_len) if plan.dense_compute else flops_per_step
    if recipe.steps is not None:
        total_steps = recipe.steps
    else:
        total_steps = int(recipe.flops_budget // flops_per_step)
        if total_steps < 1:
            raise RecipeError(f"flops_budget {recipe.flops_budget:.3g} is smaller than one step "
                              f"({flops_per_step:.3g} counted FLOPs)")
    engine.total_steps = total_steps
    # The MFU denominator, probed (if not cached) before training and by rank 0 alone while the
    # other ranks wait, so concurrent ranks never disturb the probe; they then read its cache.
    peak_dtype = plan.autocast_dtype or torch.float32
    if ctx.is_main:
        peak_dev = peak_flops(ctx.device, peak_dtype)
    ctx.barrier()
    if not ctx.is_main:
        peak_dev = peak_flops(ctx.device, peak_dtype)
    eval_every = recipe.eval_every or max(1, total_steps // 10)

    if resumed:
        engine.load_state_dict(resumed["engine"])
        start, curve, window_losses = resumed["step"], resumed["curve"], resumed["window_losses"]
        training_state.restore_rng(resumed["rng"])
    else:
        start, window_losses = 0, []
        curve = [dict(step=0, flops=0.0, tokens=0, train_loss=None,
                      val_loss=_evaluate(engine, batches, ctx, recipe.eval_batches))]
    # The first steps of this process are untimed: allocator and thread-pool warm-up, and the
    # compilation of a compiled model, whose time is reported on its own.
    warmup = min(recipe.timing_warmup, total_steps - start - 1)
    step_seconds, first_step_seconds, state_bytes, optimizer_state = [], None, None, None
    bar = _progress(total_steps, ctx.is_main)
    bar.update(start)
    with PeakMemory(ctx.device) as peak:
        for step in range(start, total_steps):
            x, y = batches.get("train", step)
            _sync(ctx.device)
            t0 = time.perf_counter()
            loss = engine.train_step(x, y, step)
            _sync(ctx.device)
            elapsed = time.perf_counter() - t0
            if first_step_seconds is None:
                first_step_seconds = elapsed
            if step - start >= warmup:
                step_seconds.append(elapsed)
            if state_bytes is None:  # after the first update: optimizer state exists, gradients still held
                state_bytes = engine.state_bytes()
                # 8-bit optimizers keep small tensors in fp32: which ones, and their bytes.
                optimizer_state = optimizers.state_bytes_by_kind(engine.optimizer, engine.module)
            window_losses.append(loss)
            done = step + 1
            if done % eval_every == 0 or done == total_steps:
                curve.append(dict(step=done, flops=float(done * flops_per_step), tokens=done * tokens_per_step,
                                  train_loss=ctx.all_mean(sum(window_losses) / len(window_losses)),
                                  val_loss=_evaluate(engine, batches, ctx, recipe.eval_batches)))
                window_losses = []
                bar.set_postfix(val_loss=f"{curve[-1]['val_loss']:.3f}")
            if save_every and (done % save_every == 0 or done == total_steps):
                training_state.save(checkpoint, recipe, ctx, engine, step=done, curve=curve,
                                    window_losses=window_losses)
            bar.update()
    bar.close()
    if not step_seconds:
        raise RecipeError(f"nothing left to train: the checkpoint is at step {start} of {total_steps}")

    seconds_per_step = ctx.all_mean(sum(step_seconds) / len(step_seconds))
    achieved = 1.0 / seconds_per_step / ctx.world_size  # per-device steps/s
    return dict(
        schema=SCHEMA_VERSION,
        label=recipe.label + (f"/ws{ctx.world_size}" if ctx.world_size > 1 else ""),
        recipe=dataclasses.asdict(recipe),
        **_provenance(),
        device=dict(type=ctx.device.type, name=device_name(ctx.device), threads=torch.get_num_threads()),
        world_size=ctx.world_size,
        seed=recipe.seed,
        precision=plan.precision,
        accum_steps=plan.accum_steps,
        peak_lr=engine.peak_lr,
        technique_notes=plan.notes,
        dataset=dict(name=dataset.name, hash=dataset.content_hash, vocab_size=dataset.vocab_size,
                     entropy_floor=dataset.entropy_floor, train_tokens=dataset.tokens("train"),
                     val_tokens=dataset.tokens("val")),
        params=model.num_params(),
        matmul_params=model.num_params(matmul_only=True),
        tokens_per_step=tokens_per_step,
        steps=total_steps,
        resumed_from_step=start if resumed else None,
        flops_per_step=float(flops_per_step),
        model_flops_per_step=float(model_flops),
        model_flops_source="analytic 6N+12LHQT" if plan.dense_compute else "counted (conditional computation)",
        peak_flops=peak_dev,
        tokens_per_second=tokens_per_step / seconds_per_step,
        seconds_per_step=seconds_per_step,
        first_step_seconds=first_step_seconds,
        timed_steps=len(step_seconds),
        mfu=model_flops * achieved / peak_dev["value"],
        hfu=flops_per_step * achieved / peak_dev["value"],
        memory=dict(**state_bytes, activations_bytes=saved.bytes, peak_bytes=int(peak.peak_bytes),
                    peak_kind=peak.kind, optimizer_state=optimizer_state),
        curve=curve,
        final_val_loss=curve[-1]["val_loss"],
        wall_seconds=time.perf_counter() - t_start,
    )


def _provenance() -> dict:
    """git commit (``ETBENCH_GIT_COMMIT`` wins, for asv runs of other commits) and versions."""
    repo = Path(__file__).resolve().parents[1]
    commit, dirty = os.environ.get("ETBENCH_GIT_COMMIT"), None
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                    check=True).stdout.strip()
            dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                        capture_output=True, text=True).stdout.strip())
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    versions = dict(python=platform.python_version(), torch=torch.__version__)
    for package in ("deepspeed", "etbench"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:  # not installed: say so rather than fail the run
            versions[package] = None
    return dict(git_commit=commit, git_dirty=dirty, versions=versions)


def write_record(record: dict, path: str | os.PathLike) -> Path:
    """Write ``record`` as JSON atomically: a reader never sees a partial file."""
    return write_text(path, json.dumps(record, indent=1))
