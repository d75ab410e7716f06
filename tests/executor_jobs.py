"""Job functions for tests/test_executors.py's local-executor tests.

A job runs in a process submitit starts, which imports its function by module and name: these live
in a module of their own (no pytest, no torch: each job is a fresh interpreter) that the test puts
on the jobs' PYTHONPATH.  A function that misbehaves only on its first attempt keeps that state in
a file named by its payload (a job's memory dies with its process).
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

from impls.executors.base import BAD_INPUT_KEY


def _first_attempt(payload: dict) -> bool:
    marker = Path(payload["marker"])
    if marker.exists():
        return False
    marker.write_text("1")
    return True


def echo(payload: dict) -> dict:
    return {"x": payload["x"], "square": payload["x"] ** 2, "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}


def die_once(payload: dict) -> dict:
    """SIGKILL on the first attempt (as the OOM killer would), then fine."""
    if _first_attempt(payload):
        os.kill(os.getpid(), signal.SIGKILL)
    return {"survived": True}


def usr2_once(payload: dict) -> dict:
    """The scheduler's warning (USR2) on the first attempt, as at a time limit, then fine."""
    if _first_attempt(payload):
        os.kill(os.getpid(), signal.SIGUSR2)
    return {"survived": True}


def refuse(payload: dict) -> dict:
    return {BAD_INPUT_KEY: f"unknown size {payload['size']!r}; valid: small, large"}


def boom(payload: dict) -> dict:
    raise RuntimeError("boom")
