"""Mixture-of-Depths (impls/techniques/mod.py): routing semantics, exactness at full capacity,
FLOPs from the shapes, aux-loss scaling, and short trainings (learned vs random, predictor)."""
import copy

import pytest
import torch

from impls import techniques, train, zoo
from conftest import apply_to, build_model, build_run, engine_over, loss_of
from impls.engines import TorchEngine
from impls.errors import ConfigError
from impls.measure import count_flops
from impls.techniques import mod

B, T = 2, 64
LLAMA_ISH = dict(norm="rmsnorm", mlp="swiglu", position="rope", n_kv_head=1, bias=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def build(spec="mod", n_layer=4, **model_args):
    return build_model("nano", [spec], n_layer=n_layer, **model_args)


def batch(t=T, vocab=256):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (B, t), generator=g), torch.randint(0, vocab, (B, t), generator=g)


class FixedLogits(torch.nn.Module):
    """A router that returns given logits (B, T, 1), whatever its input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits.to(x.dtype).unsqueeze(-1).expand(*x.shape[:2], 1)


# --------------------------------------------------------------------------- routing semantics


def test_routed_blocks_and_tokens():
    model, plan = build("mod:capacity=0.125,every=2")
    assert plan.notes["mod"]["blocks"] == [1, 3] == mod.routed_blocks(4, 2)
    assert mod.routed_blocks(6, 3) == [2, 5] and mod.routed_blocks(3, 1) == [0, 1, 2]
    assert [mod.capacity_tokens(0.125, t) for t in (64, 63, 7, 1)] == [8, 8, 1, 1]
    assert mod.capacity_tokens(0.3, 10) == 3 and mod.capacity_tokens(1.0, 5) == 5
    assert type(model) is zoo.Transformer  # no class swap: routed blocks are modules of their own
    assert [type(b).__name__ for b in model.blocks] == ["Block", "RoutedBlock", "Block", "RoutedBlock"]
    assert model.cfg.n_layer == 4 and len(model.blocks) == 4
    assert model.num_params() == zoo.build("nano", n_layer=4).num_params() + 2 * (64 + 1)
    assert {k for k in model.state_dict() if "router" in k} == {
        "blocks.1.router.weight", "blocks.1.router.bias", "blocks.3.router.weight",
        "blocks.3.router.bias"}


@pytest.mark.parametrize("model_args", [{}, LLAMA_ISH, dict(causal=False)], ids=["gpt", "llama", "encoder"])
def test_router_gets_gradients_and_indices_sorted(model_args):
    model, _ = build("mod:capacity=0.25", **model_args)
    x, y = batch()
    loss_of(model, x, y).backward()
    for i in (1, 3):
        g = model.blocks[i].router.weight.grad
        assert g is not None and g.abs().sum() > 0
        idx = model.blocks[i].last["stats"]["indices"]
        assert idx.shape == (B, 16) and bool((idx[:, 1:] > idx[:, :-1]).all())


@pytest.mark.parametrize("model_args", [{}, LLAMA_ISH], ids=["gpt", "llama"])
def test_full_capacity_weight_one_is_plain_block(model_args):
    torch.manual_seed(0)
    plain = zoo.build("nano", n_layer=4, **model_args)
    routed = apply_to(copy.deepcopy(plain), ["mod:capacity=1.0,every=1"]).model
    for blk in routed.blocks:  # sigmoid(30) == 1.0 in fp32; lerp(x, y, 1) == y exactly
        torch.nn.init.zeros_(blk.router.weight)
        torch.nn.init.constant_(blk.router.bias, 30.0)
    x, y = batch()
    lp, lr_ = loss_of(plain, x, y), loss_of(routed, x, y)
    assert torch.equal(plain(x), routed(x)) and torch.equal(lp, lr_)


def test_gathered_path_equals_masked_path():
    """The top-k gather (with rope rows gathered) computes the same as running the block on the
    full sequence with a mask restricting attention to the selected tokens."""
    model, _ = build("mod:capacity=0.25,every=1", **LLAMA_ISH)
    model.eval()
    x, _ = batch()
    blk = model.blocks[0]
    h = model.tok_emb(x)
    rope = (model.rope_cos, model.rope_sin)
    out = blk(h, rope)
    top = blk.last["stats"]["indices"]
    sel = torch.zeros(B, T, dtype=torch.bool).scatter_(1, top, True)
    allowed = (sel[:, None, :] | torch.eye(T, dtype=torch.bool)) & torch.ones(T, T, dtype=torch.bool).tril()
    full = blk.block(h, rope, allowed.unsqueeze(1))
    w = torch.sigmoid(blk.router(h).float())
    expect = torch.where(sel.unsqueeze(-1), torch.lerp(h, full, w), h)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_explicit_attn_mask_is_gathered(mask_dtype):
    """An explicit causal mask (bool or additive) gives what the implicit causal kernel gives."""
    model, _ = build("mod:capacity=0.25,every=1", n_layer=1, **LLAMA_ISH)
    h = model.tok_emb(batch()[0])
    rope = (model.rope_cos, model.rope_sin)
    tril = torch.ones(T, T, dtype=torch.bool).tril()
    mask = tril if mask_dtype == torch.bool else torch.zeros(T, T).masked_fill(~tril, float("-inf"))
    torch.testing.assert_close(model.blocks[0](h, rope, mask), model.blocks[0](h, rope), rtol=1e-5, atol=1e-6)


def test_weight_depends_on_own_logit_only():
    """No softmax over the top-k: raising a FUTURE token's logit (without changing the selected
    set) leaves every earlier token's weight and output unchanged (a softmax would rescale them)."""
    model, _ = build("mod:capacity=0.25,every=1", n_layer=1)
    x, _ = batch()
    h = model.tok_emb(x) + model.pos_emb(torch.arange(T))
    logits = torch.linspace(-2, 2, T).repeat(B, 1)  # the top 16 are the last 16 positions
    blk = model.blocks[0]
    outs, weights = [], []
    for last in (2.0, 50.0):
        lg = logits.clone()
        lg[:, -1] = last
        blk.router = FixedLogits(lg)
        outs.append(blk(h))
        weights.append(blk.last["stats"]["weights"])
        assert torch.equal(blk.last["stats"]["indices"][0], torch.arange(48, 64))
    assert torch.equal(weights[0][:, :-1], weights[1][:, :-1]) and weights[1][0, -1] > weights[0][0, -1]
    assert torch.equal(outs[0][:, :-1], outs[1][:, :-1]) and not torch.equal(outs[0][:, -1], outs[1][:, -1])


def test_no_nan_with_large_logits():
    run = build_run("nano", ["mod:capacity=0.125,causal=aux_loss"], n_layer=4)
    model = run.model
    for blk in (model.blocks[1], model.blocks[3]):
        with torch.no_grad():
            blk.router.weight.fill_(1e4)
            blk.router.bias.fill_(-1e4)
    x, y = batch()
    loss = TorchEngine(run, train.Recipe(), 1).loss_sum(x, y, model(x))  # LM loss + aux term
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_composes_with_checkpointing():
    """checkpoint (a later stage) wraps the routed forward: same loss, aux loss and gradients."""
    x, y = batch()
    results = []
    for specs in (["mod:causal=predictor"], ["mod:causal=predictor", "checkpoint"]):
        run = build_run("nano", specs, seed=0, n_layer=4)
        model = run.model
        loss = TorchEngine(run, train.Recipe(), 1).loss_sum(x, y, model(x)) / y.numel()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1) and g0.keys() == g1.keys() and "blocks.1.predictor.0.weight" in g0
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- FLOPs


def block_flops(cfg, t):
    """Forward FLOPs of one (GELU, MHA) block on B sequences of t tokens: linears + SDPA scores."""
    c, f = cfg.d_model, cfg.d_ff
    return 2 * B * t * (3 * c * c + c * c + 2 * c * f) + 4 * B * cfg.n_head * t * t * cfg.head_dim


def test_counted_flops_match_shapes():
    plain = zoo.build("nano", n_layer=6)
    model, _ = build("mod:capacity=0.125,every=2", n_layer=6)
    cfg = model.cfg
    x, _ = batch()
    head = 2 * B * T * cfg.d_model * cfg.vocab_size
    base, _ = count_flops(lambda: plain(x))
    assert base == 6 * block_flops(cfg, T) + head
    got, _ = count_flops(lambda: model(x))
    k = 8
    router = 2 * B * T * cfg.d_model
    assert got == 3 * block_flops(cfg, T) + 3 * (block_flops(cfg, k) + router) + head
    # routed block: capacity x its linear FLOPs, capacity^2 x its attention-score FLOPs
    lin = lambda t: block_flops(cfg, t) - 4 * B * cfg.n_head * t * t * cfg.head_dim  # noqa: E731
    assert lin(k) * 8 == lin(T)
    ratio = (3 * block_flops(cfg, T) + 3 * block_flops(cfg, k)) / (6 * block_flops(cfg, T))
    # the seed's rule of thumb, 0.5 + 0.5·0.125 = 0.5625, holds for the linear FLOPs; the attention
    # scores shrink by 0.125², so the blocks' total is a little below it (0.5547 at T=64, C=64)
    assert 0.5 + 0.5 * 0.125**2 < ratio < 0.5625 and round(ratio, 4) == 0.5547


# --------------------------------------------------------------------------- aux losses


@pytest.mark.parametrize("causal", ["aux_loss", "predictor"])
def test_aux_loss_scaling_with_loss_sum(causal):
    run = build_run("nano", [f"mod:capacity=0.25,causal={causal},aux_weight=0.5"], n_layer=4)
    model, engine = run.model, TorchEngine(run, train.Recipe(), 1)
    x, y = batch()
    y[0, :10] = zoo.IGNORE_INDEX
    n = int((y != zoo.IGNORE_INDEX).sum())
    torch.manual_seed(3)
    summed = engine.loss_sum(x, y, model(x))  # what the engine divides by the step's tokens
    aux = sum(mod.aux_losses(model).values())
    assert set(mod.aux_losses(model)) == {"router_bce" if causal == "aux_loss" else "predictor_bce"}
    assert [t.name for t in run.loss_terms] == ["mod"] and run.loss_terms[0].weight == 0.5
    assert 0 < float(aux.detach()) < 10
    plain = torch.nn.functional.cross_entropy(model(x).view(-1, 256), y.view(-1), ignore_index=-100)
    torch.testing.assert_close(summed / n, plain + 0.5 * aux)
    # validation losses carry no aux term
    assert engine.eval_loss(x, y) == pytest.approx(plain.item(), rel=1e-6)


def test_predictor_is_stop_gradient():
    model, _ = build("mod:capacity=0.25,causal=predictor")
    x, y = batch()
    model.zero_grad()
    model(x)
    sum(mod.aux_losses(model).values()).backward()
    pred = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert pred and all(".predictor." in n for n in pred)


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("spec", ["mod:capacity=0", "mod:capacity=1.5", "mod:every=0", "mod:aux_weight=-1",
                                  "mod:router=random,causal=predictor", "mod:router=topk"])
def test_bad_options(spec):
    with pytest.raises(ConfigError) as e:
        techniques.configure([techniques.parse(spec)])
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- short trainings


def run(spec, steps=150, seed=0):
    return train.run(train.Recipe(model="nano", batch_size=4, seq_len=64, steps=steps, lr=3e-3, seed=seed,
                                  techniques=[spec], model_args=dict(n_layer=4), eval_batches=2,
                                  eval_every=steps))


def test_learned_routing_beats_random():
    """150 steps on synthetic data at capacity 0.5.  Measured over seeds 0-2: learned beats
    random by 0.030-0.034 nats at capacity 0.5, but by only 0.004-0.010 at 0.125 (too close to
    test at this size), so the test runs 0.5."""
    learned = run("mod:capacity=0.5")
    random = run("mod:capacity=0.5,router=random")
    assert learned["technique_notes"]["mod"]["router"] == "learned"
    assert learned["final_val_loss"] < random["final_val_loss"] - 0.01


def test_predictor_learns_and_autoregressive_eval():
    """At capacity 0.5 chance (majority class) is 50 %."""
    spec = "mod:capacity=0.5,causal=predictor"
    record = run(spec)
    acc = record["technique_notes"]["mod"]["predictor_accuracy"]
    assert acc > 0.75
    session = train.prepare(train.Recipe(model="nano", batch_size=4, seq_len=64, steps=60, lr=3e-3,
                                         techniques=[spec], model_args=dict(n_layer=4)))
    model, engine, batches = session.model, session.engine, session.batches
    for step in range(60):
        engine.train_step(*batches.get("train", step), step)
    out = mod.evaluate_autoregressive(model, [batches.get("val", i) for i in range(2)])
    assert set(out) == {"topk", "autoregressive", "selected_fraction", "agreement_with_topk"}
    assert 0 < out["topk"] < 10 and 0 < out["autoregressive"] < 10
    assert out["agreement_with_topk"] > 0.6
