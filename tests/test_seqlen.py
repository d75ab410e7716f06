"""Sequence-length warm-up (impls/techniques/seqlen_warmup.py): Li et al.'s linear pacing, the
truncating hook with an exact loss, and FLOP-budget accounting over the schedule."""
import importlib
import sys
from pathlib import Path

import pytest
import torch

from impls import train
from impls.errors import ConfigError
from impls.loss import lm_loss
from impls.measure import model_flops_per_step
from impls.techniques import seqlen_warmup as sw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # fairscale installs a top-level `benchmarks` package: ours first
bench_seqlen = importlib.import_module("benchmarks.bench_seqlen")

OPTS = dict(start=16, steps=0.5, every=8)


def _recipe(**kw):
    base = dict(model="nano", data="synthetic", batch_size=2, seq_len=64, lr=3e-3, eval_batches=1,
                techniques=["seqlen_warmup:start=16,steps=0.5,every=8"], timing_warmup=0)
    return train.Recipe(**{**base, **kw})


def test_linear_pacing_rounded_down_to_every():
    n, full = 20, 64  # warm-up W = 10 steps
    lengths = [sw.length_at(t, n, full, OPTS) for t in range(n)]
    expected = [max(16, (16 + (64 - 16) * t // 10) // 8 * 8) for t in range(10)] + [64] * 10
    assert lengths == expected
    assert lengths[0] == 16 and lengths[9] == 56 and lengths[10] == 64
    assert all(a <= b for a, b in zip(lengths, lengths[1:]))
    assert all(length % 8 == 0 for length in lengths)
    assert sw.breakpoints(lengths)[:3] == [[0, 16], [2, 24], [4, 32]]


@pytest.mark.parametrize("spec, bad", [("seqlen_warmup:start=64", "start=64"), ("seqlen_warmup:start=100", "start=100"),
                                       ("seqlen_warmup:steps=0", "steps"), ("seqlen_warmup:steps=1.5", "steps"),
                                       ("seqlen_warmup:every=0", "every"), ("seqlen_warmup:start=0", "start")])
def test_refuses_options_that_change_nothing_or_are_bad(spec, bad):
    with pytest.raises(ConfigError, match=bad):
        train.validate(_recipe(techniques=[spec], steps=2))


def test_hook_truncates_and_the_loss_is_the_mean_over_the_short_batch():
    session = train.prepare(_recipe(steps=4))
    session.build.total_steps = 4  # W = 2: step 0 trains on 16 tokens, step 1 on 40
    x, y = session.batches.get("train", 0)
    (hook,) = session.build.hooks["on_batch"]
    xs, ys = hook(x, y, 1)
    assert xs.shape == (2, 40) and torch.equal(xs, x[:, :40]) and torch.equal(ys, y[:, :40])
    assert hook(x, y, 3)[0] is x  # full length: untouched
    loss = session.engine.forward_backward(xs, ys)
    with torch.no_grad():
        expected = lm_loss(session.model(xs), ys)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_budget_buys_more_steps_and_the_curve_follows_the_schedule():
    budget = 2.5e8
    record = train.run(_recipe(flops_budget=budget, eval_every=3))
    meta = train.zoo.build("nano", device="meta", **train.model_overrides(_recipe(steps=1),
                                                                           train.data_lib.load("synthetic")))
    n = record["steps"]

    def cost(steps):
        return sum(model_flops_per_step(meta, 2, sw.length_at(t, steps, 64, OPTS)) for t in range(steps))

    assert cost(n) <= budget < cost(n + 1)  # the largest step count the budget buys
    assert n > int(budget // model_flops_per_step(meta, 2, 64))  # more than at full length
    end = record["curve"][-1]
    assert end["step"] == n and end["model_flops"] == cost(n)
    lengths = [sw.length_at(t, n, 64, OPTS) for t in range(n)]
    assert end["tokens"] == 2 * sum(lengths)
    notes = record["technique_notes"]["seqlen_warmup"]
    assert notes["counted_flops"] == end["flops"] and notes["model_flops"] == end["model_flops"]
    assert notes["schedule"] == sw.breakpoints(lengths) and notes["tokens_per_sequence_trained"] == sum(lengths)
    # an intermediate curve point's FLOPs sum the schedule's first steps
    mid = record["curve"][1]
    assert mid["model_flops"] == sum(model_flops_per_step(meta, 2, t) for t in lengths[:mid["step"]])
    assert 0 < notes["analytic_flops_saved"] < 1
    assert notes["counted_flops_saved"] == pytest.approx(notes["analytic_flops_saved"], rel=0.1)
    assert record["steps"] * record["model_flops_per_step"] == pytest.approx(end["model_flops"])


def test_counted_flops_at_a_short_step_match_the_count_and_the_formula():
    session = train.prepare(_recipe(flops_budget=2.5e8, techniques=["seqlen_warmup:start=16,steps=0.5,every=8",
                                                                     "attention:kind=math"]))
    cost = train.measure_step(session)
    short = cost.lengths[0]
    assert short == 16
    x, y = session.batches.get("train", 0)
    counted = session.engine.count_flops(x[:, :short], y[:, :short])["total"]
    assert cost.per_length[short][0] == counted
    analytic = model_flops_per_step(session.model, 2, short)
    assert cost.per_length[short][2] == analytic
    assert counted / analytic == pytest.approx(1.0, rel=0.03)  # 6N + 12·L·H·Q·T, math attention


@pytest.mark.parametrize("variant", list(bench_seqlen.VARIANTS))
def test_every_variant_is_a_valid_recipe(variant):
    specs, overrides = bench_seqlen.VARIANTS[variant]
    recipe = train.Recipe(**bench_seqlen._recipe(**overrides), techniques=specs,
                          flops_budget=bench_seqlen.SETTINGS["flops_budget"])
    train.validate(recipe)
