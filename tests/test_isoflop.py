"""IsoFLOP sweeps (impls/isoflop.py): the fits recover known optima and exponents; a tiny real sweep
produces the tidy table, resumes without retraining, refuses a mismatched directory, records
too-small budgets as skipped; bad input fails before any work; plots are written."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from impls import isoflop, train
from impls.errors import ConfigError

# --------------------------------------------------------------------------- fits (no training)


def _parabola_points(n_opt, loss_opt, curvature, budget, variant="baseline", noise=0.0, seed=0, n=7):
    rng = np.random.default_rng(seed)
    log_n = np.linspace(math.log(n_opt) - 1.5, math.log(n_opt) + 1.5, n)
    loss = loss_opt + curvature * (log_n - math.log(n_opt)) ** 2 + rng.normal(0, noise, n)
    return pd.DataFrame(dict(variant=variant, budget=budget, size=[f"s{i}" for i in range(n)],
                             params=np.exp(log_n), final_val_loss=loss, seconds_per_step=np.exp(log_n) * 1e-6,
                             status="ok"))


def test_fit_recovers_exact_and_noisy_optimum():
    exact = isoflop.fit_isoflop(_parabola_points(2e5, 3.0, 0.2, 1e10)).iloc[0]
    assert exact["status"] == "ok"
    assert exact["n_opt"] == pytest.approx(2e5, rel=1e-6)
    assert exact["loss_opt"] == pytest.approx(3.0, abs=1e-9)
    assert exact["nearest_size"] == "s3"  # the grid's middle point sits on the optimum

    noisy = isoflop.fit_isoflop(_parabola_points(2e5, 3.0, 0.2, 1e10, noise=0.01, seed=1, n=9)).iloc[0]
    assert noisy["status"] == "ok"
    assert 0 < noisy["log_n_opt_se"] < 0.5  # delta-method standard error, in ln N
    # The truth lies within 3 standard errors, and the interval brackets the estimate.
    assert abs(noisy["log_n_opt"] - math.log(2e5)) < 3 * noisy["log_n_opt_se"]
    assert noisy["n_opt_lo"] < noisy["n_opt"] < noisy["n_opt_hi"]
    assert abs(noisy["loss_opt"] - 3.0) < 3 * noisy["loss_opt_se"] + 1e-3


def test_fit_near_minimum_ignores_far_walls():
    points = _parabola_points(2e5, 3.0, 0.2, 1e10, n=9)
    far = points["params"] > 2e5 * math.exp(1.0)
    points.loc[far, "final_val_loss"] += 5.0  # the far wall rises much faster than a parabola
    assert isoflop.fit_isoflop(points).iloc[0]["n_opt"] != pytest.approx(2e5, rel=0.05)
    fit = isoflop.fit_isoflop(points, near_min=5).iloc[0]
    assert fit["n_sizes"] == 5 and fit["n_opt"] == pytest.approx(2e5, rel=1e-6)
    with pytest.raises(ConfigError):
        isoflop.fit_isoflop(points, near_min=2)


def test_fit_flags_no_minimum_unfit_and_extrapolation():
    frames = [
        _parabola_points(2e5, 3.0, -0.2, 1e10),  # concave: no interior minimum
        _parabola_points(2e5, 3.0, 0.2, 3e10).iloc[:2],  # two sizes: unfit
        _parabola_points(2e5, 3.0, 0.2, 1e11).iloc[:3],  # optimum beyond the largest sampled size
    ]
    fits = isoflop.fit_isoflop(pd.concat(frames)).set_index("budget")
    assert fits.loc[1e10, "status"].startswith("no interior minimum")
    assert math.isnan(fits.loc[1e10, "n_opt"])
    assert fits.loc[3e10, "status"] == "unfit: < 3 sizes"
    assert fits.loc[1e11, "status"] == "optimum outside sampled sizes"
    assert math.isnan(fits.loc[1e11, "log_n_opt_se"])  # 3 points fit exactly: no uncertainty


def test_power_law_recovers_exponent():
    budgets = np.array([1e9, 1e10, 1e11, 1e12])
    truth = 3.0 * budgets ** 0.49
    e, k, se = isoflop.fit_power_law(list(zip(budgets, truth)))
    assert e == pytest.approx(0.49) and k == pytest.approx(3.0) and se == pytest.approx(0, abs=1e-8)
    noisy = truth * np.exp(np.random.default_rng(0).normal(0, 0.05, 4))
    e, k, se = isoflop.fit_power_law(pd.DataFrame(dict(budget=budgets, n_opt=noisy)))
    assert abs(e - 0.49) < 3 * se + 1e-9 and se > 0
    e, _, se = isoflop.fit_power_law([(1e9, 10.0), (1e10, 100.0)])
    assert e == pytest.approx(1.0) and math.isnan(se)
    with pytest.raises(ConfigError, match=">= 2 distinct budgets"):
        isoflop.fit_power_law([(1e9, 10.0)])
    # Per variant, from fits with an interior optimum only.
    points = pd.concat([_parabola_points(3.0 * b ** 0.5, 3.0, 0.2, b) for b in budgets])
    laws = isoflop.power_laws(isoflop.fit_isoflop(points))
    assert laws.iloc[0]["exponent"] == pytest.approx(0.5, abs=1e-6) and laws.iloc[0]["n_budgets"] == 4


def test_size_grammar():
    size = isoflop.parse_size("L3-D96")
    assert size.model == "nano" and size.model_args == dict(n_layer=3, d_model=96, n_head=3)
    assert isoflop.parse_size("L2-D64-H4").model_args["n_head"] == 4
    assert isoflop.parse_size("micro").model == "micro"
    for bad in ("L2D64", "X2-D64", "L0-D64", "L2-D60-H8", ""):
        with pytest.raises(ConfigError) as e:
            isoflop.parse_size(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"L<n_layer>-D<d_model>"):
        isoflop.parse_size("L2D64")


def test_routing_plot(tmp_path):
    decisions = np.random.default_rng(0).random((4, 64)) < 0.125
    path = isoflop.write_figure(tmp_path / "routing.png", isoflop.plot_routing(decisions))
    assert path.stat().st_size > 5000
    with pytest.raises(ConfigError):
        isoflop.plot_routing(np.zeros(5))


# --------------------------------------------------------------------------- a tiny real sweep

# Counted FLOPs per step (synthetic data, vocab 64, 8×64 tokens): L1-D16 ~2e7, L1-D32 ~6e7,
# L2-D48 ~2.2e8 -> skipped at the 1.5e8 budget.
BUDGETS = [1.5e8, 4e8]
SIZES = ["L1-D16", "L1-D32", "L2-D48"]
VARIANTS = {"baseline": [], "local": ["attention:kind=local,window=16"]}
BASE = dict(data="synthetic", batch_size=8, seq_len=64, lr=3e-3, eval_batches=1, eval_every=1000)


class Interrupt(BaseException):
    """Stands in for a kill (KeyboardInterrupt / SIGTERM) mid-sweep."""


class CountingRunner:
    def __init__(self, fail_at: int | None = None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, recipe):
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise Interrupt
        self.calls.append((recipe.techniques, recipe.model_args, recipe.flops_budget, recipe.steps))
        return train.run(recipe)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("isoflop")
    first = CountingRunner(fail_at=3)
    with pytest.raises(Interrupt):
        isoflop.sweep(out, BUDGETS, VARIANTS, SIZES, runner=first, progress=False, **BASE)
    kept = pd.read_csv(out / "points.csv")
    second = CountingRunner()
    points = isoflop.sweep(out, BUDGETS, VARIANTS, SIZES, runner=second, progress=False, **BASE)
    return out, first, kept, second, points


def test_sweep_table_and_skipped(swept):
    out, _, _, _, points = swept
    assert len(points) == 12
    assert set(isoflop.POINT_COLUMNS) <= set(points.columns)
    skipped = points[points["status"] != "ok"]
    assert set(skipped["size"]) == {"L2-D48"} and set(skipped["budget"]) == {1.5e8}
    assert (skipped["status"] == isoflop.SKIPPED).all() and (skipped["steps"] == 0).all()
    ok = points[points["status"] == "ok"]
    assert len(ok) == 10 and ok["final_val_loss"].notna().all() and (ok["steps"] >= 1).all()
    assert (ok["tokens"] == ok["steps"] * 8 * 64).all()
    assert (ok["steps"] * ok["flops_per_step"] <= ok["budget"]).all()
    assert points["dataset_hash"].nunique() == 1
    # Skipped rows still know their size (vocab from the data, like the trained ones).
    by_size = points.groupby("size")["params"].nunique()
    assert (by_size == 1).all()
    for rel in ok["record"]:
        record = json.loads((out / rel).read_text())
        assert record["recipe"]["flops_budget"] in BUDGETS
    assert pd.read_csv(out / "points.csv").shape[0] == 12


def test_sweep_resumes_without_redoing_points(swept, tmp_path):
    out, first, kept, second, _ = swept
    assert len(first.calls) == 3  # interrupted during the 4th training
    # Points finished before the interruption were saved and not redone: the 2 skipped ones
    # (budget < one step: settled before any training) and the 3 trained.
    assert len(kept) == 2 + 3 and (kept["status"] != "ok").sum() == 2
    assert not set(map(str, first.calls)) & set(map(str, second.calls))
    assert len(first.calls) + len(second.calls) == 10  # every trainable point trained exactly once
    third = CountingRunner()
    again = isoflop.sweep(out, BUDGETS, VARIANTS, SIZES, runner=third, progress=False, **BASE)
    assert third.calls == [] and len(again) == 12
    # Killed after a run's record was written but before points.csv: the record is reused.
    table = pd.read_csv(out / "points.csv")
    table.iloc[:-1].to_csv(out / "points.csv", index=False)
    isoflop.sweep(out, BUDGETS, VARIANTS, SIZES, runner=third, progress=False, **BASE)
    assert third.calls == [] and pd.read_csv(out / "points.csv").shape[0] == 12
    # A subset of the grid is served from the same directory without training.
    subset = isoflop.sweep(out, BUDGETS[:1], {"baseline": []}, SIZES[:2], runner=third, progress=False, **BASE)
    assert third.calls == [] and len(subset) == 2


def test_sweep_refuses_mismatched_directory(swept):
    out = swept[0]
    runner = CountingRunner()
    with pytest.raises(ConfigError) as e:
        isoflop.sweep(out, BUDGETS, VARIANTS, SIZES, runner=runner, progress=False, **{**BASE, "lr": 1e-3})
    assert "different base recipe" in str(e.value) and "lr" in str(e.value) and "\n" not in str(e.value)
    assert runner.calls == []


def test_analysis_writes_tables_and_plots(swept):
    out, *_, points = swept
    tables = isoflop.analyse(points, out)
    fits = pd.read_csv(out / "fits.csv")
    assert len(fits) == 4 and set(fits["variant"]) == {"baseline", "local"}
    assert (fits[fits["budget"] == 1.5e8]["status"] == "unfit: < 3 sizes").all()
    assert (pd.read_csv(out / "power_law.csv")["variant"] == ["baseline", "local"]).all()
    steps = tables["step_time"]
    assert (steps[steps["variant"] == "baseline"]["step_time_vs_baseline"] == 1).all()
    for name in ("isoflop.png", "loss_vs_flops.png", "step_time.png"):
        assert (out / name).stat().st_size > 10_000, name
    # Re-timing the optimal models together: fixed-length runs, one per (variant, budget) and round.
    runner = CountingRunner()
    retimed = isoflop.retime(steps, VARIANTS, steps=4, repeats=1, runner=runner, **BASE)
    # one run per distinct (variant, optimal size): a size optimal at both budgets is timed once
    assert len(runner.calls) == len(steps[["variant", "nearest_size"]].drop_duplicates()) >= 2
    assert (retimed["retimed_seconds_per_step"] > 0).all()
    assert (retimed[retimed["variant"] == "baseline"]["retimed_vs_baseline"] == 1).all()


@pytest.mark.parametrize("argv, message", [
    (["--variants", "baseline,nope"], "unknown variant 'nope'; known: baseline"),
    (["--sizes", "L2-D64,big"], "bad size spec 'big'"),
    (["--budgets", ","], "no FLOP budgets"),
    (["--budgets", "1e9,abc"], "bad --budgets"),
    (["--budgets", "-1"], "must be finite and > 0"),
    (["--seq-len", "512"], "exceeds size"),
    (["--retime", "1"], "--retime must be >= 3"),
])
def test_bad_input_fails_before_work(tmp_path, capsys, monkeypatch, argv, message):
    def no_training(*a, **k):
        raise AssertionError("trained despite bad input")

    monkeypatch.setattr(train, "run", no_training)
    args = ["--budgets", "1e9", "--sizes", "L1-D16", "--out", str(tmp_path / "out")]
    # later flags win in argparse
    assert isoflop.main(args + argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "out" / "points.csv").exists()


def test_unknown_technique_in_variant_fails_before_work(tmp_path):
    runner = CountingRunner()
    with pytest.raises(ConfigError, match="unknown technique 'nope'"):
        isoflop.sweep(tmp_path, BUDGETS, {"baseline": [], "x": ["nope"]}, SIZES, runner=runner,
                      progress=False, **BASE)
    with pytest.raises(ConfigError, match="base recipe may not set model_args"):
        isoflop.sweep(tmp_path, BUDGETS, VARIANTS, SIZES, runner=runner, progress=False,
                      model_args={"n_layer": 3}, **BASE)
    assert runner.calls == [] and not list(tmp_path.iterdir())


def test_subprocess_runner(tmp_path):
    """--isolate: each point trains in its own process and its record lands in the sweep."""
    points = isoflop.sweep(tmp_path, [1.5e8], {"baseline": []}, ["L1-D16"], runner=isoflop.subprocess_runner,
                           progress=False, **BASE)
    assert points.iloc[0]["status"] == "ok" and points.iloc[0]["steps"] >= 5
    assert json.loads((tmp_path / points.iloc[0]["record"]).read_text())["recipe"]["flops_budget"] == 1.5e8


def test_budget_driven_grid_starts_at_chinchilla_and_widens_toward_the_edge_minimum():
    import pandas as pd

    assert isoflop.chinchilla_params(1.08e11) == pytest.approx(3e4)
    ladder = isoflop.LADDER
    params = [isoflop.size_params(s, 64) for s in ladder]
    assert params == sorted(params)  # the ladder grows
    for budget in (1e10, 1e12, 1e14):
        grid = isoflop.grid_for_budget(budget, 64, 5)
        assert len(grid) == 5 and grid == list(ladder[ladder.index(grid[0]):ladder.index(grid[0]) + 5])
        logs = [math.log(isoflop.size_params(s, 64)) for s in grid]
        assert logs[0] <= math.log(isoflop.chinchilla_params(budget)) <= logs[-1] or grid[0] == ladder[0]
    with pytest.raises(ConfigError, match="needs 3 to"):
        isoflop.grid_for_budget(1e10, 64, 2)

    three = ["L2-D16", "L2-D24", "L2-D32"]
    grids = {(b, v): list(three) for b in (1e10, 3e10) for v in ("a", "b")}

    def points(losses):
        return pd.DataFrame([dict(variant=v, budget=b, size=s, final_val_loss=l, status="ok")
                             for (v, b), row in losses.items() for s, l in zip(three, row)])

    interior = points({("a", 1e10): [2.0, 1.5, 2.0], ("b", 1e10): [2.0, 1.9, 2.0],
                       ("a", 3e10): [2.0, 1.5, 1.9], ("b", 3e10): [2.0, 1.5, 1.6]})
    assert isoflop.widen(interior, grids) == grids
    edges = points({("a", 1e10): [1.0, 1.5, 2.0], ("b", 1e10): [2.0, 1.5, 2.0],   # a: minimum at the small edge
                    ("a", 3e10): [2.0, 1.5, 1.0], ("b", 3e10): [1.0, 1.5, 2.0]})  # a: large edge, b: small
    wider = isoflop.widen(edges, grids)
    assert wider[1e10, "a"] == ["L2-D8", *three] and wider[1e10, "b"] == three  # per variant: b keeps its grid
    assert wider[3e10, "a"] == [*three, "L2-D48"] and wider[3e10, "b"] == ["L2-D8", *three]
    at_end = {(1e10, "a"): ["L2-D4", "L2-D8", "L2-D16"]}  # nothing below the ladder's first size
    assert isoflop.widen(pd.DataFrame([dict(variant="a", budget=1e10, size=s, final_val_loss=l, status="ok")
                                       for s, l in zip(at_end[1e10, "a"], [1.0, 2.0, 3.0])]), at_end) == at_end


def test_adaptive_sweep_widens_until_the_minimum_is_inside(tmp_path, monkeypatch):
    """A fake runner whose loss is lowest at L2-D48: the sweep starts around Chinchilla's guess
    for 1e10 FLOPs (~9K parameters, far below) and widens to the right until D48 is interior."""
    best = math.log(isoflop.size_params("L2-D48", 64))

    def runner(recipe):
        n = isoflop.size_params(f"L{recipe.model_args['n_layer']}-D{recipe.model_args['d_model']}", 64)
        return dict(final_val_loss=1.0 + (math.log(n) - best) ** 2, params=n, matmul_params=n, steps=1,
                    tokens_per_step=1, seconds_per_step=0.01, flops_per_step=1.0, dataset=dict(hash=data_hash))

    from impls import data

    data_hash = data.load("synthetic").content_hash
    points, grids = isoflop.adaptive_sweep(tmp_path, [1e10], ["baseline", "mod"], n_sizes=3, max_widenings=4,
                                           progress=False, runner=runner, data="synthetic", seq_len=16,
                                           batch_size=1)
    for variant in ("baseline", "mod"):
        sizes = grids[1e10, variant]
        assert "L2-D48" in sizes and sizes[-1] != "L2-D48" and sizes[0] == "L2-D8"
        assert sorted(points[points["variant"] == variant]["size"], key=isoflop.LADDER.index) == sizes


def test_sweep_trains_points_side_by_side_in_worker_processes(tmp_path):
    """workers=2: points train in two spawned processes; the table and records are as a
    sequential sweep writes them, and a rerun trains nothing."""
    base = dict(data="synthetic", seq_len=16, batch_size=2, eval_batches=1)
    points = isoflop.sweep(tmp_path, [2e8], ["baseline"], ["L2-D8", "L2-D16"], progress=False, workers=2, **base)
    assert list(points["status"]) == ["ok", "ok"] and points["final_val_loss"].notna().all()
    records = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert len(records) == 2
    # They ran in the workers, on cores // 2 threads each (this process has all the cores): a
    # sweep that ignored `workers` trained them here, one after the other, and passed the rest.
    cores = torch.get_num_threads()
    assert [r["load"]["cores_in_use"] for r in records] == [max(1, cores // 2)] * 2
    runner = CountingRunner()
    again = isoflop.sweep(tmp_path, [2e8], ["baseline"], ["L2-D8", "L2-D16"], runner=runner, progress=False, **base)
    assert runner.calls == [] and list(again["final_val_loss"]) == list(points["final_val_loss"])
