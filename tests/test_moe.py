"""Mixture-of-Experts (impls/techniques/moe.py) and MoDE (impls/techniques/mode.py): routing math,
load-balancing loss, gradients, exactness against the dense MLP, FLOPs from the shapes, aux-loss
scaling, options, and short trainings."""
import math

import pytest
import torch

from conftest import build_model, build_run, loss_of
from impls import techniques, train, zoo
from impls.engines import TorchEngine
from impls.errors import ConfigError
from impls.measure import count_flops
from impls.techniques import fuse, mod, moe

B, T = 2, 64
LLAMA_ISH = dict(norm="rmsnorm", mlp="swiglu", position="rope", n_kv_head=1, bias=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def build(spec="moe", n_layer=4, **model_args):
    return build_model("nano", [spec], seed=0, n_layer=n_layer, **model_args)


def mlp_of(block):
    """The MLP of a block, through MoD's routing wrapper (staged MoDE)."""
    return (block.block if isinstance(block, mod.RoutedBlock) else block).mlp


def batch(t=T, vocab=256):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (B, t), generator=g), torch.randint(0, vocab, (B, t), generator=g)


def filled(routing):
    return {e: [t for t, g in zip(row.tolist(), routing.gate[e].tolist()) if g > 0]
            for e, row in enumerate(routing.index)}


# --------------------------------------------------------------------------- routing math


def test_token_choice_top1_drops_exactly_over_capacity():
    # 6 tokens, 2 experts, capacity 2: tokens 0,1,3,4 prefer expert 0; 2,5 expert 1
    pref = [0, 0, 1, 0, 0, 1]
    probs = torch.tensor([[0.9, 0.1] if p == 0 else [0.2, 0.8] for p in pref])
    r = moe.token_choice(probs, top_k=1, capacity=2)
    assert r.index.shape == r.gate.shape == (2, 2)
    assert filled(r) == {0: [0, 1], 1: [2, 5]}  # tokens 3 and 4 are over expert 0's capacity
    assert torch.allclose(r.gate, torch.tensor([[0.9, 0.9], [0.8, 0.8]]))
    assert float(r.stats["dropped_fraction"]) == pytest.approx(2 / 6)
    assert float(r.stats["dropped_assignments"]) == pytest.approx(2 / 6)
    assert moe.token_capacity(6, 2, 1, 1.25) == 4 and moe.token_capacity(128, 4, 2, 1.25) == 80


def test_token_choice_top2_respects_capacity_and_priority():
    torch.manual_seed(0)
    n, e, cap = 40, 4, 12
    probs = torch.softmax(torch.randn(n, e) * 2, -1)
    r = moe.token_choice(probs, top_k=2, capacity=cap)
    got = filled(r)
    assert all(len(toks) <= cap and len(set(toks)) == len(toks) for toks in got.values())
    per_token = {t: [x for x in got if t in got[x]] for t in range(n)}
    assert all(len(v) <= 2 for v in per_token.values())
    # reference: first choices in token order, then second choices, each expert up to cap
    top = probs.topk(2, -1).indices
    used, expect, kept = [0] * e, {x: [] for x in range(e)}, set()
    for rank in range(2):
        for t in range(n):
            x = int(top[t, rank])
            if used[x] < cap:
                used[x] += 1
                expect[x].append(t)
                kept.add(t)
    assert {x: sorted(v) for x, v in got.items()} == {x: sorted(v) for x, v in expect.items()}
    assert float(r.stats["dropped_fraction"]) == pytest.approx(1 - len(kept) / n)
    assert float(r.stats["dropped_assignments"]) == pytest.approx(1 - sum(used) / (2 * n))
    # top-2 gates are renormalised over the two choices
    g = probs.topk(2, -1).values
    g = g / g.sum(-1, keepdim=True)
    for x, toks in got.items():
        for slot, t in enumerate(toks):
            rank = 0 if int(top[t, 0]) == x else 1
            assert float(r.gate[x, slot]) == pytest.approx(float(g[t, rank]))


def test_expert_choice_each_expert_exactly_c():
    torch.manual_seed(0)
    n, e = 32, 4
    scores = torch.softmax(torch.randn(n, e) * 3, -1)
    c = moe.expert_capacity(n, e, 1.0)
    r = moe.expert_choice(scores, c)
    assert c == 8 and r.index.shape == (e, c)
    for x in range(e):
        assert sorted(r.index[x].tolist()) == sorted(scores[:, x].topk(c).indices.tolist())
        assert torch.allclose(r.gate[x], scores[r.index[x], x])
    picked = set(r.index.reshape(-1).tolist())
    assert float(r.stats["dropped_fraction"]) == pytest.approx(1 - len(picked) / n)
    assert r.aux is None
    assert moe.expert_capacity(10, 4, 1.25) == 4 and moe.expert_capacity(4, 1, 9.0) == 4


def test_load_balancing_loss_switch_formula():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.5, 0.25, 0.25]])
    expert = probs.argmax(-1, keepdim=True)  # experts 0, 0, 1, 0
    f = torch.tensor([3 / 4, 1 / 4, 0.0])
    p = probs.mean(0)
    assert float(moe.load_balancing_loss(probs, expert)) == pytest.approx(float(3 * (f * p).sum()))
    assert float(moe.token_choice(probs, 1, 4).aux) == pytest.approx(float(3 * (f * p).sum()))
    uniform = torch.full((8, 4), 0.25)
    assert float(moe.load_balancing_loss(uniform, torch.arange(8).remainder(4)[:, None])) == pytest.approx(1.0)


# --------------------------------------------------------------------------- the model


@pytest.mark.parametrize("spec", ["moe", "moe:routing=expert", "moe:top_k=2", "mode:kind=staged",
                                  "mode:kind=integrated"])
def test_gradients_reach_router_and_used_experts(spec):
    model, _ = build(spec)
    x, y = batch()
    loss_of(model, x, y).backward()
    layers = moe.moe_layers(model)
    assert len(layers) == 2 and all(mlp_of(model.blocks[i]) is layers[j] for j, i in enumerate((1, 3)))
    for layer in layers:
        assert layer.router.weight.grad.abs().sum() > 0
        used = {e for e, row in enumerate(layer._last["gate"]) if (row > 0).any()}
        assert used
        for e, expert in enumerate(layer.experts):
            g = expert.up.weight.grad
            assert (g is not None and g.abs().sum() > 0) == (e in used)


@pytest.mark.parametrize("model_args", [{}, LLAMA_ISH], ids=["gpt", "llama"])
@pytest.mark.parametrize("routing", ["token", "expert"])
def test_one_expert_huge_capacity_equals_dense(model_args, routing):
    torch.manual_seed(0)
    dense = zoo.build("nano", n_layer=4, **model_args)
    model, _ = build(f"moe:experts=1,routing={routing},capacity_factor=100,every=1", **model_args)
    state = {k: v for k, v in dense.state_dict().items()}
    for i, blk in enumerate(model.blocks):
        blk.mlp.experts[0].load_state_dict(dense.blocks[i].mlp.state_dict())
        for k in list(state):
            if k.startswith(f"blocks.{i}.mlp."):
                state[k.replace(".mlp.", ".mlp.experts.0.")] = state.pop(k)
    model.load_state_dict(state, strict=False)
    x, y = batch()
    # softmax over one expert is exactly 1: the gate multiplies by 1.0
    torch.testing.assert_close(model(x), dense(x), rtol=0, atol=0)
    assert moe.summary(model)["dropped_fraction"] == 0


# --------------------------------------------------------------------------- FLOPs


def mlp_flops(cfg, n):
    up = cfg.d_ff * (2 if cfg.mlp == "swiglu" else 1)
    return 2 * n * cfg.d_model * (up + cfg.d_ff)


def test_counted_flops_match_shapes():
    n = B * T
    plain = zoo.build("nano", n_layer=4)
    cfg = plain.cfg
    x, _ = batch()
    base, _ = count_flops(lambda: plain(x))
    router = lambda e: 2 * n * cfg.d_model * e  # noqa: E731
    # top-1 at capacity factor 1: E·cap = N slots, exactly the dense MLP, plus the router
    m, _ = build("moe:capacity_factor=1.0")
    assert count_flops(lambda: m(x))[0] == base + 2 * router(4)
    m, _ = build("moe:capacity_factor=1.25")  # cap = ceil(1.25·128/4) = 40 slots per expert
    assert count_flops(lambda: m(x))[0] == base + 2 * (router(4) + mlp_flops(cfg, 160) - mlp_flops(cfg, n))
    m, _ = build("moe:top_k=2,capacity_factor=1.0")  # twice the slots
    assert count_flops(lambda: m(x))[0] == base + 2 * (router(4) + mlp_flops(cfg, n))
    m, _ = build("moe:routing=expert,capacity_factor=1.0")
    assert count_flops(lambda: m(x))[0] == base + 2 * router(4)
    # MoDE integrated: capacity 0.125 → 4 experts × 4 tokens = 16 of 128 tokens run an MLP
    m, _ = build("mode:kind=integrated,capacity=0.125")
    got = count_flops(lambda: m(x))[0]
    assert got == base + 2 * (router(5) + mlp_flops(cfg, 16) - mlp_flops(cfg, n))
    assert got < base
    # MoDE staged: MoD's k = 8 tokens per sequence (16 tokens) go through the block, whose MoE MLP
    # has 4 experts × ceil(1.25·16/4) = 5 slots
    m, _ = build("mode:kind=staged,capacity=0.125")
    staged = count_flops(lambda: m(x))[0]
    mod_only, _ = build("mod:capacity=0.125")
    mod_flops = count_flops(lambda: mod_only(x))[0]
    assert staged == mod_flops + 2 * (2 * 16 * cfg.d_model * 4 + mlp_flops(cfg, 20) - mlp_flops(cfg, 16))
    assert staged < got < base


# --------------------------------------------------------------------------- aux loss


@pytest.mark.parametrize("spec", ["moe:aux_weight=0.5", "mode:kind=staged,aux_weight=0.5"])
def test_aux_loss_scaling_with_loss_sum(spec):
    run = build_run("nano", [spec], seed=0, n_layer=4)
    model, engine = run.model, TorchEngine(run, train.Recipe(), 1)
    x, y = batch()
    y[0, :10] = zoo.IGNORE_INDEX
    n = int((y != zoo.IGNORE_INDEX).sum())
    summed = engine.loss_sum(x, y, model(x))  # what the engine divides by the step's tokens
    aux = moe.load_balancing(model)
    assert run.loss_terms[0].name == "moe" and run.loss_terms[0].weight == 0.5 and 0.9 < float(aux.detach()) < 4
    plain = torch.nn.functional.cross_entropy(model(x).view(-1, 256), y.view(-1), ignore_index=-100)
    torch.testing.assert_close(summed / n, plain + 0.5 * aux)
    assert engine.eval_loss(x, y) == pytest.approx(plain.item(), rel=1e-6)  # validation: no aux term


def test_expert_choice_and_integrated_have_no_aux():
    for spec in ("moe:routing=expert", "mode:kind=integrated"):
        run = build_run("nano", [spec], seed=0, n_layer=4)
        model = run.model
        x, y = batch()
        loss = TorchEngine(run, train.Recipe(), 1).loss_sum(x, y, model(x)) / y.numel()
        assert moe.load_balancing(model) is None
        plain = torch.nn.functional.cross_entropy(model(x).view(-1, 256), y.view(-1))
        torch.testing.assert_close(loss, plain)


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("spec", ["moe:experts=0", "moe:top_k=3", "moe:routing=hash", "moe:capacity_factor=0",
                                  "moe:every=0", "moe:aux_weight=-1", "moe:experts=1,top_k=2",
                                  "mode:kind=both", "mode:capacity=0", "mode:capacity=1.5", "mode:experts=0",
                                  "mode:every=0"])
def test_bad_options(spec):
    with pytest.raises(ConfigError) as e:
        techniques.configure([techniques.parse(spec)])
    msg = str(e.value)
    assert "\n" not in msg
    if "routing=hash" in spec:
        assert "token, expert" in msg
    if "kind=both" in spec:
        assert "staged, integrated" in msg


@pytest.mark.parametrize("pair", [("mode", "mod"), ("mode", "moe"), ("mod", "mode")])
def test_conflicts_are_rejected_with_reason(pair):
    """mode already is MoD + MoE; ``mod`` + ``moe`` themselves compose (tests/test_build.py)."""
    with pytest.raises(ConfigError, match="cannot be combined"):
        techniques.configure([techniques.parse(p) for p in pair])


# --------------------------------------------------------------------------- short trainings


@pytest.mark.parametrize("spec", ["moe", "moe:routing=expert", "mode:kind=staged", "mode:kind=integrated"])
def test_short_training(spec):
    steps = 40
    record = train.run(train.Recipe(model="nano", batch_size=4, seq_len=64, steps=steps, lr=3e-3,
                                    techniques=[spec], model_args=dict(n_layer=4), eval_batches=2,
                                    eval_every=steps))
    vals = [p["val_loss"] for p in record["curve"]]
    assert all(math.isfinite(v) for v in vals) and vals[-1] < vals[0] - 0.3
    notes = record["technique_notes"][spec.split(":")[0]]
    assert 0 <= notes["dropped_fraction"] < 1


def test_fuse_jit_fuses_the_experts_in_either_order():
    """MLP replacement (moe) runs before MLP fusion (fuse) in the surgery stage, whatever order
    the user lists them in: the experts get the fused bias+GELU."""
    model, _ = build("moe")
    x, _ = batch()
    for order in (["fuse", "moe"], ["moe", "fuse"]):
        fused, _ = build_model("nano", order, seed=0, n_layer=4)
        assert all(isinstance(e, fuse.FusedGeluMLP) for e in fused.blocks[1].mlp.experts)
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", ["moe:top_k=2", "mode:kind=staged", "mode:kind=integrated"])
def test_bf16_autocast_backward(spec):
    model, _ = build(spec)
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(model, x, y)
    loss.backward()
    assert torch.isfinite(loss) and moe.moe_layers(model)[0].router.weight.grad.abs().sum() > 0
