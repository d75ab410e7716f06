"""Signals and process lifetime (issue 21, class 4).

* ``kill -9`` of the launcher of an ``--nproc 2`` run: its ranks die with it (within seconds,
  checked by pid) and write no record;
* Ctrl-C (SIGINT to the process group, as a terminal sends it) of a single-process run and of an
  ``--nproc 2`` run: exit status 130 and one line on stderr, no traceback from any rank, and the
  checkpoint saved before is resumable; also while the ranks are still starting up;
* ``--nproc`` above the CPU cores the process may use (its affinity mask) is refused before any
  work by ``run``, ``compare`` and ``comm`` (status 2, one line; in-process), and runs with
  ``--oversubscribe``: that test restricts the launcher to one core (the ranks inherit it), so
  it starts two ranks on any machine, and interrupts them while they start up.

Every test starts processes (each imports torch), so they are marked ``slow``.  Nothing here
writes to a device file.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from test_faults import RUN, REPO, _alive, _children, _env, _rank_of, _wait_for

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not Path("/proc/self/stat").exists(),
                                 reason="needs Linux (/proc, CPU affinity)")]

SHORT = ["--steps", "40", "--save-every", "4"]



def _sink():
    """Where a child's unread output goes: an unnamed temporary file, never a device such as
    /dev/null (no test writes to a device file)."""
    return tempfile.TemporaryFile()

def _one_core(argv: list[str]) -> list[str]:
    """``argv`` restricted to one CPU core (as ``taskset -c N`` would)."""
    core = min(os.sched_getaffinity(0))
    return [sys.executable, "-c", f"import os, sys; os.sched_setaffinity(0, {{{core}}}); "
                                  "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])", *argv[1:]]


def _start(argv: list[str], log: Path, **env) -> subprocess.Popen:
    """A command in a session of its own, so SIGINT can go to its process group as a terminal's does."""
    with open(log, "w") as stderr:
        return subprocess.Popen(argv, env=_env(**env), cwd=REPO, stdout=_sink(), stderr=stderr,
                                start_new_session=True)


def _ranks(proc: subprocess.Popen, n: int, timeout: float = 120) -> dict[int, int]:
    found: dict[int, int] = {}

    def started() -> bool:
        found.clear()
        found.update({_rank_of(pid): pid for pid in _children(proc.pid)})
        return set(found) == set(range(n))

    assert _wait_for(started, timeout, proc, poll=0.05), f"ranks: {found}"
    return dict(found)


def _cleanup(proc: subprocess.Popen, ranks: dict[int, int]) -> None:
    """Never leave a process behind, even when the test fails."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pid in ranks.values():
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _interrupt(proc: subprocess.Popen) -> tuple[int, float]:
    os.killpg(proc.pid, signal.SIGINT)
    started = time.monotonic()
    status = proc.wait(timeout=60)
    return status, time.monotonic() - started


def test_ranks_die_with_their_launcher(tmp_path):
    """kill -9 of the launcher: the kernel kills its ranks (PR_SET_PDEATHSIG); no record."""
    out, state, log = tmp_path / "run.json", tmp_path / "run.state.pt", tmp_path / "stderr.txt"
    proc = _start([*RUN, "--nproc", "2", "--steps", "100000", "--save-every", "1", "--timeout", "20",
                   "--out", str(out)], log)
    ranks = {}
    try:
        assert _wait_for(state.exists, 180, proc), log.read_text()[-3000:]
        ranks = _ranks(proc, 2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        started = time.monotonic()
        gone = _wait_for(lambda: not any(_alive(pid) for pid in ranks.values()), 5)
        took = time.monotonic() - started
    finally:
        _cleanup(proc, ranks)
    assert gone, f"ranks {ranks} outlived their launcher by 5 s"
    assert took < 5
    assert not out.exists()


@pytest.mark.parametrize("nproc", [1, 2])
def test_ctrl_c_is_one_line_and_status_130_and_the_checkpoint_resumes(tmp_path, nproc):
    """SIGINT to the process group after a checkpoint was saved: status 130, one line naming the
    checkpoint, no traceback, no record; the checkpoint resumes (--nproc 1: the run goes on to
    the end; --nproc 2: its checks, SHA-256 included, pass).  Checkpoint writes pause 0.2 s, so
    the signal may land inside one: the previous checkpoint is intact then."""
    out, state, log = tmp_path / "run.json", tmp_path / "run.state.pt", tmp_path / "stderr.txt"
    argv = [*RUN, "--nproc", str(nproc), *SHORT, "--out", str(out)]
    proc = _start(argv, log, ETBENCH_WRITE_PAUSE="0.2")
    ranks = {}
    try:
        assert _wait_for(state.exists, 180, proc), log.read_text()[-3000:]
        if nproc > 1:
            ranks = _ranks(proc, nproc)
        time.sleep(0.3)
        status, took = _interrupt(proc)
    finally:
        _cleanup(proc, ranks)
    err = log.read_text()
    assert status == 130, err
    assert err.splitlines() == [f"etbench: interrupted; no record written; resume with --resume {state}"], err
    assert took < 10
    assert not any(_alive(pid) for pid in ranks.values()), "a rank outlived the run"
    assert not out.exists()
    if nproc == 1:
        done = subprocess.run([*argv, "--resume", str(state)], capture_output=True, text=True, env=_env(), cwd=REPO,
                              timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        record = json.loads(out.read_text())
        assert record["status"] == "ok" and record["steps_done"] == 40
    else:
        from impls import cli, recipe as recipe_lib, training_state

        recipe = recipe_lib.from_args(cli.parser().parse_args(argv[3:]))
        training_state.load(str(state), recipe, nproc)  # raises if it were damaged or of another run


@pytest.mark.parametrize("command", ["run", "compare", "comm"])
def test_more_ranks_than_cores_are_refused_before_any_work(tmp_path, capsys, command):
    """--nproc cores + 1: one line naming the cores and --oversubscribe, status 2, nothing written
    (in-process: the check comes before any rank starts)."""
    from impls import cli

    n, out = len(os.sched_getaffinity(0)) + 1, tmp_path / "out"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"baseline": "a", "rounds": 2, "steps": 1, "warmup": 1,
                                "common": {"model": "nano", "batch_size": 2, "seq_len": 16, "eval_batches": 1},
                                "variants": {"a": {}, "b": {"lr": 1e-3}}}))
    argv = {"run": [*RUN[3:], "--steps", "5"], "compare": ["compare", str(spec)], "comm": ["comm", "--sizes", "4K"]}
    capsys.readouterr()
    status = cli.main([*argv[command], "--nproc", str(n), "--out", str(out / "r.json")])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err == (f"etbench: error: --nproc {n} is more ranks than the {n - 1} CPU core(s) this process may use: "
                   f"oversubscribed ranks take turns and every collective waits for the slowest, so the run may make "
                   f"no progress; --nproc {n - 1} or less, or --oversubscribe to run anyway\n"), err
    assert not out.exists()


def test_on_cuda_the_limit_is_the_devices(monkeypatch):
    """A run that may use CUDA counts GPUs (NVML's count: CUDA is not initialised), a CPU run cores."""
    import torch

    from impls import ranks
    from impls.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(ranks, "cores", lambda: 4)
    for device in ("auto", "cuda"):
        with pytest.raises(ConfigError, match=r"--nproc 2 is more ranks than the 1 CUDA device\(s\)"):
            ranks.check_fit(2, {device}, oversubscribe=False)
    ranks.check_fit(4, {"cpu"}, oversubscribe=False)
    with pytest.raises(ConfigError, match=r"than the 4 CPU core\(s\)"):
        ranks.check_fit(5, {"cpu"}, oversubscribe=False)


def test_oversubscribed_ranks_run_and_ctrl_c_while_they_start_is_one_line(tmp_path):
    """On one core, --nproc 2 --oversubscribe starts both ranks (with a warning); Ctrl-C while
    they are still importing torch stops them without a traceback: status 130, one line."""
    out, log = tmp_path / "run.json", tmp_path / "stderr.txt"
    proc = _start(_one_core([*RUN, "--nproc", "2", "--oversubscribe", "--steps", "100000", "--out", str(out)]), log)
    ranks = {}
    try:
        ranks = _ranks(proc, 2)
        time.sleep(0.5)  # inside their imports (torch takes seconds)
        status, took = _interrupt(proc)
    finally:
        _cleanup(proc, ranks)
    err = log.read_text()
    assert status == 130, err
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith("etbench: warning: --nproc 2 on 1 CPU core(s) this process may use (--oversubscribe)")
    assert lines[1] == "etbench: interrupted; no record written", err
    assert took < 10
    assert not any(_alive(pid) for pid in ranks.values()), "a rank outlived the run"
    assert not out.exists()
