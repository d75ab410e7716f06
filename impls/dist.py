"""Rank, world size and device from the ``torchrun`` environment.

Every run goes through this, so a single process and ``torchrun --nproc_per_node N`` share one
code path: gloo on CPUs, NCCL on GPUs, one GPU per local rank.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Target:
    """A device a recipe is *planned* for without running on it (``etbench`` dry runs: the GPU
    profile checked on a laptop).  While :func:`planning_for` holds one, :func:`resolve_device`,
    :func:`cuda_available`, :func:`cuda_capability`, :func:`cuda_device_count` and
    :func:`cuda_name` answer for it, and nothing touches CUDA."""
    type: str = "cuda"
    count: int = 1
    capability: tuple[int, int] = (9, 0)
    name: str = "NVIDIA H100 80GB HBM3"
    memory_bytes: float = 80e9


_TARGET: Target | None = None


@contextlib.contextmanager
def planning_for(target: Target):
    """Answer device questions for ``target`` inside the block (see :class:`Target`)."""
    global _TARGET
    previous, _TARGET = _TARGET, target
    try:
        yield target
    finally:
        _TARGET = previous


def planning() -> Target | None:
    """The device being planned for, or None when recipes run here."""
    return _TARGET


def cuda_available() -> bool:
    if _TARGET is not None:
        return _TARGET.type == "cuda"
    return torch.cuda.is_available()


def cuda_device_count() -> int:
    """CUDA devices (NVML's count: does not initialise CUDA in this process)."""
    if _TARGET is not None:
        return _TARGET.count if _TARGET.type == "cuda" else 0
    return torch.cuda.device_count()


def cuda_capability(index: int = 0) -> tuple[int, int]:
    if _TARGET is not None:
        return _TARGET.capability
    return torch.cuda.get_device_capability(index)


def cuda_name(index: int = 0) -> str:
    if _TARGET is not None:
        return _TARGET.name
    return torch.cuda.get_device_name(index)


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
    if preference == "cuda" and not cuda_available():
        raise ConfigError("device 'cuda' requested but torch.cuda.is_available() is False; valid here: auto, cpu")
    if preference == "cpu" or (preference == "auto" and not cuda_available()):
        return torch.device("cpu")
    count = cuda_device_count()
    if local_rank >= count:  # a rank started by hand (torchrun) beyond the GPUs: one line, not "invalid device ordinal"
        raise ConfigError(f"local rank {local_rank} has no GPU: this machine has {count} CUDA device(s) (ranks "
                          f"0..{count - 1}); start at most {count} rank(s) per node, or --device cpu")
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


#: How NCCL reports a collective that timed out.  By default (TORCH_NCCL_ASYNC_ERROR_HANDLING=3)
#: ProcessGroupNCCL's watchdog thread tears the process down (SIGABRT) when a collective exceeds
#: the timeout, so the waiting rank never reports which collective hung and the launcher could
#: only say "killed by signal SIGABRT".  Blocking wait makes the timeout an exception in the
#: thread that waits (what gloo does), and error handling 2 aborts only the communicator, so the
#: rank reports "lost contact ... in all_reduce" and the launcher names the silent rank
#: (:mod:`impls.ranks`).  A user's own setting of either variable is kept.
NCCL_ENV = {"TORCH_NCCL_BLOCKING_WAIT": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}


def nccl_environment(env=None) -> dict:
    """Set :data:`NCCL_ENV`'s defaults in ``env`` (``os.environ``) where unset; returns what applies."""
    env = os.environ if env is None else env
    for key, value in NCCL_ENV.items():
        env.setdefault(key, value)
    return {key: env[key] for key in NCCL_ENV}


def init(device: str = "auto") -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment (if any)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            nccl_environment()  # read by ProcessGroupNCCL when the group is created
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timeout())
    return DistContext(rank, local_rank, world_size, dev)


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()
