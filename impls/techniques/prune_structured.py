"""Structured pruning of attention heads and MLP neurons, physically: the Linears get smaller, so
the FLOPs, the parameters, the optimizer state and the step time really fall.

Which units.  Attention heads: Michel, Levy & Neubig 2019 ("Are Sixteen Heads Really Better than
One?", NeurIPS, arXiv 1905.10650) and Voita et al. 2019 ("Analyzing Multi-Head Self-Attention",
ACL, arXiv 1905.09418) show most heads of a trained Transformer can be removed at a small cost.
MLP neurons: the hidden units of the feed-forward layer, the Transformer's analogue of the filters
that Li et al. 2017 ("Pruning Filters for Efficient ConvNets", ICLR, arXiv 1608.08710) remove.

Importance.  The norm of the unit's weights (Li et al. 2017's criterion, applied to heads and
neurons; ``norm=l2`` default, or ``l1``): for a head, its rows of ``qkv`` (its query rows and the
rows of the key/value head it reads) and its columns of ``proj``; for a neuron, its row(s) of
``up`` (both the gate and the up row under SwiGLU) and its column of ``down``.  Michel et al.'s
gradient-based head importance and Voita et al.'s L0 gates need extra passes or parameters; this is
the weight-norm baseline, chosen per layer: the ``round(heads · H_kv)`` lowest-norm key/value heads
(with grouped-query attention a K/V head goes with the ``H/H_kv`` query heads that read it, so the
group ratio the model's attention assumes is kept) and the ``round(neurons · d_ff)`` lowest-norm
neurons of every block go.  :class:`~impls.zoo.model.Attention` reads its head counts from the width
of ``qkv``'s output, so the sliced layer runs unchanged with fewer heads.

When.  Before the run's first step (``at=0``, the only value this technique accepts): the model is
sliced in the surgery stage, before the optimizer exists, so the optimizer state, the counted FLOPs
(the record's model FLOPs: ``plan.dense_compute`` is off, since the analytic 12·L·H·Q·T would count
the removed heads), the number of steps the FLOP budget buys, the memory and the step time are all
those of the pruned model: an isoFLOP comparison with the dense baseline, where the smaller model
takes more steps.  Ranked at initialisation the norms are those of random weights -- this is
training the pruned architecture from scratch (Liu et al. 2019, "Rethinking the Value of Network
Pruning", ICLR, arXiv 1810.05270, find it matches fine-tuning a pruned trained model); ranked on a
trained model (the run starting from a trained checkpoint, the ``--init-from`` flow) it is
prune-then-fine-tune.  Pruning mid-run (``at>0``) is refused: it would change the cost of a step
after the budget has fixed the step count from the dense cost, so the record's FLOPs, MFU and budget
would describe a model the run no longer trains (the slicing itself, :func:`slice_rows` /
:func:`slice_cols`, also slices the optimizer's state for the kept rows, so it is ready for that).

Record (``technique_notes["prune_structured"]``): heads and neurons kept per layer (which ones), the
parameter counts before and after, the achieved fraction of units removed, the analytic model-FLOP
ratio (6N' + 12·L·H'·Q·T)/(6N + 12·L·H·Q·T) at the run's T, and ``flops_saved: true``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..measure.flops import model_flops_per_token
from ..zoo.model import MLP, Attention
from . import _pruning as P

NAME = "prune_structured"
STAGE = "surgery"
RANK = 60  # after MLP replacements and block wrappers (it finds Attention and MLP modules wherever they are)
OPTIONS = {"heads": 0.5, "neurons": 0.5, "at": 0.0, "norm": "l2"}
CHOICES = {"norm": ("l2", "l1")}
CONFLICTS = {**P.CONFLICTS, "prune": "prune masks the Linears this technique slices; combine them in separate runs",
             "gmp": "gmp masks the Linears this technique slices; combine them in separate runs",
             "prune_nm": "prune_nm masks the Linears this technique slices; combine them in separate runs",
             "moe": "MoE experts replace the MLP whose neurons this technique removes",
             "mode": "MoDE experts replace the MLP whose neurons this technique removes",
             "fuse": "fuse replaces the MLP (fused GELU) this technique slices by its MLP class"}


def configure(plan, options):
    for key in ("heads", "neurons"):
        P.check_fraction(NAME, key, options[key])
    if options["heads"] == 0 and options["neurons"] == 0:
        raise ConfigError("prune_structured: heads=0 and neurons=0 remove nothing (the run would be the baseline); "
                          "set heads and/or neurons in (0, 1)")
    if options["at"] != 0:
        raise ConfigError(f"prune_structured:at={options['at']} refused: only at=0 (before the first step) is "
                          f"supported, since a mid-run cut would change a step's cost after the FLOP budget fixed "
                          f"the step count from the dense model's; start from a trained checkpoint instead")
    plan.dense_compute = False  # fewer heads than cfg.n_head: the record's model FLOPs are the counted ones


def kept_counts(cfg, options) -> tuple[int, int]:
    """(K/V heads kept, neurons kept) per layer."""
    return cfg.n_kv_head - round(options["heads"] * cfg.n_kv_head), cfg.d_ff - round(options["neurons"] * cfg.d_ff)


def check_model(cfg, seq_len, options):
    kv_kept, ff_kept = kept_counts(cfg, options)
    if options["heads"] > 0 and kv_kept == cfg.n_kv_head:
        raise ConfigError(f"prune_structured:heads={options['heads']} removes round({options['heads']}·{cfg.n_kv_head}) "
                          f"= 0 of the model's {cfg.n_kv_head} key/value heads per layer; use heads >= "
                          f"{0.5 / cfg.n_kv_head:.3g}")
    if kv_kept < 1:
        raise ConfigError(f"prune_structured:heads={options['heads']} would remove all {cfg.n_kv_head} key/value heads "
                          f"of a layer; keep at least one")
    if options["neurons"] > 0 and ff_kept == cfg.d_ff:
        raise ConfigError(f"prune_structured:neurons={options['neurons']} removes none of d_ff={cfg.d_ff} neurons")
    if ff_kept < 1:
        raise ConfigError(f"prune_structured:neurons={options['neurons']} would remove all d_ff={cfg.d_ff} neurons")


def _norm(t: torch.Tensor, dims, kind: str) -> torch.Tensor:
    return t.abs().sum(dims) if kind == "l1" else t.square().sum(dims)  # l2: squared norms rank the same


def slice_rows(linear: nn.Linear, index: torch.Tensor, optimizer=None) -> None:
    """Keep the output rows ``index`` of ``linear`` (weight rows and bias), in place: the Parameter
    objects stay (an optimizer keeps them) and their optimizer-state tensors are sliced alike."""
    _slice(linear.weight, 0, index, optimizer)
    if linear.bias is not None:
        _slice(linear.bias, 0, index, optimizer)
    linear.out_features = len(index)


def slice_cols(linear: nn.Linear, index: torch.Tensor, optimizer=None) -> None:
    """Keep the input columns ``index`` of ``linear`` (the bias is per output: unchanged)."""
    _slice(linear.weight, 1, index, optimizer)
    linear.in_features = len(index)


@torch.no_grad()
def _slice(param: nn.Parameter, dim: int, index: torch.Tensor, optimizer) -> None:
    for state in optimizer.state_of(param) if optimizer else ():
        state.data = state.index_select(dim, index).clone()
    param.data = param.data.index_select(dim, index).clone()
    param.grad = None


def head_rows(cfg, kv_heads: torch.Tensor, width_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(qkv rows, proj columns) of the kept K/V heads ``kv_heads`` and their query heads, in the
    [q | k | v] layout of :class:`~impls.zoo.model.Attention`."""
    q, group = cfg.head_dim, cfg.n_head // cfg.n_kv_head
    kv_width = cfg.n_kv_head * q
    heads = (kv_heads[:, None] * group + torch.arange(group)).flatten()  # query heads that read them
    q_rows = (heads[:, None] * q + torch.arange(q)).flatten()
    kv_rows = (kv_heads[:, None] * q + torch.arange(q)).flatten()
    return torch.cat([q_rows, width_q + kv_rows, width_q + kv_width + kv_rows]), q_rows


def head_importance(attn: Attention, cfg, kind: str) -> torch.Tensor:
    """Per K/V head: the norm of its qkv rows (query heads of its group, key, value) and proj columns."""
    q, group = cfg.head_dim, cfg.n_head // cfg.n_kv_head
    w, p = attn.qkv.weight.detach(), attn.proj.weight.detach()
    width_q = cfg.n_head * q
    scores = []
    for j in range(cfg.n_kv_head):
        rows, cols = head_rows(cfg, torch.tensor([j]), width_q)
        scores.append(_norm(w[rows], (0, 1), kind) + _norm(p[:, cols], (0, 1), kind))
    return torch.stack(scores)


def neuron_importance(mlp: MLP, kind: str) -> torch.Tensor:
    up, down = mlp.up.weight.detach(), mlp.down.weight.detach()
    f = down.shape[1]
    score = _norm(down, 0, kind) + _norm(up[:f], 1, kind)
    if mlp.swiglu:
        score = score + _norm(up[f:], 1, kind)
    return score


def keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` largest scores, in their original order."""
    return torch.topk(scores, keep).indices.sort().values


def prune_attention(attn: Attention, cfg, keep: int, kind: str, optimizer=None) -> list[int]:
    kept = keep_top(head_importance(attn, cfg, kind), keep)
    rows, cols = head_rows(cfg, kept, cfg.n_head * cfg.head_dim)
    slice_rows(attn.qkv, rows.to(attn.qkv.weight.device), optimizer)
    slice_cols(attn.proj, cols.to(attn.proj.weight.device), optimizer)
    return kept.tolist()


def prune_mlp(mlp: MLP, keep: int, kind: str, optimizer=None) -> list[int]:
    kept = keep_top(neuron_importance(mlp, kind), keep)
    f = mlp.down.weight.shape[1]
    rows = torch.cat([kept, kept + f]) if mlp.swiglu else kept
    slice_rows(mlp.up, rows.to(mlp.up.weight.device), optimizer)
    slice_cols(mlp.down, kept.to(mlp.down.weight.device), optimizer)
    return kept.tolist()


def analytic_ratio(cfg, seq_len: int, matmul_params_before: int, matmul_params_after: int, heads_after: int) -> float:
    """(6N' + 12·L·H'·Q·T) / (6N + 12·L·H·Q·T): PaLM's model FLOPs per token, pruned over dense."""
    before = model_flops_per_token(matmul_params_before, cfg.n_layer, cfg.n_head, cfg.head_dim, seq_len)
    after = model_flops_per_token(matmul_params_after, cfg.n_layer, heads_after, cfg.head_dim, seq_len)
    return after / before


def apply(build, options):
    model = build.model
    cfg = model.cfg
    kv_keep, ff_keep = kept_counts(cfg, options)
    params_before, matmul_before = model.num_params(), model.num_params(matmul_only=True)
    heads, neurons = {}, {}
    for name, module in list(model.named_modules()):
        if isinstance(module, Attention) and options["heads"] > 0:
            heads[name] = prune_attention(module, cfg, kv_keep, options["norm"])
        elif isinstance(module, MLP) and options["neurons"] > 0:
            neurons[name] = prune_mlp(module, ff_keep, options["norm"])
    group = cfg.n_head // cfg.n_kv_head
    matmul_after = model.num_params(matmul_only=True)
    build.notes[NAME] = dict(
        kind="structured (heads and MLP neurons removed)", criterion=f"{options['norm']} weight norm per unit, per layer",
        target_heads=options["heads"], target_neurons=options["neurons"], at=options["at"],
        kv_heads_per_layer=[cfg.n_kv_head, kv_keep], query_heads_per_layer=[cfg.n_head, kv_keep * group],
        neurons_per_layer=[cfg.d_ff, ff_keep], kept_kv_heads=heads, kept_neurons=neurons,
        achieved_heads_removed=1 - kv_keep / cfg.n_kv_head if heads else 0.0,
        achieved_neurons_removed=1 - ff_keep / cfg.d_ff if neurons else 0.0,
        params_before=params_before, params_after=model.num_params(), matmul_params_before=matmul_before,
        matmul_params_after=matmul_after, nonzero_params=model.num_params(),
        overall_sparsity=1 - model.num_params() / params_before,
        flops_saved=True, flops_note="the Linears are smaller: fewer multiply-adds are executed (counted FLOPs)",
        embeddings_pruned=False)

    def ratio_at(seq_len):
        return analytic_ratio(cfg, seq_len, matmul_before, matmul_after, kv_keep * group if heads else cfg.n_head)

    build.notes[NAME]["analytic_flops_ratio_T128"] = ratio_at(128)
    build.describe(NAME, lambda: dict(params_after=model.num_params()))
