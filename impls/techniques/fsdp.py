"""Fully sharded data parallel (FSDP2): parameters, gradients and optimizer state are each split
across the ``dp`` ranks, and a layer's full parameters exist only while it computes.

Zhao et al. 2023, "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel" (VLDB,
arXiv 2304.11277), the ZeRO-3 scheme of Rajbhandari et al. 2020 ("ZeRO: Memory Optimizations
Toward Training Trillion Parameter Models", SC20, arXiv 1910.02054, §5.3, P_os+g+p).  Each
``fully_shard`` unit (one per Transformer block, then the root with the embedding, final norm and
LM head, torchtitan's wrapping) all-gathers its parameters before its forward and again before its
backward (after freeing them when ``reshard_after_forward=true``), and reduce-scatters its
gradients after its backward, so each rank keeps a 1/N_d shard.  Per-rank model-state bytes, Ψ
parameters, fp32 Adam (K = 8 bytes of moments per parameter):

    (4 + 4 + 8)·Ψ / N_d      (the paper's mixed-precision form: (2 + 2 + K)·Ψ / N_d, K = 12)

exactly, FSDP2 shards every parameter on dim 0 into ⌈d₀/N_d⌉ rows per rank (the last ranks'
shards padded with zeros), so a rank's parameter and gradient storages hold
Σ_p ⌈d₀,p/N_d⌉·(numel_p/d₀,p) elements, and the optimizer's moments the unpadded local rows
(``zeros_like`` of the local tensor); Adam's ``step`` counter (4 B per tensor) is on every rank.

Options: ``reshard_after_forward`` (free the gathered parameters after forward and gather again
for backward: the paper's memory/communication trade-off, §3.2.2: 3Ψ communicated per step when
true, 2Ψ when false), ``offload=cpu`` (``CPUOffloadPolicy``: sharded parameters, gradients and the
optimizer step live in host memory; on a CPU device they are already there, so nothing moves —
the record says so), ``mp=bf16`` (``MixedPrecisionPolicy``: gathered parameters and the forward
and backward in bf16, gradients reduce-scattered in fp32, sharded parameters and optimizer state
stay fp32).  Under gradient accumulation the engine runs every micro-batch but the last with
``set_requires_gradient_sync(False)``: gradients accumulate unsharded and are reduce-scattered
once per step.

Initialisation: the model is materialised, seeded, before this wrap stage (no ``DEFERS_INIT``):
every rank builds the same full weights and ``fully_shard`` keeps its rows, so a seed gives DDP's
initial weights exactly.  torchtitan's flow (shard on ``meta``, then initialise the DTensors)
avoids the transient full copy per rank, but random initialisation of a DTensor draws from
DTensor's RNG tracker, not the stream an unsharded model consumes, so the same seed would give
other weights than the unsharded run this suite compares against.  Library:
``torch.distributed.fsdp.fully_shard`` over the mesh's ``dp`` dimension.
"""
from __future__ import annotations

import contextlib

import torch

from ..errors import ConfigError

NAME = "fsdp"
STAGE = "wrap"
OPTIONS = {"reshard_after_forward": True, "offload": "none", "mp": "none"}
CHOICES = {"offload": ("none", "cpu"), "mp": ("none", "bf16")}
CONFLICTS = {"ddp": "both wrap the model for data parallelism (FSDP reduce-scatters the gradients itself)",
             "zero-redundancy": "FSDP already shards the optimizer state (with the parameters it owns)",
             "oss": "FSDP already shards the optimizer state and gradients"}


def configure(plan, options):
    plan.sharding_stage = 3
    # Per step: all-gather in forward (and again in backward unless the gathered parameters are
    # kept), reduce-scatter of the gradients -- 3Ψ, or 2Ψ without resharding after forward; the
    # all-gathers move param_dtype (bf16 under mp=bf16), the reduce-scatter reduce_dtype (fp32).
    if not options["reshard_after_forward"]:
        plan.comm_stage = 2
    if options["mp"] == "bf16":
        plan.comm_param_bytes = 2.0


def check_mesh(dims, options):
    if dims.dp == 1:
        raise ConfigError("technique 'fsdp' needs a data-parallel size > 1 (this run has dp=1: nothing to shard "
                          "over); launch several ranks with --nproc N or torchrun")


@contextlib.contextmanager
def no_gradient_sync(roots):
    """Backward accumulates unsharded gradients locally, with no reduce-scatter."""
    for root in roots:
        root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for root in roots:
            root.set_requires_gradient_sync(True)


def apply(build, options):
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    device = build.device
    mesh = build.dims.mesh(device.type)["dp"]
    kwargs = dict(mesh=mesh, reshard_after_forward=options["reshard_after_forward"])
    if options["mp"] == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # Pinned host memory needs an accelerator: on a CPU-only machine it is ordinary memory.
    kwargs["offload_policy"] = (CPUOffloadPolicy(pin_memory=device.type != "cpu") if options["offload"] == "cpu"
                                else OffloadPolicy())
    units = 0
    for part in build.model_parts:
        for block in part.blocks:
            fully_shard(block, **kwargs)
            units += 1
        fully_shard(part, **kwargs)
        units += 1
    roots = list(build.model_parts)
    build.train_parts = roots  # FSDP2 shards in place: the model parts are what training calls
    build.no_sync = lambda: no_gradient_sync(roots)
    build.grad_shard_group = mesh.get_group()
    notes = dict(dp=build.dims.dp, units=units, reshard_after_forward=options["reshard_after_forward"],
                 offload=options["offload"], mp=options["mp"], backend=torch.distributed.get_backend(mesh.get_group()),
                 padded_elements=_padding(build.model_parts, build.dims.dp))
    if options["mp"] == "bf16":
        notes["mp_policy"] = "param_dtype=bf16 (gathered params, compute), reduce_dtype=fp32, sharded params fp32"
    if options["offload"] == "cpu" and device.type == "cpu":
        notes["offload_meaning"] = ("device is the CPU: the sharded parameters, gradients and optimizer state already "
                                    "live in host memory, so CPUOffloadPolicy moves nothing off a device here "
                                    "(pin_memory off: no accelerator to pin for)")
    build.notes[NAME] = notes


def _padding(parts, n: int) -> int:
    """Zero elements FSDP2 pads onto dim 0 so every rank's shard has ⌈d₀/N⌉ rows, summed over all
    ranks: (N·⌈d₀/N⌉ − d₀)·numel/d₀ per parameter."""
    seen, padded = set(), 0
    for part in parts:
        for p in part.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            d0 = p.shape[0]
            padded += (n * -(-d0 // n) - d0) * (p.numel() // d0 if d0 else 0)
    return padded
