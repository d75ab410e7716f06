"""Operator fusion (impls/techniques/fuse.py): Megatron's scripted bias+GELU and per-block
torch.compile give the eager model's numbers, keep its state_dict, and (compile) keep
compilation out of the timed steps.

torch.compile cold-starts in 15-20 s on a CPU: the compiled tests share one inductor cache under
``<repo>/.cache/inductor`` and compile the nano shape only.
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from impls.loss import lm_loss
from impls import techniques, train, zoo
from conftest import build_model
from impls.errors import ConfigError
from impls.measure import SavedActivations
from impls.techniques import fuse

REPO = Path(__file__).resolve().parents[1]
B, T = 4, 32


pytestmark = pytest.mark.usefixtures("one_thread")


def build(spec: str | None = None, **model_args):
    return build_model("nano", [spec] if spec else [], **model_args)[0]


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (B, T), generator=g), torch.randint(0, 256, (B, T), generator=g)


def loss_and_grads(model):
    x, y = batch()
    with SavedActivations(model.parameters()) as saved:
        logits = model(x)
        loss = lm_loss(logits, y)
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}, saved.bytes


def assert_same_numbers(got, want, rtol, atol):
    logits, loss, grads, _ = got
    torch.testing.assert_close(logits, want[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(loss, want[1], rtol=rtol, atol=atol)
    assert grads.keys() == want[2].keys()
    for name in grads:
        torch.testing.assert_close(grads[name], want[2][name], rtol=rtol, atol=atol, msg=name)


# --------------------------------------------------------------------------- options


def test_stage_follows_the_mode():
    assert techniques.stage(techniques.parse("fuse")) == "surgery"
    assert techniques.stage(techniques.parse("fuse:mode=jit")) == "surgery"
    assert techniques.stage(techniques.parse("fuse:mode=compile")) == "compile"


def test_bad_mode_fails_with_one_line_listing_the_modes():
    with pytest.raises(ConfigError) as err:
        techniques.parse("fuse:mode=xla")
    assert str(err.value) == "bad value 'xla' for fuse:mode; valid: jit, compile"


def test_jit_needs_a_gelu_mlp():
    with pytest.raises(ConfigError, match="needs gelu"):
        build("fuse:mode=jit", mlp="swiglu")


# --------------------------------------------------------------------------- mode=jit


def test_scripted_bias_gelu_is_tanh_gelu_and_its_backward_is_exact():
    script_fwd, script_back = fuse.scripted()
    assert isinstance(script_fwd, torch.jit.ScriptFunction) and isinstance(script_back, torch.jit.ScriptFunction)
    assert "aten::tanh" in str(script_fwd.graph) and "aten::tanh" in str(script_back.graph)
    g = torch.Generator().manual_seed(0)
    y = (4 * torch.randn(6, 16, generator=g, dtype=torch.float64)).requires_grad_()
    bias = torch.randn(16, generator=g, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(fuse.BiasGeLUFunction.apply(y, bias), F.gelu(y + bias, approximate="tanh"),
                               rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fuse.BiasGeLUFunction.apply, (y, bias))
    assert torch.autograd.gradcheck(fuse.BiasGeLUFunction.apply, (y, None))


@pytest.mark.parametrize("model_args", [{}, dict(bias=False)])
def test_jit_gives_eager_outputs_gradients_and_saved_bytes(model_args):
    eager, fused = build(**model_args), build("fuse:mode=jit", **model_args)
    assert list(fused.state_dict()) == list(eager.state_dict())
    got, want = loss_and_grads(fused), loss_and_grads(eager)
    assert_same_numbers(got, want, rtol=1e-6, atol=1e-7)
    # The Function keeps the matmul output (as eager's GELU keeps its input) and nothing else.
    assert got[3] == want[3]


def test_jit_mlp_really_runs_the_scripted_function():
    model = build("fuse:mode=jit")
    mlp = model.blocks[0].mlp
    assert isinstance(mlp, fuse.FusedGeluMLP)
    assert mlp.up is not None and "up.weight" in dict(mlp.named_parameters())
    out = mlp(torch.randn(B, T, model.cfg.d_model))
    names, stack, seen = set(), [out.grad_fn], set()
    while stack:  # every node of the autograd graph of the MLP output
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    assert "BiasGeLUFunctionBackward" in names and "GeluBackward0" not in names
    # The interpreter's last executed graph is the scripted bias_gelu: (y, bias?) -> tanh formula.
    graph = str(torch.jit.last_executed_optimized_graph())
    assert "%bias.1 : Tensor?" in graph and "aten::tanh" in graph


def test_jit_under_bf16_autocast_follows_the_matmul_dtype():
    def run(model):
        x, y = batch()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_loss(model(x), y)
        loss.backward()
        return loss.detach(), model.blocks[0].mlp.up.bias.grad

    (loss0, grad0), (loss1, grad1) = run(build()), run(build("fuse:mode=jit"))
    assert grad1.dtype == torch.float32  # master gradients stay fp32
    torch.testing.assert_close(loss1, loss0, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad1, grad0, rtol=0.1, atol=1e-3)


# --------------------------------------------------------------------------- mode=compile


@pytest.fixture(scope="module")
def inductor_cache():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(REPO / ".cache" / "inductor"))
        yield
    torch._dynamo.reset()


def test_compile_in_place_gives_eager_outputs_and_gradients(inductor_cache):
    eager, compiled = build(), build("fuse:mode=compile")
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no "_orig_mod." prefixes
    assert all(type(b) is zoo.Block and b._compiled_call_impl is not None for b in compiled.blocks)
    assert_same_numbers(loss_and_grads(compiled), loss_and_grads(eager), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def compiled_and_eager_runs(inductor_cache):
    quick = dict(model="nano", batch_size=B, seq_len=T, steps=4, eval_batches=1, timing_warmup=1)
    torch._dynamo.reset()  # earlier tests compiled the same blocks in this process: start afresh
    return train.run(train.Recipe(**quick, techniques=["fuse:mode=compile"])), train.run(train.Recipe(**quick))


def test_compiled_run_counts_the_eager_flops_and_trains_the_same(compiled_and_eager_runs):
    compiled, eager = compiled_and_eager_runs
    assert compiled["flops_per_step"] == eager["flops_per_step"]  # counted on an eager step
    assert compiled["model_flops_per_step"] == eager["model_flops_per_step"]
    for got, want in zip(compiled["curve"], eager["curve"]):
        assert got["step"] == want["step"]
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    assert compiled["technique_notes"]["fuse"] == dict(mode="compile")


def test_compilation_is_reported_in_the_first_step_not_the_timed_ones(compiled_and_eager_runs):
    compiled, eager = compiled_and_eager_runs
    # Tracing + AOT autograd + inductor: ~13 s from a cold cache, ~0.25 s from a warm one (dynamo
    # still traces); a timed nano step takes ~6 ms.  Margins leave room for a busy machine.
    assert compiled["first_step_seconds"] > eager["first_step_seconds"] + 0.1
    assert compiled["first_step_seconds"] > 3 * compiled["seconds_per_step"]
