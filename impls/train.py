"""The one training loop of etbench.

A :class:`Recipe` names everything a run depends on (model, data, optimizer, precision, techniques,
seed, length).  :func:`run` validates it completely before doing any work, trains under the
``torchrun`` environment (one process or many), measures FLOPs, memory and time with
:mod:`impls.measure`, and returns one JSON-able record; :func:`write_record` writes it atomically.

The optimizer, precision and backward belong to an *engine* (:class:`TorchEngine` here); an engine
that owns all three itself, such as DeepSpeed's, plugs in by implementing the same four methods.
"""
from __future__ import annotations

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
from . import dist, optimizers, techniques, zoo
from .errors import ConfigError
from .files import write_text
from .measure import (PeakMemory, SavedActivations, count_flops, device_name, model_flops_per_step,
                      model_state_bytes, peak_flops)

PRECISIONS = ("fp32",)
SCHEDULES = ("cosine", "constant")
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
    batch_size: int = 8  # sequences per rank per step
    seq_len: int = 64
    precision: str = "fp32"
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
        parts = [self.model, self.optimizer, self.precision, *self.techniques]
        return "/".join(parts)


class RecipeError(ConfigError):
    """Invalid recipe: the message is one line naming the bad value and the valid choices."""


# --------------------------------------------------------------------------- validation


def _check_recipe_fields(r: Recipe) -> list[techniques.TechniqueSpec]:
    zoo.config(r.model, **r.model_args)  # unknown model or field -> ConfigError naming the valid ones
    optimizers.check(r.optimizer)
    if r.precision not in PRECISIONS:
        raise RecipeError(f"unknown precision {r.precision!r}; valid: {', '.join(PRECISIONS)}")
    if r.schedule not in SCHEDULES:
        raise RecipeError(f"unknown schedule {r.schedule!r}; valid: {', '.join(SCHEDULES)}")
    dist.resolve_device(r.device)
    if (r.steps is None) == (r.flops_budget is None):
        raise RecipeError("give exactly one of steps or flops_budget")
    for name, value in (("steps", r.steps), ("batch_size", r.batch_size), ("seq_len", r.seq_len),
                        ("eval_batches", r.eval_batches), ("eval_every", r.eval_every)):
        if value is not None and value < 1:
            raise RecipeError(f"{name} must be >= 1, got {value}")
    if r.flops_budget is not None and not r.flops_budget > 0:
        raise RecipeError(f"flops_budget must be > 0, got {r.flops_budget}")
    if not 0 < r.mlm_rate < 1:
        raise RecipeError(f"mlm_rate must be in (0, 1), got {r.mlm_rate}")
    specs = [techniques.parse(t) for t in r.techniques]
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RecipeError(f"technique {dupes[0]!r} given more than once")
    return specs


def _model_overrides(r: Recipe, dataset: data_lib.TokenData) -> dict:
    """The model follows the data's vocabulary (+1 [MASK] token for a masked-LM encoder)."""
    causal = r.model_args.get("causal", zoo.CONFIGS[r.model][1].get("causal", True))
    return {**r.model_args, "vocab_size": dataset.vocab_size + (0 if causal else 1)}


def validate(r: Recipe, world_size: int = 1) -> tuple[list[techniques.TechniqueSpec], data_lib.TokenData]:
    """Check everything that can be checked before training; return parsed techniques and data."""
    specs = _check_recipe_fields(r)
    dataset = data_lib.load(r.data)
    meta = zoo.build(r.model, device="meta", **_model_overrides(r, dataset))
    if r.seq_len > meta.cfg.block_size:
        raise RecipeError(f"seq_len {r.seq_len} exceeds model {r.model!r} block_size {meta.cfg.block_size}; "
                          f"lower seq_len or set model_args block_size")
    for split in ("train", "val"):
        row_len = getattr(dataset, split).shape[1]
        if row_len < r.seq_len + 1:
            raise RecipeError(f"data {dataset.name!r} {split} rows hold {row_len} tokens, fewer than "
                              f"seq_len + 1 = {r.seq_len + 1}")
    if r.flops_budget is not None:
        one_step = model_flops_per_step(meta, r.batch_size, r.seq_len) * world_size
        if r.flops_budget < one_step:
            raise RecipeError(f"flops_budget {r.flops_budget:.3g} is smaller than one step "
                              f"({one_step:.3g} model FLOPs for {r.model}, batch {r.batch_size}×{world_size}, "
                              f"seq_len {r.seq_len})")
    return specs, dataset


# --------------------------------------------------------------------------- engine


class TorchEngine:
    """Plain PyTorch: autograd backward, a ``torch.optim`` optimizer, data parallel (DDP) on >1 rank."""

    def __init__(self, model: torch.nn.Module, recipe: Recipe, ctx: dist.DistContext, total_steps: int):
        self.module = model
        self.model = model
        if ctx.world_size > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        self.optimizer = optimizers.build(recipe.optimizer, model, recipe.lr, recipe.weight_decay)
        self.recipe, self.total_steps = recipe, total_steps

    def lr_at(self, step: int) -> float:
        r = self.recipe
        if step < r.lr_warmup:
            return r.lr * (step + 1) / r.lr_warmup
        if r.schedule == "constant":
            return r.lr
        progress = (step - r.lr_warmup) / max(1, self.total_steps - r.lr_warmup)
        return r.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        _, loss = self.model(x, y)
        loss.backward()
        return loss

    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        loss = self.forward_backward(x, y)
        self.optimizer.step()
        return loss.item()

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.module.eval()
        _, loss = self.module(x, y)
        self.module.train()
        return loss.item()

    def state_bytes(self) -> dict[str, int]:
        return model_state_bytes(self.module, self.optimizer)


# --------------------------------------------------------------------------- the loop


class Batches:
    """Deterministic batches: a pure function of (seed, split, step, rank), so any step can be
    replayed and a resumed run sees the data a straight run would have seen."""

    def __init__(self, dataset: data_lib.TokenData, recipe: Recipe, model_cfg, ctx: dist.DistContext):
        self.dataset, self.r, self.ctx = dataset, recipe, ctx
        # A bidirectional encoder trains on masked-LM; its [MASK] id is the token after the data's vocab.
        self.mlm_mask_id = None if model_cfg.causal else dataset.vocab_size

    def get(self, split: str, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.r
        x, y = self.dataset.batch(split, index, r.batch_size, r.seq_len, r.seed, shard=self.ctx.rank)
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
    ctx: dist.DistContext
    dataset: data_lib.TokenData
    model: torch.nn.Module
    engine: TorchEngine
    batches: Batches


def prepare(recipe: Recipe, ctx: dist.DistContext | None = None) -> Session:
    """Validate ``recipe`` (before any work), then build model, techniques, engine and batches."""
    world_size = ctx.world_size if ctx else int(os.environ.get("WORLD_SIZE", "1"))
    specs, dataset = validate(recipe, world_size)
    ctx = ctx or dist.init(recipe.device)
    torch.manual_seed(recipe.seed)
    model = zoo.build(recipe.model, device=ctx.device, **_model_overrides(recipe, dataset))
    model = techniques.apply_all(model, specs, recipe)
    engine = TorchEngine(model, recipe, ctx, total_steps=recipe.steps or 1)
    return Session(recipe, ctx, dataset, model, engine, Batches(dataset, recipe, model.cfg, ctx))


def run(recipe: Recipe, ctx: dist.DistContext | None = None) -> dict:
    """Validate ``recipe``, train, and return the run record (identical on every rank)."""
    t_start = time.perf_counter()
    session = prepare(recipe, ctx)
    ctx, dataset, model, engine, batches = session.ctx, session.dataset, session.model, session.engine, session.batches
    tokens_per_step = recipe.batch_size * recipe.seq_len * ctx.world_size

    # One eager forward+backward under the FLOP counter and the saved-tensor meter; the gradients
    # it leaves are discarded by the first real step's zero_grad.
    x0, y0 = batches.get("train", 0)
    with SavedActivations(model.parameters()) as saved:
        flops_rank, _ = count_flops(lambda: engine.forward_backward(x0, y0))
    flops_per_step = flops_rank * ctx.world_size
    model_flops = model_flops_per_step(model, recipe.batch_size, recipe.seq_len) * ctx.world_size
    if recipe.steps is not None:
        total_steps = recipe.steps
    else:
        total_steps = int(recipe.flops_budget // flops_per_step)
        if total_steps < 1:
            raise RecipeError(f"flops_budget {recipe.flops_budget:.3g} is smaller than one step "
                              f"({flops_per_step:.3g} counted FLOPs)")
    engine.total_steps = total_steps
    eval_every = recipe.eval_every or max(1, total_steps // 10)
    warmup = min(recipe.timing_warmup, total_steps - 1)

    curve = [dict(step=0, flops=0.0, tokens=0, train_loss=None,
                  val_loss=_evaluate(engine, batches, ctx, recipe.eval_batches))]
    step_seconds, window_losses, state_bytes = [], [], None
    bar = _progress(total_steps, ctx.is_main)
    with PeakMemory(ctx.device) as peak:
        for step in range(total_steps):
            x, y = batches.get("train", step)
            _sync(ctx.device)
            t0 = time.perf_counter()
            loss = engine.train_step(x, y, step)
            _sync(ctx.device)
            if step >= warmup:
                step_seconds.append(time.perf_counter() - t0)
            if state_bytes is None:  # after the first update: optimizer state exists, gradients still held
                state_bytes = engine.state_bytes()
            window_losses.append(loss)
            done = step + 1
            if done % eval_every == 0 or done == total_steps:
                curve.append(dict(step=done, flops=float(done * flops_per_step), tokens=done * tokens_per_step,
                                  train_loss=ctx.all_mean(sum(window_losses) / len(window_losses)),
                                  val_loss=_evaluate(engine, batches, ctx, recipe.eval_batches)))
                window_losses = []
                bar.set_postfix(val_loss=f"{curve[-1]['val_loss']:.3f}")
            bar.update()
    bar.close()

    seconds_per_step = ctx.all_mean(sum(step_seconds) / len(step_seconds))
    peak_dev = peak_flops(ctx.device, torch.float32)
    achieved = 1.0 / seconds_per_step / ctx.world_size  # per-device steps/s
    record = dict(
        schema=SCHEMA_VERSION,
        label=recipe.label + (f"/ws{ctx.world_size}" if ctx.world_size > 1 else ""),
        recipe=dataclasses.asdict(recipe),
        **_provenance(),
        device=dict(type=ctx.device.type, name=device_name(ctx.device),
                    threads=torch.get_num_threads()),
        world_size=ctx.world_size,
        seed=recipe.seed,
        dataset=dict(name=dataset.name, hash=dataset.content_hash, vocab_size=dataset.vocab_size,
                     entropy_floor=dataset.entropy_floor, train_tokens=dataset.tokens("train"),
                     val_tokens=dataset.tokens("val")),
        params=model.num_params(),
        matmul_params=model.num_params(matmul_only=True),
        tokens_per_step=tokens_per_step,
        steps=total_steps,
        flops_per_step=float(flops_per_step),
        model_flops_per_step=float(model_flops),
        peak_flops=peak_dev,
        tokens_per_second=tokens_per_step / seconds_per_step,
        seconds_per_step=seconds_per_step,
        timed_steps=len(step_seconds),
        mfu=model_flops * achieved / peak_dev["value"],
        hfu=flops_per_step * achieved / peak_dev["value"],
        memory=dict(**state_bytes, activations_bytes=saved.bytes, peak_bytes=int(peak.peak_bytes),
                    peak_kind=peak.kind),
        curve=curve,
        final_val_loss=curve[-1]["val_loss"],
        wall_seconds=time.perf_counter() - t_start,
    )
    return record


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
