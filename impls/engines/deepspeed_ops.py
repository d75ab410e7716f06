"""Build DeepSpeed's JIT-compiled ops once, at ``make setup``: ``python -m impls.engines.deepspeed_ops``.

DeepSpeed compiles its C++ ops on first use (``torch.utils.cpp_extension``, cached per
environment under ``$TORCH_EXTENSIONS_DIR``, which the Makefile keeps inside the project: two
environments sharing one cache directory rebuild it in turn): ``CPUAdamBuilder``
(``DeepSpeedCPUAdam``, what ZeRO-Offload's optimizer step runs, ~45 s on 2 cores) and, on a CPU
accelerator, ``ShareMemCommBuilder`` (the shared-memory collectives ``deepspeed.comm`` builds when
it starts, ``deepspeed/comm/torch.py: build_shm_op``, ~30 s).  Done at setup, no benchmark or
test times it.

An op that cannot build here does not fail setup: its reason is printed in one line, the
compiler's output saved to ``<extensions root>/etbench-<op>-build.log``, and both recorded in
``<extensions root>/etbench-deepspeed-ops.json`` (with the torch, DeepSpeed and Python versions
it was built for).  The ``zero`` technique reads that record before any work
(:func:`cpu_adam_problem`) and refuses ``offload_optimizer=cpu`` in one line with the reason,
instead of failing mid-run with a traceback (or building for a minute at run time).

What the build needs: a C++ compiler, ninja and the Python headers (``Python.h``), and, for an op
whose builder is a ``CUDAOpBuilder``, nvcc of the CUDA version torch was built with
(``torch.version.cuda``).  DeepSpeed 0.19's ``CPUAdamBuilder`` is a host-side ``CPUOpBuilder`` on
every accelerator, CUDA included (``cuda_accelerator.py``: "Host-side optimizers run on the CPU
wherever the model lives"): no nvcc.  Earlier DeepSpeed releases built it as a CUDA op on a GPU
machine, where an nvcc that differs from ``torch.version.cuda`` fails the build; the record says
which kind of builder ran.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import traceback
from pathlib import Path

OPS = ("CPUAdamBuilder", "ShareMemCommBuilder")
STATUS = "etbench-deepspeed-ops.json"
#: torch.utils.cpp_extension's name of each op's build folder (``<root>/<name>/<name>.so``)
OP_NAMES = {"CPUAdamBuilder": "cpu_adam", "ShareMemCommBuilder": "deepspeed_shm_comm"}


def extensions_root() -> Path:
    """Where ``torch.utils.cpp_extension`` builds (and finds) JIT ops in this process:
    ``torch.utils.cpp_extension._get_build_directory`` without its side effect (it creates the
    folder)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accel = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accel = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accel = "cpu"
    return Path(get_default_build_root(), f"py{sys.version_info.major}{sys.version_info.minor}"
                f"{getattr(sys, 'abiflags', '')}_{accel}")


def venv_bin_on_path() -> None:
    """Put this interpreter's ``bin`` folder on PATH when it is not (``.venv/bin/python`` run
    without activating the venv): torch runs ``ninja`` from PATH, and the venv's ninja (a
    DeepSpeed dependency) is there."""
    here = os.path.dirname(sys.executable)
    if here not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")


def environment() -> dict:
    """What a build is valid for."""
    import torch
    from importlib.metadata import PackageNotFoundError, version

    try:
        ds = version("deepspeed")
    except PackageNotFoundError:
        ds = None
    return dict(torch=str(torch.__version__), torch_cuda=torch.version.cuda, deepspeed=ds,
                python=sys.version.split()[0], executable=sys.executable)


def nvcc_problem() -> str | None:
    """Why nvcc cannot build a CUDA op for this torch, or None."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return None  # a CPU torch builds CUDA ops for the CPU
    nvcc = Path(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if nvcc is None or not nvcc.exists():
        return f"no nvcc (CUDA_HOME={CUDA_HOME or 'unset'}; torch {torch.__version__} needs CUDA {torch.version.cuda})"
    try:
        out = subprocess.run([str(nvcc), "-V"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"{nvcc} does not run ({type(e).__name__})"
    m = re.search(r"release (\d+)\.(\d+)", out)
    have = f"{m.group(1)}.{m.group(2)}" if m else "unknown"
    want = ".".join(torch.version.cuda.split(".")[:2])
    if have != want:
        return f"nvcc {have} ({nvcc}) differs from torch.version.cuda {torch.version.cuda}"
    return None


def prerequisites(needs_nvcc: bool = False) -> str | None:
    """Why a C++ op cannot be JIT-built here (a compiler, ninja, Python.h; nvcc for a CUDA op),
    or None.  Looks, builds nothing."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx}) on PATH"
    venv_bin_on_path()
    if shutil.which("ninja") is None:
        return "no ninja on PATH (pip install ninja)"
    header = Path(sysconfig.get_paths()["include"], "Python.h")
    if not header.exists():
        return (f"no Python headers ({header} is missing: install python{sys.version_info.major}."
                f"{sys.version_info.minor}-dev)")
    return nvcc_problem() if needs_nvcc else None


def read_status(root: Path | None = None) -> dict:
    """The setup-time record of ``root`` (default: :func:`extensions_root`), if it was made for
    this torch, DeepSpeed and Python; else empty."""
    path = (root or extensions_root()) / STATUS
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    env = environment()
    if any(record.get(k) != env[k] for k in ("torch", "deepspeed", "python")):
        return {}
    return record


def cpu_adam_problem() -> str | None:
    """Why ``DeepSpeedCPUAdam`` cannot run in this environment, or None; decided from the
    setup-time record (a build that failed there is not retried at run time) and, without one,
    from the build's prerequisites.  Builds nothing, imports no DeepSpeed."""
    record = read_status()
    op = record.get("ops", {}).get("CPUAdamBuilder")
    if op is not None and not op["ok"]:
        log = f"; log: {op['log']}" if op.get("log") else ""
        return (f"DeepSpeedCPUAdam's C++ op (cpu_adam) did not build at setup: {op['reason'].rstrip('.')}{log} (fix it, then "
                f"run 'make setup' or 'python -m impls.engines.deepspeed_ops' again)")
    if op is not None:
        venv_bin_on_path()
        return None
    problem = prerequisites()
    if problem:
        return f"DeepSpeedCPUAdam's C++ op (cpu_adam) is not built and cannot be built here: {problem}"
    return None


def first_error(text: str) -> str:
    """The line of a failed build's output that says why (the compiler's first ``error``), or
    the first line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if re.search(r"\berror\b", line, re.IGNORECASE) and not line.startswith(("Error building extension",
                                                                                  "RuntimeError: Error building")):
            return line[:300]
    return (lines[0] if lines else "unknown error")[:300]


def build_one(name: str, builder, root: Path) -> dict:
    """Build ``builder``'s op; the outcome as recorded (``ok``, ``reason``, ``log``, ``seconds``)."""
    try:
        from deepspeed.ops.op_builder.builder import CUDAOpBuilder

        needs_nvcc = isinstance(builder, CUDAOpBuilder)
    except ImportError:  # pragma: no cover - a DeepSpeed without it
        needs_nvcc = False
    entry = dict(builder=type(builder).__module__ + "." + type(builder).__qualname__, needs_nvcc=needs_nvcc)
    problem = prerequisites(needs_nvcc)
    if problem:
        return dict(entry, ok=False, reason=problem, log=None, seconds=0.0)
    t0 = time.perf_counter()
    try:
        builder.load()
    except Exception as e:  # a failed build must not fail setup: recorded, refused at run time
        log = root / f"etbench-{OP_NAMES.get(name, name)}-build.log"
        text = f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}"
        try:
            root.mkdir(parents=True, exist_ok=True)
            log.write_text(text)
        except OSError:
            log = None
        return dict(entry, ok=False, reason=f"{type(e).__name__}: {first_error(str(e) or type(e).__name__)}",
                    log=str(log) if log else None, seconds=round(time.perf_counter() - t0, 1))
    return dict(entry, ok=True, reason=None, log=None, seconds=round(time.perf_counter() - t0, 1))


def builders():
    """(name, builder or None) for :data:`OPS` on this machine's DeepSpeed accelerator."""
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    return accel._name, [(name, accel.create_op_builder(name)) for name in OPS]


def main() -> int:
    venv_bin_on_path()
    try:
        accel, found = builders()
    except Exception as e:  # deepspeed missing or broken: nothing to build
        print(f"deepspeed ops: not built ({type(e).__name__}: {e})", file=sys.stderr)
        return 0
    root = extensions_root()
    record = dict(environment(), accelerator=accel, built_at=time.strftime("%Y-%m-%dT%H:%M:%S"), ops={})
    for name, builder in found:
        if builder is None or not builder.is_compatible():
            print(f"deepspeed ops: {name} is not available on this accelerator; skipped")
            continue
        entry = build_one(name, builder, root)
        record["ops"][name] = entry
        if entry["ok"]:
            print(f"deepspeed ops: {name} ready ({entry['seconds']:.0f} s)")
        else:
            log = f" (log: {entry['log']})" if entry["log"] else ""
            after = "; zero:offload_optimizer=cpu will be refused" if name == "CPUAdamBuilder" else ""
            print(f"deepspeed ops: {name} could not be built here: {entry['reason']}{log}{after}", file=sys.stderr)
    try:
        root.mkdir(parents=True, exist_ok=True)
        (root / STATUS).write_text(json.dumps(record, indent=1) + "\n")
    except OSError as e:
        print(f"deepspeed ops: cannot record the result in {root / STATUS}: {e.strerror or e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
