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
"""
from __future__ import annotations

import contextlib

from ..errors import ConfigError

NAME = "ddp"
STAGE = "wrap"
OPTIONS = {"bucket_mb": 25.0}  # torch's default bucket_cap_mb


def configure(plan, options):
    if not options["bucket_mb"] > 0:
        raise ConfigError(f"ddp:bucket_mb must be > 0, got {options['bucket_mb']}")


def check_mesh(dims, options):
    if dims.dp == 1:
        raise ConfigError("technique 'ddp' needs a data-parallel size > 1 (this run has dp=1); launch several "
                          "ranks with --nproc N or torchrun")


def apply(build, options):
    import torch

    device = build.device
    group = build.dims.group("dp", device.type)
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
