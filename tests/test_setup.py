"""`make setup` follows TORCH_SPEC (issue 22, finding 5): the venv's stamp depends on a record
of the torch spec (``$(VENV)/.torch-spec``), rewritten only when a spec -- or a wheelhouse -- is
*given* and differs, so ``make setup TORCH_SPEC='torch==2.11.0 --index-url .../cu130'`` sets the
venv up again (removing the old torch first) while a later plain ``make test`` keeps it.

Checked with ``make -q`` (exit 1: something to do) and ``make -n`` on a copy of the Makefile
and pyproject.toml in a temporary folder, over a fake venv: nothing is installed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_SPEC = "torch==2.11.0 --index-url https://download.pytorch.org/whl/cu130"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


@pytest.fixture
def project(tmp_path):
    """A copy of the Makefile and pyproject.toml (older than anything the test makes) and a venv
    whose stamp is up to date for the default spec."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    os.utime(tmp_path / "pyproject.toml", (1_600_000_000, 1_600_000_000))
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".torch-spec").write_text("torch==2.13.0\n")
    os.utime(venv / ".torch-spec", (1_600_000_100, 1_600_000_100))
    (venv / ".etbench-stamp").touch()
    return tmp_path


def make(project: Path, *args: str, flag: str = "-q") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_SPEC", "WHEELHOUSE", "VENV", "MAKEFLAGS")}
    return subprocess.run(["make", "--no-print-directory", flag, "setup", f"VENV={project / 'venv'}", *args],
                          cwd=project, env=env, capture_output=True, text=True, timeout=60)


def test_an_unchanged_or_unnamed_spec_leaves_the_venv_alone(project):
    assert make(project).returncode == 0
    assert make(project, "TORCH_SPEC=torch==2.13.0").returncode == 0
    assert "pip" not in make(project, flag="-n").stdout


def test_a_changed_spec_sets_the_venv_up_again_removing_the_old_torch_first(project):
    assert make(project, f"TORCH_SPEC={CUDA_SPEC}").returncode == 1
    plan = make(project, f"TORCH_SPEC={CUDA_SPEC}", flag="-n").stdout
    assert "pip uninstall -q -y torch" in plan
    assert f"pip install -q {CUDA_SPEC}" in plan
    assert plan.index("pip uninstall") < plan.index(f"pip install -q {CUDA_SPEC}")
    # make -n changed nothing; a real run records the new spec (pip stubbed out: the venv's
    # python is `true`), after which the same spec, or none, has nothing to do
    (project / "venv" / "bin" / "python").symlink_to(shutil.which("true"))
    done = make(project, f"TORCH_SPEC={CUDA_SPEC}", flag="-s")
    assert done.returncode == 0, done.stderr
    assert "setting the venv up again" in done.stdout
    assert (project / "venv" / ".torch-spec").read_text() == CUDA_SPEC + "\n"
    assert make(project, f"TORCH_SPEC={CUDA_SPEC}").returncode == 0
    assert make(project).returncode == 0  # a plain `make test` later keeps the CUDA venv


def test_a_venv_from_before_the_record_is_not_set_up_again(project):
    (project / "venv" / ".torch-spec").unlink()
    (project / "venv" / "bin" / "python").symlink_to(shutil.which("true"))
    done = make(project, flag="-s")
    assert done.returncode == 0 and "pip" not in done.stdout, done.stdout
    assert (project / "venv" / ".torch-spec").read_text() == "torch==2.13.0\n"
    assert make(project).returncode == 0


def test_a_wheelhouse_setup_is_kept_by_later_plain_runs(project, tmp_path):
    house = tmp_path / "house"
    assert make(project, f"WHEELHOUSE={house}").returncode == 1
    plan = make(project, f"WHEELHOUSE={house}", flag="-n").stdout
    assert f"-m impls.wheelhouse install {house}" in plan
    assert "--system-site-packages" in plan
    assert "TORCH_SPEC" not in plan and "pip install" not in plan  # never a torch from an index
    (project / "venv" / ".torch-spec").write_text(f"wheelhouse {house}\n")
    os.utime(project / "venv" / ".torch-spec", (1_600_000_100, 1_600_000_100))
    assert make(project).returncode == 0
    os.utime(project / "pyproject.toml")  # a changed pyproject reinstalls from the same wheelhouse
    plan = make(project, flag="-n").stdout
    assert f"-m impls.wheelhouse install {house}" in plan and "pip install" not in plan
    assert make(project, f"TORCH_SPEC={CUDA_SPEC}").returncode == 1
