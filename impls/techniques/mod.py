"""Mixture-of-Depths: each routed block processes only the top-k tokens of a sequence; the others
skip it on the residual stream (Raposo et al. 2024, "Mixture-of-Depths: Dynamically allocating
compute in transformer-based language models", arXiv 2404.02258).

Routing (expert choice, paper §3.1-3.4).  Blocks ``every-1, 2·every-1, …`` are routed — with the
default ``every=2`` the odd blocks 1, 3, 5, … (the paper routes every other block and keeps the
first block dense).  A routed block gets a router ``Linear(d_model, 1)`` (``block.mod_router``) on
its input x, giving a scalar logit r per token.  Per sequence the ``k`` tokens with the largest r
are gathered, **sorted by position** (so causal attention among them is plain causal attention
in their original order), run through the unchanged block (attention + MLP) as a (B, k, C)
tensor, and scattered back; the rest pass through untouched.  Selected tokens get

    x + σ(r) · (block(x) − x)      (``torch.lerp(x, block(x), σ(r))``)

— the block's residual update scaled by the router weight, which puts the router on the
gradient path.  The weight is ``sigmoid(r)``, per token: bounded in (0, 1) so large logits cannot
blow up, and — unlike a softmax over the top-k — independent of every other token's logit (the
paper multiplies by the raw r; we bound it).  ``lerp`` returns block(x) *exactly* at weight 1.

``k = max(1, ceil(capacity · T))`` for the ACTUAL sequence length T of the batch (ceil: never
fewer tokens than the capacity promises; 0.125 × 64 = 8).  k is fixed for a given T, so shapes
are static and FLOPs per step are known in advance: a routed block costs about ``capacity``× its
linear FLOPs and ``capacity²``× its attention-score FLOPs, plus 2·T·C for the router
(12.5 % on every other block: ≈ 0.56× the blocks' FLOPs).  With rope the gathered tokens keep
their original positions (the cos/sin rows are gathered too); an explicit ``attn_mask`` is
gathered likewise.

Options: ``capacity`` (0, 1]; ``every`` ≥ 1; ``router=learned|random`` (random: top-k of uniform
noise each forward and weight 1, no router parameters — the paper's baseline);
``causal=none|aux_loss|predictor`` (§3.5, the fixes for autoregressive sampling, where the
top-k over the whole sequence would need future tokens):

* ``aux_loss``: binary cross-entropy of the router logits against top-k membership, so r > 0
  means "would be in the top-k";
* ``predictor``: a small MLP (C → C/4 → 1, SiLU) on the router's input with stop-gradient
  (``x.detach()``), trained by BCE against top-k membership; its accuracy is in the stats.

``aux_weight`` multiplies the summed auxiliary losses (mean over routed blocks): a loss term of
the build (``mod``), which the engine adds *in training only* (validation losses stay pure LM
losses, comparable with a baseline; the training loss in the curve includes the aux term),
weighted by each micro-batch's target tokens like the LM loss.  Each routed block becomes a
:class:`RoutedBlock`, a module that *contains* the original block (``blocks.i.block.*``) plus its
``router`` (and ``predictor``); it keeps the last forward's aux losses and statistics.  Routing
is the last surgery (rank 40), so it wraps whatever the block became (MoE MLPs inside: ``mod`` +
``moe`` is staged MoDE), and activation checkpointing, a later stage, wraps the routed block.

:func:`evaluate_autoregressive` gives the validation loss with top-k routing and with causal
per-token routing (token selected iff predictor logit > 0 for ``predictor``, router logit > 0
otherwise; no look at future tokens), computed with an attention mask over the full sequence.
The run record's ``technique_notes["mod"]`` gets the routing stats of the last evaluation forward
(``predictor_accuracy``, ``router_accuracy``, ``mean_selected_weight``, aux losses).

Measured (CPU, fp32, ``nano`` with n_layer=6, batch 8×64, lr 3e-3, synthetic, capacity 0.125,
every=2, seeds 0 and 1):

* counted FLOPs per step 0.612 GFLOP vs 1.095 baseline (0.559×; the blocks alone 0.555×, the rest
  is the LM head); step time 0.72× (interleaved median, one thread), 0.58× at d_model 256, T 256;
* val loss after 300 equal steps: 1.285 / 1.298 vs baseline 1.306 / 1.326 (random router 1.288 /
  1.311); at the baseline's FLOP budget (536 MoD steps): 1.216 / 1.235;
* causal routing after 300 steps (seed 0, 4 val batches): top-k 1.2855 vs autoregressive 1.2856
  (causal=none, r > 0 agrees with top-k on 95 % of tokens), 1.2866 vs 1.2867 (aux_loss, router
  accuracy 95 %), 1.2804 vs 1.2948 (predictor, accuracy 93.8 % against 87.5 % for "never").
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..loss import lm_loss

NAME = "mod"
STAGE = "surgery"
RANK = 40  # last surgery: routing wraps the block as the other surgeries left it
OPTIONS = {"capacity": 0.125, "every": 2, "router": "learned", "causal": "none", "aux_weight": 0.01}
CHOICES = {"router": ("learned", "random"), "causal": ("none", "aux_loss", "predictor")}


def configure(plan, options):
    if not 0 < options["capacity"] <= 1:
        raise ConfigError(f"mod:capacity must be in (0, 1], got {options['capacity']}")
    if options["every"] < 1:
        raise ConfigError(f"mod:every must be >= 1, got {options['every']}")
    if not options["aux_weight"] >= 0:
        raise ConfigError(f"mod:aux_weight must be >= 0, got {options['aux_weight']}")
    if options["router"] == "random" and options["causal"] != "none":
        raise ConfigError(f"mod:causal={options['causal']} needs router=learned (a random router has "
                          f"nothing to predict)")
    plan.dense_compute = False  # tokens skip routed blocks: the dense 6N + 12·L·H·Q·T over-counts


def check_model(cfg, seq_len, options):
    check_routed(NAME, "routes", options["every"], cfg.n_layer)


def check_routed(name: str, verb: str, every: int, n_layer: int) -> None:
    """Refuse an ``every`` under which blocks every-1, 2·every-1, … are none of the model's
    ``n_layer`` (shared by mod, moe and mode): the run would be the baseline under ``name``."""
    if every >= 1 and not routed_blocks(n_layer, every):  # every < 1 is configure's error
        raise ConfigError(f"{name}:every={every} {verb} no block of a {n_layer}-layer model (it acts on blocks "
                          f"every-1, 2*every-1, ...), so the run would be the baseline; use every <= {n_layer}")


def capacity_tokens(capacity: float, seq_len: int) -> int:
    """Tokens a routed block processes per sequence: max(1, ceil(capacity · T))."""
    return max(1, min(seq_len, math.ceil(capacity * seq_len - 1e-9)))


def routed_blocks(n_layer: int, every: int) -> list[int]:
    """Blocks every-1, 2·every-1, …: every=2 routes 1, 3, 5, …; every=1 routes all."""
    return list(range(every - 1, n_layer, every))


class _Rows:
    """Stands in for a rope table: ``apply_rope`` slices ``table[:t]``; this returns the rows
    already gathered per sequence, shaped (B, 1, k, Q/2) to broadcast over heads."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __getitem__(self, _):
        return self.rows


def gather_rope(rope, top):
    if rope is None:
        return None
    return tuple(_Rows(table[top].unsqueeze(1)) for table in rope)  # (B, 1, k, Q/2)


def gather_mask(attn_mask, top, t):
    if attn_mask is None:
        return None
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    b, k = top.shape
    m = m.expand(b, m.shape[1], t, t)
    rows = top[:, None, :, None].expand(b, m.shape[1], k, t)
    m = m.gather(2, rows)
    cols = top[:, None, None, :].expand(b, m.shape[1], k, k)
    return m.gather(3, cols)


class Router(nn.Linear):
    """The per-token router logit r = w·x + b of a routed block, N(0, 0.02) weights, zero bias."""

    def __init__(self, d_model: int):
        super().__init__(d_model, 1)

    def init_weights(self):
        self.reset_parameters()  # the stream an eagerly built nn.Linear draws, then overwritten
        nn.init.normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)


class Predictor(nn.Sequential):
    """The causal predictor of §3.5: C → C/4 → 1 with SiLU, PyTorch's default initialisation."""

    def __init__(self, d_model: int):
        hidden = max(8, d_model // 4)
        super().__init__(nn.Linear(d_model, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def init_weights(self):
        for layer in self:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()


class RoutedBlock(nn.Module):
    """A block that only the top-k tokens of each sequence go through (the rest skip it on the
    residual stream); contains the original ``block``.  ``last`` holds the aux losses and
    routing statistics of the last forward; ``autoregressive`` switches to causal routing."""

    def __init__(self, block: nn.Module, options: dict, router: Router | None, predictor: Predictor | None):
        super().__init__()
        self.block = block
        self.router = router
        self.predictor = predictor
        self.options = dict(options)
        self.autoregressive = False
        self.last: dict = dict(aux={}, stats={})

    def forward(self, x, rope=None, attn_mask=None):
        opts = self.options
        b, t, c = x.shape  # (B, T, C)
        k = capacity_tokens(opts["capacity"], t)
        learned = opts["router"] == "learned"
        if learned:
            logits = self.router(x).squeeze(-1).float()  # (B, T)
        else:
            logits = torch.rand(b, t, device=x.device)
        top = logits.detach().topk(k, dim=-1).indices.sort(dim=-1).values  # (B, k), increasing positions
        member = torch.zeros(b, t, device=x.device).scatter_(1, top, 1.0)  # top-k membership, (B, T)
        aux, stats = {}, {"k": k, "seq_len": t, "indices": top}
        if learned and opts["causal"] == "aux_loss":
            aux["router_bce"] = F.binary_cross_entropy_with_logits(logits, member)
            stats["router_accuracy"] = ((logits.detach() > 0) == member.bool()).float().mean()
        if learned and opts["causal"] == "predictor":
            p = self.predictor(x.detach()).squeeze(-1).float()  # stop-gradient: the model never sees it
            aux["predictor_bce"] = F.binary_cross_entropy_with_logits(p, member)
            stats["predictor_accuracy"] = ((p.detach() > 0) == member.bool()).float().mean()
        if self.autoregressive:
            out = self._autoregressive(x, rope, attn_mask, logits, member, stats)
            self.last = dict(aux=aux, stats=stats)
            return out
        idx = top.unsqueeze(-1).expand(b, k, c)
        xs = x.gather(1, idx)  # (B, k, C)
        ys = self.block(xs, gather_rope(rope, top), gather_mask(attn_mask, top, t)).to(xs.dtype)
        if learned:
            w = torch.sigmoid(logits.gather(1, top)).unsqueeze(-1)  # (B, k, 1), per token, in (0, 1)
            stats["weights"] = w.detach().squeeze(-1)
            ys = torch.lerp(xs, ys, w.to(xs.dtype))
        self.last = dict(aux=aux, stats=stats)
        return x.scatter(1, idx, ys)  # (B, T, C)

    def _autoregressive(self, x, rope, attn_mask, logits, member, stats):
        """Causal routing: token i is selected from its own decision only; the selected tokens
        attend among themselves (mask over the full sequence; unselected rows see only themselves
        and are discarded)."""
        opts = self.options
        b, t, _ = x.shape
        if opts["router"] == "random":
            sel = torch.rand(b, t, device=x.device) < opts["capacity"]
        elif opts["causal"] == "predictor":
            sel = self.predictor(x).squeeze(-1) > 0
        else:
            sel = logits > 0
        eye = torch.eye(t, dtype=torch.bool, device=x.device)
        allowed = sel[:, None, :] | eye  # (B, T, T): keys that are selected, or oneself
        if self.options["causal_model"]:
            allowed = allowed & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        allowed = allowed.unsqueeze(1)  # (B, 1, T, T)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                allowed = allowed & attn_mask
            else:
                allowed = attn_mask + torch.zeros_like(allowed, dtype=attn_mask.dtype).masked_fill(~allowed, -math.inf)
        y = self.block(x, rope, allowed).to(x.dtype)
        if opts["router"] == "learned":
            y = torch.lerp(x, y, torch.sigmoid(logits).unsqueeze(-1).to(x.dtype))
        stats["selected_fraction"] = sel.float().mean()
        stats["agreement_with_topk"] = (sel == member.bool()).float().mean()
        return torch.where(sel.unsqueeze(-1), y, x)


def routed_modules(model) -> list[RoutedBlock]:
    """The model's routed blocks, in depth order (found through any wrapper)."""
    return [m for m in model.modules() if isinstance(m, RoutedBlock)]


def aux_losses(model) -> dict:
    """The last forward's auxiliary losses by name, each the mean over routed blocks."""
    blocks = routed_modules(model)
    aux = {}
    for blk in blocks:
        for name, value in blk.last["aux"].items():
            aux[name] = aux.get(name, 0.0) + value / len(blocks)
    return aux


def aux_term(model):
    """The ``mod`` loss term: the summed auxiliary losses of the last forward (None if none)."""
    aux = aux_losses(model)
    return sum(aux.values()) if aux else None


def summary(model) -> dict:
    """Floats of the last forward: aux losses, and per-routed-block means of the routing stats."""
    out = {f"aux_{n}": float(v.detach()) for n, v in aux_losses(model).items()}
    stats = [blk.last["stats"] for blk in routed_modules(model) if blk.last["stats"]]
    for key in ("predictor_accuracy", "router_accuracy", "selected_fraction", "agreement_with_topk"):
        values = [float(s[key]) for s in stats if key in s]
        if values:
            out[key] = sum(values) / len(values)
    weights = [s["weights"].mean() for s in stats if "weights" in s]
    if weights:
        out["mean_selected_weight"] = float(sum(weights) / len(weights))
    return out


def route(build, model, options: dict) -> list[int]:
    """Wrap blocks every-1, 2·every-1, … of ``model`` in :class:`RoutedBlock` s (routers created
    on ``meta`` and registered with the build for initialisation); returns their indices."""
    cfg = model.cfg
    indices = routed_blocks(len(model.blocks), options["every"])
    for i in indices:
        router = predictor = None
        if options["router"] == "learned":
            with torch.device("meta"):
                router = Router(cfg.d_model)
            build.own(router)
            if options["causal"] == "predictor":
                with torch.device("meta"):
                    predictor = Predictor(cfg.d_model)
                build.own(predictor)
        model.blocks[i] = RoutedBlock(model.blocks[i], dict(options, causal_model=cfg.causal), router, predictor)
    return indices


def apply(build, options):
    model = build.model
    indices = route(build, model, options)
    build.add_loss_term(NAME, options["aux_weight"], lambda out: aux_term(model))
    build.notes[NAME] = dict(blocks=indices, capacity=options["capacity"], tokens_rule="max(1, ceil(capacity*T))",
                             router=options["router"], causal=options["causal"], weight="sigmoid(router logit)",
                             aux_weight=options["aux_weight"])
    # The record's notes get the routing stats of the last forward before it is written: the
    # final evaluation's (predictor accuracy, router accuracy, mean selected weight, aux losses).
    build.describe(NAME, lambda: summary(model))


@contextlib.contextmanager
def autoregressive_routing(model):
    """Inside, routed blocks decide per token causally (threshold, no top-k over the future)."""
    blocks = routed_modules(model)
    for blk in blocks:
        blk.autoregressive = True
    try:
        yield
    finally:
        for blk in blocks:
            blk.autoregressive = False


@torch.no_grad()
def evaluate_autoregressive(model, batches) -> dict:
    """Mean validation loss over ``batches`` ((x, y) pairs) with top-k routing and with causal
    per-token routing; also the fraction of tokens causal routing selects and how often its
    decision agrees with top-k membership."""
    was_training = model.training
    model.eval()
    topk, causal, frac, agree = [], [], [], []
    try:
        for x, y in batches:
            topk.append(lm_loss(model(x), y).item())
            with autoregressive_routing(model):
                causal.append(lm_loss(model(x), y).item())
            s = summary(model)
            frac.append(s["selected_fraction"])
            agree.append(s["agreement_with_topk"])
    finally:
        model.train(was_training)
    n = len(topk)
    return dict(topk=sum(topk) / n, autoregressive=sum(causal) / n, selected_fraction=sum(frac) / n,
                agreement_with_topk=sum(agree) / n)


@torch.no_grad()
def routing_decisions(model, idx: torch.Tensor) -> torch.Tensor:
    """(layers, T) 0/1 matrix for one sequence ``idx`` (T,): which tokens each block processed
    (the MoD paper's Figure 5).  Unrouted blocks process every token."""
    was_training = model.training
    model.eval()
    model(idx.unsqueeze(0))
    model.train(was_training)
    decisions = torch.ones(len(model.blocks), idx.numel())
    for layer, block in enumerate(model.blocks):
        routed = [m for m in block.modules() if isinstance(m, RoutedBlock)]
        if routed:
            decisions[layer] = 0
            decisions[layer, routed[0].last["stats"]["indices"][0].cpu()] = 1
    return decisions
