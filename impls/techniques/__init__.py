"""Technique registry, the training plan techniques configure, and the one order they apply in.

A technique is one module in this package whose docstring cites its paper (the contract is
:class:`TechniqueModule`; ``README.md`` here has a worked example).  It changes a
:class:`~impls.build.Build` — the model parts, loss terms, frozen modules, optimizer wrappers,
hooks and engine of a run — through real modules (wrappers that *contain* the module they
change), hooks and loss terms, never by replacing ``forward`` on an instance or swapping
``__class__``.

Stages, applied in this order whatever order the user lists techniques in (torchtitan's
``parallelize``: tensor parallelism before checkpointing and compilation, data-parallel wrapping
last):

============  ==========================================================================
surgery       change what the model computes: replace or wrap modules (MoE MLPs, fused
              MLPs, attention kernels, MoD-routed blocks, later pruning, LoRA)
shard         split modules over the mesh's tp/cp/pp dimensions (TP, SP, pipeline stages)
precision     the step's numeric formats (autocast dtype, loss scaling)
checkpoint    activation checkpointing: wraps the final blocks, so after surgery and shard
compile       ``torch.compile``: must see the checkpointed graph
wrap          data-parallel wrappers over the whole model (DDP, FSDP), last
optimizer     optimizer wrappers (sharded optimizers)
engine        how a step executes (micro-batches, the engine that runs it)
============  ==========================================================================

Within a stage, techniques apply by their ``RANK`` (then name), a fixed order chosen where the
order matters: in ``surgery``, MLP replacement (moe, mode: 10) before MLP fusion (fuse, 20, so
MoE experts get fused too), attention kernels (30), then block routing (mod, 40, which wraps
whatever block it finds).  So the user's order never changes the result (tested over
permutations).  The model is materialised right after construction unless a technique sets
``DEFERS_INIT`` (see :mod:`impls.build`).
"""
from __future__ import annotations

import importlib
import math
import pkgutil
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from .. import kv, requires
from ..errors import ConfigError

STAGES = ("surgery", "shard", "precision", "checkpoint", "compile", "wrap", "optimizer", "engine")
DEFAULT_RANK = 50


@runtime_checkable
class TechniqueModule(Protocol):
    """What a technique module defines.  Optional, with defaults: ``RANK`` (int, order within the
    stage, default 50), ``CHOICES`` (option -> allowed values), ``CONFLICTS`` (technique -> why
    the two cannot be combined), ``MESH_DIMS`` (mesh dimensions it shards over), ``DEFERS_INIT``
    (bool), ``DATA_PARALLEL`` (bool: an
    engine-stage technique that reduces gradients over dp itself, so no default ``ddp`` is added),
    ``configure(plan, options)`` (engine settings on the :class:`StepPlan`, run at validation
    time, before any model exists), ``check_mesh(dims, options)`` (refuse a mesh it cannot use,
    also before any work), ``check_recipe(recipe, options)`` (refuse recipe fields it cannot
    serve, such as an optimizer its engine cannot run, before any work), ``check_model(cfg, seq_len, options)`` (refuse, from the model's config and the
    sequence length, options under which it would change nothing in this model or could not
    apply to it — so no run is a baseline labelled with the technique) and ``apply(build,
    options)`` (changes to the build), ``REQUIRES`` (the optional packages it imports: a tuple of
    distribution names -- or ``(name, why)`` pairs -- or a function of the options returning one;
    a missing one is refused at validation, :func:`impls.requires.require`)."""

    NAME: str
    STAGE: str | Callable[[dict], str]  # a stage of STAGES, or options -> stage
    OPTIONS: dict  # accepted k=v keys and their defaults (the default's type parses the value)


def _noop(*_):
    return None


@dataclass(frozen=True)
class Technique:
    """A registered technique: its module's contract with the optional parts filled in."""

    name: str
    module: ModuleType
    stage_of: Callable[[dict], str]
    options: dict
    choices: dict
    conflicts: dict
    rank: int
    mesh_dims: tuple[str, ...]
    defers_init: bool
    data_parallel: bool
    configure: Callable
    check_mesh: Callable
    check_model: Callable
    apply: Callable
    check_recipe: Callable
    requires: Callable[[dict], tuple]

    @classmethod
    def of(cls, module: ModuleType) -> "Technique":
        if not isinstance(module, TechniqueModule):
            raise TypeError(f"{module.__name__} lacks NAME, STAGE or OPTIONS")
        stage = module.STAGE
        stage_of = stage if callable(stage) else (lambda _options, s=stage: s)
        ns = vars(module)
        return cls(module.NAME, module, stage_of, dict(module.OPTIONS), ns.get("CHOICES", {}), ns.get("CONFLICTS", {}),
                   ns.get("RANK", DEFAULT_RANK), tuple(ns.get("MESH_DIMS", ())), ns.get("DEFERS_INIT", False),
                   ns.get("DATA_PARALLEL", False), ns.get("configure", _noop), ns.get("check_mesh", _noop),
                   ns.get("check_model", _noop), ns.get("apply", _noop), ns.get("check_recipe", _noop),
                   _requires_of(ns.get("REQUIRES", ())))


def _requires_of(requires) -> Callable[[dict], tuple]:
    return requires if callable(requires) else (lambda _options, r=tuple(requires): r)


def _discover() -> dict[str, Technique]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "NAME"):  # helper modules of the package define no NAME
            found[module.NAME] = Technique.of(module)
    return found


REGISTRY: dict[str, Technique] = _discover()


@dataclass
class StepPlan:
    """How the engine executes a step, as configured by the techniques (defaults: fp32, one
    micro-batch).  ``notes`` collects facts a technique wants in the run record."""

    autocast_dtype: torch.dtype | None = None
    loss_scaling: bool = False  # fp16: dynamic loss scaling with torch.amp.GradScaler
    accum_steps: int = 1  # micro-batches per optimizer step
    # False when a technique skips compute per token (routing, sparse attention): the analytic
    # 6N + 12·L·H·Q·T would count work that never runs, so model FLOPs are the counted ones.
    dense_compute: bool = True
    notes: dict = field(default_factory=dict)
    # The device type the run will use ("cpu", "cuda"), when validation knows it: lets configure
    # refuse a combination that only fails on some devices before any work.
    device_type: str | None = None
    # How a data-parallel technique shards model states over the dp ranks, in the ZeRO paper's
    # terms (Rajbhandari et al. 2020, §5): 0 replicated (DDP), 1 optimizer states (P_os), 2 and
    # gradients (P_os+g), 3 and parameters (P_os+g+p; FSDP).  Set in ``configure``; the record's
    # per-rank model-state bytes are checked against the formula of this stage.
    sharding_stage: int = 0
    # True when the engine keeps parameters (and gradients) in the autocast dtype with an fp32
    # master copy in the optimizer state (DeepSpeed's bf16/fp16 modes: the paper's 2Ψ + 2Ψ + KΨ
    # with K = 12 for Adam); False when parameters stay fp32 (autocast: 4Ψ + 4Ψ + 8Ψ).
    low_precision_params: bool = False
    # The ZeRO stage whose collectives a step issues, where it differs from ``sharding_stage``
    # (FSDP without resharding after forward gathers parameters once, not twice: stage 2's 2Ψ,
    # not stage 3's 3Ψ), and the bytes per element of the parameter all-gathers where they differ
    # from the parameters' (FSDP's bf16 mixed-precision policy gathers bf16).  None: the defaults.
    comm_stage: int | None = None
    comm_param_bytes: float | None = None
    # Set by a technique whose optimizer state follows its own formula, not the optimizer's K
    # bytes per parameter (GaLore's projected moments): why the ZeRO model-state check does not
    # apply; the technique's notes compare the state with its own formula.
    optimizer_state_formula: str | None = None
    # Set by a technique that trains step ``t`` of ``total_steps`` on sequences truncated to
    # ``seq_len_at(t, total_steps, seq_len)`` tokens (sequence-length warm-up): ``measure_step``
    # then counts each distinct length's FLOPs, solves for the steps a FLOP budget buys over the
    # whole schedule, and the curve's cumulative FLOPs and tokens follow it step by step.
    seq_len_at: Callable[[int, int, int], int] | None = None
    # The same for a schedule of another "phase" value the step's cost depends on (random-LTD's
    # kept length): ``phase_at(t, total_steps, seq_len)`` gives step t's value, the value
    # ``seq_len`` meaning the full-cost step, and ``in_phase(value)`` (set by the technique's
    # ``apply``, once the model exists) is a context manager that puts the model into that phase
    # while ``measure_step`` counts one step's FLOPs; the batch keeps its length.
    phase_at: Callable[[int, int, int], int] | None = None
    in_phase: Callable[[int], Any] | None = None

    @property
    def precision(self) -> str:
        if self.autocast_dtype is None:
            return "fp32"
        name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]
        if self.low_precision_params:  # 16-bit parameters with an fp32 master copy, no autocast
            return f"{name}-params+fp32-master"
        return f"{name}-autocast" + ("+loss-scaling" if self.loss_scaling else "")


@dataclass(frozen=True)
class TechniqueSpec:
    name: str
    options: dict

    def __str__(self):
        return self.name + (":" + kv.join(self.options) if self.options else "")

    @property
    def technique(self) -> Technique:
        return REGISTRY[self.name]


def _valid_names() -> str:
    return ", ".join(sorted(REGISTRY)) or "none registered yet"


def parse(spec: str) -> TechniqueSpec:
    """``"name:k=v,k2=v2"`` -> TechniqueSpec, checked against the technique's OPTIONS/CHOICES."""
    name, _, rest = spec.partition(":")
    if name not in REGISTRY:
        raise ConfigError(f"unknown technique {name!r}; valid: {_valid_names()}")
    tech = REGISTRY[name]
    options = dict(tech.options)
    for key, value in kv.split(rest, f"technique {name!r}").items():
        if key not in tech.options:
            raise ConfigError(f"bad option '{key}={value}' for technique {name!r}; valid keys: "
                              f"{', '.join(tech.options) or 'none'}")
        options[key] = kv.convert(value, tech.options[key], f"{name}:{key}")
        if isinstance(options[key], float) and not math.isfinite(options[key]):  # nan passes no range test
            raise ConfigError(f"bad value {value!r} for {name}:{key}; expected a finite number")
        if key in tech.choices and options[key] not in tech.choices[key]:
            raise ConfigError(f"bad value {value!r} for {name}:{key}; valid: {', '.join(map(str, tech.choices[key]))}")
    return TechniqueSpec(name, options)


def check_combination(specs: list[TechniqueSpec]) -> None:
    """Reject repeated techniques and pairs that cannot work together, saying why."""
    names = [s.name for s in specs]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"technique {name!r} given more than once")
        for other, why in REGISTRY[name].conflicts.items():
            if other in names:
                raise ConfigError(f"techniques {name!r} and {other!r} cannot be combined: {why}")


def stage(spec: TechniqueSpec) -> str:
    return spec.technique.stage_of(spec.options)


def ordered(specs: list[TechniqueSpec]) -> list[TechniqueSpec]:
    """``specs`` in application order: by stage, then rank within the stage, then name."""
    return sorted(specs, key=lambda s: (STAGES.index(stage(s)), s.technique.rank, s.name))


def with_defaults(specs: list[TechniqueSpec], dp: int) -> list[TechniqueSpec]:
    """``specs`` plus the defaults a run needs: DDP when the data-parallel size is > 1 and no
    technique of the ``wrap`` stage, nor one that does its own data parallelism
    (``DATA_PARALLEL``: DeepSpeed's ZeRO), was given."""
    if dp > 1 and not any(stage(s) == "wrap" or s.technique.data_parallel for s in specs) and "ddp" in REGISTRY:
        specs = [*specs, parse("ddp")]
    return specs


def usable_mesh_dims(specs: list[TechniqueSpec]) -> set[str]:
    return {d for s in specs for d in s.technique.mesh_dims}


def configure(specs: list[TechniqueSpec], device_type: str | None = None) -> StepPlan:
    """The :class:`StepPlan` of ``specs`` (no model needed: runs at validation time)."""
    check_combination(specs)
    for spec in specs:
        for item in spec.technique.requires(spec.options):
            dist, why = (item, "") if isinstance(item, str) else item
            requires.require(f"technique {str(spec)!r}", dist, note=why)
    plan = StepPlan(device_type=device_type)
    for spec in ordered(specs):
        spec.technique.configure(plan, spec.options)
    return plan


def check_recipe(specs: list[TechniqueSpec], recipe) -> None:
    """Each technique's ``check_recipe`` hook over the recipe (optimizer and other fields it
    cannot serve are a one-line ConfigError before any work)."""
    for spec in ordered(specs):
        spec.technique.check_recipe(recipe, spec.options)


def check_model(specs: list[TechniqueSpec], cfg, seq_len: int) -> None:
    """Each technique's ``check_model`` hook over the model's config (no model is built) and the
    run's sequence length: a technique that would change nothing (``mod:every=5`` on a 2-layer
    model routes no block) or cannot apply is a one-line ConfigError before any work."""
    for spec in ordered(specs):
        spec.technique.check_model(cfg, seq_len, spec.options)


def apply_stage(build, specs: list[TechniqueSpec], name: str) -> None:
    """Apply the techniques of stage ``name`` to ``build``."""
    for spec in ordered(specs):
        if stage(spec) == name:
            spec.technique.apply(build, spec.options)


def assemble(build, specs: list[TechniqueSpec]):
    """Run every stage on ``build`` (whose model parts are on ``meta``), materialising the model
    right after construction or, if a technique defers initialisation, after its stage."""
    deferring = [STAGES.index(stage(s)) for s in specs if s.technique.defers_init]
    last_deferred = max(deferring, default=-1)
    if last_deferred < 0:
        build.materialize()
    for index, name in enumerate(STAGES):
        apply_stage(build, specs, name)
        if index == last_deferred:
            build.materialize()
    return build
