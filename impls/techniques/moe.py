"""Mixture-of-Experts MLP: sparsely-gated experts (Shazeer et al. 2017), Switch-style token-choice
routing with capacity and load balancing (Fedus et al. 2021, arXiv 2101.03961), and expert-choice
routing (Zhou et al. 2022, arXiv 2202.09368).

The MLP of every ``every``-th block (blocks every-1, 2·every-1, …, as ``mod``) becomes a
:class:`MoEMLP`: a bias-free router ``Linear(C, E)`` and ``E`` experts, each a plain
:class:`~impls.zoo.model.MLP` of the block's shape (GELU or SwiGLU), initialised like the dense
MLP (N(0, 0.02), the down projection N(0, 0.02/√(2L)), zero biases).  Routing is over all the
N = B·T tokens of the micro-batch (the Switch "group" is the micro-batch).

* ``routing=token`` (Switch / GShard): p = softmax(router(x)) over experts; each token picks its
  top-``top_k`` experts; gate = p of the chosen expert for top-1 (Switch Eq. 2), the top-2
  probabilities renormalised to sum to 1 for top-2 (GShard).  Per-expert capacity
  ``min(N, ceil(capacity_factor · N · top_k / E))``; slots are filled first choices before second
  choices, in token order; assignments over capacity are DROPPED (the token keeps only its
  residual path for that choice) and counted: ``dropped_fraction`` = tokens that got no expert,
  ``dropped_assignments`` = (token, choice) pairs over capacity.  Aux loss: Switch's
  load-balancing loss ``E · Σ_i f_i · P_i`` with f_i the fraction of (pre-capacity) assignments
  to expert i (divided by top_k so Σ f = 1) and P_i the mean router probability; 1 when uniform.
* ``routing=expert``: s = softmax(router(x)) over experts; each expert takes its top-c tokens by
  s, ``c = min(N, ceil(capacity_factor · N / E))``, gate = s.  Every expert processes exactly c
  tokens; a token may be taken by several experts or by none (``dropped_fraction`` counts the
  latter).  No aux loss.  Like MoD's top-k this looks at the whole batch (future tokens too), so
  it is a training-time routing; autoregressive sampling would need MoD's causal fixes.

Dispatch is **gather / index_add**, not a dense one-hot einsum: routing produces an (E, cap) table
of token indices (N for an empty slot, pointing at an appended zero row) and gates (0 for empty);
``x[table]`` is an (E, cap, C) batch, each expert runs its (cap, C) slice, outputs are multiplied
by the gate and ``index_add``-ed back.  Shapes depend only on N, so FLOPs per step are fixed: the
experts cost ``E·cap/N`` × the dense MLP (top-1 at capacity_factor 1: exactly the dense MLP) plus
``2·N·C·E`` for the router; the gather/scatter cost no FLOPs (a one-hot einsum would add
``2·N·E·cap·C`` FLOPs per direction, quadratic in N, which is why it is not used).  Empty slots
still run (static shapes: FLOPs are paid for capacity, not for use).  Experts run in a Python
loop over ``E`` (small E; a grouped GEMM is the scaled-up equivalent).

``moe`` replaces MLPs first in the surgery stage (rank 10), so ``fuse:mode=jit`` (rank 20) fuses
the experts' bias+GELU too and ``mod`` (rank 40) routes around blocks whose MLP is a MoE: ``mod``
+ ``moe`` is staged MoDE, whatever order they are listed in.

Each :class:`MoEMLP` keeps its last forward's aux loss and statistics.  The load-balancing loss
(mean over MoE layers) is a loss term of the build (``moe``), ``aux_weight ×`` it added by the
engine in training only, weighted by each micro-batch's target tokens like the LM loss.
``technique_notes["moe"]`` gets the routing stats of the last evaluation forward (dropped
fraction, aux loss, expert load).

Measured (CPU, fp32, ``nano`` with n_layer=4, batch 8×64, lr 3e-3, synthetic, 300 steps, every=2,
4 experts, seeds 0 / 1; dropped = last evaluation batch):

* baseline: 212 K params, 0.734 GFLOP/step, val 1.288 / 1.310;
* token top-1 (cf 1.25): 411 K params, 0.786 GFLOP (1.07×: the 25 % spare slots + router),
  val 1.274 / 1.280, dropped 0.4 % / 0.0 %, load-balancing loss 1.004 / 1.005;
* expert choice (cf 1.25): same params and FLOPs, val 1.268 / 1.280, tokens unpicked 0.4 % / 0.2 %;
* token top-2 (cf 1.25): 1.038 GFLOP (1.41×), val 1.269 / 1.285, dropped 0 %.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..zoo.model import MLP
from .mod import check_routed, routed_blocks

NAME = "moe"
STAGE = "surgery"
RANK = 10  # first surgery: MLP replacement, before fusion (fuse) and block routing (mod)
OPTIONS = {"experts": 4, "top_k": 1, "routing": "token", "capacity_factor": 1.25, "every": 2,
           "aux_weight": 0.01}
CHOICES = {"routing": ("token", "expert"), "top_k": (1, 2)}


def check_options(options, name=NAME):
    if options["experts"] < 1:
        raise ConfigError(f"{name}:experts must be >= 1, got {options['experts']}")
    if not options["capacity_factor"] > 0:
        raise ConfigError(f"{name}:capacity_factor must be > 0, got {options['capacity_factor']}")
    if options["every"] < 1:
        raise ConfigError(f"{name}:every must be >= 1, got {options['every']}")
    if not options["aux_weight"] >= 0:
        raise ConfigError(f"{name}:aux_weight must be >= 0, got {options['aux_weight']}")
    if options["top_k"] > options["experts"]:
        raise ConfigError(f"{name}:top_k={options['top_k']} exceeds experts={options['experts']}")


def configure(plan, options):
    check_options(options)
    plan.dense_compute = False  # a token runs top_k experts, not all of N: the dense 6N over-counts


def check_model(cfg, seq_len, options):
    check_routed(NAME, "replaces the MLP of", options["every"], cfg.n_layer)


# --------------------------------------------------------------------------- routing math


@dataclass
class Routing:
    """Which token sits in each expert slot: ``index`` (E, cap) token ids, N for an empty slot;
    ``gate`` (E, cap) weights (0 for empty); ``aux`` scalar loss or None; ``stats`` floats."""

    index: torch.Tensor
    gate: torch.Tensor
    aux: torch.Tensor | None
    stats: dict


def token_capacity(n_tokens: int, experts: int, top_k: int, capacity_factor: float) -> int:
    """ceil(capacity_factor · N · top_k / E), at most N (a token takes an expert at most once)."""
    return max(1, min(n_tokens, math.ceil(capacity_factor * n_tokens * top_k / experts - 1e-9)))


def expert_capacity(n_tokens: int, experts: int, capacity_factor: float) -> int:
    return max(1, min(n_tokens, math.ceil(capacity_factor * n_tokens / experts - 1e-9)))


def load_balancing_loss(probs: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """Switch Eq. 4-6: E · Σ_i f_i · P_i; ``probs`` (N, E), ``expert`` (N, k) chosen experts."""
    n, e = probs.shape
    f = F.one_hot(expert.reshape(-1), e).float().mean(0)  # fraction of assignments per expert
    return e * (f * probs.float().mean(0)).sum()


def token_choice(probs: torch.Tensor, top_k: int, capacity: int) -> Routing:
    """Top-k experts per token over ``probs`` (N, E); slots by priority (choice rank, token)."""
    n, e = probs.shape
    gate, expert = probs.topk(top_k, dim=-1)  # (N, k)
    if top_k > 1:
        gate = gate / gate.sum(-1, keepdim=True)
    flat_expert = expert.t().reshape(-1)  # (k·N,): all first choices, then all second choices
    flat_gate = gate.t().reshape(-1)
    token = torch.arange(n, device=probs.device).repeat(top_k)
    onehot = F.one_hot(flat_expert, e)  # (k·N, E)
    pos = (onehot.cumsum(0) * onehot).sum(-1) - 1  # rank of the assignment within its expert
    keep = pos < capacity
    dummy = e * capacity  # dropped assignments land in one extra slot, cut off below
    slot = torch.where(keep, flat_expert * capacity + pos, torch.full_like(pos, dummy))
    index = torch.full((dummy + 1,), n, dtype=torch.long, device=probs.device).scatter(0, slot, token)
    gates = torch.zeros(dummy + 1, dtype=probs.dtype, device=probs.device).scatter(0, slot, flat_gate)
    index, gates = index[:dummy].view(e, capacity), gates[:dummy].view(e, capacity)
    kept_per_token = keep.view(top_k, n).any(0)
    stats = dict(dropped_fraction=1 - kept_per_token.float().mean(),
                 dropped_assignments=1 - keep.float().mean(),
                 load=onehot.float().mean(0) * e, capacity=capacity)
    return Routing(index, gates, load_balancing_loss(probs, expert), stats)


def expert_choice(scores: torch.Tensor, capacity: int, n_real: int | None = None) -> Routing:
    """Each of the first ``n_real`` experts (columns of ``scores`` (N, E_total)) takes its
    top-``capacity`` tokens; the other columns (no-op experts) take nothing and cost nothing."""
    n = scores.shape[0]
    n_real = scores.shape[1] if n_real is None else n_real
    gate, index = scores[:, :n_real].t().topk(capacity, dim=-1)  # (E, c)
    picked = torch.zeros(n, dtype=torch.bool, device=scores.device)
    picked[index.reshape(-1)] = True
    counts = torch.zeros(n, device=scores.device).index_add_(0, index.reshape(-1),
                                                             torch.ones(index.numel(), device=scores.device))
    stats = dict(dropped_fraction=1 - picked.float().mean(), mean_experts_per_token=counts.mean(),
                 capacity=capacity)
    return Routing(index, gate, None, stats)


def dispatch(x: torch.Tensor, routing: Routing, experts: nn.ModuleList) -> torch.Tensor:
    """Gather the slot tokens of ``x`` (N, C), run each expert on its (cap, C) slice, weight by
    the gate and index_add back; tokens in no slot get 0 (their residual passes unchanged)."""
    n, c = x.shape
    xp = torch.cat([x, x.new_zeros(1, c)])  # row N: the empty-slot row
    xe = xp[routing.index]  # (E, cap, C)
    ye = torch.stack([expert(xe[i]) for i, expert in enumerate(experts)])  # (E, cap, C)
    ye = ye * routing.gate.unsqueeze(-1).to(ye.dtype)
    out = ye.new_zeros(n + 1, c).index_add(0, routing.index.reshape(-1), ye.reshape(-1, c))
    return out[:n]


# --------------------------------------------------------------------------- the module


class MoEMLP(nn.Module):
    """Drop-in for a block's MLP: (B, T, C) -> (B, T, C).  ``noop=True`` adds one no-op router
    column (MoDE integrated, see ``mode``): expert choice over the real experts' scores of a
    softmax that also contains the no-op logit."""

    def __init__(self, cfg, experts: int, top_k: int = 1, routing: str = "token",
                 capacity_factor: float = 1.25, noop: bool = False):
        super().__init__()
        self.n_experts, self.top_k, self.routing, self.capacity_factor = experts, top_k, routing, capacity_factor
        self.noop = noop
        self.n_layer = cfg.n_layer
        self.router = nn.Linear(cfg.d_model, experts + int(noop), bias=False)
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(experts))
        self._last = dict(aux=None, stats={})

    def init_weights(self):
        """The dense MLP's scheme (N(0, 0.02) weights, zero biases, GPT-2's 1/sqrt(2·L) down
        projection), after drawing PyTorch's default initialisation of each Linear in
        construction order: the random stream of an eagerly built layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
        nn.init.normal_(self.router.weight, std=0.02)
        for expert in self.experts:
            for lin in (expert.up, expert.down):
                nn.init.normal_(lin.weight, std=0.02)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            nn.init.normal_(expert.down.weight, std=0.02 / math.sqrt(2 * self.n_layer))

    def route(self, x: torch.Tensor) -> Routing:
        n = x.shape[0]
        probs = F.softmax(self.router(x).float(), dim=-1)  # (N, E [+1])
        if self.noop:
            cap = expert_capacity(n, self.n_experts, self.capacity_factor)
            return expert_choice(probs, cap, self.n_experts)
        if self.routing == "expert":
            return expert_choice(probs, expert_capacity(n, self.n_experts, self.capacity_factor))
        return token_choice(probs, self.top_k, token_capacity(n, self.n_experts, self.top_k, self.capacity_factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routing = self.route(flat)
        self._last = dict(aux=routing.aux, stats=routing.stats, gate=routing.gate.detach())
        return dispatch(flat, routing, self.experts).view(shape)


# --------------------------------------------------------------------------- the model


def moe_layers(model) -> list[MoEMLP]:
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


def load_balancing(model) -> torch.Tensor | None:
    """The ``moe`` loss term: mean load-balancing loss of the last forward over MoE layers."""
    auxes = [m._last["aux"] for m in moe_layers(model) if m._last["aux"] is not None]
    return sum(auxes) / len(auxes) if auxes else None


def summary(model) -> dict:
    """Floats of the last forward: aux loss and per-layer means of the routing stats."""
    aux = load_balancing(model)
    out = {} if aux is None else {"aux_load_balancing": float(aux.detach())}
    stats = [m._last["stats"] for m in moe_layers(model) if m._last["stats"]]
    for key in ("dropped_fraction", "dropped_assignments", "mean_experts_per_token"):
        values = [float(s[key]) for s in stats if key in s]
        if values:
            out[key] = sum(values) / len(values)
    loads = [s["load"] for s in stats if "load" in s]
    if loads:
        out["max_expert_load"] = float(max(load.max() for load in loads))  # 1 = its fair share
    return out


def install(build, model, indices, aux_weight, **mlp_args) -> list[int]:
    """Replace ``model.blocks[i].mlp`` for i in ``indices`` by :class:`MoEMLP` s (built on
    ``meta``, initialised through the build) and register the load-balancing loss term."""
    for i in indices:
        with torch.device("meta"):
            layer = MoEMLP(model.cfg, **mlp_args)
        model.blocks[i].mlp = build.own(layer)
    build.add_loss_term(NAME, aux_weight, lambda out: load_balancing(model))
    return indices


def apply(build, options):
    model = build.model
    indices = install(build, model, routed_blocks(len(model.blocks), options["every"]), options["aux_weight"],
                      experts=options["experts"], top_k=options["top_k"], routing=options["routing"],
                      capacity_factor=options["capacity_factor"])
    build.notes[NAME] = dict(blocks=indices, experts=options["experts"], routing=options["routing"],
                             top_k=options["top_k"] if options["routing"] == "token" else None,
                             capacity_factor=options["capacity_factor"], dispatch="gather/index_add",
                             aux="switch load balancing" if options["routing"] == "token" else None,
                             aux_weight=options["aux_weight"])
    build.describe(NAME, lambda: summary(model))
