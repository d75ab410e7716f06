"""The callable every backend runs in a job's process: ``Job(fn, started_path)(payload)``.

Why a class and not ``fn`` itself:

* **A started marker.**  A scheduler says a job is submitted, not that its process runs; the
  driver's "running" count and its ETA need the moment ``fn`` starts, and a test (or a person) needs
  the job's pid to kill it.  ``__call__`` writes ``started_path`` (atomically: JSON with the pid,
  the host, the submission's ``token`` and the wall-clock start) before it calls ``fn``.  The token
  names the submission, so a marker an earlier attempt left behind is never read as this one's.
* **Preemption and timeout reach the driver's retry loop.**  submitit calls a submitted callable's
  ``checkpoint()`` on USR2 (the timeout warning, or a preemption).  A plain function that times out
  ends with "timed-out and not checkpointable", and one that is preempted is requeued by submitit
  under the same job id, so the driver would never see either.  :meth:`Job.checkpoint` writes a
  signal marker (``{"case": "preempted" | "timed-out", "token": ...}``) and returns None: submitit
  then does not requeue, the job ends with an error pickle, and the backend reads the marker to
  report :data:`~impls.executors.base.PREEMPTED` or :data:`~impls.executors.base.TIMEOUT`.
* **Bad input is data.**  A :class:`~impls.errors.ConfigError` out of ``fn`` becomes
  ``{BAD_INPUT_KEY: message}`` here, in the job's process, so a job function need not catch it
  itself (the same input fails the same way: the driver does not retry it).

The instance is pickled by reference to this module (``impls`` must be importable in the job) with
``fn`` pickled by reference to its own module.  Nothing here imports torch or a scheduler's package:
the same class serves submitit jobs and Ray tasks.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from ..files import write_text
from .base import BAD_INPUT_KEY

TIMED_OUT, PREEMPTED = "timed-out", "preempted"


def signal_path_for(started_path: str | os.PathLike) -> Path:
    """The signal marker beside a started marker: ``<dir>/<key>.started`` -> ``<dir>/<key>.signal``."""
    path = Path(started_path)
    return path.with_name(path.stem + ".signal")


def signal_case(elapsed_s: float, timeout_s: float | None, signal_delay_s: float) -> str:
    """Whether a USR2 ``elapsed_s`` after ``fn`` started is the timeout warning or a preemption.

    The warning comes ``signal_delay_s`` before the limit, counted from the job's start, which is a
    little before ``fn``'s (the interpreter starts and loads the pickle first): anything within a
    slack of max(60 s, 10 % of the limit) of the warning's time is the timeout.  (submitit's own
    test, ``walltime >= min(0.8 T, T - 10 min)``, calls every signal to a job of under 10 minutes a
    timeout and a preemption at 0.8 T of a long job a timeout too.)  With no limit known, a
    timeout."""
    if not timeout_s:
        return TIMED_OUT
    slack = max(60.0, 0.1 * timeout_s)
    return TIMED_OUT if elapsed_s >= timeout_s - signal_delay_s - slack else PREEMPTED


def read_marker(path: str | os.PathLike, token: str = "") -> dict | None:
    """A marker's content if it exists, parses and names ``token`` (any token when empty), else None."""
    try:
        marker = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or (token and marker.get("token") != token):
        return None
    return marker


class Job:
    """``fn(payload)`` with a started marker, a signal marker and ConfigError as bad input.

    ``started_path``: where the started marker goes; ``signal_path``: the signal marker (default
    :func:`signal_path_for`); ``token``: names this submission in both markers; ``timeout_s`` and
    ``signal_delay_s``: the job's limit and how long before it the scheduler warns (USR2), to tell a
    timeout from a preemption (:func:`signal_case`)."""

    def __init__(self, fn: Callable[[dict], dict], started_path: str | os.PathLike,
                 signal_path: str | os.PathLike | None = None, *, token: str = "",
                 timeout_s: float | None = None, signal_delay_s: float = 0.0):
        self.fn = fn
        self.started_path = str(started_path)
        self.signal_path = str(signal_path if signal_path is not None else signal_path_for(started_path))
        self.token = token
        self.timeout_s = timeout_s
        self.signal_delay_s = signal_delay_s
        self._t0: float | None = None

    def __call__(self, payload: dict) -> dict:
        self._t0 = time.time()
        write_text(self.started_path, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                  "token": self.token, "started": self._t0}))
        try:
            return self.fn(payload)
        except ConfigError as e:
            return {BAD_INPUT_KEY: str(e).splitlines()[0] if str(e) else type(e).__name__}

    def checkpoint(self, *args, **kwargs) -> None:
        """Called by submitit on USR2, in the job's process: record why the job is being stopped and
        decline the requeue (None), so the job ends and the driver decides what comes next."""
        elapsed = time.time() - self._t0 if self._t0 is not None else 0.0
        case = signal_case(elapsed, self.timeout_s, self.signal_delay_s)
        write_text(self.signal_path, json.dumps({"case": case, "token": self.token, "elapsed_s": round(elapsed, 1)}))
        return None

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        return f"Job({getattr(self.fn, '__module__', '?')}.{name})"
