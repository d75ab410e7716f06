"""What the masked pruning techniques share (``prune``, ``gmp``, ``prune_nm``): which weights they
prune, the mask they keep, when they update it, and the facts the record gets.  A helper module of
the package (it defines no ``NAME``).

Which weights.  The Linear weights of the Transformer blocks -- ``attn.qkv``, ``attn.proj``,
``mlp.up``, ``mlp.down`` -- the matmuls that carry the 6N of the blocks.  Biases, norms and the
position table are left dense (vectors: pruning them saves nothing), and so is the token embedding
that is tied to the LM head: one matrix serves as the input lookup table (where a zero saves no
compute, it only deletes a coordinate of a token's embedding) and as the output projection, so one
mask would prune both at once; Han et al. 2015 and Zhu & Gupta 2017 report their sparsities for the
hidden layers, and this suite keeps the same split.

The mask.  ``torch.nn.utils.prune`` keeps it: ``prune.identity`` moves the ``weight`` Parameter to
``weight_orig`` (the same Parameter object, so an optimizer built before or after holds it) and
registers a buffer ``weight_mask`` plus a forward pre-hook that sets ``weight = weight_mask *
weight_orig`` before every forward.  The mask is stored as ``torch.bool`` (1 byte per weight, not the
library's 4): the hook casts it to the weight's dtype.  Masks are buffers, so they are in the
``state_dict`` and a checkpointed run resumes with them.

Zeros stay zero.  The forward uses ``mask * weight_orig``, so a pruned weight is exactly zero in
every forward whatever the optimizer does; the gradient reaching ``weight_orig`` is ``mask * grad``,
zero at the pruned positions.  At each mask update the pruned entries of ``weight_orig`` *and* of
every optimizer-state tensor of its shape (AdamW's two moments) are set to zero: with zero
gradient, zero moments and a zero weight, AdamW's update ``lr·(m̂/(√v̂+ε) + λ·w)`` is exactly zero
there, so the stored weight stays zero too and nothing in the optimizer can bring it back.  Masks
only ever grow (a pruned weight scores -inf when the next mask is chosen).

Cost of masking.  The pruned model still runs dense matmuls: no FLOPs are saved (the record says
``flops_saved: false``), and each masked Linear's forward builds ``mask * weight_orig``, a
weight-sized tensor autograd saves for the matmul's backward (with the float copy of the mask that
the multiplication saves): the saved-activation bytes grow by about two weights per masked Linear.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from torch.nn.utils import prune

from ..errors import ConfigError

#: module-name suffixes of the Linears that are pruned
TARGETS = ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")

#: techniques the masked pruning cannot run under: they replace or shard the Linear weights the
#: mask multiplies (DTensor shards, flat parameters, pipeline stages built from the meta model)
CONFLICTS = {
    "tp": "tensor parallelism shards the Linear weights into DTensors; the pruning mask is a plain tensor",
    "fsdp": "FSDP flattens and shards the parameters the pruning mask multiplies",
    "fairscale-fsdp": "FSDP flattens and shards the parameters the pruning mask multiplies",
    "zero": "DeepSpeed ZeRO owns and partitions the parameters and optimizer state the pruning updates",
    "pp": "pipeline stages are rebuilt from the meta model, without the pruning masks",
}


def check_fraction(name: str, key: str, value: float, low_open: bool = False) -> None:
    ok = (0 < value < 1) if low_open else (0 <= value < 1)
    if not ok:
        interval = "(0, 1)" if low_open else "[0, 1)"
        raise ConfigError(f"{name}:{key} must be in {interval}, got {value}")


def target_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, Linear) of the block Linears that are pruned, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.endswith(TARGETS)]


def reparametrize(module: nn.Linear) -> None:
    """``prune.identity`` (weight -> weight_orig + a mask of ones), with a bool mask."""
    prune.identity(module, "weight")
    module.weight_mask = torch.ones_like(module.weight_orig, dtype=torch.bool)
    with torch.no_grad():  # the attribute the hook refreshes every forward, consistent from the start
        module.weight = module.weight_orig * module.weight_mask


def effective_weight(module: nn.Linear) -> torch.Tensor:
    """The weight the next forward uses: what the prune hook computes, ``mask * weight_orig``."""
    return module.weight_mask.to(module.weight_orig.dtype) * module.weight_orig


def magnitude_mask(weight: torch.Tensor, mask: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-tensor magnitude pruning (Han et al. 2015; ``prune.L1Unstructured``'s rule): zero the
    ``round(sparsity · numel)`` smallest |w|, already-pruned entries first (they score -1), so the
    new mask contains the old one's zeros."""
    k = round(sparsity * weight.numel())  # prune._compute_nparams_toprune's rounding
    scores = weight.detach().abs().masked_fill(~mask, -1.0).flatten()
    new = torch.ones_like(scores, dtype=torch.bool)
    if k:
        new[torch.topk(scores, k, largest=False).indices] = False
    return new.view_as(mask)


def global_magnitude_masks(weights: list[torch.Tensor], masks: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Global magnitude pruning (``prune.global_unstructured`` with ``L1Unstructured``): the
    ``round(sparsity · Σ numel)`` smallest |w| over all the tensors together."""
    scores = torch.cat([w.detach().abs().masked_fill(~m, -1.0).flatten() for w, m in zip(weights, masks)])
    k = round(sparsity * scores.numel())
    new = torch.ones_like(scores, dtype=torch.bool)
    if k:
        new[torch.topk(scores, k, largest=False).indices] = False
    out, offset = [], 0
    for m in masks:
        out.append(new[offset:offset + m.numel()].view_as(m))
        offset += m.numel()
    return out


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M semi-structured mask (Mishra et al. 2021): in every group of ``m`` consecutive weights
    along the input dimension, the ``n`` smallest |w| are zeroed -- the mask
    ``torch.ao.pruning.WeightNormSparsifier(sparsity_level=1, sparse_block_shape=(1, m),
    zeros_per_block=n)`` computes (tested equal)."""
    out_f, in_f = weight.shape
    groups = weight.detach().abs().reshape(out_f, in_f // m, m)
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(-1, torch.topk(groups, n, dim=-1, largest=False).indices, False)
    return mask.reshape(out_f, in_f)


class OptimizerRef:
    """Holds the run's optimizer once the engine has built it: registered as an optimizer
    wrapper that returns the optimizer unchanged (the innermost, i.e. the one holding the state)."""

    def __init__(self, build):
        self.optimizer = None
        build.wrap_optimizer(self._remember)

    def _remember(self, optimizer, _build):
        self.optimizer = optimizer
        return optimizer

    def state_of(self, param: torch.Tensor) -> list[torch.Tensor]:
        """The optimizer-state tensors of ``param`` shaped like it (moments), none before the first step."""
        if self.optimizer is None:
            return []
        state = self.optimizer.state.get(param, {})
        return [v for v in state.values() if isinstance(v, torch.Tensor) and v.shape == param.shape]


@torch.no_grad()
def set_mask(module: nn.Linear, mask: torch.Tensor, optimizer: OptimizerRef | None) -> None:
    """Install ``mask`` (True = kept) and zero the pruned entries of the weight and of its
    optimizer state, so no update can move them (see the module docstring)."""
    module.weight_mask.copy_(mask)
    module.weight_orig.masked_fill_(~mask, 0.0)
    for tensor in optimizer.state_of(module.weight_orig) if optimizer else ():
        tensor.masked_fill_(~mask, 0.0)
    module.weight = effective_weight(module)


def layer_facts(layers: list[tuple[str, nn.Linear]]) -> dict:
    """Achieved sparsity per layer (the mask's zeros, and the exact zeros of the weight the
    forward uses) and overall."""
    per_layer, pruned, total = {}, 0, 0
    for name, module in layers:
        zeros = int((~module.weight_mask).sum())
        numel = module.weight_mask.numel()
        weight_zeros = int((effective_weight(module) == 0).sum())
        per_layer[name] = dict(sparsity=zeros / numel, weight_zero_fraction=weight_zeros / numel, numel=numel)
        pruned, total = pruned + zeros, total + numel
    return dict(per_layer=per_layer, overall_sparsity=pruned / total if total else 0.0, pruned_weights=pruned,
                prunable_weights=total)


def nonzero_params(model: nn.Module, layers: list[tuple[str, nn.Linear]]) -> int:
    """Nonzero entries of the model's distinct parameters, the masked weights as the forward sees them."""
    masked = {id(m.weight_orig): m for _, m in layers}
    seen, count = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        count += int(torch.count_nonzero(effective_weight(masked[id(p)]) if id(p) in masked else p))
    return count


def mask_bytes(layers: list[tuple[str, nn.Linear]]) -> int:
    return sum(m.weight_mask.numel() * m.weight_mask.element_size() for _, m in layers)


@dataclass
class Events:
    """Mask updates at given numbers of completed steps.  ``schedule(total_steps)`` maps a
    completed-step count to the update to run then.  Updates fire from two hooks: ``on_batch`` of
    step s (s steps done: the update before step 0 of ``at=0``) and ``after_step`` of step s
    (s + 1 done: every later update, including one after the last step); each fires once (an
    update re-run after a resume is idempotent: masks only grow and the same target gives the same
    mask)."""

    build: object
    schedule: Callable[[int], dict[int, object]]
    update: Callable[[int, object], None]
    needs_length: bool = True
    _events: dict | None = None
    fired: set = field(default_factory=set)

    def install(self):
        self.build.add_hook("on_batch", self._on_batch)
        self.build.add_hook("after_step", lambda step: self.fire(step + 1))

    def _on_batch(self, x, y, step):
        self.fire(step)
        return x, y

    def events(self) -> dict:
        if self._events is None:
            total = self.build.total_steps
            if total is None:
                if self.needs_length:
                    raise RuntimeError("this pruning schedule acts at fractions of training and needs the run's "
                                       "length (build.total_steps, set by train.measure_step); none is set")
                total = 1
            self._events = self.schedule(total)
        return self._events

    def fire(self, done: int) -> None:
        events = self.events()
        if done in events and done not in self.fired:
            self.fired.add(done)
            self.update(done, events[done])


def event_step(fraction: float, total_steps: int) -> int:
    """The completed-step count at ``fraction`` of training: 0 for 0, else in [1, total_steps]."""
    if fraction == 0:
        return 0
    return min(total_steps, max(1, round(fraction * total_steps)))


def check_divisible(cfg, m: int, name: str) -> None:
    """Every target Linear's input width must be a multiple of ``m`` (N:M groups along it)."""
    widths = {"attn.qkv/mlp.up (d_model)": cfg.d_model, "attn.proj (d_model)": cfg.d_model, "mlp.down (d_ff)": cfg.d_ff}
    bad = {k: v for k, v in widths.items() if v % m}
    if bad:
        raise ConfigError(f"{name}: input widths {bad} are not multiples of m={m}; N:M groups run along the input "
                          f"dimension")


__all__ = ["CONFLICTS", "Events", "OptimizerRef", "TARGETS", "check_fraction", "effective_weight", "event_step",
           "global_magnitude_masks", "layer_facts", "magnitude_mask", "mask_bytes", "nm_mask", "nonzero_params",
           "reparametrize", "set_mask", "target_linears"]
