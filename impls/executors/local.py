"""Jobs as processes on this machine, through submitit's local executor (issue 25).

Each job is a submitit controller (``python -m submitit.local._local``) that starts one task
process, ``python -u -m submitit.core._submit``, enforces the time limit (USR2 ``signal_delay_s``
before it, SIGINT then SIGKILL at it) and leaves the job's logs and its result pickle in
``<folder>/submitit/<run>/<controller pid>/``.  What submitit does not do, this module does:

* **A cap on live jobs.**  submitit's local executor has no queue (every submit starts a process
  at once), so :attr:`LocalExecutor.slots` is ``jobs`` and the driver submits no more.
* **GPU ids.**  Left alone, submitit gives every job GPUs ``0..n-1`` and a CPU job an empty
  ``CUDA_VISIBLE_DEVICES``.  The executor hands each job distinct ids out of its own (``gpus``) and
  takes them back when the job ends; a job whose GPUs are all taken waits in its handle (started on
  a later :meth:`LocalHandle.poll`, ``started()`` False meanwhile) instead of sharing one.
* **A poll that never blocks.**  ``job.result()`` and ``job.done()`` wait (up to 15 s for a missing
  result), so :meth:`LocalHandle.poll` looks at the controller process and the result pickle
  itself, and reads the markers :class:`~impls.executors.job.Job` writes to tell a timeout from a
  failure.

``submitit.LocalExecutor`` is used directly: through ``AutoExecutor(cluster="local")`` its
``visible_gpus`` and ``signal_delay_s`` parameters cannot be set.  ``submitit`` is imported when an
executor is made, never when this module is: it is an optional package (``etbench[slurm]``).
"""
from __future__ import annotations

import os
import pickle
import time
import uuid
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError
from .base import BAD_INPUT_KEY, CANCELLED, FAILED, KILLED, OK, PREEMPTED, TIMEOUT, BAD_INPUT, Outcome, Task
from .job import TIMED_OUT, Job, read_marker, signal_path_for

#: Seconds between the timeout warning (USR2) and the stop: the job only writes a marker and its
#: error pickle in that time, so a few seconds do (submitit's default, 30 s, is for checkpoints).
SIGNAL_DELAY_S = 5


def gpu_ids(gpus: int | Sequence[int]) -> list[int]:
    """The GPU ids an executor hands out: ``gpus`` as a list of ids, or a count of the first ones.
    A count is read through this process's ``CUDA_VISIBLE_DEVICES`` when that lists numbers (the
    jobs' ``CUDA_VISIBLE_DEVICES`` is set from these ids, and must name the same devices)."""
    if isinstance(gpus, int):
        if gpus < 0:
            raise ConfigError(f"local executor gpus={gpus}: the number of GPUs must be >= 0")
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if visible and all(v.isdigit() for v in visible):
            if gpus > len(visible):
                raise ConfigError(f"local executor gpus={gpus}: CUDA_VISIBLE_DEVICES={','.join(visible)} "
                                  f"lists only {len(visible)}")
            return [int(v) for v in visible[:gpus]]
        return list(range(gpus))
    ids = [int(i) for i in gpus]
    if len(set(ids)) != len(ids) or any(i < 0 for i in ids):
        raise ConfigError(f"local executor gpus={ids}: each GPU id must be distinct and >= 0")
    return ids


def _last_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


class LocalHandle:
    """One local job: waiting for GPUs, running, or ended (its outcome, once polled)."""

    def __init__(self, executor: "LocalExecutor", task: Task, started_path: Path, token: str):
        self.task = task
        self.job_id = ""  # the controller's pid, once started
        self.folder = ""  # the job's submitit folder, once started
        self._executor = executor
        self._started_path = started_path
        self._token = token
        self._job = None  # submitit.local.local.LocalJob
        self._gpus: list[int] = []
        self._started = False
        self._cancelled = False
        self._outcome: Outcome | None = None

    # the executor starts the job when GPUs are free (at submit, or on a later poll), first come
    # first served: a job that needs more GPUs than are free is not overtaken by smaller ones
    def _try_start(self) -> bool:
        waiting = self._executor._waiting
        ids = self._executor._take_gpus(self.task.resources.gpus) if not waiting or waiting[0] is self else None
        if ids is None:
            if self not in waiting:
                waiting.append(self)
            return False
        if self in waiting:
            waiting.remove(self)
        try:
            self._job = self._executor._start(self.task, ids, self._started_path, self._token)
        except BaseException:
            self._executor._give_gpus(ids)
            raise
        self._gpus = ids
        self.job_id = str(self._job.job_id)
        self.folder = str(self._job.paths.folder)
        return True

    def started(self) -> bool:
        if not self._started and self._job is not None:
            self._started = read_marker(self._started_path, self._token) is not None
        return self._started

    def poll(self) -> Outcome | None:
        if self._outcome is not None:
            return self._outcome
        if self._job is None:
            if self._cancelled:
                return self._end(Outcome(CANCELLED, reason="cancelled before it started"))
            if not self._try_start():
                return None
        # The controller's exit code says nothing about the task's: the result pickle does.  Wait
        # for the controller to end (``state`` polls its process) so its GPUs are free when they
        # are handed on.
        state = self._job.state
        if state == "RUNNING":
            return None
        return self._end(self._read(state))

    def _read(self, state: str) -> Outcome:
        result = Path(self._job.paths.result_pickle)
        if not result.exists():
            if self._cancelled:
                return Outcome(CANCELLED, reason="cancelled")
            how = ("the job's controller was killed by a signal" if state == "INTERRUPTED"
                   else "the job's process ended without a result")
            return Outcome(KILLED, reason=f"{how} (SIGKILL? out of memory?); log: {self._job.paths.stderr}")
        try:
            with open(result, "rb") as f:
                kind, value = pickle.load(f)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign pickle is a failed job, not a crash
            return Outcome(FAILED, reason=f"unreadable result {result}: {type(e).__name__}: {_last_line(str(e))}")
        if kind == "success":
            if isinstance(value, dict) and BAD_INPUT_KEY in value:
                return Outcome(BAD_INPUT, reason=_last_line(value[BAD_INPUT_KEY]))
            return Outcome(OK, value=value)
        signal = read_marker(signal_path_for(self._started_path), self._token)
        if signal is not None:
            if signal.get("case") == TIMED_OUT:
                return Outcome(TIMEOUT, reason=f"timed out: stopped at its {self.task.resources.time_min} min limit")
            return Outcome(PREEMPTED, reason="preempted (USR2 before its time limit)")
        if self._cancelled:
            return Outcome(CANCELLED, reason="cancelled")
        return Outcome(FAILED, reason=_last_line(value))

    def _end(self, outcome: Outcome) -> Outcome:
        self._outcome = outcome
        self._executor._give_gpus(self._gpus)
        self._gpus = []
        return outcome

    def cancel(self) -> None:
        """SIGINT to the controller, which stops the task (SIGINT, then SIGKILL a second later)."""
        if self._outcome is not None:
            return
        self._cancelled = True
        if self._job is not None:
            self._job.cancel()
        elif self in self._executor._waiting:  # never started: let the jobs behind it have the GPUs
            self._executor._waiting.remove(self)


class LocalExecutor:
    """Up to ``jobs`` jobs at once on this machine, GPUs handed out from ``gpus`` (a count or a
    list of ids: :func:`gpu_ids`).  Job folders go under ``folder/submitit/<run>/<pid>`` (``<run>``:
    one per executor, the time it was made), markers under ``folder/markers``.  A task's ``cpus`` and ``mem_gb`` are not enforced here (the machine is
    shared by the jobs the caller chose to run at once); ``time_min`` is."""

    name = "local"

    def __init__(self, folder: str | os.PathLike, jobs: int = 1, gpus: int | Sequence[int] = 0, *,
                 signal_delay_s: int = SIGNAL_DELAY_S, python: str | None = None):
        if jobs < 1:
            raise ConfigError(f"local executor jobs={jobs}: the number of jobs at once must be >= 1")
        import submitit

        self.slots = int(jobs)
        self.folder = Path(folder).absolute()
        self.markers = self.folder / "markers"
        self.gpus = gpu_ids(gpus)
        self._free = list(self.gpus)
        self._waiting: list[LocalHandle] = []  # handles waiting for GPUs, in submission order
        self.signal_delay_s = int(signal_delay_s)
        # One subfolder per executor: submitit names a local job's files by its controller's pid, and
        # pids are reused (32768 of them on many hosts), so a resumed sweep must not find a result
        # or a submitted pickle that an earlier run's job of the same pid left.
        run = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self._submitit = submitit.LocalExecutor(self.folder / "submitit" / run / "%j", python=python)

    def submit(self, tasks: Sequence[Task]) -> list[LocalHandle]:
        for task in tasks:
            if task.resources.gpus > len(self.gpus):
                have = f"{len(self.gpus)} ({','.join(map(str, self.gpus))})" if self.gpus else "none"
                raise ConfigError(f"job {task.key!r} needs {task.resources.gpus} GPUs; the local executor has "
                                  f"{have} (its gpus=)")
        handles = []
        for task in tasks:
            handle = LocalHandle(self, task, self.markers / f"{task.key}.started", uuid.uuid4().hex[:12])
            handle._try_start()
            handles.append(handle)
        return handles

    @property
    def free_gpus(self) -> list[int]:
        """The GPU ids no running job holds."""
        return list(self._free)

    def _take_gpus(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        ids, self._free = self._free[:n], self._free[n:]
        return ids

    def _give_gpus(self, ids: list[int]) -> None:
        self._free = sorted(set(self._free) | set(ids), key=self.gpus.index)

    def _start(self, task: Task, ids: list[int], started_path: Path, token: str):
        timeout_s = 60 * task.resources.time_min
        delay = min(self.signal_delay_s, timeout_s // 2)
        self._submitit.update_parameters(timeout_min=task.resources.time_min, gpus_per_node=len(ids),
                                         visible_gpus=tuple(ids), tasks_per_node=1, signal_delay_s=delay)
        job = Job(task.fn, started_path, token=token, timeout_s=timeout_s, signal_delay_s=delay)
        return self._submitit.submit(job, task.payload)

    def close(self) -> None:
        """Nothing is held: running controllers are independent processes and finish on their own."""
