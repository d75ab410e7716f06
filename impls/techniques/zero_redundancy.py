"""Optimizer-state sharding (ZeRO stage 1, P_os): each ``dp`` rank keeps the optimizer state of
its partition of the parameters only, updates those parameters, and broadcasts them to the other
ranks after the step; gradients are still all-reduced in full by DDP.

Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models"
(SC20, arXiv 1910.02054), §5.1.  Per-rank model-state bytes, Ψ parameters, fp32 Adam (K = 8):

    4Ψ + 4Ψ + 8Ψ / N_d      (the paper's mixed precision: 2Ψ + 2Ψ + KΨ/N_d, K = 12)

``torch.distributed.optim.ZeroRedundancyOptimizer`` assigns *whole* parameters to ranks (per
parameter group, largest first, each to the rank with the fewest elements so far), so a rank's
share is ≈ 1/N_d, not exactly: the record's notes give each rank's elements and the imbalance
max/mean.  Adam's ``step`` counter (4 B per tensor) lives with its parameter's owner.  The
update is the wrapped optimizer's own, so losses equal DDP's.  Works with the default ``ddp``
wrap (its ``no_sync`` under accumulation).  Library: ``torch.distributed.optim.
ZeroRedundancyOptimizer`` over the mesh's ``dp`` process group, wrapping the recipe's optimizer
class with the recipe's parameter groups and hyper-parameters.
"""
from __future__ import annotations

import inspect

import torch

from ..errors import ConfigError

NAME = "zero-redundancy"
STAGE = "optimizer"
OPTIONS = {}
CONFLICTS = {"oss": "both shard the optimizer state (one sharded optimizer wraps the recipe's)"}


def configure(plan, options):
    plan.sharding_stage = 1


def check_mesh(dims, options):
    if dims.dp == 1:
        raise ConfigError(f"technique {NAME!r} needs a data-parallel size > 1 (this run has dp=1: nothing to shard "
                          f"over); launch several ranks with --nproc N or torchrun")


def constructor_arguments(optimizer: torch.optim.Optimizer) -> tuple[list[dict], dict]:
    """The parameter groups (params and their own settings) and the constructor keyword arguments
    that rebuild ``optimizer``'s class with the same hyper-parameters.  ``defaults`` may hold keys
    the constructor does not take (AdamW's ``decoupled_weight_decay``): those are left out."""
    accepted = inspect.signature(type(optimizer).__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    groups = [{k: v for k, v in group.items() if k == "params" or k in accepted} for group in optimizer.param_groups]
    return groups, defaults


def share(parts: list[list], world: int) -> dict:
    """Each rank's elements (``parts[r]``: the parameters rank r owns) and max/mean imbalance."""
    elements = [sum(p.numel() for p in part) for part in parts]
    mean = sum(elements) / world
    return dict(elements_per_rank=elements, imbalance=round(max(elements) / mean, 4) if mean else 1.0)


def apply(build, options):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    group = build.dims.group("dp", build.device.type)

    def wrap(optimizer, build):
        groups, defaults = constructor_arguments(optimizer)
        sharded = ZeroRedundancyOptimizer(groups, optimizer_class=type(optimizer), process_group=group, **defaults)
        build.local_optimizer = sharded.optim
        owned = [[p for g in sharded._partition_parameters()[rank] for p in g["params"]]
                 for rank in range(build.dims.dp)]
        build.notes[NAME].update(optimizer_class=type(optimizer).__name__, **share(owned, build.dims.dp))
        return sharded

    build.wrap_optimizer(wrap)
    build.notes[NAME] = dict(dp=build.dims.dp, partition="whole parameters, greedy by size per parameter group")
