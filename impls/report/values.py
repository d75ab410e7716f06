"""The values of a record as the report reads them: nested fields by dotted path, numbers (a
bool is never one), missing values (None or NaN, as the run frame holds them), the point estimate
of a statistic, and nested blocks rebuilt from the run frame's flattened columns.  The bottom of
the report package: it imports nothing of it."""
from __future__ import annotations

import math


def lookup(record: dict, dotted: str):
    """The value at ``"a.b"`` in a nested record, or None where any level is missing."""
    value = record
    for key in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def is_number(value) -> bool:
    # bool is an int subclass, but ``true`` is never a valid count or rate.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_missing(value) -> bool:
    """None, or NaN: what the run frame holds where a record lacks a field."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def first_number(*values):
    """The first of ``values`` that is a number (not NaN), as a float; None if none is."""
    for value in values:
        if is_number(value) and not (isinstance(value, float) and math.isnan(value)):
            return float(value)
    return None


def estimate(stat: dict):
    """The point estimate an interval belongs to: ``impls.compare`` gives ``value`` (the median over
    rounds) with ``ci95`` (order statistics); older records only a ``geomean`` or ``median``."""
    for key in ("value", "geomean", "median"):
        if isinstance(stat, dict) and is_number(stat.get(key)):
            return stat[key]
    return None


def nested_block(run, prefix: str) -> dict | None:
    """The nested block ``prefix`` of a record, rebuilt from the run frame's flattened columns
    (``"model_states.formula.params"``); None where the record has none."""
    out: dict = {}
    whole = run.get(prefix) if hasattr(run, "get") else None
    if isinstance(whole, dict):
        out.update(whole)
    for key, value in run.items():
        if not isinstance(key, str) or not key.startswith(prefix + ".") or is_missing(value):
            continue
        node, parts = out, key[len(prefix) + 1:].split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[parts[-1]] = value
    return out or None
