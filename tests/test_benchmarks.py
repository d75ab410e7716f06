"""The asv suites are well-formed: every registered recipe is valid, and asv discovers them."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from impls import techniques, train

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # fairscale installs a top-level `benchmarks` package: ours first
for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
    del sys.modules[name]
bench_baseline = importlib.import_module("benchmarks.bench_baseline")
bench_optimizers = importlib.import_module("benchmarks.bench_optimizers")
bench_techniques = importlib.import_module("benchmarks.bench_techniques")
bench_mod = importlib.import_module("benchmarks.bench_mod")
bench_parallel = importlib.import_module("benchmarks.bench_parallel")


@pytest.mark.parametrize("variant", list(bench_techniques.VARIANTS))
def test_every_registered_technique_variant_is_a_valid_recipe(variant):
    specs, overrides = bench_techniques.VARIANTS[variant]
    recipe = train.Recipe(**bench_techniques._recipe(**overrides), techniques=specs,
                          flops_budget=bench_techniques.SETTINGS["flops_budget"])
    train.validate(recipe)  # raises ConfigError naming the problem
    for spec in specs:
        assert spec.split(":")[0] in techniques.REGISTRY


# Every recipe a suite hands to `etbench run`, as Recipe fields (a bad field name fails too).
SUITE_RECIPES = {
    **{f"baseline-{m}": dict(bench_baseline._recipe(m), flops_budget=bench_baseline.P["flops_budget"])
       for m in bench_baseline.MODELS},
    **{f"optimizer-{o}": bench_optimizers.optimizer_recipe(o) for o in bench_optimizers.OPTIMIZERS},
    **{f"largebatch-{o}-{b}": bench_optimizers.large_batch_recipe(o, b)
       for o in bench_optimizers.LR_SCALING for b in bench_optimizers.LB["batches"]},
}


@pytest.mark.parametrize("name", list(SUITE_RECIPES))
def test_every_suite_recipe_is_valid(name):
    train.validate(train.Recipe(**SUITE_RECIPES[name]))


def test_every_isoflop_variant_and_size_is_valid():
    from impls import isoflop

    settings = bench_mod.SETTINGS
    isoflop.plan_points(settings["budgets"], settings["variants"], isoflop.LADDER, bench_mod._RECIPE)
    isoflop.plan_points(settings["budgets"], settings["variants"], settings["flop_sizes"], bench_mod._RECIPE)


def test_every_interleaved_comparison_spec_is_valid():
    """The specs the speed classes hand to impls.compare parse (recipes and spec keys)."""
    from impls import compare

    common = importlib.import_module("benchmarks.common")
    techniques_spec = {name: dict(techniques=t, **o) for name, (t, o) in bench_techniques.VARIANTS.items()}
    optimizer_spec = {name: dict(bench_optimizers.optimizer_recipe(name), flops_budget=None)
                      for name in bench_optimizers.OPTIMIZERS}
    for variants, baseline, base in ((techniques_spec, "baseline", bench_techniques._recipe()),
                                     (optimizer_spec, "adamw", {})):
        spec = compare.parse_spec(dict(baseline=baseline, common=base, variants=variants, **common.PROFILE["interleave"]))
        for recipe in spec.recipes.values():
            train.validate(recipe)


def test_asv_discovers_every_suite(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "asv", "check", "--python=same", "--config",
                           str(REPO / "asv.conf.json")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Error" not in proc.stdout


def test_grids_do_not_depend_on_the_machine_and_unsupported_points_are_skipped(monkeypatch):
    """The baseline grid lists the profile's world sizes everywhere; a machine that cannot run one
    skips it in ``setup`` with NotImplementedError (asv's skip), with the reason."""
    common = bench_baseline.common  # the module the suite reads, whatever other tests imported since
    assert bench_baseline.BaselineTraining.params == (common.PROFILE["models"], common.PROFILE["world_sizes"])
    monkeypatch.setattr(common, "usable_world_sizes", lambda: [1])
    bench = bench_baseline.BaselineTraining()
    bench.setup({}, "nano", 1)
    with pytest.raises(NotImplementedError, match="world size 2 needs 2 devices"):
        bench.setup({}, "nano", 2)


def test_each_profile_has_its_own_asv_machine():
    makefile = (REPO / "Makefile").read_text()
    assert "ASV_MACHINE ?= $(shell hostname)-$(PROFILE)" in makefile
    asv_commands = [line for line in makefile.splitlines() if "$(ASV) run" in line or "$(ASV) machine" in line]
    assert len(asv_commands) == 4 and all("--machine $(ASV_MACHINE)" in line for line in asv_commands)


@pytest.mark.parametrize("world_size", bench_parallel.WORLD_SIZES)
def test_every_data_parallel_variant_is_valid_at_its_world_sizes(world_size, monkeypatch):
    """Every technique of the parallel family (both profiles' lists) validates at each world size
    of the grid, or is left out there for the reason the class gives (it needs several ranks)."""
    from impls import compare

    common = importlib.import_module("benchmarks.common")
    monkeypatch.setitem(bench_parallel.SETTINGS, "variants", list(bench_parallel.VARIANTS))
    variants = bench_parallel._variants(world_size)
    assert "ddp" in variants and "zero3" in variants
    left_out = set(bench_parallel.VARIANTS) - set(variants)
    assert left_out == (set(bench_parallel.NEEDS_RANKS) if world_size == 1 else set())
    spec = compare.parse_spec(dict(baseline="ddp", common=bench_parallel._common(), variants=variants,
                                   **common.PROFILE["interleave"]))
    for recipe in spec.recipes.values():
        train.validate(recipe, world_size)
    for name in left_out:  # refused at one rank, with the reason
        with pytest.raises(Exception, match="data-parallel size|dp=1|more than one|> 1"):
            train.validate(train.Recipe(**bench_parallel._common(), steps=1,
                                        techniques=bench_parallel.VARIANTS[name]), world_size)


@pytest.mark.parametrize("world_size", [2, 4])
def test_every_model_parallel_layout_is_valid_at_its_world_sizes(world_size, monkeypatch):
    """Every layout of the model-parallel family (both profiles' lists) validates at each world
    size it is listed for, and the quick grid times them in one comparison against DDP."""
    from impls import compare

    bench = importlib.import_module("benchmarks.bench_model_parallel")
    common = importlib.import_module("benchmarks.common")
    monkeypatch.setitem(bench.SETTINGS, "layouts", list(bench.LAYOUTS))
    layouts = bench._layouts(world_size)
    assert "ddp" in layouts and "tp" in layouts and "pp-1f1b" in layouts
    assert set(bench.LAYOUTS) - set(layouts) == ({n for n, w in bench.MIN_WORLD.items() if w > world_size})
    spec = compare.parse_spec(dict(baseline="ddp", common=bench._common(), variants=layouts,
                                   **common.PROFILE["interleave"]))
    for recipe in spec.recipes.values():
        train.validate(recipe, world_size)


def _suite_modules():
    import pkgutil

    import benchmarks

    return [importlib.import_module(f"benchmarks.{m.name}") for m in pkgutil.iter_modules(benchmarks.__path__)
            if m.name.startswith("bench_")]


def test_every_setup_cache_has_its_own_source_line():
    """asv keys a ``setup_cache`` result by the function's file and line: classes whose caches come
    from one function (made in a loop) would all get the first one's result."""
    seen = {}
    for module in _suite_modules():
        for name, cls in vars(module).items():
            fn = getattr(cls, "setup_cache", None) if isinstance(cls, type) else None
            if fn is None or cls.__module__ != module.__name__:
                continue
            key = (fn.__code__.co_filename, fn.__code__.co_firstlineno)
            assert key not in seen, f"{module.__name__}.{name} shares its setup_cache with {seen[key]}"
            seen[key] = f"{module.__name__}.{name}"


def test_base_classes_are_skipped_by_asv_and_their_suites_are_not():
    """The suites' base classes (``benchmarks.common.BudgetedRuns``, ``FlopSavingRuns``) are
    abstract, so asv does not benchmark them under ``common.*``: their tracks run only under each
    suite's name.  A suite class built on them must define its own ``setup_cache`` (asv keys a
    cache by its source line); without one it would stay abstract and asv would skip it silently."""
    import inspect

    for module in _suite_modules():
        bases = (module.common.BudgetedRuns, module.common.FlopSavingRuns)
        assert all(inspect.isabstract(base) for base in bases)
        for name, cls in vars(module).items():
            if isinstance(cls, type) and issubclass(cls, bases[0]):
                assert not inspect.isabstract(cls), f"{module.__name__}.{name} has no setup_cache of its own"
                assert cls.setup_cache.__module__ == module.__name__


@pytest.mark.parametrize("module", ["bench_seqlen", "bench_ltd", "bench_mae", "bench_tokendrop", "bench_actmem"])
def test_note_tracks_give_nan_not_none_for_a_run_without_the_technique(module):
    """asv counts a track_ returning None as a failed benchmark (and make bench fails): the
    baseline of a family has no technique notes, so its note tracks are n/a (NaN)."""
    import math

    suite = importlib.import_module(f"benchmarks.{module}")
    track = suite._note("counted_flops_saved", "ratio")
    assert math.isnan(track(None, {("baseline",): {"technique_notes": {}}}, "baseline"))


@pytest.mark.slow
def test_a_multi_rank_suite_run_is_the_cli_run_and_its_failure_is_one_line(tmp_path, monkeypatch):
    """Multi-rank points start their ranks from the benchmark process (common.launch_ranks, no
    launcher interpreter in between): the record is the one `etbench run --nproc 2` writes (same
    losses and counted FLOPs), and a rank's failure comes back as its one line."""
    import json
    import os

    common = importlib.import_module("benchmarks.common")
    monkeypatch.setenv("ETBENCH_RUNS_DIR", str(tmp_path / "runs"))
    common.runs_dir.cache_clear()
    fields = dict(model="nano", data="synthetic", batch_size=4, seq_len=32, lr=3e-3, steps=3, evaluations=2)
    try:
        suite = common.train_record("baseline-nano-ws2", nproc=2, **fields)
    finally:
        common.runs_dir.cache_clear()
    assert (tmp_path / "runs" / "baseline" / "baseline-nano-ws2.json").exists()
    from impls.recipe import Recipe, to_argv

    cli_out = tmp_path / "cli.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "impls.cli", "run", "--nproc", "2", "--out", str(cli_out),
                    *to_argv(Recipe(**common.with_precision(dict(fields, seed=0), "baseline")))],
                   cwd=REPO, env=env, check=True, capture_output=True)
    cli = json.loads(cli_out.read_text())
    assert suite["world_size"] == cli["world_size"] == 2
    assert suite["final_val_loss"] == cli["final_val_loss"]
    assert suite["flops_per_step"] == cli["flops_per_step"] and suite["steps"] == cli["steps"] == 3
    with pytest.raises(RuntimeError, match=r"on 2 ranks failed \(\d+\): etbench: error: .*seq_len 4096"):
        common.launch_ranks(["run", "--model", "nano", "--data", "synthetic", "--steps", "1", "--seq-len", "4096"],
                            2, "bad run")


def test_a_recipe_trained_by_one_family_is_reused_by_the_next_within_one_bench_run(tmp_path, monkeypatch):
    """Within one `make bench` (ETBENCH_BENCH_RUN), the same recipe, ranks and seeds train once:
    the second family's record is the first's, naming it; another invocation, or none, trains again."""
    common = importlib.import_module("benchmarks.common")
    monkeypatch.setenv("ETBENCH_RUNS_DIR", str(tmp_path / "runs"))
    common.runs_dir.cache_clear()
    trained = []

    def fake_train_one(out, nproc, recipe):
        trained.append(recipe)
        return dict(label="fake", final_val_loss=1.0 + len(trained), seed=recipe["seed"], recipe=recipe)

    monkeypatch.setattr(common, "_train_one", fake_train_one)
    fields = dict(model="nano", data="synthetic", batch_size=4, seq_len=32, lr=3e-3, flops_budget=1e9)
    try:
        monkeypatch.setenv(common.BENCH_RUN_ENV, "run-1")
        first = common.train_record("technique-baseline", **fields)
        second = common.train_record("quant-baseline", **dict(fields, evaluations=common.PROFILE["evaluations"]))
        other = common.train_record("quant-lr", **dict(fields, lr=1e-3))
        assert len(trained) == 2 and "reused_from" not in first
        assert second["final_val_loss"] == first["final_val_loss"]
        assert second["reused_from"] == "technique/technique-baseline.json"
        assert other["final_val_loss"] != first["final_val_loss"] and "reused_from" not in other
        assert not list((tmp_path / "runs").rglob(".reuse/*.json"))  # the report reads every *.json there
        monkeypatch.setenv(common.BENCH_RUN_ENV, "run-2")  # the next make bench measures again
        assert "reused_from" not in common.train_record("quant-baseline", **fields) and len(trained) == 3
        monkeypatch.delenv(common.BENCH_RUN_ENV)
        assert "reused_from" not in common.train_record("quant-baseline", **fields) and len(trained) == 4
    finally:
        common.runs_dir.cache_clear()


def test_a_baseline_point_whose_budget_leaves_one_timed_step_is_skipped_with_the_reason():
    """One timed step is not a measurement (its "interval" would be a point): the quick profile's
    small on 2 ranks buys 2 steps, and is skipped, not timed; every other point is trained."""
    if common_profile() != "quick":
        pytest.skip("the quick profile's grid")
    why = bench_baseline.too_few_steps("small", 2)
    assert why and "buys small 2 step(s) on 2 rank(s), fewer than 4" in why
    assert [(m, w) for m in bench_baseline.MODELS for w in bench_baseline.WORLD_SIZES
            if bench_baseline.too_few_steps(m, w)] == [("small", 2)]
    with pytest.raises(NotImplementedError, match="one timed step is not a measurement"):
        bench_baseline.BaselineTraining().setup({}, "small", 2)


def common_profile() -> str:
    return importlib.import_module("benchmarks.common").profile_name()


def test_the_short_curve_runs_time_two_steps_after_their_warm_up():
    from impls.recipe import Recipe

    assert bench_techniques.SHORT_RUN_STEPS - Recipe.timing_warmup == 2
