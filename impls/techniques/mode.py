"""Mixture-of-Depths-and-Experts, MoDE (Raposo et al. 2024, "Mixture-of-Depths", §3.6, Fig. 7).

Two variants on the blocks every-1, 2·every-1, … (``every``, as ``mod`` and ``moe``):

* ``kind=staged``: MoD routing *around* the block (``mod``'s machinery unchanged: learned
  sigmoid-weighted top-k, ``k = max(1, ceil(capacity · T))`` tokens per sequence go through
  attention + MLP, the rest skip the block) and, inside, the block's MLP is a MoE MLP (``moe``'s
  machinery: ``experts`` experts, token-choice top-1, capacity factor 1.25, Switch load
  balancing) over the B·k routed tokens.  This is the paper's "staged MoDE": routing around
  blocks first, then among experts.
* ``kind=integrated``: attention runs on every token; the MLP's router has ``experts`` real
  columns plus one **no-op** column, one softmax over all of them (a single routing operation,
  as in the paper).  Routing is MoD's: expert choice with capacity — each real expert takes its
  top-c tokens by its softmax score, ``c = max(1, ceil(capacity · N / experts))`` over the
  N = B·T tokens, output = Σ gate_e · expert_e(x); the no-op expert has unlimited capacity and
  computes nothing (its probability mass is what the token keeps on the residual path).  So a
  token "routed to the no-op expert" is any token no real expert picked, and the MLP compute is
  ``capacity`` × the dense MLP's (plus the router), a fixed, static-shape cost.  Several no-op
  experts would be equivalent to one no-op column with logit log Σ exp(no-op logits), so one is
  used.  What the paper states: integrated MoDE puts "no-op" experts among the MLP experts so
  that tokens explicitly learn to take the residual path rather than being dropped by
  capacity; its routing details (token- vs expert-choice) are not spelled out for this variant,
  and this implementation keeps MoD's expert-choice top-k, the scheme of the paper's main method.
  The no-op column is the only difference from ``moe:routing=expert``: without it every token's
  scores sum to 1 over real experts and the router cannot express "skip".

Counts: ``dropped_fraction`` in the notes is, for integrated, the fraction of tokens that no real
expert processed (routed to the no-op expert); for staged, the MoE's capacity drops among the
MoD-selected tokens (MoD's skipped tokens are by design, 1 − capacity).

The aux loss (staged only: the MoE's load balancing) is ``moe``'s loss term, ``aux_weight`` × it in
training.  ``mode`` conflicts with ``mod`` and ``moe``: it already is both (``mod`` + ``moe``
listed together also compose into staged MoDE, with each technique's own options).

Measured (same setup as ``moe``'s numbers: nano, n_layer=4, batch 8×64, 300 steps, seeds 0 / 1;
baseline 212 K params, 0.734 GFLOP/step, val 1.288 / 1.310):

* staged (capacity 0.125): 412 K params, 0.419 GFLOP (0.57×), val 1.284 / 1.297; the MoE inside
  drops 4.7 % / 9.4 % of the MoD-selected tokens;
* integrated (capacity 0.125): 412 K params, 0.560 GFLOP (0.76×: attention still sees every
  token), val 1.274 / 1.285; 87.6 % / 87.8 % of tokens go to the no-op expert.
"""
from __future__ import annotations

from .. import errors
from . import mod, moe
from .mod import routed_blocks

NAME = "mode"
STAGE = "surgery"
RANK = 10  # replaces MLPs (like moe), so fuse (20) fuses its experts
OPTIONS = {"kind": "integrated", "experts": 4, "capacity": 0.125, "every": 2, "aux_weight": 0.01}
CHOICES = {"kind": ("staged", "integrated")}
CONFLICTS = {"mod": "mode already routes with MoD (kind=staged) or replaces it (kind=integrated)",
             "moe": "mode already replaces the MLPs with MoE MLPs"}

STAGED_MOE = dict(top_k=1, routing="token", capacity_factor=1.25)


def configure(plan, options):
    if not 0 < options["capacity"] <= 1:
        raise errors.ConfigError(f"mode:capacity must be in (0, 1], got {options['capacity']}")
    moe.check_options(dict(STAGED_MOE, experts=options["experts"], every=options["every"],
                           aux_weight=options["aux_weight"]), NAME)
    plan.dense_compute = False  # tokens skip blocks or take no-op experts: the dense formula over-counts


def check_model(cfg, seq_len, options):
    mod.check_routed(NAME, "routes", options["every"], cfg.n_layer)


def apply(build, options):
    model = build.model
    indices = routed_blocks(len(model.blocks), options["every"])
    notes = dict(kind=options["kind"], blocks=indices, experts=options["experts"],
                 capacity=options["capacity"], aux_weight=options["aux_weight"])
    if options["kind"] == "staged":
        moe.install(build, model, indices, options["aux_weight"], experts=options["experts"], **STAGED_MOE)
        mod_options = dict(mod.OPTIONS, capacity=options["capacity"], every=options["every"])
        mod.route(build, model, mod_options)  # around the blocks whose MLP is now the MoE
        notes.update(moe_inside=dict(STAGED_MOE),
                     mod=dict(blocks=indices, capacity=options["capacity"], tokens_rule="max(1, ceil(capacity*T))",
                              router=mod_options["router"], causal=mod_options["causal"],
                              weight="sigmoid(router logit)", aux_weight=mod_options["aux_weight"]))
    else:
        moe.install(build, model, indices, 0.0, experts=options["experts"], routing="expert",
                    capacity_factor=options["capacity"], noop=True)
        notes.update(noop_experts=1, routing="expert choice over real experts, softmax incl. no-op",
                     tokens_rule="per real expert max(1, ceil(capacity*B*T/experts))")
    build.notes[NAME] = notes

    def describe() -> dict:  # the last evaluation's routing stats (MoE, and MoD's around it)
        out = moe.summary(model)
        if options["kind"] == "staged":
            out["mod"] = {**notes["mod"], **mod.summary(model)}
        return out

    build.describe(NAME, describe)
