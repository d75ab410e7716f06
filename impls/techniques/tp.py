"""Tensor parallelism (Megatron-LM's intra-layer model parallelism), optionally with sequence
parallelism.

Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion Parameter Language Models Using Model
Parallelism" (arXiv 1909.08053), §3: each Transformer block's two GEMM pairs are split across the
``tp`` ranks so that a pair needs one all-reduce in forward and one in backward.  The first
matmul of a pair is split by output columns (``ColwiseParallel``: attention's fused ``qkv`` by
heads, the MLP's ``up``), the second by input rows (``RowwiseParallel``: ``proj``, ``down``), so
the non-linearity in between (attention per head, GELU/SwiGLU per column) runs on the local
shard with no communication.  Per layer: 2 all-reduces in forward (after ``proj`` and ``down``,
the operator *g* of Fig. 3) and 2 in backward (of the input gradients of ``qkv`` and ``up``, the
operator *f*), each of the (B, T, C) activation; a rank holds 1/t of the blocks' linear weights
(and of the column-split biases).  Embeddings, norms, the row-split biases and the LM head stay
replicated here (Megatron also splits the vocabulary; this suite's tied embedding/LM head is a
small share of the zoo models and stays whole).

``sp=true`` adds sequence parallelism (Korthikanti et al. 2022, "Reducing Activation Recomputation
in Large Transformer Models", arXiv 2205.05198, §4.2.2): the regions between the tensor-parallel
GEMM pairs (layer norms, dropout, residual adds) are split along the sequence instead of being
replicated, and each all-reduce becomes a reduce-scatter (into the sequence shards) plus an
all-gather (before the next column-parallel GEMM): the same bytes on the wire, while the
activations those regions save for backward shrink by t.  Per layer, activation bytes go from
``sbh(10 + 24/t + 5as/(ht))`` (tensor parallel alone) to ``sbh(34/t + 5as/(ht))`` (Eq. 4 and 5;
``sbh(34 + 5as/h)`` without parallelism, Eq. 1: fp16 with dropout; the record compares the
measured shape of the reduction with these formulas).

Making the fused layers shardable: the model's ``qkv`` computes ``[q | k | v]`` for all heads,
so a plain column split would give rank 0 all the query heads and part of the keys.  Before
sharding, the rows of ``qkv`` (weight and bias) are permuted to ``[q_0 k_0 v_0 | q_1 k_1 v_1 |
…]``, rank j's block holding its H/t query heads and their Hkv/t K/V heads, and the attention
reads its head counts from the width of its ``qkv`` output (:class:`~impls.zoo.model.Attention`);
SwiGLU's fused ``up`` (``[gate | up]``) is permuted the same way.  The permutation is a relabelling
of the same weights (:func:`qkv_order`, :func:`swiglu_order`), so a seed gives the unsharded
model's function, and the losses equal the single-process run's.

Composition (torchtitan's order: the pipeline split, then TP of each stage's blocks, before
checkpointing, compilation and the data-parallel wrap; 3-D DP×TP×PP): under ``dp > 1``, DDP (whose reducer takes plain tensors) gets the blocks' DTensor
parameters as local tensors through ``torch.distributed.tensor.parallel.ddp``, and FSDP2
shards the DTensors again over ``dp`` (2-D parameters).  MoE experts are MLPs and are split like
the dense MLP (Megatron's tensor parallelism inside each expert); MoD routes over the whole
sequence, which every rank holds under TP.  With ``sp`` the residual stream is split along the
sequence, so MoD's top-k over the sequence and MoE's routed token lists cannot run on it: refused.
Library: ``torch.distributed.tensor.parallel.parallelize_module`` over the mesh's ``tp`` dimension.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ConfigError

NAME = "tp"
STAGE = "shard"
RANK = 60  # after the pipeline split of the same stage (pp, 50): each stage's blocks are sharded
OPTIONS = {"sp": False}
MESH_DIMS = ("tp",)
CONFLICTS = {"fuse": "fuse:mode=jit calls the up projection's weight directly, bypassing the Linear that "
                     "ColwiseParallel shards (and mode=compile is not validated on DTensor blocks here)"}


def _tp_of(recipe) -> int:
    return int(recipe.mesh.get("tp", 1))


def check_mesh(dims, options):
    if dims["tp"] == 1:
        raise ConfigError("technique 'tp' needs a tensor-parallel size > 1: pass --mesh tp=N (N dividing the "
                          "heads and the world size)")


def check_recipe(recipe, options):
    from .. import zoo

    t = _tp_of(recipe)
    if t == 1:
        return  # check_mesh says why
    cfg = zoo.config(recipe.model, **recipe.model_args)
    for name, value in (("n_head", cfg.n_head), ("n_kv_head", cfg.n_kv_head), ("d_ff", cfg.d_ff)):
        if value % t:
            raise ConfigError(f"tp={t} does not divide {name}={value} of model {recipe.model!r}; valid tp: "
                              f"divisors of {name}")
    if options["sp"] and recipe.seq_len % t:
        raise ConfigError(f"tp:sp=true splits the sequence: seq_len={recipe.seq_len} is not divisible by tp={t}")
    if options["sp"] and int(recipe.mesh.get("pp", 1)) > 1:
        raise ConfigError("tp:sp=true cannot be combined with pipeline parallelism here: the stages exchange the "
                          "whole (B, T, C) residual stream, which sequence parallelism splits along T; use tp "
                          "without sp with pp")
    if options["sp"]:
        for spec in recipe.techniques:
            name = spec.partition(":")[0]
            if name in ("mod", "mode"):
                raise ConfigError(f"tp:sp=true cannot be combined with {name!r}: its top-k router ranks tokens "
                                  f"over the whole sequence, and sequence parallelism leaves each rank 1/{t} of it")
            if name == "moe":
                raise ConfigError("tp:sp=true cannot be combined with 'moe': the experts see routed token lists, "
                                  "not a (B, T, C) sequence a reduce-scatter could split along T; use tp without sp")


# --------------------------------------------------------------------------- making fused layers shardable


def qkv_order(n_head: int, n_kv_head: int, head_dim: int, t: int) -> torch.Tensor:
    """Row order of the fused ``qkv`` under t-way TP: new row i is old row ``order[i]``;
    rank j's contiguous 1/t block is [its H/t query heads | their Hkv/t keys | values]."""
    q, kv = n_head * head_dim, n_kv_head * head_dim
    rows = []
    for j in range(t):
        rows += [torch.arange(j * q // t, (j + 1) * q // t),
                 q + torch.arange(j * kv // t, (j + 1) * kv // t),
                 q + kv + torch.arange(j * kv // t, (j + 1) * kv // t)]
    return torch.cat(rows)


def swiglu_order(d_ff: int, t: int) -> torch.Tensor:
    """Row order of SwiGLU's fused ``up`` ([gate | up]) under t-way TP: rank j holds [gate_j | up_j]."""
    rows = []
    for j in range(t):
        rows += [torch.arange(j * d_ff // t, (j + 1) * d_ff // t), d_ff + torch.arange(j * d_ff // t, (j + 1) * d_ff // t)]
    return torch.cat(rows)


@torch.no_grad()
def _permute_rows(linear: nn.Linear, order: torch.Tensor) -> None:
    order = order.to(linear.weight.device)
    linear.weight.copy_(linear.weight[order])
    if linear.bias is not None:
        linear.bias.copy_(linear.bias[order])


# --------------------------------------------------------------------------- the plan


def _tp_modules(model: nn.Module):
    """(attention modules, MLP-like modules): every :class:`Attention`, and every module with
    ``up``/``down`` Linears (the dense MLP and MoE's experts)."""
    from ..zoo.model import Attention, MLP

    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    return attentions, mlps


def apply(build, options):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    sp = options["sp"]
    mesh = build.dims.mesh(build.device.type)["tp"]
    t = build.dims["tp"]
    out_layout = Shard(1) if sp else Replicate()  # SP: reduce-scatter into sequence shards
    sharded = replicated = 0
    for part in build.model_parts:
        cfg = part.cfg
        attentions, mlps = _tp_modules(part)
        for attn in attentions:
            _permute_rows(attn.qkv, qkv_order(cfg.n_head, cfg.n_kv_head, cfg.head_dim, t))
            parallelize_module(attn, mesh, {"qkv": ColwiseParallel(), "proj": RowwiseParallel(output_layouts=out_layout)})
        for mlp in mlps:
            if mlp.swiglu:
                _permute_rows(mlp.up, swiglu_order(mlp.down.in_features, t))
            parallelize_module(mlp, mesh, {"up": ColwiseParallel(), "down": RowwiseParallel(output_layouts=out_layout)})
        if sp:
            # The residual stream between the blocks is split along the sequence: the replicated
            # embedding output is cut into this rank's shard before the first block (no
            # communication), gathered again before the final norm and the LM head; inside each
            # block the norms run on the shard and the attention/MLP inputs are all-gathered.
            # (a block and its attention are called with (x, rope, attn_mask): None for the latter two)
            parallelize_module(part.blocks[0], mesh, PrepareModuleInput(
                input_layouts=(Replicate(), None, None), desired_input_layouts=(Shard(1), None, None),
                use_local_output=True))
            for block in part.blocks:
                parallelize_module(block, mesh, {
                    "norm1": SequenceParallel(use_local_output=True),
                    "norm2": SequenceParallel(use_local_output=True),
                    "attn": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                               desired_input_layouts=(Replicate(), None, None), use_local_output=True),
                    "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                              use_local_output=True)})
            parallelize_module(part.norm_f, mesh, PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True))
        _replicate_rest(part, mesh)
        sharded_ids = {id(p) for m in (*attentions, *mlps) for p in m.parameters() if _is_sharded(p)}
        seen = set()
        for p in part.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n = p.numel()
                sharded += n if id(p) in sharded_ids else 0
                replicated += 0 if id(p) in sharded_ids else n
    build.notes[NAME] = dict(
        tp=t, sp=sp, attention_modules=len(attentions), mlp_modules=len(mlps),
        sharded_params=sharded, replicated_params=replicated,
        # what each layer must communicate (Shoeybi et al. 2019, §3; Korthikanti et al. 2022, §4.2.2)
        expected_collectives_per_layer=(
            dict(forward=dict(all_gather=2, reduce_scatter=2), backward=dict(all_gather=2, reduce_scatter=2))
            if sp else dict(forward=dict(all_reduce=2), backward=dict(all_reduce=2))),
        backend=torch.distributed.get_backend(mesh.get_group()))


def _replicate_rest(model: nn.Module, mesh) -> None:
    """Every parameter the plan left a plain tensor (embeddings, LM head, norms without ``sp``,
    the row-split layers' biases are already replicated DTensors, routers) becomes a replicated
    DTensor, and its module converts its tensor inputs to replicated DTensors and its outputs back
    to local tensors.  Optimizers' fused multi-tensor kernels take a list of all-plain or
    all-DTensor parameters, never a mix (torchtitan's models are all-DTensor for the same
    reason).  A tied weight (the LM head's is the embedding's) stays one parameter."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module, distribute_tensor

    converted: dict[int, nn.Parameter] = {}

    def partition(name, module, device_mesh):
        for key, param in list(module.named_parameters(recurse=False)):
            if isinstance(param, DTensor):
                continue
            if id(param) not in converted:
                converted[id(param)] = nn.Parameter(distribute_tensor(param.data, device_mesh, [Replicate()]),
                                                    requires_grad=param.requires_grad)
            module.register_parameter(key, converted[id(param)])

    def to_replicated(module, inputs, device_mesh):
        return tuple(DTensor.from_local(x, device_mesh, [Replicate()], run_check=False)
                     if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x for x in inputs)

    def to_local(module, outputs, device_mesh):
        return outputs.to_local() if isinstance(outputs, DTensor) else outputs

    for _, module in list(model.named_modules()):
        if any(not isinstance(p, DTensor) for p in module.parameters(recurse=False)):
            distribute_module(module, mesh, partition, input_fn=to_replicated, output_fn=to_local)


def _is_sharded(p) -> bool:
    from torch.distributed.tensor import DTensor, Shard

    return isinstance(p, DTensor) and any(isinstance(pl, Shard) for pl in p.placements)
