"""Random layerwise token dropping (impls/techniques/random_ltd.py): DeepSpeed's kept-length
schedule, the drop layers (kept tokens as scheduled, dropped ones untouched, full sequence in
eval), FLOP-budget accounting over the schedule, counted vs analytic saving, refusals."""
import importlib
import sys
from pathlib import Path

import pytest
import torch

from impls import train
from impls.errors import ConfigError
from impls.techniques import random_ltd as ltd

from conftest import build_run

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # fairscale installs a top-level `benchmarks` package: ours first
bench_ltd = importlib.import_module("benchmarks.bench_ltd")

OPTS = dict(start=16, steps=0.5, every=8)
SPEC = "random_ltd:start=16,steps=0.5,every=8"


def _recipe(**kw):
    base = dict(model="nano", data="synthetic", batch_size=2, seq_len=64, lr=3e-3, eval_batches=1,
                model_args={"n_layer": 4}, techniques=[SPEC], timing_warmup=0)
    return train.Recipe(**{**base, **kw})


def test_schedule_is_deepspeeds_fixed_linear_from_start_to_full():
    n, full = 20, 64  # require_steps = 10
    kept = [ltd.kept_at(t, n, full, OPTS) for t in range(n)]
    expected = [min(64, (16 + (64 - 16) * t // 10) // 8 * 8) for t in range(10)] + [64] * 10
    assert kept == expected
    assert kept[0] == 16 and kept[9] < 64 and kept[10] == 64  # endpoints
    assert all(a <= b for a, b in zip(kept, kept[1:])) and all(k % 8 == 0 for k in kept)
    assert ltd.breakpoints(kept)[:3] == [[0, 16], [2, 24], [4, 32]]
    assert ltd.kept_at(0, 1, full, dict(OPTS, steps=1.0)) == 16


@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed's random-LTD ops exist on CUDA")
def test_deepspeed_random_ltd_ops_still_cpu_less():
    """Why the drop layer is our own: the day DeepSpeed's token sampling runs on a CPU, this fails."""
    assert ltd.deepspeed_cpu_error() == "ValueError: This op had not been implemented on CPU backend."


def _capture_inputs(model):
    seen = {}
    handles = [blk.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].shape))
               for i, blk in enumerate(b.block if isinstance(b, ltd.DropBlock) else b for b in model.blocks)]
    return seen, handles


def test_middle_layers_see_exactly_the_scheduled_kept_tokens():
    session = train.prepare(_recipe(steps=20))
    session.build.total_steps = 20
    model = session.model
    assert [i for i, b in enumerate(model.blocks) if isinstance(b, ltd.DropBlock)] == [1, 2]
    (hook,) = session.build.hooks["on_batch"]
    x, y = session.batches.get("train", 0)
    seen, handles = _capture_inputs(model)
    for step in (0, 3, 9, 10, 19):
        xs, ys = hook(x, y, step)
        assert xs is x and ys is y  # the batch keeps its length
        session.engine.forward_backward(xs, ys)
        r = ltd.kept_at(step, 20, 64, OPTS)
        assert seen == {0: (2, 64, 64), 1: (2, r, 64), 2: (2, r, 64), 3: (2, 64, 64)}
    for h in handles:
        h.remove()


def test_dropped_tokens_bypass_the_layer_and_kept_ones_go_through_it():
    torch.manual_seed(0)
    model = build_run("nano", [SPEC], n_layer=4, position="rope").model
    model.train()
    blk = model.blocks[1]
    blk.kept.value = 24
    x = torch.randn(3, 64, 64)
    rope = (model.rope_cos, model.rope_sin)
    with torch.no_grad():
        out = blk(x, rope)
        keep = blk.last_indices
        assert keep.shape == (3, 24) and torch.equal(keep, keep.sort(dim=1).values)  # sorted by position
        assert all(len(set(row.tolist())) == 24 for row in keep)
        dropped = torch.ones(3, 64, dtype=torch.bool).scatter_(1, keep, False)
        assert torch.equal(out[dropped], x[dropped])  # exactly unchanged
        # the kept tokens: the block on them alone, in order, at their original rope positions
        xs = x.gather(1, keep.unsqueeze(-1).expand(3, 24, 64))
        for b in range(3):
            cos, sin = (t[keep[b]] for t in rope)
            ref = blk.block(xs[b:b + 1], (cos, sin))
            torch.testing.assert_close(out[b, keep[b]], ref[0])
        # a fresh subset each forward (and so per layer)
        blk(x, rope)
        assert not torch.equal(blk.last_indices, keep)


def test_eval_runs_the_full_sequence_through_every_layer():
    build = build_run("nano", [SPEC], n_layer=4)
    model = build.model
    for blk in ltd.drop_modules(model):
        blk.kept.value = 16
    seen, handles = _capture_inputs(model)
    x = torch.randint(0, 256, (2, 64))
    model.eval()
    with torch.no_grad():
        out = model(x)
        assert set(seen.values()) == {(2, 64, 64)}
        for blk in ltd.drop_modules(model):
            blk.kept.value = None
        torch.testing.assert_close(model(x), out, rtol=0, atol=0)
    for h in handles:
        h.remove()


def test_budget_buys_exactly_the_steps_whose_counted_flops_fit():
    budget = 2e9
    session = train.prepare(_recipe(flops_budget=budget))
    cost = train.measure_step(session)
    n, per = cost.total_steps, cost.per_length

    def total(steps):
        return sum(per[ltd.kept_at(t, steps, 64, OPTS)][2] for t in range(steps))

    assert all(ltd.kept_at(t, n + 1, 64, OPTS) in per for t in range(n + 1))  # counted, not guessed
    assert total(n) <= budget < total(n + 1)
    assert n > int(budget // per[64][2])  # the cheap early steps buy more than full-length ones
    assert cost.lengths == [ltd.kept_at(t, n, 64, OPTS) for t in range(n)]
    assert cost.totals(n)["tokens"] == n * 2 * 64  # every step still trains on the whole batch
    # a kept-length step is counted at that length: its FLOPs lie below the full one's
    assert per[16][0] < per[64][0]


def test_record_curve_and_notes_follow_the_schedule():
    record = train.run(_recipe(flops_budget=2e9, eval_every=4))
    notes = record["technique_notes"]["random_ltd"]
    n = record["steps"]
    kept = [ltd.kept_at(t, n, 64, OPTS) for t in range(n)]
    assert notes["schedule"] == ltd.breakpoints(kept) and notes["total_steps"] == n
    end = record["curve"][-1]
    assert end["flops"] == notes["counted_flops"] and end["model_flops"] == end["flops"]
    assert end["tokens"] == n * 2 * 64
    assert 0 < notes["analytic_flops_saved"] < 1
    assert notes["counted_vs_analytic_saved"] == pytest.approx(1.0, abs=0.1)
    expected_lt = 1 - sum(2 * k + 2 * 64 for k in kept) / (n * 64 * 4)
    assert notes["layer_tokens_saved"] == pytest.approx(expected_lt)
    assert "not been implemented on CPU" in notes["deepspeed_layer_not_used"]


def test_counted_flops_at_a_kept_length_match_the_formula():
    session = train.prepare(_recipe(steps=4, techniques=[SPEC, "attention:kind=math"]))
    x, y = session.batches.get("train", 0)
    with session.plan.in_phase(16):
        counted = session.engine.count_flops(x, y)["total"]
    analytic = 2 * ltd.analytic_sequence_flops(session.model, 64, 16, 2)
    assert counted / analytic == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("spec, kw, bad", [
    (SPEC, dict(model_args={"n_layer": 2}), "n_layer"),
    ("random_ltd:start=64,every=8", {}, "start=64"),
    ("random_ltd:start=20,every=8", {}, "start=20"),
    ("random_ltd:steps=0", {}, "steps"),
    ("random_ltd:steps=1.5", {}, "steps"),
    ("random_ltd:every=0", {}, "every"),
])
def test_refuses_configs_that_change_nothing_or_are_bad(spec, kw, bad):
    with pytest.raises(ConfigError, match=bad):
        train.validate(_recipe(techniques=[spec], steps=2, **kw))


def test_refuses_mod_alongside():
    with pytest.raises(ConfigError, match="mod"):
        train.validate(_recipe(techniques=[SPEC, "mod"], steps=2))


@pytest.mark.parametrize("variant", list(bench_ltd.VARIANTS))
def test_every_variant_is_a_valid_recipe(variant):
    specs, overrides = bench_ltd.VARIANTS[variant]
    recipe = train.Recipe(**bench_ltd._recipe(**overrides), techniques=specs,
                          flops_budget=bench_ltd.SETTINGS["flops_budget"])
    train.validate(recipe)
