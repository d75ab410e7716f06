"""Shared settings of the asv suites: the profile switch and the one way to produce a run record.

``ETBENCH_PROFILE=quick`` (the default, what ``make bench`` runs on a laptop CPU) keeps every
suite to small models, short budgets and few repeats; ``full`` is for GPU boxes.  Every training
run goes through :func:`impls.train.run`, the function behind ``etbench run`` (in this process for
one rank, under ``torchrun`` for several), so a benchmark measures exactly what a user's command
measures, and its JSON record is kept under ``results/runs/<commit>/`` for the plots.
"""
from __future__ import annotations

import abc
import functools
import json
import math
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROFILES = {
    "quick": dict(
        models=["nano", "micro", "small"],
        world_sizes=[1, 2],
        # Model FLOPs per run (all ranks): the same budget for every size is an isoFLOP slice
        # (>= one step of small at 8x128 tokens, 2.6e11).
        flops_budget=3e11,
        batch_size=8,
        seq_len=128,
        lr={"nano": 3e-3, "micro": 2e-3, "small": 1e-3},
        device="cpu",
        data="synthetic",
        # asv timing of time_/peakmem_: one call per sample, a few samples.
        timing=dict(number=1, repeat=(1, 5, 10.0), rounds=1, warmup_time=0.5),
        # Loss figures: one seed here (the record says so); the full profile reports the spread.
        seeds=[0],
        # Interleaved comparisons (impls.compare): rounds × steps per variant after warm-up.  8
        # rounds (a t interval on 7 degrees of freedom, ~17% wider than 10 rounds') and 2 warm-up
        # steps (a compiled variant compiles in its first) keep the comparisons -- ~150 s of make
        # bench -- within the 600 s budget.
        interleave=dict(rounds=8, steps=2, warmup=2),
        # Validation evaluations per training run (Recipe.evaluations, plus step 0 and the last):
        # a quick run's curve has 5 points; its final loss is the same 4-batch measurement.
        evaluations=5,
    ),
    "full": dict(
        models=["small", "gpt2", "gpt2-medium"],
        world_sizes=[1, 2, 4, 8],
        flops_budget=1e16,
        batch_size=16,
        seq_len=1024,
        lr={"small": 1e-3, "gpt2": 6e-4, "gpt2-medium": 3e-4},
        device="auto",
        data="pycode",
        timing=dict(number=1, repeat=(2, 10, 30.0), rounds=2, warmup_time=2.0),
        seeds=[0, 1, 2],
        interleave=dict(rounds=20, steps=3, warmup=3),
        evaluations=10,
    ),
}


# What `make bench PROFILE=gpu` runs on one GPU box (1×H100 80 GB): zoo models whose GPU numbers
# mean something, bf16 by default (a family that compares precisions names its own), seq_len
# within every model's block_size, budgets sized so the whole profile is predicted at <= 60 min on
# one H100 (`python -m benchmarks.dry_run --profile gpu`; README "GPU profile").  Multi-GPU grid
# points (world size 8) skip with the reason on fewer GPUs.
PROFILES["gpu"] = dict(
    models=["gpt2", "gpt2-medium", "llama-1b"],
    world_sizes=[1, 8],
    flops_budget=2e16,
    batch_size=16,
    seq_len=1024,
    lr={"gpt2": 6e-4, "gpt2-medium": 3e-4, "llama-1b": 2e-4},
    device="cuda",
    data="pycode",
    precision="bf16",
    # families that compare precisions (or compress activations) keep their fp32 baseline
    fp32_families=("quant", "technique", "actmem"),
    timing=dict(number=1, repeat=(2, 10, 20.0), rounds=2, warmup_time=2.0),
    seeds=[0],
    interleave=dict(rounds=10, steps=3, warmup=3),
    evaluations=5,
)

#: Precision techniques: a recipe naming one keeps it; otherwise a profile's ``precision`` is added.
PRECISIONS = ("bf16", "fp16", "fp8", "int8")


def profile_name() -> str:
    name = os.environ.get("ETBENCH_PROFILE", "quick")
    if name not in PROFILES:
        raise ValueError(f"unknown ETBENCH_PROFILE {name!r}; valid: {', '.join(PROFILES)}")
    return name


PROFILE = PROFILES[profile_name()]


def preload() -> None:
    """Import torch and the harness, and sample the profile's synthetic data, in this process.

    ``make bench`` runs asv with ``--launch-method forkserver``: a server imports these suites
    once and forks a process per benchmark.  Loaded here, at import, every ``setup_cache`` and
    ``time_`` benchmark starts with them in memory instead of paying ~1-3 s of imports (torch,
    the engines) and the data's sampling again.  pandas and seaborn stay out: every process asv
    forks (a thousand ``track_`` reads) copies the server's page tables, and a bigger server makes
    each fork slower.  Nothing runs a kernel or starts a thread pool before the fork (torch's intra-op
    pool starts on first use, in the child), and CUDA is not touched; a forked child is what a
    DataLoader worker is.  ``ETBENCH_PRELOAD=0`` turns it off (e.g. to time the imports)."""
    if os.environ.get("ETBENCH_PRELOAD", "1") == "0":
        return
    import impls.compare  # noqa: F401
    import impls.train  # noqa: F401  (torch, the engines, the training loop)
    # Building any model imports dynamo: zoo.build constructs on `meta`, and the meta kernels of
    # the initialisers (torch._refs.normal_, ...) are wrapped in torch._disable_dynamo, which
    # imports torch._dynamo on first call -- 0.65 s in every forked child that builds a model
    # (~40 in the quick profile) against ~3 ms more per fork of a 25 MB bigger server.  CPU
    # profiles only: importing dynamo imports inductor, which asks CUDA whether it is available
    # (tests/test_profiles.py), and a server that has touched CUDA cannot fork GPU benchmarks.
    if PROFILE["device"] == "cpu":
        import torch._dynamo  # noqa: F401
    from impls import data

    if PROFILE["data"].split(":")[0] == "synthetic":
        data.load(PROFILE["data"])


preload()


def unsupported_world_size(world_size: int) -> str | None:
    """Why this machine cannot run ``world_size`` ranks of the profile (None if it can).  The
    grids list the profile's world sizes on every machine (fixed grids, as numpy's and pandas'
    suites keep them); a class's ``setup`` raises ``NotImplementedError`` with this reason, asv's
    way of skipping a combination."""
    if world_size in usable_world_sizes():
        return None
    if PROFILE["device"] == "cuda":
        from impls import dist

        return f"world size {world_size} needs {world_size} GPUs (one rank per GPU); this machine has {dist.cuda_device_count()}"
    return f"world size {world_size} needs {world_size} devices (one rank per GPU or CPU core); this machine has fewer"


def usable_world_sizes() -> list[int]:
    """The profile's rank counts that this machine can run: one rank per GPU, or per CPU core.
    (torch is imported only for a GPU profile: asv calls this in every parameter's process.)"""
    try:  # the cores this process may use, as `etbench --nproc` counts them (it refuses more)
        limit = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        limit = os.cpu_count() or 1
    if PROFILE["device"] != "cpu":
        # NVML's count (torch.cuda.device_count): unlike torch.cuda.is_available(), it does not
        # initialise CUDA, which would make every process asv's forkserver forks unsafe (a forked
        # child of a process that initialised CUDA cannot use it; asv PRs #1565/#1566, dgl #5129).
        from impls import dist

        gpus = dist.cuda_device_count()
        if gpus > 0 or PROFILE["device"] == "cuda":
            limit = gpus
    return [w for w in PROFILE["world_sizes"] if w <= limit]


def with_precision(fields: dict, family: str | None = None) -> dict:
    """``fields`` (Recipe fields) with the profile's default precision technique added when the
    recipe names none (the GPU profile trains bf16; quick and full keep fp32), except in the
    profile's ``fp32_families`` (a comparison against fp32 needs an fp32 baseline)."""
    default = PROFILE.get("precision")
    techniques = list(fields.get("techniques") or [])
    if (not default or family in PROFILE.get("fp32_families", ())
            or any(t.split(":")[0] in PRECISIONS for t in techniques)):
        return fields
    return {**fields, "techniques": [default, *techniques]}


def family_recipe(settings: dict, *extra: str, **overrides) -> dict:
    """Recipe fields from a family's ``SETTINGS``: its ``model``, ``data``, ``batch_size``, ``seq_len``
    and ``lr``, the ``extra`` keys (a dict value copied), on the profile's device; ``overrides``
    replace or add fields.  A suite binds it once: ``_recipe = functools.partial(common.family_recipe,
    SETTINGS)``."""
    fields = {key: settings[key] for key in ("model", "data", "batch_size", "seq_len", "lr")}
    fields.update({key: dict(settings[key]) if isinstance(settings[key], dict) else settings[key] for key in extra})
    return {**fields, "device": PROFILE["device"], **overrides}


def recipe(**fields):
    """The :class:`impls.recipe.Recipe` of ``fields`` under this profile (its default precision)."""
    from impls.recipe import Recipe

    return Recipe(**with_precision(fields))


#: Set by :mod:`benchmarks.dry_run` while it plans a profile: every run a ``setup_cache`` would
#: start is handed to it instead (nothing trains, nothing is written).  The recipes it sees are
#: built by the benchmarks' own code, so the dry run checks exactly what ``make bench`` would run.
DRY_RUN = None


def dry_run():
    """The active dry-run planner, or None when benchmarks run for real."""
    return DRY_RUN


def train_run(fields: dict, **kwargs) -> dict:
    """:func:`impls.train.run` of ``fields`` (under the profile's precision), or its plan in a dry run."""
    if DRY_RUN is not None:
        return DRY_RUN.train(fields.get("model", "?"), 1, with_precision(fields))
    from impls import train

    return train.run(recipe(**fields), **kwargs)


@functools.cache  # one folder per benchmark run, even if HEAD moves while it runs
def runs_dir() -> Path:
    """Where this benchmark run keeps its records: ``ETBENCH_RUNS_DIR``, else results/runs/<commit>."""
    if os.environ.get("ETBENCH_RUNS_DIR"):
        return Path(os.environ["ETBENCH_RUNS_DIR"])
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unversioned"
    return REPO / "results" / "runs" / commit


def train_record(name: str, *, nproc: int = 1, **recipe) -> dict:
    """Train ``recipe`` (Recipe field names) on ``nproc`` ranks once per seed of the profile;
    return the first seed's record with the loss over all seeds in ``record["seeds"]``.

    The record is kept as ``<runs dir>/<family>/<name>.json``, the family being the name's first
    dash-separated word, so the report plots each benchmark family on its own.  One rank runs in
    this process, through :func:`impls.train.run` as ``etbench run`` does (saving the ~2 s of
    interpreter and torch start-up per run); several ranks are those of ``etbench run --nproc``,
    started from this process (:func:`launch_ranks`).
    """
    recipe = with_precision(recipe, name.split("-")[0])
    base_seed = recipe.pop("seed", 0)
    recipe.setdefault("evaluations", PROFILE["evaluations"])
    if DRY_RUN is not None:
        for s in PROFILE["seeds"]:
            placeholder = DRY_RUN.train(name, nproc, {**recipe, "seed": base_seed + s})
        return placeholder
    out = runs_dir() / name.split("-")[0] / f"{name}.json"
    key = _recipe_key(nproc, {**recipe, "seed": base_seed})
    earlier = _trained_earlier(key)
    if earlier is not None:
        return _write(out, {**json.loads(earlier.read_text()), "reused_from": earlier.relative_to(runs_dir()).as_posix()})
    records = [_train_one(out if i == 0 else None, nproc, {**recipe, "seed": base_seed + s})
               for i, s in enumerate(PROFILE["seeds"])]
    record = records[0]
    record["seeds"] = seed_summary(records)
    written = _write(out, record)
    _note_trained(key, out)
    return written


#: Set by ``make bench`` to one value per invocation.  Within one, a recipe that a family trained
#: is not trained again by another (the same recipe, ranks and seeds train to the same losses and
#: counted FLOPs -- four families share the nano baseline, two the bf16 run): the second record is
#: a copy of the first, naming it in ``reused_from``.  Without it (asv run by hand), nothing is reused.
BENCH_RUN_ENV = "ETBENCH_BENCH_RUN"


def _recipe_key(nproc: int, fields: dict) -> str:
    """What makes two runs the same run: every Recipe field (defaults filled in), the ranks and
    the profile's seeds."""
    import dataclasses
    import hashlib

    from impls.recipe import Recipe

    canonical = dict(recipe=dataclasses.asdict(Recipe(**fields)), nproc=nproc, seeds=PROFILE["seeds"])
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _reuse_entry(key: str) -> Path:
    return runs_dir() / ".reuse" / f"{key}.key"  # not *.json: the report reads every record under the runs dir


def _trained_earlier(key: str) -> Path | None:
    """The record of the same run trained earlier in this ``make bench``, if any."""
    bench_run = os.environ.get(BENCH_RUN_ENV)
    entry = _reuse_entry(key)
    if not bench_run or not entry.is_file():
        return None
    try:
        noted = json.loads(entry.read_text())
    except (OSError, ValueError):
        return None
    record = runs_dir() / noted.get("record", "")
    return record if noted.get("bench_run") == bench_run and record.is_file() else None


def _note_trained(key: str, out: Path) -> None:
    if os.environ.get(BENCH_RUN_ENV):
        from impls.files import write_text

        write_text(_reuse_entry(key), json.dumps(dict(bench_run=os.environ[BENCH_RUN_ENV],
                                                      record=out.relative_to(runs_dir()).as_posix())))


def seed_summary(records: list[dict]) -> dict:
    """The final validation loss over seeds: every value, mean, sample std and a t interval."""
    from impls.compare import t975

    losses = [r["final_val_loss"] for r in records]
    n = len(losses)
    mean = sum(losses) / n
    std = (sum((v - mean) ** 2 for v in losses) / (n - 1)) ** 0.5 if n > 1 else None
    half = t975(n - 1) * std / n ** 0.5 if n > 1 else None
    return dict(n=n, seeds=[r["seed"] for r in records], final_val_loss=losses, mean=mean, std=std,
                ci95=[mean - half, mean + half] if n > 1 else None,
                note="one seed: no spread measured (quick profile)" if n == 1 else f"{n} seeds")


def _write(out: Path, record: dict) -> dict:
    """Write ``record`` (atomically) and return it as read back: plain JSON types only, so asv's
    per-parameter processes unpickle ``setup_cache`` results without importing torch (~1 s each)."""
    from impls.train import write_record

    write_record(record, out)
    return json.loads(out.read_text())


def _train_one(out: Path | None, nproc: int, recipe: dict) -> dict:
    from impls import train
    from impls.recipe import Recipe, to_argv  # imported on use, as the suites import impls

    if nproc == 1:
        return train.run(Recipe(**recipe))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        target = out or Path(tmp) / "record.json"
        train.validate(Recipe(**recipe), world_size=nproc)  # as `etbench run --nproc` does, before the ranks
        launch_ranks(["run", "--out", str(target), *to_argv(Recipe(**recipe))], nproc, f"etbench run {target.stem}")
        return json.loads(target.read_text())


def launch_ranks(cli_args: list[str], nproc: int, what: str) -> None:
    """``etbench <cli_args> --nproc <nproc>``, its ranks started from this process.

    The ranks are what ``etbench ... --nproc`` starts (:func:`impls.ranks.launch`: torch's elastic
    agent, one ``python -m impls.ranks impls.cli ...`` per rank), minus the launcher interpreter in
    between: this process has imported torch and the harness already, so each multi-rank run saves
    that interpreter's ~2.6 s of imports and ~0.7 s of exit (six such runs in the quick profile).
    The ranks' failure is one line (the launcher's), raised here with the status."""
    import contextlib
    import io

    from impls import ranks

    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        status = ranks.launch(["impls.cli", *cli_args], nproc)
    if status != 0:
        raise RuntimeError(f"{what} on {nproc} ranks failed ({status}): {said.getvalue().strip()[-4000:]}")


def compare_record(family: str, variants: dict[str, dict], *, baseline: str = "baseline", common: dict | None = None,
                   nproc: int = 1, name: str | None = None) -> dict:
    """Time ``variants`` (name -> recipe fields over ``common``) interleaved, the profile's rounds
    and steps (:mod:`impls.compare`); the record is kept as ``<runs>/<family>/compare-<name or family>.json``."""
    common = common or {}
    variants = {v: _variant_precision(common, fields, family) for v, fields in variants.items()}
    spec = dict(baseline=baseline, common=common, variants=variants, **PROFILE["interleave"])
    if DRY_RUN is not None:
        return DRY_RUN.compare(f"compare-{name or family}", spec, nproc)
    from impls import compare

    out = runs_dir() / family / f"compare-{name or family}.json"
    if nproc == 1:
        return _write(out, compare.measure(compare.parse_spec(spec)))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        launch_ranks(["compare", str(spec_file), "--out", str(out)], nproc, f"etbench compare {family}")
    return json.loads(out.read_text())


def _variant_precision(common: dict, fields: dict, family: str) -> dict:
    """A compare variant's fields with the profile's precision added when neither the variant
    nor the common fields name one (a variant's techniques replace the common ones)."""
    techniques = fields.get("techniques", common.get("techniques", []))
    merged = with_precision({"techniques": techniques}, family)["techniques"]
    return fields if merged == list(techniques) else {**fields, "techniques": merged}


def speed_tracks(cls):
    """Class decorator for interleaved-comparison classes (``setup_cache`` returns a compare
    record; one param, the variant): per-token time and activation memory relative to the
    baseline, lower is better as asv's ``track_`` values are."""
    def track_time_per_token_vs_baseline(self, record, variant):
        """1 / speed-up: the variant's seconds per token ÷ the baseline's, same rounds."""
        return 1.0 / record["variants"][variant]["speedup"]["value"]

    track_time_per_token_vs_baseline.unit = "ratio"

    def track_activations_vs_baseline(self, record, variant):
        return record["variants"][variant]["memory_ratio"]["activations_bytes"]

    track_activations_vs_baseline.unit = "ratio"
    cls.track_time_per_token_vs_baseline = track_time_per_token_vs_baseline
    cls.track_activations_vs_baseline = track_activations_vs_baseline
    return cls


def apply_timing(cls):
    """Class decorator: the profile's asv timing attributes (number, repeat, rounds, warmup)."""
    for key, value in PROFILE["timing"].items():
        setattr(cls, key, value)
    return cls


def tracked_field(*path: str, unit: str):
    """An asv ``track_`` method returning ``record[path...]`` of the parametrised run, for classes
    whose ``setup_cache`` returns records keyed by the tuple of parameter values."""
    def track_field(self, records, *params):
        value = records[params]
        for key in path:
            value = value[key]
        return value

    track_field.unit = unit
    return track_field


def seconds_per_mtok(self, records, *params):
    """Throughput as asv can track it: lower is better, so seconds per million tokens -- from the
    median of the run's per-step times (a burst in one step does not move it), not their mean."""
    record = records[params]
    return 1e6 * record["step_time"]["median"] / record["tokens_per_step"]


seconds_per_mtok.unit = "s/Mtok"


def counted_flops_per_token(self, records, *params):
    """Counted training FLOPs per token (FlopCounterMode; under a schedule, the run's total over
    its total tokens): what a token-efficiency technique removes, beside the loss it costs."""
    record = records[params]
    return record["flops_per_step"] / record["tokens_per_step"]


counted_flops_per_token.unit = "FLOPs/token"


def technique_note(technique: str, key: str, unit: str, *, optional: bool = False):
    """An asv ``track_`` method returning ``technique_notes[technique][key]`` of the variant's run
    (classes whose ``setup_cache`` returns ``{(variant,): record}``), NaN for a run without the
    technique (a family's baseline): asv shows NaN as n/a, None as a failure.  ``optional``: NaN
    also where the technique's notes lack ``key`` (a measurement it did not make).  A suite binds
    its technique once: ``_note = functools.partial(common.technique_note, "token_drop")``."""
    def track(self, records, variant):
        notes = records[(variant,)]["technique_notes"].get(technique)
        if not notes:
            return math.nan
        return notes.get(key, math.nan) if optional else notes[key]

    track.unit = unit
    return track


class BudgetedRuns(abc.ABC):
    """Base of a family's training runs to a fixed budget, as numpy's ``Benchmark`` and pandas'
    ``BaseIO`` are of their suites: ``setup_cache`` trains one run per grid point and returns
    ``{(param, ...): record}``; what every such run tracks (the loss the budget buys, seconds per
    million tokens, exact bytes by component) is here, and a suite adds only what differs.

    Abstract (asv skips abstract classes, so the base is not benchmarked itself): each subclass
    defines its own ``setup_cache``, since asv keys a cache by the function's source line (one
    inherited from here would be shared by every family)."""

    param_names = ["variant"]

    track_val_loss_at_budget = tracked_field("final_val_loss", unit="nats/token")
    track_seconds_per_mtok = seconds_per_mtok
    track_params_bytes = tracked_field("memory", "params_bytes", unit="bytes")
    track_grads_bytes = tracked_field("memory", "grads_bytes", unit="bytes")
    track_optimizer_bytes = tracked_field("memory", "optimizer_bytes", unit="bytes")
    track_activations_bytes = tracked_field("memory", "activations_bytes", unit="bytes")

    @abc.abstractmethod
    def setup_cache(self) -> dict:
        """The class's runs, ``{(param, ...): record}`` (see :func:`train_record`)."""


class FlopSavingRuns(BudgetedRuns):
    """Base of a token-efficiency family (a technique that makes a step cheaper, so the same
    model-FLOP budget buys more steps): :class:`BudgetedRuns` plus the steps the budget bought and
    the counted FLOPs per token."""

    track_steps_at_budget = tracked_field("steps", unit="steps")
    track_counted_flops_per_token = counted_flops_per_token
