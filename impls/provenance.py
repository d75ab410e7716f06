"""What every record shares, defined once: the schema version and the provenance block.

The bottom layer (stdlib and torch only), so every writer -- the training loop, interleaved
comparisons, the measurements under :mod:`impls.measure` -- and every reader (the report) use the
same definitions instead of importing each other's private helpers.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

#: The record schema: run records (``impls.train``), interleaved comparisons (``impls.compare``)
#: and measurement records (``impls.measure``) carry it as ``schema``; the report refuses others.
SCHEMA_VERSION = 1


def provenance() -> dict:
    """git commit (``ETBENCH_GIT_COMMIT`` wins, for asv runs of other commits), whether the tree
    had uncommitted changes, and the versions of Python, torch, DeepSpeed and etbench."""
    repo = Path(__file__).resolve().parents[1]
    commit, dirty = os.environ.get("ETBENCH_GIT_COMMIT"), None
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                    check=True).stdout.strip()
            dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                        capture_output=True, text=True).stdout.strip())
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    versions = dict(python=platform.python_version(), torch=str(torch.__version__))  # str: a TorchVersion would need torch to unpickle
    for package in ("deepspeed", "etbench"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:  # not installed: say so rather than fail the run
            versions[package] = None
    return dict(git_commit=commit, git_dirty=dirty, versions=versions)
