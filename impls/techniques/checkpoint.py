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

``impl=torch`` registers torch's composable activation checkpointing on each block
(``torch.distributed._composable.checkpoint``, the hook-based form FSDP2 composes with): forward
pre- and post-hooks run the block's forward under non-reentrant checkpointing, whatever surgery
made of the block (a MoD-routed block is checkpointed with its router).  No wrapper module, so
parameter names, ``state_dict`` keys and the optimizer's parameters are those of the plain model
(checkpoint/resume is unaffected).  fairscale's ``checkpoint_wrapper`` is the library's own
mechanism: it rebinds the block's ``forward`` to a checkpointed call of ``type(block).forward``
inside fairscale (so it works on any block class, routed ones included).

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

import torch
import torch.utils.checkpoint

from ..errors import ConfigError
from ..zoo.model import Attention

NAME = "checkpoint"
STAGE = "checkpoint"
OPTIONS = {"every": 1, "policy": "full", "impl": "torch"}
CHOICES = {"policy": ("full", "selective"), "impl": ("torch", "fairscale")}
REQUIRES = lambda options: ("fairscale",) if options["impl"] == "fairscale" else ()  # noqa: E731


def configure(plan, options):
    if options["every"] < 1:
        raise ConfigError(f"checkpoint:every must be >= 1, got {options['every']}")
    if options["impl"] == "fairscale" and options["policy"] == "selective":
        raise ConfigError("checkpoint:impl=fairscale has no selective policy: fairscale's checkpoint_wrapper "
                          "wraps nn.Modules and the attention core is a function; use impl=torch")
    if options["impl"] == "fairscale" and plan.device_type is not None:  # precision configured it already
        _check_fairscale_autocast(plan.device_type, plan)


def _check_fairscale_autocast(device_type: str, plan) -> None:
    if plan.autocast_dtype is not None and (device_type != "cuda" or plan.autocast_dtype != torch.float16):
        raise ConfigError(f"checkpoint:impl=fairscale cannot run under {device_type} {plan.precision}: "
                          f"fairscale's recomputation restores CUDA fp16 autocast only, so its backward "
                          f"would recompute in another precision than the forward; use impl=torch")


def _checkpoint(fn, *args, **kwargs):
    """Non-reentrant checkpoint of ``fn`` while gradients are recorded; a plain call otherwise
    (evaluation saves nothing, so there is nothing to drop)."""
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)


def checkpointed_blocks(n_layer: int, every: int) -> list[int]:
    return list(range(0, n_layer, every))


def _wrap_block_torch(block: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed._composable import checkpoint as composable_checkpoint

    composable_checkpoint(block)  # hooks on the block; it is still the same module
    return block


def _wrap_block_fairscale(block: torch.nn.Module) -> torch.nn.Module:
    from fairscale.nn.checkpoint import checkpoint_wrapper

    return checkpoint_wrapper(block)  # fairscale checkpoints the module in place and returns it


def apply(build, options):
    every, policy, impl = options["every"], options["policy"], options["impl"]
    plan = build.plan
    if impl == "fairscale":
        _check_fairscale_autocast(build.device.type, plan)
    for model in build.model_parts:
        indices = checkpointed_blocks(len(model.blocks), every)
        for i in indices:
            if policy == "selective":
                for attn in model.blocks[i].modules():  # through any wrapper surgery put around it
                    if isinstance(attn, Attention):
                        attn.attend = functools.partial(_checkpoint, attn.attend)
            elif impl == "torch":
                model.blocks[i] = _wrap_block_torch(model.blocks[i])
            else:
                model.blocks[i] = _wrap_block_fairscale(model.blocks[i])
        build.notes["checkpoint"] = dict(blocks=indices, policy=policy, impl=impl)
