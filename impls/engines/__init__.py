"""Engines: what executes a training step of a :class:`~impls.build.Build`.

The engine owns the optimizer, precision and backward; the training loop (:mod:`impls.train`)
owns the clock, the data and the record.  Every engine implements :class:`Engine`, so the loop,
the measurements and checkpoint/resume are the same whichever engine runs:

* ``torch`` (:class:`~impls.engines.torch_engine.TorchEngine`): autograd backward, a
  ``torch.optim`` optimizer (wrapped by the build's optimizer wrappers), autocast and loss
  scaling from the plan, micro-batches, whatever wrap technique the build applied (DDP...).

* ``pipeline`` (:class:`~impls.engines.pipeline_engine.PipelineEngine`): a
  ``torch.distributed.pipelining`` schedule (GPipe, 1F1B, interleaved 1F1B) over this rank's
  pipeline stages, selected by the ``pp`` technique; per-rank (sharded) state.

* ``deepspeed`` (:class:`~impls.engines.deepspeed_engine.DeepSpeedEngine`): ``deepspeed.initialize``
  owns optimizer, precision, backward and the gradient reduction (ZeRO 1/2/3, offload, 1-bit
  Adam), selected by an ``engine``-stage technique (``zero``, ``onebit``); its state is sharded
  (``sharded_state``: each rank's ``save_checkpoint`` files).

What the engines share (the step around the build's hooks, the learning-rate schedule, the loss
sum with the build's loss terms, the step's token count, evaluation, the clipping rule) is their
base class, :class:`~impls.engines.base.EngineBase`.

An engine that drives a ``torch.distributed.pipelining`` schedule over several model parts, or
DeepSpeed's (which owns optimizer, precision and backward itself), plugs in by implementing the
same protocol and registering here; a technique of the ``engine`` stage selects it by setting
``build.engine``.  Sharded state (FSDP, ZeRO) saves through ``torch.distributed.checkpoint``
behind ``state_dict``/``load_state_dict``.
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch

from .torch_engine import TorchEngine


@runtime_checkable
class Engine(Protocol):
    """What the training loop calls.  ``x``/``y`` are a step's (B·accum, T) inputs and targets on
    this rank; losses are token-normalised means over the step (all micro-batches, all
    data-parallel ranks)."""

    optimizer: torch.optim.Optimizer
    peak_lr: float
    total_steps: int
    #: True when ``state_dict`` holds only this rank's shard (FSDP, ZeRO): checkpoints then keep
    #: every rank's, and ``load_state_dict`` gets this rank's back.
    sharded_state: bool

    def autocast(self): ...

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradients of the step's loss (no update); returns the loss (tensor)."""

    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> float:
        """One optimizer step, the build's hooks included; returns the step's training loss."""

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Pure LM loss (no loss terms), evaluation mode, no gradients."""

    def count_flops(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, int]:
        """Counted FLOPs of one eager step on this rank: ``total`` and ``frozen`` (of them, the
        frozen modules' share); the gradients it leaves are discarded by the next step."""

    def activation_bytes(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """Bytes saved for backward by one micro-batch's forward (what backward must keep)."""

    def state_bytes(self) -> dict[str, int]:
        """Bytes of parameters, gradients and optimizer state held by this rank."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def _deepspeed(build, recipe, total_steps):  # deepspeed is imported only when a run uses it (seconds)
    from .deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(build, recipe, total_steps)


def _pipeline(build, recipe, total_steps):  # torch.distributed.pipelining, imported only for pp runs
    from .pipeline_engine import PipelineEngine

    return PipelineEngine(build, recipe, total_steps)


REGISTRY: dict[str, Callable] = {"torch": TorchEngine, "deepspeed": _deepspeed, "pipeline": _pipeline}


def create(build, recipe, total_steps: int) -> Engine:
    """The engine the build names, constructed over it."""
    if build.engine not in REGISTRY:
        raise ValueError(f"unknown engine {build.engine!r}; registered: {', '.join(REGISTRY)}")
    return REGISTRY[build.engine](build, recipe, total_steps)


__all__ = ["Engine", "REGISTRY", "TorchEngine", "create"]
