"""fairscale's optimizer-state sharding (OSS) and, by default, its ShardedDataParallel: ZeRO
stage 1 (P_os) or stage 2 (P_os+g) over the ``dp`` ranks.

fairscale documentation, "OSS" and "ShardedDataParallel" (fairscale.readthedocs.io, "Optimizer
State Sharding"), implementing Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward
Training Trillion Parameter Models" (SC20, arXiv 1910.02054), §5.1–5.2.  ``OSS`` assigns whole
parameters to ranks (each to the rank with the fewest elements so far, in parameter-group order),
builds the recipe's optimizer over this rank's share only, and after the step broadcasts every
rank's updated parameters from their owner.  With ``sharded_ddp=true`` (stage 2),
``ShardedDataParallel`` replaces DDP: each gradient is *reduced* (not all-reduced) to the rank
that owns its parameter, and freed on the others.  Per-rank model-state bytes, Ψ parameters, fp32
Adam (K = 8):

    stage 1 (sharded_ddp=false, DDP all-reduce):  4Ψ + 4Ψ + 8Ψ/N_d
    stage 2 (sharded_ddp=true):                    4Ψ + (4 + 8)Ψ/N_d
    (the paper's mixed precision: 2Ψ + 2Ψ + KΨ/N_d and 2Ψ + (2 + K)Ψ/N_d, K = 12)

≈ 1/N_d since whole parameters are assigned: the notes give each rank's elements and the
imbalance max/mean.  ShardedDDP runs with ``reduce_buffer_size=0`` (no buckets): its buckets
keep one gradient buffer per destination rank on *every* rank, so gradients would not be sharded;
each gradient is reduced on its own and freed by the non-owners.  Its ``no_sync`` keeps the
gradients local on all but the last micro-batch.  Because ShardedDDP needs the OSS optimizer,
which exists only once the engine builds the recipe's optimizer, the model is wrapped by the
optimizer wrapper this technique registers.  The update is the wrapped optimizer's own, so losses
equal DDP's.  Library: ``fairscale.optim.OSS``, ``fairscale.nn.data_parallel.ShardedDataParallel``
(or ``torch.nn.parallel.DistributedDataParallel``) over the mesh's ``dp`` process group.
"""
from __future__ import annotations

from ..errors import ConfigError
from . import ddp
from .zero_redundancy import constructor_arguments, share

NAME = "oss"
STAGE = "wrap"  # it replaces DDP (ShardedDataParallel), or wraps DDP itself with sharded_ddp=false
OPTIONS = {"sharded_ddp": True}
REQUIRES = ("fairscale",)
CONFLICTS = {"ddp": "both wrap the model for data parallelism (oss wraps it in ShardedDataParallel, or in DDP "
                    "itself with sharded_ddp=false)",
             "zero-redundancy": "both shard the optimizer state (one sharded optimizer wraps the recipe's)"}


def configure(plan, options):
    plan.sharding_stage = 2 if options["sharded_ddp"] else 1


def check_mesh(dims, options):
    if dims.dp == 1:
        raise ConfigError("technique 'oss' needs a data-parallel size > 1 (this run has dp=1: nothing to shard "
                          "over); launch several ranks with --nproc N or torchrun")


def apply(build, options):
    import torch
    from fairscale.nn.data_parallel import ShardedDataParallel
    from fairscale.optim import OSS

    group = build.dims.group("dp", build.device.type)
    sharded_ddp = options["sharded_ddp"]
    if not sharded_ddp:
        ddp.apply(build, dict(ddp.OPTIONS))

    def wrap(optimizer, build):
        groups, defaults = constructor_arguments(optimizer)
        sharded = OSS(groups, optim=type(optimizer), group=group, **defaults)
        build.local_optimizer = sharded.optim
        owned = [[p for g in part for p in g["params"]] for part in sharded.partition_parameters()]
        build.notes[NAME].update(optimizer_class=type(optimizer).__name__, **share(owned, build.dims.dp))
        if sharded_ddp:
            build.train_parts = [ShardedDataParallel(part, sharded, process_group=group, reduce_buffer_size=0)
                                 for part in build.model_parts]
            wrappers = list(build.train_parts)
            build.no_sync = lambda: ddp.no_sync_all(wrappers)
            build.grad_shard_group = group  # a rank keeps the gradients of the parameters it owns
        return sharded

    build.wrap_optimizer(wrap)
    build.notes[NAME] = dict(dp=build.dims.dp, sharded_ddp=sharded_ddp, stage=2 if sharded_ddp else 1,
                             reduce_buffer_size=0 if sharded_ddp else None, backend=torch.distributed.get_backend(group),
                             partition="whole parameters, greedy by size in parameter-group order")
