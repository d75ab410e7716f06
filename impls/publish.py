"""Publish another machine's benchmark records (a GPU run, say) under ``results/published/``, where
they are committed, so the site shows that machine beside the local one.

    python -m impls.publish RUNS_DIR [--plots DIR] --machine NAME [--date YYYY-MM-DD]
                            [--profile PROFILE] [--root results/published] [--force] [--max-mb 5]

``RUNS_DIR`` is a folder of run records as ``make bench`` leaves them (``results/runs/<commit>/``,
``<family>/*.json``: training runs, ``compare-*.json`` interleaved comparisons, ...); ``--plots`` is
the report folder of the same run (``results/plots/<commit>/``; by default that sibling of a
``results/runs/<commit>`` folder when it exists), of which only the peak-probe log ``peak.json``
and the time breakdown ``bench_time.json`` are kept.  Only the JSON records are copied (no
checkpoints, no PNGs), at most ``--max-mb`` (5 MB) in all: a larger set is refused, naming its
largest files.  The folder written, ``<root>/<machine>-<date>/``, holds::

    PROVENANCE.json     machine, date, device name(s) and rank count, torch version, commit(s),
                        profile, the peak probe log, the load seen, the command, every file's hash
    runs/...            the records, at their paths under RUNS_DIR
    plots/peak.json, plots/bench_time.json   (when the plots folder has them)

An existing folder is never replaced unless ``--force``.  The folder is assembled beside its
destination under a hidden name and renamed into place when complete (each file written with
:mod:`impls.files`' atomic writes), under an :func:`impls.files.exclusive` lock: a reader never
sees half a publication.  Bad input (a missing folder, no records, a machine name with ``/`` or
spaces, a malformed date, an unknown profile) is one line and exit status 2, nothing written.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .errors import EXIT_BAD_INPUT, EXIT_FAILED, ConfigError, OneLineParser, WriteError
from .files import check_writable_dir, clean_stale, exclusive, write_bytes, write_text

SCHEMA_VERSION = 1
DEFAULT_ROOT = Path("results/published")
#: The provenance file of a published folder; a folder without it is not a publication.
PROVENANCE_NAME = "PROVENANCE.json"
#: Sub-folders of a published folder: the records (as under the runs dir) and the plots' JSON.
RUNS_SUBDIR = "runs"
PLOTS_SUBDIR = "plots"
#: The files of a ``make bench`` plots folder that are published: the peak-probe log, the time breakdown.
PLOT_FILES = ("peak.json", "bench_time.json")
#: ``make bench``'s profiles where benchmarks/common.py cannot be read (see :func:`profiles`).
PROFILES = ("quick", "full")
DEFAULT_MAX_MB = 5.0
MB = 1_000_000
MACHINE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DATE_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_STAGING = ".staging."


@dataclass
class PublishPlan:
    """What a publication copies, checked completely before anything is written."""

    runs_dir: Path
    plots_dir: Path | None
    destination: Path
    records: list[Path]  # under runs_dir
    plot_files: list[Path]  # under plots_dir
    skipped: list[dict] = field(default_factory=list)  # JSON files under runs_dir that are no record
    other_files: int = 0  # files under runs_dir that are not JSON (checkpoints...): never copied


def folder_name(machine: str, date: str) -> str:
    return f"{machine}-{date}"


def check_machine(machine: str) -> str:
    if not MACHINE_PATTERN.match(machine or "") or ".." in machine:
        raise ConfigError(f"--machine {machine!r} is not a usable folder name: use letters, digits, '.', '_' or '-' "
                          f"(no '/' or spaces; starting with a letter or digit; at most 64), e.g. lab-h100x8")
    return machine


def check_date(date: str | None) -> str:
    if date is None:
        return datetime.date.today().isoformat()
    try:
        if not DATE_PATTERN.match(date):
            raise ValueError
        datetime.date.fromisoformat(date)
    except ValueError:
        raise ConfigError(f"--date {date!r} is not a date: give YYYY-MM-DD, e.g. "
                          f"{datetime.date.today().isoformat()} (the default, today)") from None
    return date


def profiles() -> tuple[str, ...]:
    """The names of ``make bench``'s profiles: the keys of ``PROFILES`` in benchmarks/common.py,
    read without importing it (it imports torch and the training loop); :data:`PROFILES` where
    that file is absent (an installed package)."""
    import ast

    try:
        tree = ast.parse((Path(__file__).resolve().parents[1] / "benchmarks" / "common.py").read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return PROFILES
    names = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            if isinstance(target, ast.Name) and target.id == "PROFILES" and isinstance(node.value, ast.Dict):
                names += [k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
            elif (isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name)
                  and target.value.id == "PROFILES" and isinstance(target.slice, ast.Constant)
                  and isinstance(target.slice.value, str)):
                names.append(target.slice.value)
    return tuple(dict.fromkeys(names)) or PROFILES


def check_profile(profile: str | None) -> str | None:
    valid = profiles()
    if profile is not None and profile not in valid:
        raise ConfigError(f"--profile {profile!r} is not a make bench profile; valid: {', '.join(valid)}")
    return profile


def _hidden(path: Path, root: Path) -> bool:
    """Under a hidden name below ``root`` (atomic writes' temporaries, locks, staging folders)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _json_files(folder: Path) -> tuple[list[Path], int]:
    """The non-hidden ``*.json`` files under ``folder`` (sorted), and how many other files there are."""
    found, others = [], 0
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or _hidden(path, folder):
            continue
        if path.suffix == ".json":
            found.append(path)
        else:
            others += 1
    return found, others


def _size_text(size: int) -> str:
    return f"{size / MB:.2f} MB" if size >= MB // 10 else f"{size / 1000:.1f} kB"


def default_plots_dir(runs_dir: Path) -> Path | None:
    """``results/plots/<commit>`` for a ``results/runs/<commit>`` folder, where it exists."""
    runs_dir = Path(runs_dir)
    if runs_dir.resolve().parent.name == "runs":
        candidate = runs_dir.resolve().parent.parent / "plots" / runs_dir.resolve().name
        if candidate.is_dir():
            return candidate
    return None


def plan(runs_dir: Path, plots_dir: Path | None, machine: str, date: str | None, root: Path, *,
         force: bool = False, max_mb: float = DEFAULT_MAX_MB, plots_given: bool = True) -> PublishPlan:
    """Check every input and list what would be copied (raises ConfigError; nothing is written)."""
    runs_dir, root = Path(runs_dir), Path(root)
    name = folder_name(check_machine(machine), check_date(date))
    if not runs_dir.exists():
        raise ConfigError(f"runs dir {str(runs_dir)!r} does not exist; give a folder of run records, e.g. "
                          f"results/runs/<commit>")
    if not runs_dir.is_dir():
        raise ConfigError(f"runs dir {str(runs_dir)!r} is not a folder; give a folder of run records, e.g. "
                          f"results/runs/<commit>")
    if plots_dir is not None and not Path(plots_dir).is_dir():
        raise ConfigError(f"--plots {str(plots_dir)!r} is not a folder; give the report folder of the run "
                          f"(results/plots/<commit>, holding {' and '.join(PLOT_FILES)}) or leave --plots out")
    plot_files = [Path(plots_dir) / n for n in PLOT_FILES if (Path(plots_dir) / n).is_file()] if plots_dir else []
    if plots_dir is not None and plots_given and not plot_files:
        raise ConfigError(f"--plots {str(plots_dir)!r} holds neither {' nor '.join(PLOT_FILES)}; give the report "
                          f"folder of the run (results/plots/<commit>) or leave --plots out")
    if not max_mb > 0:
        raise ConfigError(f"--max-mb {max_mb!r} must be a positive number of megabytes (default {DEFAULT_MAX_MB:g})")
    destination = root / name
    inside = runs_dir.resolve()
    if destination.resolve() == inside or inside in destination.resolve().parents:
        raise ConfigError(f"--root {str(root)!r} puts the publication inside the runs dir {str(runs_dir)!r}; "
                          f"give another --root (default {DEFAULT_ROOT})")
    candidates, others = _json_files(runs_dir)
    if not candidates:
        raise ConfigError(f"runs dir {str(runs_dir)!r} holds no JSON records (*.json); give the folder "
                          f"make bench wrote, e.g. results/runs/<commit>")
    sizes = {p: p.stat().st_size for p in candidates + plot_files}
    total, cap = sum(sizes.values()), int(max_mb * MB)
    if total > cap:
        largest = sorted(sizes, key=lambda p: -sizes[p])[:3]
        raise ConfigError(
            f"the records total {_size_text(total)}, over the {max_mb:g} MB cap (--max-mb): largest "
            + ", ".join(f"{p} ({_size_text(sizes[p])})" for p in largest)
            + "; publish a smaller runs dir (one commit's) or raise --max-mb")
    records, skipped = classify(runs_dir, candidates)
    if not records:
        raise ConfigError(f"runs dir {str(runs_dir)!r} holds no run records: its {len(candidates)} JSON files are "
                          f"none the report reads (first: {skipped[0]['source']}: {skipped[0]['reason']})")
    if destination.exists() and not force:
        raise ConfigError(f"{str(destination)!r} is published already; give --force to replace it, or another "
                          f"--machine or --date")
    check_writable_dir(root)
    return PublishPlan(runs_dir, Path(plots_dir) if plots_dir else None, destination, records, plot_files, skipped,
                       others)


def classify(runs_dir: Path, candidates: Sequence[Path]) -> tuple[list[Path], list[dict]]:
    """The candidates the report reads as records (training runs, refused runs, comparisons and
    the other kinds it knows), and the others with the reason each is not one."""
    from . import report

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", report.RecordWarning)
        loaded = report.load_all(list(candidates))
    sources = {str(s) for s in loaded.runs["source"]} if "source" in loaded.runs else set()
    for group in (loaded.refused, loaded.interleaved, loaded.extra, loaded.comm, loaded.storage, loaded.atscale):
        sources |= {str(r["source"]) for r in group}
    records = [p for p in candidates if str(p) in sources]
    skipped = [{"source": str(Path(s["source"]).relative_to(runs_dir)) if Path(s["source"]).is_relative_to(runs_dir)
                else s["source"], "reason": s["reason"]} for s in loaded.skipped]
    return records, skipped


def _distinct(values) -> list:
    """The distinct plain values (strings, numbers) among ``values``, sorted."""
    return sorted({v for v in values if isinstance(v, (str, int, float)) and not isinstance(v, bool)}, key=str)


def summarize(documents: dict[str, dict]) -> dict:
    """What a set of records (name -> parsed JSON) says about the machine that wrote them: device
    names (with how many records name each), the widest run's rank count, package versions,
    commits and the load seen.  The publication's provenance and the site's local column use it."""
    devices: dict[tuple, int] = {}
    world_sizes, versions, commits, dirty, noisy, loads = [], {}, [], [], [], []
    for name, doc in documents.items():
        if not isinstance(doc, dict):
            continue
        device = doc.get("device") if isinstance(doc.get("device"), dict) else {}
        if device:
            key = (device.get("type"), device.get("name"))
            devices[key] = devices.get(key, 0) + 1
        if isinstance(doc.get("world_size"), int):
            world_sizes.append(doc["world_size"])
        for package, version in (doc.get("versions") if isinstance(doc.get("versions"), dict) else {}).items():
            versions.setdefault(package, set()).add(version)
        commits.append(doc.get("git_commit"))
        dirty.append(doc.get("git_dirty"))
        load = doc.get("load")
        if isinstance(load, dict):
            loads.append(load)
            if load.get("noisy"):
                noisy.append(name)
    load1 = [v for load in loads for v in (load.get("load1_start"), load.get("load1_end"))
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {
        "devices": [{"type": t, "name": n, "records": c} for (t, n), c in sorted(devices.items(), key=str)],
        # Ranks of the widest run: one device per rank on GPUs.
        "device_count": max(world_sizes, default=None),
        "torch": _distinct(versions.get("torch", ())),
        "versions": {k: _distinct(v) for k, v in sorted(versions.items())},
        "commits": _distinct(commits),
        "git_dirty": any(d is True for d in dirty),
        "load": {"records_with_load": len(loads), "noisy": len(noisy), "noisy_records": sorted(noisy),
                 "load1_max": max(load1, default=None),
                 "cores_in_use": _distinct(load.get("cores_in_use") for load in loads)},
    }


def read_json(path: Path):
    """A JSON file's value, or None where it cannot be read as JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def provenance(p: PublishPlan, machine: str, date: str, profile: str | None, command: str) -> dict:
    """What the records say about the machine and the run, and where they came from."""
    documents = {path.relative_to(p.runs_dir).as_posix(): read_json(path) for path in p.records}
    plots = {path.name: read_json(path) for path in p.plot_files}
    bench_time = plots.get("bench_time.json") if isinstance(plots.get("bench_time.json"), dict) else {}
    files = [{"path": f"{RUNS_SUBDIR}/{path.relative_to(p.runs_dir).as_posix()}", "bytes": path.stat().st_size,
              "sha256": hashlib.sha256(path.read_bytes()).hexdigest()} for path in p.records]
    files += [{"path": f"{PLOTS_SUBDIR}/{path.name}", "bytes": path.stat().st_size,
               "sha256": hashlib.sha256(path.read_bytes()).hexdigest()} for path in p.plot_files]
    summary = summarize(documents)
    return {
        "schema": SCHEMA_VERSION,
        "machine": machine,
        "date": date,
        "published_at": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        **{k: summary[k] for k in ("devices", "device_count", "torch", "versions", "commits", "git_dirty")},
        "profile": profile,
        "peak": plots.get("peak.json"),
        "bench_seconds": bench_time.get("total_seconds"),
        "load": summary["load"],
        "command": command,
        "source": {"runs": str(p.runs_dir), "plots": str(p.plots_dir) if p.plots_dir else None},
        "records": len(p.records),
        "skipped": p.skipped,
        "not_copied_other_files": p.other_files,
        "files": files,
    }


def write(p: PublishPlan, prov: dict, *, force: bool = False) -> Path:
    """Assemble the folder under a hidden name beside its destination and rename it into place
    (replacing the old one only with ``force``), under an exclusive lock on the destination."""
    destination = p.destination
    root = destination.parent
    with exclusive(destination):
        for stale in root.glob(f".{destination.name}{_STAGING}*") if root.is_dir() else ():
            pid = stale.name.rsplit(".", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        if destination.exists() and not force:  # published meanwhile
            raise ConfigError(f"{str(destination)!r} is published already; give --force to replace it, or another "
                              f"--machine or --date")
        staging = root / f".{destination.name}{_STAGING}{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            for path in p.records:
                write_bytes(staging / RUNS_SUBDIR / path.relative_to(p.runs_dir), path.read_bytes())
            for path in p.plot_files:
                write_bytes(staging / PLOTS_SUBDIR / path.name, path.read_bytes())
            write_text(staging / PROVENANCE_NAME, json.dumps(prov, indent=1) + "\n")
            clean_stale(destination)
            old = None
            if destination.exists():
                old = root / f".{destination.name}.old.{os.getpid()}"
                os.replace(destination, old)
            try:
                os.replace(staging, destination)
            except OSError:
                if old is not None:
                    os.replace(old, destination)
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(e, WriteError):
                raise
            raise WriteError(destination, e) from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return destination


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _max_mb(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of megabytes") from None


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m impls.publish", description=__doc__.split("\n\n")[0])
    p.add_argument("runs_dir", type=Path, help="folder of run records, e.g. results/runs/<commit>")
    p.add_argument("--plots", type=Path, help="the run's report folder (results/plots/<commit>): its "
                   f"{' and '.join(PLOT_FILES)} are published (default: that sibling of results/runs/<commit>)")
    p.add_argument("--machine", required=True, help="a name for the machine, e.g. lab-h100x8 (letters, digits, . _ -)")
    p.add_argument("--date", help="YYYY-MM-DD of the run (default: today)")
    p.add_argument("--profile", help=f"the make bench profile of the run: {', '.join(profiles())} (default: "
                   "$ETBENCH_PROFILE, else not stated)")
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"where publications live (default: {DEFAULT_ROOT})")
    p.add_argument("--force", action="store_true", help="replace an existing publication of this machine and date")
    p.add_argument("--max-mb", type=_max_mb, default=DEFAULT_MAX_MB,
                   help=f"refuse records totalling more than this many MB (default: {DEFAULT_MAX_MB:g})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    try:
        profile = check_profile(args.profile if args.profile is not None else os.environ.get("ETBENCH_PROFILE"))
        check_machine(args.machine)
        date = check_date(args.date)
        plots_dir = args.plots if args.plots is not None else default_plots_dir(args.runs_dir)
        p = plan(args.runs_dir, plots_dir, args.machine, date, args.root, force=args.force,
                 max_mb=args.max_mb, plots_given=args.plots is not None)
        prov = provenance(p, args.machine, date, profile, "python -m impls.publish " + shlex.join(argv))
        destination = write(p, prov, force=args.force)
    except ConfigError as e:
        print(f"publish: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except WriteError as e:
        print(f"publish: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    size = sum(f["bytes"] for f in prov["files"])
    devices = ", ".join(f"{d['type']}: {d['name']}" for d in prov["devices"]) or "device not recorded"
    print(f"published {prov['records']} records" + (f" and {len(p.plot_files)} plot files" if p.plot_files else "")
          + f" ({_size_text(size)}) from {p.runs_dir} to {destination} ({devices}; up to {prov['device_count']} "
          f"ranks; commit {', '.join(c[:12] for c in prov['commits']) or 'not recorded'})")
    if p.skipped:
        print(f"not published: {len(p.skipped)} JSON files that are no record ("
              + "; ".join(f"{s['source']}: {s['reason']}" for s in p.skipped[:3]) + (" ..." if len(p.skipped) > 3 else "")
              + ")")
    if prov["load"]["noisy"]:
        print(f"note: {prov['load']['noisy']} of {prov['load']['records_with_load']} records were measured under load "
              f"(noisy); the site flags them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
