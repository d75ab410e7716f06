"""Factorised low-rank linear layers: every block matrix W (m×n) trained as U·V of rank r.

Replacing a weight matrix by the product of two thin ones is the oldest low-rank compression of
neural layers: Sainath et al. 2013 ("Low-rank matrix factorization for deep neural network
training with high-dimensional output targets", ICASSP) factorise the output layer of speech
DNNs, Denil et al. 2013 ("Predicting Parameters in Deep Learning", NeurIPS) show most weights
are predictable from a few; Khodak, Tenenholtz, Mackey & Fusi 2021 ("Initialization and
Regularization of Factorized Neural Layers", ICLR, arXiv 2105.01029) study how to initialise
and regularise factorised layers trained from scratch.

Each block Linear (``attn.qkv``, ``attn.proj``, ``mlp.up``, ``mlp.down``) y = Wx + b becomes a
:class:`LowRankLinear` y = U(Vx) + b with V (r×n) and U (m×r): parameters r(m+n) instead of mn,
and FLOPs per token 2r(m+n) forward, 6r(m+n) training instead of 6mn — the model is a dense
model of fewer parameters N', so the record's model FLOPs stay the analytic 6N' + 12·L·H·Q·T of
the new N' (:func:`impls.measure.flops.model_flops_per_step` counts the factorised model), and
the counted FLOPs change by exactly 6·Σ(r(m+n) − mn) per token.  A rank with r(m+n) >= mn saves
nothing (and rank >= min(m, n) cannot even lower the rank), so such ranks are refused before any
work, for every targeted matrix.  The embedding and the tied LM head stay dense.

Initialisation (``init``):

* ``svd`` (default): the truncated SVD of the materialised dense weight, split evenly,
  U = U_r·Σ_r^½ and V = Σ_r^½·V_rᵀ — by Eckart–Young the best rank-r approximation in Frobenius
  norm, ‖W − UV‖_F² = Σ_{i>r} σ_i².  From a trained model (``--init-from``) it compresses the
  trained weights; from the random initialisation it is Khodak et al.'s *spectral
  initialisation* (§3), the factorisation of a standard dense init.
* ``random``: U and V drawn i.i.d. N(0, s²) with s² = σ/√r, σ the zoo's dense init std for the
  layer (0.02, or 0.02/√(2L) for the residual projections), so each entry of UV has the dense
  init's variance r·s⁴ = σ².

Khodak et al.'s Frobenius decay (decaying ‖UV‖_F instead of ‖U‖² + ‖V‖²) is not implemented:
the recipe's weight decay applies to U and V as to any matrix.

The record's ``technique_notes["lowrank"]`` gives the rank, the parameters before and after
(and their ratio), the factor parameters, and the optimizer state measured against its formula.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn

from ..errors import ConfigError

NAME = "lowrank"
STAGE = "surgery"
RANK = 35  # after MLP fusion (20) and attention kernels (30), before MoD's block routing (40)
OPTIONS = {"rank": 8, "init": "svd"}
CHOICES = {"init": ("svd", "random")}
CONFLICTS = {
    "moe": "moe replaces the MLPs with experts; lowrank factorises the dense MLP's up/down Linears",
    "mode": "mode replaces the MLPs with experts; lowrank factorises the dense MLP's up/down Linears",
    "tp": "tensor parallelism shards qkv/proj/up/down as nn.Linear (Colwise/RowwiseParallel); "
          "a factorised layer is two Linears of another shape",
    "lora": "LoRA adapts the dense block Linears (peft wraps nn.Linear), which lowrank replaces by factors",
    "galore": "GaLore projects the gradients of the dense block matrices; lowrank already trains rank-r factors",
}

#: (module attribute path inside a block, parent attribute, child attribute)
TARGETS = (("attn", "qkv"), ("attn", "proj"), ("mlp", "up"), ("mlp", "down"))


def target_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(out, in) of each targeted matrix of a block, from the model's config."""
    kv_dim = cfg.n_kv_head * cfg.head_dim
    up_out = cfg.d_ff * (2 if cfg.mlp == "swiglu" else 1)
    return {"attn.qkv": (cfg.d_model + 2 * kv_dim, cfg.d_model), "attn.proj": (cfg.d_model, cfg.d_model),
            "mlp.up": (up_out, cfg.d_model), "mlp.down": (cfg.d_model, cfg.d_ff)}


def largest_saving_rank(m: int, n: int) -> int:
    """The largest r with r(m+n) < mn: ranks above it store at least as many parameters as W."""
    return (m * n - 1) // (m + n)


def check_fuse_jit(recipe, name: str) -> None:
    """fuse:mode=jit reads ``mlp.up.weight`` directly (bypassing the Linear): refuse it with
    a technique that replaces or wraps ``up``."""
    from . import parse

    for text in recipe.techniques:
        spec = parse(text)
        if spec.name == "fuse" and spec.options.get("mode") == "jit":
            raise ConfigError(f"techniques {name!r} and 'fuse:mode=jit' cannot be combined: the fused MLP reads "
                              f"mlp.up's weight directly, bypassing the layer {name} replaces; use fuse:mode=compile")


def check_recipe(recipe, options):
    check_fuse_jit(recipe, NAME)


def check_model(cfg, seq_len, options):
    r = options["rank"]
    if r < 1:
        raise ConfigError(f"lowrank:rank={r} is invalid; valid: an integer >= 1")
    for name, (m, n) in target_shapes(cfg).items():
        if r * (m + n) >= m * n:
            limit = min(largest_saving_rank(*shape) for shape in target_shapes(cfg).values())
            raise ConfigError(f"lowrank:rank={r} saves nothing on {name} ({m}×{n}: r(m+n) = {r * (m + n)} >= mn = "
                              f"{m * n}); valid for this model: rank in [1, {limit}]")


class LowRankLinear(nn.Module):
    """y = U(Vx) + b, the rank-r factorisation of an m×n Linear: ``v`` (n -> r, no bias) then
    ``u`` (r -> m, the dense layer's bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.v = nn.Linear(in_features, rank, bias=False)
        self.u = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))

    @torch.no_grad()
    def init_random(self, dense_std: float) -> None:
        """U, V ~ N(0, σ/√r) i.i.d.: each entry of UV has variance r·(σ/√r)² = σ², the dense init's."""
        s = math.sqrt(dense_std / math.sqrt(self.rank))
        nn.init.normal_(self.v.weight, std=s)
        nn.init.normal_(self.u.weight, std=s)
        if self.u.bias is not None:
            nn.init.zeros_(self.u.bias)

    @torch.no_grad()
    def init_svd(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """U = U_r Σ_r^½, V = Σ_r^½ V_rᵀ: the truncated SVD of ``weight``, the best rank-r
        approximation (Eckart–Young), split evenly between the factors."""
        u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        root = s[:self.rank].sqrt()
        self.u.weight.copy_(u[:, :self.rank] * root)
        self.v.weight.copy_(root[:, None] * vh[:self.rank])
        if self.u.bias is not None:
            self.u.bias.copy_(bias)

    def init_weights(self) -> None:  # build.own's default: the random init at the zoo's std
        self.init_random(0.02)


def dense_std(cfg, name: str) -> float:
    """The zoo's GPT-2 init std of a block matrix (impls.zoo.model.Transformer.init_weights)."""
    return 0.02 / math.sqrt(2 * cfg.n_layer) if name in ("attn.proj", "mlp.down") else 0.02


def targets(model) -> list[tuple[str, nn.Module, str]]:
    """(name, parent module, attribute) of every targeted Linear of the model's blocks."""
    out = []
    for i, block in enumerate(model.blocks):
        block = getattr(block, "block", block)  # through a routing wrapper
        for parent_name, child in TARGETS:
            parent = getattr(block, parent_name)
            out.append((f"blocks.{i}.{parent_name}.{child}", parent, child))
    return out


# --------------------------------------------------------------------------- shared with lora, galore


def capture_optimizer(build) -> list:
    """A list that will hold the run's optimizer once the engine builds it (an optimizer wrapper
    that returns it unchanged), so a technique's notes can measure its state.  Engines that build
    their own optimizer (DeepSpeed) leave it empty."""
    holder: list = []

    def keep(optimizer, _build):
        holder.append(optimizer)
        return optimizer

    build.wrap_optimizer(keep)
    return holder


def optimizer_check(holder: list, params: list[torch.Tensor], plan) -> dict:
    """The optimizer's measured state bytes (the record's meter: each storage once, parameters
    excluded) against the formula for ``params`` (the trainable ones): Adam/AdamW keep two fp32
    moments per element plus a 4-byte ``step`` per tensor, momentum SGD one buffer.  Sharded or
    other optimizers: measured only."""
    from ..optimizers import state_bytes_by_kind

    if not holder:
        return dict(optimizer_bytes=None, optimizer_formula_bytes=None, optimizer_ratio=None)
    optimizer = holder[0]
    measured = state_bytes_by_kind(optimizer)["total_bytes"]
    elements, tensors = sum(p.numel() for p in params), len(params)
    formula, source = None, None
    if plan.sharding_stage == 0 and not plan.low_precision_params:
        if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            formula, source = 8 * elements + 4 * tensors, "Adam: 2 fp32 moments (8 B) per trainable element + 4 B step per tensor"
        elif isinstance(optimizer, torch.optim.SGD):
            formula, source = 4 * elements, "momentum SGD: 4 B per trainable element"
    return dict(optimizer_bytes=measured, optimizer_formula_bytes=formula, optimizer_formula=source,
                optimizer_ratio=measured / formula if formula else None)


def trainable(model) -> list[torch.Tensor]:
    seen, out = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


# --------------------------------------------------------------------------- apply


def apply(build, options):
    model = build.model
    r, init = options["rank"], options["init"]
    dense_params = model.num_params()
    layers, factor_params, replaced = [], 0, 0
    for name, parent, child in targets(model):
        dense = getattr(parent, child)
        if not isinstance(dense, nn.Linear):
            raise ConfigError(f"lowrank: {name} is a {type(dense).__name__}, not the zoo's nn.Linear (another "
                              f"technique replaced it)")
        with torch.device("meta"):
            low = LowRankLinear(dense.in_features, dense.out_features, r, bias=dense.bias is not None)
        setattr(parent, child, low)
        kind = name.split(".", 2)[2]
        if init == "svd":  # from the materialised (seeded or --init-from) dense weight
            fn = functools.partial(low.init_svd, dense.weight, dense.bias)
        else:
            fn = functools.partial(low.init_random, dense_std(model.cfg, kind))
        build.own(low, init=fn)
        m, n = dense.out_features, dense.in_features
        layers.append(dict(name=name, shape=[m, n], rank=r))
        factor_params += r * (m + n)
        replaced += m * n
    holder = capture_optimizer(build)
    base = "trained (--init-from)" if build.init_from else "random (seeded initialisation)"
    build.notes[NAME] = dict(rank=r, init=init, layers=[d["name"] for d in layers], dense_weights=base,
                             targets=[t[1] for t in TARGETS], dense_params=dense_params,
                             factor_params=factor_params, replaced_dense_params=replaced,
                             factor_vs_dense=factor_params / replaced,
                             model_flops="analytic 6N'+12LHQT with N' the factorised model's parameters")

    def describe():
        params = model.num_params()
        train = trainable(model)
        return dict(params=params, params_vs_dense=params / dense_params,
                    trainable_params=sum(p.numel() for p in train),
                    frozen_params=params - sum(p.numel() for p in train),
                    **optimizer_check(holder, train, build.plan))

    build.describe(NAME, describe)
