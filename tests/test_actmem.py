"""Activation memory: compressed saved activations (impls/techniques/actcompress.py) and offload
(impls/techniques/offload.py): the meter sees the compressed bytes, the ratios against the
format's, the gradient error bounded and nonzero, pass-through rules, refusals, the bench file."""
import importlib
import sys
from pathlib import Path

import pytest
import torch

from conftest import build_run
from impls import techniques, train
from impls.engines import TorchEngine
from impls.errors import ConfigError
from impls.loss import lm_loss
from impls.measure import SavedActivations
from impls.recipe import Recipe
from impls.techniques import actcompress

REPO = Path(__file__).resolve().parents[1]
B, T = 4, 64

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(vocab=256):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g)


def engine_of(specs):
    build = build_run("nano", specs, seed=0)
    return build, TorchEngine(build, Recipe(model="nano"), total_steps=10)


@pytest.fixture(scope="module")
def baseline_bytes():
    _, engine = engine_of([])
    return engine.activation_bytes(*batch())


def grads(model, x, y, hooks=None):
    params = [p for p in model.parameters() if p.requires_grad]
    ctx = torch.autograd.graph.saved_tensors_hooks(*hooks) if hooks else torch.autograd.graph.saved_tensors_hooks(
        lambda t: t, lambda t: t)
    with ctx:
        loss = lm_loss(model(x), y)
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("dtype,expected", [("bf16", 0.5), ("fp8", 0.25), ("int8", 0.25 + 1 / 64)])
def test_engine_meter_sees_compressed_bytes(dtype, expected, baseline_bytes):
    """The engine's activation meter composes with the technique's hooks: it measures the bytes
    pack returns.  The ratio to the baseline is near the format's (int8 per-row: + 4 bytes per
    64-feature row), a little above it: the token ids, LayerNorm statistics stay as they are."""
    build, engine = engine_of([f"actcompress:dtype={dtype}"])
    assert build.saved_tensors_hooks is not None
    measured = engine.activation_bytes(*batch())
    ratio = measured / baseline_bytes
    assert expected <= ratio < expected + 0.02, ratio
    # and the stored bytes equal what the pack decisions say was stored
    compressor = build.saved_tensors_hooks[0].__self__
    compressor.stats = {}
    with SavedActivations(build.model.parameters(), transform=build.saved_tensors_hooks) as saved:
        lm_loss(build.model(batch()[0]), batch()[1])
    stats, compressor.stats = compressor.stats, None
    assert saved.bytes == measured
    assert stats["compressed"]["stored_bytes"] <= measured
    assert stats["parameter"]["tensors"] > 0  # the matmuls' weights pass through (model state)
    assert stats["non_floating"]["tensors"] > 0  # the token ids


def test_pack_unpack_round_trip_errors_and_pass_through():
    torch.manual_seed(0)
    x = torch.randn(32, 64) * torch.linspace(0.1, 10, 32)[:, None]  # rows of very different scales
    for dtype, bound in (("bf16", 2 ** -8), ("fp8", 2 ** -3)):
        c = actcompress.Compressor(dict(dtype=dtype, scale="auto", min_numel=16), lambda: [])
        y = c.unpack(c.pack(x))
        assert y.dtype == x.dtype and y.shape == x.shape
        rel = ((y - x).abs() / x.abs().clamp(min=1e-3)).median()
        assert 0 < rel <= bound, (dtype, rel)
    c = actcompress.Compressor(dict(dtype="int8", scale="row", min_numel=16), lambda: [])
    packed = c.pack(x)
    assert packed[0].dtype == torch.int8 and packed[1].shape == (32, 1)
    err = (c.unpack(packed) - x).abs()
    step = x.abs().amax(dim=1, keepdim=True) / 127
    assert 0 < err.max() and bool((err <= step / 2 + 1e-6).all())  # absmax rounding: at most half a step
    per_tensor = actcompress.Compressor(dict(dtype="int8", scale="tensor", min_numel=16), lambda: [])
    assert per_tensor.pack(x)[1].numel() == 1
    # per-tensor scale: small rows lose more than with a scale per row
    assert (per_tensor.unpack(per_tensor.pack(x)) - x)[:4].abs().mean() > err[:4].mean()
    # pass-through: integers, small tensors, parameters, already narrow tensors
    w = torch.nn.Parameter(torch.randn(64, 64))
    c = actcompress.Compressor(dict(dtype="int8", scale="auto", min_numel=100), lambda: [w])
    for t, why in ((torch.arange(1000), "non_floating"), (torch.randn(10), "small"), (w, "parameter"),
                   (w.t(), "parameter"), (torch.randn(1000).to(torch.float8_e4m3fn), "already_narrow")):
        assert c.why_not(t) == why and c.pack(t) is t


def test_second_view_of_a_storage_is_not_stored_twice():
    """The SDPA output is saved as (B, H, T, Q) and as the projection's (B, T, C) input: one copy,
    and each view unpacks to its own layout's values."""
    c = actcompress.Compressor(dict(dtype="bf16", scale="auto", min_numel=1), lambda: [])
    base = torch.randn(2, 8, 3, 4)  # (B, T, H, Q) storage
    v1 = base.transpose(1, 2)  # (B, H, T, Q) view
    v2 = base.view(2, 8, 12)  # (B, T, C) view
    p1, p2 = c.pack(v1), c.pack(v2)
    assert isinstance(p2, actcompress.ViewOf) and p2[0] is p1
    assert torch.equal(c.unpack(p2), v2.to(torch.bfloat16).float())
    assert torch.equal(c.unpack(p1), v1.to(torch.bfloat16).float())
    v2.add_(1)  # modified in place: the cached copy no longer holds its values
    assert not isinstance(c.pack(v2), actcompress.ViewOf)


def test_gradient_error_is_bounded_and_nonzero_and_forward_unchanged():
    """One backward through compressed saved tensors vs the uncompressed one on the same batch:
    the loss is identical (the forward is not touched), the gradients differ by a small, nonzero
    relative L2 error, ordered by the formats' precision (bf16 < int8 per-row)."""
    x, y = batch()
    errors = {}
    for dtype in ("bf16", "fp8", "int8"):
        build = build_run("nano", [f"actcompress:dtype={dtype}"], seed=0)
        loss_ref, ref = grads(build.model, x, y)
        loss_c, got = grads(build.model, x, y, build.saved_tensors_hooks)
        assert loss_c == loss_ref
        diff = sum(float((g - r).square().sum()) for r, g in zip(ref, got)) ** 0.5
        norm = sum(float(r.square().sum()) for r in ref) ** 0.5
        errors[dtype] = diff / norm
    assert 0 < errors["bf16"] < 0.01 and 0 < errors["int8"] < 0.03 and 0 < errors["fp8"] < 0.1, errors
    assert errors["bf16"] < errors["int8"] < errors["fp8"], errors


def test_training_record_has_ratio_and_gradient_error():
    r = train.run(Recipe(model="nano", data="synthetic", batch_size=4, seq_len=64, steps=3, eval_batches=1,
                         techniques=["actcompress:dtype=int8"]))
    notes = r["technique_notes"]["actcompress"]
    assert notes["saved_bytes"] == r["memory"]["activations_bytes"]  # the meter's bytes: compressed
    assert notes["dtype_ratio"] == 0.25 and notes["scale"] == "row"
    assert 0.25 < notes["measured_ratio"] < 0.3
    assert 0 < notes["grad_rel_l2_error"] < 0.05 and notes["loss_difference"] == 0.0
    assert notes["pack_decisions"]["compressed"]["tensors"] > 0


@pytest.mark.parametrize("spec,words", [
    ("actcompress:dtype=int4", ["int4", "bf16, fp8, int8"]),
    ("actcompress:min_numel=0", ["min_numel", ">= 1"]),
    ("actcompress:dtype=bf16,scale=row", ["scale=row", "bf16"]),
])
def test_bad_options_refused(spec, words):
    with pytest.raises(ConfigError) as e:
        techniques.configure([techniques.parse(spec)])
    assert all(w in str(e.value) for w in words)


def test_conflicts_and_bf16_under_autocast_refused():
    with pytest.raises(ConfigError, match="saved-tensor hooks"):
        techniques.configure([techniques.parse("actcompress"), techniques.parse("checkpoint")])
    with pytest.raises(ConfigError, match="already save 16-bit"):
        techniques.configure([techniques.parse("actcompress:dtype=bf16"), techniques.parse("bf16")])
    techniques.configure([techniques.parse("actcompress:dtype=int8"), techniques.parse("bf16")])  # fine


def test_offload_refused_on_cpu_before_any_work():
    recipe = Recipe(model="nano", data="synthetic", steps=1, device="cpu", techniques=["offload"])
    with pytest.raises(ConfigError, match="nothing to offload.*host memory"):
        train.validate(recipe)
    with pytest.raises(ConfigError, match="nothing to offload"):  # a build on a CPU device, too
        build_run("nano", ["offload"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offload moves activations off a CUDA device")
def test_offload_on_cuda_moves_saved_bytes_to_host():
    build = build_run("nano", ["offload"], device="cuda")
    engine = TorchEngine(build, Recipe(model="nano"), total_steps=1)
    x, y = (t.cuda() for t in batch())
    engine.activation_bytes(x, y)
    by_device = build.activation_bytes_by_device
    assert by_device.get("cpu", 0) > 0 and by_device.get("cuda", 0) == 0
    loss = engine.train_step(x, y, 0)
    assert loss == loss


def _bench():
    sys.path.insert(0, str(REPO))
    ours = sys.modules.get("benchmarks")
    if ours is None or not str(getattr(ours, "__file__", "")).startswith(str(REPO)):
        # fairscale installs a top-level `benchmarks` package: ours first.  Only then: dropping our
        # own modules would give later tests a second `benchmarks.common` beside the one the
        # already-imported suites hold.
        for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
            del sys.modules[name]
    return importlib.import_module("benchmarks.bench_actmem")


@pytest.mark.parametrize("variant", ["baseline", "actcompress-bf16", "actcompress-fp8", "actcompress-int8",
                                     "checkpoint-every1"])
def test_every_bench_variant_is_a_valid_recipe(variant):
    bench = _bench()
    specs, overrides = bench.VARIANTS[variant]
    train.validate(train.Recipe(**bench._recipe(**overrides), techniques=specs,
                                flops_budget=bench.SETTINGS["flops_budget"]))
    assert set(bench.SPEED_VARIANTS) <= set(bench.VARIANTS) and "baseline" in bench.SPEED_VARIANTS
