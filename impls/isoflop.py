"""IsoFLOP sweeps: compute-optimal model size per FLOP budget, per technique variant.

Chinchilla (Hoffmann et al. 2022) *Approach 2*: train a range of model sizes N to the same
counted-FLOP budget C; for each budget fit a parabola of final loss against log N, whose minimum
is that budget's compute-optimal size N*(C); then N* ∝ C^a (they report a ≈ 0.49).  The
Mixture-of-Depths paper (Raposo et al. 2024) draws these isoFLOP curves per variant (its
Figures 3/4), compares the seconds per step of each variant's isoFLOP-optimal model with the
baseline's ("steps up to 66% faster"), and shows per-layer routing decisions (Figure 5, see
:func:`plot_routing`).

    python -m impls.isoflop --budgets 1e10,3e10,1e11 --variants baseline,mod \\
        --sizes L2-D32,L2-D64,L3-D96 --out results/isoflop/NAME

:func:`sweep` is resumable: every finished point is appended to ``OUT/points.csv`` (atomically,
after its JSON record is in ``OUT/runs/``), so a re-run - or a run after a kill - trains only the
points still missing.  ``OUT/sweep.json`` pins the base recipe; a directory holding a sweep of a
different base recipe is refused instead of mixing incomparable losses.  Every point's recipe is
validated before anything is written, so a folder never records a base recipe that did not
validate (and one whose sweep failed before its first finished point takes a corrected rerun).
A point whose run diverged is recorded with that status and left out of the fits.

Sizes: ``L<n_layer>-D<d_model>[-H<n_head>]`` over the ``nano`` config (heads default to
``d_model // 32``, at least 1: head_dim 32), or a zoo name (``nano``, ``micro``, ...).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import NullFormatter

from . import grid
from . import recipe as recipe_lib
from . import train, zoo
from .errors import ConfigError, WriteError
from .files import check_writable_dir, clean_stale_in, exclusive, write_text
from .figures import new_figure, save_figure

#: Variant name -> technique specs (``etbench run --technique`` syntax).
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "mod": ["mod"],  # Mixture-of-Depths (Raposo et al. 2024): 12.5% capacity, every other block
    "mod-random": ["mod:router=random"],  # the paper's random top-k baseline
    "moe": ["moe"],  # Switch-style top-1 over 4 experts every other block (Fedus et al. 2022)
    "mode-staged": ["mode:kind=staged"],
    "mode-integrated": ["mode:kind=integrated"],
    "local16": ["attention:kind=local,window=16"],
    "checkpoint": ["checkpoint:every=1"],
}

#: Default CPU grid (explicit sizes; the CLI default is --sizes auto): ~10K to ~830K parameters with the synthetic data's 64-token vocabulary (9K-840K
#: with 256).  At 1e10-1e11 FLOPs on synthetic data the optima sit at the small end (~1e4).
DEFAULT_SIZES = ("L2-D16", "L2-D32", "L2-D48", "L2-D64", "L3-D96", "L4-D128")  # >= 2 layers: MoD routes one

SIZE_GRAMMAR = ("L<n_layer>-D<d_model>[-H<n_head>] (e.g. L2-D64; heads default to d_model//32, "
                f"over the nano config) or a zoo name ({', '.join(zoo.CONFIGS)})")
_SIZE_RE = re.compile(r"^L(\d+)-D(\d+)(?:-H(\d+))?$")
HEAD_DIM = 32

#: Recipe fields a size or variant sets per point; the base recipe may not set them.
_POINT_FIELDS = ("model", "model_args", "techniques", "flops_budget", "steps")
#: Recipe fields of the base recipe, shared by every point: the sweep's command line sets them.
BASE_FIELDS = tuple(f.name for f in dataclasses.fields(recipe_lib.Recipe) if f.name not in _POINT_FIELDS)
#: The sweep command line's own defaults (the other base fields default as in the Recipe).
SWEEP_DEFAULTS = dict(seq_len=64, batch_size=8, lr=3e-3)
SKIPPED = "skipped: budget < one step"
POINT_COLUMNS = ["variant", "budget", "size", "params", "matmul_params", "n_layer", "d_model", "n_head",
                 "steps", "tokens", "final_val_loss", "seconds_per_step", "flops_per_step", "status",
                 "record", "dataset_hash", "recipe_hash"]


# --------------------------------------------------------------------------- sizes and variants


@dataclass(frozen=True)
class Size:
    name: str
    model: str
    model_args: dict

    def config(self):
        return zoo.config(self.model, **self.model_args)


def parse_size(spec: str) -> Size:
    """``L2-D64`` / ``L2-D64-H4`` / a zoo name -> :class:`Size`; anything else is a one-line ConfigError."""
    spec = spec.strip()
    if spec in zoo.CONFIGS:
        return Size(spec, spec, {})
    m = _SIZE_RE.match(spec)
    if not m:
        raise ConfigError(f"bad size spec {spec!r}; expected {SIZE_GRAMMAR}")
    n_layer, d_model = int(m[1]), int(m[2])
    n_head = int(m[3]) if m[3] else max(1, d_model // HEAD_DIM)
    if n_layer < 1 or d_model < 1 or n_head < 1:
        raise ConfigError(f"bad size spec {spec!r}: layers, width and heads must be >= 1")
    if d_model % n_head:
        raise ConfigError(f"bad size spec {spec!r}: d_model {d_model} is not divisible by {n_head} heads")
    return Size(spec, "nano", dict(n_layer=n_layer, d_model=d_model, n_head=n_head))


#: Sizes the budget-driven grid picks from, in increasing parameter count (>= 2 layers, so MoD,
#: MoE and MoDE have a routed block in every size).
LADDER = ("L2-D4", "L2-D8", "L2-D16", "L2-D24", "L2-D32", "L2-D48", "L2-D64", "L3-D64", "L4-D64", "L4-D96", "L4-D128",
          "L6-D128", "L6-D192", "L8-D256", "L12-D384", "L12-D512", "L16-D768")


def chinchilla_params(budget: float) -> float:
    """Compute-optimal N for C FLOPs by Hoffmann et al. (2022): C ≈ 6·N·D with D ≈ 20·N tokens,
    so N ≈ √(C/120) — the starting guess of a budget's grid, not a claim about this data."""
    return math.sqrt(budget / 120)


def size_params(size: str, vocab_size: int) -> int:
    spec = parse_size(size)
    return zoo.build(spec.model, device="meta", **spec.model_args, vocab_size=vocab_size).num_params()


def grid_for_budget(budget: float, vocab_size: int, n_sizes: int = 5, ladder: Sequence[str] = LADDER) -> list[str]:
    """``n_sizes`` consecutive ladder sizes whose middle (in ln N, halfway between the ends) is
    nearest :func:`chinchilla_params`."""
    if not 3 <= n_sizes <= len(ladder):
        raise ConfigError(f"a budget's grid needs 3 to {len(ladder)} sizes, got {n_sizes}")
    logs = np.log([size_params(s, vocab_size) for s in ladder])
    middles = (logs[:len(ladder) - n_sizes + 1] + logs[n_sizes - 1:]) / 2
    first = int(np.abs(middles - math.log(chinchilla_params(budget))).argmin())
    return list(ladder[first:first + n_sizes])


def widen(points: pd.DataFrame, grids: Mapping[tuple[float, str], list[str]],
          ladder: Sequence[str] = LADDER) -> dict[tuple[float, str], list[str]]:
    """Each (budget, variant)'s grid, extended by the next ladder size on a side where that
    variant's lowest measured loss sits at the grid's edge (its parabola cannot have an interior
    minimum there); grids with an interior minimum, or at the ladder's end, stay as they are.
    Per variant: a variant whose optimum lies lower (MoE's experts add parameters) costs points
    of its own only."""
    out = {}
    for (budget, variant), sizes in grids.items():
        order = sorted(sizes, key=ladder.index)
        lo, hi = ladder.index(order[0]), ladder.index(order[-1])
        done = points[(points["budget"] == budget) & (points["variant"] == variant) & (points["status"] == "ok")]
        extra = []
        if len(done):
            best = done.loc[done["final_val_loss"].idxmin(), "size"]
            if best == order[0] and lo > 0:
                extra.append(ladder[lo - 1])
            if best == order[-1] and hi + 1 < len(ladder):
                extra.append(ladder[hi + 1])
        out[budget, variant] = sorted(set(order) | set(extra), key=ladder.index)
    return out


def adaptive_sweep(out_dir: str | os.PathLike, budgets: Sequence[float], variants, *, n_sizes: int = 5,
                   max_widenings: int = 3, ladder: Sequence[str] = LADDER, progress: bool = True,
                   runner: Callable[[train.Recipe], dict] | None = None, workers: int = 1, executor=None,
                   retries: int = 2, threads: int | None = None, force: bool = False,
                   **base) -> tuple[pd.DataFrame, dict[tuple[float, str], list[str]]]:
    """A sweep whose sizes follow the budget: every variant starts from :func:`grid_for_budget`
    and is widened on its own (:func:`widen`) until its minimum is inside its sizes, or
    ``max_widenings`` rounds have passed (the fits then say "optimum outside sampled sizes").
    Each round trains its new points together (``workers`` or ``executor``: see :func:`sweep`).  Resumable like :func:`sweep`:
    finished points are never retrained.  Returns the points of the final grids and the grids,
    keyed (budget, variant)."""
    from . import data as data_lib

    names = resolve_variants(variants)
    _refuse_repeats("FLOP budget", [_budget_label(float(b)) for b in budgets])
    vocab = data_lib.load(base.get("data", train.Recipe.data)).vocab_size
    start = {b: grid_for_budget(b, vocab, n_sizes, ladder) for b in budgets}
    grids = {(b, v): list(start[b]) for b in budgets for v in names}
    for attempt in range(max_widenings + 1):
        planned = [p for (b, v), sizes in grids.items() for p in plan_points([b], {v: names[v]}, sizes, base)]
        points = sweep(out_dir, budgets, names, planned=planned, runner=runner, progress=progress, workers=workers,
                       executor=executor, retries=retries, threads=threads, force=force, **base)
        wider = widen(points, grids, ladder)
        if wider == grids or attempt == max_widenings:
            return points, grids
        grids = wider
    raise AssertionError("unreachable")


def resolve_variants(variants: Sequence[str] | Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Variant names (looked up in :data:`VARIANTS`) or an explicit name -> techniques dict."""
    if isinstance(variants, Mapping):
        out = {str(k): list(v) for k, v in variants.items()}
    else:
        variants = list(variants)
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise ConfigError(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
        _refuse_repeats("variant", variants)
        out = {v: list(VARIANTS[v]) for v in variants}
    if not out:
        raise ConfigError(f"no variants given; known: {', '.join(VARIANTS)}")
    return out


def _refuse_repeats(what: str, items: Sequence) -> None:
    """A name or number given twice would be trained (and fitted) once, silently: refused."""
    seen = set()
    for item in items:
        if item in seen:
            raise ConfigError(f"{what} {item!r} is given twice in {', '.join(map(str, items))}; give each {what} once")
        seen.add(item)


def _warn(message: str) -> None:
    print(f"etbench: warning: {message}", file=sys.stderr)


def _recipe_hash(recipe: train.Recipe) -> str:
    text = json.dumps(dataclasses.asdict(recipe), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _budget_label(budget: float) -> str:
    return f"{budget:.3g}".replace("+", "")


@dataclass(frozen=True)
class Point:
    variant: str
    budget: float
    size: Size
    recipe: train.Recipe

    @property
    def recipe_hash(self) -> str:
        return _recipe_hash(self.recipe)

    @property
    def key(self) -> tuple:
        return (self.variant, _budget_label(self.budget), self.size.name, self.recipe_hash)

    @property
    def record_name(self) -> str:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.variant}__{_budget_label(self.budget)}__{self.size.name}")
        return f"runs/{safe}__{self.recipe_hash}.json"


# --------------------------------------------------------------------------- the sweep


def plan_points(budgets: Sequence[float], variants, sizes: Sequence[str], base: dict) -> list[Point]:
    """Every (budget, size, variant) point, smallest budget first; all inputs are checked here,
    before any training (unknown variant or technique, bad size, bad recipe field)."""
    budgets = [float(b) for b in budgets]
    if not budgets:
        raise ConfigError("no FLOP budgets given; e.g. --budgets 1e10,3e10,1e11")
    bad = [b for b in budgets if not (b > 0 and math.isfinite(b))]
    if bad:
        raise ConfigError(f"FLOP budgets must be finite and > 0, got {bad[0]}")
    _refuse_repeats("FLOP budget", [_budget_label(b) for b in budgets])
    if not sizes:
        raise ConfigError(f"no sizes given; expected {SIZE_GRAMMAR}")
    _refuse_repeats("size", list(sizes))
    variants = resolve_variants(variants)
    parsed = [parse_size(s) for s in sizes]
    fixed = sorted(set(base) & set(_POINT_FIELDS))
    if fixed:
        raise ConfigError(f"base recipe may not set {', '.join(fixed)}: sizes, variants and budgets set them")
    recipe_fields = {f.name for f in dataclasses.fields(train.Recipe)}
    unknown = sorted(set(base) - recipe_fields)
    if unknown:
        raise ConfigError(f"unknown recipe field(s) {', '.join(unknown)}; valid: "
                          f"{', '.join(sorted(recipe_fields - set(_POINT_FIELDS)))}")
    points = []
    for size in parsed:
        for name, techs in variants.items():
            # Field-level validation (model shape, techniques, optimizer...) with a 1-step recipe.
            probe = train.Recipe(**base, model=size.model, model_args=dict(size.model_args),
                                 techniques=list(techs), steps=1)
            train.check_recipe_fields(probe)
            if probe.seq_len > size.config().block_size:
                raise ConfigError(f"seq_len {probe.seq_len} exceeds size {size.name!r} block_size "
                                  f"{size.config().block_size}")
    for budget in sorted(budgets):
        for size in parsed:
            for name, techs in variants.items():
                recipe = train.Recipe(**base, model=size.model, model_args=dict(size.model_args),
                                      techniques=list(techs), flops_budget=budget)
                points.append(Point(name, budget, size, recipe))
    return points


def _base_signature(base: dict, dataset_hash: str) -> dict:
    """What every point of a sweep directory shares: the full base recipe and the data's hash."""
    defaults = dataclasses.asdict(train.Recipe())
    for f in _POINT_FIELDS:
        defaults.pop(f, None)
    return dict(base_recipe={**defaults, **base}, dataset_hash=dataset_hash)


def _holds_results(out_dir: Path) -> bool:
    """Whether a sweep folder holds a finished point (a record in runs/ or an ok row)."""
    if any((out_dir / "runs").glob("*.json")):
        return True
    try:
        return bool((_read_points(out_dir)["status"].astype(str) == "ok").any())
    except ConfigError:
        return True


def _check_directory(out_dir: Path, signature: dict) -> None:
    meta = out_dir / "sweep.json"
    if meta.exists():
        try:
            old = json.loads(meta.read_text())
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            if _holds_results(out_dir):
                raise ConfigError(f"{meta} is corrupt ({type(e).__name__}); cannot tell which base recipe "
                                  f"{out_dir} holds: use another --out directory") from None
            old = None
        if old is not None and old != signature and not _holds_results(out_dir):
            old = None  # nothing finished under that base recipe (it failed first): start afresh
            (out_dir / "points.csv").unlink(missing_ok=True)
        if old is None:
            write_text(meta, json.dumps(signature, indent=1, sort_keys=True))
        elif old != signature:
            old_base, new_base = old.get("base_recipe", {}), signature["base_recipe"]
            diff = sorted(k for k in set(old_base) | set(new_base) if old_base.get(k) != new_base.get(k))
            if old.get("dataset_hash") != signature["dataset_hash"]:
                diff.append("dataset_hash")
            shown = ", ".join(f"{k}: {old_base.get(k, old.get(k))!r} -> {new_base.get(k, signature.get(k))!r}"
                              for k in diff)
            raise ConfigError(f"{out_dir} holds a sweep of a different base recipe ({shown}); "
                              f"use another --out directory")
    else:
        write_text(meta, json.dumps(signature, indent=1, sort_keys=True))


def _read_points(out_dir: Path, warn: bool = False) -> pd.DataFrame:
    """The rows of ``points.csv``.  This module writes the file whole (atomically, ending in a
    newline), so a last line without one is a torn write (a kill mid-write by an older version, a
    copy cut short): it is dropped -- with a warning when ``warn`` -- and its point is taken again
    from its record in ``runs/`` or trained again, instead of being kept beside the rebuilt row."""
    import io

    path = out_dir / "points.csv"
    if not path.exists():
        return pd.DataFrame(columns=POINT_COLUMNS)
    try:
        text = path_text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is corrupt ({type(e).__name__}); delete it to rebuild it (finished points' "
                          f"records in {out_dir / 'runs'} are reused)") from None
    if text and not text.endswith("\n"):
        kept, _, torn = text.rpartition("\n")
        if warn:
            _warn(f"{path}: dropping its torn last line {torn[:60]!r} (no newline: an interrupted write); that "
                  f"point is read again from its record in {out_dir / 'runs'} or trained again")
        text = kept + "\n" if kept else ""
        if "\n" not in text.strip("\n"):  # the header alone (or nothing) is left: no points
            frame = pd.DataFrame(columns=POINT_COLUMNS)
            frame.attrs["torn"] = True
            return frame
    try:
        frame = pd.read_csv(io.StringIO(text), dtype={"recipe_hash": str, "dataset_hash": str})
    except Exception as e:  # pandas raises many types for a damaged file
        raise ConfigError(f"{path} is corrupt ({type(e).__name__}); delete it to rebuild it (finished points' "
                          f"records in {out_dir / 'runs'} are reused)") from None
    missing = [c for c in ("variant", "budget", "size", "recipe_hash", "status") if c not in frame]
    if missing:
        raise ConfigError(f"{path} is corrupt (no column {', '.join(missing)}); delete it to rebuild it "
                          f"(finished points' records in {out_dir / 'runs'} are reused)")
    frame.attrs["torn"] = text != path_text
    return frame


def read_point_record(path: Path) -> dict:
    """A point's run record; a missing or damaged one is a one-line ConfigError naming it."""
    if not Path(path).exists():
        raise ConfigError(f"record {path} is missing (deleted?); rerun the sweep to train that point again")
    try:
        record = json.loads(Path(path).read_text())
        if not isinstance(record, dict) or not isinstance(record.get("curve"), list):
            raise ValueError("not a run record")
        for key in ("params", "matmul_params", "steps", "tokens_per_step", "seconds_per_step", "flops_per_step"):
            record[key]
        record["dataset"]["hash"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"record {path} is corrupt ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          f"delete it to train that point again") from None
    return record


def _write_points(out_dir: Path, rows: list[dict]) -> None:
    frame = pd.DataFrame(rows, columns=POINT_COLUMNS)
    write_text(out_dir / "points.csv", frame.to_csv(index=False))


def _row_key(row: Mapping) -> tuple:
    return (str(row["variant"]), _budget_label(float(row["budget"])), str(row["size"]), str(row["recipe_hash"]))


def _row(point: Point, status: str, dataset, record: dict | None = None,
         record_path: str | None = None) -> dict:
    dataset_hash = dataset.content_hash
    cfg = point.size.config()
    row = dict(variant=point.variant, budget=point.budget, size=point.size.name, n_layer=cfg.n_layer,
               d_model=cfg.d_model, n_head=cfg.n_head, status=status, dataset_hash=dataset_hash,
               recipe_hash=point.recipe_hash, record=record_path)
    if record is not None:
        row.update(status=record.get("status", "ok"))
        row.update(params=record["params"], matmul_params=record["matmul_params"], steps=record["steps"],
                   tokens=record["steps"] * record["tokens_per_step"], final_val_loss=record["final_val_loss"],
                   seconds_per_step=record["seconds_per_step"], flops_per_step=record["flops_per_step"],
                   dataset_hash=record["dataset"]["hash"])
    else:  # skipped: the size is still known, from the meta model (vocabulary from the data)
        meta = zoo.build(point.recipe.model, device="meta", **train.model_overrides(point.recipe, dataset))
        row.update(params=meta.num_params(), matmul_params=meta.num_params(matmul_only=True), steps=0, tokens=0)
    return row


def subprocess_runner(recipe: train.Recipe) -> dict:
    """Train ``recipe`` in a fresh ``python -m impls.cli run`` process and return its record:
    memory is returned to the system after every point, and a crash is confined to one point."""
    import subprocess
    import tempfile

    args = [sys.executable, "-m", "impls.cli", "run", *recipe_lib.to_argv(recipe)]
    with tempfile.TemporaryDirectory(prefix="etbench-isoflop-") as tmp:
        out = Path(tmp) / "record.json"
        done = subprocess.run([*args, "--out", str(out), "--allow-divergence"], capture_output=True, text=True)
        if done.returncode == 2:  # bad input (e.g. budget < one step): the child's one-line error
            raise ConfigError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "config error")
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"training subprocess failed (status {done.returncode}):\n{done.stderr[-4000:]}")
        return read_point_record(out)


def _train_point(runner: Callable[[train.Recipe], dict], recipe: train.Recipe) -> dict | None:
    """The point's record, or None when its budget buys less than one step (counted FLOPs)."""
    try:
        return runner(recipe)
    except ConfigError as e:
        if "smaller than one step" not in str(e):
            raise
        return None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _train_as_jobs(points: list, executor, out_dir: Path, finish: Callable, *, retries: int, threads: int | None,
                   force: bool, progress: bool) -> None:
    """Train ``points`` as jobs of ``executor`` (:func:`impls.grid.run`), finishing each point as
    its job writes its record (points.csv is rewritten after every one, so a killed sweep resumes);
    a point whose every attempt failed gets a ``failed: ...`` row.

    Small models cannot use several cores: one thread runs a step of the sweep's smallest sizes
    about as fast as two (kernel launch and autograd overhead dominate), so jobs side by side on
    ``cores // jobs`` threads each finish a CPU sweep ~1.8x sooner on two cores.  Their per-point
    step times are measured under each other's load: the records' load flag says so, and the
    isoFLOP-optimal models' step-time ratios come from an interleaved comparison, not from these."""
    from . import grid

    by_key = {}
    grid_points = []
    for point in points:
        seconds, resources = grid.plan_point(point.recipe, 1, cpus_per_rank=threads, force=force)
        key = Path(point.record_name).stem
        by_key[key] = point
        grid_points.append(grid.GridPoint(key=key, recipe=point.recipe, nproc=1, record=out_dir / point.record_name,
                                          predicted_s=seconds, resources=resources))

    def done(gp) -> None:
        finish(by_key[gp.key], read_point_record(gp.record), trained=False)

    def failed(gp, reasons: list[str]) -> None:
        if "smaller than one step" in reasons[-1]:  # counted FLOPs above the analytic check: as in-process
            finish(by_key[gp.key], None, trained=False)
            return
        finish(by_key[gp.key], None, trained=False,
               status=f"failed: {reasons[-1]} ({len(reasons)} attempts; see jobs.json)")

    grid.run(grid_points, executor, journal=out_dir / "jobs.json", on_done=done, on_failed=failed, retries=retries,
             threads=threads, force=force, what="isoflop", progress=progress)


def _fits_one_step(recipe: train.Recipe, dataset) -> bool:
    """Whether the budget buys at least one step (analytic model FLOPs, as train.validate checks;
    a run whose counted FLOPs exceed the budget is caught from train.run as well)."""
    from .measure import model_flops_per_step

    _, plan = train.check_recipe_fields(recipe)
    meta = zoo.build(recipe.model, device="meta", **train.model_overrides(recipe, dataset))
    return recipe.flops_budget >= model_flops_per_step(meta, recipe.batch_size * plan.accum_steps, recipe.seq_len)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="run", disable=not (enabled and sys.stderr.isatty()), leave=False)


def sweep(out_dir: str | os.PathLike, budgets: Sequence[float],
          variants: Sequence[str] | Mapping[str, Sequence[str]], sizes: Sequence[str] = DEFAULT_SIZES, *,
          runner: Callable[[train.Recipe], dict] | None = None, progress: bool = True, workers: int = 1,
          executor=None, retries: int = 2, threads: int | None = None, force: bool = False,
          planned: Sequence["Point"] | None = None, **base) -> pd.DataFrame:
    """Train every (variant, budget, size) point to its FLOP budget; return the tidy points table.

    ``base`` holds the other :class:`~impls.train.Recipe` fields (data, lr, batch_size, seq_len,
    ...).  ``runner`` trains one recipe and returns its record (default :func:`impls.train.run`,
    in-process).  ``executor`` (:mod:`impls.executors`) runs the points as jobs instead
    (:func:`impls.grid.run`: a job writes its point's record, retried ``retries`` times, each
    attempt in ``<out_dir>/jobs.json``; ``threads``: torch's threads per job); ``workers`` > 1
    is submitit's local executor with that many jobs at once, on cores // workers threads each.
    Finished points (by variant, budget, size and the full recipe's hash) are kept and not
    retrained; a budget smaller than one step of a size is recorded as ``skipped``; a point
    whose attempts all failed as ``failed: <reason>`` (not finished: a rerun trains it).
    """
    out_dir = Path(out_dir)
    # ``planned``: points of :func:`plan_points` calls (a grid per variant) instead of the product.
    points = list(planned) if planned is not None else plan_points(budgets, variants, sizes, base)
    from . import data as data_lib

    # Everything a run checks before its work, before this sweep writes anything (sweep.json
    # included): the data-dependent checks on one point, the rest on every point (plan_points).
    if points:
        first = points[0].recipe
        train.validate(dataclasses.replace(first, flops_budget=None, steps=1))
    check_writable_dir(out_dir)
    dataset = data_lib.load(base.get("data", train.Recipe.data))
    _check_directory(out_dir, _base_signature(base, dataset.content_hash))
    for folder in (out_dir, out_dir / "runs"):
        clean_stale_in(folder)  # temporaries of a sweep killed mid-write

    existing = _read_points(out_dir, warn=True)
    rows = [r for r in existing.to_dict("records")]
    if existing.attrs.get("torn"):
        _write_points(out_dir, rows)  # the torn line goes now, whatever is left to train
    wanted = {p.key for p in points}
    # Finished: trained (ok), skipped (budget < one step) or diverged (a rerun would diverge alike).
    # A trained or diverged point is finished only while its record is there: one whose record was
    # deleted is trained again (with a warning), not read back as a corrupt file.
    done = set()
    for r in rows:
        status = str(r["status"])
        if status.startswith("skipped"):
            done.add(_row_key(r))
        elif status == "ok" or status.startswith("diverged"):
            record = r.get("record")
            if isinstance(record, str) and record and (out_dir / record).is_file():
                done.add(_row_key(r))
            elif _row_key(r) in wanted:
                _warn(f"{out_dir / str(record)} (the record of point {r['variant']} {_budget_label(float(r['budget']))} "
                      f"{r['size']}, listed in points.csv) is missing; training that point again")
    todo = [p for p in points if p.key not in done]
    bar = _progress(len(points), progress)
    bar.update(len(points) - len(todo))
    def finish(point: Point, record: dict | None, trained: bool, status: str = SKIPPED) -> None:
        nonlocal rows
        rows = [r for r in rows if _row_key(r) != point.key]  # a failed earlier attempt is replaced
        if record is not None and trained:
            train.write_record(record, out_dir / point.record_name)
        rows.append(_row(point, status, dataset) if record is None
                    else _row(point, record.get("status", "ok"), dataset, record, point.record_name))
        _write_points(out_dir, rows)
        bar.update()

    to_train = []
    for point in todo:
        record_path = out_dir / point.record_name
        if record_path.exists():  # trained, but killed before points.csv was written
            finish(point, read_point_record(record_path), trained=False)
        elif not _fits_one_step(point.recipe, dataset):
            finish(point, None, trained=False)
        else:
            to_train.append(point)
    if executor is None and workers > 1 and runner is None and len(to_train) > 1:
        from . import executors

        executor = executors.make("local", out_dir / ".jobs", jobs=workers)
        threads = threads or max(1, _cores() // workers)
    if executor is not None and to_train:
        _train_as_jobs(to_train, executor, out_dir, finish, retries=retries, threads=threads, force=force,
                       progress=progress)
    else:
        for point in to_train:
            bar.set_description(f"{point.variant} {_budget_label(point.budget)} {point.size.name}")
            finish(point, _train_point(runner or train.run, point.recipe), trained=True)
    bar.close()
    order = {p.key: i for i, p in enumerate(points)}  # the planned order, however the points finished
    frame = pd.DataFrame(sorted((r for r in rows if _row_key(r) in wanted), key=lambda r: order[_row_key(r)]),
                         columns=POINT_COLUMNS)
    return frame.reset_index(drop=True)


# --------------------------------------------------------------------------- fits


def _fit_parabola(x: np.ndarray, y: np.ndarray) -> dict:
    """loss = a x² + b x + c, x = ln N; optimum x* = -b/2a and loss* = c - b²/4a with delta-method
    standard errors from polyfit's (residual-scaled) covariance.  Exactly 3 points fit exactly:
    no residual, so no uncertainty (NaN)."""
    if len(x) > 3:
        coef, cov = np.polyfit(x, y, 2, cov=True)
    else:
        coef, cov = np.polyfit(x, y, 2), np.full((3, 3), np.nan)
    a, b, c = (float(v) for v in coef)
    out = dict(a=a, b=b, c=c, n_sizes=len(x))
    if not a > 0:
        return dict(out, status="no interior minimum (a <= 0)")
    x_opt = -b / (2 * a)
    loss_opt = c - b * b / (4 * a)
    g_x = np.array([b / (2 * a * a), -1 / (2 * a), 0.0])
    g_l = np.array([b * b / (4 * a * a), -b / (2 * a), 1.0])
    se_x = float(np.sqrt(g_x @ cov @ g_x)) if np.isfinite(cov).all() else math.nan
    se_l = float(np.sqrt(g_l @ cov @ g_l)) if np.isfinite(cov).all() else math.nan
    status = "ok" if x.min() <= x_opt <= x.max() else "optimum outside sampled sizes"
    return dict(out, status=status, log_n_opt=x_opt, log_n_opt_se=se_x, n_opt=math.exp(x_opt),
                n_opt_lo=math.exp(x_opt - se_x), n_opt_hi=math.exp(x_opt + se_x),
                loss_opt=loss_opt, loss_opt_se=se_l)


FIT_COLUMNS = ["variant", "budget", "n_sizes", "status", "a", "b", "c", "n_opt", "n_opt_lo", "n_opt_hi",
               "log_n_opt", "log_n_opt_se", "loss_opt", "loss_opt_se", "nearest_size", "nearest_params",
               "nearest_seconds_per_step"]


def fit_isoflop(points: pd.DataFrame, n_col: str = "params", near_min: int | None = None) -> pd.DataFrame:
    """One row per (variant, budget): the parabola of final loss against ln N (``n_col``), its
    optimum N* with a ±1 standard-error interval [n_opt_lo, n_opt_hi] (delta method on the fit
    covariance, in ln N), and the trained point nearest N* in ln N (the isoFLOP-optimal model).

    status: ``ok``; ``unfit: < 3 sizes``; ``no interior minimum (a <= 0)``; ``optimum outside
    sampled sizes`` (an extrapolation: N* is reported but should not be trusted).

    ``near_min``: fit only the ``near_min`` sizes nearest (in ln N) to the lowest-loss one - a
    parabola describes the valley, not losses far up its walls; None fits all sizes.
    """
    if near_min is not None and near_min < 3:
        raise ConfigError(f"near_min must be >= 3 (a parabola has 3 coefficients), got {near_min}")
    ok = points[points["status"] == "ok"].dropna(subset=["final_val_loss"])
    rows = []
    for (variant, budget), group in points.groupby(["variant", "budget"], sort=True):
        g = ok[(ok["variant"] == variant) & (ok["budget"] == budget)]
        if near_min is not None and len(g) > near_min:
            distance = np.abs(np.log(g[n_col].to_numpy(float)) - math.log(g.loc[g["final_val_loss"].idxmin(), n_col]))
            g = g.iloc[np.sort(np.argsort(distance, kind="stable")[:near_min])]
        x = np.log(g[n_col].to_numpy(float))
        y = g["final_val_loss"].to_numpy(float)
        if len(np.unique(x)) < 3:
            row = dict(variant=variant, budget=budget, n_sizes=len(np.unique(x)), status="unfit: < 3 sizes")
        else:
            row = dict(variant=variant, budget=budget, **_fit_parabola(x, y))
        if len(g):
            # The isoFLOP-optimal trained model: nearest N* in ln N, or the lowest loss when unfit.
            idx = (np.abs(x - row["log_n_opt"]).argmin() if "log_n_opt" in row else int(np.argmin(y)))
            best = g.iloc[idx]
            row.update(nearest_size=best["size"], nearest_params=best[n_col],
                       nearest_seconds_per_step=best["seconds_per_step"])
        rows.append(row)
    return pd.DataFrame(rows, columns=FIT_COLUMNS)


def fit_power_law(optima: pd.DataFrame | Sequence[tuple[float, float]]) -> tuple[float, float, float]:
    """N* = k·C^e from (budget, n_opt) pairs (a frame with those columns, or tuples) by least
    squares in log-log; returns (e, k, stderr of e).  Needs >= 2 budgets; with exactly 2 the
    line is exact and stderr is NaN."""
    if isinstance(optima, pd.DataFrame):
        pairs = optima[["budget", "n_opt"]].dropna().to_numpy(float)
    else:
        pairs = np.asarray(list(optima), float).reshape(-1, 2)
    if len(pairs) < 2 or len(np.unique(pairs[:, 0])) < 2:
        raise ConfigError(f"a power law needs optima at >= 2 distinct budgets, got {len(pairs)}")
    lx, ly = np.log(pairs[:, 0]), np.log(pairs[:, 1])
    if len(pairs) > 2:
        (e, log_k), cov = np.polyfit(lx, ly, 1, cov=True)
        se = float(np.sqrt(cov[0, 0]))
    else:
        e, log_k = np.polyfit(lx, ly, 1)
        se = math.nan
    return float(e), float(math.exp(log_k)), se


def power_laws(fits: pd.DataFrame) -> pd.DataFrame:
    """fit_power_law per variant over its budgets with an interior optimum (status ok)."""
    rows = []
    for variant, group in fits.groupby("variant", sort=False):
        good = group[group["status"] == "ok"]
        row = dict(variant=variant, n_budgets=len(good))
        try:
            e, k, se = fit_power_law(good)
            row.update(exponent=e, prefactor=k, exponent_se=se, status="ok")
        except ConfigError:
            row.update(exponent=math.nan, prefactor=math.nan, exponent_se=math.nan,
                       status="unfit: < 2 budgets with an interior optimum")
        rows.append(row)
    return pd.DataFrame(rows, columns=["variant", "n_budgets", "status", "exponent", "exponent_se", "prefactor"])


def step_time_comparison(fits: pd.DataFrame, baseline: str = "baseline") -> pd.DataFrame:
    """Seconds per step of each variant's isoFLOP-optimal model (nearest N*) per budget, and its
    ratio to the baseline's (MoD paper: "steps up to 66% faster")."""
    cols = ["variant", "budget", "nearest_size", "nearest_params", "nearest_seconds_per_step"]
    table = fits.dropna(subset=["nearest_seconds_per_step"])[cols].copy()
    base = table[table["variant"] == baseline].set_index("budget")["nearest_seconds_per_step"]
    table["baseline_seconds_per_step"] = table["budget"].map(base)
    table["step_time_vs_baseline"] = table["nearest_seconds_per_step"] / table["baseline_seconds_per_step"]
    return table.reset_index(drop=True)


def retime(comparison: pd.DataFrame, variants: Mapping[str, Sequence[str]], steps: int = 30, repeats: int = 3,
           runner: Callable[[train.Recipe], dict] | None = None, **base) -> pd.DataFrame:
    """Re-measure the seconds per step of the isoFLOP-optimal models of :func:`step_time_comparison`
    under the same conditions: ``steps``-step runs, all models interleaved, ``repeats`` rounds,
    the median kept.  A sweep's own step times come from runs hours apart on a shared machine;
    these are comparable with one another.  Adds ``retimed_seconds_per_step`` and
    ``retimed_vs_baseline`` columns."""
    runner = runner or train.run
    table = comparison.copy()
    sizes = {name: parse_size(name) for name in table["nearest_size"].unique()}
    recipes = {(v, name): train.Recipe(**{**base, "eval_batches": 1, "eval_every": steps}, model=sizes[name].model,
                                       model_args=dict(sizes[name].model_args), techniques=list(variants[v]),
                                       steps=steps)
               for v, name in zip(table["variant"], table["nearest_size"])}
    seconds = {key: [] for key in recipes}
    for _ in range(repeats):
        for key, recipe in recipes.items():
            seconds[key].append(runner(recipe)["seconds_per_step"])
    table["retimed_seconds_per_step"] = [float(np.median(seconds[(v, n)]))
                                         for v, n in zip(table["variant"], table["nearest_size"])]
    base_time = table[table["variant"] == "baseline"].set_index("budget")["retimed_seconds_per_step"]
    table["retimed_vs_baseline"] = table["retimed_seconds_per_step"] / table["budget"].map(base_time)
    return table


# --------------------------------------------------------------------------- plots


def _budget_palette(budgets) -> dict:
    budgets = sorted(set(budgets))
    return dict(zip(budgets, sns.color_palette("viridis", len(budgets))))


def plot_isoflop(points: pd.DataFrame, fits: pd.DataFrame, n_col: str = "params"):
    """MoD paper Figures 3/4: one panel per variant, final loss against N (log x), one colour per
    budget, the fitted parabola over the sampled sizes and its optimum (star, ±1 s.e. bar)."""
    ok = points[points["status"] == "ok"]
    variants = list(dict.fromkeys(points["variant"]))
    palette = _budget_palette(points["budget"])
    fig = new_figure(4.2 * len(variants), 3.6)
    axes = fig.subplots(1, len(variants), sharey=True, squeeze=False)[0]
    for ax, variant in zip(axes, variants):
        for budget, colour in palette.items():
            g = ok[(ok["variant"] == variant) & (ok["budget"] == budget)]
            if g.empty:
                continue
            label = f"{budget:.2g} FLOPs"
            ax.scatter(g[n_col], g["final_val_loss"], color=colour, s=18, label=label, zorder=3)
            fit = fits[(fits["variant"] == variant) & (fits["budget"] == budget)]
            if fit.empty or pd.isna(fit.iloc[0]["a"]):
                ax.plot(g.sort_values(n_col)[n_col], g.sort_values(n_col)["final_val_loss"], color=colour,
                        lw=0.8, ls=":")
                continue
            f = fit.iloc[0]
            xs = np.linspace(np.log(g[n_col].min()), np.log(g[n_col].max()), 100)
            ax.plot(np.exp(xs), f["a"] * xs ** 2 + f["b"] * xs + f["c"], color=colour, lw=1.2)
            if f["status"] == "ok":
                ax.scatter([f["n_opt"]], [f["loss_opt"]], marker="*", s=140, color=colour,
                           edgecolor="black", linewidth=0.6, zorder=4)
                if np.isfinite(f["log_n_opt_se"]):
                    ax.plot([f["n_opt_lo"], f["n_opt_hi"]], [f["loss_opt"]] * 2, color=colour, lw=2.5, alpha=0.6)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a <1-decade axis overlap
        ax.set_title(variant)
        ax.set_xlabel(f"{n_col.replace('_', ' ')} (N)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("final validation loss (nats/token)")
    axes[-1].legend(fontsize=7, title="budget", title_fontsize=7)
    fig.suptitle("isoFLOP curves (star: fitted optimum N*, bar: ±1 s.e.)", fontsize=9)
    return fig


def plot_loss_vs_flops(points: pd.DataFrame, out_dir: Path):
    """Validation loss against cumulative counted FLOPs of every run, one panel per variant,
    colour = model size, line style = budget."""
    rows = []
    for p in points[points["status"] == "ok"].itertuples():
        record = read_point_record(out_dir / p.record)
        for c in record["curve"]:
            if c["flops"] > 0 and c["val_loss"] is not None:
                rows.append(dict(variant=p.variant, size=f"{p.size} ({p.params / 1e3:.0f}K)", params=p.params,
                                 budget=f"{p.budget:.2g}", run=f"{p.size}@{p.budget:.2g}", flops=c["flops"],
                                 val_loss=c["val_loss"]))
    frame = pd.DataFrame(rows)
    variants = list(dict.fromkeys(points["variant"]))
    fig = new_figure(4.2 * len(variants), 3.6)
    axes = fig.subplots(1, len(variants), sharey=True, squeeze=False)[0]
    if frame.empty:
        return fig
    order = list(frame.sort_values("params")["size"].drop_duplicates())
    for i, (ax, variant) in enumerate(zip(axes, variants)):
        g = frame[frame["variant"] == variant]
        if not g.empty:
            sns.lineplot(data=g, x="flops", y="val_loss", hue="size", hue_order=order, style="budget",
                         units="run", estimator=None, ax=ax, palette="viridis", lw=1,
                         legend=i == len(variants) - 1)
        ax.set_xscale("log")
        ax.set_title(variant)
        ax.set_xlabel("cumulative counted FLOPs")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3, which="both")
    if axes[-1].get_legend():
        sns.move_legend(axes[-1], "upper right", fontsize=6, title_fontsize=6)
    return fig


def plot_step_time(comparison: pd.DataFrame):
    """Seconds per step of each variant's isoFLOP-optimal model, per budget (grouped bars)."""
    fig = new_figure(5.5, 3.6)
    ax = fig.subplots()
    if comparison.empty:
        return fig
    retimed = "retimed_seconds_per_step" in comparison
    y, ratio = (("retimed_seconds_per_step", "retimed_vs_baseline") if retimed
                else ("nearest_seconds_per_step", "step_time_vs_baseline"))
    frame = comparison.assign(budget=comparison["budget"].map(lambda b: f"{b:.2g}"))
    sns.barplot(data=frame, x="budget", y=y, hue="variant", ax=ax)
    for container, (_, group) in zip(ax.containers, frame.groupby("variant", sort=False)):
        labels = [f"{s}\n×{r:.2f}" if np.isfinite(r) else s
                  for s, r in zip(group["nearest_size"], group[ratio])]
        ax.bar_label(container, labels=labels, fontsize=6)
    ax.margins(y=0.15)  # room for the bar labels
    ax.set_xlabel("FLOP budget")
    ax.set_ylabel("seconds per step")
    ax.set_title("step time at the compute optimum (×: vs baseline)" + (", re-timed together" if retimed
                 else ", as swept"), fontsize=9)
    return fig


def plot_routing(decisions, title: str = "routing decisions", token_labels: Sequence[str] | None = None):
    """MoD paper Figure 5: a layers × tokens heat map of one sequence's routing decisions
    (1/True: the token went through the block; floats such as router weights are drawn as is).
    Layer 0 is at the top.  Returns the Figure (write it with :func:`write_figure`)."""
    arr = np.asarray(decisions, dtype=float)
    if arr.ndim != 2 or 0 in arr.shape:
        raise ConfigError(f"routing decisions must be a non-empty [layers, tokens] array, got shape {arr.shape}")
    layers, tokens = arr.shape
    fig = new_figure(min(14, 2 + tokens * 0.08), 1.2 + layers * 0.3)
    ax = fig.subplots()
    binary = np.isin(arr, (0.0, 1.0)).all()
    sns.heatmap(arr, ax=ax, cmap="Blues" if binary else "viridis", cbar=not binary,
                vmin=0 if binary else None, vmax=1 if binary else None, linewidths=0, xticklabels=False)
    if token_labels is not None and len(token_labels) == tokens:
        ax.set_xticks(np.arange(tokens) + 0.5, labels=list(token_labels), fontsize=5, rotation=90)
    ax.set_xlabel("token position")
    ax.set_ylabel("layer")
    if binary:
        title += f" (dark: processed; {arr.mean():.0%} of tokens)"
    ax.set_title(title, fontsize=9)
    return fig


def write_figure(path: str | os.PathLike, figure) -> Path:
    """Write ``figure`` as PNG atomically."""
    return save_figure(Path(path), figure)


# --------------------------------------------------------------------------- analysis + CLI


def analyse(points: pd.DataFrame, out_dir: str | os.PathLike, n_col: str = "params",
            baseline: str = "baseline", near_min: int | None = None, retime_steps: int | None = None,
            variants: Mapping[str, Sequence[str]] | None = None, **base) -> dict:
    """Fit and plot a finished (or partial) sweep into ``out_dir``; returns the tables."""
    out_dir = Path(out_dir)
    fits = fit_isoflop(points, n_col, near_min)
    laws = power_laws(fits)
    steps = step_time_comparison(fits, baseline)
    if retime_steps and not steps.empty:
        steps = retime(steps, variants or resolve_variants(list(steps["variant"].unique())), steps=retime_steps,
                       **base)
    write_text(out_dir / "fits.csv", fits.to_csv(index=False))
    write_text(out_dir / "power_law.csv", laws.to_csv(index=False))
    write_text(out_dir / "step_time.csv", steps.to_csv(index=False))
    write_figure(out_dir / "isoflop.png", plot_isoflop(points, fits, n_col))
    write_figure(out_dir / "loss_vs_flops.png", plot_loss_vs_flops(points, out_dir))
    write_figure(out_dir / "step_time.png", plot_step_time(steps))
    return dict(fits=fits, power_law=laws, step_time=steps)


def predict_study(budgets: Sequence[float], variants: Sequence[str], sizes: str, n_sizes: int, base: dict, *,
                  cpus_per_rank: int | None = None, force: bool = False) -> str:
    """What a study costs before it is submitted: its points (the starting grids when ``sizes`` is
    ``auto``), the jobs they pack into and each job's resources (:func:`impls.grid.plan_point`), and
    the predicted device-hours -- the planner's time (:mod:`impls.predict`, default rates: see
    ``etbench plan``) without the time limits' margins."""
    import contextlib

    from . import data as data_lib
    from . import dist

    names = resolve_variants(variants)
    with (dist.planning_for(dist.Target(type="cuda")) if base.get("device") == "cuda" else contextlib.nullcontext()):
        return _predict_study(budgets, names, sizes, n_sizes, base, cpus_per_rank, force, data_lib)


def _predict_study(budgets, names, sizes, n_sizes, base, cpus_per_rank, force, data_lib) -> str:
    if sizes == "auto":
        vocab = data_lib.load(base.get("data", train.Recipe.data)).vocab_size
        points = [p for b in budgets for v in names
                  for p in plan_points([b], {v: names[v]}, grid_for_budget(b, vocab, n_sizes), base)]
    else:
        points = plan_points(budgets, names, _names(sizes), base)
    planned = []
    for point in points:
        seconds, resources = grid.plan_point(point.recipe, 1, cpus_per_rank=cpus_per_rank, force=force)
        planned.append(grid.GridPoint(key=Path(point.record_name).stem, recipe=point.recipe, nproc=1,
                                      record=Path(point.record_name), predicted_s=seconds, resources=resources))
    jobs = grid.pack(planned, slots=None)
    device = "GPU" if any(p.resources.gpus for p in planned) else "CPU"
    hours = sum(p.predicted_s * max(1, p.resources.gpus) for p in planned) / 3600
    shapes: dict = {}
    for job in jobs:
        shapes.setdefault(job[0].resources, []).append(job)
    lines = [f"{len(planned)} points ({len(budgets)} budgets x {len(names)} variants"
             + (f", {n_sizes} starting sizes each; widening adds points where a minimum sits at an edge)"
                if sizes == "auto" else ")")
             + f" in {len(jobs)} jobs: {hours:.2f} predicted {device}-hours",
             "margins: memory x{mem} over the prediction + {host_base_gib} GiB a rank, time x{time} + "
             "{job_start_s:.0f} s".format(**grid.MARGINS)]
    for res, group in shapes.items():
        lines.append(f"  {len(group)} job(s): {res.gpus} GPU, {res.cpus} CPU, {res.mem_gb} GB, "
                     f"{max(_job_minutes(j) for j in group)} min limit")
    return "\n".join(lines)


def _job_minutes(job) -> int:
    return grid.job_resources(job).time_min


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"bad --budgets {text!r}; expected comma-separated numbers, e.g. 1e10,3e10") from None


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="etbench isoflop", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", required=True, help="comma-separated counted-FLOP budgets, e.g. 1e10,3e10,1e11")
    p.add_argument("--variants", default="baseline", help=f"comma-separated; known: {', '.join(VARIANTS)}")
    p.add_argument("--sizes", default="auto",
                   help=SIZE_GRAMMAR + ", comma-separated; 'auto' (default): --grid-sizes sizes per budget around "
                        "Chinchilla's N=sqrt(C/120), widened until every variant's minimum is inside")
    p.add_argument("--grid-sizes", type=int, default=5, metavar="K",
                   help="with --sizes auto: sizes per budget before widening (>= 3; default 5)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="train N points side by side, each on cores/N threads: --executor local --jobs N (small "
                        "models cannot use several cores; their per-point step times are then measured under "
                        "each other's load)")
    p.add_argument("--out", required=True, help="sweep directory (resumable)")
    p.add_argument("--isolate", action="store_true",
                   help="train each point in its own subprocess (memory freed, a crash loses one point)")
    p.add_argument("--force", action="store_true",
                   help="train points whose predicted peak memory exceeds the device's (default: refused before "
                        "any work, with the prediction; workers and subprocesses inherit it)")
    p.add_argument("--fit-sizes", type=int, metavar="K",
                   help="fit each parabola to the K sizes nearest the lowest loss (default: all)")
    p.add_argument("--retime", type=int, metavar="STEPS",
                   help="re-measure the optimal models' step times together (STEPS-step runs, 3 rounds)")
    p.add_argument("--predict", action="store_true",
                   help="print the study's predicted jobs, resources and GPU- or CPU-hours (the starting grids; "
                        "widening adds points where a minimum sits at an edge) and exit: nothing trains or is written")
    p.add_argument("--n-col", default="params", choices=("params", "matmul_params"),
                   help="the N of the fits: all parameters or those in matmuls")
    grid.add_arguments(p)
    base = p.add_argument_group("base recipe", "shared by every point; sizes, variants and budgets set the rest")
    recipe_lib.add_arguments(base, defaults=SWEEP_DEFAULTS, fields=BASE_FIELDS)
    return p


def _base(args: argparse.Namespace) -> dict:
    """The base recipe of the parsed flags, as :func:`sweep` takes it: the fields that differ from
    the Recipe's defaults (the sweep's signature fills in the rest, so it is the same either way)."""
    return recipe_lib.changed(recipe_lib.from_args(args), BASE_FIELDS)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    t0 = time.perf_counter()
    if args.force:  # read by train.check_memory in this process, its workers and --isolate subprocesses
        os.environ[train.FORCE_ENV] = "1"
    try:
        check_writable_dir(args.out)
        budgets = _floats(args.budgets)
        if args.retime is not None and args.retime < 3:
            raise ConfigError(f"--retime must be >= 3 steps (the first are untimed warm-up), got {args.retime}")
        if args.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {args.workers}")
        if args.fit_sizes is not None and args.fit_sizes < 3:
            raise ConfigError(f"--fit-sizes must be >= 3, got {args.fit_sizes}")
        grid.check_arguments(args)
        if args.executor and (args.workers > 1 or args.isolate):
            raise ConfigError(f"--executor {args.executor} runs every point as a job; drop "
                              f"{'--workers' if args.workers > 1 else '--isolate'}")
        base = _base(args)
        if args.predict:
            print(predict_study(budgets, _names(args.variants), args.sizes, args.grid_sizes, base,
                                cpus_per_rank=args.cpus_per_rank, force=args.force))
            return 0
        runner = subprocess_runner if args.isolate else None
        with exclusive(args.out):  # two sweeps in one folder would train the same points and race on points.csv
            executor = grid.make_executor(args, Path(args.out) / ".jobs")
            jobs = dict(executor=executor, retries=args.retries, threads=grid.threads_for(args, executor),
                        force=args.force)
            try:
                if args.sizes == "auto":
                    points, _ = adaptive_sweep(args.out, budgets, _names(args.variants), n_sizes=args.grid_sizes,
                                               runner=runner, workers=args.workers, **jobs, **base)
                else:
                    points = sweep(args.out, budgets, _names(args.variants), _names(args.sizes), runner=runner,
                                   workers=args.workers, **jobs, **base)
            finally:
                if executor is not None:
                    executor.close()
            tables = analyse(points, args.out, args.n_col, near_min=args.fit_sizes, retime_steps=args.retime,
                             variants=resolve_variants(_names(args.variants)), **base)
    except ConfigError as e:
        print(f"etbench isoflop: error: {e}", file=sys.stderr)
        return 2
    except WriteError as e:
        print(f"etbench isoflop: error: {e}", file=sys.stderr)
        return 1
    with pd.option_context("display.width", 140, "display.max_columns", 20):
        shown = points[["variant", "budget", "size", "params", "steps", "final_val_loss", "seconds_per_step",
                        "status"]]
        print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print()
        print(tables["fits"][["variant", "budget", "status", "n_opt", "n_opt_lo", "n_opt_hi", "loss_opt",
                              "nearest_size"]].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print()
        print(tables["power_law"].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print()
        print(tables["step_time"].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"\n{len(points)} points, {time.perf_counter() - t0:.1f} s; results in {args.out}")
    failed = points[points["status"].astype(str).str.startswith("failed")]
    if len(failed):
        print(f"etbench isoflop: error: {len(failed)} point(s) failed after their retries ("
              + ", ".join(f"{r.variant} {_budget_label(float(r.budget))} {r.size}" for r in failed.itertuples())
              + f"); see {Path(args.out) / 'jobs.json'}; rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
