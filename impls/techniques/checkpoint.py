"""Activation checkpointing: keep a block's input, drop what its forward saved, recompute it in
the backward pass.

Checkpointing every block trades one extra forward of the blocks for keeping only their inputs
(Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost", arXiv 1604.06174);
checkpointing every k-th block sits in between.  ``policy=selective`` recomputes only the
attention core softmax(QKᵀ/√Q)V, whose saved tensors grow with T² in a math kernel while its
FLOPs are a small part of the block's (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", arXiv 2205.05198, §4.2 selective recomputation).

Options:

* ``every=k``: checkpoint blocks 0, k, 2k, …;
* ``policy=full|selective``: the whole block, or only its ``attn.attend`` function;
* ``impl=torch|fairscale``: ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``, or
  fairscale's ``fairscale.nn.checkpoint.checkpoint_wrapper`` (a reentrant autograd Function).

Both libraries wrap the block's *forward* in place, so module names, ``state_dict`` keys and the
optimizer's parameters are those of the plain model (checkpoint/resume is unaffected).

What to expect from the measurements (``fp32``, no dropout):

* saved activations: a fully checkpointed block keeps only its input, B·T·C·4 bytes; the
  non-block parts (embedding indices, final norm, LM head, loss) keep theirs.  Selective keeps
  q, k, v (the checkpoint's inputs) and the attention output (the projection's input) and drops
  what the core saves beyond them: the B·H·T·T probabilities of a math kernel, but only the
  B·H·T logsumexp of torch's flash SDPA kernel, which never stores the T×T matrix;
* counted FLOPs: + one forward of each checkpointed block *except its last matmul*: torch's
  non-reentrant checkpoint stops recomputing as soon as the last tensor backward needs is back
  ("early stop"), and the MLP's down projection only *saves* its input, so it is never re-run
  (for a math attention core, likewise only QKᵀ is re-run).  fairscale's reentrant wrapper
  re-runs the whole forward.  Model FLOPs (6N + 12LHQT) ignore recomputation and do not change.

fairscale 0.4.13 on torch 2.13: the wrapper works in fp32 (same loss and gradients), but its
recomputation restores only CUDA fp16 autocast: it reads ``torch.is_autocast_enabled()``, which
without a device argument reports CUDA's state, and re-enters ``torch.cuda.amp.autocast(True)``,
whose dtype defaults to fp16.  Under CPU autocast the backward recomputes in fp32 (measured: bf16
gradients drift by ~7e-4 while torch's checkpoint is exact), and under CUDA bf16 it would
recompute in fp16, so every autocast but CUDA fp16 is refused with a
:class:`~impls.errors.ConfigError`.  It wraps ``nn.Module`` s only, so it has no selective policy.
"""
from __future__ import annotations

import functools
import types

import torch
import torch.utils.checkpoint

from ..errors import ConfigError

NAME = "checkpoint"
ORDER = "checkpoint"
OPTIONS = {"every": 1, "policy": "full", "impl": "torch"}
CHOICES = {"policy": ("full", "selective"), "impl": ("torch", "fairscale")}


def configure(plan, options):
    if options["every"] < 1:
        raise ConfigError(f"checkpoint:every must be >= 1, got {options['every']}")
    if options["impl"] == "fairscale" and options["policy"] == "selective":
        raise ConfigError("checkpoint:impl=fairscale has no selective policy: fairscale's checkpoint_wrapper "
                          "wraps nn.Modules and the attention core is a function; use impl=torch")


def _checkpointed_forward(self, *args, **kwargs):
    """``Block.forward`` under non-reentrant checkpointing (bound to the block: a deepcopy of the
    model re-binds it to the copy)."""
    if not torch.is_grad_enabled():  # evaluation: nothing is saved anyway
        return self._unwrapped_forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(self._unwrapped_forward, *args, use_reentrant=False, **kwargs)


def _checkpointed_attend(attend, *args, **kwargs):
    if not torch.is_grad_enabled():
        return attend(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(attend, *args, use_reentrant=False, **kwargs)


def checkpointed_blocks(n_layer: int, every: int) -> list[int]:
    return list(range(0, n_layer, every))


def _wrap_block_torch(block: torch.nn.Module) -> None:
    # The forward in force now (a surgery technique may have replaced it), as a bound method.
    block._unwrapped_forward = block.__dict__.get("forward") or types.MethodType(type(block).forward, block)
    block.forward = types.MethodType(_checkpointed_forward, block)


def _wrap_block_fairscale(block: torch.nn.Module) -> None:
    from fairscale.nn.checkpoint import checkpoint_wrapper

    if "forward" in block.__dict__:  # fairscale calls type(block).forward: it would drop the surgery
        raise ConfigError("checkpoint:impl=fairscale cannot wrap a block whose forward another technique "
                          "replaced; use impl=torch")
    checkpoint_wrapper(block)  # patches block.forward in place, returns the same module


def apply(model, options, plan):
    every, policy, impl = options["every"], options["policy"], options["impl"]
    if impl == "fairscale" and plan.autocast_dtype is not None:
        device = next(model.parameters()).device
        if device.type != "cuda" or plan.autocast_dtype != torch.float16:
            raise ConfigError(f"checkpoint:impl=fairscale cannot run under {device.type} {plan.precision}: "
                              f"fairscale's recomputation restores CUDA fp16 autocast only, so its backward "
                              f"would recompute in another precision than the forward; use impl=torch")
    indices = checkpointed_blocks(len(model.blocks), every)
    for i in indices:
        block = model.blocks[i]
        if policy == "selective":
            block.attn.attend = functools.partial(_checkpointed_attend, block.attn.attend)
        elif impl == "torch":
            _wrap_block_torch(block)
        else:
            _wrap_block_fairscale(block)
    plan.notes["checkpoint"] = dict(blocks=indices, policy=policy, impl=impl)
    return model
