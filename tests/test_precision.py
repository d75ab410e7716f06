"""bf16 and fp16 (+ dynamic loss scaling) through the real engine."""
import copy

import pytest
import torch

from conftest import engine_over
from impls import train
from impls.engines import TorchEngine
from impls.techniques import StepPlan


class Probe(torch.nn.Module):
    """A one-layer model whose loss gradient is ``gain`` per output element: small gains
    underflow in fp16 (< 2^-24), large ones overflow once scaled (> 65504)."""

    def __init__(self, gain: float):
        super().__init__()
        self.layer = torch.nn.Linear(16, 16, bias=False)
        self.gain = gain

    def forward(self, x):
        return self.layer(x)  # fp16 under autocast


class ProbeEngine(TorchEngine):
    """The real engine with the probe's loss in place of cross-entropy."""

    def loss_sum(self, x, y, logits):
        return logits.float().sum() * self.module.gain * y.numel()  # the engine divides by y.numel()


def _engine(model, plan):
    return engine_over(model, plan, train.Recipe(optimizer="sgd", lr=0.1), engine_class=ProbeEngine)


def _fp16(scaling):
    return StepPlan(autocast_dtype=torch.float16, loss_scaling=scaling)


def test_fp16_without_scaling_loses_small_gradients_and_scaling_keeps_them():
    torch.manual_seed(0)
    x, y = torch.randn(8, 16), torch.zeros(8, 16, dtype=torch.long)
    gain = 2.0**-30  # gradient per output element: far below fp16's smallest subnormal 2^-24
    grads = {}
    for name, plan in (("fp32", StepPlan()), ("fp16", _fp16(False)), ("fp16+scaling", _fp16(True))):
        engine = _engine(Probe(gain), plan)
        engine.forward_backward(x, y)
        grad = engine.module.layer.weight.grad
        if engine.scaler:
            grad = grad / engine.scaler.get_scale()  # what the optimizer sees after unscaling
        grads[name] = grad
    assert grads["fp32"].abs().min() > 0
    assert torch.count_nonzero(grads["fp16"]) == 0  # every gradient underflowed to zero
    torch.testing.assert_close(grads["fp16+scaling"], grads["fp32"], rtol=1e-2, atol=0)


def test_fp16_overflow_skips_the_step_and_backs_the_scale_off():
    torch.manual_seed(0)
    engine = _engine(Probe(gain=1.0), _fp16(True))  # scaled by 2^16 the gradients overflow fp16
    before = copy.deepcopy(engine.module.state_dict())
    scale = engine.scaler.get_scale()
    engine.train_step(torch.randn(8, 16), torch.zeros(8, 16, dtype=torch.long), step=0)
    assert engine.scaler.get_scale() == scale / 2
    for key, value in engine.module.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed although the step overflowed"


def test_fp16_with_finite_gradients_updates_and_keeps_the_scale():
    torch.manual_seed(0)
    engine = _engine(Probe(gain=2.0**-20), _fp16(True))
    before = engine.module.layer.weight.detach().clone()
    scale = engine.scaler.get_scale()
    engine.train_step(torch.randn(8, 16), torch.zeros(8, 16, dtype=torch.long), step=0)
    assert engine.scaler.get_scale() == scale
    assert not torch.equal(engine.module.layer.weight, before)


QUICK = dict(model="nano", batch_size=4, seq_len=32, eval_batches=2, timing_warmup=1, lr=3e-3, steps=15)


@pytest.fixture(scope="module")
def fp32_record():
    return train.run(train.Recipe(**QUICK))


@pytest.mark.parametrize("technique", ["bf16", "fp16"])
def test_mixed_precision_trains_close_to_fp32(fp32_record, technique):
    rec = train.run(train.Recipe(**QUICK, techniques=[technique]))
    assert rec["precision"] == {"bf16": "bf16-autocast", "fp16": "fp16-autocast+loss-scaling"}[technique]
    losses = [p["val_loss"] for p in rec["curve"]]
    assert losses[-1] < losses[0] - 0.5  # it learns
    assert abs(rec["final_val_loss"] - fp32_record["final_val_loss"]) < 0.05
    # Autocast keeps fp32 master weights and optimizer state.
    assert rec["memory"]["params_bytes"] == fp32_record["memory"]["params_bytes"]
    assert rec["memory"]["optimizer_bytes"] == fp32_record["memory"]["optimizer_bytes"]


def test_bf16_needs_no_scaler_and_saves_activation_bytes(fp32_record):
    session = train.prepare(train.Recipe(**QUICK, techniques=["bf16"]))
    assert session.engine.scaler is None
    rec = train.run(train.Recipe(**QUICK, techniques=["bf16"]))
    # Matmul inputs are saved in bf16 (2 bytes), so activations shrink, though not by half:
    # norms, softmax statistics and the fp32 loss stay in fp32.
    assert rec["memory"]["activations_bytes"] < 0.85 * fp32_record["memory"]["activations_bytes"]
