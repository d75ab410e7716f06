"""Job functions for tests/test_executors_cluster.py (Slurm through the fake in tests/fake_slurm/,
and Ray).

A job runs in another process (a submitit job under the fake sbatch, a Ray worker), which imports
its function by module and name: they live in a module of their own, with no pytest and no torch,
that the tests put on the jobs' PYTHONPATH.
"""
from __future__ import annotations

import os
import signal
import time

from impls.executors.base import BAD_INPUT_KEY


def double(payload: dict) -> dict:
    return {"x": payload["x"], "double": 2 * payload["x"], "pid": os.getpid()}


def sleep(payload: dict) -> dict:
    """Runs until killed (or for ``seconds``): a job for a test to preempt, cancel or time out."""
    time.sleep(payload.get("seconds", 120))
    return {"slept": True}


def kill_self(payload: dict) -> dict:
    """Dies as the OOM killer would kill it: SIGKILL, no result, no traceback."""
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)
    return {"survived": True}


def refuse(payload: dict) -> dict:
    return {BAD_INPUT_KEY: f"unknown size {payload['size']!r}; valid: small, large"}


def boom(payload: dict) -> dict:
    raise ValueError(f"boom {payload.get('x')}")
