"""Jobs as Ray tasks, on a local Ray instance or an existing cluster (issue 25).

(Named ``ray_backend`` so that it cannot shadow or be confused with the ``ray`` package.)

Every failure must reach the driver's retry loop, where it is counted and its reason recorded,
so Ray's own retries are off: ``max_retries=0`` for worker crashes, ``retry_exceptions=False``
for exceptions, and ``RAY_task_oom_retries=0`` for its memory monitor's kills (retried without
limit by default).  ``max_calls=1`` gives every job a fresh worker process: a job's threads,
allocator state or global settings never leak into the next point.

Ray has no per-task time limit, so a handle stops a job itself once it has run past its
``time_min`` (``ray.cancel(force=True)``, reported as timeout), counting from the job's start
marker (a queued task is not running).  A task asking for more GPUs, CPUs or memory than any node
has would wait forever, so :meth:`RayExecutor.submit` refuses it first, in one line.

Without the dashboard there is no state API, so "has the job started" is the start marker the
job writes (:class:`.job.Job`) in ``folder``: on a multi-node cluster that folder must be on a
shared filesystem (as the sweep's store is, since jobs write their records there).  Where the
markers cannot be seen (the default temporary folder, with nodes on other hosts) the time limit
counts from the submission instead.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError
from .base import BAD_INPUT, BAD_INPUT_KEY, CANCELLED, FAILED, KILLED, LOST, OK, TIMEOUT, Outcome, Task

#: Ray's object store on a local instance: results are a few kB of JSON, and the default (30% of
#: RAM, in /dev/shm) only takes memory from the jobs.  Ray's minimum is 75 MiB.
OBJECT_STORE_BYTES = 128 * 2**20


def _last_line(text: str, limit: int = 300) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _call(job, payload):
    """What runs in the Ray worker: the job (its start marker, then ``fn(payload)``)."""
    return job(payload)


class RayHandle:
    def __init__(self, task: Task, ref, started_path: Path, token: str, markers_visible: bool = True):
        self.task, self.ref, self.token = task, ref, token
        self._markers_visible = markers_visible
        self.job_id = ref.task_id().hex()
        self.started_path = Path(started_path)
        self._submitted = time.monotonic()
        self._started_at: float | None = None
        self._outcome: Outcome | None = None

    def __repr__(self) -> str:
        return f"RayHandle({self.task.key!r}, task {self.job_id})"

    def started(self) -> bool:
        from .job import read_marker

        if self._started_at is None and read_marker(self.started_path, self.token) is not None:
            self._started_at = time.monotonic()
        return self._started_at is not None or self._outcome is not None

    def poll(self) -> Outcome | None:
        if self._outcome is not None:
            return self._outcome
        import ray

        ready, _ = ray.wait([self.ref], timeout=0)
        if ready:
            self._outcome = self._get()
            return self._outcome
        limit_s = self.task.resources.time_min * 60
        since = self._started_at if self.started() else (None if self._markers_visible else self._submitted)
        if since is not None and time.monotonic() - since > limit_s:
            ray.cancel(self.ref, force=True)  # kills the worker process (and what it started)
            self._outcome = Outcome(TIMEOUT, reason=f"ran past its {self.task.resources.time_min} min limit; stopped")
        return self._outcome

    def _get(self) -> Outcome:
        import ray
        from ray import exceptions as rx

        try:
            value = ray.get(self.ref, timeout=0)
        except rx.TaskCancelledError:
            return Outcome(CANCELLED, reason="cancelled")
        except rx.OutOfMemoryError:
            return Outcome(KILLED, reason="out of memory (Ray's memory monitor killed the worker)")
        except rx.WorkerCrashedError:
            return Outcome(KILLED, reason="the worker process died (killed by a signal, or crashed)")
        except (rx.NodeDiedError, rx.LocalRayletDiedError, rx.ObjectLostError) as e:
            return Outcome(LOST, reason=f"{type(e).__name__}: {_last_line(str(e))}")
        except rx.RayTaskError as e:
            cause = e.cause
            if isinstance(cause, BaseException):
                text = "".join(traceback.format_exception_only(type(cause), cause))
            else:
                text = e.traceback_str
            return Outcome(FAILED, reason=_last_line(text) or "the task raised")
        except rx.RayError as e:  # e.g. RuntimeEnvSetupError, TaskUnschedulableError
            return Outcome(FAILED, reason=f"{type(e).__name__}: {_last_line(str(e))}")
        if isinstance(value, dict) and BAD_INPUT_KEY in value:
            return Outcome(BAD_INPUT, reason=_last_line(str(value[BAD_INPUT_KEY])))
        return Outcome(OK, value=value)

    def cancel(self) -> None:
        if self._outcome is not None:
            return
        import ray

        ready, _ = ray.wait([self.ref], timeout=0)
        if ready:  # ended: its outcome stands
            return
        ray.cancel(self.ref, force=True)
        self._outcome = Outcome(CANCELLED, reason="cancelled")


class RayExecutor:
    """Runs tasks as Ray tasks.

    ``address``: an existing cluster (``"auto"``, ``"host:6379"``, ``"ray://host:10001"``); None
    starts a local instance (or attaches to ``$RAY_ADDRESS``, as under ``ray job submit``, or to
    the instance this process already has).  ``cpus``: the local instance's CPU count (default:
    all); refused with an address, where the cluster has its own.  ``jobs``: how many jobs run at
    once (default: the cluster's CPUs).  ``folder``: where jobs write their start markers (default:
    a temporary folder, removed by :meth:`close`).
    """

    name = "ray"

    def __init__(self, address: str | None = None, cpus: int | None = None, jobs: int | None = None,
                 folder: str | os.PathLike | None = None):
        for flag, value in (("--ray-cpus", cpus), ("--jobs", jobs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{flag} {value!r} is invalid; valid: a positive integer")
        import ray

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ["RAY_task_oom_retries"] = "0"  # our retry loop counts every failure
        target = address or os.environ.get("RAY_ADDRESS") or "local"
        if cpus is not None and target != "local":
            raise ConfigError(f"--ray-cpus {cpus} sizes a local Ray instance, but the executor attaches to "
                              f"{target!r}, whose CPUs are its own; valid: --ray-cpus without --ray-address")
        self.started_cluster = False
        self.init_s = 0.0  # how long ray.init took (the progress line, and tests, report it)
        if not ray.is_initialized():
            options = dict(address=target, include_dashboard=False, log_to_driver=False,
                           logging_level=logging.ERROR, ignore_reinit_error=True)
            if target == "local":
                options.update(num_cpus=cpus, object_store_memory=OBJECT_STORE_BYTES)
            t0 = time.perf_counter()
            try:
                ray.init(**options)
            except ConnectionError as e:
                raise ConfigError(f"cannot reach the Ray cluster at {target!r}: {_last_line(str(e))}; "
                                  f"valid: the address `ray start --head` printed, or 'auto'") from None
            self.init_s = time.perf_counter() - t0
            self.started_cluster = target == "local"
        self.slots = jobs or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._own_folder = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="etbench-ray-")) if folder is None else Path(folder).absolute()
        # A folder given is on a filesystem the nodes share (the sweep's store is); the temporary
        # default is seen by jobs only where every node is this host.
        here = ray.util.get_node_ip_address()
        self.markers_visible = folder is not None or all(
            n.get("NodeManagerAddress") == here for n in ray.nodes() if n.get("Alive"))
        self._remote = ray.remote(max_retries=0, retry_exceptions=False, max_calls=1)(_call)

    def check(self, task: Task) -> None:
        """ConfigError unless some alive node can hold ``task``'s request (GPUs, CPUs and memory
        on one node): Ray would leave it pending forever."""
        import ray

        r = task.resources
        need = {"GPU": r.gpus, "CPU": r.cpus, "memory": (r.mem_gb or 0) * 2**30}
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if any(all(node.get(k, 0) >= v for k, v in need.items()) for node in nodes):
            return
        shapes = sorted({f"{node.get('CPU', 0):g} CPUs, {node.get('GPU', 0):g} GPUs, "
                         f"{node.get('memory', 0) / 2**30:.1f} GB" for node in nodes})
        asked = f"{r.gpus} GPUs, {r.cpus} CPUs" + (f", {r.mem_gb} GB of memory" if r.mem_gb else "")
        offer = "; ".join(shapes[:4]) + (f"; and {len(shapes) - 4} more" if len(shapes) > 4 else "")
        raise ConfigError(f"job {task.key!r} asks Ray for {asked}, more than any node has (nodes: "
                          f"{offer or 'none alive'}); valid: a request one node can hold")

    def submit(self, tasks: Sequence[Task]) -> list[RayHandle]:
        from .job import Job

        for task in tasks:  # refuse before submitting any
            self.check(task)
        markers = self.folder / "markers"
        markers.mkdir(parents=True, exist_ok=True)
        handles = []
        for task in tasks:
            r = task.resources
            token = uuid.uuid4().hex[:12]  # a fresh token per submission: a retry never reads an earlier marker
            started, signal = markers / f"{task.key}.{token}.started", markers / f"{task.key}.{token}.signal"
            options = dict(num_cpus=r.cpus, num_gpus=r.gpus, name=task.key)
            if r.mem_gb:
                options["memory"] = r.mem_gb * 2**30
            ref = self._remote.options(**options).remote(Job(task.fn, started, signal, token=token), task.payload)
            handles.append(RayHandle(task, ref, started, token, self.markers_visible))
        return handles

    def close(self) -> None:
        """Shut down the Ray instance this executor started (one it attached to stays up, and
        its running tasks with it), and remove the temporary marker folder."""
        if self.started_cluster:
            import ray

            ray.shutdown()
            self.started_cluster = False
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)
