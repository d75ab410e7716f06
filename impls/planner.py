"""``etbench plan``: an auto-parallel planner from a transparent analytic cost model.

Given a zoo model, a device count, the devices' memory, peak FLOP/s and link bandwidth, a global
batch and a sequence length, it enumerates rank layouts — data parallelism with a ZeRO stage
(0 = DDP, 1 = P_os, 2 = P_os+g, 3 = P_os+g+p / FSDP), tensor parallelism of degree t, pipeline
parallelism of degree p with a schedule (GPipe, 1F1B, interleaved 1F1B with v chunks per device),
the micro-batch size (hence the micro-batch count m) and full activation checkpointing on/off,
with dp = devices / (t·p) — predicts each layout's per-device memory by component and its step
time by component, rejects what does not fit or does not divide (with the reason), and ranks the
rest by predicted step time.  Every number comes from a named formula (:data:`FORMULAS`); each
:class:`Prediction` lists the names it used.  Nothing here is measured: it is a model, and its
assumptions (:data:`ASSUMPTIONS`) are printed with the table.

Model states per device (exact for etbench's own runs: counted tensor by tensor on ``meta``)
-------------------------------------------------------------------------------------------------
Parameters are counted from the zoo config on the ``meta`` device, tensor by tensor, and each
tensor is classified by how etbench's tensor parallelism shards it — Megatron-LM's layout
(Shoeybi et al. 2019, §3): in every Transformer block ``attn.qkv`` (weight and bias) and
``mlp.up`` (weight and bias) are column-parallel (dim 0 split over t), ``attn.proj.weight`` and
``mlp.down.weight`` row-parallel (dim 1 split over t) with their biases replicated; norms,
embeddings and the LM head are replicated.  Pipeline stage k holds its L/p blocks (interleaved:
v chunks of L/(p·v) blocks, chunk c on stage c mod p); stage 0 also the token (and position)
embedding, stage p−1 the final norm and the LM head — with tied embeddings a *copy* of the
embedding (Megatron's embedding group), so the tied weight counts twice when p > 1.

The ZeRO formulas (Rajbhandari et al. 2020, §3.1/§5, :mod:`impls.measure.model_states`) then
apply to the Ψ each device holds before data parallelism: params p_b·Ψ, grads g_b·Ψ, optimizer
K·Ψ, the stage's parts divided over dp.  Per-parameter bytes by ``precision``:

* ``fp32`` — the suite's default (fp32 parameters, autocast or not): p_b = g_b = 4, AdamW K = 8,
  plus torch's 4-byte ``step`` tensor per parameter tensor;
* ``mixed`` — the paper's mixed-precision Adam (DeepSpeed bf16/fp16): p_b = g_b = 2, K = 12
  (fp32 master weights + two moments).

How a stage divides over dp: stages 1–2 partition a flat buffer (⌈Ψ/dp⌉ per rank: DeepSpeed,
ZeroRedundancyOptimizer and OSS up to their whole-tensor balancing); stage 3 follows FSDP2, which
shards every tensor on dim 0 into ⌈d₀/dp⌉-row shards, parameters and gradients padded to that,
the optimizer's moments the unpadded local rows (rank 0 holds the most).

Activations per device (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", §4, Eq. 1–2 and §4.2.3)
-------------------------------------------------------------------------------------------------
Per layer and micro-batch, with s sequence length, b micro-batch size, h hidden size, a heads, e
bytes per activation element (2 in the paper) and 1-byte dropout masks: sbh(34 + 5as/h) without
parallelism, sbh(10 + 24/t + 5as/(ht)) with tensor parallelism, sbh(34/t + 5as/(ht)) with
sequence parallelism, 2sbh (the layer input) with full recomputation.  The code keeps the
paper's terms by name so they generalise to e = 4 (fp32), no dropout (no masks), flash attention
(no s×s scores: the kernel keeps its output and a logsumexp instead) and SwiGLU MLPs (four d_ff
tensors instead of GELU's two).  The first and last stage add the paper's extra terms (embedding
dropout mask; final-norm and LM-head inputs and the 4sbV fp32 log-softmax of the loss; etbench's
LM head is replicated, so that term is not divided by t).  In-flight micro-batches (their
activations held at once): GPipe m, 1F1B min(m, p−k) on stage k (the first holds p), interleaved
1F1B p·(1 + (p−1)/(p·v)) on the first stage (Korthikanti §4.2.3; other stages: (p−k) + (p−1)/v,
this module's generalisation).  With recomputation one layer's full activations are live again
during its backward (its working set), added once.

Step time
---------
compute = model FLOPs × (4/3 with full recomputation: one more forward, which is 1/3 of
6N + 12LHQT) / (devices × peak × MFU), model FLOPs per token 6N + 12·L·H·Q·T (PaLM App. B,
:func:`impls.measure.flops.model_flops_per_token`); MFU is an ASSUMPTION (``--mfu``): the
fraction of peak a device sustains on the FLOPs it executes.  Tensor parallelism: 2 all-reduces
in the forward and 2 in the backward per layer (Megatron), +2 with recomputation, each of s·b·h
elements, a rank moving 2(t−1)/t of it (ring).  Pipeline: per micro-batch a stage sends s·b·h
forward and s·b·h backward (× v interleaved), point to point.  Bubble: the pipeline's time is the
ideal time × (1 + (p−1)/(v·m)), i.e. a bubble fraction (p−1)/(m+p−1) of the step for v = 1
(GPipe and 1F1B alike), (p−1)/v / (m + (p−1)/v) interleaved (Narayanan et al. 2021).  Data
parallelism: the ZeRO §7 volumes of :func:`impls.measure.model_states.comm_volume` (2Ψ for
stages 0–2, 3Ψ for stage 3, × (dp−1)/dp per rank) on the device's own Ψ, except that ZeRO-3
with m micro-batches reduce-scatters every micro-batch's gradients at stages 2–3 (a rank keeps
only its gradient partition, so it cannot accumulate the rest: DeepSpeed, FSDP2 by default), m·Ψ,
and all-gathers the parameters in every micro-batch's forward and backward at stage 3 (FSDP2
reshards after each forward), 2m·Ψ; stages 0–1 accumulate whole gradients and reduce once.
Time = bytes / link bandwidth (the bandwidth of a device's own link, full duplex).  Overlap: see
:data:`ASSUMPTIONS`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

from .errors import ConfigError

GIB = 1 << 30
#: Size limits of the inputs, finite so that an absurd value is refused in one line instead of
#: running for minutes: 2^20 devices (~10x the largest clusters), 2^40 sequences per step, and
#: 100,000 layouts evaluated (about 15 s on a laptop core; a narrower search, --stages,
#: --schedules, --chunks, --micro-batch-sizes or --checkpointing, brings a large cluster under it).
MAX_DEVICES = 1 << 20
MAX_GLOBAL_BATCH = 1 << 40
MAX_LAYOUTS = 100_000

SCHEDULES = ("gpipe", "1f1b", "interleaved")
STAGE_NAMES = {0: "DDP", 1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3/FSDP"}
OVERLAPS = ("dp", "none")
ATTENTION = ("stored", "flash")

SOURCES = {
    "zero": "Rajbhandari et al. 2020, ZeRO (arXiv 1910.02054) §3.1, §5, §7",
    "korthikanti": "Korthikanti et al. 2022, Reducing Activation Recomputation in Large Transformer Models "
                   "(arXiv 2205.05198) §4, Eq. 1-2, §4.2.3",
    "megatron": "Shoeybi et al. 2019, Megatron-LM (arXiv 1909.08053) §3",
    "narayanan": "Narayanan et al. 2021, Efficient Large-Scale Language Model Training on GPU Clusters "
                 "(arXiv 2104.04473) §2.2",
    "gpipe": "Huang et al. 2019, GPipe (arXiv 1811.06965)",
    "palm": "Chowdhery et al. 2022, PaLM (arXiv 2204.02311) App. B",
    "fsdp2": "torch FSDP2 (fully_shard): dim-0 shards of ceil(d0/N) rows, padded",
}

#: Every formula a prediction can use, by name: what it computes and where it comes from.
FORMULAS: dict[str, str] = {
    "param_count_meta": "Psi per device counted tensor by tensor from the zoo config on the meta device",
    "tp_megatron_sharding": "qkv, mlp.up (weight+bias) column-parallel, attn.proj/mlp.down weight row-parallel, "
                            "their biases, norms, embeddings, LM head replicated [" + SOURCES["megatron"] + "]",
    "pp_stage_assignment": "stage k holds L/p blocks; stage 0 the embeddings, stage p-1 final norm + LM head "
                           "(a copy of a tied embedding)",
    "zero_model_states": "params p_b*Psi, grads g_b*Psi, optimizer K*Psi; stage 1 divides the optimizer, "
                         "2 also the grads, 3 also the params over dp [" + SOURCES["zero"] + "]",
    "zero_flat_partition": "stages 1-2: ceil(Psi/dp) elements per rank of each partitioned state",
    "fsdp2_dim0_padding": "stage 3: each tensor's dim 0 in ceil(d0/dp)-row shards, params and grads padded, "
                          "optimizer moments the unpadded local rows [" + SOURCES["fsdp2"] + "]",
    "adam_step_scalar": "torch AdamW keeps a 4-byte step tensor per parameter tensor (fp32 precision)",
    "act_korthikanti": "per layer sbh(34+5as/h) (fp16, dropout), by term [" + SOURCES["korthikanti"] + " Eq. 1]",
    "act_korthikanti_tp": "per layer sbh(10+24/t+5as/(ht)) [" + SOURCES["korthikanti"] + " Eq. 2]",
    "act_korthikanti_tp_sp": "per layer sbh(34/t+5as/(ht)) with sequence parallelism [" + SOURCES["korthikanti"] + "]",
    "act_flash_attention": "flash attention keeps no s*s scores: its output (e*sbh/t) and an fp32 logsumexp "
                           "(4*a*s*b/t) instead of the 5as^2b term",
    "act_full_recompute": "full recomputation keeps each layer's input, 2sbh at fp16 (/t with SP), plus one "
                          "layer's full activations while it is recomputed [" + SOURCES["korthikanti"] + "]",
    "act_head_terms": "last stage: final-norm and LM-head inputs (e*sbh each), 4sbV fp32 log-softmax of the "
                      "loss (LM head replicated in etbench: not /t); first stage: embedding dropout mask sbh",
    "inflight_gpipe": "GPipe holds all m micro-batches' activations [" + SOURCES["gpipe"] + "]",
    "inflight_1f1b": "1F1B holds min(m, p-k) micro-batches on stage k, p on the first [" + SOURCES["narayanan"] + "]",
    "inflight_interleaved": "interleaved 1F1B: first stage p*(1+(p-1)/(p*v)) micro-batches of its L/p layers "
                            "[" + SOURCES["korthikanti"] + " §4.2.3]; stage k: (p-k)+(p-1)/v (generalisation)",
    "model_flops_palm": "training FLOPs per token 6N + 12*L*H*Q*T [" + SOURCES["palm"] + "]",
    "compute_at_stated_mfu": "compute = executed FLOPs / (devices * peak * MFU); MFU is an assumption",
    "recompute_one_forward": "full recomputation executes one more forward: x 4/3 of the model FLOPs",
    "tp_allreduce_megatron": "2 all-reduces forward + 2 backward per layer (+2 recomputed) of s*b*h elements, "
                             "2(t-1)/t of it per rank [" + SOURCES["megatron"] + "]",
    "pp_p2p": "per micro-batch s*b*h forward + s*b*h backward per stage boundary (x v interleaved; /t with SP)",
    "bubble_gpipe_1f1b": "pipeline time = ideal * (1 + (p-1)/m): bubble fraction (p-1)/(m+p-1) "
                         "[" + SOURCES["gpipe"] + "; " + SOURCES["narayanan"] + "]",
    "bubble_interleaved": "pipeline time = ideal * (1 + (p-1)/(v*m)) [" + SOURCES["narayanan"] + "]",
    "zero_comm_volume": "DP/ZeRO per-rank bytes 2*Psi (stages 0-2) or 3*Psi (stage 3) x (dp-1)/dp "
                        "(impls.measure.model_states.comm_volume) [" + SOURCES["zero"] + " §7]",
    "zero23_reduce_scatter_per_microbatch": "ZeRO-2/3 keep only a gradient partition, so every micro-batch's "
                                            "gradients are reduce-scattered (DeepSpeed, FSDP2 by default): m*Psi",
    "zero3_allgather_per_microbatch": "ZeRO-3/FSDP2 all-gathers the parameters in every micro-batch's forward "
                                      "and backward (reshard after forward): 2m*Psi",
    "overlap_dp_backward": "gradient reduction overlaps the backward it follows (stages 0-1: the last micro-batch's, "
                           "stages 2-3: every micro-batch's) except its last bucket",
    "overlap_zero3_prefetch": "ZeRO-3 all-gathers overlap the forward/backward compute they prefetch for",
    "overlap_none": "no communication overlaps compute: every collective's time adds to the step",
}

ASSUMPTIONS = (
    "MFU (--mfu) is an assumption, not a measurement: the fraction of peak each device sustains on the FLOPs it "
    "executes (recomputation included, so a checkpointed layout's model-FLOPs MFU comes out lower).",
    "Each device has its own link of --link-gbps (Gbit/s, full duplex) for DP and PP traffic and --tp-link-gbps "
    "for TP traffic; collectives are bandwidth-bound rings (latency and congestion ignored).",
    "TP all-reduces and PP point-to-point transfers are never overlapped: each layer's output is needed by the "
    "next operation (Megatron's synchronous TP), and the transfers sit on the pipeline's critical path.",
    "--overlap dp (default): gradient reduction runs bucket by bucket during the backward it follows -- for DDP "
    "and ZeRO-1 the LAST micro-batch's only (gradient accumulation defers it, as etbench and DDP's no_sync do), "
    "for ZeRO-2/3 every micro-batch's (each reduce-scatters its gradients) -- so only what does not fit in that "
    "backward, and at least the last bucket (--bucket-mb, DDP's 25 MiB), is exposed; ZeRO-1/2's parameter "
    "all-gather after the optimizer step is exposed; ZeRO-3's all-gathers overlap the compute they prefetch "
    "for (exposed: the excess, at least one bucket).  --overlap none: every collective is exposed.",
    "Memory counts model states and activations only: temporary buffers, communication buckets, the CUDA "
    "context and allocator fragmentation come on top, so 'fits' is necessary, not sufficient.",
)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Precision:
    name: str
    param_bytes: float
    grad_bytes: float
    k: float  # optimizer-state bytes per parameter (fp32 master copy included for mixed)
    step_bytes: int  # per parameter tensor (torch AdamW's ``step``)
    act_bytes: int  # bytes per activation element
    about: str


PRECISIONS = {
    "mixed": Precision("mixed", 2.0, 2.0, 12.0, 0, 2,
                       "ZeRO paper's mixed-precision AdamW (DeepSpeed bf16): 2+2+12 bytes/param, 2-byte activations"),
    "fp32": Precision("fp32", 4.0, 4.0, 8.0, 4, 4,
                      "etbench's default fp32 AdamW: 4+4+8 bytes/param + 4 B step per tensor, 4-byte activations"),
}


@dataclass(frozen=True)
class Hardware:
    devices: int
    device_mem: float  # bytes
    device_flops: float  # peak FLOP/s per device
    link_gbps: float  # Gbit/s per device, DP and PP
    tp_link_gbps: float  # Gbit/s per device, TP
    mfu: float = 0.4

    @property
    def link_bytes_per_s(self) -> float:
        return self.link_gbps * 1e9 / 8

    @property
    def tp_bytes_per_s(self) -> float:
        return self.tp_link_gbps * 1e9 / 8


@dataclass(frozen=True)
class Layout:
    dp: int
    tp: int
    pp: int
    zero_stage: int
    schedule: str  # "none" when pp == 1
    chunks: int  # v (interleaved), else 1
    micro_batch_size: int
    micro_batches: int  # m per step per data-parallel rank
    checkpointing: bool
    sequence_parallel: bool = False

    @property
    def label(self) -> str:
        parts = [f"dp{self.dp}", STAGE_NAMES[self.zero_stage]]
        if self.tp > 1:
            parts.append(f"tp{self.tp}" + ("+sp" if self.sequence_parallel else ""))
        if self.pp > 1:
            parts.append(f"pp{self.pp} {self.schedule}" + (f" v{self.chunks}" if self.schedule == "interleaved" else ""))
        parts.append(f"m{self.micro_batches}x{self.micro_batch_size}")
        if self.checkpointing:
            parts.append("ckpt")
        return " ".join(parts)


@dataclass
class Prediction:
    """One layout's predicted memory (bytes, of the device that needs the most) and step time
    (seconds), by component, with the names of the formulas used (:data:`FORMULAS`)."""

    layout: Layout
    fits: bool
    reason: str | None  # why rejected, None if it fits
    memory: dict[str, float]  # params, grads, optimizer, activations (worst pipeline stage)
    memory_total: float
    worst_stage: int
    memory_by_stage: list[float]
    activation_terms: dict[str, float]  # worst stage, by Korthikanti term
    time: dict[str, float]  # compute, tp_comm, pp_p2p, bubble, dp_comm_exposed (+ dp_comm_total)
    step_time: float
    bubble_fraction: float
    predicted_mfu: float
    formulas: tuple[str, ...]

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["label"] = self.layout.label
        return out


@dataclass(frozen=True)
class Rejected:
    layout: Layout
    kind: str  # "divisibility" | "memory"
    reason: str
    prediction: Prediction | None = None  # memory rejections keep their prediction

    def as_dict(self) -> dict:
        return {"label": self.layout.label, "layout": dataclasses.asdict(self.layout), "kind": self.kind,
                "reason": self.reason, "memory_total": self.prediction.memory_total if self.prediction else None}


# --------------------------------------------------------------------------------------------
# Parameter counts (exact, on meta)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParamTensor:
    name: str
    shape: tuple[int, ...]
    part: int | str  # block index, "embed" or "head"
    tp: str  # "col" | "row" | "rep"
    tied_copy: bool = False  # the LM head's copy of a tied embedding (held only when p > 1)


@dataclass(frozen=True)
class ModelCounts:
    cfg: object  # TransformerConfig
    tensors: tuple[ParamTensor, ...]
    matmul_params: int  # N of 6N

    @property
    def psi(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors if not t.tied_copy)


_COL = re.compile(r"blocks\.\d+\.(attn\.qkv|mlp\.up)\.(weight|bias)")
_ROW = re.compile(r"blocks\.\d+\.(attn\.proj|mlp\.down)\.weight")


def _tp_rule(name: str) -> str:
    if _COL.fullmatch(name):
        return "col"
    if _ROW.fullmatch(name):
        return "row"
    return "rep"


def _part(name: str) -> int | str:
    if name.startswith("blocks."):
        return int(name.split(".")[1])
    if name.startswith(("tok_emb.", "pos_emb.")):
        return "embed"
    if name.startswith(("norm_f.", "lm_head.")):
        return "head"
    raise ConfigError(f"parameter {name!r} is not a zoo Transformer's; the planner counts zoo models only")


def counts_of_config(cfg) -> ModelCounts:
    """:class:`ModelCounts` of a :class:`~impls.zoo.TransformerConfig`, built on ``meta``."""
    import torch

    from .zoo import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    tensors = [ParamTensor(name, tuple(p.shape), _part(name), _tp_rule(name))
               for name, p in model.named_parameters() if p.requires_grad]
    if cfg.tie_embeddings:
        tensors.append(ParamTensor("lm_head.weight", tuple(model.lm_head.weight.shape), "head", "rep", tied_copy=True))
    return ModelCounts(cfg, tuple(tensors), model.num_params(matmul_only=True))


@lru_cache(maxsize=32)
def model_counts(model: str, **overrides) -> ModelCounts:
    from . import zoo

    return counts_of_config(zoo.config(model, **overrides))


def stage_of_layer(i: int, n_layer: int, pp: int, chunks: int = 1) -> int:
    """Pipeline stage of block ``i``: chunk i // (L/(p·v)), on stage chunk mod p."""
    per_chunk = n_layer // (pp * chunks)
    return (i // per_chunk) % pp


def stage_tensors(counts: ModelCounts, tp: int, pp: int, stage: int, chunks: int = 1) -> list[tuple[int, ...]]:
    """Local shapes of the tensors one device of pipeline ``stage`` and any TP rank holds."""
    n_layer = counts.cfg.n_layer
    last = stage_of_layer(n_layer - 1, n_layer, pp, chunks)
    out = []
    for t in counts.tensors:
        if t.part == "embed":
            held = stage == 0
        elif t.part == "head":
            held = stage == last and (not t.tied_copy or pp > 1)
        else:
            held = stage_of_layer(t.part, n_layer, pp, chunks) == stage
        if not held:
            continue
        shape = t.shape
        if t.tp == "col" and tp > 1:
            shape = (shape[0] // tp, *shape[1:])
        elif t.tp == "row" and tp > 1:
            shape = (shape[0], shape[1] // tp)
        out.append(shape)
    return out


def model_state_bytes(shapes: list[tuple[int, ...]], dp: int, zero_stage: int, precision: Precision) -> dict[str, float]:
    """Per-rank params/grads/optimizer bytes of a device holding ``shapes`` (its TP/PP share), the
    ZeRO stage's parts divided over ``dp`` (flat for stages 1–2, FSDP2's padded dim-0 rule for 3);
    the rank that holds the most (rank 0)."""
    psi = sum(math.prod(s) for s in shapes)
    n = len(shapes)
    p_b, g_b, k, step = precision.param_bytes, precision.grad_bytes, precision.k, precision.step_bytes
    if zero_stage == 3 and dp > 1:
        padded = local = 0
        for s in shapes:
            d0, row = (s[0], math.prod(s[1:])) if s else (1, 1)
            rows = -(-d0 // dp)
            padded += rows * row
            local += min(rows, d0) * row
        return {"params": p_b * padded, "grads": g_b * padded, "optimizer": k * local + step * n}
    flat = -(-psi // dp)
    tensors_owned = -(-n // dp)
    return {"params": p_b * psi,
            "grads": g_b * (flat if zero_stage >= 2 else psi),
            "optimizer": k * (flat if zero_stage >= 1 else psi) + step * (tensors_owned if zero_stage >= 1 else n)}


# --------------------------------------------------------------------------------------------
# Activations (Korthikanti et al. 2022)
# --------------------------------------------------------------------------------------------

def layer_activation_terms(cfg, s: int, b: int, tp: int = 1, sp: bool = False, act_bytes: int = 2,
                           dropout: bool = True, attention: str = "stored") -> dict[str, float]:
    """Bytes one Transformer layer saves for backward for one micro-batch, by Korthikanti's terms.
    ``act_bytes`` 2, ``dropout`` True, ``attention`` "stored", a GELU MLP of 4h: sbh(34 + 5as/h)
    (tp = 1), sbh(10 + 24/t + 5as/(ht)) (tp > 1), sbh(34/t + 5as/(ht)) (sp)."""
    h, a, e = cfg.d_model, cfg.n_head, act_bytes
    sbh = s * b * h
    rep = tp if sp else 1  # what TP alone leaves replicated, SP splits over the sequence
    mlp_tensors = 4 if cfg.mlp == "swiglu" else 2  # GELU: its input and down's; SwiGLU: gate|up, silu, product
    group = cfg.n_head // (cfg.n_kv_head or cfg.n_head)  # query heads per K/V head (GQA; 1 = MHA)
    rope = cfg.position == "rope"
    terms = {
        "layernorm_inputs": 2 * e * sbh / rep,
        "qkv_and_mlp_inputs": 2 * e * sbh / rep,
        "proj_input": e * sbh / tp,
        "mlp_hidden": mlp_tensors * e * s * b * cfg.d_ff / tp,
    }
    # qkv's output, (H + 2·Hkv)·Q wide (3sbh for MHA), is kept while SDPA saves a view of it: q
    # and k unless RoPE rotated them into new tensors, v unless GQA expanded it into a copy.
    if not rope or group == 1:
        terms["q_k_v"] = (1 + 2 / group) * e * sbh / tp
    # Llama-style blocks save more than Korthikanti's GPT block (counted tensor by tensor with
    # saved-tensor hooks on the zoo's blocks, MHA and GQA, with and without RoPE;
    # tests/test_planner.py checks the sums):
    if cfg.norm == "rmsnorm":  # torch's nn.RMSNorm keeps x·rstd for its weight's gradient
        terms["rmsnorm_normalized"] = 2 * e * sbh / rep
    if rope:
        # the rotated q (and k, unless GQA expands it) are new tensors SDPA saves; SDPA's output is
        # then (B, H, T, Q)-contiguous, so proj's (B, T, C) input is a copy, not a view of it
        terms["rope_rotated_q_k"] = (2 if group == 1 else 1) * e * sbh / tp
        terms["attention_output"] = e * sbh / tp
    if group > 1:  # GQA: repeat_interleave's full-width copies of k and v, which SDPA saves
        terms["gqa_expanded_k_v"] = 2 * e * sbh / tp
    if dropout:
        terms["dropout_masks"] = 2 * sbh / rep  # 1-byte masks after attention and MLP
    if attention == "stored":
        terms["attention_scores"] = (2 * e + (1 if dropout else 0)) * a * s * s * b / tp
    else:
        # the fused kernel keeps its output -- which *is* proj's input (the (B, T, H, Q) output
        # reshaped to (B, T, C) is a view: one storage, counted once as "proj_input") -- and its
        # fp32 log-sum-exp per head and position
        terms["flash_logsumexp"] = 4 * a * s * b / tp
    return terms


def head_activation_terms(cfg, s: int, b: int, tp: int = 1, sp: bool = False, act_bytes: int = 2) -> dict[str, float]:
    """The last stage's extra: final-norm and LM-head inputs, the loss's fp32 log-softmax (4sbV)."""
    sbh = s * b * cfg.d_model
    return {"final_norm_input": act_bytes * sbh / (tp if sp else 1), "lm_head_input": act_bytes * sbh,
            "logits_log_softmax_fp32": 4 * s * b * cfg.vocab_size}


def in_flight(layout: Layout, stage: int) -> float:
    """Micro-batches whose activations pipeline ``stage`` holds at once."""
    p, m, v = layout.pp, layout.micro_batches, layout.chunks
    if p == 1:
        return 1
    if layout.schedule == "gpipe":
        return m
    if layout.schedule == "1f1b":
        return min(m, p - stage)
    return min(m, p - stage) + (p - 1) / v


def stage_activations(counts: ModelCounts, layout: Layout, stage: int, s: int, precision: Precision,
                      attention: str) -> tuple[float, dict[str, float], list[str]]:
    """(bytes, by term, formula names) of pipeline ``stage``'s activations."""
    cfg, b, t, sp = counts.cfg, layout.micro_batch_size, layout.tp, layout.sequence_parallel
    # "stored" is the paper's case, dropout masks included; "flash" follows the model's own dropout
    dropout = attention == "stored" or cfg.dropout > 0
    layers = cfg.n_layer // layout.pp
    names = ["act_korthikanti_tp_sp" if sp and t > 1 else "act_korthikanti_tp" if t > 1 else "act_korthikanti"]
    if attention == "flash":
        names.append("act_flash_attention")
    one = layer_activation_terms(cfg, s, b, t, sp, precision.act_bytes, dropout, attention)
    flight = in_flight(layout, stage)
    if layout.pp > 1:
        names.append({"gpipe": "inflight_gpipe", "1f1b": "inflight_1f1b"}.get(layout.schedule, "inflight_interleaved"))
    terms: dict[str, float] = {}
    if layout.checkpointing:
        names.append("act_full_recompute")
        terms["layer_inputs"] = flight * layers * precision.act_bytes * s * b * cfg.d_model / (t if sp else 1)
        terms["recompute_working_layer"] = sum(one.values())
    else:
        for key, value in one.items():
            terms[key] = flight * layers * value
    last = stage_of_layer(cfg.n_layer - 1, cfg.n_layer, layout.pp, layout.chunks)
    if stage == last:
        names.append("act_head_terms")
        for key, value in head_activation_terms(cfg, s, b, t, sp, precision.act_bytes).items():
            terms[key] = flight * value
    if stage == 0 and dropout:
        terms["embedding_dropout_mask"] = flight * s * b * cfg.d_model / (t if sp else 1)
    return sum(terms.values()), terms, names


def activation_bytes(cfg, s: int, b: int, precision: str = "fp32", attention: str = "flash",
                     checkpointing: bool = False, working_set: bool = False) -> dict:
    """One micro-batch's saved activations of the whole model on one device (no parallelism):
    ``{"bytes", "terms", "formulas"}`` — what ``engine.activation_bytes`` measures (the tensors
    the forward saves; ``working_set`` adds the layer recomputed during the backward, which the
    planner's peak memory counts but a forward's saved tensors do not hold)."""
    counts = counts_of_config(cfg)
    layout = Layout(1, 1, 1, 0, "none", 1, b, 1, checkpointing)
    total, terms, names = stage_activations(counts, layout, 0, s, PRECISIONS[precision], attention)
    if not working_set and "recompute_working_layer" in terms:
        total -= terms.pop("recompute_working_layer")
    return {"bytes": total, "terms": terms, "formulas": names}


# --------------------------------------------------------------------------------------------
# One layout
# --------------------------------------------------------------------------------------------

def divisibility(cfg, layout: Layout, global_batch: int) -> list[str]:
    """Why ``layout`` cannot split this model or batch (empty: it can)."""
    t, p, v = layout.tp, layout.pp, layout.chunks
    why = []
    if cfg.n_head % t:
        why.append(f"heads {cfg.n_head} % t={t} != 0")
    if cfg.n_kv_head % t and cfg.n_kv_head != cfg.n_head:
        why.append(f"kv heads {cfg.n_kv_head} % t={t} != 0")
    if cfg.d_ff % t:
        why.append(f"d_ff {cfg.d_ff} % t={t} != 0")
    if cfg.n_layer % (p * v):
        why.append(f"layers {cfg.n_layer} % (p*v)={p * v} != 0")
    if global_batch % (layout.dp * layout.micro_batch_size):
        why.append(f"global batch {global_batch} % (dp*micro-batch)={layout.dp * layout.micro_batch_size} != 0")
    if layout.schedule == "interleaved" and layout.micro_batches % p:
        why.append(f"interleaved needs m % p == 0: m={layout.micro_batches}, p={p}")
    return why


def _ring_time(nbytes: float, bandwidth: float) -> float:
    return nbytes / bandwidth if nbytes else 0.0


def predict(counts: ModelCounts, layout: Layout, hw: Hardware, seq_len: int, global_batch: int,
            precision: Precision, *, attention: str = "stored", overlap: str = "dp",
            bucket_mb: float = 25.0) -> Prediction:
    """Memory and step time of one ``layout`` (assumed divisible: see :func:`divisibility`)."""
    from .measure.flops import model_flops_per_token
    from .measure.model_states import comm_volume

    cfg = counts.cfg
    t, p, v, m, dp = layout.tp, layout.pp, layout.chunks, layout.micro_batches, layout.dp
    s, b, e = seq_len, layout.micro_batch_size, precision.act_bytes
    formulas = ["param_count_meta", "zero_model_states"]
    if t > 1:
        formulas.append("tp_megatron_sharding")
    if p > 1:
        formulas.append("pp_stage_assignment")
    if layout.zero_stage in (1, 2) and dp > 1:
        formulas.append("zero_flat_partition")
    if layout.zero_stage == 3 and dp > 1:
        formulas.append("fsdp2_dim0_padding")
    if precision.step_bytes:
        formulas.append("adam_step_scalar")

    # Memory: each pipeline stage, the worst one reported.
    per_stage, worst = [], None
    for k in range(p):
        shapes = stage_tensors(counts, t, p, k, v)
        states = model_state_bytes(shapes, dp, layout.zero_stage, precision)
        act, terms, act_names = stage_activations(counts, layout, k, s, precision, attention)
        total = sum(states.values()) + act
        per_stage.append(total)
        if worst is None or total > worst[0]:
            worst = (total, k, states, act, terms, act_names, sum(math.prod(x) for x in shapes))
    total, worst_stage, states, act, act_terms, act_names, _ = worst
    formulas += [n for n in act_names if n not in formulas]
    memory = {**states, "activations": act}

    # Compute.
    per_token = model_flops_per_token(counts.matmul_params, cfg.n_layer, cfg.n_head, cfg.head_dim, s)
    model_flops = per_token * global_batch * s
    executed = model_flops * (4 / 3 if layout.checkpointing else 1)
    formulas += ["model_flops_palm", "compute_at_stated_mfu"] + (["recompute_one_forward"] if layout.checkpointing else [])
    compute = executed / (hw.devices * hw.device_flops * hw.mfu)
    forward = model_flops / 3 / (hw.devices * hw.device_flops * hw.mfu)
    backward = compute - forward

    # Tensor parallelism (exposed).
    tp_time = 0.0
    if t > 1:
        formulas.append("tp_allreduce_megatron")
        per_layer = 4 + (2 if layout.checkpointing else 0)
        nbytes = (cfg.n_layer // p) * m * per_layer * 2 * (t - 1) / t * s * b * cfg.d_model * e
        tp_time = _ring_time(nbytes, hw.tp_bytes_per_s)
    # Pipeline point to point (exposed) and bubble.
    pp_time, overhead = 0.0, 0.0
    if p > 1:
        formulas.append("pp_p2p")
        nbytes = m * 2 * v * s * b * cfg.d_model * e / (t if layout.sequence_parallel else 1)
        pp_time = _ring_time(nbytes, hw.link_bytes_per_s)
        overhead = (p - 1) / (v * m)
        formulas.append("bubble_interleaved" if layout.schedule == "interleaved" else "bubble_gpipe_1f1b")
    pipeline = (compute + tp_time + pp_time)
    bubble_time = pipeline * overhead
    bubble_fraction = overhead / (1 + overhead)

    # Data parallelism: the ZeRO volumes on this device's own Ψ (the worst stage's).
    dp_total = dp_exposed = 0.0
    if dp > 1:
        formulas.append("zero_comm_volume")
        psi_dev = sum(math.prod(x) for x in stage_tensors(counts, t, p, worst_stage, v))
        vol = comm_volume(psi_dev, dp, layout.zero_stage, grad_bytes=precision.grad_bytes,
                          param_bytes=precision.param_bytes)
        ring, bw = vol["ring_factor"], hw.link_bytes_per_s
        bucket = min(bucket_mb * 2 ** 20, psi_dev * precision.grad_bytes)
        grads = params = 0.0  # seconds
        for c in vol["collectives"]:
            factor = 2 if c["op"] == "all_reduce" else 1
            seconds = factor * c["bytes"] * ring / bw
            if c["what"] == "gradients":
                grads += seconds
            else:
                params += seconds
        if layout.zero_stage >= 2 and m > 1:
            # partitioned gradients cannot accumulate unreduced: each micro-batch reduce-scatters
            formulas.append("zero23_reduce_scatter_per_microbatch")
            grads *= m
        if layout.zero_stage == 3 and m > 1:
            formulas.append("zero3_allgather_per_microbatch")
            params *= m  # both all-gathers repeat for every micro-batch
        dp_total = grads + params
        last_bucket = (2 if layout.zero_stage == 0 else 1) * bucket * ring / bw
        if overlap == "none":
            formulas.append("overlap_none")
            dp_exposed = dp_total
        else:
            formulas.append("overlap_dp_backward")
            # stages 0-1 reduce during the last micro-batch's backward, stages 2-3 during every one
            window = backward if layout.zero_stage >= 2 else backward / m
            if layout.zero_stage == 3:
                # the forward's all-gathers hide behind the forward, the backward's all-gathers and the
                # reduce-scatters share the backward (one link: their times add)
                formulas.append("overlap_zero3_prefetch")
                first_bucket = min(bucket, psi_dev * precision.param_bytes) * ring / bw
                dp_exposed = max(params / 2 - forward, min(first_bucket, params / 2)) \
                    + max(params / 2 + grads - window, min(last_bucket, grads))
            else:
                dp_exposed = max(grads - window, min(last_bucket, grads)) + params
    step = pipeline + bubble_time + dp_exposed
    times = {"compute": compute, "tp_comm": tp_time, "pp_p2p": pp_time, "bubble": bubble_time,
             "dp_comm_exposed": dp_exposed, "dp_comm_total": dp_total}
    mfu = model_flops / (step * hw.devices * hw.device_flops) if step else 0.0
    fits = total <= hw.device_mem
    reason = None if fits else memory_reason(memory, total, hw.device_mem, worst_stage, p)
    return Prediction(layout, fits, reason, memory, total, worst_stage, per_stage, act_terms, times, step,
                      bubble_fraction, mfu, tuple(dict.fromkeys(formulas)))


def memory_reason(memory: dict, total: float, capacity: float, stage: int, p: int) -> str:
    """'does not fit: ...' naming the component(s) that overflow."""
    states = memory["params"] + memory["grads"] + memory["optimizer"]
    where = f" (pipeline stage {stage})" if p > 1 else ""
    parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in memory.items())
    if states > capacity:  # the largest component of what overflows on its own
        head = f"model states alone {states / GIB:.1f} GiB > {capacity / GIB:.1f} GiB"
        largest = max(("params", "grads", "optimizer"), key=memory.get)
    elif memory["activations"] > capacity:
        head = f"activations alone {memory['activations'] / GIB:.1f} GiB > {capacity / GIB:.1f} GiB"
        largest = "activations"
    else:
        head = f"model states + activations {total / GIB:.1f} GiB > {capacity / GIB:.1f} GiB"
        largest = max(memory, key=memory.get)
    return f"does not fit{where}: {head}; largest component {largest}; GiB: {parts}"


# --------------------------------------------------------------------------------------------
# Enumeration
# --------------------------------------------------------------------------------------------

def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def count_layouts(devices: int, global_batch: int, *, schedules=SCHEDULES, chunks=(2, 4), stages=(0, 1, 2, 3),
                  micro_batch_sizes=None, checkpointing=(False, True), sequence_parallel=(False,)) -> int:
    """How many layouts :func:`enumerate_layouts` gives, counted without building them."""
    total = 0
    for t in _divisors(devices):
        for p in _divisors(devices // t):
            dp = devices // (t * p)
            scheds = 1 if p == 1 else (len([sc for sc in schedules if sc != "interleaved"])
                                       + (len(chunks) if "interleaved" in schedules else 0))
            zs = 1 if dp == 1 else len(stages)
            mbs = max(1, global_batch // dp).bit_length() if micro_batch_sizes is None else len(micro_batch_sizes)
            total += scheds * zs * mbs * len(checkpointing) * (len(sequence_parallel) if t > 1 else 1)
    return total


def enumerate_layouts(devices: int, global_batch: int, *, schedules=SCHEDULES, chunks=(2, 4),
                      stages=(0, 1, 2, 3), micro_batch_sizes=None, checkpointing=(False, True),
                      sequence_parallel=(False,)) -> list[Layout]:
    """Every (dp, t, p, schedule, v, ZeRO stage, micro-batch size, checkpointing) with
    dp·t·p = devices.  dp = 1 keeps ZeRO stage 0 only (nothing to partition); p = 1 has no schedule.
    Micro-batch sizes: powers of two up to global_batch // dp (or ``micro_batch_sizes``)."""
    out = []
    for t in _divisors(devices):
        for p in _divisors(devices // t):
            dp = devices // (t * p)
            scheds = [("none", 1)] if p == 1 else [(sc, 1) for sc in schedules if sc != "interleaved"] + \
                [("interleaved", v) for v in chunks if "interleaved" in schedules]
            zs = [0] if dp == 1 else list(stages)
            if micro_batch_sizes is None:
                top = max(1, global_batch // dp)
                mbs = [1 << i for i in range(top.bit_length()) if (1 << i) <= top]
            else:
                mbs = list(micro_batch_sizes)
            for sched, v in scheds:
                for z in zs:
                    for b in mbs:
                        m = max(1, global_batch // (dp * b))
                        for ck in checkpointing:
                            for sp in (sequence_parallel if t > 1 else (False,)):
                                out.append(Layout(dp, t, p, z, sched, v, b, m, ck, sp))
    return out


@dataclass
class LayoutRanking:
    """What :func:`plan` returns: its inputs, the layouts that divide and fit ranked by predicted
    step time (best first), and the others with the reason each was rejected."""

    model: str
    hardware: Hardware
    seq_len: int
    global_batch: int
    precision: Precision
    attention: str
    overlap: str
    ranked: list[Prediction] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"model": self.model, "psi": model_counts(self.model).psi, "hardware": dataclasses.asdict(self.hardware),
                "seq_len": self.seq_len, "global_batch": self.global_batch,
                "precision": dataclasses.asdict(self.precision), "attention": self.attention, "overlap": self.overlap,
                "assumptions": list(ASSUMPTIONS), "formulas": FORMULAS,
                "ranked": [p.as_dict() for p in self.ranked], "rejected": [r.as_dict() for r in self.rejected]}


def plan(model: str, hw: Hardware, *, seq_len: int, global_batch: int, precision: str = "mixed",
         attention: str = "stored", overlap: str = "dp", bucket_mb: float = 25.0, layouts=None,
         model_overrides: dict | None = None, **enum) -> LayoutRanking:
    """Predict every layout (:func:`enumerate_layouts` unless ``layouts``) and rank the ones that
    divide and fit by predicted step time, best first; the others are :class:`Rejected`."""
    check_inputs(model, hw, seq_len, global_batch, precision, attention, overlap, model_overrides)
    if layouts is None:
        n = count_layouts(hw.devices, global_batch, **enum)
        if n > MAX_LAYOUTS:
            raise ConfigError(f"--devices {hw.devices} with --global-batch {global_batch} gives {n:,} layouts to "
                              f"evaluate, more than the planner's {MAX_LAYOUTS:,}; valid: fewer devices or a "
                              f"narrower search (--stages, --schedules, --chunks, --micro-batch-sizes, "
                              f"--checkpointing on|off)")
    counts = model_counts(model, **(model_overrides or {}))
    prec = PRECISIONS[precision]
    result = LayoutRanking(model, hw, seq_len, global_batch, prec, attention, overlap)
    for layout in layouts if layouts is not None else enumerate_layouts(hw.devices, global_batch, **enum):
        why = divisibility(counts.cfg, layout, global_batch)
        if why:
            result.rejected.append(Rejected(layout, "divisibility", "divisibility: " + "; ".join(why)))
            continue
        pred = predict(counts, layout, hw, seq_len, global_batch, prec, attention=attention, overlap=overlap,
                       bucket_mb=bucket_mb)
        if pred.fits:
            result.ranked.append(pred)
        else:
            result.rejected.append(Rejected(layout, "memory", pred.reason, pred))
    result.ranked.sort(key=lambda p: (p.step_time, p.memory_total))
    return result


def memory_by_layout(models, devices: int, *, device_mem: float = 80 * GIB, seq_len: int = 2048,
                     micro_batch_size: int = 1, global_batch: int | None = None, precision: str = "mixed",
                     attention: str = "stored", checkpointing=(False, True), schedules=("1f1b",),
                     stages=(0, 1, 2, 3)):
    """Per-device bytes by component for every divisible layout of each model (fitting or not):
    a pandas DataFrame with columns model, label, dp, tp, pp, zero_stage, schedule,
    micro_batch_size, micro_batches, checkpointing, params, grads, optimizer, activations, total,
    fits, step_time — what the report plots for the big zoo models.  Hardware speeds do not
    change memory; the step time uses an H100-like default (989 TFLOP/s, MFU 0.4, 400 Gbit/s for
    DP/PP and 3200 Gbit/s, NVLink-like, for TP)."""
    import pandas as pd

    rows = []
    for model in models:
        block = model_counts(model).cfg.block_size
        s = min(seq_len, block)
        gb = global_batch or devices * micro_batch_size
        hw = Hardware(devices, float(device_mem), 989e12, 400.0, 400.0 * 8, 0.4)
        result = plan(model, hw, seq_len=s, global_batch=gb, precision=precision, attention=attention,
                      schedules=schedules, stages=stages, micro_batch_sizes=(micro_batch_size,),
                      checkpointing=checkpointing)
        preds = result.ranked + [r.prediction for r in result.rejected if r.prediction is not None]
        for pr in preds:
            lay = pr.layout
            rows.append({"model": model, "label": lay.label, "dp": lay.dp, "tp": lay.tp, "pp": lay.pp,
                         "zero_stage": lay.zero_stage, "schedule": lay.schedule,
                         "micro_batch_size": lay.micro_batch_size, "micro_batches": lay.micro_batches,
                         "checkpointing": lay.checkpointing, "seq_len": s, **pr.memory,
                         "total": pr.memory_total, "fits": pr.fits, "step_time": pr.step_time})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Input checking and the command line
# --------------------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
_MEM = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_memory(text: str) -> float:
    """'80GiB', '80GB', '8e10', '81920 MiB' -> bytes; anything else a one-line ConfigError."""
    match = _MEM.fullmatch(str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS or not float(match.group(1)) > 0:
        raise ConfigError(f"--device-mem {text!r} is not a memory size; valid: a number > 0 with an optional unit "
                          f"B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. 80GiB")
    return float(match.group(1)) * _UNITS[unit]


def _number(text, flag: str, kind=float, low: float = 0.0, inclusive: bool = False, high: float | None = None):
    """``text`` as ``kind``, > ``low`` (>= if ``inclusive``) and <= ``high``, or a one-line ConfigError."""
    want = ("an integer" if kind is int else "a finite number") + (f" >= {low:g}" if inclusive else f" > {low:g}") \
        + (f" and <= {high if kind is int else format(high, 'g')}" if high is not None else "")
    try:
        value = kind(text)
    except (TypeError, ValueError):
        value = None
    if value is None or not math.isfinite(value) or not (value >= low if inclusive else value > low) \
            or (high is not None and value > high):
        raise ConfigError(f"{flag} {text!r} is invalid; valid: {want}")
    return value


def _int_list(text: str, flag: str, choices=None) -> tuple[int, ...]:
    items = [x for x in str(text).split(",") if x.strip()]
    low = 0 if choices is not None else 1
    values = tuple(_number(x.strip(), flag, int, low, inclusive=True) for x in items)
    if not values:
        raise ConfigError(f"{flag} {text!r} is empty; valid: comma-separated integers >= 1")
    if choices is not None:
        bad = [v for v in values if v not in choices]
        if bad:
            raise ConfigError(f"{flag} {bad[0]} is not valid; valid: {', '.join(map(str, choices))}")
    return values


def check_inputs(model, hw: Hardware, seq_len, global_batch, precision, attention, overlap, overrides=None) -> None:
    from . import zoo

    cfg = zoo.config(model, **(overrides or {}))  # unknown model: one line with the valid names
    if not (isinstance(hw.devices, int) and 1 <= hw.devices <= MAX_DEVICES):
        raise ConfigError(f"--devices {hw.devices!r} is invalid; valid: an integer >= 1 and <= {MAX_DEVICES}")
    if not (isinstance(global_batch, int) and 1 <= global_batch <= MAX_GLOBAL_BATCH):
        raise ConfigError(f"--global-batch {global_batch!r} is invalid; valid: an integer >= 1 and <= "
                          f"{MAX_GLOBAL_BATCH}")
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r} is not valid; valid: {', '.join(PRECISIONS)}")
    if attention not in ATTENTION:
        raise ConfigError(f"--attention {attention!r} is not valid; valid: {', '.join(ATTENTION)}")
    if overlap not in OVERLAPS:
        raise ConfigError(f"--overlap {overlap!r} is not valid; valid: {', '.join(OVERLAPS)}")
    if seq_len > cfg.block_size:
        raise ConfigError(f"--seq-len {seq_len} exceeds {model}'s block_size {cfg.block_size}; valid: 1..{cfg.block_size}")
    for name, value in (("--device-mem", hw.device_mem), ("--device-flops", hw.device_flops),
                        ("--link-gbps", hw.link_gbps), ("--tp-link-gbps", hw.tp_link_gbps)):
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{name} {value!r} is invalid; valid: a finite number > 0")
    if not 0 < hw.mfu <= 1:
        raise ConfigError(f"--mfu {hw.mfu!r} is invalid; valid: a number in (0, 1]")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``etbench plan`` flags (numbers taken as text and checked by :func:`from_args`, so a bad
    one is one line naming it and the valid values)."""
    p.add_argument("--model", required=True, help="zoo model (etbench zoo)")
    p.add_argument("--devices", required=True, help="number of devices (integer >= 1)")
    p.add_argument("--device-mem", required=True, help="memory per device, e.g. 80GiB, 80GB, 8e10")
    p.add_argument("--device-flops", required=True, help="peak FLOP/s per device, e.g. 989e12 (H100 bf16 dense)")
    p.add_argument("--link-gbps", required=True, help="per-device link for DP/PP traffic, Gbit/s")
    p.add_argument("--tp-link-gbps", help="per-device link for TP traffic, Gbit/s (default: --link-gbps)")
    p.add_argument("--global-batch", required=True, help="sequences per optimizer step, all replicas")
    p.add_argument("--seq-len", required=True, help="tokens per sequence")
    p.add_argument("--mfu", default="0.4", help="ASSUMED fraction of peak sustained on executed FLOPs (default 0.4)")
    p.add_argument("--precision", default="mixed",
                   help="mixed: ZeRO paper's 2+2+12 B/param, 2-byte activations (default); fp32: etbench's 4+4+8")
    p.add_argument("--attention", default="stored",
                   help="stored: the s*s scores kept, Korthikanti's 5as/h term (default); flash: not kept")
    p.add_argument("--overlap", default="dp", help="dp: gradient reduction overlaps the last backward (default); none")
    p.add_argument("--bucket-mb", default="25", help="gradient bucket MiB (exposed at least once; default 25)")
    p.add_argument("--schedules", default="gpipe,1f1b,interleaved", help="pipeline schedules to consider")
    p.add_argument("--chunks", default="2,4", help="v values of the interleaved schedule")
    p.add_argument("--stages", default="0,1,2,3", help="ZeRO stages to consider (0 = DDP, 3 = FSDP)")
    p.add_argument("--micro-batch-sizes", help="comma-separated (default: powers of two up to global/dp)")
    p.add_argument("--checkpointing", default="both", help="off | on | both")
    p.add_argument("--sequence-parallel", action="store_true", help="also consider TP + sequence parallelism")
    p.add_argument("--top", default="15", help="ranked layouts printed (default 15)")
    p.add_argument("--show-rejected", default="10", help="rejected layouts printed, per kind (default 10)")
    p.add_argument("--json", metavar="PATH", help="write the whole plan as JSON (atomically)")
    p.add_argument("--verify", default="0", metavar="K",
                   help="dry-run the top K layouts as rank 0 (impls.plan_verify): measured bytes and traffic beside "
                        "the predicted ones (default 0: none)")
    p.add_argument("--search", default="layouts", help="layouts (default) | recipes: whole recipes (impls.recipe_planner)")
    from . import recipe_runs  # the recipe search's flags

    recipe_runs.add_arguments(p)


def from_args(args) -> dict:
    """The checked inputs of ``etbench plan`` (a ConfigError, one line, for the first bad one)."""
    from . import zoo

    zoo.config(args.model)
    devices = _number(args.devices, "--devices", int, 1, inclusive=True, high=MAX_DEVICES)
    hw = Hardware(devices=devices, device_mem=parse_memory(args.device_mem),
                  device_flops=_number(args.device_flops, "--device-flops"),
                  link_gbps=_number(args.link_gbps, "--link-gbps"),
                  tp_link_gbps=_number(args.tp_link_gbps if args.tp_link_gbps is not None else args.link_gbps,
                                       "--tp-link-gbps"),
                  mfu=_number(args.mfu, "--mfu", float, 0, high=1))
    schedules = tuple(x.strip() for x in args.schedules.split(",") if x.strip())
    bad = [x for x in schedules if x not in SCHEDULES]
    if bad or not schedules:
        raise ConfigError(f"--schedules {args.schedules!r} is not valid; valid: comma-separated of {', '.join(SCHEDULES)}")
    ckpt = {"off": (False,), "on": (True,), "both": (False, True)}
    if args.checkpointing not in ckpt:
        raise ConfigError(f"--checkpointing {args.checkpointing!r} is not valid; valid: off, on, both")
    out = dict(model=args.model, hw=hw, seq_len=_number(args.seq_len, "--seq-len", int, 1, inclusive=True),
               global_batch=_number(args.global_batch, "--global-batch", int, 1, inclusive=True,
                                    high=MAX_GLOBAL_BATCH),
               precision=args.precision, attention=args.attention, overlap=args.overlap,
               bucket_mb=_number(args.bucket_mb, "--bucket-mb"), schedules=schedules,
               chunks=_int_list(args.chunks, "--chunks"), stages=_int_list(args.stages, "--stages", (0, 1, 2, 3)),
               micro_batch_sizes=_int_list(args.micro_batch_sizes, "--micro-batch-sizes")
               if args.micro_batch_sizes else None,
               checkpointing=ckpt[args.checkpointing],
               sequence_parallel=(False, True) if args.sequence_parallel else (False,),
               top=_number(args.top, "--top", int, 0, inclusive=True),
               show_rejected=_number(args.show_rejected, "--show-rejected", int, 0, inclusive=True),
               verify=_number(getattr(args, "verify", "0"), "--verify", int, 0, inclusive=True, high=MAX_LAYOUTS))
    if any(v < 2 for v in out["chunks"]):
        raise ConfigError(f"--chunks {args.chunks!r} is invalid; valid: integers >= 2 (v chunks per device)")
    check_inputs(out["model"], hw, out["seq_len"], out["global_batch"], out["precision"], out["attention"],
                 out["overlap"])
    return out


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def table(result: LayoutRanking, top: int = 15) -> str:
    """The ranked layouts as a plain-text table."""
    head = (f"{'#':>3}  {'layout':<42} {'mem GiB':>8} {'param':>6} {'grad':>6} {'optim':>6} {'act':>6}  "
            f"{'step s':>8} {'comp':>7} {'tp':>6} {'pp':>6} {'bubble':>7} {'dp exp':>7} {'bub%':>5} {'MFU':>5}")
    lines = [head, "-" * len(head)]
    for i, pr in enumerate(result.ranked[:top], 1):
        mem, tm = pr.memory, pr.time
        lines.append(f"{i:>3}  {pr.layout.label:<42} {_gib(pr.memory_total):>8} {_gib(mem['params']):>6} "
                     f"{_gib(mem['grads']):>6} {_gib(mem['optimizer']):>6} {_gib(mem['activations']):>6}  "
                     f"{pr.step_time:>8.3f} {tm['compute']:>7.3f} {tm['tp_comm']:>6.3f} {tm['pp_p2p']:>6.3f} "
                     f"{tm['bubble']:>7.3f} {tm['dp_comm_exposed']:>7.3f} {pr.bubble_fraction:>5.1%} "
                     f"{pr.predicted_mfu:>5.1%}")
    return "\n".join(lines)


def report(result: LayoutRanking, top: int = 15, show_rejected: int = 10) -> str:
    hw = result.hardware
    counts = model_counts(result.model)
    lines = [f"etbench plan: {result.model} (Psi {counts.psi:,}), {hw.devices} devices x {hw.device_mem / GIB:.1f} GiB, "
             f"{hw.device_flops:.3g} FLOP/s, link {hw.link_gbps:g} Gbit/s (TP {hw.tp_link_gbps:g}), "
             f"global batch {result.global_batch} x {result.seq_len} tokens",
             f"precision {result.precision.name}: {result.precision.about}; attention {result.attention}; "
             f"overlap {result.overlap}; MFU {hw.mfu:g} ASSUMED",
             f"{len(result.ranked)} layouts fit, {len(result.rejected)} rejected; best first by predicted step time:",
             "", table(result, top) if result.ranked else "(no layout fits)", ""]
    kinds = Counter(r.kind for r in result.rejected)
    for kind in ("memory", "divisibility"):
        shown = [r for r in result.rejected if r.kind == kind]
        if not shown:
            continue
        if kind == "memory":  # the closest misses first
            shown.sort(key=lambda r: r.prediction.memory_total)
        lines.append(f"rejected, {kind} ({kinds[kind]}; first {min(show_rejected, len(shown))}):")
        lines += [f"  {r.layout.label}: {r.reason}" for r in shown[:show_rejected]]
        lines.append("")
    lines.append("assumptions:")
    lines += [f"  - {a}" for a in ASSUMPTIONS]
    if result.ranked:
        lines.append(f"formulas of the best layout: {', '.join(result.ranked[0].formulas)} (--json lists them all)")
    return "\n".join(lines)


def run_cli(args) -> int:
    """``etbench plan``: inputs checked (exit 2 on the first bad one, nothing done), the plan
    computed, the table printed, ``--json`` written atomically."""
    from .files import check_writable, exclusive, write_text

    search = getattr(args, "search", "layouts")
    if search not in ("layouts", "recipes"):
        raise ConfigError(f"--search {search!r} is not valid; valid: layouts, recipes")
    if search == "recipes":
        from . import recipe_runs

        return recipe_runs.run_cli(args)
    inputs = from_args(args)
    if args.json is not None:
        check_writable(args.json)
    top, show, verify = inputs.pop("top"), inputs.pop("show_rejected"), inputs.pop("verify")
    model, hw = inputs.pop("model"), inputs.pop("hw")
    with exclusive(args.json):  # one writer per output (a second plan into the same file is refused)
        result = plan(model, hw, **inputs)
        print(report(result, top, show), flush=True)
        out = result.as_dict()
        if verify:  # the top K dry-run (impls.plan_verify), measured beside predicted
            from . import plan_verify

            rows = plan_verify.verify(result, verify)
            print("\n" + plan_verify.table(rows))
            out["verify"] = {"k": verify, "rank": 0, "rows": rows}
        if args.json is not None:
            write_text(args.json, json.dumps(out, indent=1, default=str))
            print(f"-> {args.json}")
    return 0


def main(argv=None) -> int:
    """``python -m impls.planner``: the same options and one-line errors as ``etbench plan``,
    without importing the CLI (the layers import downward only)."""
    from .errors import EXIT_BAD_INPUT, EXIT_FAILED, ConfigError, OneLineParser, WriteError

    parser = OneLineParser(prog="python -m impls.planner", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run_cli(args)
    except ConfigError as e:
        print(f"etbench: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except WriteError as e:
        print(f"etbench: error: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
