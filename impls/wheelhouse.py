"""A folder of wheels for installing etbench on a machine with no package index, over the CUDA
torch that machine already has: ``make wheelhouse`` builds it, ``make setup WHEELHOUSE=dir``
installs from it.

``python -m impls.wheelhouse build DIR`` (on a machine with the package index) resolves the
project's dependencies, its ``[dev]`` and ``[slurm]`` extras and its build backend (setuptools) for a target
Python and platform (default CPython 3.12, manylinux x86_64), and puts every one of them in DIR
as a wheel -- except torch and what only torch needs (triton, the ``nvidia-*`` and ``cuda-*``
wheels: the target's own CUDA build brings them, and no install from here may replace it).
Packages published only as source (DeepSpeed, fairscale) are built here into pure-Python wheels
(``pip wheel --no-deps``; DeepSpeed's ops are JIT-compiled later, by ``make setup``).  Versions
are those of the environment that builds the folder (the ones the tests ran against) where it
has them.  If the wheels weigh more than the budget (``--max-mib``, 40 MiB: what travels with
the working tree), packages are left out, largest first: first those the target is known to
have installed already (``--preinstalled``), then any other.  ``MANIFEST.json`` (and the same in
words, ``MANIFEST.txt``) lists every wheel, and every package left out with its reason; the
suite refuses the techniques of a left-out package with that reason (:mod:`impls.requires`).

``python -m impls.wheelhouse install DIR`` installs the project (editable) and its dependencies
from DIR into the interpreter that runs it, with no index (``--no-index``; pip's configuration
and ``PIP_*`` variables ignored), pinning the torch that interpreter already has (a constraints
file ``torch==<its version>`` and its triton/nvidia/cuda packages, written at install time): an
install that would need another torch fails instead of replacing it.  Afterwards it checks that
``torch.__version__`` (and the file torch is imported from) did not change, and that every
requirement of the project is met, and fails loudly otherwise.

Only the standard library (and pip) at import: the install side runs before anything else is
installed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:  # packaging, else pip's own copy (present wherever pip is, before anything is installed)
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
except ImportError:  # pragma: no cover - an environment without packaging
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = "MANIFEST.json"
MANIFEST_TXT = "MANIFEST.txt"
#: What :func:`install` leaves in the environment (``sys.prefix``): the packages left out of the
#: wheelhouse and why, read by :mod:`impls.requires` to say so when a technique needs one.
RECORD = "etbench-wheelhouse.json"
MIB = 2**20
DEFAULT_MAX_MIB = 40.0
DEFAULT_PYTHON = "3.12"
#: Never in a wheelhouse: the target's torch build and the CUDA wheels it came with.
NEVER = ("torch", "triton", "pytorch-triton", "nvidia-*", "cuda-*")
#: ...but these, which are not part of a torch build (NVML's Python bindings: impls/measure/energy.py).
NEVER_EXCEPT = ("nvidia-ml-py",)
#: Installed on the target machine already (its image): left out first when over the budget.
DEFAULT_PREINSTALLED = ("numpy", "pandas", "seaborn", "triton", "transformers", "peft")
#: Published as source only: built here into pure-Python wheels.
SOURCE_ONLY = ("deepspeed", "fairscale")
#: The project's build backend: the editable install needs it offline too.
BUILD_REQUIRES = ("setuptools>=68",)


class WheelhouseError(RuntimeError):
    """One line: what failed and why (the command line prints it and exits 1)."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def never(name: str) -> bool:
    name = canonical(name)
    if name in NEVER_EXCEPT:
        return False
    return any(name == p or (p.endswith("*") and name.startswith(p[:-1])) for p in NEVER)


def manylinux_platforms(glibc_minor: int = 28) -> list[str]:
    """The platform tags a manylinux_2_{glibc_minor} x86_64 machine installs, newest first (pip's
    ``--platform`` takes each literally: it does not add the older ones itself)."""
    tags = [f"manylinux_2_{m}_x86_64" for m in range(glibc_minor, 4, -1)]
    return tags + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def target_args(python: str, glibc_minor: int = 28) -> list[str]:
    abi = "cp" + python.replace(".", "")
    args = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp",
            "--abi", abi, "--abi", "abi3", "--abi", "none"]
    for tag in manylinux_platforms(glibc_minor):
        args += ["--platform", tag]
    return args


def marker_env(python: str) -> dict:
    return dict(python_version=python, python_full_version=python + ".0", sys_platform="linux",
                platform_system="Linux", platform_machine="x86_64", os_name="posix",
                implementation_name="cpython", platform_python_implementation="CPython",
                platform_release="", platform_version="", implementation_version=python + ".0")


# --------------------------------------------------------------------------- the dependency graph


def applies(req: Requirement, env: dict, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": e}) for e in (extras or {""}))


def closure(graph: dict[str, dict], roots: list[Requirement], env: dict, stop: set[str]) -> set[str]:
    """Names reachable from ``roots`` through ``graph`` (name -> {"requires": [...]}, from pip's
    report), following the extras each requirement asks for, not entering ``stop`` (nor
    :data:`NEVER`)."""
    seen: dict[str, set[str]] = {}
    todo = [(canonical(r.name), set(r.extras)) for r in roots]
    while todo:
        name, extras = todo.pop()
        if name in stop or never(name) or name not in graph:
            continue
        known = seen.get(name)
        if known is not None and extras <= known:
            continue
        seen[name] = (known or set()) | extras
        for text in graph[name]["requires"]:
            req = Requirement(text)
            if applies(req, env, seen[name]):
                todo.append((canonical(req.name), set(req.extras)))
    return set(seen)


def dependents(graph: dict[str, dict], names: set[str], targets: set[str], env: dict) -> dict[str, set[str]]:
    """For each of ``names``, the ``targets`` it needs, directly or through other packages."""
    out = {}
    for name in names:
        reach = closure(graph, [Requirement(graph[name]["name"])], env, stop=set()) - {name}
        hit = reach & targets
        if hit:
            out[name] = hit
    return out


def choose(graph: dict[str, dict], roots: list[Requirement], env: dict, sizes: dict[str, int],
           preinstalled: set[str], max_bytes: int) -> dict:
    """Which packages go in.  ``core``: what the project needs that the target does not have
    (neither the ``preinstalled`` packages nor what they need, which came with them); if it
    weighs more than ``max_bytes`` its largest packages are left out, one at a time (with them
    what only they need).  Then the needed preinstalled ones, smallest first, while the budget
    lasts (a fallback where the target's version is too old).  Returns ``include`` (names),
    ``expected`` (needed, left out: the target must have them), ``left_out`` (name -> reason: the
    suite refuses what needs them), ``no_deps`` (included name -> the left-out packages it needs:
    installed without resolving its dependencies) and ``total`` (bytes)."""
    pre = closure(graph, [Requirement(graph[p]["name"]) for p in sorted(preinstalled) if p in graph], env, set())
    dropped: dict[str, str] = {}
    while True:
        core = closure(graph, roots, env, stop=pre | set(dropped))
        total = sum(sizes[n] for n in core)
        if total <= max_bytes:
            break
        name = max(core, key=lambda n: (sizes[n], n))
        dropped[name] = (f"{sizes[name] / MIB:.1f} MiB, the largest package the target lacks: left out to keep "
                         f"the wheelhouse within its {max_bytes / MIB:g} MiB budget")
    needed = closure(graph, roots, env, stop=set(dropped))
    include = set(core)
    for name in sorted(needed - core, key=lambda n: (sizes[n], n)):
        if total + sizes[name] <= max_bytes:
            include.add(name)
            total += sizes[name]
    no_deps = dependents(graph, include, set(dropped), env)
    return dict(include=include, expected=needed - include, left_out=dropped, no_deps=no_deps, total=total)


# --------------------------------------------------------------------------- build


def _pip(python: str, *args: str, env: dict | None = None, capture: bool = False) -> subprocess.CompletedProcess:
    cmd = [python, "-m", "pip", *args]
    done = subprocess.run(cmd, env=env, text=True, capture_output=capture)
    if done.returncode:
        tail = (done.stderr or "").strip().splitlines()[-3:] if capture else []
        raise WheelhouseError(f"pip {args[0]} failed (exit {done.returncode})"
                              + (f": {' | '.join(tail)}" if tail else "; see pip's output above"))
    return done


def _environment_pins() -> list[str]:
    """``name==version`` of every package of the running environment (not etbench, not
    :data:`NEVER`): the versions the suite was tested with."""
    from importlib import metadata

    pins = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if not name or never(name) or canonical(name) == "etbench":
            continue
        pins[canonical(name)] = f"{canonical(name)}=={dist.version}"
    return sorted(pins.values())


def _project_requirements(report: dict, project: str = "etbench") -> tuple[list[str], dict]:
    for item in report["install"]:
        if canonical(item["metadata"]["name"]) == project:
            return item["metadata"].get("requires_dist", []), item["metadata"]
    raise WheelhouseError(f"pip's report does not list {project}")


def build(out: Path, python: str = DEFAULT_PYTHON, max_mib: float = DEFAULT_MAX_MIB,
          preinstalled: tuple[str, ...] = DEFAULT_PREINSTALLED, pin: bool = True, project: Path = ROOT,
          glibc_minor: int = 28) -> dict:
    t0 = time.perf_counter()
    out = Path(out)
    work = Path(tempfile.mkdtemp(prefix="wheelhouse-"))
    try:
        built = work / "built"
        pins_file = work / "pins.txt"
        pins = _environment_pins() if pin else []
        pins_file.write_text("\n".join(pins) + "\n")
        pinned = {p.split("==")[0]: p for p in pins}
        # 1. source-only packages -> pure-Python wheels (no torch in pip's build environment, so
        #    DeepSpeed prebuilds no op: they are JIT-compiled against the target's torch)
        sources = []
        for name in SOURCE_ONLY:
            sources.append(pinned.get(name) or _spec_of(project, name))
        print(f"wheelhouse: building pure-Python wheels of {', '.join(sources)}", flush=True)
        _pip(sys.executable, "wheel", "-q", "--no-deps", "-w", str(built), *sources)
        # 2. resolve everything for the target (metadata only), the built wheels as candidates
        report_file = work / "report.json"
        # [slurm]: submitit (pure Python, ~80 kB with cloudpickle) runs `--executor local` and
        # `--workers N`; [ray] (a ~80 MB wheel) does not travel.
        roots = [f"{project}[dev,slurm]", *BUILD_REQUIRES]
        print(f"wheelhouse: resolving {project.name}[dev,slurm] for CPython {python} manylinux x86_64", flush=True)
        _pip(sys.executable, "install", "-q", "--dry-run", "--ignore-installed", "--report", str(report_file),
             "--target", str(work / "target"), "--find-links", str(built), "-c", str(pins_file),
             *target_args(python, glibc_minor), *roots)
        report = json.loads(report_file.read_text())
        graph = {canonical(i["metadata"]["name"]): dict(name=i["metadata"]["name"], version=i["metadata"]["version"],
                                                         requires=i["metadata"].get("requires_dist", []),
                                                         url=i["download_info"]["url"])
                 for i in report["install"]}
        requires, _ = _project_requirements(report)
        env = marker_env(python)
        root_reqs = [Requirement(r) for r in [*requires, *BUILD_REQUIRES]
                     if applies(Requirement(r), env, {"dev", "slurm"})]
        for r in root_reqs:  # evaluated for the target already ('extra == "dev"' would not hold there)
            r.marker = None
        wanted = closure(graph, root_reqs, env, stop=set())
        # 3. download every wanted wheel (sizes decide what travels)
        dl = work / "wheels"
        dl.mkdir()
        local = set()
        for f in built.glob("*.whl"):
            if canonical(f.name.split("-")[0]) in wanted:
                shutil.copy2(f, dl / f.name)
                local.add(canonical(f.name.split("-")[0]))
        fetch = [f"{graph[n]['name']}=={graph[n]['version']}" for n in sorted(wanted - local)]
        print(f"wheelhouse: downloading {len(fetch)} wheels", flush=True)
        _pip(sys.executable, "download", "-q", "--no-deps", "-d", str(dl), *target_args(python, glibc_minor), *fetch)
        files = {}
        for f in dl.glob("*.whl"):
            files[canonical(f.name.split("-")[0])] = f
        missing = wanted - set(files)
        if missing:
            raise WheelhouseError(f"no wheel downloaded for {', '.join(sorted(missing))}")
        sizes = {n: files[n].stat().st_size for n in wanted}
        chosen = choose(graph, root_reqs, env, sizes, {canonical(p) for p in preinstalled}, int(max_mib * MIB))
        # 4. the folder: chosen wheels and the manifest
        if out.exists():
            for old in out.glob("*.whl"):
                old.unlink()
        out.mkdir(parents=True, exist_ok=True)
        wheels = []
        for n in sorted(chosen["include"]):
            shutil.copy2(files[n], out / files[n].name)
            wheels.append(dict(name=graph[n]["name"], version=graph[n]["version"], file=files[n].name,
                               bytes=sizes[n], sha256=hashlib.sha256(files[n].read_bytes()).hexdigest()))
        left_out = [dict(name=graph[n]["name"], version=graph[n]["version"], bytes=sizes[n], reason=why,
                         needed_by=sorted(graph[d]["name"] for d, hit in chosen["no_deps"].items() if n in hit)
                         + (["etbench"] if n in {canonical(r.name) for r in root_reqs} else []))
                    for n, why in sorted(chosen["left_out"].items())]
        pre = sorted(canonical(p) for p in preinstalled if canonical(p) in graph)
        expected = [dict(name=graph[n]["name"], version=graph[n]["version"], bytes=sizes[n],
                         reason="installed on the target already (its image has it)" if n in pre else
                         "installed on the target already, with "
                         + ", ".join(graph[p]["name"] for p in pre
                                     if n in closure(graph, [Requirement(graph[p]["name"])], env, set())))
                    for n in sorted(chosen["expected"])]
        dropped = set(chosen["left_out"])
        # what goes into the environment: not the build backend (the editable install's isolated
        # build environment takes it from the wheelhouse; in the environment, the target's torch
        # may cap it: torch 2.11 requires setuptools<82)
        backend = {canonical(Requirement(r).name) for r in BUILD_REQUIRES}
        requirements = [str(r) for r in root_reqs
                        if canonical(r.name) not in dropped | set(chosen["no_deps"]) | backend]
        # the dependencies of packages installed without resolving theirs, resolved for them
        extra = sorted({canonical(Requirement(t).name) for n in chosen["no_deps"] for t in graph[n]["requires"]
                        if applies(Requirement(t), env, set())} - dropped - set(chosen["no_deps"]))
        requirements += [graph[n]["name"] for n in extra if n in graph and not never(n)]
        manifest = dict(
            python=python, implementation="cp", platforms=manylinux_platforms(glibc_minor),
            budget_mib=max_mib, total_bytes=chosen["total"], built_with=dict(python=sys.version.split()[0],
                                                                             pinned_to_environment=pin),
            never=list(NEVER), preinstalled=sorted(preinstalled), wheels=wheels, left_out=left_out,
            expected_on_target=expected, requirements=requirements,
            no_deps=[f"{graph[n]['name']}=={graph[n]['version']}" for n in sorted(chosen["no_deps"])])
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        (out / MANIFEST_TXT).write_text(describe(manifest))
        print(describe(manifest), end="")
        print(f"wheelhouse: {out} built in {time.perf_counter() - t0:.0f} s")
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _spec_of(project: Path, name: str) -> str:
    """``name``'s requirement in the project's pyproject.toml (e.g. ``deepspeed>=0.14``)."""
    text = (Path(project) / "pyproject.toml").read_text()
    m = re.search(r'"(' + re.escape(name) + r'[^"]*)"', text)
    return m.group(1) if m else name


def describe(manifest: dict) -> str:
    lines = [f"etbench wheelhouse for CPython {manifest['python']} manylinux x86_64: {len(manifest['wheels'])} wheels, "
             f"{manifest['total_bytes'] / MIB:.1f} MiB (budget {manifest['budget_mib']:g} MiB)",
             f"never included: {', '.join(manifest['never'])} (the target's own torch build)"
             + (f", except {', '.join(NEVER_EXCEPT)}" if NEVER_EXCEPT else ""), "", "wheels:"]
    for w in manifest["wheels"]:
        lines.append(f"  {w['bytes'] / MIB:7.2f} MiB  {w['file']}")
    if manifest["left_out"]:
        lines += ["", "left out (the suite refuses what needs them, with this reason):"]
        for w in manifest["left_out"]:
            needed = f"; needed by {', '.join(w['needed_by'])}" if w["needed_by"] else ""
            lines.append(f"  {w['name']} {w['version']}: {w['reason']}{needed}")
    if manifest["expected_on_target"]:
        lines += ["", "expected on the target (left out; the install fails loudly if one is missing there):"]
        for w in manifest["expected_on_target"]:
            lines.append(f"  {w['name']} {w['version']} ({w['bytes'] / MIB:.1f} MiB): {w['reason']}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- install


def _clean_env() -> dict:
    """The environment for pip: no index, no configuration file, none of the caller's ``PIP_*``
    settings (an extra index or find-links there could offer another torch)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def torch_identity(python: str) -> tuple[str, str] | None:
    """(``torch.__version__``, the file it is imported from) in ``python``; None without torch."""
    done = subprocess.run([python, "-c", "import torch; print(torch.__version__); print(torch.__file__)"],
                          capture_output=True, text=True)
    if done.returncode:
        return None
    version, where = done.stdout.strip().splitlines()[-2:]
    return version, where


def torch_constraints() -> list[str]:
    """``name==version`` of the running interpreter's torch and the packages only it needs
    (triton, nvidia-*, cuda-*): what an offline install must leave as they are."""
    from importlib import metadata

    out = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and never(name):
            out[canonical(name)] = f"{canonical(name)}=={dist.version}"
    return sorted(out.values())


def unmet(requirements: list[str]) -> list[str]:
    """The requirements (strings) the running interpreter does not meet: missing or the wrong
    version."""
    from importlib import metadata

    env = marker_env(f"{sys.version_info.major}.{sys.version_info.minor}")
    env["python_full_version"] = sys.version.split()[0]
    bad = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            bad.append(f"{req.name} (not installed)")
            continue
        if req.specifier and not SpecifierSet(str(req.specifier), prereleases=True).contains(version, prereleases=True):
            bad.append(f"{req.name} {version} (needs {req.specifier})")
    return bad


def install(house: Path, project: Path | None = ROOT) -> None:
    """Install ``project`` (editable; None: only its dependencies) and the wheelhouse's
    requirements into this interpreter, with no index, keeping its torch."""
    t0 = time.perf_counter()
    house = Path(house).resolve()
    manifest_path = house / MANIFEST
    if not manifest_path.is_file():
        raise WheelhouseError(f"{house} has no {MANIFEST}: not a wheelhouse (build one with 'make wheelhouse')")
    manifest = json.loads(manifest_path.read_text())
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if here != manifest["python"]:
        raise WheelhouseError(f"{house} holds wheels for Python {manifest['python']}; this interpreter "
                              f"({sys.executable}) is Python {here}")
    python = sys.executable
    before = torch_identity(python)
    if before is None:
        raise WheelhouseError(f"no importable torch in {python}: a wheelhouse never brings torch; create the "
                              f"environment over an interpreter that has it (make setup WHEELHOUSE=... "
                              f"PYTHON=<that python> makes a venv with --system-site-packages)")
    print(f"wheelhouse: installing from {house} with no index; torch {before[0]} ({before[1]}) stays", flush=True)
    env = _clean_env()
    with tempfile.TemporaryDirectory(prefix="etbench-pins-") as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text("\n".join(torch_constraints()) + "\n")
        common = ["--no-index", "--find-links", str(house), "-c", str(constraints)]
        # packages whose dependencies were left out: theirs (minus those) come in the first step
        _pip(python, "install", "-q", *common, *manifest["requirements"], env=env)
        if manifest["no_deps"]:
            _pip(python, "install", "-q", "--no-deps", *common, *manifest["no_deps"], env=env)
        if project:
            _pip(python, "install", "-q", "--no-deps", *common, "-e", str(project), env=env)
    after = torch_identity(python)
    if after != before:
        raise WheelhouseError(f"torch changed during the offline install: {before} -> {after}; the environment "
                              f"is not the target's CUDA torch any more")
    bad = unmet([r for r in manifest["requirements"]])
    if bad:
        raise WheelhouseError(f"after the install, requirements are not met: {'; '.join(bad)}")
    record = dict(wheelhouse=str(house), installed_at=time.strftime("%Y-%m-%dT%H:%M:%S"), torch=before[0],
                  left_out={canonical(w["name"]): w["reason"] for w in manifest["left_out"]})
    Path(sys.prefix, RECORD).write_text(json.dumps(record, indent=1) + "\n")
    for w in manifest["left_out"]:
        print(f"wheelhouse: {w['name']} not installed ({w['reason']}): the suite refuses what needs it")
    print(f"wheelhouse: installed in {time.perf_counter() - t0:.0f} s; torch {after[0]} unchanged")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m impls.wheelhouse", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a wheelhouse (needs the package index)")
    b.add_argument("dir", type=Path)
    b.add_argument("--python", default=DEFAULT_PYTHON, help="target Python X.Y (default %(default)s)")
    b.add_argument("--max-mib", type=float, default=DEFAULT_MAX_MIB, help="budget in MiB (default %(default)s)")
    b.add_argument("--preinstalled", default=",".join(DEFAULT_PREINSTALLED),
                   help="comma-separated packages the target has installed (left out first when over budget)")
    b.add_argument("--no-pin", action="store_true", help="newest versions, not this environment's")
    i = sub.add_parser("install", help="install etbench from a wheelhouse, offline, keeping this interpreter's torch")
    i.add_argument("dir", type=Path)
    i.add_argument("--project", default=str(ROOT), help="the project installed editable (default: this one; '': none)")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            build(args.dir, args.python, args.max_mib, tuple(p for p in args.preinstalled.split(",") if p),
                  pin=not args.no_pin)
        else:
            install(args.dir, Path(args.project) if args.project else None)
    except WheelhouseError as e:
        print(f"wheelhouse: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
