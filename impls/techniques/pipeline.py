"""Pipeline parallelism: the model's layers split into stages on the ranks of the ``pp`` mesh
dimension; each step's batch is cut into ``microbatches`` (m) micro-batches that flow through the
stages, activations forward and their gradients backward, point to point.

Schedules (``torch.distributed.pipelining``):

* ``gpipe`` — GPipe (Huang et al. 2019, "GPipe: Efficient Training of Giant Neural Networks using
  Pipeline Parallelism", NeurIPS, arXiv 1811.06965): every micro-batch's forward, then every
  backward (fill, drain).  A stage waits (p−1) forward and (p−1) backward slots, so with p stages
  the idle ("bubble") share of a step is (p−1)/(m+p−1) (§2.3: negligible when m ≥ 4p), and each
  stage keeps the activations of all m micro-batches until their backward.
* ``1f1b`` — one-forward-one-backward, PipeDream-Flush (Narayanan et al. 2021, "Memory-Efficient
  Pipeline-Parallel DNN Training", ICML, arXiv 2006.09503; and "Efficient Large-Scale Language
  Model Training on GPU Clusters Using Megatron-LM", SC21, arXiv 2104.04473, §2.2.1): after p−s
  warm-up forwards, stage s alternates a backward and a forward, so it stashes at most p−s ≤ p
  micro-batches' activations instead of m; the bubble is the same (p−1)/(m+p−1) (Megatron writes
  it as (p−1)/m of the ideal time t_id = m·(t_f+t_b)).  torch needs m ≥ p for it.
* ``interleaved`` — interleaved 1F1B (Narayanan et al. 2021, SC21, §2.2.2): each rank holds
  ``chunks`` = v model chunks (stages s, s+p, s+2p, ... of p·v, torch's looped placement); a
  micro-batch crosses every rank v times with 1/v of the layers each time, so the bubble time
  shrinks v-fold: (p−1)·(t_f+t_b)/v, an idle share of (p−1)/(v·m+p−1), for v times more
  point-to-point messages.  Megatron requires m to be a multiple of p; torch relaxes it to
  m a multiple of rounds = max(1, ⌊m/p⌋); with m < p (one round of m micro-batches) the bubble
  shrinks less than v-fold, and not at all for m = 1.

All three are synchronous ("flush") schedules: every stage applies the same weights to all m
micro-batches of a step, and the gradient equals that of the whole batch.  PipeDream's
asynchronous schedule (Narayanan et al. 2019, "PipeDream: Generalized Pipeline Parallelism for
DNN Training", SOSP) keeps pipelining across steps and needs *weight stashing* (each in-flight
micro-batch's backward uses the weight version its forward saw) and vertical sync; PyTorch's
schedules do not provide it, and it is not implemented here.

The split (this module's :func:`apply`): every rank builds and seeds the same full model (so the
weights equal the unpipelined run's), then keeps only its stage(s): :class:`StageModule` *wraps*
the model's own submodules — the first stage the token/position embeddings and its blocks, a
middle stage blocks, the last stage blocks, the final norm and the LM head (RoPE tables where the
model uses them).  With tied embeddings (the zoo's default: ``lm_head.weight is tok_emb.weight``)
the first and the last stage each hold a copy; the engine all-reduces their two gradient
contributions between those two ranks before the update (Megatron-LM's embedding group), so
both copies receive the full gradient and stay identical.  The step's loss is Σ token cross-entropy / the step's target-token count, computed on
the last stage per micro-batch (no extra 1/m: the schedule runs with ``scale_grads=False``), as
in the torch engine.  The engine is :mod:`impls.engines.pipeline_engine`.

Refused before any work: ``pp=1`` (nothing to pipeline), ``cp`` > 1 with it (no technique
shards the sequence here; tensor parallelism composes: ``tp`` shards each stage's blocks after
the split, and sequence parallelism is refused with pp by ``tp``), layers not
divisible into p·v stages, a batch not divisible into m micro-batches, 1F1B with m < p, torch's
interleaving condition, and techniques whose loss terms or engines cannot run stage-wise (see
``CONFLICTS``).  Data parallelism composes: with ``dp`` > 1 the default ``ddp`` wraps each stage
module, and torch's ``PipelineStage`` runs every micro-batch but the last backward in
``no_sync`` (one gradient all-reduce per step).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..errors import ConfigError

NAME = "pp"
STAGE = "shard"
MESH_DIMS = ("pp",)
SCHEDULES = ("gpipe", "1f1b", "interleaved")
# chunks=0: automatic, 2 model chunks per rank for the interleaved schedule, 1 otherwise.
OPTIONS = {"schedule": "1f1b", "microbatches": 4, "chunks": 0}
CHOICES = {"schedule": SCHEDULES}
_AUX = ("its auxiliary loss term reads router state kept by blocks in earlier stages (other ranks); the "
        "pipeline's loss is computed on the last stage only and its backward reaches earlier stages as "
        "activation gradients, so the term's gradient could not reach those routers")
_ENGINE = "it runs its own engine (DeepSpeed), which cannot drive a pipeline schedule here"
_SHARDED = ("the pipeline engine's gradient clipping and checkpoints assume each stage's parameters and "
            "gradients whole on its rank; with pp use the default ddp for data parallelism")
CONFLICTS = {
    "mod": _AUX, "moe": _AUX, "mode": _AUX,
    "grad_accum": "the pipeline's micro-batches are its gradient accumulation; set pp:microbatches instead",
    "zero": _ENGINE, "onebit": _ENGINE,
    "fsdp": _SHARDED, "fairscale-fsdp": _SHARDED, "oss": _SHARDED, "zero-redundancy": _SHARDED,
    "data-parallel": "single-process DataParallel cannot hold one pipeline stage per rank",
    "fp16": ("fp16 loss scaling must skip a step on every stage together (the found-inf flag is not "
             "reduced over the pipeline group here); use bf16"),
}


def chunks_of(options: dict) -> int:
    """v: model chunks per rank (``chunks=0`` picks 2 for interleaved, 1 otherwise)."""
    if options["chunks"]:
        return options["chunks"]
    return 2 if options["schedule"] == "interleaved" else 1


def bubble_formula(p: int, m: int, v: int = 1) -> float:
    """The idle share of a step under a synchronous schedule: (p−1)/(v·m+p−1), i.e. bubble time
    (p−1)(t_f+t_b)/v over the step's m(t_f+t_b) + (p−1)(t_f+t_b)/v (GPipe §2.3 for v=1;
    Megatron-LM SC21 §2.2.2 for interleaving, whose v-fold reduction needs m a multiple of p)."""
    return (p - 1) / (v * m + p - 1)


def configure(plan, options):
    if options["microbatches"] < 1:
        raise ConfigError(f"pp:microbatches={options['microbatches']} must be an integer >= 1")
    v = chunks_of(options)
    if options["schedule"] == "interleaved" and v < 2:
        raise ConfigError(f"pp:chunks={v} with schedule=interleaved: interleaving needs >= 2 model chunks "
                          f"per rank (with 1 it is 1f1b); valid: chunks >= 2 or schedule=1f1b")
    if options["schedule"] != "interleaved" and v != 1:
        raise ConfigError(f"pp:chunks={v} with schedule={options['schedule']}: only the interleaved schedule "
                          f"holds several chunks per rank; valid: chunks=1 (or 0) or schedule=interleaved")


def check_mesh(dims, options):
    p = dims["pp"]
    if p == 1:
        raise ConfigError("technique 'pp' needs a pipeline size > 1 (this run has pp=1: nothing to pipeline); "
                          "give --mesh pp=N with N ranks or more")
    if dims["cp"] > 1:
        raise ConfigError(f"technique 'pp' with cp={dims['cp']}: no technique shards the sequence across "
                          f"stages here; valid: pp with dp and tp")
    m = options["microbatches"]
    if options["schedule"] == "1f1b" and m < p:
        raise ConfigError(f"pp:microbatches={m} < pp={p}: torch's Schedule1F1B needs at least one "
                          f"micro-batch per stage; valid: microbatches >= {p}, or schedule=gpipe")
    if options["schedule"] == "interleaved":
        rounds = max(1, m // p)
        if m % rounds:
            raise ConfigError(f"pp:microbatches={m} with schedule=interleaved at pp={p}: torch's interleaved "
                              f"1F1B needs m to be a multiple of max(1, m // p) = {rounds}; valid: a multiple "
                              f"of {p} (Megatron's condition, under which the bubble shrinks by v) or m < {p}")


def check_recipe(recipe, options):
    """Layers into p·v stages and the batch into m micro-batches (needs the model config and
    the mesh's pp, which ``check_model`` does not see)."""
    from .. import zoo

    p = recipe.mesh.get("pp", 1)
    v, m = chunks_of(options), options["microbatches"]
    cfg = zoo.config(recipe.model, **recipe.model_args)
    if cfg.n_layer % (p * v):
        raise ConfigError(f"model {recipe.model!r} has n_layer={cfg.n_layer}, not divisible into pp×chunks = "
                          f"{p}×{v} = {p * v} stages of equal depth; valid: n_layer a multiple of {p * v}")
    if recipe.batch_size % m:
        raise ConfigError(f"batch_size={recipe.batch_size} does not divide into pp:microbatches={m}; valid: "
                          f"microbatches dividing {recipe.batch_size}")


class StageModule(nn.Module):
    """One pipeline stage: a contiguous slice of the model's blocks, wrapped together with the
    embeddings (first stage) and the final norm and LM head (last stage).  It holds the model's own
    submodules (same Parameters), so its weights are exactly the full model's.  ``forward`` maps
    token ids (first stage) or the residual stream (B, T, C) to the residual stream, or to logits
    (B, T, V) on the last stage."""

    def __init__(self, model: nn.Module, index: int, num_stages: int, layers: range):
        super().__init__()
        self.cfg = model.cfg
        self.index, self.num_stages, self.layers = index, num_stages, tuple(layers)
        self.is_first, self.is_last = index == 0, index == num_stages - 1
        if self.is_first:
            self.tok_emb, self.pos_emb, self.drop = model.tok_emb, model.pos_emb, model.drop
        self.blocks = nn.ModuleList(model.blocks[i] for i in layers)
        if self.is_last:
            self.norm_f, self.lm_head = model.norm_f, model.lm_head
        self.rope = model.cfg.position == "rope"
        if self.rope:
            self.register_buffer("rope_cos", model.rope_cos, persistent=False)
            self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:  # x: token ids (B, T)
            t = x.shape[1]
            if t > self.cfg.block_size:
                raise ValueError(f"sequence length {t} exceeds block_size {self.cfg.block_size}")
            h = self.tok_emb(x)
            if self.pos_emb is not None:
                h = h + self.pos_emb(torch.arange(t, device=x.device))
            x = self.drop(h)
        rope = (self.rope_cos, self.rope_sin) if self.rope else None
        for block in self.blocks:
            x = block(x, rope, None)
        if self.is_last:
            return self.lm_head(self.norm_f(x))  # (B, T, V)
        return x  # (B, T, C)

    def tied_weight(self) -> nn.Parameter | None:
        """This stage's copy of the tied embedding (first: the input table, last: the LM head)."""
        if not self.cfg.tie_embeddings:
            return None
        if self.is_first:
            return self.tok_emb.weight
        if self.is_last:
            return self.lm_head.weight
        return None


def stage_indices(schedule: str, p: int, v: int, pp_rank: int) -> list[int]:
    """The stages rank ``pp_rank`` runs: its own for gpipe/1f1b, and stages r, r+p, ... (torch's
    looped placement) for the interleaved schedule."""
    return [pp_rank + k * p for k in range(v)]


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on ``meta`` (no storage): parameter
    counts and model FLOPs of the whole model after the split, tied weights kept tied."""
    memo = {}
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in memo:
            meta = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def apply(build, options):
    model = build.model  # materialised and seeded: the same weights on every rank
    dims, device = build.dims, build.device
    p, v, m = dims["pp"], chunks_of(options), options["microbatches"]
    num_stages = p * v
    per_stage = model.cfg.n_layer // num_stages
    pp_rank = dims.rank_in("pp", device.type)
    build.full_model = meta_copy(model)
    parts = []
    for index in stage_indices(options["schedule"], p, v, pp_rank):
        layers = range(index * per_stage, (index + 1) * per_stage)
        parts.append(StageModule(model, index, num_stages, layers))
    build.model_parts = list(parts)
    build.train_parts = list(parts)
    build.engine = "pipeline"
    build.notes[NAME] = dict(schedule=options["schedule"], pp=p, chunks=v, microbatches=m, stages=num_stages,
                             layers_per_stage=per_stage,
                             # the stages each pipeline rank runs (the same note on every rank)
                             placement=[stage_indices(options["schedule"], p, v, r) for r in range(p)],
                             tied_embeddings=bool(model.cfg.tie_embeddings),
                             bubble_formula=bubble_formula(p, m, v),
                             # the v-fold reduction assumes m a multiple of p (Megatron's condition)
                             bubble_formula_applies=v == 1 or m % p == 0,
                             bubble_formula_text=f"(p-1)/(v*m+p-1) = ({p}-1)/({v}*{m}+{p}-1)")
