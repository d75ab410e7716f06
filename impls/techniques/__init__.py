"""Technique registry, the training plan techniques configure, and the one order they apply in.

A technique is one module in this package whose docstring cites its paper.  It exposes

* ``NAME``: its CLI name (``etbench run --technique NAME[:k=v,...]``);
* ``ORDER``: its stage in :data:`APPLY_ORDER`, or a function ``options -> stage`` for a
  technique whose variants act at different stages (``fuse:mode=jit`` is surgery,
  ``fuse:mode=compile`` compilation);
* ``OPTIONS``: accepted ``k=v`` keys with their defaults (the default's type parses the value),
  and optionally ``CHOICES`` (key -> allowed values) and ``CONFLICTS`` (technique -> why the two
  cannot be combined);
* ``configure(plan, options)`` (optional): settings the engine executes — autocast dtype, loss
  scaling, micro-batches — set on the :class:`Plan` before any model exists;
* ``apply(model, options, plan) -> model`` (optional): model surgery.

Like torchtitan's ``parallelize``, techniques compose in one documented order whatever order the
user lists them in: model surgery first (attention kernels, fused ops), then precision, activation
checkpointing (it must wrap the final blocks), compilation (it must see the checkpointed graph),
and parallel wrapping last.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError

APPLY_ORDER = ("surgery", "precision", "checkpoint", "compile", "parallel")


def _discover() -> dict:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "NAME"):
            found[module.NAME] = module
    return found


REGISTRY = _discover()


@dataclass
class Plan:
    """How the engine executes a step, as configured by the techniques (defaults: fp32, one
    micro-batch).  ``notes`` collects facts a technique wants in the run record."""

    autocast_dtype: torch.dtype | None = None
    loss_scaling: bool = False  # fp16: dynamic loss scaling with torch.amp.GradScaler
    accum_steps: int = 1  # micro-batches per optimizer step
    # False when a technique skips compute per token (routing, sparse attention): the analytic
    # 6N + 12·L·H·Q·T would count work that never runs, so model FLOPs are the counted ones.
    dense_compute: bool = True
    notes: dict = field(default_factory=dict)

    @property
    def precision(self) -> str:
        if self.autocast_dtype is None:
            return "fp32"
        name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]
        return f"{name}-autocast" + ("+loss-scaling" if self.loss_scaling else "")


@dataclass(frozen=True)
class TechniqueSpec:
    name: str
    options: dict

    def __str__(self):
        return self.name + (":" + ",".join(f"{k}={v}" for k, v in self.options.items()) if self.options else "")


def _valid_names() -> str:
    return ", ".join(sorted(REGISTRY)) or "none registered yet"


def parse(spec: str) -> TechniqueSpec:
    """``"name:k=v,k2=v2"`` -> TechniqueSpec, checked against the technique's OPTIONS/CHOICES."""
    name, _, rest = spec.partition(":")
    if name not in REGISTRY:
        raise ConfigError(f"unknown technique {name!r}; valid: {_valid_names()}")
    module = REGISTRY[name]
    allowed, choices = module.OPTIONS, getattr(module, "CHOICES", {})
    options = dict(allowed)
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in allowed:
            raise ConfigError(f"bad option {item!r} for technique {name!r}; valid keys: {', '.join(allowed) or 'none'}")
        options[key] = _convert(name, key, allowed[key], value)
        if key in choices and options[key] not in choices[key]:
            raise ConfigError(f"bad value {value!r} for {name}:{key}; valid: {', '.join(map(str, choices[key]))}")
    return TechniqueSpec(name, options)


def _convert(name: str, key: str, default, value: str):
    """Parse ``value`` as the type of the option's default."""
    if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"bad value {value!r} for {name}:{key}; valid: true, false")
        return value.lower() in ("true", "1")
    if default is None or isinstance(default, str):
        return value
    try:
        return type(default)(value)
    except ValueError:
        raise ConfigError(f"bad value {value!r} for {name}:{key}; expected {type(default).__name__}") from None


def check_combination(specs: list[TechniqueSpec]) -> None:
    """Reject repeated techniques and pairs that cannot work together, saying why."""
    names = [s.name for s in specs]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"technique {name!r} given more than once")
        for other, why in getattr(REGISTRY[name], "CONFLICTS", {}).items():
            if other in names:
                raise ConfigError(f"techniques {name!r} and {other!r} cannot be combined: {why}")


def stage(spec: TechniqueSpec) -> str:
    order = REGISTRY[spec.name].ORDER
    return order(spec.options) if callable(order) else order


def _ordered(specs: list[TechniqueSpec]) -> list[TechniqueSpec]:
    return sorted(specs, key=lambda s: APPLY_ORDER.index(stage(s)))


def configure(specs: list[TechniqueSpec]) -> Plan:
    """The :class:`Plan` of ``specs`` (no model needed: runs at validation time)."""
    check_combination(specs)
    plan = Plan()
    for spec in _ordered(specs):
        if hasattr(REGISTRY[spec.name], "configure"):
            REGISTRY[spec.name].configure(plan, spec.options)
    return plan


def apply_all(model, specs: list[TechniqueSpec], plan: Plan):
    """Apply the model surgery of ``specs`` to ``model`` in :data:`APPLY_ORDER`."""
    for spec in _ordered(specs):
        if hasattr(REGISTRY[spec.name], "apply"):
            model = REGISTRY[spec.name].apply(model, spec.options, plan)
    return model
