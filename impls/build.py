"""The :class:`Build`: what a run trains, as the techniques leave it.

A run is built in one pass over the stages of :data:`impls.techniques.STAGES`; each technique
changes the build instead of returning a patched model.  The build holds

* ``dims`` / ``mesh``: the named parallel dimensions and their device mesh (:mod:`impls.parallel`);
* ``plan``: how the engine executes a step (autocast dtype, loss scaling, micro-batches);
* ``model_parts``: the trained modules (one for most runs, one per stage for pipeline
  parallelism), and ``train_parts``, what the engine *calls* for training (a DDP wrapper, say:
  the same modules unless a ``wrap`` technique wrapped them);
* ``loss_terms``: named extra losses with weights (MoD/MoE auxiliary losses, a distillation
  term), added by the engine in training only, so validation losses stay pure LM losses;
* ``frozen``: modules that run but never train (a teacher): never in the optimizer, their
  FLOPs in HFU but not in MFU, their bytes reported on their own;
* ``optimizer_wrappers``: functions ``(optimizer, build) -> optimizer`` (sharded optimizers);
* ``hooks``: ``on_batch(x, y, step) -> (x, y)``, ``before_step(step)`` (after backward, before the
  update) and ``after_step(step)``, for techniques acting on data or on a schedule;
* ``saved_tensors_hooks``: one ``(pack, unpack)`` pair through which the engine stores the tensors
  autograd saves for backward (compressed or offloaded activations); the activation meter
  measures what ``pack`` returns, i.e. what is really stored;
* ``engine``: the name of the engine that executes it (:mod:`impls.engines`);
* what a data-parallel technique tells the engine: ``no_sync`` (the context under which backward
  communicates no gradients: every micro-batch of a step but the last runs in it),
  ``grad_shard_group`` (the group over which this rank's gradients are partitioned, so a global
  norm or an overflow check sums over it) and ``local_optimizer`` (the optimizer holding this
  rank's share of a sharded optimizer's state).

Initialisation (torchtitan's meta-device flow): the model is constructed on ``meta``; the build
materialises it (``to_empty`` + ``init_weights`` from the recipe's seed, then the trained weights
of ``--init-from`` if given: :mod:`impls.init_from`) right after
construction, unless a technique declares ``DEFERS_INIT`` (sharded initialisation: it must see
the model before any storage exists), in which case after that technique's stage.  Modules a
technique creates are created on ``meta`` and registered with :meth:`Build.own`; they are
initialised when they are registered if the model is already materialised, else after the model
in registration order, so a seed gives the same weights on both paths.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from contextlib import AbstractContextManager
from typing import Callable

import torch
import torch.nn as nn

from .parallel import ParallelDims

HOOKS = ("on_batch", "before_step", "after_step")


@dataclass
class LossTerm:
    """An extra training loss: ``weight × value(out)``, where ``value`` returns the term for the
    micro-batch just run as a mean per target token (None: nothing to add this time).  The
    engine weighs it by the micro-batch's target tokens, like the LM loss, so it is exact under
    gradient accumulation and data parallelism."""

    name: str
    weight: float
    value: Callable[["StepOutput"], torch.Tensor | None]


@dataclass
class StepOutput:
    """What a loss term may look at: the micro-batch and the model's logits for it."""

    inputs: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T)
    logits: torch.Tensor  # (B, T, V)


class Frozen(nn.Module):
    """A module that runs but never trains (a distillation teacher): no gradients, always in
    eval mode, outside the optimizer.  The wrapper class names it for the FLOP counter, so its
    FLOPs can be told apart (counted in HFU, excluded from MFU)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@dataclass
class Build:
    dims: ParallelDims
    plan: object  # impls.techniques.StepPlan
    device: torch.device
    model_parts: list[nn.Module]
    train_parts: list[nn.Module] = field(default_factory=list)
    loss_terms: list[LossTerm] = field(default_factory=list)
    frozen: dict[str, Frozen] = field(default_factory=dict)
    optimizer_wrappers: list[Callable] = field(default_factory=list)
    hooks: dict[str, list[Callable]] = field(default_factory=lambda: {k: [] for k in HOOKS})
    # Functions returning facts for the record's technique notes, called when the record is made
    # (e.g. the routing statistics of the last evaluation forward).
    describers: list[tuple[str, Callable[[], dict]]] = field(default_factory=list)
    engine: str = "torch"
    # (pack, unpack) of torch.autograd.graph.saved_tensors_hooks, set by one technique with
    # set_saved_tensors_hooks: the torch engine runs forward under them, and its activation meter
    # composes with them (saved_tensors_hooks do not nest: only the innermost pair runs).
    saved_tensors_hooks: tuple[Callable, Callable] | None = None
    # Set by data-parallel techniques (wrap/optimizer stages), read by the engine.  ``no_sync()``:
    # a context under which backward accumulates gradients locally with no communication (DDP's and
    # ShardedDDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync(False)``); None: the wrap
    # communicates nothing in backward.  ``grad_shard_group``: the process group over which this
    # rank's gradients are partitioned (FSDP: a shard of each gradient; ShardedDDP: the gradients of
    # the parameters this rank owns), None when every rank holds the whole averaged gradients.
    # ``local_optimizer``: the optimizer holding this rank's state when the engine's optimizer is a
    # sharded wrapper (ZeroRedundancyOptimizer's or OSS's ``optim``): what is measured and saved.
    no_sync: Callable[[], AbstractContextManager] | None = None
    grad_shard_group: object = None
    local_optimizer: torch.optim.Optimizer | None = None
    # Saved-activation bytes of each Transformer block for one micro-batch (set by the engine's
    # activation measurement; per-layer formulas are checked against it).
    layer_activation_bytes: list[int] | None = None
    # The same micro-batch's saved bytes by the device they live on ("cpu", "cuda"): offloaded
    # activations live in host memory.
    activation_bytes_by_device: dict[str, int] | None = None
    # The whole model on ``meta`` (no storage) when ``model_parts`` are pipeline stages: its
    # parameter count and model FLOPs are the run's, whichever stage this rank holds.
    full_model: nn.Module | None = None
    # The run's optimizer steps, once the budget has fixed them (set by ``train.measure_step``):
    # hooks acting at a fraction of training (pruning schedules) read it; None before that.
    total_steps: int | None = None
    # Under a sequence-length schedule (``plan.seq_len_at``), set by ``train.measure_step``: length
    # -> (counted, frozen, model) FLOPs of one step at that length, for the technique's notes.
    flops_by_length: dict[int, tuple[int, int, float]] | None = None
    # Under any per-step schedule (``plan.seq_len_at`` or ``plan.phase_at``): phase value ->
    # (counted, frozen, model) FLOPs of one step in that phase (random-LTD: per kept length).
    flops_by_phase: dict[int, tuple[int, int, float]] | None = None
    materialized: bool = False
    # ``--init-from`` (impls/init_from.py): the trained weights the model starts from, loaded when
    # it is materialised (before the surgery that may need them), and where they came from (the
    # record's ``init_from`` block).  None: the seeded random initialisation.
    initial_state: dict | None = None
    init_from: dict | None = None
    _pending: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def __post_init__(self):
        if not self.train_parts:
            self.train_parts = list(self.model_parts)

    # ------------------------------------------------------------------ the model

    @property
    def model(self) -> nn.Module:
        """The model, for the (usual) single-part build."""
        if len(self.model_parts) != 1:
            raise RuntimeError(f"this build has {len(self.model_parts)} model parts (pipeline stages); "
                               f"use build.model_parts")
        return self.model_parts[0]

    @property
    def whole_model(self) -> nn.Module:
        """The whole model: ``full_model`` where the parts are pipeline stages, else the model."""
        return self.full_model if self.full_model is not None else self.model

    @property
    def notes(self) -> dict:
        return self.plan.notes

    def mesh(self):
        return self.dims.mesh(self.device.type)

    def own(self, module: nn.Module, init: Callable[[], None] | None = None) -> nn.Module:
        """Register ``module``, created by a technique on ``meta``: it is moved to the run's
        device and initialised by ``init`` (default: its ``init_weights()``) now if the model is
        materialised, else right after the model is.  Returns the module."""
        init = init or module.init_weights

        def materialize():
            module.to_empty(device=self.device)
            init()

        if self.materialized:
            materialize()
        else:
            self._pending.append(materialize)
        return module

    def materialize(self) -> None:
        """Allocate the model on the run's device and initialise it (the model first, then the
        modules techniques registered, in registration order).  Idempotent."""
        if self.materialized:
            return
        for part in self.model_parts:
            part.to_empty(device=self.device)
            part.init_weights()  # also with --init-from: the seed's random stream stays the same
        if self.initial_state is not None:
            from .init_from import load

            load(self.model, self.initial_state)
            self.initial_state = None  # loaded: the model holds the weights now
        self.materialized = True
        pending, self._pending = self._pending, []
        for fn in pending:
            fn()
        for frozen in self.frozen.values():
            frozen.to(self.device)

    # ------------------------------------------------------------------ what techniques add

    def add_loss_term(self, name: str, weight: float, value: Callable[[StepOutput], torch.Tensor | None]) -> None:
        if any(t.name == name for t in self.loss_terms):
            raise ValueError(f"loss term {name!r} registered twice")
        self.loss_terms.append(LossTerm(name, weight, value))

    def freeze(self, name: str, module: nn.Module) -> Frozen:
        """Register a frozen module (a teacher) under ``name``; returns the wrapper to call."""
        frozen = Frozen(module)
        if self.materialized:
            frozen.to(self.device)
        self.frozen[name] = frozen
        return frozen

    def add_hook(self, kind: str, fn: Callable) -> None:
        if kind not in HOOKS:
            raise ValueError(f"unknown hook {kind!r}; valid: {', '.join(HOOKS)}")
        self.hooks[kind].append(fn)

    def set_saved_tensors_hooks(self, pack: Callable, unpack: Callable) -> None:
        """Store what autograd saves for backward through ``pack`` (tensor -> anything) and get
        it back through ``unpack``.  One pair per build: hooks do not nest (torch runs only the
        innermost pair), so two techniques transforming saved tensors cannot both apply."""
        if self.saved_tensors_hooks is not None:
            raise ValueError("saved-tensor hooks set twice: only one technique may transform saved activations")
        self.saved_tensors_hooks = (pack, unpack)

    def wrap_optimizer(self, fn: Callable) -> None:
        self.optimizer_wrappers.append(fn)

    def describe(self, name: str, fn: Callable[[], dict]) -> None:
        """``fn()`` is merged into ``notes[name]`` when the record is made."""
        self.describers.append((name, fn))

    # ------------------------------------------------------------------ what the engine reads

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Distinct parameters of the model parts that require gradients (frozen modules are not
        model parts, so a teacher never reaches the optimizer)."""
        seen, out = set(), []
        for part in self.model_parts:
            for p in part.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def frozen_bytes(self) -> int:
        """Bytes of the frozen modules' parameters and buffers on this rank."""
        from .measure.memory import tensor_bytes

        tensors = [t for f in self.frozen.values() for t in (*f.parameters(), *f.buffers())]
        return tensor_bytes(tensors)

    def notes_for_record(self) -> dict:
        for name, fn in self.describers:
            self.plan.notes.setdefault(name, {}).update(fn())
        return self.plan.notes
