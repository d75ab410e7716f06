"""The optimizers by name: each trains, its update matches a hand-written reference where that is
cheap, and its state takes exactly the bytes theory says (8-bit: which tensors stayed fp32)."""
from __future__ import annotations

import copy
import functools
import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

from impls import optimizers, train
from impls.errors import ConfigError
from impls.measure import model_state_bytes

NAMES = list(optimizers.OPTIMIZERS)
# A learning rate per optimizer at which the toy regression below converges (lr means different
# things: relative step for Adafactor, trust-ratio multiplier for LARS/LAMB).
TOY_LR = {"sgd": 0.1, "nesterov": 0.1, "adam": 1e-2, "adamw": 1e-2, "adafactor": 0.1, "lamb": 0.1,
          "lars": 0.03, "lion": 1e-2, "adamw8bit": 1e-2}
WD = 0.01


class Toy(torch.nn.Module):
    """A 96×64 weight (6144 elements: 8-bit state), its 96-element bias and a 96×32 matrix (3072
    elements, below bitsandbytes' min_8bit_size: fp32 state) -- two matrices decayed, one vector not."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 96)
        self.small = torch.nn.Parameter(torch.randn(96, 32) * 0.1)

    def forward(self, x):
        return self.fc(x) @ self.small


def _toy():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 64, generator=g)
    y = x @ (torch.randn(64, 32, generator=g) * 0.3)
    return Toy(), x, y


def _step(model, opt, x, y) -> float:
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def test_unknown_optimizer_names_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown optimizer 'adamx'; valid: .*adafactor.*adamw8bit"):
        optimizers.check("adamx")
    with pytest.raises(ConfigError, match="unknown optimizer .nope."):
        train.validate(train.Recipe(optimizer="nope", steps=1))


@pytest.mark.parametrize("name", NAMES)
def test_trains_the_toy_problem(name):
    model, x, y = _toy()
    before = [p.detach().clone() for p in model.parameters()]
    opt = optimizers.build(name, model, TOY_LR[name], WD)
    losses = [_step(model, opt, x, y) for _ in range(30)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.1 * losses[0], losses
    for p, p0 in zip(model.parameters(), before):
        assert torch.isfinite(p).all() and not torch.equal(p, p0)
    # Weight decay on matrices only: both groups exist, the vector group undecayed.
    assert [g["weight_decay"] for g in opt.param_groups] == [WD, 0.0]


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_continues_identically(name):
    """Resuming (training_state) reloads the optimizer: the next step must be bit-identical."""
    model, x, y = _toy()
    opt = optimizers.build(name, model, TOY_LR[name], WD)
    for _ in range(3):
        _step(model, opt, x, y)
    twin = Toy()
    twin.load_state_dict(model.state_dict())
    twin_opt = optimizers.build(name, twin, TOY_LR[name], WD)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if through torch.save/load
    _step(model, opt, x, y)
    _step(twin, twin_opt, x, y)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- update math


def _grads_and_reference(name, steps, update):
    """Run ``name`` for ``steps`` on the toy problem and a hand-written ``update(p, g, state, t,
    decay)`` on copies of the weights, fed the same gradients; return the max abs difference."""
    model, x, y = _toy()
    ref = [p.detach().clone() for p in model.parameters()]
    states = [{} for _ in ref]
    lr = TOY_LR[name]
    opt = optimizers.build(name, model, lr, WD)
    worst = 0.0
    for t in range(1, steps + 1):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        params_before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        for i, (p, g) in enumerate(zip(params_before, grads)):
            expected = update(p.clone(), g, states[i], t, WD if p.dim() >= 2 else 0.0, lr)
            worst = max(worst, (expected - list(model.parameters())[i].detach()).abs().max().item())
    return worst


def test_sgd_momentum_matches_reference():
    def sgd(p, g, s, t, wd, lr):  # torch/Sutskever form: b ← μb + (g + λp); p ← p − lr·b
        g = g + wd * p
        s["b"] = g if t == 1 else 0.9 * s["b"] + g
        return p - lr * s["b"]

    assert _grads_and_reference("sgd", 3, sgd) < 1e-6


def test_nesterov_matches_reference():
    def nesterov(p, g, s, t, wd, lr):  # b ← μb + g; p ← p − lr·(g + μb)
        g = g + wd * p
        s["b"] = g if t == 1 else 0.9 * s["b"] + g
        return p - lr * (g + 0.9 * s["b"])

    assert _grads_and_reference("nesterov", 3, nesterov) < 1e-6


def _adam_reference(decoupled):
    def adam(p, g, s, t, wd, lr):
        b1, b2, eps = 0.9, 0.95, 1e-8
        if decoupled:
            p = p * (1 - lr * wd)
        else:
            g = g + wd * p  # L2 in the gradient: Adam's normalisation then rescales the decay
        s["m"] = b1 * s.get("m", 0) + (1 - b1) * g
        s["v"] = b2 * s.get("v", 0) + (1 - b2) * g * g
        m_hat, v_hat = s["m"] / (1 - b1 ** t), s["v"] / (1 - b2 ** t)
        return p - lr * m_hat / (v_hat.sqrt() + eps)

    return adam


def test_adam_matches_reference():
    assert _grads_and_reference("adam", 3, _adam_reference(decoupled=False)) < 1e-6


def test_adamw_matches_reference():
    assert _grads_and_reference("adamw", 3, _adam_reference(decoupled=True)) < 1e-6


def test_lion_matches_reference():
    def lion(p, g, s, t, wd, lr):  # c ← sign(β1 m + (1−β1) g); m ← β2 m + (1−β2) g
        m = s.get("m", torch.zeros_like(g))
        p = p * (1 - lr * wd) - lr * torch.sign(0.9 * m + 0.1 * g)
        s["m"] = 0.99 * m + 0.01 * g
        return p

    assert _grads_and_reference("lion", 3, lion) < 1e-6


def test_lamb_matches_reference():
    def lamb(p, g, s, t, wd, lr):  # no bias correction: the trust ratio cancels it (up to eps)
        s["m"] = 0.9 * s.get("m", 0) + 0.1 * g
        s["v"] = 0.999 * s.get("v", 0) + 0.001 * g * g
        r = s["m"] / (s["v"].sqrt() + 1e-6) + wd * p  # decay inside the update, before the trust ratio
        w_norm, r_norm = p.norm().clamp(max=10.0), r.norm()
        trust = w_norm / (r_norm + 1e-6) if w_norm > 0 and r_norm > 0 else 1.0
        return p - lr * trust * r

    assert _grads_and_reference("lamb", 3, lamb) < 1e-5


def test_lars_matches_reference():
    def lars(p, g, s, t, wd, lr):  # trust ratio and decay on matrices only; vectors: momentum SGD
        if p.dim() > 1:
            trust = optimizers.LARS_TRUST_COEFFICIENT * p.norm() / (g.norm() + wd * p.norm())
            g = (g + wd * p) * trust
        s["b"] = 0.9 * s.get("b", 0) + g
        return p - lr * s["b"]

    assert _grads_and_reference("lars", 3, lars) < 1e-5


def test_adafactor_matches_reference_first_step():
    def adafactor(p, g, s, t, wd, lr):  # step 1: β2 = 0, the factored estimate of g² itself
        alpha = max(1e-3, p.pow(2).mean().sqrt().item()) * min(lr, 1.0)
        p = p * (1 - lr * wd)
        if g.dim() > 1:
            r, c = g.pow(2).mean(dim=1, keepdim=True), g.pow(2).mean(dim=0, keepdim=True)
            v = r @ c / r.mean()  # rank-1: outer product of row and column means
        else:
            v = g * g
        u = g / v.clamp(min=torch.finfo(torch.float32).eps ** 2).sqrt()
        return p - alpha / max(1.0, u.pow(2).mean().sqrt().item()) * u

    assert _grads_and_reference("adafactor", 1, adafactor) < 1e-6


def test_adamw8bit_tracks_fp32_adamw():
    """First step: exactly AdamW (the moments are quantized after the update); later steps drift
    by the 8-bit quantization error only, and a fallback fp32 tensor is plain AdamW."""
    models, losses = {}, {}
    for name in ("adamw", "adamw8bit"):
        model, x, y = _toy()
        opt = optimizers.build(name, model, 1e-2, WD)
        losses[name] = [_step(model, opt, x, y)]
        first = [p.detach().clone() for p in model.parameters()]
        losses[name] += [_step(model, opt, x, y) for _ in range(19)]
        models[name] = first, [p.detach() for p in model.parameters()]
    for a, b in zip(models["adamw"][0], models["adamw8bit"][0]):
        assert (a - b).abs().max() < 1e-6
    for a, b in zip(models["adamw"][1], models["adamw8bit"][1]):
        assert (a - b).norm() < 0.05 * a.norm()
    assert abs(losses["adamw8bit"][-1] - losses["adamw"][-1]) < 0.05 * losses["adamw"][-1]

    # An fp32-fallback tensor alone, fed the same gradients: the same update as torch's AdamW.
    torch.manual_seed(1)
    v32 = torch.nn.Parameter(torch.randn(100))
    v8 = torch.nn.Parameter(v32.detach().clone())
    import bitsandbytes as bnb

    o32 = torch.optim.AdamW([v32], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    o8 = bnb.optim.AdamW8bit([v8], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for i in range(5):
        g = torch.randn(100)
        v32.grad, v8.grad = g.clone(), g.clone()
        o32.step()
        o8.step()
    assert o8.state[v8]["state1"].dtype == torch.float32
    assert (v32 - v8).abs().max() < 1e-5


# --------------------------------------------------------------------------- state bytes


N_FC, N_BIAS, N_SMALL = 96 * 64, 96, 96 * 32
N, T = N_FC + N_BIAS + N_SMALL, 3


def _adafactor_bytes():
    return 4 * (96 + 64) + 4 * (96 + 32) + 4 * N_BIAS + 4 * T  # row+col factors, vector, step scalars


def _adamw8bit_bytes():
    blocks = math.ceil(N_FC / 256)
    return (2 * N_FC + 2 * 4 * blocks  # two uint8 moments + an fp32 absmax per 256-element block each
            + 8 * (N_BIAS + N_SMALL)  # below min_8bit_size: fp32 moments
            + 2 * 256 * 4)  # the two quantization maps (signed, unsigned), shared by all tensors


EXPECTED_STATE_BYTES = {
    "sgd": 4 * N, "nesterov": 4 * N, "lars": 4 * N, "lion": 4 * N,  # one fp32 buffer per parameter
    "adam": 8 * N + 4 * T, "adamw": 8 * N + 4 * T,  # m and v, + a 0-d fp32 step per tensor
    "lamb": 8 * N + 12 * T,  # m and v, + weight norm, update norm, trust ratio per tensor
    "adafactor": _adafactor_bytes(),
    "adamw8bit": _adamw8bit_bytes(),
}


@pytest.mark.parametrize("name", NAMES)
def test_state_bytes_match_theory(name):
    model, x, y = _toy()
    opt = optimizers.build(name, model, TOY_LR[name], WD)
    _step(model, opt, x, y)
    measured = model_state_bytes(model, opt)["optimizer_bytes"]
    assert measured == EXPECTED_STATE_BYTES[name]
    report = optimizers.state_bytes_by_kind(opt, model)
    assert report["total_bytes"] == measured


def test_adafactor_state_is_linear_in_the_matrix_sides():
    for n, m in ((256, 128), (1024, 512)):
        w = torch.nn.Linear(m, n, bias=False)
        opt = optimizers.build("adafactor", w, 1e-2, 0.0)
        w.weight.grad = torch.randn(n, m)
        opt.step()
        assert model_state_bytes(w, opt)["optimizer_bytes"] == 4 * (n + m) + 4  # vs 8nm for Adam


def test_8bit_report_names_the_fp32_fallback_tensors():
    model, x, y = _toy()
    opt = optimizers.build("adamw8bit", model, 1e-2, WD)
    _step(model, opt, x, y)
    report = optimizers.state_bytes_by_kind(opt, model)
    assert report["min_8bit_size"] == 4096
    assert report["kinds"]["8bit"] == dict(tensors=1, elements=N_FC, bytes=2 * N_FC + 8 * math.ceil(N_FC / 256))
    assert report["kinds"]["32bit"] == dict(tensors=2, elements=N_BIAS + N_SMALL, bytes=8 * (N_BIAS + N_SMALL))
    assert report["shared_bytes"] == 2 * 256 * 4
    assert sorted(report["fp32_fallback"]) == ["fc.bias", "small"]
    # Not an 8-bit optimizer: everything fp32, nothing reported as a fallback.
    opt = optimizers.build("adamw", model, 1e-2, WD)
    _step(model, opt, x, y)
    report = optimizers.state_bytes_by_kind(opt)
    assert report["min_8bit_size"] is None and report["fp32_fallback"] == []
    assert report["kinds"] == {"32bit": dict(tensors=3, elements=N, bytes=8 * N + 4 * T)}


@pytest.mark.parametrize("name", ["lamb", "adamw8bit"])
def test_runs_in_the_training_loop(name):
    """Third-party optimizers through train.run (nano, 2 steps): the record's optimizer bytes are
    the state_bytes_by_kind total of the same optimizer."""
    record = train.run(train.Recipe(model="nano", optimizer=name, lr=1e-2, steps=2, batch_size=2, seq_len=32,
                                    eval_batches=1, device="cpu"))
    assert math.isfinite(record["final_val_loss"])
    session = train.prepare(train.Recipe(model="nano", optimizer=name, lr=1e-2, steps=1, batch_size=2,
                                         seq_len=32, device="cpu"))
    session.engine.train_step(*session.batches.get("train", 0), 0)
    report = optimizers.state_bytes_by_kind(session.engine.optimizer, session.model)
    assert report["total_bytes"] == record["memory"]["optimizer_bytes"]


# --------------------------------------------------------------------------- the asv suite


def _bench_module():
    repo = str(Path(__file__).resolve().parents[1])
    if repo not in sys.path:
        sys.path.insert(0, repo)  # fairscale installs a top-level `benchmarks` package: ours first
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        if not getattr(sys.modules[name], "__file__", "").startswith(repo):
            del sys.modules[name]
    return importlib.import_module("benchmarks.bench_optimizers")


def test_every_benchmark_recipe_is_valid(monkeypatch):
    monkeypatch.setattr(train.data_lib, "load", functools.lru_cache(train.data_lib.load))  # load once
    bench = _bench_module()
    assert set(bench.OPTIMIZERS) == set(optimizers.OPTIMIZERS)
    recipes = [bench.optimizer_recipe(n) for n in bench.OPTIMIZERS]
    recipes += [bench.large_batch_recipe(n, b) for n in bench.LARGE_BATCH_OPTIMIZERS for b in bench.LB["batches"]]
    for fields in recipes:
        train.validate(train.Recipe(**fields))  # raises ConfigError naming the problem
        assert 1 <= fields["lr_warmup"]
