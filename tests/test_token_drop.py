"""BERT token dropping (impls/techniques/token_drop.py): kept-token shapes, masked positions always
kept, the importance update against a hand computation, dropped tokens re-joining unchanged,
counted vs analytic FLOP saving, refusals, a short training, and the bench variants."""
import math

import pytest
import torch

from impls import techniques, train
from conftest import build_run
from impls.errors import ConfigError
from impls.loss import IGNORE_INDEX
from impls.techniques import token_drop

pytestmark = pytest.mark.usefixtures("one_thread")

B, T, V = 2, 32, 257  # encoder vocab: 256 data ids + [MASK] (id 256)
MASK = V - 1


def build(spec="token_drop", n_layer=4, **model_args):
    return build_run("encoder-nano", [spec], vocab_size=V, n_layer=n_layer, **model_args)


def mlm_batch(seed=1, t=T, rate=0.15):
    from impls.data import mask_for_mlm

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V - 1, (B, t), generator=g)
    return mask_for_mlm(x, V - 1, MASK, rate, g)


def shapes_seen(model):
    seen = {}
    for i, blk in enumerate(model.blocks):
        inner = getattr(blk, "block", blk)
        inner.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, tuple(a[0].shape)))
    return seen


def test_layers_and_middle_layers_see_k_tokens():
    b = build("token_drop:keep=0.5")
    model = b.model
    assert [type(m).__name__ for m in model.blocks] == ["Block", "DropEntry", "Dropped", "Rejoin"]
    assert b.plan.notes["token_drop"]["dropping_layers"] == [1, 2] and b.plan.dense_compute is False
    seen = shapes_seen(model)
    x, _ = mlm_batch()
    model.train()
    model(x)
    k = math.ceil(0.5 * T)
    assert seen == {0: (B, T, 64), 1: (B, k, 64), 2: (B, k, 64), 3: (B, T, 64)}
    model.eval()
    model(x)  # eval=full: every block sees every token
    assert all(s == (B, T, 64) for s in seen.values())
    assert token_drop.dropping_layers(12, -1) == list(range(5, 11))  # BERT-base: the official 5 | 6 | 1
    assert token_drop.dropping_layers(6, 3) == [3, 4]


def test_masked_and_predicted_positions_always_kept():
    b = build("token_drop:keep=0.25")
    model, state = b.model, token_drop.state_of(b.model)
    x, y = mlm_batch(rate=0.25)
    # Make the predicted ids the *least* important: they must still be kept.
    with torch.no_grad():
        model.blocks[1].importance.fill_(5.0)
        model.blocks[1].importance[y[y != IGNORE_INDEX]] = -1.0
        model.blocks[1].importance[x[y != IGNORE_INDEX]] = -1.0
    model.train()
    state.step_batch = (x, y)
    model(x)
    kept = state.top
    assert kept.shape == (B, math.ceil(0.25 * T))
    assert torch.equal(kept, kept.sort(dim=-1).values)
    for row in range(B):
        predicted = set((y[row] != IGNORE_INDEX).nonzero().flatten().tolist())
        assert predicted <= set(kept[row].tolist())
    # Without the targets (evaluation, FLOP passes) the [MASK] inputs are still kept.
    state.step_batch = None
    model(x)
    for row in range(B):
        assert set((x[row] == MASK).nonzero().flatten().tolist()) <= set(state.top[row].tolist())


def test_importance_update_matches_hand_computation():
    state = token_drop.State(5, 4, dict(token_drop.OPTIONS, beta=0.9))
    state.importance = torch.full((5,), 10.0)
    state.pending = (torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64))
    logits = torch.randn(1, 4, 5)
    targets = torch.tensor([[1, IGNORE_INDEX, 1, 3]])
    state.record(logits, targets)
    state.update()
    lp = torch.log_softmax(logits[0], -1)
    l0, l2, l3 = -lp[0, 1], -lp[2, 1], -lp[3, 3]
    want = torch.tensor([10.0, 0.9 * 10 + 0.1 * (l0 + l2) / 2, 10.0, 0.9 * 10 + 0.1 * l3, 10.0])
    assert torch.allclose(state.importance, want, atol=1e-5)
    assert state.updates == 1 and state.pending is None


def test_training_steps_update_the_table_once_per_step():
    session = train.prepare(train.Recipe(model="encoder-nano", model_args=dict(n_layer=4), data="synthetic",
                                         batch_size=4, seq_len=32, steps=3, techniques=["token_drop"]))
    table = session.model.blocks[1].importance
    assert torch.all(table == 10.0)
    train.measure_step(session)  # the FLOP/activation passes never touch the table
    assert torch.all(table == 10.0)
    for step in range(3):
        session.engine.train_step(*session.batches.get("train", step), step)
    assert token_drop.state_of(session.model).updates == 3
    assert (table < 10.0).any() and (table <= 10.0).all()


def test_dropped_tokens_rejoin_unchanged():
    b = build("token_drop:keep=0.5")
    model, state = b.model, token_drop.state_of(b.model)
    x, y = mlm_batch()
    before, at_last = {}, {}
    model.blocks[0].register_forward_hook(lambda m, a, out: before.__setitem__("x", out.detach()))
    model.blocks[3].block.register_forward_pre_hook(lambda m, a: at_last.__setitem__("x", a[0].detach()))
    model.train()
    state.step_batch = (x, y)
    model(x)
    kept = torch.zeros(B, T, dtype=torch.bool).scatter_(1, state.top, True)
    assert torch.equal(at_last["x"][~kept], before["x"][~kept])  # dropped: as before the middle layers
    assert not torch.allclose(at_last["x"][kept], before["x"][kept])  # kept: changed by them
    # and the kept ones equal the middle blocks run on the kept tokens alone
    xs = before["x"].gather(1, state.top.unsqueeze(-1).expand(B, state.top.shape[1], 64))
    pos = model.pos_emb  # learned positions were added before the blocks; nothing to gather
    assert pos is not None
    ref = model.blocks[2].block(model.blocks[1].block(xs))
    assert torch.allclose(at_last["x"].gather(1, state.top.unsqueeze(-1).expand_as(ref)), ref, atol=1e-6)


def test_rope_rows_gathered():
    b = build("token_drop:keep=0.5", position="rope")
    model, state = b.model, token_drop.state_of(b.model)
    x, y = mlm_batch()
    captured = {}
    model.blocks[1].block.register_forward_pre_hook(lambda m, a: captured.__setitem__("rope", a[1]))
    model.train()
    state.step_batch = (x, y)
    model(x)
    cos = captured["rope"][0][0]  # (B, 1, k, Q/2)
    assert torch.equal(cos[:, 0], model.rope_cos[state.top])


def test_counted_saving_matches_analytic():
    session = train.prepare(train.Recipe(model="encoder-nano", model_args=dict(n_layer=4), data="synthetic",
                                         batch_size=4, seq_len=64, steps=1, techniques=["token_drop:keep=0.25"]))
    session.engine.train_step(*session.batches.get("train", 0), 0)
    notes = session.build.notes_for_record()["token_drop"]
    assert notes["kept_tokens_per_row"] == 16
    assert 0.2 < notes["analytic_flops_saved"] < 0.6
    assert notes["saved_counted_vs_analytic"] == pytest.approx(1.0, abs=0.1)
    assert notes["counted_flops_per_step"] < notes["counted_flops_per_step_no_drop"]
    cost = train.measure_step(session)  # the record's model FLOPs are the counted ones, with dropping
    assert cost.model_flops_per_step == pytest.approx(notes["counted_flops_per_step"], rel=0.02)


@pytest.mark.parametrize("spec,model_args,match", [
    ("token_drop:keep=1", {}, "keep=1"),
    ("token_drop:keep=0", {}, "keep=0"),
    ("token_drop", dict(n_layer=2), "no middle layer"),
    ("token_drop", dict(causal=True), "masked-LM encoder"),
    ("token_drop:keep=0.05", dict(causal=True), "masked-LM encoder"),
    ("token_drop:first=3", dict(n_layer=4), "first=3"),
    ("token_drop:keep=0.05", {}, "fewer than the"),
])
def test_refusals(spec, model_args, match):
    recipe = train.Recipe(model="encoder-nano", model_args=dict(dict(n_layer=4), **model_args), data="synthetic",
                          batch_size=4, seq_len=64, steps=1, techniques=[spec])
    with pytest.raises(ConfigError, match=match):
        train.validate(recipe)


def test_conflicts_with_mod():
    with pytest.raises(ConfigError, match="cannot be combined"):
        techniques.configure([techniques.parse("token_drop"), techniques.parse("mod")])


def test_a_few_steps_reduce_the_loss():
    session = train.prepare(train.Recipe(model="encoder-nano", model_args=dict(n_layer=4), data="synthetic",
                                         batch_size=8, seq_len=64, steps=30, lr=3e-3, techniques=["token_drop"]))
    val = [session.batches.get("val", i) for i in range(2)]
    before = sum(session.engine.eval_loss(x, y) for x, y in val)
    for step in range(30):
        session.engine.train_step(*session.batches.get("train", step), step)
    after = sum(session.engine.eval_loss(x, y) for x, y in val)
    assert after < before - 0.2


def test_eval_drop_evaluates_as_trained():
    b = build("token_drop:eval=drop")
    seen = shapes_seen(b.model)
    b.model.eval()
    b.model(mlm_batch()[0])
    assert seen[1] == (B, T // 2, 64)


def _bench():
    import benchmarks.bench_tokendrop as bench

    return bench


def test_every_bench_variant_is_a_valid_recipe():
    bench = _bench()
    assert "baseline" in bench.VARIANTS
    for name, (specs, overrides) in bench.VARIANTS.items():
        recipe = train.Recipe(**bench._recipe(**overrides), techniques=specs,
                              flops_budget=bench.SETTINGS["flops_budget"])
        train.validate(recipe)
        for spec in specs:
            assert spec.split(":")[0] in techniques.REGISTRY


def test_speed_class_spec_is_valid():
    import importlib

    from impls import compare

    bench = _bench()
    common = importlib.import_module("benchmarks.common")
    variants = {name: dict(techniques=bench.VARIANTS[name][0]) for name in bench.TokenDropSpeed.params}
    spec = compare.parse_spec(dict(baseline="baseline", common=bench._recipe(flops_budget=None), variants=variants,
                                   **common.PROFILE["interleave"]))
    for recipe in spec.recipes.values():
        train.validate(recipe)


def test_with_activation_checkpointing_gradients_match():
    """Checkpointed wrappers recompute from the same selection: the same gradients as without."""
    x, y = mlm_batch()
    grads = []
    for specs in (["token_drop"], ["token_drop", "checkpoint"]):
        b = build_run("encoder-nano", specs, vocab_size=V, n_layer=4, position="rope")
        model, state = b.model, token_drop.state_of(b.model)
        model.train()
        state.step_batch = (x, y)
        from impls.loss import lm_loss

        lm_loss(model(x), y).backward()
        grads.append({n: p.grad.clone()
                      for n, p in model.named_parameters()})
        assert ("checkpoint" in b.plan.notes) == ("checkpoint" in specs)  # (hooks, no wrapper module)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_importance_average_stays_fp32_in_a_bf16_table():
    state = token_drop.State(3, 2, dict(token_drop.OPTIONS))
    state.importance = torch.full((3,), 10.0, dtype=torch.bfloat16)
    for _ in range(20):
        state.pending = (torch.tensor([5.0, 0.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 0.0, 0.0],
                                                                                          dtype=torch.float64))
        state.update()
    want = 5 + 5 * 0.995 ** 20
    assert state.master[0].item() == pytest.approx(want, abs=1e-4)
    assert state.importance[0].item() == pytest.approx(want, abs=0.07)  # it moved (bf16 alone would stay at 10)
