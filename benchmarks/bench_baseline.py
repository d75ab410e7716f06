"""The baseline family: a GPT trained with AdamW in fp32, over zoo sizes and rank counts.

Every technique is measured against these numbers.  asv's ``track_`` values are lower-is-better
(asv 0.6 has no switch), so throughput is tracked as seconds per million tokens; tokens/s and
MFU/HFU are in the run records, the plots and the summary table.
"""
from __future__ import annotations

from . import common

P = common.PROFILE
MODELS, WORLD_SIZES = P["models"], P["world_sizes"]
# The quick profile times micro (~50 ms a step on 2 cores): a fixed per-step cost weighs more
# there than on small, and 12 rounds of 6 steps take ~8 s instead of ~25 s for small's 2-step rounds.
OVERHEAD = {"quick": dict(model="micro", rounds=12, steps=6),
            "full": dict(model="small", rounds=20, steps=5),
            "gpu": dict(model="gpt2", rounds=20, steps=5)}[common.profile_name()]


def _recipe(model: str) -> dict:
    """The profile's recipe for ``model``, its sequence length capped at the model's block_size
    (the full profile's ``small`` holds 256 positions, gpt2 1024)."""
    from impls import zoo

    seq_len = min(P["seq_len"], zoo.config(model).block_size)
    return dict(model=model, data=P["data"], optimizer="adamw", lr=P["lr"][model],
                batch_size=P["batch_size"], seq_len=seq_len, device=P["device"])


def too_few_steps(model: str, world_size: int) -> str | None:
    """Why the budget does not measure ``model`` on ``world_size`` ranks (None if it does): the
    steps it buys (the global batch grows with the ranks) must leave two timed steps after the
    run's warm-up -- one timed step has no interval, and is not a measurement.  (The quick
    profile's ``small`` on 2 ranks: 2 steps.)"""
    from impls import zoo
    from impls.measure import model_flops_per_step
    from impls.recipe import Recipe

    fields = _recipe(model)
    meta = zoo.build(model, device="meta")
    steps = int(P["flops_budget"] // model_flops_per_step(meta, fields["batch_size"] * world_size, fields["seq_len"]))
    need = Recipe.timing_warmup + 2
    if steps >= need:
        return None
    return (f"the {P['flops_budget']:.3g}-FLOP budget buys {model} {steps} step(s) on {world_size} rank(s), fewer "
            f"than {need} ({Recipe.timing_warmup} warm-up + 2 timed): one timed step is not a measurement")


class BaselineTraining(common.BudgetedRuns):
    """One training run per (model, world size) to a fixed counted-FLOP budget."""

    params = (MODELS, WORLD_SIZES)
    param_names = ["model", "world_size"]

    def setup_cache(self):
        return {(m, w): common.train_record(f"baseline-{m}-ws{w}", nproc=w, flops_budget=P["flops_budget"],
                                            **_recipe(m))
                for m in MODELS for w in WORLD_SIZES
                if common.unsupported_world_size(w) is None and too_few_steps(m, w) is None}

    setup_cache.timeout = 3600

    def setup(self, records, model, world_size):
        why = common.unsupported_world_size(world_size) or too_few_steps(model, world_size)
        if why:
            raise NotImplementedError(why)


_STEP_SESSIONS: dict = {}  # model -> (session, batch), per benchmark process


@common.apply_timing
class BaselineStep:
    """One optimizer step of the single-rank baseline, timed by asv (setup excluded)."""

    params = MODELS
    param_names = ["model"]

    def setup(self, model):
        # asv re-runs setup before every sample: the session is built (and warmed up) once per
        # process, so the samples time successive steps of one run, as training does, instead of
        # rebuilding the model each time.
        if model not in _STEP_SESSIONS:
            from impls import train

            session = train.prepare(common.recipe(**_recipe(model), steps=1))
            batch = session.batches.get("train", 0)
            session.engine.train_step(*batch, 0)  # warm-up: allocator, thread pool, optimizer state
            _STEP_SESSIONS[model] = session, batch
        self.session, self.batch = _STEP_SESSIONS[model]

    def dry_run(self, model, methods: int):
        """What asv's sampling of this class's methods will cost (benchmarks.dry_run)."""
        common.dry_run().timed(f"baseline-step-{model}", common.with_precision(_recipe(model)), common.PROFILE["timing"],
                               methods)

    def time_train_step(self, model):
        self.session.engine.train_step(*self.batch, 0)

    def peakmem_train_step(self, model):
        # Process peak RSS: dominated by `import torch` for small models; the exact per-component
        # bytes are the BaselineTraining.track_*_bytes benchmarks.
        self.session.engine.train_step(*self.batch, 0)


class HarnessOverhead:
    """The training loop's per-step cost over a bare ``zero_grad / forward / backward / step``
    loop of the same model, optimizer and batches, timed interleaved (impls.compare): the harness
    must cost under 1% of a step.  The model is the profile's smallest with steps long enough to
    time (a fixed per-step cost weighs most there)."""

    params = [OVERHEAD["model"]]
    param_names = ["model"]

    def setup_cache(self):
        from impls import compare
        from impls.files import write_text

        if common.dry_run():  # bare and harness loops, interleaved: 2 × rounds × steps
            return common.dry_run().steps("harness-overhead", common.with_precision(_recipe(OVERHEAD["model"])),
                                          2 * OVERHEAD["rounds"] * OVERHEAD["steps"] + 2)
        record = compare.harness_overhead(common.recipe(**_recipe(OVERHEAD["model"]), steps=1),
                                          rounds=OVERHEAD["rounds"], steps=OVERHEAD["steps"])
        import json

        out = common.runs_dir() / "overhead" / "harness-overhead.json"
        write_text(out, json.dumps(record, indent=1))
        return json.loads(out.read_text())

    setup_cache.timeout = 1800

    def track_overhead_percent(self, record, model):
        """(loop − bare) / bare, median over rounds, in percent (target: < 1)."""
        return 100 * record["overhead"]["value"]

    track_overhead_percent.unit = "%"

    def track_overhead_ci95_high_percent(self, record, model):
        """The upper end of its 95% interval: the claim "< 1%" holds when this is below 1."""
        return 100 * record["overhead"]["ci95"][1]

    track_overhead_ci95_high_percent.unit = "%"
