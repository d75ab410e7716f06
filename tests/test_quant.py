"""Quantized training (impls/techniques/int8.py, qat.py, fp8.py): the int8 technique's matmuls
really run as int8 GEMMs (op counts below autograd, int8 operands), torchao's documented
``quantize_`` path is the fp32 one in disguise on this torch (so the technique does not use it),
the FLOP counter counts the int8 GEMMs, QAT's forward sees at most 2^bits values per group, its
export reproduces the QAT logits, fp8 is refused on a CPU before any work, and every benchmark
variant is a valid recipe.
"""
from __future__ import annotations

import importlib
import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import build_run
from impls import cli, techniques, train
from impls.errors import ConfigError
from impls.loss import lm_loss
from impls.measure import SavedActivations
from impls.measure.flops import count_flops
from impls.techniques import int8, qat

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
bench_quant = importlib.import_module("benchmarks.bench_quant")

pytestmark = pytest.mark.usefixtures("one_thread")
B, T = 4, 32
LINEARS_PER_BLOCK = 4  # qkv, proj, up, down


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (B, T), generator=g), torch.randint(0, 256, (B, T), generator=g)


class GemmLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Every aten op that runs, and the operand dtypes of each matmul."""

    MATMULS = ("aten._int_mm", "aten.mm", "aten.addmm", "aten.bmm")

    def __init__(self):
        super().__init__()
        self.counts = Counter()
        self.dtypes = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] += 1
        if name in self.MATMULS:
            operands = args[1:3] if name == "aten.addmm" else args[:2]
            self.dtypes[(name, *(str(a.dtype) for a in operands))] += 1
        return func(*args, **(kwargs or {}))


def step_ops(model):
    x, y = batch()
    with GemmLog() as log:
        lm_loss(model(x), y).backward()
    return log


# --------------------------------------------------------------------------- int8: what really runs


def test_int8_matmuls_run_as_int8_gemms_in_forward_and_backward():
    base = step_ops(build_run("nano", []).model)
    build = build_run("nano", ["int8"])
    log = step_ops(build.model)
    linears = build.model.cfg.n_layer * LINEARS_PER_BLOCK
    assert build.notes["int8"]["layers"] == linears
    # three int8 GEMMs per block Linear (output, grad input, grad weight), operands int8 × int8
    assert log.counts["aten._int_mm"] == 3 * linears
    assert log.dtypes[("aten._int_mm", "torch.int8", "torch.int8")] == 3 * linears
    # the only floating-point matmuls left are the tied LM head's three (not quantised)
    float_mm = sum(n for (op, *_), n in log.dtypes.items() if op != "aten._int_mm")
    base_mm = sum(base.dtypes.values())
    assert base.counts["aten._int_mm"] == 0
    assert float_mm == base_mm - 3 * linears == 3


def test_int8_options_choose_which_matmuls_run_in_int8():
    build = build_run("nano", ["int8:forward=true,grad_input=false,grad_weight=false"])
    log = step_ops(build.model)
    linears = build.model.cfg.n_layer * LINEARS_PER_BLOCK
    assert log.counts["aten._int_mm"] == linears  # forward only
    assert sum(n for (op, *_), n in log.dtypes.items() if op != "aten._int_mm") == 3 + 2 * linears


def test_torchao_quantize_tensor_subclass_path_is_fp32_in_disguise_on_this_torch():
    """torchao 0.18's documented ``quantize_(model, Int8MixedPrecisionTrainingConfig())`` registers
    its F.linear override in the aten table, so it never fires: the block matmuls run fp32
    addmm/mm and no int8 GEMM.  This is why int8.py calls torchao's autograd function from a
    module; if this test fails, torchao fixed the path and int8.py can go back to ``quantize_``."""
    from torchao.prototype.quantized_training import Int8MixedPrecisionTrainingConfig
    from torchao.quantization import quantize_

    model = build_run("nano", []).model
    quantize_(model, Int8MixedPrecisionTrainingConfig(),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn.startswith("blocks."))
    assert type(model.blocks[0].mlp.up.weight).__name__ == "Int8MixedPrecisionTrainingLinearWeight"
    log = step_ops(model)
    assert log.counts["aten._int_mm"] == 0
    assert all(dtype == "torch.float32" for (_, *dtypes) in log.dtypes for dtype in dtypes)


def test_int8_flops_are_counted_and_equal_the_dense_matmuls():
    x, y = batch()
    base = build_run("nano", []).model
    model = build_run("nano", ["int8"]).model
    total_base, _ = count_flops(lambda: lm_loss(base(x), y).backward())
    total, per_op = count_flops(lambda: lm_loss(model(x), y).backward())
    cfg = model.cfg
    # 3 GEMMs × 2·(B·T)·in·out per block Linear
    shapes = int8._linear_shapes(cfg)
    want = cfg.n_layer * sum(3 * 2 * B * T * k * n for _, k, n in shapes)
    assert per_op["aten._int_mm"] == want
    assert total == total_base  # same multiply-adds, now int8


def test_int_mm_flop_formula():
    a = torch.randint(-128, 127, (32, 24), dtype=torch.int8)
    b = torch.randint(-128, 127, (24, 40), dtype=torch.int8)
    total, per_op = count_flops(lambda: torch._int_mm(a, b))
    assert total == per_op["aten._int_mm"] == 2 * 32 * 24 * 40


def test_int8_stores_fp32_weights_and_activations_and_the_record_says_so():
    build = build_run("nano", ["int8"])
    base = build_run("nano", []).model
    x, _ = batch()
    with SavedActivations(base.parameters()) as saved_base:
        base(x)
    with SavedActivations(build.model.parameters()) as saved:
        build.model(x)
    assert saved.bytes == saved_base.bytes  # torchao saves the fp32 input, re-quantises in backward
    notes = build.notes_for_record()["int8"]
    assert notes["weight_storage_dtype"] == "float32"
    assert notes["kernel"] == "aten._int_mm"
    assert notes["int8_gemms_per_linear_step"] == 3 and notes["fp_gemms_per_linear_step"] == 0
    assert notes["saved_activation_dtypes"] == ["float32"]
    assert notes["probe"]["saved_bytes_by_dtype"]["float32"] == notes["probe"]["input_bytes_fp"]


def test_int8_output_is_close_to_fp32_but_not_equal():
    x, _ = batch()
    base = build_run("nano", []).model
    model = build_run("nano", ["int8"]).model
    with torch.no_grad():
        a, b = base(x), model(x)
    err = (a - b).abs().max().item()
    assert 0 < err < 0.05 * a.abs().max().item()


def test_int8_under_bf16_autocast_still_runs_int8_gemms():
    build = build_run("nano", ["int8", "bf16"])
    x, y = batch()
    with GemmLog() as log, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lm_loss(build.model(x), y)
    loss.backward()
    assert math.isfinite(loss.item())
    assert log.counts["aten._int_mm"] == build.model.cfg.n_layer * LINEARS_PER_BLOCK


# --------------------------------------------------------------------------- QAT


def fake_quantised(build, which: str):
    """What the first block's MLP ``up`` fake quantiser hands to F.linear in one forward."""
    seen = []
    up = build.model.blocks[0].mlp.up
    handle = getattr(up, which).register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    x, y = batch()
    loss = lm_loss(build.model(x), y)
    handle.remove()
    return seen[0], loss


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 32), (2, 0)])
def test_qat_weights_take_at_most_2_to_the_bits_values_per_group(bits, group):
    build = build_run("nano", [f"qat:bits={bits},group_size={group}"])
    w, _ = fake_quantised(build, "weight_fake_quantizer")
    raw = build.model.blocks[0].mlp.up.weight.detach()
    size = group or w.shape[1]
    distinct = [len(torch.unique(g)) for g in w.reshape(-1, size)]
    assert max(distinct) <= 2 ** bits
    # each group is its scale times integers of [-2^(b-1), 2^(b-1) - 1], and the largest weight
    # reaches the end of that range (the grid is the b-bit one, not a coarser one)
    scale = build.model.blocks[0].mlp.up.weight_fake_quantizer.scale.reshape(-1, 1)
    q = w.reshape(-1, size) / scale
    assert (q - q.round()).abs().max() < 1e-3
    assert q.round().min() >= -2 ** (bits - 1) and q.round().max() <= 2 ** (bits - 1) - 1
    assert q.abs().amax(1).round().min() >= 2 ** (bits - 1) - 1
    off_grid = raw.reshape(-1, size) / scale
    assert (off_grid - off_grid.round()).abs().max() > 0.1  # the fp32 master weight itself is not quantised
    assert build.notes["qat"]["max_distinct_weight_values_per_group"] == 2 ** bits


def test_qat_activations_are_fake_quantised_to_int8_per_token():
    build = build_run("nano", ["qat"])
    a, _ = fake_quantised(build, "activation_fake_quantizer")
    assert max(len(torch.unique(row)) for row in a.reshape(-1, a.shape[-1])) <= 256
    assert build_run("nano", ["qat:act=none"]).model.blocks[0].mlp.up.activation_fake_quantizer is None


def test_qat_changes_the_loss_and_still_trains_the_fp32_weights():
    x, y = batch()
    base = lm_loss(build_run("nano", []).model(x), y)
    build = build_run("nano", ["qat:bits=4"])
    loss = lm_loss(build.model(x), y)
    assert math.isfinite(loss.item()) and loss.item() != base.item()
    loss.backward()  # straight-through estimator: the fp32 weights get gradients
    grad = build.model.blocks[0].mlp.up.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_qat_export_reproduces_the_fake_quantised_logits():
    build = build_run("nano", ["qat:bits=4,group_size=32"])
    model = build.model.eval()
    x, _ = batch()
    with torch.no_grad():
        want = model(x)
    qat.convert(model, dict(bits=4, group_size=32, act="int8"))
    assert type(model.blocks[0].mlp.up) is torch.nn.Linear
    assert type(model.blocks[0].mlp.up.weight).__name__ == "IntxUnpackedToInt8Tensor"
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_qat_records_the_exported_bytes():
    notes = build_run("nano", ["qat:bits=4,group_size=32"]).notes["qat"]
    cfg = build_run("nano", []).model.cfg
    weights = cfg.n_layer * sum(k * n for _, k, n in int8._linear_shapes(cfg))
    assert notes["export_weights"] == weights
    assert notes["export_packed_bytes"] == weights // 2 + 4 * weights // 32


# --------------------------------------------------------------------------- fp8 and bad input


def test_fp8_is_refused_on_cpu_before_any_work(tmp_path, capsys):
    out = tmp_path / "never" / "run.json"
    status = cli.main(["run", "--model", "nano", "--steps", "1", "--device", "cpu", "--technique", "fp8",
                       "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2
    assert "fp8" in err and "compute capability >= 8.9" in err and "'cpu'" in err and "fp32 mm" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.parent.exists()


def test_cpu_scaled_mm_is_an_fp32_reference_path():
    """The refusal's reason, measured: torch's CPU ``_scaled_mm`` upcasts the float8 operands and
    runs an fp32 ``mm`` (if torch gains a real CPU float8 GEMM this fails, and fp8 may run here)."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 64, generator=g).to(torch.float8_e4m3fn)
    b = torch.randn(48, 64, generator=g).to(torch.float8_e4m3fn).t()
    one = torch.tensor(1.0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.float32)
    top = next(e for e in prof.events() if e.name == "aten::_scaled_mm")
    children = [c.name for c in top.cpu_children]
    assert "aten::to" in children and "aten::matmul" in children
    torch.testing.assert_close(out, a.float() @ b.float(), rtol=0, atol=0)


@pytest.mark.parametrize("specs,fragment", [
    (["int8:forward=false,grad_input=false,grad_weight=false"], "no matmul would run in int8"),
    (["int8:forward=maybe"], "int8:forward"),
    (["qat:bits=9"], "valid: 2, 3, 4, 5, 6, 7, 8"),
    (["qat:bits=1"], "valid: 2, 3"),
    (["qat:act=int4"], "valid: int8, none"),
    (["qat:group_size=-1"], "group_size must be >= 0"),
    (["qat:group_size=48"], "does not divide"),
    (["fp8:scaling=blockwise"], "valid: tensorwise, rowwise"),
    (["int8", "qat"], "cannot be combined"),
    (["qat", "fp8"], "cannot be combined"),
    (["int8", "fp16"], "overflows fp16"),
])
def test_bad_options_are_refused_before_any_work(specs, fragment):
    recipe = train.Recipe(model="nano", steps=1, techniques=specs, device="cpu")
    with pytest.raises(ConfigError, match=fragment):
        train.check_recipe_fields(recipe)


def test_fp8_refuses_a_model_whose_linears_are_not_multiples_of_16():
    from impls import zoo
    from impls.techniques import fp8

    with pytest.raises(ConfigError, match="multiples of 16"):
        fp8.check_model(zoo.config("nano", d_model=72, n_head=2), 32, {"scaling": "tensorwise"})


# --------------------------------------------------------------------------- runs and the benchmark


def test_quantised_runs_train_to_finite_losses_that_differ_from_the_baseline():
    common = dict(model="nano", data="synthetic:vocab=64,train_tokens=8192,val_tokens=2048,row_len=64",
                  batch_size=4, seq_len=32, steps=3, eval_batches=1, timing_warmup=0, device="cpu")
    base = train.run(train.Recipe(**common))
    for spec in (["int8"], ["qat:bits=4"]):
        record = train.run(train.Recipe(**common, techniques=spec))
        assert record["status"] == "ok"
        assert math.isfinite(record["final_val_loss"])
        assert record["final_val_loss"] != base["final_val_loss"]
        assert record["flops_per_step"] == base["flops_per_step"]  # int8 GEMMs counted like fp32 ones
        for key in ("params_bytes", "grads_bytes", "optimizer_bytes"):
            assert record["memory"][key] == base["memory"][key]
        assert spec[0].split(":")[0] in record["technique_notes"]


@pytest.mark.parametrize("variant", list(bench_quant.VARIANTS))
def test_every_bench_variant_is_a_valid_recipe_or_refused_for_the_device(variant):
    specs, overrides = bench_quant.VARIANTS[variant]
    recipe = train.Recipe(**bench_quant._recipe(**overrides), techniques=specs,
                          flops_budget=bench_quant.SETTINGS["flops_budget"])
    for spec in specs:
        assert spec.split(":")[0] in techniques.REGISTRY
    if variant == "fp8" and not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)):
        with pytest.raises(ConfigError, match="compute capability"):
            train.validate(recipe)
        assert "compute capability" in bench_quant.refusal(variant)
        return
    train.validate(recipe)  # raises ConfigError naming the problem
    assert bench_quant.refusal(variant) is None


def test_bench_records_are_of_the_quant_family():
    assert set(bench_quant.SPEED_VARIANTS) <= set(bench_quant.VARIANTS)
    assert "baseline" in bench_quant.VARIANTS and bench_quant.VARIANTS["baseline"] == ([], {})
