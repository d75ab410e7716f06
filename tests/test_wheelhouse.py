"""The offline install (issue 22, "What to build" 4): ``make wheelhouse`` / ``make setup
WHEELHOUSE=dir`` (:mod:`impls.wheelhouse`), and the one-line refusal of what needs a package the
wheelhouse left out (:mod:`impls.requires`).

* which packages go in: the closure of the project's requirements without torch and what only
  torch needs, the target's preinstalled packages only while the budget lasts, the largest
  others left out (with their dependents installed without resolving them);
* the install, in a throw-away venv over a fake "CUDA" torch, from hand-made wheels: no index,
  the installed torch kept even though the wheelhouse offers a newer one, a requirement that
  would need another torch failing loudly, the left-out package recorded;
* a technique or optimizer whose package was left out exits 2 with one line naming it and why.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from impls import cli, requires, wheelhouse
from impls.wheelhouse import MIB, Requirement, choose, closure, marker_env

ROOT = Path(__file__).resolve().parents[1]
ENV = marker_env("3.12")


def node(name: str, *requires: str) -> dict:
    return dict(name=name, version="1.0", requires=list(requires), url="")


GRAPH = {n["name"].lower(): n for n in [
    node("deepspeed", "torch>=2", "ninja", "pydantic"),
    node("pydantic", "typing-extensions"),
    node("typing-extensions"),
    node("ninja"),
    node("bitsandbytes", "torch", "numpy"),
    node("galore-torch", "torch", "transformers", "bitsandbytes"),
    node("transformers", "numpy", "tokenizers", "typing-extensions"),
    node("tokenizers"),
    node("numpy"),
    node("seaborn", "matplotlib", "numpy"),
    node("matplotlib", "numpy"),
    node("pytest", "tomli; python_version < '3.11'", "pluggy"),
    node("pluggy"),
    node("tomli"),
    node("torch", "triton", "nvidia-cublas", "sympy", "typing-extensions"),
    node("triton"), node("nvidia-cublas"), node("sympy"),
]}
SIZES = {"deepspeed": 2, "pydantic": 3, "typing-extensions": 1, "ninja": 1, "bitsandbytes": 41, "galore-torch": 1,
         "transformers": 13, "tokenizers": 3, "numpy": 16, "seaborn": 1, "matplotlib": 9, "pytest": 1, "pluggy": 1,
         "tomli": 1, "torch": 900, "triton": 100, "nvidia-cublas": 500, "sympy": 6}
SIZES = {k: v * MIB for k, v in SIZES.items()}
ROOTS = [Requirement(r) for r in ("deepspeed>=0.14", "bitsandbytes>=0.50", "galore-torch", "seaborn", "matplotlib",
                                  "numpy", "pytest>=8")]


def test_the_closure_never_enters_torch_and_follows_markers():
    names = closure(GRAPH, ROOTS, ENV, stop=set())
    assert not names & {"torch", "triton", "nvidia-cublas", "sympy"}  # what only torch needs stays out too
    assert "tomli" not in names  # python_version < '3.11' is false on the target
    assert "tomli" in closure(GRAPH, ROOTS, marker_env("3.10"), stop=set())
    assert {"deepspeed", "pydantic", "typing-extensions", "ninja", "tokenizers", "pluggy"} <= names


def test_over_budget_the_largest_missing_package_is_left_out_and_preinstalled_ones_only_fill_the_rest():
    chosen = choose(GRAPH, ROOTS, ENV, SIZES, preinstalled={"numpy", "transformers", "seaborn"}, max_bytes=20 * MIB)
    assert set(chosen["left_out"]) == {"bitsandbytes"}
    assert "41.0 MiB, the largest package the target lacks" in chosen["left_out"]["bitsandbytes"]
    # the target lacks: deepspeed, pydantic, typing-extensions, ninja, galore-torch, pytest, pluggy (10 MiB);
    # then preinstalled ones (and what they need: matplotlib, tokenizers) smallest first, within 20 MiB
    assert chosen["include"] == {"deepspeed", "pydantic", "typing-extensions", "ninja", "galore-torch", "pytest",
                                 "pluggy", "seaborn", "tokenizers"}
    assert chosen["total"] == 14 * MIB
    assert chosen["expected"] == {"numpy", "transformers", "matplotlib"}
    assert chosen["no_deps"] == {"galore-torch": {"bitsandbytes"}}  # installed without resolving its deps
    everything = choose(GRAPH, ROOTS, ENV, SIZES, preinstalled=set(), max_bytes=200 * MIB)
    assert not everything["left_out"] and not everything["expected"] and not everything["no_deps"]


def test_target_tags_list_every_manylinux_level_and_the_target_abi():
    args = wheelhouse.target_args("3.12")
    assert args[:3] == ["--only-binary=:all:", "--python-version", "3.12"]
    plats = [args[i + 1] for i, a in enumerate(args) if a == "--platform"]
    assert plats[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in plats and "manylinux2014_x86_64" in plats
    assert [args[i + 1] for i, a in enumerate(args) if a == "--abi"] == ["cp312", "abi3", "none"]


# --------------------------------------------------------------------------- refusals


@pytest.fixture
def left_out_bitsandbytes(tmp_path, monkeypatch):
    record = tmp_path / "etbench-wheelhouse.json"
    record.write_text(json.dumps(dict(left_out={"bitsandbytes": "41.1 MiB, the largest package the target lacks: "
                                                                "left out to keep the wheelhouse within its 40 MiB "
                                                                "budget"})))
    monkeypatch.setattr(requires, "record_path", lambda: record)
    real = requires.installed
    monkeypatch.setattr(requires, "installed", lambda module: module != "bitsandbytes" and real(module))


@pytest.mark.parametrize("argv,message", [
    (["--optimizer", "adamw8bit"], "optimizer 'adamw8bit' needs the package bitsandbytes, which is left out of the "
                                   "wheelhouse this environment was installed from (41.1 MiB"),
    (["--technique", "galore"], "technique 'galore:rank=8,update_proj_gap=200,scale=0.25' needs the package "
                                "bitsandbytes (galore_torch imports it), which is left out of the wheelhouse"),
], ids=["adamw8bit", "galore"])
def test_what_needs_a_left_out_package_is_refused_in_one_line(argv, message, left_out_bitsandbytes, tmp_path, capsys):
    out = tmp_path / "never" / "run.json"
    status = cli.main(["run", "--model", "nano", "--steps", "1", *argv, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert status == 2 and message in err, err
    assert err.count("\n") == 0 and err.startswith("etbench: error:")
    assert not out.parent.exists()


def test_a_package_missing_otherwise_says_make_setup_installs_it(monkeypatch, tmp_path):
    monkeypatch.setattr(requires, "record_path", lambda: tmp_path / "none.json")
    monkeypatch.setattr(requires, "installed", lambda module: module != "peft")
    from impls.errors import ConfigError

    with pytest.raises(ConfigError, match=r"technique 'lora:.*' needs the package peft, which is not installed in "
                                          r"this environment \(.*\); 'make setup' installs it"):
        from impls import techniques

        techniques.configure([techniques.parse("lora")], "cpu")


# --------------------------------------------------------------------------- the install, offline


def make_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = (), body: str = "") -> Path:
    """A minimal pure-Python wheel: package ``name`` (``__version__``), its metadata and RECORD."""
    module = name.replace("-", "_")
    dist = f"{module}-{version}.dist-info"
    files = {f"{module}/__init__.py": f"__version__ = {version!r}\n{body}",
             f"{dist}/METADATA": "Metadata-Version: 2.1\nName: " + name + "\nVersion: " + version + "\n"
             + "".join(f"Requires-Dist: {r}\n" for r in requires),
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join(record + [f"{dist}/RECORD,,"]) + "\n"
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name_, text in files.items():
            z.writestr(name_, text)
    return path


def manifest(house: Path, requirements: list[str], no_deps: list[str] = (), left_out: list[dict] = ()) -> None:
    house.mkdir(exist_ok=True)
    data = dict(python=f"{sys.version_info.major}.{sys.version_info.minor}", wheels=[], requirements=requirements,
                no_deps=list(no_deps), left_out=list(left_out), expected_on_target=[])
    (house / wheelhouse.MANIFEST).write_text(json.dumps(data))


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A venv holding a fake CUDA torch (2.11.0+cu130), as the GPU box's interpreter does."""
    root = tmp_path_factory.mktemp("offline")
    env = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=120)
    wheels = root / "torchwheel"
    wheels.mkdir()
    make_wheel(wheels, "torch", "2.11.0+cu130")
    clean = dict(wheelhouse._clean_env())
    subprocess.run([env / "bin" / "python", "-m", "pip", "install", "-q", "--no-index", "--find-links", wheels, "torch"],
                   check=True, env=clean, timeout=120)
    return env


def offline_install(venv: Path, house: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PIP_NO_INDEX="1")
    return subprocess.run([venv / "bin" / "python", "-m", "impls.wheelhouse", "install", str(house), "--project", ""],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def installed(venv: Path, name: str) -> str | None:
    done = subprocess.run([venv / "bin" / "python", "-c", f"import importlib.metadata as m; print(m.version({name!r}))"],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


@pytest.mark.slow
def test_an_offline_install_keeps_the_interpreters_torch(venv, tmp_path):
    house = tmp_path / "house"
    manifest(house, ["alpha", "beta"], no_deps=["gamma==1.0"],
             left_out=[dict(name="bnb", reason="41.1 MiB: left out", needed_by=["gamma"])])
    make_wheel(house, "alpha", "1.0", ("beta", "torch>=2"))
    make_wheel(house, "beta", "1.0")
    make_wheel(house, "gamma", "1.0", ("bnb", "beta"))
    make_wheel(house, "torch", "99.0")  # a newer torch on offer must not replace the installed one
    done = offline_install(venv, house)
    assert done.returncode == 0, done.stderr
    assert "torch 2.11.0+cu130 unchanged" in done.stdout
    assert "bnb not installed (41.1 MiB: left out)" in done.stdout
    assert installed(venv, "torch") == "2.11.0+cu130"
    assert installed(venv, "alpha") == installed(venv, "beta") == installed(venv, "gamma") == "1.0"
    record = json.loads((venv / wheelhouse.RECORD).read_text())
    assert record["left_out"] == {"bnb": "41.1 MiB: left out"} and record["torch"] == "2.11.0+cu130"


@pytest.mark.slow
def test_an_install_that_would_need_another_torch_fails_loudly(venv, tmp_path):
    house = tmp_path / "house"
    manifest(house, ["delta"])
    make_wheel(house, "delta", "1.0", ("torch>=50",))
    make_wheel(house, "torch", "99.0")
    done = offline_install(venv, house)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("wheelhouse: error: pip install failed")
    assert installed(venv, "torch") == "2.11.0+cu130" and installed(venv, "delta") is None


def test_an_install_needs_torch_and_the_wheelhouse_python(tmp_path, monkeypatch):
    house = tmp_path / "house"
    manifest(house, [])
    monkeypatch.setattr(wheelhouse, "torch_identity", lambda python: None)
    with pytest.raises(wheelhouse.WheelhouseError, match="no importable torch in .*: a wheelhouse never brings torch"):
        wheelhouse.install(house, None)
    data = json.loads((house / wheelhouse.MANIFEST).read_text())
    (house / wheelhouse.MANIFEST).write_text(json.dumps(dict(data, python="2.7")))
    with pytest.raises(wheelhouse.WheelhouseError, match=r"holds wheels for Python 2.7; this interpreter"):
        wheelhouse.install(house, None)
    with pytest.raises(wheelhouse.WheelhouseError, match="has no MANIFEST.json: not a wheelhouse"):
        wheelhouse.install(tmp_path, None)
