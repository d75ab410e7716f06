"""Conditional-computation family: isoFLOP curves of the baseline vs Mixture-of-Depths (Raposo et
al. 2024), its random-routing control, Mixture-of-Experts and MoDE (staged, integrated), fits,
the step time of each variant's isoFLOP-optimal model, and the routing-decision figure.

The sweep lives in ``results/isoflop/<commit>-<profile>/`` (resumable: an interrupted benchmark
run continues where it stopped) with its plots; asv tracks the fitted minimum loss and optimal
size per (variant, budget), so a regression in a technique shows across commits.
"""
from __future__ import annotations

import json
import math

from . import common

SETTINGS = {
    # Each budget's sizes start at Chinchilla's N = sqrt(C/120) and widen until every variant's
    # minimum is inside (isoflop.adaptive_sweep); >= 2 layers, so every size has a routed block.
    # workers: points trained side by side (the quick sizes are too small to use two cores each).
    # The quick sweep is the smallest that still fits a parabola per budget (3 sizes, widened
    # where a minimum sits at an edge) over two budgets, and four of the six variants (the random
    # router control and staged MoDE are in the full profile): it must leave make bench's 600 s
    # to the other families.
    "quick": dict(budgets=[4e9, 1.2e10], n_sizes=3, workers=2, flop_sizes=["L2-D16", "L2-D32", "L2-D64"],
                  variants=["baseline", "mod", "moe", "mode-integrated"],
                  data="synthetic", batch_size=16, seq_len=64, lr=3e-3, causal_steps=100, causal_size="L4-D96"),
    "full": dict(budgets=[1e12, 3e12, 1e13], n_sizes=5, workers=1, flop_sizes=["L4-D128", "L8-D256", "L12-D384"],
                 variants=["baseline", "mod", "mod-random", "moe", "mode-staged", "mode-integrated"],
                 data="pycode", batch_size=32, seq_len=128, lr=1e-3, causal_steps=3000, causal_size="L8-D256"),
    # gpu: the sweep's sizes (isoflop's ladder, block_size 128) are tiny for a GPU, so a step is
    # launch-bound (~ms): budgets where a point is ~1-4k steps keep the sweep within ~20 min.
    "gpu": dict(budgets=[1e13, 3e13], n_sizes=3, workers=1, flop_sizes=["L4-D128", "L8-D256", "L12-D384"],
                variants=["baseline", "mod", "mod-random", "moe", "mode-staged", "mode-integrated"],
                data="pycode", batch_size=64, seq_len=128, lr=1e-3, causal_steps=1000, causal_size="L8-D256"),
}[common.profile_name()]
_RECIPE = {**{k: SETTINGS[k] for k in ("data", "batch_size", "seq_len", "lr")},
           "evaluations": common.PROFILE["evaluations"]}


def _sweep_dir():
    return common.REPO / "results" / "isoflop" / f"{common.runs_dir().name}-{common.profile_name()}"


def _routing_and_causal_sampling(out_dir) -> dict:
    """Train one MoD model with the causal predictor (paper §3.5), then: Figure 5 (which tokens
    each block processes, for one sequence) and the validation loss when routing autoregressively
    by the predictor's decisions vs by top-k over the whole sequence, with predictor accuracy."""
    import torch

    from impls import isoflop, train
    from impls.files import write_text
    from impls.techniques import mod

    size = isoflop.parse_size(SETTINGS["causal_size"])
    steps = SETTINGS["causal_steps"]
    session = train.prepare(common.recipe(**_RECIPE, model=size.model, model_args=dict(size.model_args),
                                          techniques=["mod:causal=predictor"], steps=steps))
    for step in range(steps):
        session.engine.train_step(*session.batches.get("train", step), step)
    val = [session.batches.get("val", i) for i in range(4)]
    result = mod.evaluate_autoregressive(session.model, val)
    session.model.eval()
    with torch.no_grad():
        session.model(val[0][0])
    result["predictor_accuracy"] = mod.summary(session.model)["predictor_accuracy"]
    result.update(size=size.name, steps=steps)
    write_text(out_dir / "causal_sampling.json", json.dumps(result, indent=1))
    decisions = mod.routing_decisions(session.model, val[0][0][0]).numpy()
    isoflop.write_figure(out_dir / "routing.png", isoflop.plot_routing(
        decisions, title=f"MoD routing decisions per block ({size.name}, 12.5% capacity, every other block)"))
    return result


def _plan_sweep() -> dict:
    """The dry run of :func:`_sweep_results` (benchmarks.dry_run): every point of the starting
    grids trained to its budget (widening adds points only where a minimum sits at an edge), the
    causal-predictor run, and each budget's interleaved step times at the grid's middle size."""
    from impls import data, isoflop

    planner = common.dry_run()
    variants = isoflop.resolve_variants(SETTINGS["variants"])
    vocab = data.load(_RECIPE["data"]).vocab_size
    grids = {b: isoflop.grid_for_budget(b, vocab, SETTINGS["n_sizes"]) for b in SETTINGS["budgets"]}
    for point in isoflop.plan_points(SETTINGS["budgets"], variants, sorted({s for g in grids.values() for s in g}),
                                     _RECIPE):
        if point.size.name in grids[point.budget]:  # the sweep's points train as isoflop plans them
            planner.train(f"isoflop-{point.variant}-{point.size.name}-{point.budget:.0e}", 1,
                          {**_RECIPE, "model": point.recipe.model, "model_args": dict(point.recipe.model_args),
                           "techniques": list(point.recipe.techniques), "flops_budget": point.budget})
    size = isoflop.parse_size(SETTINGS["causal_size"])
    planner.steps("mod-causal-predictor", common.with_precision(
        {**_RECIPE, "model": size.model, "model_args": dict(size.model_args), "techniques": ["mod:causal=predictor"]}),
        SETTINGS["causal_steps"])
    for budget, sizes in grids.items():
        middle = isoflop.parse_size(sizes[len(sizes) // 2])
        common.compare_record("isoflop", {v: dict(model=middle.model, model_args=dict(middle.model_args), techniques=t)
                                          for v, t in variants.items()}, common=_RECIPE, name=f"isoflop-{budget:.0e}")
    return {"dry_run": True, "causal": {}}


def _sweep_results() -> dict:
    """Run (or resume) the adaptive sweep, fit and plot it; the routing figure once per sweep directory."""
    from impls import isoflop

    if common.dry_run():  # resumable: the first class trains the sweep, the next one reads it
        return common.dry_run().once("mod-sweep", _plan_sweep)
    out_dir = _sweep_dir()
    points, grids = isoflop.adaptive_sweep(out_dir, SETTINGS["budgets"], SETTINGS["variants"],
                                           n_sizes=SETTINGS["n_sizes"], workers=SETTINGS["workers"],
                                           progress=False, **_RECIPE)
    tables = isoflop.analyse(points, out_dir)
    causal_file = out_dir / "causal_sampling.json"
    causal = json.loads(causal_file.read_text()) if causal_file.exists() else _routing_and_causal_sampling(out_dir)
    fits = tables["fits"].set_index(["variant", "budget"])
    done = points[points["status"] == "ok"]
    return dict(fits=fits.to_dict("index"), grids=grids,
                best=done.groupby(["variant", "budget"])["final_val_loss"].min().to_dict(),
                step_time=_optimal_step_times(tables["fits"]), causal=causal)


def _optimal_step_times(fits) -> dict:
    """Per budget, every variant's isoFLOP-optimal model (the trained size nearest N*) timed
    interleaved with the baseline's (impls.compare): (variant, budget) -> speed-up record.
    Same batch and sequence length, so a step of each holds the same tokens."""
    from impls import isoflop

    out = {}
    for budget, group in fits.dropna(subset=["nearest_size"]).groupby("budget"):
        chosen = dict(zip(group["variant"], group["nearest_size"]))
        if "baseline" not in chosen:
            continue
        variants = {}
        for variant, size_name in chosen.items():
            size = isoflop.parse_size(size_name)
            variants[variant] = dict(model=size.model, model_args=dict(size.model_args),
                                     techniques=isoflop.VARIANTS[variant])
        record = common.compare_record("isoflop", variants, common=_RECIPE, name=f"isoflop-{budget:.0e}")
        for variant, v in record["variants"].items():
            out[variant, budget] = dict(size=chosen[variant], speedup=v["speedup"])
    return out


def _flops_per_token() -> dict:
    """Counted training FLOPs per token of each variant at the fixed sizes (no training)."""
    from impls import isoflop, train

    out = {}
    for variant in SETTINGS["variants"]:
        for name in SETTINGS["flop_sizes"]:
            size = isoflop.parse_size(name)
            fields = dict(_RECIPE, model=size.model, model_args=dict(size.model_args),
                          techniques=isoflop.VARIANTS[variant])
            if common.dry_run():  # a counted-FLOP pass and an activation pass
                common.dry_run().steps(f"flops-{variant}-{name}", common.with_precision(fields), 2)
                continue
            session = train.prepare(common.recipe(**fields, steps=1))
            cost = train.measure_step(session)
            out[variant, name] = cost.flops_per_step / cost.tokens_per_step
    return out


class MoDIsoFLOP:
    """isoFLOP sweep of the variants; tracks per (variant, budget)."""

    params = (SETTINGS["variants"], SETTINGS["budgets"])
    param_names = ["variant", "budget"]

    def setup_cache(self):
        return _sweep_results()

    setup_cache.timeout = 3600

    def track_min_loss_fitted(self, cache, variant, budget):
        """The parabola's minimum loss (NaN where the fit has no interior minimum)."""
        fit = cache["fits"].get((variant, budget), {})
        return fit.get("loss_opt", math.nan) if fit.get("status") == "ok" else math.nan

    track_min_loss_fitted.unit = "nats/token"

    def track_min_loss_measured(self, cache, variant, budget):
        return cache["best"][variant, budget]

    track_min_loss_measured.unit = "nats/token"

    def track_optimal_params(self, cache, variant, budget):
        fit = cache["fits"].get((variant, budget), {})
        return fit.get("n_opt", math.nan) if fit.get("status") == "ok" else math.nan

    track_optimal_params.unit = "parameters"

    def track_optimal_step_time_vs_baseline(self, cache, variant, budget):
        """Seconds per step of the variant's isoFLOP-optimal model ÷ the baseline's, timed
        interleaved (median over rounds; the interval is in compare-isoflop-*.json)."""
        timed = cache["step_time"].get((variant, budget))
        return 1.0 / timed["speedup"]["value"] if timed else math.nan

    track_optimal_step_time_vs_baseline.unit = "ratio"


class MoDForwardFLOPs:
    """Counted training FLOPs per token of each variant at fixed sizes (MoD: ~0.56× of the blocks)."""

    params = (SETTINGS["variants"], SETTINGS["flop_sizes"])
    param_names = ["variant", "size"]

    def setup_cache(self):
        return _flops_per_token()

    setup_cache.timeout = 1800

    def track_flops_per_token(self, cache, variant, size):
        return cache[variant, size]

    track_flops_per_token.unit = "FLOPs/token"


class MoDCausalSampling:
    """Autoregressive sampling with the causal predictor (paper §3.5: ~99% accurate)."""

    def setup_cache(self):
        return _sweep_results()["causal"]

    setup_cache.timeout = 3600

    def track_predictor_error(self, causal):
        return 1.0 - causal["predictor_accuracy"]

    track_predictor_error.unit = "fraction"

    def track_autoregressive_loss_gap(self, causal):
        """Validation loss routing causally by the predictor minus routing by top-k."""
        return causal["autoregressive"] - causal["topk"]

    track_autoregressive_loss_gap.unit = "nats/token"
