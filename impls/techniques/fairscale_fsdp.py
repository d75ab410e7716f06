"""fairscale's FullyShardedDataParallel: ZeRO stage 3 (P_os+g+p) as fairscale implemented it
before PyTorch's FSDP — CUDA only.

Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models"
(SC20, arXiv 1910.02054), §5.3; fairscale documentation, "FullyShardedDataParallel"
(fairscale.readthedocs.io).  Each wrapped unit (every Transformer block, then the root) flattens
its parameters into one flat parameter, keeps a 1/N_d shard of it per rank (padded to a multiple of
N_d), all-gathers it for forward and backward and reduce-scatters the gradients.  Per-rank
model-state bytes, Ψ parameters, fp32 Adam (K = 8): (4 + 4 + 8)·Ψ/N_d (mixed precision:
(2 + 2 + K)·Ψ/N_d, K = 12).

Refused on a machine without CUDA, before any work: fairscale 0.4.13's FSDP needs a CUDA device.
In ``fairscale/nn/data_parallel/fully_sharded_data_parallel.py``, ``__init__`` sets
``compute_device = compute_device or _get_default_cuda_device(module)``, and
``_get_default_cuda_device`` falls back to ``torch.device("cuda")`` when the parameters are not on
CUDA; ``_setup_streams`` creates its ``fp32_to_fp16``, ``all_gather`` and ``post_backward``
streams only ``if torch.cuda.is_available()``, while ``_post_backward_hook`` uses
``self._streams["post_backward"]`` and ``torch.cuda.stream(...)`` unconditionally.  PyTorch's
FSDP2 (technique ``fsdp``) runs on CPUs.

On CUDA (untested on the development machine, which has no GPU): every block, then the root, is
wrapped in ``FullyShardedDataParallel`` over the ``dp`` process group; the engine trains the root
(``no_sync`` on all micro-batches but the last, the global gradient norm summed over the ranks'
flat gradient shards), and the state dicts are fairscale's *local* ones (this rank's flat shards:
what the engine saves per rank).  Known gap: the record's analytic model FLOPs read the
parameter count from the model, which after flattening is no longer the unsharded one.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from . import ddp

NAME = "fairscale-fsdp"
STAGE = "wrap"
OPTIONS = {}
REQUIRES = ("fairscale",)
CONFLICTS = {"ddp": "both wrap the model for data parallelism (FSDP reduce-scatters the gradients itself)",
             "fsdp": "two fully sharded wrappers of the same model",
             "oss": "FSDP already shards the optimizer state and gradients",
             "zero-redundancy": "FSDP already shards the optimizer state"}
WHY_CUDA = ("fairscale 0.4.13's FullyShardedDataParallel needs CUDA (its compute device defaults to "
            "torch.device('cuda') and its post-backward hook runs on CUDA streams it creates only when CUDA is "
            "available: fairscale/nn/data_parallel/fully_sharded_data_parallel.py, _get_default_cuda_device and "
            "_post_backward_hook); use technique 'fsdp' (PyTorch FSDP2) on CPUs")


def configure(plan, options):
    if plan.device_type != "cuda":
        raise ConfigError(f"technique {NAME!r} cannot run on device {plan.device_type or 'cpu'!r}: {WHY_CUDA}")
    plan.sharding_stage = 3


def check_mesh(dims, options):
    if dims.dp == 1:
        raise ConfigError(f"technique {NAME!r} needs a data-parallel size > 1 (this run has dp=1: nothing to shard "
                          f"over); launch several ranks with --nproc N or torchrun")


def apply(build, options):
    from fairscale.nn.data_parallel import FullyShardedDataParallel as FSDP

    if build.device.type != "cuda":  # configure refuses this before any work; never run a CPU path
        raise ConfigError(f"technique {NAME!r} cannot run on device {build.device.type!r}: {WHY_CUDA}")
    group = build.dims.group("dp", build.device.type)
    roots = []
    for part in build.model_parts:
        for i, block in enumerate(part.blocks):
            part.blocks[i] = FSDP(block, process_group=group, compute_device=build.device)
        roots.append(FSDP(part, process_group=group, compute_device=build.device))
    for root in roots:
        for module in root.modules():
            if isinstance(module, FSDP):
                # What FSDP.local_state_dict() sets for the duration of one call: state_dict() returns
                # this rank's flat shards (the live storages), so the engine saves and restores them.
                module._return_full_state_dict = False
    build.model_parts = build.train_parts = roots
    build.no_sync = lambda: ddp.no_sync_all(roots)
    build.grad_shard_group = group
    build.notes[NAME] = dict(dp=build.dims.dp, units=sum(1 for r in roots for m in r.modules() if isinstance(m, FSDP)),
                             backend=torch.distributed.get_backend(group),
                             validated="this CUDA path was written on a machine without a GPU and is untested")
