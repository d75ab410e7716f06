"""Dry runs at scale: one rank of an N-rank run, in one process, without allocating memory.

:func:`dry_run` joins PyTorch's ``fake`` process group (``FakeStore``: every collective returns at
once and moves nothing) as rank ``rank`` of ``world_size``, and inside a
``torch._subclasses.fake_tensor.FakeTensorMode`` runs the very build a real run does
(:func:`impls.train.prepare`: validation, the model on ``meta``, the techniques' stages -- FSDP2's
``fully_shard``, DTensor tensor parallelism -- and the engine), then one training step of the
engine (:meth:`train_step`: forward, backward, optimizer step).  Tensors are fake: shapes, dtypes
and storages without data, so a 64-rank FSDP run of a billion-parameter model is planned on a
laptop.  The record (kind :data:`impls.families.DRYRUN`) holds what a real run measures of its
first step and what does not depend on values:

* ``memory``: this rank's params/grads/optimizer bytes after the first update
  (:func:`impls.train.session_state_bytes`, the meters a real run uses), and ``model_states``:
  those against the ZeRO paper's formula (:func:`impls.train.model_states_check`);
* ``comm``: the collectives of the step as :class:`~impls.measure.comm.CommCounter` counts them
  (calls and bytes per op) and their check against the 2Ψ/3Ψ volumes
  (:func:`impls.train.comm_check`) -- in a real run the counted step is the first (untimed) one,
  as here;
* ``peak``: the step's peak bytes from torch's ``MemTracker`` (``FSDPMemTracker`` under FSDP2),
  where it runs, else why not;
* ``wall_seconds``: the dry run's own time.

Values are fake: where code reads one (``loss.item()``, the gradient norm, Adam's step count)
it reads 1, so the losses, norms and anything data-dependent are not measured.  Techniques whose
engine or wrapper needs real storage are refused before any work (:data:`REFUSED`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import dist, techniques, train
from .errors import ConfigError
from .families import DRYRUN
from .measure.comm import CommCounter
from .provenance import SCHEMA_VERSION, provenance
from .recipe import Recipe

__all__ = ["REFUSED", "check", "dry_run"]

#: Techniques a dry run refuses, and why (before any work).
REFUSED = {
    "ddp": "DistributedDataParallel's C++ reducer verifies and buckets real parameter storage (fake tensors have "
           "none); dry-run data parallelism with fsdp",
    "zero-redundancy": "it wraps the model in DistributedDataParallel, whose C++ reducer needs real storage",
    "zero": "DeepSpeed's engine initialises its own process group and flat buffers on real storage",
    "onebit": "DeepSpeed's engine initialises its own process group and flat buffers on real storage",
    "oss": "fairscale's OSS/ShardedDDP broadcast and reduce real storage",
    "fairscale-fsdp": "fairscale's FullyShardedDataParallel needs CUDA and real flat buffers",
    "data-parallel": "nn.DataParallel replicates over real local GPUs, not ranks",
    "pp": "the pipeline engine exchanges activations with point-to-point sends that the fake process group does "
          "not pair",
}


class _OneScalar(TorchDispatchMode):
    """Answer every read of a fake tensor's value (``.item()``, ``float(t)``) with 1: the loss, the
    gradient norm, Adam's step count.  Nothing measured here depends on them."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return 1.0 if args[0].dtype.is_floating_point else 1
        return func(*args, **(kwargs or {}))


def check(recipe: Recipe, world_size: int, rank: int = 0) -> list[techniques.TechniqueSpec]:
    """Refuse, before any work, what a dry run cannot do (one-line :class:`ConfigError`); returns
    the recipe's techniques with the defaults a real run adds (DDP for data parallelism)."""
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ConfigError(f"world size must be an integer >= 1, got {world_size!r}")
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise ConfigError(f"rank must be an integer in 0..{world_size - 1}, got {rank!r}")
    named = [techniques.parse(t).name for t in recipe.techniques]  # before the techniques' own checks
    for name in named:
        if name in REFUSED:
            raise ConfigError(f"dry run cannot run technique {name!r}: {REFUSED[name]}")
    specs, _ = train.check_recipe_fields(recipe, world_size)
    for spec in specs:  # a default one (DDP for data parallelism)
        if spec.name in REFUSED:
            raise ConfigError(f"dry run cannot run technique {spec.name!r} (the default data parallelism at world "
                              f"size {world_size}; name fsdp instead): {REFUSED[spec.name]}")
    if {"fsdp", "tp"} <= {spec.name for spec in specs}:
        raise ConfigError("dry run cannot run fsdp with tp yet: fully_shard over a 2-D mesh raises "
                          "DynamicOutputShapeException on fake tensors (torch 2.13); dry-run each alone")
    if dist.resolve_device(recipe.device).type != "cpu":
        raise ConfigError(f"dry run plans on fake CPU tensors; got device {recipe.device!r} resolving to a GPU: "
                          f"use --device cpu")
    if torch.distributed.is_initialized():
        raise ConfigError("dry run needs its own (fake) process group, and this process already joined one")
    return specs


@contextlib.contextmanager
def _fake_group(world_size: int, rank: int):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch.distributed.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def _env(**values):
    """``os.environ`` with ``values`` set inside the block (what a launched rank would see)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _peak(session: train.Session, step) -> dict:
    """Peak bytes of ``step()`` from torch's memory tracker (FSDPMemTracker under FSDP2)."""
    try:
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
        from torch.distributed._tools.mem_tracker import MemTracker
        from torch.distributed.fsdp import FSDPModule

        model, optimizer = session.model, session.engine.local_optimizer
        if isinstance(model, FSDPModule):
            tracker, name = FSDPMemTracker(model, optimizer), "FSDPMemTracker"
        else:
            tracker, name = MemTracker(), "MemTracker"
            tracker.track_external(model, optimizer)
    except Exception as e:  # noqa: BLE001 - the tracker is optional: the byte counts stand without it
        return dict(error=f"{type(e).__name__}: {e}"), step()
    with tracker:
        result = step()
    try:
        peak = tracker.get_tracker_snapshot("peak")
        by_device = {str(dev): int(sum(v for k, v in kinds.items() if str(k) == "Total")) for dev, kinds in peak.items()}
        return dict(tracker=name, bytes_by_device=by_device, bytes=sum(by_device.values())), result
    except Exception as e:  # noqa: BLE001
        return dict(tracker=name, error=f"{type(e).__name__}: {e}"), result


def dry_run(recipe: Recipe, world_size: int, rank: int = 0) -> dict:
    """Rank ``rank`` of ``recipe`` at ``world_size`` ranks, built and stepped once on fake
    tensors under the fake process group; returns its record (see the module's docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    t0 = time.perf_counter()
    check(recipe, world_size, rank)
    recipe = dataclasses.replace(recipe, device="cpu")
    ctx = dist.DistContext(rank, rank, world_size, torch.device("cpu"))
    # The launch environment of that rank; the memory check of the host is skipped (nothing is allocated).
    env = dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world_size, LOCAL_WORLD_SIZE=world_size)
    env[train.FORCE_ENV] = 1
    with _env(**env), _fake_group(world_size, rank):
        with FakeTensorMode(allow_non_fake_inputs=True), _OneScalar():
            session = train.prepare(recipe, ctx)
            with unset_fake_temporarily():  # the data are real: the step reads them as a real run does
                x, y = session.batches.get("train", 0)
            build_seconds = time.perf_counter() - t0
            counter = CommCounter()

            def step():
                with counter:
                    return session.engine.train_step(x, y, 0)

            peak, _ = _peak(session, step)
            state = train.session_state_bytes(session)
        with unset_fake_temporarily():  # the checks' max over ranks: this rank's (the fake group moves nothing)
            summary = counter.summary()
            comm = train.comm_check(session, summary, 0) if world_size > 1 else None
            memory = dict(state)
            optimizer_state = memory.pop("optimizer_state")
            model_states = train.model_states_check(session, memory)
        specs = [s.name for s in train.check_recipe_fields(recipe, world_size)[0]]
        record = dict(
            kind=DRYRUN,
            schema=SCHEMA_VERSION,
            label=recipe.label + f"/ws{world_size}/rank{rank}",
            recipe=dataclasses.asdict(recipe),
            **provenance(),
            world_size=world_size,
            rank=rank,
            mesh=dict(session.dims.sizes),
            techniques=specs,
            precision=session.plan.precision,
            accum_steps=session.plan.accum_steps,
            params=session.model.num_params(),
            memory=dict(**memory, optimizer_state=optimizer_state),
            model_states=model_states,
            comm=comm,
            peak=peak,
            build_seconds=build_seconds,
            wall_seconds=time.perf_counter() - t0,
            notes="fake tensors and the fake process group: byte counts and collectives are exact for this rank; "
                  "values (losses, norms) are not computed (every read value is 1)",
        )
    return train.strict_json(record)
