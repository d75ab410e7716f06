"""Executors and their driver (issue 25).

* :func:`impls.executors.driver.run_all` against an in-memory executor whose jobs' outcomes are
  scripted: retries and their reasons, bad input never retried, the slot cap, the journal (kept
  across drivers), Ctrl-C, taking over a job a stopped driver left, and the progress line;
* :func:`impls.executors.make`: unknown names and missing packages refused in one line;
* :class:`impls.executors.job.Job` in-process: its markers and bad input as data;
* the local executor (``slow``: each job is two fresh interpreters): values back, a SIGKILLed job
  retried, a USR2 read as a timeout, a refusal not retried, a traceback's last line as the reason.
"""
from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

import pytest

from impls import requires
from impls.errors import ConfigError
from impls.executors import EXECUTORS, make
from impls.executors.base import (BAD_INPUT, BAD_INPUT_KEY, FAILED, KILLED, OK, PREEMPTED, TIMEOUT, Executor,
                                  Handle, Outcome, Resources, Task)
from impls.executors.driver import Counts, eta_seconds, format_duration, progress_line, run_all
from impls.executors.job import PREEMPTED as PREEMPTED_CASE
from impls.executors.job import TIMED_OUT, Job, read_marker, signal_case, signal_path_for
from impls.executors.local import gpu_ids

TESTS = Path(__file__).resolve().parent


def _noop(payload: dict) -> dict:
    return payload


# --------------------------------------------------------------------------- a scripted executor
INTERRUPT = "interrupt"  # a scripted "outcome": the poll raises KeyboardInterrupt (Ctrl-C)


class FakeHandle:
    def __init__(self, executor: "FakeExecutor", task: Task, job_id: str, outcome):
        self.task, self.job_id, self.executor, self.outcome = task, job_id, executor, outcome
        self.polls = 0
        self.cancelled = False

    def poll(self):
        self.polls += 1
        if self.polls < self.executor.polls_to_end:
            return None
        if self.outcome == INTERRUPT:
            raise KeyboardInterrupt
        self.executor.live.discard(self)
        return self.outcome

    def started(self) -> bool:
        return self.polls >= 1

    def cancel(self) -> None:
        self.cancelled = True


class FakeExecutor:
    """Each submission takes the next scripted outcome of its task's key; a job ends on its
    ``polls_to_end``-th poll."""

    def __init__(self, script: dict[str, list], slots: int | None = None, polls_to_end: int = 2, name: str = "fake"):
        self.script = {k: list(v) for k, v in script.items()}
        self.slots, self.polls_to_end, self.name = slots, polls_to_end, name
        self.live: set[FakeHandle] = set()
        self.max_live = 0
        self.batches: list[list[str]] = []
        self.handles: list[FakeHandle] = []

    def submit(self, tasks):
        self.batches.append([t.key for t in tasks])
        handles = [FakeHandle(self, t, f"j{len(self.handles) + i}", self.script[t.key].pop(0))
                   for i, t in enumerate(tasks)]
        self.handles += handles
        self.live |= set(handles)
        self.max_live = max(self.max_live, len(self.live))
        return handles

    def close(self) -> None:
        pass


def _tasks(*keys: str, predicted_s: float = 0.0) -> list[Task]:
    return [Task(k, _noop, {"k": k}, predicted_s=predicted_s) for k in keys]


def _run(tasks, executor, journal, **kwargs):
    done, failed = [], []
    summary = run_all(tasks, executor, journal=journal, on_done=lambda t, v: done.append((t.key, v)),
                      on_failed=lambda t, r: failed.append((t.key, r)), poll_s=0, progress=False, **kwargs)
    return summary, done, failed


def _attempts(journal: Path, key: str, field: str = "outcome") -> list:
    return [a[field] for a in json.loads(journal.read_text())[key]["attempts"]]


def test_fake_executor_meets_the_protocols():
    ex = FakeExecutor({"a": [Outcome(OK, {})]})
    assert isinstance(ex, Executor) and isinstance(ex.submit(_tasks("a"))[0], Handle)


def test_a_killed_job_is_retried_then_ok(tmp_path):
    journal = tmp_path / "jobs.json"
    ex = FakeExecutor({"a": [Outcome(KILLED, reason="no result (SIGKILL?)"), Outcome(OK, {"loss": 1.5})],
                       "b": [Outcome(OK, {"loss": 2.5})]})
    summary, done, failed = _run(_tasks("a", "b"), ex, journal)
    assert sorted(done) == [("a", {"loss": 1.5}), ("b", {"loss": 2.5})] and failed == []
    assert summary == {"tasks": 2, "ok": 2, "failed": 0, "bad-input": 0, "attempts": 3, "retried": 1}
    book = json.loads(journal.read_text())
    assert book["a"]["state"] == "ok" and book["b"]["state"] == "ok"
    assert _attempts(journal, "a") == [KILLED, OK]
    assert _attempts(journal, "a", "reason") == ["no result (SIGKILL?)", ""]
    first = book["a"]["attempts"][0]
    assert set(first) == {"n", "executor", "job_id", "submitted", "ended", "outcome", "reason"}
    assert [a["n"] for a in book["a"]["attempts"]] == [1, 2] and first["executor"] == "fake"
    assert ex.batches == [["a", "b"], ["a"]]  # the retry goes alone


def test_retries_exhausted_calls_on_failed_with_every_reason(tmp_path):
    journal = tmp_path / "jobs.json"
    script = [Outcome(FAILED, reason="RuntimeError: boom"), Outcome(PREEMPTED, reason="preempted"),
              Outcome(TIMEOUT, reason="timed out")]
    summary, done, failed = _run(_tasks("a"), FakeExecutor({"a": script}), journal, retries=2)
    assert done == [] and failed == [("a", ["RuntimeError: boom", "preempted", "timed out"])]
    assert summary["failed"] == 1 and summary["attempts"] == 3 and summary["retried"] == 2
    assert json.loads(journal.read_text())["a"]["state"] == "failed"
    assert _attempts(journal, "a") == [FAILED, PREEMPTED, TIMEOUT]


def test_bad_input_is_not_retried(tmp_path):
    journal = tmp_path / "jobs.json"
    ex = FakeExecutor({"a": [Outcome(BAD_INPUT, reason="unknown size 'huge'; valid: small, large")]})
    summary, done, failed = _run(_tasks("a"), ex, journal, retries=5)  # a resubmission would find no script
    assert failed == [("a", ["unknown size 'huge'; valid: small, large"])] and done == []
    assert summary["bad-input"] == 1 and summary["attempts"] == 1 and summary["retried"] == 0
    assert json.loads(journal.read_text())["a"]["state"] == "bad-input"


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_no_more_live_jobs_than_slots(tmp_path, slots):
    keys = [f"p{i}" for i in range(7)]
    script = {k: [Outcome(OK, {"i": i})] for i, k in enumerate(keys)}
    script["p3"] = [Outcome(KILLED, reason="x"), Outcome(OK, {"i": 3})]
    ex = FakeExecutor(script, slots=slots, polls_to_end=3)
    summary, done, _ = _run(_tasks(*keys), ex, tmp_path / "jobs.json")
    assert ex.max_live == slots and summary["ok"] == 7
    assert all(len(b) <= slots for b in ex.batches)


def test_no_slots_submits_everything_at_once(tmp_path):
    keys = [f"p{i}" for i in range(5)]
    ex = FakeExecutor({k: [Outcome(OK, {})] for k in keys}, slots=None)
    _run(_tasks(*keys), ex, tmp_path / "jobs.json")
    assert ex.batches == [keys]


def test_journal_is_appended_by_a_later_driver(tmp_path):
    journal = tmp_path / "jobs.json"
    _, _, failed = _run(_tasks("a", "b"), FakeExecutor({"a": [Outcome(FAILED, reason="first")],
                                                       "b": [Outcome(OK, {})]}), journal, retries=0)
    assert failed == [("a", ["first"])]
    summary, done, failed = _run(_tasks("a"), FakeExecutor({"a": [Outcome(OK, {"v": 1})]}), journal)
    assert done == [("a", {"v": 1})] and failed == [] and summary["attempts"] == 1
    book = json.loads(journal.read_text())
    assert [(a["n"], a["outcome"], a["reason"]) for a in book["a"]["attempts"]] == [(1, FAILED, "first"), (2, OK, "")]
    assert book["a"]["state"] == "ok" and book["b"]["state"] == "ok"  # other tasks' history is kept


def test_an_unreadable_journal_is_refused(tmp_path):
    journal = tmp_path / "jobs.json"
    journal.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a journal"):
        _run(_tasks("a"), FakeExecutor({"a": [Outcome(OK, {})]}), journal)


def test_duplicate_keys_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="duplicate task keys a"):
        _run(_tasks("a", "a"), FakeExecutor({}), tmp_path / "jobs.json")


def test_a_running_entry_is_adopted_or_closed_as_lost(tmp_path):
    journal = tmp_path / "jobs.json"
    left = {"n": 1, "executor": "fake", "job_id": "77", "submitted": "t", "ended": None, "outcome": None, "reason": None}
    journal.write_text(json.dumps({"a": {"state": "running", "attempts": [dict(left)]}}))

    ex = FakeExecutor({"a": []})
    ex.adopt = lambda task, attempt: FakeHandle(ex, task, attempt["job_id"], Outcome(OK, {"adopted": True}))
    summary, done, _ = _run(_tasks("a"), ex, journal)
    assert done == [("a", {"adopted": True})] and ex.batches == []  # nothing submitted
    assert _attempts(journal, "a", "job_id") == ["77"] and _attempts(journal, "a") == [OK]

    journal.write_text(json.dumps({"a": {"state": "running", "attempts": [dict(left)]}}))
    summary, done, _ = _run(_tasks("a"), FakeExecutor({"a": [Outcome(OK, {})]}), journal)  # cannot adopt
    assert _attempts(journal, "a") == ["lost", OK] and summary["attempts"] == 1


@pytest.mark.parametrize("name", ["local", "slurm"])
def test_ctrl_c_cancels_local_jobs_and_leaves_slurm_jobs(tmp_path, name):
    journal = tmp_path / "jobs.json"
    ex = FakeExecutor({"a": [Outcome(OK, {})], "b": [INTERRUPT], "c": [Outcome(OK, {})]},
                      slots=None, polls_to_end=2, name=name)
    stream = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        run_all(_tasks("a", "b", "c"), ex, journal=journal, on_done=lambda t, v: None,
                on_failed=lambda t, r: None, poll_s=0, stream=stream)
    book = json.loads(journal.read_text())
    assert book["a"]["state"] == "ok"  # ended on the poll before b's Ctrl-C
    live = [h for h in ex.handles if h.task.key in ("b", "c")]
    if name == "slurm":
        assert not any(h.cancelled for h in live)
        assert book["b"]["state"] == "running" and book["b"]["attempts"][-1]["outcome"] is None
        assert "2 jobs left in Slurm" in stream.getvalue() and "rerun the same command" in stream.getvalue()
    else:
        assert all(h.cancelled for h in live)
        assert book["b"]["state"] == "cancelled" and _attempts(journal, "c") == ["cancelled"]
        assert _attempts(journal, "c", "reason") == ["interrupted (Ctrl-C)"]
        assert "cancelled 2 running jobs" in stream.getvalue()


# --------------------------------------------------------------------------- progress
def test_progress_line():
    assert progress_line(Counts(3, 5, 1, 1, 0, 0), 12, "isoflop", "local") == \
        "etbench isoflop [local]: 3/5 done, 1 running, 1 queued, 0 failed (0 retried), ETA 0:00:12"
    assert progress_line(Counts(12, 40, 4, 22, 1, 2), 5 * 3600 + 23 * 60 + 5.4, "isoflop", "slurm") == \
        "etbench isoflop [slurm]: 12/40 done, 4 running, 22 queued, 1 failed (2 retried), ETA 5:23:05"
    assert progress_line(Counts(0, 1, 0, 1, 0, 0), None, "sweep", "ray").endswith("ETA unknown")
    assert format_duration(30 * 3600) == "30:00:00"


def test_eta():
    assert eta_seconds([10, 20], [(30, 10)], [], parallel=2) == 25  # (10 + 20 + 20) / 2
    assert eta_seconds([10, 20], [(30, 10)], [1, 3, 2], parallel=2) == 50  # the median ratio is 2
    assert eta_seconds([10], [(5, 9)], [], parallel=0) == 10  # overdue jobs count 0; parallel at least 1
    assert eta_seconds([0, 0], [], [], parallel=1) is None and eta_seconds([], [], [], parallel=1) == 0


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0  # every reading is a second later
        return self.t


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_output_on_a_log_and_on_a_terminal(tmp_path):
    script = {k: [Outcome(OK, {})] for k in "abc"}
    log = io.StringIO()
    run_all(_tasks(*"abc", predicted_s=10), FakeExecutor(dict(script), slots=1), journal=tmp_path / "j1.json",
            on_done=lambda t, v: None, on_failed=lambda t, r: None, poll_s=0, stream=log, clock=_Clock(),
            what="isoflop")
    lines = log.getvalue().splitlines()
    # the first line, then nothing until 30 s passed with new counts, and always the final counts
    assert lines[0] == "etbench isoflop [fake]: 0/3 done, 0 running, 3 queued, 0 failed (0 retried), ETA 0:00:30"
    assert lines[-1] == "etbench isoflop [fake]: 3/3 done, 0 running, 0 queued, 0 failed (0 retried), ETA 0:00:00"
    assert len(lines) <= 3 and "\r" not in log.getvalue()

    tty = _Terminal()
    run_all(_tasks(*"abc", predicted_s=10), FakeExecutor(dict(script), slots=1), journal=tmp_path / "j2.json",
            on_done=lambda t, v: None, on_failed=lambda t, r: None, poll_s=0, stream=tty, clock=_Clock(),
            what="isoflop")
    text = tty.getvalue()
    assert text.startswith("\r\x1b[Ketbench isoflop [fake]: 0/3") and text.count("\n") == 1 and text.endswith("\n")
    assert "\r\x1b[Ketbench isoflop [fake]: 3/3 done" in text


# --------------------------------------------------------------------------- make()
def test_make_refuses_unknown_names(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown executor 'pbs'; valid: local, slurm, ray"):
        make("pbs", tmp_path)
    assert EXECUTORS == ("local", "slurm", "ray")


@pytest.mark.parametrize("name,dist,extra", [("local", "submitit", "slurm"), ("slurm", "submitit", "slurm"),
                                             ("ray", "ray", "ray")])
def test_make_refuses_a_missing_package_first(tmp_path, monkeypatch, name, dist, extra):
    monkeypatch.setattr(requires, "installed", lambda module: module != dist)
    with pytest.raises(ConfigError) as e:
        make(name, tmp_path / "jobs", jobs=0, bogus=1)  # the package is named before any other complaint
    message = str(e.value)
    assert "\n" not in message and f"executor {name!r} needs the package {dist}" in message
    assert f"pip install 'etbench[{extra}]'" in message
    assert not (tmp_path / "jobs").exists()


def test_make_local_refuses_bad_options(tmp_path):
    pytest.importorskip("submitit")
    with pytest.raises(ConfigError, match="unknown options bogus; valid: gpus"):
        make("local", tmp_path, bogus=1)
    with pytest.raises(ConfigError, match="jobs"):
        make("local", tmp_path, jobs=0)
    ex = make("local", tmp_path, jobs=3)
    assert ex.name == "local" and ex.slots == 3 and ex.gpus == []
    with pytest.raises(ConfigError, match="needs 1 GPUs; the local executor has none"):
        ex.submit([Task("g", _noop, {}, Resources(gpus=1))])


def test_gpu_ids(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_ids(2) == [0, 1] and gpu_ids([5, 2]) == [5, 2] and gpu_ids(0) == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # a count means the first of these
    assert gpu_ids(2) == [4, 6]
    with pytest.raises(ConfigError, match="lists only 2"):
        gpu_ids(3)
    with pytest.raises(ConfigError, match="distinct"):
        gpu_ids([1, 1])


class _FakeLocalJob:
    """What LocalHandle reads of a submitit job: its state, id and paths."""

    def __init__(self, folder: Path, ids: list[int]):
        self.ids, self.state, self.job_id = ids, "RUNNING", str(len(list(folder.iterdir())))
        self.paths = type("Paths", (), {"folder": folder, "result_pickle": folder / "none.pkl",
                                        "stderr": folder / "none.err"})()
        (folder / self.job_id).touch()

    def cancel(self):
        self.state = "FINISHED"


def test_local_gpus_first_come_first_served(tmp_path, monkeypatch):
    """A job that needs more GPUs than are free waits, and the jobs behind it wait too (else a
    stream of 1-GPU jobs could starve a 2-GPU one); ids come back when a job ends."""
    pytest.importorskip("submitit")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    ex = make("local", tmp_path / ".jobs", jobs=3, gpus=2)
    (tmp_path / "f").mkdir()
    monkeypatch.setattr(ex, "_start", lambda task, ids, started, token: _FakeLocalJob(tmp_path / "f", ids))
    a, b, c = ex.submit([Task(k, _noop, {}, Resources(gpus=n)) for k, n in (("a", 1), ("b", 2), ("c", 1))])
    assert a._job.ids == [0] and b._job is None and c._job is None  # c would fit, but b is first
    assert b.poll() is None and c.poll() is None and b.job_id == "" and not b.started()
    a._job.state = "FINISHED"
    assert a.poll().kind == KILLED and "without a result" in a.poll().reason and ex.free_gpus == [0, 1]
    assert b.poll() is None and b._job.ids == [0, 1] and c.poll() is None and c._job is None
    b.cancel()
    assert b.poll().kind == "cancelled" and c.poll() is None and c._job.ids == [0]
    d, = ex.submit([Task("d", _noop, {}, Resources(gpus=2))])
    d.cancel()  # cancelled while waiting: it gives its turn away
    assert d.poll().kind == "cancelled" and ex.free_gpus == [1]


# --------------------------------------------------------------------------- the job callable
def test_job_markers_and_bad_input(tmp_path):
    def refuse(payload):
        raise ConfigError("unknown size 'huge'; valid: small, large")

    started = tmp_path / "m" / "a.started"
    job = Job(_noop, started, token="t1", timeout_s=600, signal_delay_s=30)
    assert job({"x": 1}) == {"x": 1}
    marker = read_marker(started, "t1")
    assert marker["pid"] == os.getpid() and read_marker(started, "t0") is None
    job.checkpoint({"x": 1})  # a USR2 seconds after the start of a 10-minute job: a preemption
    assert read_marker(signal_path_for(started), "t1")["case"] == PREEMPTED_CASE
    assert signal_path_for(started) == tmp_path / "m" / "a.signal"
    assert Job(refuse, started)({}) == {BAD_INPUT_KEY: "unknown size 'huge'; valid: small, large"}


def test_signal_case():
    assert signal_case(50, 60, 5) == TIMED_OUT  # local, 1-minute limit: every USR2 is the limit's
    assert signal_case(28.4 * 60, 30 * 60, 90) == TIMED_OUT  # Slurm's USR2@90, minus the start-up
    assert signal_case(20 * 60, 30 * 60, 90) == PREEMPTED_CASE
    assert signal_case(5, None, 0) == TIMED_OUT


# --------------------------------------------------------------------------- the local executor
@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """One sweep on the local executor (2 jobs at once) with a task of every kind; its jobs import
    their functions from tests/executor_jobs.py through PYTHONPATH (submitit's controller passes
    this process's environment on)."""
    pytest.importorskip("submitit")
    import executor_jobs as jobs

    out = tmp_path_factory.mktemp("local")
    tasks = [Task(f"echo{x}", jobs.echo, {"x": x}, Resources(time_min=1)) for x in range(3)]
    tasks += [Task("die", jobs.die_once, {"marker": str(out / "die.marker")}, Resources(time_min=1)),
              Task("usr2", jobs.usr2_once, {"marker": str(out / "usr2.marker")}, Resources(time_min=1)),
              Task("refuse", jobs.refuse, {"size": "huge"}, Resources(time_min=1)),
              Task("boom", jobs.boom, {}, Resources(time_min=1))]
    done, failed = {}, []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]))
        executor = make("local", out / ".jobs", jobs=2)
        t0 = time.monotonic()
        summary = run_all(tasks, executor, journal=out / "jobs.json", on_done=lambda t, v: done.__setitem__(t.key, v),
                          on_failed=lambda t, r: failed.append((t.key, r)), retries=2, poll_s=0.05,
                          stream=sys.stderr)
        seconds = time.monotonic() - t0
    return dict(out=out, done=done, failed=failed, summary=summary, seconds=seconds,
                book=json.loads((out / "jobs.json").read_text()))


@pytest.mark.slow
def test_local_jobs_return_their_values(local_sweep):
    done = local_sweep["done"]
    assert {k: done[k] for k in ("echo0", "echo1", "echo2")} == {
        f"echo{x}": {"x": x, "square": x * x, "visible": ""} for x in range(3)}  # a CPU job sees no GPU
    assert local_sweep["summary"] == {"tasks": 7, "ok": 5, "failed": 1, "bad-input": 1, "attempts": 11, "retried": 4}
    job_ids = [a["job_id"] for e in local_sweep["book"].values() for a in e["attempts"]]
    assert all(job_ids) and len(set(job_ids)) == len(job_ids)


@pytest.mark.slow
def test_local_killed_job_is_retried(local_sweep):
    assert local_sweep["done"]["die"] == {"survived": True}
    entry = local_sweep["book"]["die"]
    assert entry["state"] == "ok" and [a["outcome"] for a in entry["attempts"]] == [KILLED, OK]
    assert "SIGKILL" in entry["attempts"][0]["reason"]
    assert Path(entry["attempts"][0]["folder"], f"{entry['attempts'][0]['job_id']}_0_log.err").exists()


@pytest.mark.slow
def test_local_usr2_is_a_timeout_and_retried(local_sweep):
    entry = local_sweep["book"]["usr2"]
    assert [a["outcome"] for a in entry["attempts"]] == [TIMEOUT, OK] and local_sweep["done"]["usr2"]


@pytest.mark.slow
def test_local_bad_input_fails_once(local_sweep):
    assert ("refuse", ["unknown size 'huge'; valid: small, large"]) in local_sweep["failed"]
    assert [a["outcome"] for a in local_sweep["book"]["refuse"]["attempts"]] == [BAD_INPUT]


@pytest.mark.slow
def test_local_failure_reason_is_the_traceback_line(local_sweep):
    (reasons,) = [r for k, r in local_sweep["failed"] if k == "boom"]
    assert reasons == ["RuntimeError: boom"] * 3
    assert [a["outcome"] for a in local_sweep["book"]["boom"]["attempts"]] == [FAILED] * 3
    print(f"local sweep: 11 jobs in {local_sweep['seconds']:.1f} s")


@pytest.mark.slow
def test_local_gpu_ids_are_handed_out_and_returned(tmp_path, monkeypatch):
    """Each job gets GPU ids of its own out of the executor's (these jobs never touch a GPU, so
    any ids do on a CPU machine); a job whose GPUs are taken waits for them instead of sharing."""
    pytest.importorskip("submitit")
    import executor_jobs as jobs

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]))
    executor = make("local", tmp_path / ".jobs", jobs=3, gpus=[3, 5])
    tasks = [Task(f"one{x}", jobs.echo, {"x": x}, Resources(gpus=1, time_min=1)) for x in range(3)]
    tasks.append(Task("two", jobs.echo, {"x": 9}, Resources(gpus=2, time_min=1)))
    done = {}
    run_all(tasks, executor, journal=tmp_path / "jobs.json", on_done=lambda t, v: done.__setitem__(t.key, v),
            on_failed=lambda t, r: pytest.fail(f"{t.key}: {r}"), poll_s=0.05, progress=False)
    assert {done[f"one{x}"]["visible"] for x in range(3)} <= {"3", "5"} and done["two"]["visible"] == "3,5"
    assert executor.free_gpus == [3, 5]  # every id back
    with pytest.raises(ConfigError, match="needs 3 GPUs; the local executor has 2 \\(3,5\\)"):
        executor.submit([Task("three", jobs.echo, {"x": 0}, Resources(gpus=3))])
