"""The contract between a sweep and the engine that runs its jobs (issue 25).

A sweep (an isoFLOP study, a grid of recipes, a list of comparison specs) hands its unfinished
points to an :class:`Executor` as :class:`Task` s -- one job each -- and a driver
(:func:`impls.executors.driver.run_all`) submits them, polls their :class:`Handle` s, retries
what failed and calls the sweep back with each result.  The sweep's store (its records and
table) stays the single source of truth: a job writes its point's record itself, atomically, and
a point whose record exists is never submitted again, so a killed driver resumes by running the
same command.

This layer knows nothing of models or recipes: a task is a module-level function (pickled by
reference, so the job imports it), a JSON payload, the resources the job asks for and a predicted
duration (for the progress line's ETA).  Backends: :mod:`.local` (submitit's local executor),
:mod:`.slurm` (submitit on Slurm), :mod:`.ray_backend` (Ray tasks).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, runtime_checkable

#: Outcome kinds.  ``ok`` carries the job's return value; every other kind carries a one-line reason.
OK, FAILED, KILLED, PREEMPTED, TIMEOUT, LOST, CANCELLED, BAD_INPUT = (
    "ok", "failed", "killed", "preempted", "timeout", "lost", "cancelled", "bad-input")
OUTCOMES = (OK, FAILED, KILLED, PREEMPTED, TIMEOUT, LOST, CANCELLED, BAD_INPUT)

#: A job function that refuses its input (a ConfigError: the same input fails the same way, so it
#: is not retried) returns ``{BAD_INPUT_KEY: "the one line"}`` instead of raising: an exception
#: crosses the process boundary as a traceback text, a returned value as data.
BAD_INPUT_KEY = "etbench_bad_input"


@dataclass(frozen=True)
class Resources:
    """What one job asks its scheduler for.  ``gpus``: the point's world size on GPUs (0 on CPU),
    its ranks started inside the job; ``mem_gb``: host memory (None: the scheduler's default);
    ``time_min``: the wall-clock limit, after which the job is stopped and counted as timed out."""
    gpus: int = 0
    cpus: int = 1
    mem_gb: int | None = None
    time_min: int = 60

    def __post_init__(self):
        if self.gpus < 0 or self.cpus < 1 or self.time_min < 1 or (self.mem_gb is not None and self.mem_gb < 1):
            raise ValueError(f"invalid job resources {self}")


@dataclass(frozen=True)
class Task:
    """One job: ``fn(payload)`` in the job's process, returning plain JSON data."""
    key: str  # unique within a sweep, filesystem-safe: names the job and its journal entry
    fn: Callable[[dict], dict]
    payload: dict
    resources: Resources = field(default_factory=Resources)
    predicted_s: float = 0.0  # the job's predicted duration, for the ETA (0: unknown)


@dataclass(frozen=True)
class Outcome:
    kind: str  # one of OUTCOMES
    value: dict | None = None  # the job's return value when kind is ok
    reason: str = ""  # one line when kind is not ok

    def __post_init__(self):
        if self.kind not in OUTCOMES:
            raise ValueError(f"unknown outcome {self.kind!r}; valid: {', '.join(OUTCOMES)}")


@runtime_checkable
class Handle(Protocol):
    """A submitted job."""
    task: Task
    job_id: str

    def poll(self) -> Outcome | None:
        """The job's outcome once it ended, else None; never blocks."""

    def started(self) -> bool:
        """Whether the job's process is running (False while it waits in a queue)."""

    def cancel(self) -> None:
        """Stop the job (a no-op once it ended)."""


@runtime_checkable
class Executor(Protocol):
    """Runs tasks as jobs.  ``slots``: how many jobs it runs at once (the driver submits no more);
    None when the scheduler queues them itself (Slurm: everything is submitted at once)."""
    name: str
    slots: int | None

    def submit(self, tasks: Sequence[Task]) -> list[Handle]:
        """Start (or queue) one job per task, in order; tasks with the same resources may go as one
        array job."""

    def close(self) -> None:
        """Release what the executor holds (a Ray connection, say); jobs it submitted that are
        still running are left to their scheduler."""


@runtime_checkable
class Adopting(Protocol):
    """An executor that can take over a job a stopped driver left running (Slurm's jobs outlive
    their driver): the driver hands it the task and the journal's last attempt of that task."""

    def adopt(self, task: Task, attempt: dict) -> Handle | None:
        """A handle on that attempt's job if it is still queued or running, else None."""
