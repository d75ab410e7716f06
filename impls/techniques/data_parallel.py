"""Single-process multi-GPU data parallelism: ``torch.nn.DataParallel`` — the seeds' example, kept
to compare with DDP.

Each forward scatters the micro-batch along dim 0 over the visible GPUs, replicates the module
onto every GPU (a broadcast of all Ψ parameters per forward), runs the replicas in Python threads
and gathers the outputs on the first GPU; autograd sums the replicas' gradients back onto it.  One
process drives every GPU, so the GIL, the per-step replication and the imbalance on GPU 0 (which
gathers outputs and holds the only optimizer) make it slower than DDP, which PyTorch recommends
instead (Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel
Training", VLDB, arXiv 2006.15704, §2–3; PyTorch documentation of ``torch.nn.DataParallel``).
Per-GPU model-state bytes are those of the replicated model: 4Ψ + 4Ψ + 8Ψ (fp32 Adam) on GPU 0,
parameters only (4Ψ, transiently) on the others.

Refused before any work unless the run is one process on CUDA with at least two GPUs: on a CPU
there is nothing to scatter over (``DataParallel`` returns the module unchanged when no CUDA
device is available), and with several ranks each process already owns its device (use ``ddp``).
Loss-term techniques (moe, mod, mode) are refused with it: their terms read state the module
keeps from its forward, which ``DataParallel`` writes on the replicas and then discards.

On CUDA (untested on the development machine, which has no GPU): the model part is wrapped in
``torch.nn.DataParallel`` over every visible GPU, the run's device first.
"""
from __future__ import annotations

import torch

from .. import dist
from ..errors import ConfigError

NAME = "data-parallel"
STAGE = "wrap"
OPTIONS = {}
_STATEFUL = "its loss term reads state the module keeps from its forward; DataParallel's replicas discard it"
CONFLICTS = {"ddp": "DataParallel is single-process; DDP is its multi-process replacement",
             "fsdp": "both wrap the model for data parallelism", "oss": "both wrap the model for data parallelism",
             "zero-redundancy": "optimizer sharding needs several ranks; DataParallel is one process",
             "moe": _STATEFUL, "mod": _STATEFUL, "mode": _STATEFUL}


def configure(plan, options):
    if plan.device_type != "cuda":
        raise ConfigError(f"technique {NAME!r} cannot run on device {plan.device_type or 'cpu'!r}: torch.nn."
                          f"DataParallel splits a batch over >= 2 CUDA GPUs in one process (this machine has "
                          f"{dist.cuda_device_count()}); use 'ddp' with --nproc N on CPUs")
    if dist.cuda_device_count() < 2:
        raise ConfigError(f"technique {NAME!r} needs >= 2 CUDA GPUs in one process; this machine has "
                          f"{dist.cuda_device_count()}")


def check_mesh(dims, options):
    if dims.world_size != 1:
        raise ConfigError(f"technique {NAME!r} is single-process (one process drives every GPU), this run has "
                          f"{dims.world_size} ranks; use 'ddp' for multi-process data parallelism")


def apply(build, options):
    first = build.device.index or 0
    ids = [first] + [i for i in range(torch.cuda.device_count()) if i != first]
    build.train_parts = [torch.nn.DataParallel(part, device_ids=ids, output_device=first)
                         for part in build.model_parts]
    build.notes[NAME] = dict(gpus=len(ids), device_ids=ids,
                             validated="this CUDA path was written on a machine without a GPU and is untested")
