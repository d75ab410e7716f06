"""The cluster executors (issue 25): Slurm through submitit against a fake Slurm on PATH, and Ray
on a local instance.

* **Slurm** (``slow``): tests/fake_slurm/ holds ``sbatch``, ``srun``, ``sacct``, ``scancel`` and a
  ``squeue`` that records any call (submitit polls sacct only).  The fake sbatch really runs the
  jobs in the background (array elements at most ``%P`` at once), so the jobs end with submitit's
  own result pickles; the tests check the generated script (one array per distinct Resources,
  the partition, account, QoS, CPUs, memory and time), the values that come back through the
  driver, and the outcome of a preempted, a signalled and a cancelled job.
* **Ray** (``slow``, skipped without ray): one local instance (2 CPUs) for the module, started
  and shut down by the executor itself.  Values, a worker killed by SIGKILL, bad input, an
  exception, the time limit, and an infeasible request refused before any submission.

Job functions live in tests/cluster_jobs.py, put on the jobs' PYTHONPATH.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from impls.errors import ConfigError
from impls.executors.base import BAD_INPUT, CANCELLED, FAILED, KILLED, OK, PREEMPTED, TIMEOUT, Resources, Task
from impls.executors.slurm import SlurmConfig, SlurmExecutor, slurm_script

TESTS = Path(__file__).resolve().parent
FAKE = TESTS / "fake_slurm"
RESOURCES = Resources(cpus=2, mem_gb=3, time_min=17)


def _pythonpath() -> str:
    return os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])


def _task(key: str, fn_name: str, resources: Resources = RESOURCES, **payload) -> Task:
    import cluster_jobs

    return Task(key=key, fn=getattr(cluster_jobs, fn_name), payload={"key": key, **payload}, resources=resources)


def _wait(handle, timeout_s: float = 60.0):
    """Poll ``handle`` until its outcome (polling never blocks)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        outcome = handle.poll()
        if outcome is not None:
            return outcome
        time.sleep(0.1)
    raise AssertionError(f"{handle} has no outcome after {timeout_s} s")


def _wait_started(handle, timeout_s: float = 60.0) -> dict:
    """Wait until the job's function runs (its start marker: the scheduler's RUNNING comes a
    little earlier), and return the marker (its ``pid``)."""
    from impls.executors.job import read_marker

    deadline = time.monotonic() + timeout_s
    while (marker := read_marker(handle.started_path, handle.token)) is None:
        assert handle.poll() is None, f"{handle} ended before it was seen running: {handle.poll()}"
        assert time.monotonic() < deadline, f"{handle} did not start within {timeout_s} s"
        time.sleep(0.1)
    assert handle.started()
    return marker


def _run(tasks, executor, tmp_path):
    """The tasks through the driver: ``(values by key, failure reasons by key, summary)``."""
    from impls.executors.driver import run_all

    done, failed = {}, {}
    summary = run_all(tasks, executor, journal=tmp_path / "jobs.json", progress=False, retries=0,
                      on_done=lambda task, value: done.__setitem__(task.key, value),
                      on_failed=lambda task, reasons: failed.__setitem__(task.key, reasons))
    return done, failed, summary


# --- Slurm config ----------------------------------------------------------------------------

def test_slurm_config_load_and_merge(tmp_path):
    path = tmp_path / "slurm.json"
    path.write_text(json.dumps({"partition": "gpu", "account": "proj", "setup": ["module load cuda"],
                                "additional_parameters": {"requeue": True}, "array_parallelism": 8}))
    config = SlurmConfig.load(path)
    assert (config.partition, config.account, config.setup, config.additional, config.array_parallelism) == (
        "gpu", "proj", ["module load cuda"], {"requeue": True}, 8)
    merged = config.merged({"partition": "p", "qos": "q", "account": None, "setup": [],
                            "additional": {"mail-type": "END"}, "time_min": 30})
    assert (merged.partition, merged.qos, merged.account, merged.setup, merged.time_min) == (
        "p", "q", "proj", ["module load cuda"], 30)  # flags win; a flag not given keeps the file's value
    assert merged.additional == {"requeue": True, "mail-type": "END"}
    assert config.partition == "gpu"  # merged() is a copy


def test_slurm_config_refuses_unknown_key_in_one_line(tmp_path):
    path = tmp_path / "slurm.json"
    path.write_text(json.dumps({"partition": "p", "partiton": "typo"}))
    with pytest.raises(ConfigError) as e:
        SlurmConfig.load(path)
    message = str(e.value)
    assert "\n" not in message and "'partiton'" in message and str(path) in message
    assert all(key in message for key in SlurmConfig.keys())  # names the valid keys
    for bad, fragment in (({"array_parallelism": 0}, "array_parallelism=0"), ({"setup": "module load x"}, "setup="),
                          ([1, 2], "JSON object")):
        path.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=fragment) as e:
            SlurmConfig.load(path)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="unknown key 'gpus'"):
        SlurmConfig().merged({"gpus": 2})


# --- Slurm through the fake ------------------------------------------------------------------

@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """The fake Slurm on PATH, its state in ``tmp_path/slurm``, and a fresh submitit watcher
    (a class attribute shared by every SlurmJob: jobs of an earlier test must not be polled)."""
    submitit = pytest.importorskip("submitit", reason="submitit is not installed (pip install 'etbench[slurm]')")
    from submitit.slurm.slurm import SlurmInfoWatcher

    state = tmp_path / "slurm"
    state.mkdir()
    monkeypatch.setenv("FAKE_SLURM_DIR", str(state))
    monkeypatch.setenv("PATH", f"{FAKE}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", _pythonpath())  # the jobs import tests/cluster_jobs.py
    monkeypatch.setattr(submitit.SlurmJob, "watcher", SlurmInfoWatcher(delay_s=600))
    yield state
    submitit.SlurmJob.watcher.clear()
    for pid in state.glob("*.pid"):  # whatever a failing test left running
        try:
            os.killpg(int(pid.read_text()), signal.SIGKILL)
        except (ValueError, OSError):
            pass
    assert not (state / "squeue.calls").exists(), "squeue was called: submitit polls sacct"


def _slurm(tmp_path, config=None) -> SlurmExecutor:
    return SlurmExecutor(tmp_path / "jobs", config or SlurmConfig(), state_refresh_s=2.0, result_grace_s=0.0)


def _sbatch_calls(state: Path) -> list[str]:
    calls = state / "sbatch.calls"
    return calls.read_text().splitlines() if calls.exists() else []


@pytest.mark.slow
def test_slurm_one_array_with_the_resources_and_values_back(fake_slurm, tmp_path):
    config = SlurmConfig(partition="p", account="a", qos="q", array_parallelism=2)
    executor = _slurm(tmp_path, config)
    assert executor.slots is None  # Slurm queues: the driver submits everything at once
    tasks = [_task(f"pt{i}", "double", x=i) for i in range(4)]
    done, failed, summary = _run(tasks, executor, tmp_path)
    assert not failed and summary["attempts"] == 4
    assert {k: v["double"] for k, v in done.items()} == {f"pt{i}": 2 * i for i in range(4)}
    assert len(_sbatch_calls(fake_slurm)) == 1  # one array, not four jobs
    script = (fake_slurm / "1000.sbatch").read_text()
    lines = set(script.splitlines())
    for flag in ("--array=0-3%2", "--partition=p", "--account=a", "--qos=q", "--cpus-per-task=2", "--mem=3GB",
                 "--time=17", "--nodes=1", "--ntasks-per-node=1", "--job-name=etbench"):
        assert f"#SBATCH {flag}" in lines, flag
    assert "--gpus-per-node" not in script
    assert slurm_script(executor.folder, "1000_3") == script  # the one script of the array
    journal = json.loads((tmp_path / "jobs.json").read_text())
    assert sorted(a["job_id"] for e in journal.values() for a in e["attempts"]) == [f"1000_{i}" for i in range(4)]
    # A driver restarted over the same folder takes a job over from its journal entry (the
    # submitted pickle gives back its markers); a job whose submission is gone is not adopted.
    again = _slurm(tmp_path, config)
    adopted = again.adopt(tasks[2], {"job_id": "1000_2"})
    assert adopted.started() and adopted.poll().value == done["pt2"]
    assert again.adopt(tasks[2], {"job_id": "999"}) is None and not _sbatch_calls(fake_slurm)[1:]


@pytest.mark.slow
def test_slurm_sbatch_refusal_is_one_line_and_submits_nothing(fake_slurm, tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="sbatch: error: Batch job submission failed: Invalid partition name specified; nothing was submitted$") as e:
        _slurm(tmp_path, SlurmConfig(partition="invalid")).submit([_task("a", "double", x=1)])
    assert "\n" not in str(e.value) and "sbatch" not in capsys.readouterr().err
    monkeypatch.setenv("FAKE_SLURM_NO_GPUS", "1")
    gpu = Resources(gpus=1, time_min=5)
    with pytest.raises(ConfigError, match=r"of b \(Resources\(gpus=1.*Invalid generic resource"):
        _slurm(tmp_path).submit([_task("a", "sleep"), _task("b", "double", gpu, x=2)])
    assert len(_sbatch_calls(fake_slurm)) == 1  # the first group went in ...
    assert (fake_slurm / "scancel.calls").read_text().split() == ["1000"]  # ... and was cancelled


def test_slurm_refused_without_slurm(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, srun or sacct
    with pytest.raises(ConfigError, match="needs Slurm's sbatch, srun, sacct on PATH") as e:
        SlurmExecutor(tmp_path / "jobs", SlurmConfig())
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_slurm_one_array_per_resources(fake_slurm, tmp_path):
    other = Resources(gpus=1, cpus=8, mem_gb=None, time_min=45)
    executor = _slurm(tmp_path, SlurmConfig(setup=["export ETBENCH_FAKE_SETUP=1"], additional={"requeue": True}))
    tasks = [_task("a", "double", x=1), _task("b", "double", other, x=2), _task("c", "double", x=3)]
    handles = executor.submit(tasks)
    assert [h.job_id for h in handles] == ["1000_0", "1001", "1000_1"]  # in task order
    assert len(_sbatch_calls(fake_slurm)) == 2
    first, second = (fake_slurm / "1000.sbatch").read_text(), (fake_slurm / "1001.sbatch").read_text()
    assert "#SBATCH --array=0-1%2" in first and "#SBATCH --cpus-per-task=2" in first and "--gpus" not in first
    assert "--array" not in second  # a group of one is a plain job
    for flag in ("--gpus-per-node=1", "--cpus-per-task=8", "--time=45", "--requeue"):
        assert f"#SBATCH {flag}" in second.splitlines(), flag
    assert "--mem" not in second  # no mem_gb: the partition's default
    assert "\nexport ETBENCH_FAKE_SETUP=1\n" in second
    outcomes = [_wait(h) for h in handles]
    assert [(o.kind, o.value["double"]) for o in outcomes] == [(OK, 2), (OK, 4), (OK, 6)]


@pytest.mark.slow
def test_slurm_preempted_element(fake_slurm, tmp_path):
    """Slurm preempts a running element (no USR2: killed, no result pickle; sacct says
    PREEMPTED, which submitit's own ``done()`` would wait on forever): the outcome is preempted
    and the array's other element is unaffected."""
    executor = _slurm(tmp_path)
    quick, victim = executor.submit([_task("quick", "double", x=5), _task("victim", "sleep")])
    _wait_started(victim)
    jid = victim.job_id
    assert jid == "1000_1"
    (fake_slurm / f"{jid}.force").write_text("PREEMPTED\n")
    os.killpg(int((fake_slurm / f"{jid}.pid").read_text()), signal.SIGKILL)
    outcome = _wait(victim)
    assert outcome.kind == PREEMPTED and "PREEMPTED" in outcome.reason and "\n" not in outcome.reason
    assert _wait(quick).value["double"] == 10


@pytest.mark.slow
def test_slurm_signalled_and_cancelled(fake_slurm, tmp_path):
    """USR2 (Slurm's warning, here long before the time limit: a preemption) reaches the job's
    ``checkpoint()``, which declines submitit's requeue: the job ends with an error pickle and
    its signal marker, reported as preempted.  A cancelled job is reported as cancelled, and a
    job that raised as failed with its exception's line."""
    executor = _slurm(tmp_path)
    warned, cancelled, raised = executor.submit([_task("warned", "sleep"), _task("cancelled", "sleep"),
                                                 _task("raised", "boom", x=7)])
    _wait_started(warned)
    _wait_started(cancelled)
    warned.job._interrupt()  # submitit's own test hook: scancel --signal SIGTERM, then USR2
    cancelled.cancel()
    outcome = _wait(warned)
    assert outcome.kind == PREEMPTED, outcome
    assert _wait(cancelled).kind == CANCELLED
    failure = _wait(raised)
    assert failure.kind == FAILED and failure.reason == "ValueError: boom 7"


# --- Ray ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_executor(tmp_path_factory):
    """One local Ray instance (2 CPUs) for the module, started and shut down by the executor.
    Its workers inherit the environment of ``ray.init``, PYTHONPATH included."""
    pytest.importorskip("ray", reason="ray is not installed (pip install 'etbench[ray]')")
    from impls.executors.ray_backend import RayExecutor

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", _pythonpath())
        executor = RayExecutor(cpus=2, folder=tmp_path_factory.mktemp("ray-jobs"))
        try:
            yield executor
        finally:
            executor.close()


@pytest.mark.slow
def test_ray_values_back(ray_executor, tmp_path):
    assert ray_executor.started_cluster and ray_executor.slots == 2
    print(f"ray.init took {ray_executor.init_s:.1f} s")
    tasks = [_task(f"r{i}", "double", Resources(cpus=1, time_min=5), x=i) for i in range(3)]
    done, failed, summary = _run(tasks, ray_executor, tmp_path)
    assert not failed and summary["attempts"] == 3
    assert {k: v["double"] for k, v in done.items()} == {"r0": 0, "r1": 2, "r2": 4}
    assert len({v["pid"] for v in done.values()}) == 3  # max_calls=1: a fresh worker per job


@pytest.mark.slow
def test_ray_killed_bad_input_and_failed(ray_executor):
    one = Resources(cpus=1, time_min=5)
    killed, refused, raised = ray_executor.submit([_task("k", "kill_self", one), _task("b", "refuse", one, size="huge"),
                                                   _task("e", "boom", one, x=3)])
    outcome = _wait(killed)
    assert outcome.kind == KILLED and "died" in outcome.reason  # not retried by Ray: max_retries=0
    outcome = _wait(refused)
    assert outcome.kind == BAD_INPUT and outcome.reason == "unknown size 'huge'; valid: small, large"
    outcome = _wait(raised)
    assert outcome.kind == FAILED and outcome.reason == "ValueError: boom 3"


@pytest.mark.slow
def test_ray_time_limit(ray_executor):
    """Ray has no time limit of its own: past ``time_min`` since the job started, the handle
    stops the worker and reports a timeout (the clock is moved, not waited for)."""
    (handle,) = ray_executor.submit([_task("slow", "sleep", Resources(cpus=1, time_min=1))])
    pid = _wait_started(handle)["pid"]
    assert handle.poll() is None
    handle._started_at -= 61
    outcome = handle.poll()
    assert outcome.kind == TIMEOUT and "1 min" in outcome.reason
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:  # the worker is killed
        time.sleep(0.2)
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


@pytest.mark.slow
def test_ray_infeasible_request_refused_before_submission(ray_executor, monkeypatch):
    class NoSubmission:
        def options(self, **_):
            raise AssertionError("a task was submitted")

    monkeypatch.setattr(ray_executor, "_remote", NoSubmission())
    fine, gpu = _task("fine", "double", Resources(cpus=1), x=1), _task("gpu", "double", Resources(gpus=1), x=2)
    with pytest.raises(ConfigError) as e:
        ray_executor.submit([fine, gpu])  # refused as a whole: not even the feasible one goes
    message = str(e.value)
    assert "\n" not in message and "'gpu'" in message and "1 GPUs" in message and "0 GPUs" in message
    with pytest.raises(ConfigError, match="4096 GB"):
        ray_executor.submit([_task("mem", "double", Resources(mem_gb=4096))])
