"""Several ranks on this machine: ``etbench run --nproc N`` (and ``etbench compare --nproc N``).

The parent checks everything it can (recipe, data, output paths, a training state to resume) before
starting any rank, then runs torch's elastic agent in-process (what ``torchrun --standalone``
runs) over ``python -m impls.cli ...`` without ``--nproc``.  What a user sees when something
fails is one line, once:

* a rank that fails on bad input (status 2), a write error (1) or a divergence (3) leaves its
  one-line message in a folder the parent names in :data:`RANK_ERRORS_ENV` instead of printing
  it, so N ranks failing alike print one line, not N; the parent prints the lowest rank's and
  exits with its status;
* a rank that dies (a signal, a crash with its own traceback above) is named by the parent:
  ``rank R was killed by signal SIGKILL; the other ranks were stopped`` (status 1);
* the agent stops the other ranks as soon as one fails (SIGTERM, then SIGKILL after its
  shutdown timeout), so none is left behind; its log lines and ``ChildFailedError`` traceback
  are not shown.

* a rank that hangs (alive but silent: stopped, deadlocked) makes its peers' collective time out
  after ``--timeout`` seconds (``ETBENCH_DIST_TIMEOUT``, :mod:`impls.dist`); they report the
  collective they were in, and the parent names the silent rank: ``rank 1 stopped responding:
  rank 0 waited 8 s for it in all_reduce``.  The agent then stops it (SIGTERM, SIGKILL 30 s
  later).

A rank blocked in a collective whose peer died without an agent to stop it (ranks started by
hand) gives up after the same timeout with one line.

Process lifetime:

* ranks die with their launcher: each rank is started through this module (``python -m
  impls.ranks impls.cli ...``, :func:`become_rank`), which asks the kernel to SIGKILL it when the
  launcher dies (``prctl(PR_SET_PDEATHSIG)`` on Linux; elsewhere a thread polls the launcher's
  pid), so a ``kill -9`` of the launcher leaves no rank running and no record written (the
  agent starts each rank in a session of its own, so nothing else would reach them);
* Ctrl-C (SIGINT) of the launcher: the agent stops the ranks with SIGINT, which kills a rank at
  once and quietly (:func:`become_rank` restores its default action: no ``KeyboardInterrupt``
  traceback per rank), and the launcher prints one line and exits with status 130; writes are
  atomic, so the last saved training state stays resumable;
* more ranks than CPU cores (or CUDA devices) are refused before any work (:func:`check_fit`)
  unless ``--oversubscribe``: oversubscribed ranks take turns on the cores and every collective
  waits for the slowest, so such a run can crawl (100 ranks on 2 cores made no progress in 120 s).

``python -m impls.ranks MODULE ARGS...`` is internal plumbing, not a command: it is how
:func:`launch` starts each rank (:func:`become_rank`, then ``MODULE`` run as ``__main__``), with
the environment the agent sets; so it has no ``etbench`` subcommand (``tests/test_cli_commands.py``
lists it among the entry points that are not commands, with this reason).
"""
from __future__ import annotations

import json
import logging
import re
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from .errors import EXIT_FAILED, ConfigError

#: Environment variable naming the folder where ranks leave their one-line errors.
RANK_ERRORS_ENV = "ETBENCH_RANK_ERRORS"
#: Seconds the agent waits for a rank to exit after SIGTERM before it sends SIGKILL.
SHUTDOWN_S = 5
_QUIET_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run")
#: Environment variable holding the launcher's pid: a rank whose parent is no longer it dies.
LAUNCHER_PID_ENV = "ETBENCH_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
#: The signals torch's agent turns into ``SignalException`` while it runs (its default list).
_AGENT_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
                       if hasattr(signal, name))


def _launcher_pid() -> int | None:
    try:
        return int(os.environ[LAUNCHER_PID_ENV])
    except (KeyError, ValueError):
        return None


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _set_parent_death_signal(sig: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)``: the kernel sends ``sig`` when the parent dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_launcher(launcher: int, interval: float = 0.2) -> None:
    while os.getppid() == launcher:
        time.sleep(interval)
    _die()


def become_rank() -> None:
    """What a rank started by :func:`launch` does first, before importing torch:

    * die with the launcher: SIGKILL when it dies (``PR_SET_PDEATHSIG``, or a thread polling the
      parent's pid where prctl is missing), and at once if it died before that was set up;
    * Ctrl-C: the default action of SIGINT (the agent forwards it to stop the ranks) kills the
      rank quietly instead of a ``KeyboardInterrupt`` traceback from wherever it was.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    launcher = _launcher_pid()
    if launcher is None:
        return
    if not _set_parent_death_signal(signal.SIGKILL):
        threading.Thread(target=_watch_launcher, args=(launcher,), name="etbench-launcher-watch", daemon=True).start()
    if os.getppid() != launcher:  # it died before the kernel was told
        _die()


def cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_fit(nproc: int, devices: set[str], oversubscribe: bool) -> None:
    """Refuse (ConfigError) more ranks than the CPU cores this process may use, or than the CUDA
    devices when a run may use CUDA (``devices``: the recipes' ``--device`` values), unless
    ``oversubscribe`` (then warn).  The CUDA count comes from NVML (``torch.cuda.device_count``),
    which does not initialise CUDA in this process."""
    if nproc <= 1:
        return
    limit, what = cores(), "CPU core(s) this process may use"
    if devices - {"cpu"}:
        import torch

        gpus = torch.cuda.device_count()
        if gpus > 0:  # none: the device check names the problem ('cuda' requested but not available)
            limit, what = gpus, "CUDA device(s)"
    if nproc <= limit:
        return
    if not oversubscribe:
        raise ConfigError(f"--nproc {nproc} is more ranks than the {limit} {what}: oversubscribed ranks take turns and "
                          f"every collective waits for the slowest, so the run may make no progress; --nproc {limit} "
                          f"or less, or --oversubscribe to run anyway")
    print(f"etbench: warning: --nproc {nproc} on {limit} {what} (--oversubscribe): the ranks take turns, so its "
          f"timings are not comparable", file=sys.stderr)


def in_launched_rank() -> bool:
    """Whether this process is a rank started by :func:`launch`."""
    return bool(os.environ.get(RANK_ERRORS_ENV)) and "LOCAL_RANK" in os.environ


def report_error(status: int, message: str) -> bool:
    """In a rank started by :func:`launch`: leave ``message`` for the parent to print once and
    return True; elsewhere return False (the caller prints it)."""
    if not in_launched_rank():
        return False
    rank = int(os.environ.get("RANK", "0"))
    try:
        Path(os.environ[RANK_ERRORS_ENV], f"rank{rank}.json").write_text(
            json.dumps(dict(rank=rank, status=int(status), message=str(message))))
    except OSError:
        return False
    return True


def _reported(folder: Path) -> list[dict]:
    found = []
    for path in folder.glob("rank*.json"):
        try:
            entry = json.loads(path.read_text())
            found.append(dict(rank=int(entry["rank"]), status=int(entry["status"]), message=str(entry["message"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(found, key=lambda e: e["rank"])


def summarise_failure(failures: dict, reported: list[dict]) -> tuple[int, str]:
    """The exit status and the one line for a failed launch: the lowest rank's own message if
    any rank left one, else the rank that died (killed by a signal first, then the lowest)."""
    # A rank that lost its peer reports that too; the peer that died is the news.
    own = [e for e in reported if e["status"] != EXIT_FAILED or "lost contact" not in e["message"]]
    if own:
        first = own[0]
        return first["status"], first["message"]
    hung = _hung(failures, reported)
    if hung:
        return EXIT_FAILED, hung
    if not failures:
        return EXIT_FAILED, reported[0]["message"] if reported else "a rank failed"
    # Killed by a signal first, but not SIGTERM: that is how the agent stops the survivors.
    rank, failure = min(failures.items(), key=lambda kv: (kv[1].exitcode >= 0, kv[1].exitcode == -15, kv[0]))
    if failure.exitcode == -signal.SIGABRT:
        # NCCL's watchdog aborts a rank whose collective exceeded the timeout (unless blocking
        # wait is on: impls.dist.NCCL_ENV), before the rank can say which collective it waited in
        seconds = os.environ.get("ETBENCH_DIST_TIMEOUT")
        limit = f"{float(seconds):g} s, --timeout" if seconds else "--timeout"
        what = (f"was aborted (SIGABRT): NCCL's watchdog aborts a rank whose collective waited longer than the "
                f"timeout ({limit}), so a peer probably stopped responding (or a CUDA error: its log is above)")
    elif failure.exitcode < 0:
        what = f"was killed by signal {failure.signal_name()}"
    else:
        what = f"exited with status {failure.exitcode}" + (" (its traceback is above)" if failure.exitcode == 1 else "")
    return EXIT_FAILED, f"rank {rank} {what}; the other ranks were stopped"


def _hung(failures: dict, reported: list[dict]) -> str | None:
    """The one line for a rank that stopped responding: a rank whose collective timed out
    reported it, and the ranks that neither reported nor died before it are the ones it waited
    for (the agent stopped them afterwards).  None when no collective timed out."""
    timed_out = [e for e in reported if "timed out" in e["message"].lower()]
    if not timed_out:
        return None
    first = min(failures[e["rank"]].timestamp for e in timed_out if e["rank"] in failures) if failures else 0
    silent = sorted(r for r, f in failures.items()
                    if r not in {e["rank"] for e in reported} and f.timestamp >= first)
    waiter = timed_out[0]
    where = re.search(r"lost contact with the other ranks in (.+?) \(", waiter["message"])
    seconds = os.environ.get("ETBENCH_DIST_TIMEOUT")
    who = ("rank " + ", ".join(map(str, silent))) if silent else "a rank"
    return (f"{who} stopped responding: rank {waiter['rank']} waited "
            + (f"{float(seconds):g} s " if seconds else "")
            + f"for it in {where.group(1) if where else 'a collective'} (--timeout); the ranks were stopped")


def _has_shutdown_timeout() -> bool:
    """Whether this torch's launcher takes ``--shutdown_timeout`` (torch 2.11's does not)."""
    from torch.distributed.run import get_args_parser

    return any("--shutdown_timeout" in action.option_strings for action in get_args_parser()._actions)


def launch(module_args: list[str], nproc: int) -> int:
    """Run ``python -m <module_args>`` on ``nproc`` local ranks; return the exit status (0, or
    the failure's, with its one line printed on stderr)."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    saved_env = dict(os.environ)
    saved_handlers = {sig: signal.getsignal(sig) for sig in _AGENT_SIGNALS}
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    saved_loggers = [(lg.handlers[:], lg.propagate) for lg in loggers]
    folder = Path(tempfile.mkdtemp(prefix="etbench-ranks-"))
    try:
        # Ranks import what this process imports (asv strips PYTHONPATH from benchmarks).
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        os.environ[RANK_ERRORS_ENV] = str(folder)
        os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default with several ranks per machine
        for lg in loggers:  # the agent's log lines and warnings: our own line replaces them
            lg.handlers, lg.propagate = [logging.NullHandler()], False
        # Interrupted (Ctrl-C, SIGTERM...), the agent stops the ranks with the signal it got (a rank dies
        # of SIGINT at once: become_rank), then SIGKILL after SHUTDOWN_S.
        # After a rank failed, torch 2.13's agent ignores this (LocalElasticAgent._stop_workers calls
        # _shutdown() with its default 30 s), so a hung rank is killed 30 s after its peer gave up.
        # Each rank runs `python -m impls.ranks MODULE ARGS`: become_rank(), then MODULE as __main__.
        # (torchrun's --shutdown_timeout is newer than torch 2.11, whose agent always waits 30 s)
        shutdown = [f"--shutdown_timeout={SHUTDOWN_S}"] if _has_shutdown_timeout() else []
        args = parse_args([f"--nproc_per_node={nproc}", "--max-restarts=0", *shutdown,
                           "-m", __spec__.name if __spec__ else "impls.ranks", *module_args])
        # what torchrun --standalone sets: a local C10d store on a free port
        args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
        config, cmd, cmd_args = config_from_args(args)
        try:
            elastic_launch(config, cmd)(*cmd_args)
            return 0
        except ChildFailedError as e:
            status, message = summarise_failure(e.failures, _reported(folder))
            print(f"etbench: error: {message}", file=sys.stderr)
            return status
        except SignalException as e:  # the agent's handler; it has stopped the ranks with that signal
            if e.sigval == signal.SIGINT:
                raise KeyboardInterrupt from None  # the caller prints its one line (status 130)
            print(f"etbench: error: stopped by {e.sigval.name}; the ranks were stopped", file=sys.stderr)
            return 128 + int(e.sigval)
    finally:
        if threading.current_thread() is threading.main_thread():  # the agent's handlers would outlive it
            for sig, handler in saved_handlers.items():
                if handler is not None:
                    signal.signal(sig, handler)
        os.environ.clear()
        os.environ.update(saved_env)
        for lg, (handlers, propagate) in zip(loggers, saved_loggers):
            lg.handlers, lg.propagate = handlers, propagate
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":  # a rank started by launch(): `python -m impls.ranks MODULE ARGS...`
    become_rank()
    import runpy

    module = sys.argv[1]
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
