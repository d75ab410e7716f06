"""Optional packages: a technique or optimizer whose package is not installed is refused before
any work, in one line naming the package and why it is missing (issue 22).

Every package here is a dependency of etbench (pyproject.toml), so a normal ``make setup``
installs them all.  One can still be absent: an install from a wheelhouse
(:mod:`impls.wheelhouse`) leaves out a package too large to travel (bitsandbytes) and records
why in ``<sys.prefix>/etbench-wheelhouse.json``; that reason is what the refusal says.  Whether a
package is installed is asked without importing it (``importlib.util.find_spec``: importing
DeepSpeed or torchao costs seconds).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from .errors import ConfigError

#: distribution name -> the module it provides
MODULES = {"bitsandbytes": "bitsandbytes", "galore-torch": "galore_torch", "pytorch-optimizer": "pytorch_optimizer",
           "torchao": "torchao", "peft": "peft", "fairscale": "fairscale", "deepspeed": "deepspeed",
           "submitit": "submitit", "ray": "ray"}  # the executors' (impls.executors.make)
RECORD = "etbench-wheelhouse.json"  # impls.wheelhouse.RECORD (not imported: that module is for installs)


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def record_path() -> Path:
    return Path(sys.prefix, RECORD)


def why_missing(dist: str) -> str:
    """Why ``dist`` is not installed: the wheelhouse's reason if this environment was installed
    from one that left it out, else a generic line."""
    try:
        record = json.loads(record_path().read_text())
        reason = record.get("left_out", {}).get(dist)
        if reason:
            return f"left out of the wheelhouse this environment was installed from ({reason})"
    except (OSError, ValueError, AttributeError):
        pass
    return f"not installed in this environment ({sys.prefix}); 'make setup' installs it"


def require(what: str, *dists: str, note: str = "") -> None:
    """ConfigError naming the first of ``dists`` that is not installed, for ``what`` (e.g.
    ``"optimizer 'adamw8bit'"``); ``note`` says why ``what`` needs it when that is not obvious."""
    for dist in dists:
        if not installed(MODULES.get(dist, dist)):
            raise ConfigError(f"{what} needs the package {dist}{f' ({note})' if note else ''}, which is "
                              f"{why_missing(dist)}")
