"""etbench sweep: a grid of training runs, or a list of interleaved comparisons, run as jobs --
in this process, on submitit's local executor, on Slurm or on Ray (issue 25).

    etbench sweep SPEC --out DIR [--executor local|slurm|ray --jobs N --retries N ...]

SPEC is a JSON object, one of:

* a recipe grid: ``{"common": {recipe fields}, "grid": {field: [values, ...], ...}, "nproc": 1}``
  -- one run per combination of the grid's values (their product), e.g.
  ``{"common": {"model": "micro", "flops_budget": 3e11}, "grid": {"lr": [1e-3, 3e-3],
  "optimizer": ["adamw", "lion"]}}``;
* comparisons: ``{"compare": ["a.json", "b.json"], "nproc": 1}`` -- one job per ``etbench
  compare`` spec (a comparison interleaves its variants in one process, so it is never split).

DIR is the store, the single source of truth: ``sweep.json`` (the spec: another spec is refused),
``points.csv`` (a row per point: its fields, status, loss or speed-ups, record), ``runs/<key>.json``
(each point's record, written by its job) and ``jobs.json`` (every job attempt, with the reason of
each failure).  A point whose record exists is never run again: rerun the same command to resume
a killed sweep or retry its failed points.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import re
import sys
import time
from pathlib import Path
from typing import Sequence

import pandas as pd

from . import grid
from . import recipe as recipe_lib
from .errors import ConfigError, WriteError
from .files import check_writable_dir, exclusive, write_text

SPEC_KEYS = ("common", "grid", "nproc", "compare")
COLUMNS = ["key", "kind", "fields", "status", "final_val_loss", "steps", "seconds_per_step", "speedups", "record"]


@dataclasses.dataclass(frozen=True)
class Spec:
    kind: str  # "runs" or "compare"
    nproc: int
    points: list  # grid.GridPoint, record paths unset
    fields: dict  # key -> what varies (the grid's fields, or the comparison spec's path)
    raw: dict


def _key(fields: dict) -> str:
    """A filesystem-safe name of a grid point: its varying fields, then a hash of all of them."""
    text = ",".join(f"{k}={v if not isinstance(v, (list, tuple)) else '+'.join(map(str, v)) or 'none'}"
                    for k, v in fields.items())
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_.=+-]+', '_', text)[:80]}__{digest}"


def load_spec(path: str) -> Spec:
    """Read and check SPEC completely (every recipe validated) before any work."""
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read sweep spec {path!r}: {e.strerror or e}") from None
    except ValueError as e:
        raise ConfigError(f"sweep spec {path!r} is not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"a sweep spec is a JSON object with keys {', '.join(SPEC_KEYS)}; got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"unknown sweep spec key {unknown[0]!r}; valid: {', '.join(SPEC_KEYS)}")
    nproc = raw.get("nproc", 1)
    if not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"sweep spec nproc must be an integer >= 1, got {nproc!r}")
    if ("compare" in raw) == ("grid" in raw):
        raise ConfigError("a sweep spec has either 'grid' (a recipe grid) or 'compare' (a list of comparison specs)")
    if "compare" in raw:
        from . import compare

        paths = raw["compare"]
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise ConfigError("sweep spec 'compare' must be a non-empty list of comparison spec paths")
        base = Path(path).parent
        points, fields = [], {}
        for p in paths:
            full = (base / p) if not Path(p).is_absolute() else Path(p)
            compare.load_spec(full)  # every spec checked now
            key = _key({"compare": p})
            points.append(grid.GridPoint(key=key, recipe=recipe_lib.Recipe(), nproc=nproc, record=Path(),
                                         compare_spec=str(full)))
            fields[key] = {"compare": p}
        return Spec("compare", nproc, points, fields, raw)
    common, axes = raw.get("common", {}), raw["grid"]
    if not isinstance(common, dict) or not isinstance(axes, dict) or not axes:
        raise ConfigError("sweep spec 'common' must be an object of recipe fields and 'grid' a non-empty object "
                          "of field: [values]")
    for name, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep spec grid field {name!r} must be a non-empty list of values, got {values!r}")
    points, keyed = [], {}
    for combo in itertools.product(*axes.values()):
        fields = dict(zip(axes, combo))
        try:
            recipe = recipe_lib.Recipe(**{**common, **fields})
        except TypeError as e:
            valid = ", ".join(f.name for f in dataclasses.fields(recipe_lib.Recipe))
            raise ConfigError(f"sweep spec: {e}; valid fields: {valid}") from None
        key = _key(fields)
        points.append(grid.GridPoint(key=key, recipe=recipe, nproc=nproc, record=Path()))
        keyed[key] = fields
    return Spec("runs", nproc, points, keyed, raw)


def _row(kind: str, key: str, fields: dict, status: str, record: dict | None, record_name: str | None) -> dict:
    row = dict(key=key, kind=kind, fields=json.dumps(fields, sort_keys=True, default=str), status=status,
               record=record_name)
    if record is not None and kind == "runs":
        row.update(final_val_loss=record.get("final_val_loss"), steps=record.get("steps"),
                   seconds_per_step=record.get("seconds_per_step"))
    elif record is not None:
        row["speedups"] = json.dumps({v: r["speedup"]["value"] for v, r in record["variants"].items()})
    return row


def run_sweep(spec: Spec, out: Path, executor=None, *, retries: int = 2, threads: int | None = None,
              force: bool = False, progress: bool = True) -> pd.DataFrame:
    """Run every unfinished point of ``spec`` into ``out`` (module docstring); return the table."""
    check_writable_dir(out)
    signature = json.dumps(spec.raw, sort_keys=True)
    stored = out / "sweep.json"
    if stored.exists() and json.loads(stored.read_text()).get("spec") != json.loads(signature):
        raise ConfigError(f"{out} holds another sweep (its sweep.json differs from this spec); give another --out")
    points = [dataclasses.replace(p, record=out / "runs" / f"{p.key}.json") for p in spec.points]
    if spec.kind == "runs":  # every unfinished recipe planned (and refused, in one line) before anything is written
        points = [p if p.record.exists() else
                  dataclasses.replace(p, **dict(zip(("predicted_s", "resources"),
                                                    grid.plan_point(p.recipe, p.nproc, cpus_per_rank=threads,
                                                                    force=force))))
                  for p in points]
    write_text(stored, json.dumps(dict(spec=json.loads(signature)), indent=1))
    rows: dict[str, dict] = {}
    table = out / "points.csv"
    if table.exists():
        rows = {r["key"]: r for r in pd.read_csv(table, dtype=str, keep_default_na=False).to_dict("records")}

    def save() -> None:
        write_text(table, pd.DataFrame(list(rows.values()), columns=COLUMNS).to_csv(index=False))

    fields = spec.fields

    def done(p) -> None:
        rows[p.key] = _row(spec.kind, p.key, fields[p.key], "ok", json.loads(p.record.read_text()),
                           p.record.relative_to(out).as_posix())
        save()

    def failed(p, reasons: list[str]) -> None:
        rows[p.key] = _row(spec.kind, p.key, fields[p.key],
                           f"failed: {reasons[-1]} ({len(reasons)} attempts; see jobs.json)", None, None)
        save()

    todo = []
    for p in points:
        if p.record.exists():
            if rows.get(p.key, {}).get("status") != "ok":
                done(p)  # written by a job of a killed driver
        else:
            todo.append(p)
    if executor is None:
        for p in todo:
            value = grid.run_points(dict(points=[p.payload()], threads=threads, force=force))
            if value["refused"]:
                raise ConfigError(value["refused"][p.key])
            done(p)
    elif todo:
        grid.run(todo, executor, journal=out / "jobs.json", on_done=done, on_failed=failed, retries=retries,
                 threads=threads, force=force, what="sweep", progress=progress)
    return pd.DataFrame([rows[p.key] for p in points if p.key in rows], columns=COLUMNS)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="etbench sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("spec", help="the sweep spec (JSON; see above)")
    p.add_argument("--out", required=True, help="the sweep's directory (resumable)")
    p.add_argument("--force", action="store_true", help="run points predicted over the device's memory")
    grid.add_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        grid.check_arguments(args)
        spec = load_spec(args.spec)
        check_writable_dir(args.out)
        with exclusive(args.out):
            executor = grid.make_executor(args, Path(args.out) / ".jobs")
            try:
                table = run_sweep(spec, Path(args.out), executor, retries=args.retries,
                                  threads=grid.threads_for(args, executor), force=args.force)
            finally:
                if executor is not None:
                    executor.close()
    except ConfigError as e:
        print(f"etbench sweep: error: {e}", file=sys.stderr)
        return 2
    except WriteError as e:
        print(f"etbench sweep: error: {e}", file=sys.stderr)
        return 1
    with pd.option_context("display.width", 160, "display.max_columns", 12, "display.max_colwidth", 60):
        print(table.drop(columns=["kind"]).to_string(index=False))
    print(f"\n{len(table)} points, {time.perf_counter() - t0:.1f} s; results in {args.out}")
    failed = table[table["status"].astype(str).str.startswith("failed")]
    if len(failed):
        print(f"etbench sweep: error: {len(failed)} point(s) failed after their retries ({', '.join(failed['key'])}); "
              f"see {Path(args.out) / 'jobs.json'}; rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
