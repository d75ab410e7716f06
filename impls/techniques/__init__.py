"""Technique registry and the one order in which techniques are applied.

A technique is one module in this package exposing ``NAME`` (its CLI name), ``ORDER`` (its
position in :data:`APPLY_ORDER`), ``OPTIONS`` (accepted ``k=v`` keys with their defaults) and
``apply(model, options, recipe) -> model``; its docstring cites its paper.  Recipes name
techniques as ``NAME[:k=v,...]``.

Like torchtitan's ``parallelize``, techniques compose in one documented order regardless of how
the user lists them: model surgery first, then precision, activation checkpointing, compilation,
and parallel wrapping last (wrapping must see the final module tree).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

from ..errors import ConfigError

APPLY_ORDER = ("surgery", "precision", "checkpoint", "compile", "parallel")


def _discover() -> dict:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "NAME") and hasattr(module, "apply"):
            found[module.NAME] = module
    return found


REGISTRY = _discover()


@dataclass(frozen=True)
class TechniqueSpec:
    name: str
    options: dict

    def __str__(self):
        return self.name + (":" + ",".join(f"{k}={v}" for k, v in self.options.items()) if self.options else "")


def _valid_names() -> str:
    return ", ".join(sorted(REGISTRY)) or "none registered yet"


def parse(spec: str) -> TechniqueSpec:
    """``"name:k=v,k2=v2"`` -> TechniqueSpec, checked against the technique's OPTIONS."""
    name, _, rest = spec.partition(":")
    if name not in REGISTRY:
        raise ConfigError(f"unknown technique {name!r}; valid: {_valid_names()}")
    allowed = REGISTRY[name].OPTIONS
    options = dict(allowed)
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in allowed:
            raise ConfigError(f"bad option {item!r} for technique {name!r}; valid keys: {', '.join(allowed) or 'none'}")
        options[key] = _convert(name, key, allowed[key], value)
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


def apply_all(model, specs: list[TechniqueSpec], recipe):
    """Apply ``specs`` to ``model`` in :data:`APPLY_ORDER`."""
    for spec in sorted(specs, key=lambda s: APPLY_ORDER.index(REGISTRY[s.name].ORDER)):
        model = REGISTRY[spec.name].apply(model, spec.options, recipe)
    return model
