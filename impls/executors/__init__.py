"""Executors: where a sweep's jobs run, one job per point (issue 25).

:func:`make` builds one by name; :mod:`.base` is the contract, :mod:`.driver` runs tasks on any of
them.  The backends' packages are optional (``etbench[slurm]`` brings submitit, which the local
executor uses too; ``etbench[ray]`` brings Ray), so each backend is imported only when it is asked
for, after :func:`impls.requires.require` has refused a missing package in one line: a sweep asked
to run on a backend that cannot start fails before any work, not at its first submission.
"""
from __future__ import annotations

import os

from .. import requires
from ..errors import ConfigError
from .base import Executor

#: The executors :func:`make` knows, in the order the command line lists them.
EXECUTORS = ("local", "slurm", "ray")

#: executor -> (the package it needs, the extra that installs it)
PACKAGES = {"local": ("submitit", "slurm"), "slurm": ("submitit", "slurm"), "ray": ("ray", "ray")}


def make(name: str, folder: str | os.PathLike, *, jobs: int | None = None, **options) -> Executor:
    """The executor ``name`` with its job files under ``folder``.

    ``jobs``: how many jobs run at once (local: default 1, one job beside the driver; Ray: default
    as many as the cluster's CPUs allow; Slurm: ignored, its queue decides).  ``options`` go to the
    backend: local ``gpus`` (a count or a list of ids), ``signal_delay_s``, ``python``; slurm
    ``config`` (a :class:`~impls.executors.slurm.SlurmConfig`); ray ``address``, ``cpus``."""
    if name not in EXECUTORS:
        raise ConfigError(f"unknown executor {name!r}; valid: {', '.join(EXECUTORS)}")
    dist, extra = PACKAGES[name]
    requires.require(f"executor {name!r}", dist, note=f"pip install 'etbench[{extra}]'")
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs {jobs}: the number of jobs at once must be >= 1")
    if name == "local":
        from .local import LocalExecutor

        unknown = sorted(set(options) - {"gpus", "signal_delay_s", "python"})
        if unknown:
            raise ConfigError(f"local executor: unknown options {', '.join(unknown)}; valid: gpus, python, signal_delay_s")
        return LocalExecutor(folder, jobs=jobs or 1, **options)
    if name == "slurm":
        from .slurm import SlurmExecutor

        config = options.pop("config", None)
        if options:
            raise ConfigError(f"slurm executor: unknown options {', '.join(sorted(options))}; valid: config")
        return SlurmExecutor(folder, config)  # None: SlurmConfig()'s defaults
    from .ray_backend import RayExecutor

    unknown = sorted(set(options) - {"address", "cpus"})
    if unknown:
        raise ConfigError(f"ray executor: unknown options {', '.join(unknown)}; valid: address, cpus")
    return RayExecutor(options.get("address"), options.get("cpus"), jobs, folder=folder)
