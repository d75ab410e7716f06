"""Runs a sweep's tasks on an executor: submit, poll, retry, journal, progress (issue 25).

:func:`run_all` keeps at most ``executor.slots`` jobs alive (all of them at once when the scheduler
queues them itself), polls their handles, hands each result to the sweep (``on_done``: the sweep
writes its store) and retries what failed for a reason that may not recur: a job killed by the OOM
killer or a preemption, a node that died, a timeout that a quieter machine would meet.  A job that
refused its input (:data:`~impls.executors.base.BAD_INPUT`) is not retried: the same input fails
the same way.

**The journal** (``journal``, JSON, rewritten atomically after every event) keeps each task's
state and every attempt with its one-line reason, so "why did this point fail" has an answer
after the terminal is gone.  It is history, not truth: the sweep's store decides what is done
(a sweep passes only its unfinished points), and a later driver loads the journal and appends to
it, so a resumed sweep keeps the reasons of the runs before it.  Its shape::

    {key: {"state": "queued" | "running" | "ok" | "failed" | "bad-input" | "cancelled",
           "attempts": [{"n", "executor", "job_id", "submitted", "ended", "outcome", "reason"}, ...]}}

(plus ``folder``, the job's own folder with its logs, for a backend whose handles have one).

A task whose entry says ``running`` was left by a driver that stopped (killed, or Ctrl-C on Slurm,
whose jobs are left to run): an executor that can take such a job over (an ``adopt(task,
attempt) -> Handle | None`` method) gets it back; otherwise that attempt is closed as
:data:`~impls.executors.base.LOST` and the task is submitted again.

**Ctrl-C** cancels the running jobs of a local or Ray executor (they would otherwise outlive the
command) but leaves Slurm's in their queue, says so, flushes the journal and re-raises.

**The progress line** (:func:`progress_line`) is redrawn in place on a terminal and printed as a
new line otherwise, when the counts change and at most every 30 s (a log of a day-long sweep
stays readable).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, NamedTuple, Sequence, TextIO

from ..errors import ConfigError
from ..files import write_text
from .base import BAD_INPUT, CANCELLED, LOST, OK, Adopting, Executor, Handle, Outcome, Task

#: Seconds between two progress lines when the output is not a terminal.
LOG_EVERY_S = 30.0
#: Seconds between two redraws on a terminal while the counts stay the same (the ETA still moves).
REDRAW_EVERY_S = 1.0

QUEUED, RUNNING, FAILED_STATE = "queued", "running", "failed"


class Counts(NamedTuple):
    """What the progress line shows: ``done`` of ``total``; ``running`` (the job's process has
    started), ``queued`` (not submitted yet, or waiting in the scheduler's queue), ``failed`` (for
    good: retries exhausted, or bad input) and ``retried`` (resubmissions so far)."""
    done: int
    total: int
    running: int
    queued: int
    failed: int
    retried: int


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (hours unbounded)."""
    total = max(0, int(round(seconds)))
    hours, rest = divmod(total, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def progress_line(counts: Counts, eta_s: float | None, what: str, executor_name: str) -> str:
    """``etbench <what> [<executor>]: D/N done, R running, Q queued, F failed (K retried), ETA H:MM:SS``
    (``ETA unknown`` when no remaining task has a predicted duration)."""
    eta = "unknown" if eta_s is None else format_duration(eta_s)
    return (f"etbench {what} [{executor_name}]: {counts.done}/{counts.total} done, {counts.running} running, "
            f"{counts.queued} queued, {counts.failed} failed ({counts.retried} retried), ETA {eta}")


def eta_seconds(queued: Sequence[float], running: Sequence[tuple[float, float]], ratios: Sequence[float],
                parallel: int) -> float | None:
    """Seconds until the remaining tasks end: their predicted durations (``queued``: in full;
    ``running``: ``(predicted, elapsed)``, what is left of it), scaled by how the finished jobs
    compared with their predictions (the median of actual / predicted; 1 before any), over the jobs
    that run at once.  None when tasks remain and none has a prediction."""
    left = sum(queued) + sum(max(0.0, p - e) for p, e in running)
    if left <= 0 and (any(p <= 0 for p in queued) or any(p <= 0 for p, _ in running)):
        return None
    scale = statistics.median(ratios) if ratios else 1.0
    return left * scale / max(1, parallel)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Journal:
    """The journal file: loaded when it exists (an earlier driver's history), rewritten whole and
    atomically by :meth:`flush`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        if self.path.exists():
            try:
                entries = json.loads(self.path.read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"job journal {self.path}: unreadable ({type(e).__name__}: {e}); "
                                  f"move it away to start a new one") from None
            if not isinstance(entries, dict) or not all(isinstance(v, dict) and isinstance(v.get("attempts"), list)
                                                        for v in entries.values()):
                raise ConfigError(f"job journal {self.path}: not a journal ({{key: {{state, attempts}}}}); "
                                  f"move it away to start a new one")
            self.entries = entries

    def entry(self, key: str) -> dict:
        return self.entries.setdefault(key, {"state": QUEUED, "attempts": []})

    def flush(self) -> None:
        write_text(self.path, json.dumps(self.entries, indent=1, sort_keys=True) + "\n")


@dataclass
class _Live:
    task: Task
    handle: Handle
    attempt: dict  # this attempt's journal record
    submitted: float  # clock()
    started: float | None = None  # clock() when the handle was first seen started


class _Progress:
    """The one live line: redrawn on a terminal, logged on change (at most every LOG_EVERY_S) otherwise."""

    def __init__(self, stream: TextIO, what: str, executor_name: str, enabled: bool, clock: Callable[[], float]):
        self.stream, self.what, self.executor_name, self.enabled, self.clock = stream, what, executor_name, enabled, clock
        try:
            self.tty = bool(stream.isatty())
        except (AttributeError, ValueError):
            self.tty = False
        self.shown_counts: Counts | None = None
        self.shown_at = float("-inf")
        self.drawn = False  # a terminal line is on screen without its newline

    def update(self, counts: Counts, eta_s: float | None, final: bool = False) -> None:
        if not self.enabled:
            return
        now = self.clock()
        changed = counts != self.shown_counts
        if self.tty:
            if not (changed or final or now - self.shown_at >= REDRAW_EVERY_S):
                return
            self.stream.write("\r\x1b[K" + progress_line(counts, eta_s, self.what, self.executor_name)
                              + ("\n" if final else ""))
            self.drawn = not final
        else:
            if not changed or (not final and now - self.shown_at < LOG_EVERY_S):
                return
            self.stream.write(progress_line(counts, eta_s, self.what, self.executor_name) + "\n")
        self.stream.flush()
        self.shown_counts, self.shown_at = counts, now

    def say(self, line: str) -> None:
        """A line of its own (below the live line on a terminal)."""
        if self.drawn:
            self.stream.write("\n")
            self.drawn = False
        self.stream.write(line + "\n")
        self.stream.flush()


def run_all(tasks: Sequence[Task], executor: Executor, *, journal: str | Path,
            on_done: Callable[[Task, dict], None], on_failed: Callable[[Task, list[str]], None],
            retries: int = 2, poll_s: float = 0.2, progress: bool = True, stream: TextIO | None = None,
            clock: Callable[[], float] = time.monotonic, what: str = "sweep") -> dict:
    """Run every task as a job on ``executor`` until each has ended ok or for good.

    ``on_done(task, value)`` is called with each job's return value; ``on_failed(task, reasons)``
    once per task that failed for good (bad input at once; anything else after ``1 + retries``
    attempts in this call), with the one-line reason of each of this call's attempts.  ``what``
    names the sweep in the progress line, written to ``stream`` (default: ``sys.stderr`` at the time
    of the call).  Returns the counts: ``{"tasks", "ok", "failed",
    "bad-input", "attempts", "retried"}``."""
    if retries < 0:
        raise ConfigError(f"retries={retries}: the number of retries must be >= 0")
    keys = [t.key for t in tasks]
    if len(set(keys)) != len(keys):
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        raise ConfigError(f"duplicate task keys {', '.join(duplicates)}: each job needs its own key")
    summary = {"tasks": len(tasks), OK: 0, FAILED_STATE: 0, BAD_INPUT: 0, "attempts": 0, "retried": 0}
    if not tasks:
        return summary
    book = Journal(journal)
    slots = executor.slots
    show = _Progress(sys.stderr if stream is None else stream, what, executor.name, progress, clock)
    queue: deque[Task] = deque()
    live: list[_Live] = []
    reasons: dict[str, list[str]] = {t.key: [] for t in tasks}
    tries: dict[str, int] = {t.key: 0 for t in tasks}
    ratios: list[float] = []
    adopt = executor.adopt if isinstance(executor, Adopting) else None

    for task in tasks:  # a job a stopped driver left behind: take it over, or close its attempt
        entry = book.entry(task.key)
        last = entry["attempts"][-1] if entry["attempts"] else None
        if entry["state"] == RUNNING and last is not None and last.get("outcome") is None:
            handle = adopt(task, last) if adopt is not None and last.get("executor") == executor.name else None
            if handle is not None:
                tries[task.key] += 1
                summary["attempts"] += 1
                live.append(_Live(task, handle, last, clock()))
                continue
            last.update(ended=_now(), outcome=LOST, reason="its driver stopped before it ended (not taken over)")
        entry["state"] = QUEUED
        queue.append(task)
    book.flush()

    def counts() -> Counts:
        running = sum(1 for item in live if item.started is not None)
        return Counts(summary[OK], len(tasks), running, len(queue) + len(live) - running,
                      summary[FAILED_STATE] + summary[BAD_INPUT], summary["retried"])

    def eta() -> float | None:
        now = clock()
        queued = [t.predicted_s for t in queue] + [i.task.predicted_s for i in live if i.started is None]
        running = [(i.task.predicted_s, now - i.started) for i in live if i.started is not None]
        return eta_seconds(queued, running, ratios, slots or sum(1 for i in live if i.started is not None))

    def end(item: _Live, outcome: Outcome) -> None:
        _identify(item)
        reason = " ".join(outcome.reason.split()) if outcome.kind != OK else ""  # one line in the journal
        item.attempt.update(ended=_now(), outcome=outcome.kind, reason=reason)
        entry = book.entry(item.task.key)
        if outcome.kind == OK:
            entry["state"] = OK
            summary[OK] += 1
            if item.task.predicted_s > 0:
                ratios.append((clock() - (item.started if item.started is not None else item.submitted))
                              / item.task.predicted_s)
            book.flush()
            on_done(item.task, outcome.value if outcome.value is not None else {})
            return
        reasons[item.task.key].append(reason)
        if outcome.kind == BAD_INPUT:
            entry["state"] = BAD_INPUT
            summary[BAD_INPUT] += 1
        elif tries[item.task.key] < 1 + retries:
            entry["state"] = QUEUED
            summary["retried"] += 1
            queue.append(item.task)  # at the back: one flaky point does not hold up the others
            book.flush()
            return
        else:
            entry["state"] = FAILED_STATE
            summary[FAILED_STATE] += 1
        book.flush()
        on_failed(item.task, list(reasons[item.task.key]))

    try:
        show.update(counts(), eta())
        while queue or live:
            room = len(queue) if slots is None else min(len(queue), slots - len(live))
            if room > 0:
                batch = [queue.popleft() for _ in range(room)]
                handles = executor.submit(batch)
                if len(handles) != len(batch):
                    raise RuntimeError(f"executor {executor.name} returned {len(handles)} handles for "
                                       f"{len(batch)} tasks")
                for task, handle in zip(batch, handles):
                    entry = book.entry(task.key)
                    attempt = {"n": len(entry["attempts"]) + 1, "executor": executor.name,
                               "job_id": str(handle.job_id), "submitted": _now(), "ended": None,
                               "outcome": None, "reason": None}
                    entry["attempts"].append(attempt)
                    entry["state"] = RUNNING
                    tries[task.key] += 1
                    summary["attempts"] += 1
                    live.append(_Live(task, handle, attempt, clock()))
                    _identify(live[-1])
                book.flush()
            ended = False
            for item in list(live):
                outcome = item.handle.poll()
                if outcome is None:
                    if item.started is None and item.handle.started():
                        item.started = clock()
                        if _identify(item):  # a job waiting for GPUs has its id once it started
                            book.flush()
                    continue
                live.remove(item)
                ended = True
                end(item, outcome)
            show.update(counts(), eta())
            if not ended and live and poll_s > 0:
                time.sleep(poll_s)
        show.update(counts(), 0.0, final=True)
    except BaseException as error:
        _stop(live, executor, book, show, error)
        raise
    return summary


def _identify(item: _Live) -> bool:
    """Copy the handle's job id (and its job folder, where a backend has one: its logs) into the
    attempt's record; whether they changed."""
    before = (item.attempt.get("job_id"), item.attempt.get("folder"))
    item.attempt["job_id"] = str(item.handle.job_id)
    folder = getattr(item.handle, "folder", None)
    if folder:
        item.attempt["folder"] = str(folder)
    return (item.attempt.get("job_id"), item.attempt.get("folder")) != before


def _stop(live: list[_Live], executor: Executor, book: Journal, show: _Progress, error: BaseException) -> None:
    """The driver is stopping early (Ctrl-C, or an error in a callback or a submission): cancel what
    would outlive it (not Slurm's jobs: they finish without a driver, and a rerun adopts or skips
    them), record why, and flush the journal; the error is re-raised by the caller."""
    why = "interrupted (Ctrl-C)" if isinstance(error, KeyboardInterrupt) else f"the driver stopped ({type(error).__name__})"
    if live and executor.name == "slurm":
        show.say(f"etbench: {why}; {len(live)} jobs left in Slurm ({', '.join(str(i.handle.job_id) for i in live)}); "
                 f"rerun the same command to resume")
    elif live:
        for item in live:
            try:
                item.handle.cancel()
            except Exception:  # noqa: BLE001 - cancel the others; the original error is what is raised
                pass
            _identify(item)
            item.attempt.update(ended=_now(), outcome=CANCELLED, reason=why)
            book.entry(item.task.key)["state"] = CANCELLED
        show.say(f"etbench: {why}; cancelled {len(live)} running jobs")
    try:
        book.flush()
    except Exception:  # noqa: BLE001 - a journal that cannot be written must not hide why the driver stopped
        pass
