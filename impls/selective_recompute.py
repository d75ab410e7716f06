"""Selective activation recomputation as an exact knapsack over Korthikanti et al.'s terms.

Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", arXiv
2205.05198) count what one Transformer layer saves for its backward term by term (Eq. 1:
sbh(34 + 5as/h) at 2-byte activations) and, in §5 "Selective Activation Recomputation", recompute
only the attention core -- the 5as/h term (QKᵀ's scores, the softmax, its dropout mask), which is
large but cheap to regenerate.  Which terms to drop in general is a 0/1 knapsack: each (layer,
term) pair saves its bytes and costs the FLOPs that regenerate it; the plan must drop enough
bytes for the device to fit at the least recompute.  torch's
``torch.distributed._tools.sac_ilp`` states the same problem as a MILP over *measured* operator
memory and runtimes (``get_optimal_checkpointing_policy_per_module``, solved with pulp/CBC); here
it is stated over the *analytic* terms of :func:`impls.planner.layer_activation_terms` and solved
exactly by branch and bound (:func:`min_recompute`), no solver needed.

A term's cost is the forward of the operations that regenerate it from what stays
(:func:`items`): the layer's inputs (``layernorm_inputs``, the recomputation's roots) and the
attention output (``proj_input``, saved by attn.proj outside the core) are never dropped.  Costs
separate GEMM FLOPs (the block Linears, at the precision's GEMM rate) from the rest (attention
core, elementwise ops, at the bf16/fp32 rate); elementwise ops are counted at rough FLOPs per
element (:data:`ELEMENTWISE`), which only orders the cheap terms (all are memory-bound in practice).
One layer's recomputed terms are live again during its backward (its working set, like full
recomputation's ``recompute_working_layer``): :func:`plan` adds them and re-solves with the larger
need until the plan fits or cannot.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import planner

#: Rough FLOPs per element of the elementwise ops a selective plan may recompute.
ELEMENTWISE = {"norm": 5, "softmax": 5, "dropout": 1, "gelu": 8, "swiglu": 5}


@dataclass(frozen=True)
class Item:
    """A droppable activation term of one layer: bytes saved and FLOPs to recompute per copy
    (``gemm`` at the precision's GEMM rate, ``other`` at the bf16/fp32 rate), ``copies`` layers."""

    name: str
    bytes: float
    gemm: float
    other: float
    copies: int

    @property
    def flops(self) -> float:
        return self.gemm + self.other


def min_recompute(items: list[Item], need: float) -> tuple[float, dict[str, int]] | None:
    """The least-FLOPs choice of how many copies of each item to drop so that the dropped bytes
    reach ``need``: min Σ k_i·f_i subject to Σ k_i·w_i >= need, k_i integer in [0, copies_i] --
    a bounded covering knapsack, i.e. a 0/1 knapsack over the (layer, term) pairs.  Exact: depth-
    first over the items by FLOPs per byte, counts tried from the most, pruned by the LP
    relaxation (the cheapest bytes first, the last item fractional), which bounds every completion
    from below.  ``(flops, {name: copies})``; None if dropping everything does not reach ``need``."""
    if need <= 0:
        return 0.0, {}
    order = sorted((it for it in items if it.bytes > 0 and it.copies > 0), key=lambda it: it.flops / it.bytes)
    if sum(it.bytes * it.copies for it in order) < need:
        return None

    def bound(j: int, rest: float) -> float:
        cost = 0.0
        for it in order[j:]:
            if it.bytes * it.copies >= rest:
                return cost + rest * it.flops / it.bytes
            cost, rest = cost + it.flops * it.copies, rest - it.bytes * it.copies
        return math.inf

    best: list = [math.inf, None]
    counts = [0] * len(order)

    def search(j: int, rest: float, cost: float) -> None:
        if rest <= 0:
            if cost < best[0]:
                best[:] = [cost, list(counts)]
            return
        if j == len(order) or cost + bound(j, rest) >= best[0]:
            return
        it = order[j]
        for c in range(min(it.copies, math.ceil(rest / it.bytes)), -1, -1):
            counts[j] = c
            search(j + 1, rest - c * it.bytes, cost + c * it.flops)
        counts[j] = 0

    search(0, need, 0.0)
    return best[0], {it.name: c for it, c in zip(order, best[1]) if c}


def items(cfg, per_layer: dict[str, float], s: int, b: int, tp: int) -> list[Item]:
    """The droppable terms of one layer (bytes from ``per_layer``) and the forward FLOPs that
    regenerate each from what stays, per device (``/t`` where tensor parallelism splits the work):

    * ``attention_scores`` (5as²b: scores, softmax, its dropout mask; §5's term): QKᵀ 2bs²h/t and
      the softmax and dropout elementwise;  ``flash_logsumexp``: the fused kernel's forward, 4bs²h/t;
    * ``q_k_v``: the qkv GEMM 2bsh·(h + 2·kv·Q)/t;  ``mlp_hidden``: the up GEMM and the activation;
    * ``qkv_and_mlp_inputs``: the two norms;  ``dropout_masks``: regenerated from the saved RNG state."""
    h, a = cfg.d_model, cfg.n_head
    sbh, swiglu = s * b * h, cfg.mlp == "swiglu"
    qkv_out = h + 2 * cfg.n_kv_head * cfg.head_dim
    up_out = cfg.d_ff * (2 if swiglu else 1)
    softmax = (ELEMENTWISE["softmax"] + ELEMENTWISE["dropout"]) * a * s * s * b / tp
    costs = {  # name: (gemm FLOPs, other FLOPs)
        "attention_scores": (0.0, 2 * b * s * s * h / tp + softmax),
        "flash_logsumexp": (0.0, 4 * b * s * s * h / tp),
        "q_k_v": (2 * sbh * qkv_out / tp, 0.0),
        "mlp_hidden": (2 * sbh * up_out / tp, ELEMENTWISE["swiglu" if swiglu else "gelu"] * s * b * cfg.d_ff / tp),
        "qkv_and_mlp_inputs": (0.0, 2 * ELEMENTWISE["norm"] * sbh),
        "dropout_masks": (0.0, 2 * ELEMENTWISE["dropout"] * sbh),
    }
    return [Item(n, per_layer[n], g, o, cfg.n_layer) for n, (g, o) in costs.items() if per_layer.get(n, 0) > 0]


def plan(counts: planner.ModelCounts, layout: planner.Layout, seq_len: int, precision: planner.Precision,
         attention: str, room: float):
    """The selective plan whose activations fit in ``room`` bytes (the device's memory less its
    model states) at the least recompute FLOPs, for a layout without a pipeline: ``None`` when
    the activations fit without recomputation, else (bytes, by term, {term: layers dropping it},
    the items, formula names).  Where nothing fits, every term of every layer is dropped (reported,
    not fitting).  The per-layer terms are read from :func:`planner.stage_activations`' totals."""
    cfg = counts.cfg
    total, terms, names = planner.stage_activations(counts, layout, 0, seq_len, precision, attention)
    head = planner.head_activation_terms(cfg, seq_len, layout.micro_batch_size, layout.tp, False,
                                         precision.act_bytes)
    per_layer = {n: v / cfg.n_layer for n, v in terms.items() if n not in head and n != "embedding_dropout_mask"}
    droppable = items(cfg, per_layer, seq_len, layout.micro_batch_size, layout.tp)
    need = total - room
    if need <= 0:
        return None
    chosen, extra = None, 0.0
    for _ in range(len(droppable) + 1):
        solution = min_recompute(droppable, need + extra)
        if solution is None:
            break
        chosen = solution[1]
        working = sum(it.bytes for it in droppable if chosen.get(it.name))
        if total - sum(it.bytes * chosen.get(it.name, 0) for it in droppable) + working <= room or working <= extra:
            break
        extra = working
    if chosen is None:
        chosen = {it.name: it.copies for it in droppable}
    out = dict(terms)
    for it in droppable:
        out[it.name] -= it.bytes * chosen.get(it.name, 0)
    out["recompute_working_layer"] = sum(it.bytes for it in droppable if chosen.get(it.name))
    return sum(out.values()), out, chosen, droppable, names + ["selective_knapsack"]
