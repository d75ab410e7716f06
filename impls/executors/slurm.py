"""Jobs on a Slurm cluster, through submitit (issue 25).

Slurm queues jobs itself, so :class:`SlurmExecutor` has no slots: the driver submits every queued
task at once.  Tasks with the same :class:`~.base.Resources` go as **one array job** (one
``sbatch``, ``--array=0-N%P``): a sweep of a hundred points is a handful of submissions, and the
array's ``%P`` (``array_parallelism``) is how many of them the cluster runs at once.  A submitit
array shares one parameter set, so each distinct Resources is its own array, built by its own
submitit executor (parameters set for one group must not leak into the next: a GPU count, say).

Polling never blocks.  submitit's ``job.result()``/``job.done()`` wait (up to 15 s for a result
file that may never come, forever for a preempted job), so a handle reads the job's result
pickle itself and falls back on the ``sacct`` state from submitit's shared watcher, refreshed at
most every ``state_refresh_s`` seconds for all jobs at once (one ``sacct`` call: a cluster's
accounting daemon is shared by everyone).

Preemption and timeouts are not requeued by submitit (``slurm_max_num_timeout=0``, and the job's
``checkpoint()`` returns None): they reach the driver, which records the reason and resubmits
under its own retry count, the same way for every backend.

The job folder must be on a filesystem the nodes share, and the driver's Python (or
``SlurmConfig.python``) must exist there: Slurm runs the job as ``python -m
submitit.core._submit FOLDER``, which imports the task's function by name.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError
from .base import (BAD_INPUT, BAD_INPUT_KEY, CANCELLED, FAILED, KILLED, LOST, OK, PREEMPTED, TIMEOUT, Outcome,
                   Resources, Task)

#: Seconds between Slurm's warning signal (USR2, which the job answers by writing its signal
#: marker) and the end of the time limit: submitit's default.  A job shorter than twice this is
#: warned halfway through.
SIGNAL_DELAY_S = 90

#: sacct states of a job that has not ended (submitit's watcher reports UNKNOWN until sacct knows
#: the job, which can take a few seconds after sbatch returns).
QUEUED_STATES = frozenset({"PENDING", "REQUEUE_HOLD", "REQUEUE_FED", "REQUEUED", "RESV_DEL_HOLD", "UNKNOWN", ""})
RUNNING_STATES = frozenset({"RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "STOPPED", "RESIZING",
                            "SIGNALING", "STAGE_OUT"})
#: An ended job's sacct state -> its outcome when the job left no result file (CANCELLED is
#: "CANCELLED by <uid>" in sacct, matched by prefix; COMPLETED without a result is lost).
ENDED_STATES = {"PREEMPTED": PREEMPTED, "TIMEOUT": TIMEOUT, "DEADLINE": TIMEOUT, "CANCELLED": CANCELLED,
                "FAILED": FAILED, "BOOT_FAIL": FAILED, "NODE_FAIL": KILLED, "OUT_OF_MEMORY": KILLED,
                "COMPLETED": LOST, "REVOKED": LOST, "SPECIAL_EXIT": FAILED}


def _last_line(text: str, limit: int = 300) -> str:
    """The last non-empty line of ``text`` (a traceback's ends with the exception), shortened to
    ``limit`` characters: a reason is one line of the journal and the progress output."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _tail(path: Path, size: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


# --- configuration --------------------------------------------------------------------------

@dataclass
class SlurmConfig:
    """Where and how jobs go on the cluster: what ``--slurm-*`` flags and ``--slurm-config FILE``
    say.  ``setup``: shell lines the batch script runs before the job (``module load``, ``source
    venv/bin/activate``); ``additional``: any other ``#SBATCH`` flag, ``{"requeue": True,
    "mail-type": "END"}``; ``python``: the interpreter command on the nodes (default: this one);
    ``mem_gb``/``time_min``: override every job's own estimate (a cluster whose partitions need a
    fixed size, or a prediction known to be off)."""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    array_parallelism: int = 256
    setup: list[str] = field(default_factory=list)
    additional: dict = field(default_factory=dict)
    python: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    mem_gb: int | None = None
    time_min: int | None = None

    def __post_init__(self):
        _check({f.name: getattr(self, f.name) for f in fields(self)}, "slurm config")
        self.setup, self.additional = list(self.setup), dict(self.additional)  # never shared with the caller's

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def load(cls, path: str | os.PathLike) -> SlurmConfig:
        """The config in the JSON file at ``path`` (an object whose keys are this class's fields;
        ``additional_parameters``, submitit's name, is accepted for ``additional``)."""
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read the slurm config {path}: {e.strerror or e}") from None
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"the slurm config {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"the slurm config {path} must be a JSON object of {{key: value}}, "
                              f"not {type(data).__name__}; valid keys: {', '.join(cls.keys())}")
        if "additional_parameters" in data:
            if "additional" in data:
                raise ConfigError(f"the slurm config {path} has both 'additional' and 'additional_parameters' "
                                  f"(the same setting); keep one")
            data["additional"] = data.pop("additional_parameters")
        _check(data, f"the slurm config {path}")
        return cls(**data)

    def merged(self, flags: dict) -> SlurmConfig:
        """This config with ``flags`` (field name -> value, from the command line) winning; a
        flag that was not given (None, or an empty list/dict) keeps this config's value.
        ``additional`` is merged key by key (a flag's key wins)."""
        given = {k: v for k, v in flags.items() if v is not None and not (isinstance(v, (list, tuple, dict)) and not v)}
        _check(given, "slurm flags")
        if "additional" in given:
            given["additional"] = {**self.additional, **given["additional"]}
        if "setup" in given:
            given["setup"] = list(given["setup"])
        return replace(self, **given)


def _check(values: dict, source: str) -> None:
    """ConfigError (one line naming ``source``, the key and its bad value) unless every key is a
    SlurmConfig field with a value of the right type."""
    valid = SlurmConfig.keys()
    for key, value in values.items():
        if key not in valid:
            raise ConfigError(f"{source}: unknown key {key!r}; valid: {', '.join(valid)}")
        if key in ("array_parallelism", "mem_gb", "time_min"):
            ok = (value is None and key != "array_parallelism") or (
                isinstance(value, int) and not isinstance(value, bool) and value >= 1)
            expected = "a positive integer"
        elif key == "setup":
            ok = isinstance(value, (list, tuple)) and all(isinstance(line, str) for line in value)
            expected = "a list of shell lines"
        elif key == "additional":
            ok = isinstance(value, dict) and all(isinstance(k, str) and k.strip() for k in value) and all(
                v is True or (isinstance(v, (str, int, float)) and not isinstance(v, bool)) for v in value.values())
            expected = 'an object of sbatch flags, e.g. {"requeue": true, "mail-type": "END"}'
        else:
            ok = value is None or (isinstance(value, str) and value.strip() != "")
            expected = "a non-empty string"
        if not ok:
            raise ConfigError(f"{source}: {key}={value!r} is invalid; expected {expected}")


# --- executor -------------------------------------------------------------------------------

def _submitit_folder(folder: Path) -> Path:
    return Path(folder) / "submitit" / "%j"


def slurm_script(folder: str | os.PathLike, job_id: str) -> str:
    """The batch script submitit generated for ``job_id`` (``"1000"`` or an array element
    ``"1000_3"``: an array has one script) of a :class:`SlurmExecutor` over ``folder``."""
    from submitit.core.utils import JobPaths

    base = str(job_id).split("_", 1)[0]  # submitit files an array's script under its first job's id
    return JobPaths(_submitit_folder(Path(folder)), job_id=base).submission_file.read_text()


class _StateReader:
    """The sacct states of an executor's jobs, through submitit's class-level watcher (one
    ``sacct`` for every unfinished job), refreshed at most every ``interval_s`` seconds."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._last = float("-inf")

    def state(self, job_id: str, refresh: bool = True) -> str:
        import submitit

        watcher = submitit.SlurmJob.watcher
        if refresh and time.monotonic() - self._last >= self.interval_s:
            watcher.update()  # a failing sacct is only logged by submitit: the state stays as it was
            self._last = time.monotonic()
        return watcher.get_state(job_id, mode="cache").upper()


class SlurmHandle:
    """One submitted job (an array element or a single job).  ``folder``: its submitit folder
    (result pickle, logs), for the journal."""

    def __init__(self, task: Task, job, started_path: Path, signal_path: Path, token: str, states: _StateReader,
                 result_grace_s: float, lost_after_s: float, time_min: int):
        self.task, self.job, self.time_min = task, job, time_min
        self.job_id = str(job.job_id)
        self.folder = str(job.paths.folder)
        self.started_path, self.signal_path, self.token = Path(started_path), Path(signal_path), token
        self._states = states
        self._grace_s, self._lost_after_s = result_grace_s, lost_after_s
        self._submitted = time.monotonic()
        self._ended_at: float | None = None  # when sacct first said the job ended without a result
        self._cancelled = False
        self._outcome: Outcome | None = None

    def __repr__(self) -> str:
        return f"SlurmHandle({self.task.key!r}, job {self.job_id})"

    def _result(self) -> Outcome | None:
        """The outcome from the job's result pickle; None while there is none (or it cannot be
        read yet: a shared filesystem may show a file before its contents)."""
        path = self.job.paths.result_pickle
        if not path.exists():
            return None
        from submitit.core.utils import pickle_load

        try:
            status, value = pickle_load(path)
        except (OSError, EOFError, ValueError):
            return None
        except Exception as e:  # the value's class cannot be imported here, say
            return Outcome(FAILED, reason=f"cannot read the result of job {self.job_id}: {type(e).__name__}: {e}")
        if status == "success":
            if isinstance(value, dict) and BAD_INPUT_KEY in value:
                return Outcome(BAD_INPUT, reason=_last_line(str(value[BAD_INPUT_KEY])))
            return Outcome(OK, value=value)
        signal = self._signal_case()
        if signal is not None:
            return signal
        return Outcome(FAILED, reason=_last_line(str(value)) or f"job {self.job_id} failed")

    def _signal_case(self) -> Outcome | None:
        """The job's signal marker (its ``checkpoint()`` ran on Slurm's USR2): preempted or timed
        out, as the job judged from its own run time."""
        from .job import TIMED_OUT, read_marker

        marker = read_marker(self.signal_path, self.token)
        if marker is None:
            return None
        if marker.get("case") == TIMED_OUT:
            return Outcome(TIMEOUT, reason=f"ran past its {self.time_min} min limit (Slurm signalled it)")
        return Outcome(PREEMPTED, reason="preempted (Slurm signalled the job before its time limit)")

    def poll(self) -> Outcome | None:
        if self._outcome is not None:
            return self._outcome
        outcome = self._result()
        if outcome is None:
            outcome = self._from_state()
        self._outcome = outcome
        return outcome

    def _from_state(self) -> Outcome | None:
        state = self._states.state(self.job_id)
        word = state.split()[0] if state else ""
        if word in RUNNING_STATES:
            return None
        if word in QUEUED_STATES:
            if word in ("UNKNOWN", "") and time.monotonic() - self._submitted > self._lost_after_s:
                return Outcome(LOST, reason=f"sacct does not know job {self.job_id} "
                                            f"{self._lost_after_s / 60:.0f} min after its submission")
            return None
        # Ended without a result when we looked: the job may have written it just now, or a
        # shared filesystem may show it a little later.
        self._refresh_folder()
        outcome = self._result()
        if outcome is not None:
            return outcome
        now = time.monotonic()
        if self._ended_at is None:
            self._ended_at = now
        if now - self._ended_at < self._grace_s:
            return None
        kind = ENDED_STATES.get(word, FAILED)
        if self._cancelled or word == "CANCELLED":
            kind = CANCELLED
        if kind == LOST:
            return Outcome(LOST, reason=f"Slurm says {state} but job {self.job_id} left no result")
        stderr = _last_line(_tail(self.job.paths.stderr), 200)
        return Outcome(kind, reason=f"Slurm state {state}" + (f"; last stderr line: {stderr}" if stderr else ""))

    def _refresh_folder(self) -> None:
        folder = self.job.paths.folder
        try:  # as submitit does: a chmod refreshes an NFS client's view of the folder
            folder.chmod(folder.stat().st_mode)
        except OSError:
            pass

    def started(self) -> bool:
        from .job import read_marker

        if self._outcome is not None or read_marker(self.started_path, self.token) is not None:
            return True
        state = self._states.state(self.job_id)
        return bool(state) and state.split()[0] in RUNNING_STATES

    def cancel(self) -> None:
        if self._outcome is not None or self.job.paths.result_pickle.exists():
            return
        self._cancelled = True
        self.job.cancel(check=False)  # scancel of an ended job only complains


class SlurmExecutor:
    """Runs tasks as Slurm jobs, one array per distinct Resources.

    ``folder``: where submitit keeps each job's pickles and logs (``folder/submitit/<job id>/``)
    and the jobs their start and signal markers (``folder/markers/``); on a shared filesystem.
    ``state_refresh_s``: the least time between two ``sacct`` calls (tests: a few seconds).
    ``result_grace_s``: how long a job that ended without a result file is given for that file to
    appear before its sacct state is the outcome (a shared filesystem's delay; submitit waits 15 s).
    ``lost_after_s``: how long sacct may not know a submitted job before it counts as lost.
    """

    name = "slurm"
    slots = None

    def __init__(self, folder: str | os.PathLike, config: SlurmConfig | None = None, *,
                 state_refresh_s: float = 30.0, result_grace_s: float = 15.0, lost_after_s: float = 600.0):
        import shutil

        missing = [tool for tool in ("sbatch", "srun", "sacct") if shutil.which(tool) is None]
        if missing:  # before any work: a sweep that cannot submit must not start
            raise ConfigError(f"executor 'slurm' needs Slurm's {', '.join(missing)} on PATH, which "
                              f"{'is' if len(missing) == 1 else 'are'} not there; valid: run it on a Slurm "
                              f"login node, or --executor local|ray")
        self.folder = Path(folder).absolute()
        self.config = config or SlurmConfig()
        self._states = _StateReader(state_refresh_s)
        self._grace_s, self._lost_after_s = result_grace_s, lost_after_s

    def _parameters(self, r: Resources) -> dict:
        c = self.config
        params = dict(name="etbench", timeout_min=self._time_min(r), mem_gb=c.mem_gb or r.mem_gb,
                      nodes=1, tasks_per_node=1, cpus_per_task=r.cpus,
                      gpus_per_node=r.gpus if r.gpus > 0 else None,
                      slurm_partition=c.partition, slurm_account=c.account, slurm_qos=c.qos,
                      slurm_array_parallelism=c.array_parallelism, slurm_setup=list(c.setup) or None,
                      slurm_additional_parameters=dict(c.additional) or None,
                      slurm_constraint=c.constraint, slurm_exclude=c.exclude,
                      slurm_signal_delay_s=self._signal_delay_s(r))
        return {k: v for k, v in params.items() if v is not None}

    def _time_min(self, r: Resources) -> int:
        return self.config.time_min or r.time_min

    def _signal_delay_s(self, r: Resources) -> int:
        return min(SIGNAL_DELAY_S, self._time_min(r) * 60 // 2)

    def _executor(self, r: Resources):
        """A fresh submitit executor for one group: parameters persist in an executor (None
        means "unchanged"), so reusing one would carry a group's GPUs or memory into the next."""
        import submitit

        extra = {"slurm_python": self.config.python} if self.config.python else {}
        ex = submitit.AutoExecutor(_submitit_folder(self.folder), cluster="slurm", slurm_max_num_timeout=0, **extra)
        ex.update_parameters(**self._parameters(r))
        return ex

    def submit(self, tasks: Sequence[Task]) -> list[SlurmHandle]:
        groups: dict[Resources, list[int]] = {}
        for i, task in enumerate(tasks):
            groups.setdefault(task.resources, []).append(i)
        markers = self.folder / "markers"
        markers.mkdir(parents=True, exist_ok=True)
        handles: list[SlurmHandle | None] = [None] * len(tasks)
        for resources, indices in groups.items():
            try:
                self._submit_group(tasks, resources, indices, markers, handles)
            except ConfigError:
                for handle in handles:  # all or nothing: the driver knows of none of them
                    if handle is not None:
                        handle.cancel()
                raise
        return handles  # type: ignore[return-value]

    def _submit_group(self, tasks: Sequence[Task], resources: Resources, indices: list[int], markers: Path,
                      handles: list) -> None:
        """One sbatch (an array, or a plain job for a group of one); sbatch's refusal (an unknown
        partition or account, a limit the QoS does not allow) as a one-line ConfigError."""
        from submitit.core.utils import FailedJobError, FailedSubmissionError

        from .job import Job

        ex = self._executor(resources)
        submitted = []
        printed = io.StringIO()  # submitit prints sbatch's stderr when it fails: the error says it in one line
        try:
            with contextlib.redirect_stderr(printed), ex.batch():
                for i in indices:
                    task = tasks[i]
                    # A fresh token per submission: a retry never reads its previous attempt's markers.
                    token = uuid.uuid4().hex[:12]
                    started = markers / f"{task.key}.{token}.started"
                    signal = markers / f"{task.key}.{token}.signal"
                    job = Job(task.fn, started, signal, token=token, timeout_s=self._time_min(resources) * 60,
                              signal_delay_s=self._signal_delay_s(resources))
                    submitted.append((i, ex.submit(job, task.payload), started, signal, token))
        except (FailedJobError, FailedSubmissionError) as e:
            keys = [tasks[i].key for i in indices]
            names = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            raise ConfigError(f"sbatch refused the job{'s' if len(keys) > 1 else ''} of {names} ({resources}): "
                              f"{_last_line(str(e)) or type(e).__name__}; nothing was submitted") from None
        sys.stderr.write(printed.getvalue())
        for i, job, started, signal, token in submitted:  # job ids exist once the batch is submitted
            handles[i] = self._handle(tasks[i], job, started, signal, token)

    def _handle(self, task, job, started, signal, token) -> SlurmHandle:
        return SlurmHandle(task, job, started, signal, token, self._states, self._grace_s, self._lost_after_s,
                           self._time_min(task.resources))

    def adopt(self, task: Task, attempt: dict) -> SlurmHandle | None:
        """The handle of a job a stopped driver submitted (its journal ``attempt``), so a rerun
        waits for it instead of submitting the point again; None when its submission is gone.
        The markers' paths and token come from the submitted pickle, the job's own callable."""
        import submitit
        from submitit.core.utils import DelayedSubmission

        from .job import Job

        job_id = str(attempt.get("job_id") or "")
        if not job_id:
            return None
        job = submitit.SlurmJob(folder=_submitit_folder(self.folder), job_id=job_id)
        try:
            fn = DelayedSubmission.load(job.paths.submitted_pickle).function
        except Exception:  # noqa: BLE001 - missing, truncated, or its function no longer importable
            return None
        if not isinstance(fn, Job):
            return None
        return self._handle(task, job, fn.started_path, fn.signal_path, fn.token)

    def close(self) -> None:
        """Nothing to release: submitted jobs stay with Slurm (rerunning the command resumes)."""
