"""Plan a profile before spending device hours: every recipe of every asv class, validated on
``meta`` for the target device, with its predicted wall time and peak memory per rank.

``python -m benchmarks.dry_run --profile gpu [--gpus 1] [--memory 80GiB] [--flops bfloat16=350e12,...]``
(``make bench PROFILE=gpu DRY_RUN=1``).  Nothing trains and nothing is written (``--json PATH``
aside): each class's ``setup_cache`` runs with :data:`benchmarks.common.DRY_RUN` set, so the
benchmarks' own code builds the recipes and hands them here instead of training
(:func:`benchmarks.common.train_record`, :func:`~benchmarks.common.compare_record`, and the few
measurements that are not training runs), and :func:`impls.predict.predict` validates each one
against the target (:class:`impls.dist.Target`: a GPU's name, capability, count and memory stand in
for the device) and predicts its time at the stated rates.  A class is *over* when its runs'
predicted time exceeds its ``setup_cache.timeout`` (asv kills it there); a run is *over* when its
predicted peak per rank (a lower bound) exceeds the device's memory; an *invalid* recipe is one
``etbench run`` would refuse on the target.  Exit status 1 when any of them is found.

The profile is chosen at import (``ETBENCH_PROFILE``), so one process plans one profile.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
#: asv's default ``setup_cache`` timeout (seconds), for a class that sets none.
ASV_DEFAULT_TIMEOUT = 60.0
_SIZE_RE = re.compile(r"^\s*([0-9.]+(?:e[+-]?[0-9]+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.I)
_UNIT = {None: 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2 ** 10, "mib": 2 ** 20,
         "gib": 2 ** 30, "tib": 2 ** 40}


class BadInput(ValueError):
    pass


def parse_bytes(text: str) -> float:
    m = _SIZE_RE.match(text)
    if not m or not math.isfinite(float(m.group(1))) or float(m.group(1)) <= 0:
        raise BadInput(f"--memory {text!r} is not a size; give e.g. 80GiB, 80e9 or 24GB")
    return float(m.group(1)) * _UNIT[(m.group(2) or "").lower() or None]


def parse_rates(text: str, base):
    """``bfloat16=350e12,float32=40e12`` over ``base`` (:class:`impls.predict.Rates`)."""
    import dataclasses

    from impls.predict import DTYPES

    flops = dict(base.flops)
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in DTYPES:
            raise BadInput(f"--flops dtype {key!r} is unknown; valid: {', '.join(DTYPES)}")
        try:
            rate = float(value)
        except ValueError:
            rate = math.nan
        if not (math.isfinite(rate) and 1e6 <= rate <= 1e18):
            raise BadInput(f"--flops {key}={value!r} is not a rate in FLOP/s between 1e6 and 1e18 (e.g. {key}=350e12)")
        flops[key] = rate
    return dataclasses.replace(base, flops=flops)


@dataclass
class Item:
    """One planned piece of a class: a training run, a comparison or another measurement."""
    label: str
    kind: str  # train | compare | steps | timed | other
    seconds: float
    memory_bytes: float = 0.0
    nproc: int = 1
    detail: dict = field(default_factory=dict)
    error: str | None = None


class Planner:
    """What :data:`benchmarks.common.DRY_RUN` holds: collects the items of the class being planned."""

    def __init__(self, target, rates, shared: set | None = None):
        self.target, self.rates = target, rates
        self.items: list[Item] = []
        self.shared = set() if shared is None else shared  # keys of work done once per benchmark run

    def once(self, key: str, plan_it):
        """Plan ``plan_it()`` for the first class that needs ``key`` (work a later class finds done:
        a resumable sweep, a teacher's saved weights); later classes plan nothing for it."""
        if key in self.shared:
            return {"dry_run": True, "name": key, "planned_by": "an earlier class"}
        self.shared.add(key)
        return plan_it()

    # -- training runs
    def _predict(self, label: str, nproc: int, fields: dict, extra_steps: int = 0, steps: int | None = None):
        from impls.predict import predict
        from impls.recipe import Recipe

        from . import common

        if steps is not None:
            fields = {**fields, "steps": steps, "flops_budget": None}
        note = None
        data = str(fields.get("data", ""))
        if data.startswith("tokens:") and not Path(data[len("tokens:"):].split(",")[0]).exists():
            # a token file the benchmark writes before training (datacomp's zstd copy): nothing is
            # written in a dry run, so the recipe is validated on the profile's data it copies
            fields = {**fields, "data": common.PROFILE["data"]}
            note = f"data {data!r} is written by the benchmark at run time: validated with {fields['data']!r}"
        try:
            recipe = Recipe(**fields)
        except (TypeError, ValueError) as e:
            return None, f"{type(e).__name__}: {e}"
        p = predict(recipe, nproc, self.target, self.rates, extra_steps=extra_steps, label=label)
        if note:
            p.notes.append(note)
        return p, p.error

    def train(self, name: str, nproc: int, fields: dict) -> dict:
        p, error = self._predict(name, nproc, fields)
        self.items.append(_item(name, "train", p, nproc, error))
        return {"dry_run": True, "name": name}

    def compare(self, name: str, spec: dict, nproc: int) -> dict:
        """An interleaved comparison: each variant's warm-up and rounds × steps, plus its measured step."""
        rounds, steps, warmup = spec["rounds"], spec["steps"], spec["warmup"]
        for variant, overrides in spec["variants"].items():
            fields = {**spec["common"], **overrides}
            p, error = self._predict(f"{name}/{variant}", nproc, fields, steps=warmup + rounds * steps + 2)
            self.items.append(_item(f"{name}/{variant}", "compare", p, nproc, error))
        return {"dry_run": True, "name": name, "variants": {}}

    def steps(self, label: str, fields: dict, steps: int, nproc: int = 1) -> dict:
        """``steps`` steps of ``fields`` (a prepared session driven by the benchmark itself)."""
        p, error = self._predict(label, nproc, fields, steps=steps)
        self.items.append(_item(label, "steps", p, nproc, error))
        return {"dry_run": True, "name": label}

    def timed(self, label: str, fields: dict, timing: dict, methods: int) -> None:
        """An asv ``time_``/``peakmem_`` benchmark of one step per sample: per method, the warm-up
        and at most ``repeat``'s maximum samples, stopping after its time limit."""
        p, error = self._predict(label, 1, fields, steps=1)
        if p is not None and error is None:
            step = p.seconds - self.rates.run_overhead_s
            lo, hi, limit = timing["repeat"]
            per_method = timing["warmup_time"] + min(hi * step, max(limit, lo * step))
            p.seconds = self.rates.run_overhead_s + methods * timing.get("rounds", 1) * per_method
        self.items.append(_item(label, "timed", p, 1, error))

    def other(self, label: str, seconds: float, basis: str) -> None:
        """A measurement that is not a training run, with the basis of its time estimate."""
        self.items.append(Item(label, "other", seconds, detail=dict(basis=basis)))


def _item(label, kind, p, nproc, error) -> Item:
    if p is None:
        return Item(label, kind, 0.0, nproc=nproc, error=error)
    return Item(label, kind, p.seconds, p.memory_bytes, nproc,
                detail=dict(steps=p.steps, dtype=p.dtype, model_flops_per_step=p.model_flops_per_step,
                            memory_parts=p.memory_parts, notes=p.notes), error=error)


def benchmark_classes(module):
    """The asv classes of ``module`` that do work when run: a ``setup_cache``, or ``time_`` /
    ``peakmem_`` methods (asv's discovery: classes defined in the module)."""
    for name, cls in inspect.getmembers(module, inspect.isclass):
        if cls.__module__ != module.__name__:
            continue
        methods = [m for m in dir(cls) if m.startswith(("time_", "peakmem_", "track_"))]
        if methods or hasattr(cls, "setup_cache"):
            yield name, cls


def _grid(cls) -> list[tuple]:
    params = getattr(cls, "params", None)
    if params is None:
        return [()]
    if not (isinstance(params, tuple) or (params and isinstance(params[0], list))):
        params = (params,)
    out = [()]
    for values in params:
        out = [(*o, v) for o in out for v in values]
    return out


def plan(target, rates, memory_bytes: float, only: str | None = None) -> dict:
    """Plan every class of the current profile; returns the report (see :func:`main`)."""
    from impls import dist

    from . import common

    profile = common.profile_name()
    classes, shared = [], set()
    for path in sorted(BENCH_DIR.glob("bench_*.py")):
        module = importlib.import_module(f"benchmarks.{path.stem}")
        family = path.stem.removeprefix("bench_")
        for name, cls in benchmark_classes(module):
            label = f"{family}.{name}"
            if only and not re.search(only, label):
                continue
            planner = Planner(target, rates, shared)
            common.DRY_RUN = planner
            error = None
            try:
                with dist.planning_for(target):
                    if hasattr(cls, "setup_cache"):
                        cls().setup_cache()
                    if any(m.startswith(("time_", "peakmem_")) for m in dir(cls)):
                        methods = sum(m.startswith(("time_", "peakmem_")) for m in dir(cls))
                        for params in _grid(cls):
                            try:
                                cls().dry_run(*params, methods=methods)
                            except NotImplementedError:
                                pass
            except Exception as e:  # a benchmark's own code failing to plan is a finding, not a crash
                error = f"{type(e).__name__}: {e}"
            finally:
                common.DRY_RUN = None
            timeout = getattr(getattr(cls, "setup_cache", None), "timeout", None) or getattr(cls, "timeout", None)
            seconds = sum(i.seconds for i in planner.items)
            runs = [dict(label=i.label, kind=i.kind, seconds=i.seconds, memory_bytes=i.memory_bytes, nproc=i.nproc,
                         error=i.error, over_memory=i.error is None and i.memory_bytes > memory_bytes, **i.detail)
                    for i in planner.items]
            classes.append(dict(family=family, name=label, seconds=seconds,
                                timeout=float(timeout or ASV_DEFAULT_TIMEOUT) if hasattr(cls, "setup_cache") else None,
                                peak_memory_bytes=max([i.memory_bytes for i in planner.items] or [0.0]),
                                runs=runs, error=error))
    for c in classes:
        c["over_timeout"] = c["timeout"] is not None and c["seconds"] > c["timeout"]
    invalid = [(c["name"], r["label"], r["error"]) for c in classes for r in c["runs"] if r["error"]]
    invalid += [(c["name"], "(class)", c["error"]) for c in classes if c["error"]]
    families: dict[str, dict] = {}
    for c in classes:
        f = families.setdefault(c["family"], dict(seconds=0.0, peak_memory_bytes=0.0, runs=0))
        f["seconds"] += c["seconds"]
        f["peak_memory_bytes"] = max(f["peak_memory_bytes"], c["peak_memory_bytes"])
        f["runs"] += len(c["runs"])
    return dict(profile=profile, target=dict(type=target.type, name=target.name, count=target.count,
                                             capability=list(target.capability), memory_bytes=memory_bytes),
                rates=rates.describe(), total_seconds=sum(c["seconds"] for c in classes), families=families,
                classes=classes, invalid=invalid,
                over_memory=[(c["name"], r["label"], r["memory_bytes"]) for c in classes for r in c["runs"]
                             if r["over_memory"]],
                over_timeout=[(c["name"], c["seconds"], c["timeout"]) for c in classes if c["over_timeout"]])


def render(report: dict) -> str:
    from impls.measure.footprint import human

    t = report["target"]
    lines = [f"profile {report['profile']} on {t['count']} × {t['name']} ({human(t['memory_bytes'])} each): "
             f"predicted {report['total_seconds'] / 60:.1f} min in all",
             f"  rates: {report['rates']}",
             f"  {'family':<16}{'runs':>6}{'predicted':>12}{'peak/rank':>12}"]
    for name, f in sorted(report["families"].items()):
        lines.append(f"  {name:<16}{f['runs']:>6}{f['seconds'] / 60:>10.1f} m{human(f['peak_memory_bytes']):>12}")
    for cls, label, why in report["invalid"]:
        lines.append(f"INVALID {cls} {label}: {why}")
    for cls, label, mem in report["over_memory"]:
        lines.append(f"OVER MEMORY {cls} {label}: {human(mem)} per rank > {human(t['memory_bytes'])}")
    for cls, seconds, timeout in report["over_timeout"]:
        lines.append(f"OVER TIMEOUT {cls}: {seconds:.0f} s > setup_cache.timeout {timeout:.0f} s")
    ok = not (report["invalid"] or report["over_memory"] or report["over_timeout"])
    lines.append("dry run: every recipe valid, within memory and timeouts" if ok else "dry run: problems above")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dry_run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=os.environ.get("ETBENCH_PROFILE", "quick"),
                        help="quick, full or gpu (default: $ETBENCH_PROFILE or quick)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="the target's type (default: cpu for quick, cuda otherwise)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs on the target box (default 1)")
    parser.add_argument("--gpu-name", default="NVIDIA H100 80GB HBM3")
    parser.add_argument("--capability", default="9.0", help="CUDA compute capability of the target (9.0: Hopper)")
    parser.add_argument("--memory", default=None, help="memory per device (default: 80GiB on cuda, 24GiB on cpu)")
    parser.add_argument("--flops", default="", help="achieved FLOP/s per device by dtype, e.g. bfloat16=350e12,float32=40e12")
    parser.add_argument("--only", default=None, help="regex over family.Class names")
    parser.add_argument("--json", default=None, help="also write the report as JSON to this path")
    args = parser.parse_args(argv)
    try:
        if args.profile not in ("quick", "full", "gpu"):
            raise BadInput(f"--profile {args.profile!r} is unknown; valid: quick, full, gpu")
        device = args.device or ("cpu" if args.profile == "quick" else "cuda")
        if not 1 <= args.gpus <= 1024:
            raise BadInput(f"--gpus {args.gpus} is out of range; valid: 1..1024")
        cap = re.fullmatch(r"(\d+)\.(\d+)", args.capability)
        if not cap:
            raise BadInput(f"--capability {args.capability!r} is not MAJOR.MINOR (e.g. 9.0)")
        memory = parse_bytes(args.memory or ("80GiB" if device == "cuda" else "24GiB"))
        if args.only:
            try:
                re.compile(args.only)
            except re.error as e:
                raise BadInput(f"--only {args.only!r} is not a regular expression ({e})") from None
        if args.json:
            from impls.files import check_writable

            check_writable(args.json)
    except (BadInput, ValueError) as e:
        print(f"dry_run: {e}", file=sys.stderr)
        return 2
    os.environ["ETBENCH_PROFILE"] = args.profile
    if "benchmarks.common" in sys.modules and sys.modules["benchmarks.common"].profile_name() != args.profile:
        print("dry_run: benchmarks were imported for another profile in this process; run one process per profile",
              file=sys.stderr)
        return 2
    from impls import dist
    from impls.predict import DEFAULT_RATES

    try:
        rates = parse_rates(args.flops, DEFAULT_RATES[device])
    except BadInput as e:
        print(f"dry_run: {e}", file=sys.stderr)
        return 2
    target = dist.Target(type=device, count=args.gpus if device == "cuda" else (os.cpu_count() or 1),
                         capability=(int(cap.group(1)), int(cap.group(2))),
                         name=args.gpu_name if device == "cuda" else "CPU", memory_bytes=memory)
    t0 = time.perf_counter()
    report = plan(target, rates, memory, args.only)
    report["planning_seconds"] = time.perf_counter() - t0
    print(render(report))
    if args.json:
        from impls.files import write_text

        write_text(args.json, json.dumps(report, indent=1, default=str))
    return 1 if report["invalid"] or report["over_memory"] or report["over_timeout"] else 0


if __name__ == "__main__":
    sys.exit(main())
