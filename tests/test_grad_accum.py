"""Gradient accumulation equals the large batch, also with variable-length padded sequences."""
import copy

import pytest
import torch

from conftest import engine_over, loss_of
from impls import train, zoo
from impls.techniques import StepPlan


def _padded_batch(rows=8, seq_len=32, vocab=256):
    """Sequences of different lengths, right-padded: targets past each length are ignored."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (rows, seq_len), generator=g)
    y = torch.randint(0, vocab, (rows, seq_len), generator=g)
    lengths = [32, 3, 17, 9, 30, 1, 24, 12][:rows]
    for row, length in enumerate(lengths):
        y[row, length:] = zoo.IGNORE_INDEX
    return x, y


def _grads(model, accum_steps, x, y):
    engine = engine_over(copy.deepcopy(model), StepPlan(accum_steps=accum_steps), total_steps=1)
    loss = engine.forward_backward(x, y)
    return loss, {n: p.grad.clone() for n, p in engine.module.named_parameters()}


@pytest.mark.parametrize("accum_steps", [2, 8])
def test_micro_batches_give_the_large_batch_gradient(accum_steps):
    torch.manual_seed(0)
    model = zoo.build("nano")
    x, y = _padded_batch()
    big_loss, big = _grads(model, 1, x, y)
    small_loss, small = _grads(model, accum_steps, x, y)
    torch.testing.assert_close(small_loss, big_loss, rtol=1e-6, atol=1e-6)
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-5, atol=1e-6, msg=name)


def test_mean_of_micro_batch_means_would_differ():
    """The bug this normalisation avoids: averaging per-micro-batch mean losses weighs the tokens
    of short sequences more, so the test above can fail."""
    torch.manual_seed(0)
    model = zoo.build("nano")
    x, y = _padded_batch()
    _, big = _grads(model, 1, x, y)
    naive = copy.deepcopy(model)
    for xm, ym in zip(x.chunk(8), y.chunk(8)):
        (loss_of(naive, xm, ym) / 8).backward()
    diff = max((p.grad - big[n]).abs().max().item() for n, p in naive.named_parameters())
    assert diff > 1e-3


def test_accumulation_multiplies_the_step_batch_not_the_activation_memory():
    quick = dict(model="nano", seq_len=32, eval_batches=1, timing_warmup=1, steps=2)
    plain = train.run(train.Recipe(**quick, batch_size=2))
    accum = train.run(train.Recipe(**quick, batch_size=2, techniques=["grad_accum:steps=4"]))
    assert accum["tokens_per_step"] == 4 * plain["tokens_per_step"]
    assert accum["accum_steps"] == 4
    assert accum["flops_per_step"] == pytest.approx(4 * plain["flops_per_step"], rel=1e-9)
    assert accum["memory"]["activations_bytes"] == plain["memory"]["activations_bytes"]


@pytest.mark.parametrize("scaling,expected", [("none", 1e-3), ("linear", 4e-3), ("sqrt", 2e-3)])
def test_large_batch_learning_rate_scaling(scaling, expected):
    recipe = train.Recipe(lr=1e-3, base_batch=8, batch_size=8, lr_scaling=scaling, lr_warmup=4,
                          techniques=["grad_accum:steps=4"], steps=10)
    engine = train.prepare(recipe).engine
    assert engine.peak_lr == pytest.approx(expected)
    # Linear warm-up to the scaled peak (Goyal et al. 2017, §2.2).
    assert [engine.lr_at(s) for s in range(4)] == pytest.approx([expected * k / 4 for k in (1, 2, 3, 4)])
