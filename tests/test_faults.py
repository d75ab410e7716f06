"""Fault tests (issue 9): processes killed with SIGKILL at random points, then resumed.

* a run with ``--save-every``, killed at a random moment of training and, separately, inside a
  checkpoint write (``ETBENCH_WRITE_PAUSE`` holds the writer between write and rename), resumes
  to a record whose every number of the curve is bit-identical to an uninterrupted run's, with
  no temporary file left;
* an isoFLOP sweep killed mid-write continues to the same points as an uninterrupted sweep;
* one rank of a 2-rank run killed: the launcher exits within the timeout naming the dead rank,
  and no process of the run is left; a rank that fails on bad input prints its line once.

Every test here starts processes (each imports torch), so they are marked ``slow``; together
they take well under a minute.  The random delays come from ``ETBENCH_FAULT_SEED`` if set (a
failure names the seed it used).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("ETBENCH_FAULT_SEED", time.time_ns() % 1_000_000))
RUN = [sys.executable, "-m", "impls.cli", "run", "--model", "nano", "--batch-size", "2", "--seq-len", "16",
       "--eval-batches", "1", "--timing-warmup", "1", "--lr", "3e-3"]
LONG = ["--steps", "240", "--eval-every", "40", "--save-every", "20"]



def _sink():
    """Where a child's unread output goes: an unnamed temporary file, never a device such as
    /dev/null (no test writes to a device file)."""
    return tempfile.TemporaryFile()

def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "OMP_NUM_THREADS": "1"}
    env.update(extra)
    return env


def _wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, poll: float = 0.01) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


def _temporaries(folder: Path) -> list[Path]:
    """Atomic-write temporaries (``.<name>.<pid>.<random><suffix>``), not the ``.<name>.lock``
    a command holds on its outputs while it runs (impls.files.exclusive)."""
    return [p for p in folder.rglob(".*") if p.is_file() and not p.name.endswith(".lock")]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """The uninterrupted run's record (its own process, as the killed runs are)."""
    out = tmp_path_factory.mktemp("straight") / "run.json"
    done = subprocess.run([*RUN, *LONG, "--out", str(out)], capture_output=True, text=True, env=_env(), cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("when", ["training", "saving"])
def test_a_run_killed_at_a_random_moment_resumes_bit_identical(straight, tmp_path, when):
    rng = random.Random(f"{SEED}-{when}")
    out, state = tmp_path / "run.json", tmp_path / "run.state.pt"
    env = _env(ETBENCH_WRITE_PAUSE="0.3") if when == "saving" else _env()
    proc = subprocess.Popen([*RUN, *LONG, "--out", str(out)], env=env, cwd=REPO, stdout=_sink(),
                            stderr=_sink())
    try:
        if when == "training":  # somewhere after the first checkpoint
            assert _wait_for(state.exists, 120, proc), f"no checkpoint appeared (seed {SEED})"
            time.sleep(rng.uniform(0, 0.4))
        else:  # inside a checkpoint write: its temporary exists, the rename has not happened
            nth = rng.randint(1, 3)
            for i in range(nth):
                assert _wait_for(lambda: any(p.name.startswith(".run.state.pt.") and p in _temporaries(tmp_path)
                                                   for p in tmp_path.iterdir()), 120,
                                 proc), f"no checkpoint write seen (seed {SEED})"
                if i != nth - 1:
                    _wait_for(lambda: not _temporaries(tmp_path), 5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    if when == "saving":
        assert _temporaries(tmp_path), "the kill was meant to land inside a write"
    if proc.returncode != 0:  # killed (not finished before the kill landed): resume
        assert not out.exists()
        # Killed inside the very first save: nothing to resume from, so it starts again.
        resume = ["--resume", str(state)] if state.exists() else []
        done = subprocess.run([*RUN, *LONG, "--out", str(out), *resume], capture_output=True, text=True,
                              env=_env(), cwd=REPO)
        assert done.returncode == 0, f"seed {SEED}: {done.stderr[-3000:]}"
    record = json.loads(out.read_text())
    assert record["status"] == "ok"
    assert record["curve"] == straight["curve"], f"seed {SEED}"  # every loss, bit for bit
    assert record["final_val_loss"] == straight["final_val_loss"] and record["steps"] == straight["steps"]
    assert _temporaries(tmp_path) == [], f"seed {SEED}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "run.state.pt"]


SWEEP = """
import sys
from impls import isoflop
isoflop.sweep(sys.argv[1], [2e7], {"baseline": []}, ["L1-D16", "L1-D24", "L2-D16"], progress=False,
              data="synthetic", batch_size=2, seq_len=16, eval_batches=1, timing_warmup=1, lr=3e-3)
"""


def _sweep(out: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SWEEP, str(out)], env=_env(**env), cwd=REPO,
                            stdout=_sink(), stderr=subprocess.PIPE, text=True)


def test_an_isoflop_sweep_killed_mid_write_continues_to_the_same_points(tmp_path):
    rng = random.Random(f"{SEED}-sweep")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = _sweep(straight)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    proc = _sweep(killed, ETBENCH_WRITE_PAUSE="0.2")
    try:
        nth = rng.randint(1, 4)  # the nth write of a record or points.csv
        for i in range(nth):
            assert _wait_for(lambda: _temporaries(killed), 120, proc), f"no write seen (seed {SEED})"
            if i != nth - 1:
                _wait_for(lambda: not _temporaries(killed), 5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert _temporaries(killed)
    proc = _sweep(killed)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"seed {SEED}: {err[-3000:]}"
    a = pd.read_csv(straight / "points.csv").sort_values(["budget", "size"]).reset_index(drop=True)
    b = pd.read_csv(killed / "points.csv").sort_values(["budget", "size"]).reset_index(drop=True)
    columns = ["variant", "budget", "size", "params", "steps", "final_val_loss", "status", "recipe_hash"]
    pd.testing.assert_frame_equal(a[columns], b[columns])
    assert _temporaries(killed) == [], f"seed {SEED}"


def test_a_killed_rank_is_named_and_no_process_is_left(tmp_path):
    out, state, log = tmp_path / "ddp.json", tmp_path / "ddp.state.pt", tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([*RUN, "--nproc", "2", "--steps", "100000", "--save-every", "1", "--out", str(out)],
                                env=_env(ETBENCH_DIST_TIMEOUT="20"), cwd=REPO, stdout=_sink(), stderr=stderr)
    ranks = {}
    try:
        assert _wait_for(state.exists, 180, proc), log.read_text()[-3000:]
        ranks = {_rank_of(pid): pid for pid in _children(proc.pid)}
        assert set(ranks) == {0, 1}, ranks
        os.kill(ranks[1], signal.SIGKILL)
        started = time.monotonic()
        proc.wait(timeout=60)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in ranks.values():  # never leave a rank behind, even when the test fails
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    err = log.read_text()
    assert proc.returncode == 1, err
    lines = [line for line in err.splitlines() if line.startswith("etbench: error")]
    assert lines == ["etbench: error: rank 1 was killed by signal SIGKILL; the other ranks were stopped"], err
    assert "Traceback" not in err and "ChildFailedError" not in err
    assert took < 45
    assert not any(_alive(pid) for pid in ranks.values()), "a rank outlived the run"
    assert not out.exists()


def test_a_hung_rank_is_named_within_the_timeout(tmp_path):
    """A rank that stops responding (SIGSTOP: alive, silent) makes its peer's collective time out
    after --timeout seconds; the run fails naming the silent rank and the collective, with no
    record and no process left behind."""
    out, state, log = tmp_path / "ddp.json", tmp_path / "ddp.state.pt", tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([*RUN, "--nproc", "2", "--steps", "100000", "--save-every", "1", "--timeout", "8",
                                 "--out", str(out)], env=_env(), cwd=REPO, stdout=_sink(), stderr=stderr)
    ranks = {}
    try:
        assert _wait_for(state.exists, 180, proc), log.read_text()[-3000:]
        ranks = {_rank_of(pid): pid for pid in _children(proc.pid)}
        assert set(ranks) == {0, 1}, ranks
        os.kill(ranks[1], signal.SIGSTOP)
        started = time.monotonic()
        proc.wait(timeout=90)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in ranks.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    err = log.read_text()
    assert proc.returncode == 1, err
    lines = [line for line in err.splitlines() if line.startswith("etbench: error")]
    assert len(lines) == 1, err
    assert lines[0].startswith("etbench: error: rank 1 stopped responding: rank 0 waited 8 s for it in "), lines
    assert "a collective" not in lines[0], lines  # the collective is named
    assert "Traceback" not in err and "ChildFailedError" not in err
    # the timeout, then the agent's SIGTERM and, 30 s later, SIGKILL (see impls/ranks.py)
    assert took < 8 + 30 + 15, took
    assert not any(_alive(pid) for pid in ranks.values()), "a rank outlived the run"
    assert not out.exists()


def test_an_error_found_in_the_ranks_is_printed_once(tmp_path):
    """A FLOP budget above one step's model FLOPs (the parent's check) but below its counted
    FLOPs with recomputation (what the ranks measure): the ranks refuse it, the user sees one line."""
    from impls import data as data_lib
    from impls import train, zoo
    from impls.measure import model_flops_per_step

    recipe = train.Recipe(model="nano", batch_size=2, seq_len=16, steps=1)
    meta = zoo.build("nano", device="meta", **train.model_overrides(recipe, data_lib.load(recipe.data)))
    budget = 1.1 * model_flops_per_step(meta, 2 * 2, 16)
    out = tmp_path / "r.json"
    argv = [sys.executable, "-m", "impls.cli", "run", "--nproc", "2", "--model", "nano", "--batch-size", "2",
            "--seq-len", "16", "--eval-batches", "1", "--technique", "checkpoint:every=1", "--budget-flops", "counted",
            f"--flops-budget={budget!r}", "--out", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=180)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("etbench: error")]
    assert len(lines) == 1 and "smaller than one step" in lines[0], done.stderr
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr
    assert not out.exists()
