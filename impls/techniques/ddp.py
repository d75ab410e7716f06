"""Distributed data parallel: every rank holds the whole model, trains on its shard of the global
batch, and gradients are averaged across the ``dp`` mesh dimension before the update.

PyTorch DDP (Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel
Training", VLDB, arXiv 2006.15704): gradients are grouped into buckets of about ``bucket_mb``
MiB in reverse registration order (roughly the order backward produces them), and each bucket's
all-reduce (a ring all-reduce on NCCL, Patarasuk & Yuan 2009; gloo on CPUs) starts as soon as all
its gradients are ready, overlapping communication with the rest of the backward (§3.2.3).
Larger buckets mean fewer, more efficient collectives but less overlap.  Under gradient
accumulation the engine runs every micro-batch but the last inside ``no_sync()``, so one
all-reduce per optimizer step (§3.2.4).

The engine divides the loss by the *global* target-token count times the ``dp`` size, which DDP's
averaging divides by again: the gradient equals that of one process on the concatenated batch.
This is the default wrap technique whenever the data-parallel size is > 1.  Library:
``torch.nn.parallel.DistributedDataParallel`` over the mesh's ``dp`` process group.

``impl``: ``reducer`` (default) is ``DistributedDataParallel``; ``replicate`` is torch's
composable ``replicate`` (:func:`_apply_replicate`: the same semantics -- whole parameters on
every rank, gradients all-reduced over ``dp`` -- with one all-reduce per Transformer block and one
for the root instead of one per bucket).  The same gradient bytes are reduced either way; only the
call count differs.  ``replicate`` is what runs on fake tensors (``etbench dryrun``: the reducer's
C++ buckets need real storage) and what DTensor parameters (DP×TP) always use.
"""
from __future__ import annotations

import contextlib

from ..errors import ConfigError

NAME = "ddp"
STAGE = "wrap"
OPTIONS = {"bucket_mb": 25.0, "impl": "reducer"}  # torch's default bucket_cap_mb
CHOICES = {"impl": ("reducer", "replicate")}


def configure(plan, options):
    if not options["bucket_mb"] > 0:
        raise ConfigError(f"ddp:bucket_mb must be > 0, got {options['bucket_mb']}")


def check_mesh(dims, options):
    if dims.dp == 1:
        raise ConfigError("technique 'ddp' needs a data-parallel size > 1 (this run has dp=1); launch several "
                          "ranks with --nproc N or torchrun")


def apply(build, options):
    import torch
    from torch.distributed.tensor import DTensor

    device = build.device
    group = build.dims.group("dp", device.type)
    if options["impl"] == "replicate" or any(isinstance(p, DTensor) for part in build.model_parts
                                              for p in part.parameters()):
        return _apply_replicate(build, options, group)
    build.train_parts = [
        torch.nn.parallel.DistributedDataParallel(
            part, process_group=group, bucket_cap_mb=options["bucket_mb"],
            device_ids=[device.index] if device.type == "cuda" else None)
        for part in build.model_parts]
    build.no_sync = lambda: no_sync_all(build.train_parts)
    build.notes[NAME] = dict(bucket_mb=options["bucket_mb"], dp=build.dims.dp,
                             backend=torch.distributed.get_backend(group))


def no_sync_all(wrappers) -> contextlib.ExitStack:
    """Every DDP wrapper's ``no_sync()`` at once (one per model part)."""
    stack = contextlib.ExitStack()
    for wrapper in wrappers:
        stack.enter_context(wrapper.no_sync())
    return stack


def _apply_replicate(build, options, group):
    """DP over tensor-parallel DTensor parameters (2-D DP×TP).  ``DistributedDataParallel``'s
    C++ reducer takes plain tensors, so here the data-parallel replication is torch's composable
    ``replicate`` (``torch.distributed._composable.replicate_with_fsdp``: DDP semantics -- every
    rank keeps whole (tp-local) parameters, gradients are all-reduced over ``dp`` after each
    block's backward -- built on FSDP2's machinery, which accepts DTensors on a sub-mesh).  Applied
    per block, then the root, like FSDP2, so each block's all-reduce overlaps the rest of the
    backward; ``bucket_mb`` does not apply (a block is a bucket)."""
    import torch
    from torch.distributed._composable.replicate_with_fsdp import replicate

    from .fsdp import no_gradient_sync

    mesh = build.dims.mesh(build.device.type)["dp"]
    for part in build.model_parts:
        for block in part.blocks:
            replicate(block, mesh=mesh)
        replicate(part, mesh=mesh)
    roots = list(build.model_parts)
    build.train_parts = roots
    build.no_sync = lambda: no_gradient_sync(roots)
    build.notes[NAME] = dict(dp=build.dims.dp, backend=torch.distributed.get_backend(group),
                             implementation="torch.distributed._composable.replicate_with_fsdp (DTensor parameters: "
                                            "DistributedDataParallel takes plain tensors)", buckets="one per block")
