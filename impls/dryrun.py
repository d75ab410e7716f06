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
  where it runs, else why not, and by kind at the peak (``bytes_by_kind``).  The first dry run of a
  model's shapes in a process tracks more optimizer bytes than a repeat of it (torch 2.13: AdamW's
  foreach ops are dispatched twice on fake tensors the first time, with extra ``empty_strided``
  outputs; micro fsdp/ws2 18.8 vs 8.5 MB), so a peak is the first-encounter one;
* ``activation_bytes``: what backward keeps of one micro-batch on this rank (the real run's
  ``engine.activation_bytes`` meter, parameters excluded by storage identity);
* ``wall_seconds``: the dry run's own time.

Layouts: DDP, FSDP2, TP (+SP), FSDP×TP on a 2-D mesh, TP×PP and DP×TP×PP.  DDP is built as
``ddp:impl=replicate`` (:func:`_fake_ready`: the same gradient bytes; the record's ``substituted``
says so).  On ``micro`` at 4 and 8 ranks every byte and collective equals the real CPU run's
(``tests/test_dryrun.py``).

Sweeps over models × world sizes × layouts, each against its formulas, are
:mod:`impls.dryrun_sweep` (``etbench dryrun-sweep``).

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
    "zero-redundancy": "it wraps the model in DistributedDataParallel, whose C++ reducer needs real storage",
    "zero": "DeepSpeed's engine initialises its own process group and flat buffers on real storage",
    "onebit": "DeepSpeed's engine initialises its own process group and flat buffers on real storage",
    "oss": "fairscale's OSS/ShardedDDP broadcast and reduce real storage",
    "fairscale-fsdp": "fairscale's FullyShardedDataParallel needs CUDA and real flat buffers",
    "data-parallel": "nn.DataParallel replicates over real local GPUs, not ranks",
}


class _OneScalar(TorchDispatchMode):
    """Pushed above ``FakeTensorMode``.  (1) An op whose tensor arguments are all real and hold
    data (no fake or ``meta`` tensor among them: the batch's tokens, a ``DeviceMesh``'s rank map)
    runs for real, outside the fake mode -- constant propagation: a 2-D mesh's coordinates
    (``(mesh == rank).nonzero()``, whose output shape depends on values) are computed, not faked.
    Factory ops (no tensor argument) and ops on ``meta`` tensors (materialising the model built
    on ``meta``: ``empty_like(p, device="cpu")``) stay fake, so nothing model-sized is allocated.  (2) Every read of a fake tensor's value
    (``.item()``, ``float(t)``) returns 1: the loss, the gradient norm, Adam's step count --
    nothing measured here depends on them."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

        kwargs = kwargs or {}
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if tensors and not any(isinstance(t, FakeTensor) or t.device.type == "meta" for t in tensors):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            return 1.0 if args[0].dtype.is_floating_point else 1
        return func(*args, **kwargs)


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
    if dist.resolve_device(recipe.device).type != "cpu":
        raise ConfigError(f"dry run plans on fake CPU tensors; got device {recipe.device!r} resolving to a GPU: "
                          f"use --device cpu")
    if torch.distributed.is_initialized():
        raise ConfigError("dry run needs its own (fake) process group, and this process already joined one")
    return specs


def _fake_ready(recipe: Recipe, specs) -> tuple[Recipe, str | None]:
    """The recipe a dry run builds, and what it substituted: data parallelism by
    ``DistributedDataParallel`` (``ddp``, explicit or the default at dp > 1) runs as
    ``ddp:impl=replicate`` -- torch's composable ``replicate``, the same semantics (whole
    parameters on every rank, gradients all-reduced over dp, the same bytes), whose per-block
    all-reduces run on fake tensors where the reducer's C++ buckets need real storage."""
    ddp = next((s for s in specs if s.name == "ddp"), None)
    if ddp is None or ddp.options["impl"] == "replicate":
        return recipe, None
    kept = [t for t in recipe.techniques if techniques.parse(t).name != "ddp"]
    kept.append(f"ddp:bucket_mb={ddp.options['bucket_mb']:g},impl=replicate")
    note = (f"ddp ran as ddp:impl=replicate (torch's composable replicate: the same gradient bytes all-reduced, "
            f"one all-reduce per block and one for the root instead of one per {ddp.options['bucket_mb']:g} MiB "
            f"bucket)")
    return dataclasses.replace(recipe, techniques=kept), note


@contextlib.contextmanager
def _fake_group(world_size: int, rank: int):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch.distributed.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()
        _forget_meshes()


def _forget_meshes() -> None:
    """Clear DTensor's sharding-propagation and redistribution caches.  Their keys compare meshes
    by layout, not by process group, so a later dry run with an equal mesh would be handed this
    run's cached output specs -- meshes whose groups were destroyed with this fake group."""
    from torch.distributed.tensor._redistribute import clear_redistribute_planner_cache
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache

    _clear_sharding_prop_cache()
    clear_redistribute_planner_cache()


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
        by_kind: dict[str, int] = {}  # at the peak: sharded/unsharded params, grads, activations, optimizer...
        for kinds in peak.values():
            for k, v in kinds.items():
                if str(k) != "Total":
                    key = str(k).rsplit(".", 1)[-1]
                    by_kind[key] = by_kind.get(key, 0) + int(v)
        out = dict(tracker=name, bytes_by_device=by_device, bytes=sum(by_device.values()), bytes_by_kind=by_kind)
        return out, result
    except Exception as e:  # noqa: BLE001
        return dict(tracker=name, error=f"{type(e).__name__}: {e}"), result


def dry_run(recipe: Recipe, world_size: int, rank: int = 0) -> dict:
    """Rank ``rank`` of ``recipe`` at ``world_size`` ranks, built and stepped once on fake
    tensors under the fake process group; returns its record (see the module's docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    t0 = time.perf_counter()
    specs = check(recipe, world_size, rank)
    asked = dataclasses.replace(recipe, device="cpu")
    recipe, substituted = _fake_ready(asked, specs)
    ctx = dist.DistContext(rank, rank, world_size, torch.device("cpu"))
    # The launch environment of that rank; the memory check of the host is skipped (nothing is allocated).
    env = dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world_size, LOCAL_WORLD_SIZE=world_size)
    env[train.FORCE_ENV] = 1
    with _env(**env), _fake_group(world_size, rank):
        with FakeTensorMode(allow_non_fake_inputs=True), _OneScalar():
            session = train.prepare(recipe, ctx)
            with unset_fake_temporarily():  # the data are real: the step reads them as a real run does
                x, y = session.batches.get("train", 0)
                # one micro-batch, as train.measure_step takes it (cloned: a view would count the whole batch)
                xm, ym = (t.chunk(session.plan.accum_steps)[0].clone() for t in (x, y))
            build_seconds = time.perf_counter() - t0
            # What backward keeps of one micro-batch, this rank (the real run's meter, before its step 0).
            activation_bytes = session.engine.activation_bytes(xm, ym)
            counter = CommCounter()

            def step():
                with counter:
                    return session.engine.train_step(x, y, 0)

            if "pp" in {s.name for s in specs} or session.plan.accum_steps > 1:
                # a pipeline stage, or the model under gradient accumulation, runs once per micro-batch
                peak = dict(error="not tracked: torch's MemTracker does not support a module called once per "
                                  "micro-batch (a pipeline stage, or gradient accumulation)")
                step()
            else:
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
            model_config=dataclasses.asdict(session.model.cfg),  # the data's vocabulary included
            memory=dict(**memory, optimizer_state=optimizer_state),
            model_states=model_states,
            activation_bytes=activation_bytes,
            comm=comm,
            peak=peak,
            build_seconds=build_seconds,
            wall_seconds=time.perf_counter() - t0,
            notes="fake tensors and the fake process group: byte counts and collectives are exact for this rank; "
                  "values (losses, norms) are not computed (every read value is 1)",
        )
        if substituted:
            record["substituted"] = substituted
            record["asked_techniques"] = list(asked.techniques)
    return train.strict_json(record)
