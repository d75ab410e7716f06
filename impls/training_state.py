"""The training-state file (``--save-every`` / ``--checkpoint STATE_FILE`` / ``--resume``): a run killed
after step k and resumed from its state file ends bit-identical to an uninterrupted run.  (Not
activation checkpointing, which is the ``checkpoint`` technique; error messages call this file a
"checkpoint", the word users know for it.)

The state is everything the rest of the run depends on: model and optimizer (and loss-scaler)
state (for an engine whose state is sharded over the data-parallel ranks, every rank's shard,
gathered to rank 0 so the state is still one atomic file), the step reached (which is also the
data position, since batches are a pure function of the step), the loss curve so far and the RNG
states.  Rank 0 writes it atomically (temporary file
+ rename), with a SHA-256 of the payload; loading refuses a file that is corrupt, not an etbench
checkpoint, or written by a different recipe, naming the differing fields.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import random
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError
from .files import check_readable, write_bytes

FORMAT = "etbench-training-state/1"
# Recipe fields a resumed run may change.  None: every field changes a number of the record —
# eval_batches and eval_every the validation losses of the curve (a curve must not mix two
# evaluation protocols), timing_warmup which steps are timed, device the timings and the device
# named in the record, and the rest what is computed.  A field added to the Recipe is checked
# unless it is listed here with the reason it cannot change any reported number.
_EXECUTION_ONLY: frozenset[str] = frozenset()


def _rng_state() -> dict:
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: str | os.PathLike, recipe, ctx, engine, *, step: int, curve: list, window_losses: list,
         window_grad_norms: list | None = None, finished: dict | None = None) -> None:
    """Write the training state after ``step`` optimizer steps (rank 0 writes; all ranks wait).
    A failed write raises :class:`~impls.errors.WriteError` and leaves the previous state intact.

    ``finished``: at the last step, the measurements the record is made of (step times, load,
    memory of every rank), so that a run killed between this save and its record is given its
    record back by ``--resume`` instead of losing it (:func:`impls.train.run`)."""
    engine_state, sharded = engine.state_dict(), bool(engine.sharded_state) and ctx.world_size > 1
    if sharded:  # every rank holds its own shard: rank 0 writes them all, in one atomic file
        import torch.distributed as tdist

        shards = [None] * ctx.world_size if ctx.is_main else None
        tdist.gather_object(engine_state, shards, dst=0)
        engine_state = shards
    if ctx.is_main:
        buffer = io.BytesIO()
        torch.save(dict(recipe=dataclasses.asdict(recipe), world_size=ctx.world_size, step=step,
                        curve=curve, window_losses=window_losses, window_grad_norms=list(window_grad_norms or []),
                        engine=engine_state, engine_sharded=sharded, rng=_rng_state(), finished=finished), buffer)
        payload = buffer.getvalue()
        outer = io.BytesIO()
        torch.save(dict(format=FORMAT, sha256=hashlib.sha256(payload).hexdigest(), payload=payload), outer)
        write_bytes(path, outer.getvalue())
    ctx.barrier()


#: What a training state's payload holds (window_grad_norms is optional: older states lack it).
_STATE_KEYS = ("recipe", "world_size", "step", "curve", "window_losses", "engine", "rng")


def engine_state(state: dict, rank: int):
    """What ``engine.load_state_dict`` gets on ``rank``: the engine's state, or for an engine
    whose state is sharded (``sharded_state``: FSDP, ZeRO) this rank's shard."""
    return state["engine"][rank] if state.get("engine_sharded") else state["engine"]


def load(path: str | os.PathLike, recipe, world_size: int) -> dict:
    """Read (onto the CPU) and check a training state written by :func:`save` for ``recipe``."""
    path = Path(path)
    state = read(path)
    mine = dataclasses.asdict(recipe)
    differing = sorted(k for k in mine if k not in _EXECUTION_ONLY and state["recipe"].get(k) != mine[k])
    if differing:
        detail = ", ".join(f"{k}: {state['recipe'].get(k)!r} vs {mine[k]!r}" for k in differing)
        raise ConfigError(f"checkpoint {path} was written by a different recipe ({detail})")
    if state["world_size"] != world_size:
        raise ConfigError(f"checkpoint {path} was written with world_size {state['world_size']}, this run has "
                          f"{world_size}; resume with --nproc {state['world_size']} (a resumed run must see the "
                          f"batches and, for sharded engines, the state partition of the run it continues)")
    return state


def read(path: str | os.PathLike) -> dict:
    """Read (onto the CPU) a training state written by :func:`save`, checking only that it is one
    (format, SHA-256 of the payload, the payload's keys), whatever recipe wrote it: what
    ``--init-from`` (:mod:`impls.init_from`) reads a finished run's weights from.  A missing,
    corrupt or foreign file is a one-line :class:`~impls.errors.ConfigError`."""
    check_readable(path, "checkpoint")  # a FIFO would block torch.load forever; a device is no checkpoint
    path = Path(path)
    try:
        outer = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # torch.load raises many types for garbage input
        raise ConfigError(f"checkpoint {path} is corrupt or not an etbench checkpoint ({type(e).__name__})") from None
    if not isinstance(outer, dict) or outer.get("format") != FORMAT:
        raise ConfigError(f"checkpoint {path} is not an etbench training state (expected format {FORMAT})")
    payload, digest = outer.get("payload"), outer.get("sha256")
    if not isinstance(payload, bytes) or not isinstance(digest, str):
        missing = [k for k, t in (("payload", bytes), ("sha256", str)) if not isinstance(outer.get(k), t)]
        raise ConfigError(f"checkpoint {path} is incomplete: no {' or '.join(missing)} (not written by etbench run "
                          f"--save-every)")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise ConfigError(f"checkpoint {path} is corrupt: its SHA-256 does not match its contents")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    except Exception as e:
        raise ConfigError(f"checkpoint {path} is corrupt: its payload does not load ({type(e).__name__})") from None
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ConfigError(f"checkpoint {path} is incomplete: its payload lacks {', '.join(missing)}")
    if not isinstance(state["recipe"], dict):
        raise ConfigError(f"checkpoint {path} is incomplete: its recipe is not a mapping")
    return state
