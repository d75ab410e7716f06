"""The one ``key=value[,key=value...]`` parser of the suite.

Technique options (``mod:capacity=0.25``), data options (``synthetic:vocab=32``), model
overrides (``--model-arg n_layer=4``) and mesh sizes (``--mesh tp=2``) are all read here, so
they accept the same syntax and fail with the same kind of one-line error.
"""
from __future__ import annotations

from .errors import ConfigError


def split(text: str, what: str) -> dict[str, str]:
    """``"k=v,k2=v2"`` -> ``{"k": "v", "k2": "v2"}`` (strings, in order); empty items are skipped.

    ``what`` names the thing being configured in the error ("technique 'mod'", "--model-arg").
    """
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"bad option {item!r} for {what}; expected KEY=VALUE")
        if key in out:
            raise ConfigError(f"option {key!r} given twice for {what}")
        out[key] = value.strip()
    return out


def convert(value: str, like, what: str):
    """Parse ``value`` as the type of ``like`` (a default: bool, int, float, str or None)."""
    if isinstance(like, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"bad value {value!r} for {what}; valid: true, false")
        return value.lower() in ("true", "1")
    if like is None or isinstance(like, str):
        return value
    try:
        return type(like)(value)
    except ValueError:
        raise ConfigError(f"bad value {value!r} for {what}; expected {type(like).__name__}") from None


def guess(value: str):
    """A free-form value (no default to follow): bool, then int, then float, else the string."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def join(options: dict) -> str:
    """The inverse of :func:`split` for simple values: ``{"a": 1, "b": True}`` -> ``"a=1,b=True"``."""
    return ",".join(f"{k}={v}" for k, v in options.items())
