"""Interleaved comparison of training variants: ratios a burst of load cannot fake.

Two runs timed one after the other compare the machine's load as much as the techniques: a
burst that lands in one run and not the other moves a "speed-up" anywhere from 0.1× to 10×.
This module builds every variant of a family once, in one process (on every rank, under
``torchrun``), warms each up (allocator, thread pool, compilation), then runs *rounds*: in each
round every variant trains ``steps`` steps, in an order rotated from round to round
(A B C, B C A, C A B, …, as pyperf and asv's ``rounds`` interleave), so load hits all variants
alike and no variant always runs right after the same neighbour.

Per round and variant the figure is the median step time of its ``steps`` steps (the slowest
rank's, with several ranks).  Ratios are taken *within* a round, against the baseline's step of
that same round, then summarised over rounds:

* speed-up = (variant tokens/s) / (baseline tokens/s) per round — per token, so variants with a
  different micro-batch (accumulation) compare fairly;
* the point estimate is the median over rounds and its 95% interval the distribution-free one
  of order statistics (x₍ₖ₎, x₍ₙ₋ₖ₊₁₎ with binomial coverage ≥ 95%, e.g. 3rd and 10th of 12
  rounds): a burst of load that spoils a round or two moves neither, where a mean and a t
  interval would swing (a quiet machine gives a tight interval either way).  The geometric mean
  with its Student-t interval on the log ratios is kept beside it.

Memory (parameters, gradients, optimizer state, saved activations) is exact and deterministic,
so its ratios need no interval.  The load average at the start and end flags a noisy run.

    etbench compare SPEC.json --out compare.json [--nproc N]

SPEC: ``{"baseline": "base", "rounds": 5, "steps": 3, "warmup": 2, "common": {recipe fields},
"variants": {"base": {}, "bf16": {"techniques": ["bf16"]}, ...}}``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import torch

from . import dist, families
from .measure import timing as timing_lib
from .measure import device_name
from .measure.comm import CommCounter
from .measure.timing import median_interval, ratio_stats, t975  # noqa: F401 (also compare.t975, as before)
from .provenance import SCHEMA_VERSION, provenance
from .recipe import Recipe, RecipeError

CI_METHOD = ("median of per-round values with the distribution-free 95% interval of order statistics "
             "(binomial coverage >= 95%); per-round values are the median step time of the round's steps, "
             "ratios taken within a round")
SPEC_KEYS = ("baseline", "rounds", "steps", "warmup", "common", "variants")
#: Recipe fields a comparison sets itself, refused in ``common`` and in a variant instead of being
#: silently overridden: field -> why.
SPEC_OWNED_FIELDS = {
    "steps": "the comparison trains warmup + rounds x steps steps of every variant; set the spec's "
             "'steps' (per round), 'rounds' and 'warmup' instead",
    "flops_budget": "a comparison times a fixed number of steps; drop flops_budget",
}

@dataclasses.dataclass
class Spec:
    baseline: str
    rounds: int
    steps: int
    warmup: int
    recipes: dict[str, Recipe]


def parse_spec(raw: dict) -> Spec:
    """Check a comparison spec completely (recipes included) before any work."""
    if not isinstance(raw, dict):
        raise RecipeError(f"a comparison spec is a JSON object with keys {', '.join(SPEC_KEYS)}; got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise RecipeError(f"unknown spec key {unknown[0]!r}; valid: {', '.join(SPEC_KEYS)}")
    variants = raw.get("variants")
    if not isinstance(variants, dict) or len(variants) < 2:
        raise RecipeError("spec 'variants' must map at least two names to recipe fields (one is the baseline)")
    baseline = raw.get("baseline")
    if baseline not in variants:
        raise RecipeError(f"spec baseline {baseline!r} is not a variant; valid: {', '.join(variants)}")
    numbers = {}
    for key, default, low in (("rounds", 5, 2), ("steps", 3, 1), ("warmup", 2, 1)):
        value = raw.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise RecipeError(f"spec {key} must be an integer >= {low}, got {value!r}")
        numbers[key] = value
    common = raw.get("common", {})
    if not isinstance(common, dict):
        raise RecipeError(f"spec 'common' must be an object of recipe fields, got {common!r}")
    fields = {f.name for f in dataclasses.fields(Recipe)}
    total = numbers["warmup"] + numbers["rounds"] * numbers["steps"]
    _check_owned("spec 'common'", common)
    recipes = {}
    for name, overrides in variants.items():
        if not isinstance(overrides, dict):
            raise RecipeError(f"variant {name!r} must be an object of recipe fields, got {overrides!r}")
        merged = {**common, **overrides}
        bad = sorted(set(merged) - fields)
        if bad:
            raise RecipeError(f"variant {name!r}: unknown recipe field {bad[0]!r}; valid: {', '.join(sorted(fields))}")
        _check_owned(f"variant {name!r}", overrides)
        for owned in SPEC_OWNED_FIELDS:
            merged.pop(owned, None)  # None only: set ones were refused above
        # The learning-rate schedule spans the steps the comparison trains.
        recipes[name] = Recipe(**{**merged, "steps": total})
    devices = {r.device for r in recipes.values()}
    if len(devices) > 1:
        raise RecipeError(f"variants must share one device, got {', '.join(sorted(devices))}")
    return Spec(baseline, numbers["rounds"], numbers["steps"], numbers["warmup"], recipes)


def _check_owned(where: str, fields: dict) -> None:
    """Refuse a recipe field the comparison sets itself (:data:`SPEC_OWNED_FIELDS`); null is
    accepted (it is the field's "not set")."""
    for field, why in SPEC_OWNED_FIELDS.items():
        if fields.get(field) is not None:
            raise RecipeError(f"{where}: recipe field {field!r} ({fields[field]!r}) is not used by a comparison: {why}")


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple]) -> dict:
    """``json`` object hook: an object whose key appears twice is refused (plain ``json.load``
    keeps the last value silently, so a variant written twice would be measured once)."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(f"key {key!r} appears twice in one object (among keys "
                                f"{', '.join(repr(k) for k, _ in pairs)}); JSON would keep only the last; "
                                f"give each key once (rename one of the variants)")
        seen.add(key)
    return dict(pairs)


def load_spec(path: str | os.PathLike) -> Spec:
    """Read and check a spec file: not JSON, a key repeated in any of its objects (a variant
    given twice), an unknown key or a field the comparison sets itself are one-line errors."""
    try:
        with open(path) as f:
            raw = json.load(f, object_pairs_hook=_unique_keys)
    except OSError as e:
        raise RecipeError(f"cannot read comparison spec {str(path)!r}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise RecipeError(f"comparison spec {str(path)!r} is not JSON: {e}") from None
    except _DuplicateKey as e:
        raise RecipeError(f"comparison spec {str(path)!r}: {e}") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"comparison spec {str(path)!r} is not UTF-8 text ({e.reason})") from None
    return parse_spec(raw)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(spec: Spec, ctx: dist.DistContext | None = None) -> dict:
    """Build every variant, warm each up, run the interleaved rounds; return the record."""
    from . import train

    world_size = ctx.world_size if ctx else int(os.environ.get("WORLD_SIZE", "1"))
    for recipe in spec.recipes.values():  # every recipe checked before anything is built
        train.validate(recipe, world_size)
    load_start, cpu_start = timing_lib.load_average(), timing_lib.cpu_snapshot()
    ctx = ctx or dist.init(next(iter(spec.recipes.values())).device)
    names = list(spec.recipes)
    sessions, memory, step, warm_seconds = {}, {}, {}, {}
    per_rank, model_states, comm = {}, {}, {}
    for name in names:
        session = train.prepare(spec.recipes[name], ctx)
        # The comparison runs exactly this many steps of each variant: a technique acting at a
        # fraction of training (pruning at 25%) acts within them, as in the timed run's record.
        if session.build.total_steps is None:
            session.build.total_steps = spec.warmup + spec.rounds * spec.steps
        xm, ym = session.batches.get("train", 0)
        xm, ym = xm.chunk(session.plan.accum_steps)[0].clone(), ym.chunk(session.plan.accum_steps)[0].clone()
        activations = session.engine.activation_bytes(xm, ym)
        t0 = time.perf_counter()
        for i in range(spec.warmup):
            if i == 0 and ctx.world_size > 1:  # the collectives of one step (counting costs time: a warm-up step)
                with CommCounter() as counter:
                    session.engine.train_step(*session.batches.get("train", i), i)
                comm[name] = train.comm_check(session, counter.summary(), i)
            else:
                session.engine.train_step(*session.batches.get("train", i), i)
        _sync(ctx.device)
        state = session.engine.state_bytes()
        # the largest rank's bytes (sharded states are uneven), every rank's kept
        per_rank[name] = ctx.all_gather_object({k: int(state[k]) for k in ("params_bytes", "grads_bytes",
                                                                          "optimizer_bytes")})
        memory[name] = dict({k: max(r[k] for r in per_rank[name]) for k in per_rank[name][0]},
                            activations_bytes=activations)
        model_states[name] = train.model_states_check(session, memory[name])
        sessions[name], step[name], warm_seconds[name] = session, spec.warmup, time.perf_counter() - t0
    per_round = {name: [] for name in names}
    orders = []
    for r in range(spec.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        orders.append(order)
        for name in order:
            session = sessions[name]
            seconds = []
            for _ in range(spec.steps):
                x, y = session.batches.get("train", step[name])
                _sync(ctx.device)
                t0 = time.perf_counter()
                session.engine.train_step(x, y, step[name])
                _sync(ctx.device)
                seconds.append(time.perf_counter() - t0)
                step[name] += 1
            per_round[name].append(float(np.median(ctx.all_max(seconds))))
    load_end, others = timing_lib.load_average(), train.cores_of_other_processes(ctx, cpu_start, timing_lib.cpu_snapshot())
    cores = min(os.cpu_count() or 1, torch.get_num_threads() * int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    tokens = {name: s.recipe.batch_size * s.plan.accum_steps * s.dims.dp * s.recipe.seq_len
              for name, s in sessions.items()}
    base = spec.baseline
    variants = {}
    for name in names:
        seconds = per_round[name]
        tps = [tokens[name] / s for s in seconds]
        speedup = [t / (tokens[base] / b) for t, b in zip(tps, per_round[base])]
        variants[name] = dict(
            label=sessions[name].recipe.label,
            recipe=dataclasses.asdict(sessions[name].recipe),
            tokens_per_step=tokens[name],
            warmup_seconds=warm_seconds[name],
            seconds_per_step=_summary(seconds),
            tokens_per_second=_summary(tps),
            speedup=ratio_stats(speedup),
            memory=memory[name],
            memory_ratio={k: (v / memory[base][k] if memory[base][k] else None) for k, v in memory[name].items()},
            memory_per_rank=per_rank[name],
            model_states=model_states[name],
            comm=comm.get(name),
            # saved bytes per layer vs Korthikanti et al. (set by the activation measurement above)
            layer_activations=train.layer_activations_check(sessions[name]),
            mesh=dict(sessions[name].dims.sizes),
            technique_notes=sessions[name].build.notes_for_record(),
        )
    return dict(schema=SCHEMA_VERSION, kind=families.INTERLEAVED, baseline=base, rounds=spec.rounds,
                steps_per_round=spec.steps, warmup_steps=spec.warmup, ci_method=CI_METHOD, order=orders,
                load=timing_lib.load_report(load_start, load_end, cores, others),
                device=dict(type=ctx.device.type, name=device_name(ctx.device), threads=torch.get_num_threads()),
                world_size=ctx.world_size, **provenance(), variants=variants)


def _summary(values: list[float]) -> dict:
    """Median over rounds with its interval (:func:`ratio_stats`), and every round's value."""
    stats = ratio_stats(values)
    return dict(stats, median=stats["value"])


def summary_line(record: dict) -> str:
    """One line per variant: speed-up with its interval and the activation-memory ratio."""
    lines = [f"interleaved: {record['rounds']} rounds × {record['steps_per_round']} steps, baseline "
             f"{record['baseline']!r}" + (", NOISY (load)" if record["load"]["noisy"] else "")]
    for name, v in record["variants"].items():
        s = v["speedup"]
        act = v["memory_ratio"]["activations_bytes"]
        lines.append(f"  {name:<28} {v['seconds_per_step']['median'] * 1e3:9.2f} ms/step  speed-up "
                     f"{s['value']:.3f}× [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"
                     + (f"  activations {act:.2f}×" if act is not None else ""))
    return "\n".join(lines)


def harness_overhead(recipe: Recipe, rounds: int = 7, steps: int = 5, ctx: dist.DistContext | None = None) -> dict:
    """The training loop's per-step cost over a bare ``zero_grad / forward / backward / step`` loop
    of the same model and optimizer on the same batches, timed interleaved (bare, loop, loop,
    bare, …).  Each round times a block of ``steps`` iterations of each; the overhead is
    loop/bare − 1 per round, summarised like every ratio here (median, order-statistic interval)."""
    from . import train
    from .loss import lm_loss

    if recipe.techniques:
        raise RecipeError("the harness overhead is measured on a plain recipe (no techniques): "
                          f"got {', '.join(recipe.techniques)}")
    recipe = dataclasses.replace(recipe, steps=2 + 2 * rounds * steps, flops_budget=None)
    session = train.prepare(recipe, ctx)
    cost = train.measure_step(session)  # model FLOPs and the peak: the loop's MFU, with its interval
    ctx, engine, batches = session.ctx, session.engine, session.batches
    model, optimizer = session.build.train_parts[0], engine.optimizer
    fetched = [batches.get("train", i) for i in range(recipe.steps)]

    def bare(first: int) -> float:
        t0 = time.perf_counter()
        for i in range(first, first + steps):
            x, y = fetched[i]
            optimizer.zero_grad(set_to_none=True)
            lm_loss(model(x), y).backward()
            optimizer.step()
        _sync(ctx.device)
        return time.perf_counter() - t0

    def loop(first: int) -> float:
        seconds = []
        t0 = time.perf_counter()
        for i in range(first, first + steps):
            train.timed_step(engine, batches, ctx.device, i, seconds)
        return time.perf_counter() - t0

    bare(0), loop(0)  # warm-up of both paths
    load_start, cpu_start = timing_lib.load_average(), timing_lib.cpu_snapshot()
    ratios, bare_seconds, loop_seconds = [], [], []
    for r in range(rounds):
        first = 2 + 2 * r * steps
        pair = [(bare, first), (loop, first + steps)]
        timed = {}
        for fn, start in (pair if r % 2 == 0 else pair[::-1]):
            timed[fn.__name__] = max(ctx.all_max([fn(start)]))
        bare_seconds.append(timed["bare"] / steps)
        loop_seconds.append(timed["loop"] / steps)
        ratios.append(timed["loop"] / timed["bare"])
    stats = ratio_stats(ratios)
    loop = _summary(loop_seconds)
    per_device = cost.model_flops_per_step / ctx.world_size / cost.peak["value"]  # MFU × seconds/step
    return dict(kind=families.HARNESS_OVERHEAD, label=recipe.label, rounds=rounds, steps_per_round=steps,
                ci_method=CI_METHOD, bare_seconds_per_step=_summary(bare_seconds),
                loop_seconds_per_step=loop, ratio=stats,
                overhead=dict(value=stats["value"] - 1, ci95=[c - 1 for c in stats["ci95"]]),
                model_flops_per_step=cost.model_flops_per_step, peak_flops=cost.peak,
                load=timing_lib.load_report(load_start, timing_lib.load_average(),
                                            min(os.cpu_count() or 1, torch.get_num_threads()),
                                            train.cores_of_other_processes(ctx, cpu_start, timing_lib.cpu_snapshot())),
                mfu=dict(value=per_device / loop["value"], ci95=[per_device / loop["ci95"][1], per_device / loop["ci95"][0]]))
