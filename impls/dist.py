"""Rank, world size and device from the ``torchrun`` environment.

Every run goes through this, so a single process and ``torchrun --nproc_per_node N`` share one
code path: gloo on CPUs, NCCL on GPUs, one GPU per local rank.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_mean(self, value: float) -> float:
        """Mean of a scalar over ranks (identity on one rank)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world_size

    def all_max(self, values: list[float]) -> list[float]:
        """Element-wise maximum of equally long lists over ranks (identity on one rank)."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def all_sum_int(self, value: int) -> int:
        """Exact sum of an integer over ranks (identity on one rank)."""
        if self.world_size == 1:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        dist.all_reduce(t)
        return int(t.item())

    def all_gather_object(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order (``[obj]`` on one rank)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()


def resolve_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    if preference not in DEVICES:
        raise ConfigError(f"unknown device {preference!r}; valid: {', '.join(DEVICES)}")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but torch.cuda.is_available() is False; valid here: auto, cpu")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


#: Seconds a collective waits for the other ranks before it fails (a rank died, say); the
#: launcher (:mod:`impls.ranks`) usually stops the survivors first.
TIMEOUT_ENV = "ETBENCH_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
#: The longest timeout accepted (30 days): beyond it a hung peer would hold a run for ever, and
#: torch's timedelta overflows.
MAX_TIMEOUT_S = 30 * 86400.0


def timeout() -> timedelta:
    """The process group's collective timeout: ``ETBENCH_DIST_TIMEOUT`` seconds, default 600
    (torch's own default is 30 minutes for gloo)."""
    text = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV} must be a number of seconds, got {text!r}") from None
    if not seconds > 0:
        raise ConfigError(f"{TIMEOUT_ENV} must be > 0 seconds, got {text!r}")
    if not seconds <= MAX_TIMEOUT_S:
        raise ConfigError(f"{TIMEOUT_ENV} must be at most {MAX_TIMEOUT_S:.0f} seconds (30 days), got {text!r}")
    return timedelta(seconds=seconds)


def init(device: str = "auto") -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment (if any)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timeout())
    return DistContext(rank, local_rank, world_size, dev)


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()
