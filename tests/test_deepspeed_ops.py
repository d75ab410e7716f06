"""ZeRO-Offload's C++ Adam (issue 22, finding 6): `make setup` builds DeepSpeed's cpu_adam op
(:mod:`impls.engines.deepspeed_ops`); a build that fails there is printed in one line and
recorded with its reason and log, and ``zero:offload_optimizer=cpu`` is then refused before any
work -- one line, exit 2, nothing written -- instead of failing mid-run with a traceback.

The failed build is faked (a builder whose ``load`` raises what torch's JIT build raises when a
header is missing), so nothing is compiled here; the record and the refusal are real.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from impls import cli
from impls.engines import deepspeed_ops

BUILD_OUTPUT = ("Error building extension 'cpu_adam': [1/3] c++ -MMD -MF cpu_adam.o.d -O3 -Werror=format -c "
                "csrc/adam/cpu_adam.cpp -o cpu_adam.o\nFAILED: cpu_adam.o\n"
                "csrc/adam/cpu_adam.cpp:6:10: fatal error: Python.h: No such file or directory\n"
                "compilation terminated.\nninja: build stopped: subcommand failed.\n")


class FailingBuilder:
    def is_compatible(self, verbose=False):
        return True

    def load(self, verbose=False):
        raise RuntimeError(BUILD_OUTPUT)


class ReadyBuilder(FailingBuilder):
    def load(self, verbose=False):
        return object()


@pytest.fixture
def ext_root(tmp_path, monkeypatch):
    root = tmp_path / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    return root


def offload_run(tmp_path, *extra: str) -> tuple[int, Path]:
    out = tmp_path / "never" / "run.json"
    status = cli.main(["run", "--model", "nano", "--steps", "1", "--batch-size", "2", "--seq-len", "16",
                       "--technique", "zero:offload_optimizer=cpu", *extra, "--out", str(out)])
    return status, out


def test_a_failed_setup_build_is_one_line_and_recorded(ext_root, monkeypatch, capsys):
    monkeypatch.setattr(deepspeed_ops, "builders", lambda: ("cpu", [("CPUAdamBuilder", FailingBuilder()),
                                                                    ("ShareMemCommBuilder", ReadyBuilder())]))
    monkeypatch.setattr(deepspeed_ops, "prerequisites", lambda needs_nvcc=False: None)
    assert deepspeed_ops.main() == 0  # setup goes on
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert "CPUAdamBuilder could not be built here: RuntimeError: csrc/adam/cpu_adam.cpp:6:10: fatal error: " \
           "Python.h: No such file or directory" in err[0]
    assert "zero:offload_optimizer=cpu will be refused" in err[0]
    assert "ShareMemCommBuilder ready" in captured.out
    record = json.loads((ext_root / deepspeed_ops.STATUS).read_text())
    op = record["ops"]["CPUAdamBuilder"]
    assert op["ok"] is False and op["needs_nvcc"] is False
    assert Path(op["log"]).read_text().startswith("RuntimeError: Error building extension 'cpu_adam'")
    assert record["ops"]["ShareMemCommBuilder"]["ok"] is True
    assert record["torch"] == str(torch.__version__)


def test_zero_offload_is_refused_in_one_line_after_a_failed_setup_build(ext_root, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(deepspeed_ops, "builders", lambda: ("cpu", [("CPUAdamBuilder", FailingBuilder())]))
    monkeypatch.setattr(deepspeed_ops, "prerequisites", lambda needs_nvcc=False: None)
    deepspeed_ops.main()
    capsys.readouterr()
    status, out = offload_run(tmp_path)
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert err.count("\n") == 0 and err.startswith("etbench: error:"), err
    assert "zero:offload_optimizer=cpu cannot run here: DeepSpeedCPUAdam's C++ op (cpu_adam) did not build at " \
           "setup: RuntimeError: csrc/adam/cpu_adam.cpp:6:10: fatal error: Python.h" in err
    assert f"log: {ext_root}" in err and "valid here: offload_optimizer=none" in err
    assert not out.parent.exists()
    # the update offload does not run (SGD: torch's, on the host) and no offload are not refused
    from impls import train

    train.check_recipe_fields(train.Recipe(model="nano", steps=1, optimizer="sgd",
                                           techniques=["zero:offload_optimizer=cpu"]))
    train.check_recipe_fields(train.Recipe(model="nano", steps=1, techniques=["zero"]))


def test_a_record_for_another_torch_is_ignored(ext_root):
    ext_root.mkdir()
    stale = dict(deepspeed_ops.environment(), torch="0.0.0+another",
                 ops={"CPUAdamBuilder": dict(ok=False, reason="x", log=None)})
    (ext_root / deepspeed_ops.STATUS).write_text(json.dumps(stale))
    assert deepspeed_ops.read_status() == {}
    assert deepspeed_ops.cpu_adam_problem() is None  # c++, ninja and Python.h are here


def test_without_a_record_a_missing_compiler_is_refused(ext_root, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    status, out = offload_run(tmp_path)
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.count("\n") == 0, err
    assert f"is not built and cannot be built here: no C++ compiler ({tmp_path / 'no-such-c++'}) on PATH" in err
    assert not out.parent.exists()


def test_prerequisites_name_missing_python_headers(monkeypatch, tmp_path):
    import sysconfig

    paths = dict(sysconfig.get_paths(), include=str(tmp_path))
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: paths)
    problem = deepspeed_ops.prerequisites()
    assert problem == (f"no Python headers ({tmp_path / 'Python.h'} is missing: install "
                       f"python{sys.version_info.major}.{sys.version_info.minor}-dev)")


@pytest.mark.parametrize("release,expected", [
    (None, "no nvcc (CUDA_HOME="),
    ("12.4", "nvcc 12.4 ({nvcc}) differs from torch.version.cuda 13.0"),
    ("13.0", None),
])
def test_a_cuda_op_needs_the_nvcc_of_torch_version_cuda(release, expected, monkeypatch, tmp_path):
    import torch.utils.cpp_extension as cpp

    home = tmp_path / "cuda"
    nvcc = home / "bin" / "nvcc"
    if release:
        nvcc.parent.mkdir(parents=True)
        nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
        nvcc.chmod(0o755)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp, "CUDA_HOME", str(home) if release else None)
    problem = deepspeed_ops.nvcc_problem()
    if expected is None:
        assert problem is None
    else:
        assert problem.startswith(expected.format(nvcc=nvcc)), problem


def test_the_venv_bin_folder_goes_on_path(monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin")
    deepspeed_ops.venv_bin_on_path()
    assert os.environ["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
