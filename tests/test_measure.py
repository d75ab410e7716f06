import pytest
import torch

from impls.loss import lm_loss
from impls import zoo
from impls.measure import (SavedActivations, count_flops, model_flops_per_step, model_state_bytes,
                           peak_flops, tensor_bytes)
from impls.measure import peak as peak_module


def _train_step_flops(model, batch, seq_len):
    x = torch.randint(0, model.cfg.vocab_size, (batch, seq_len))

    def step():
        lm_loss(model(x), x).backward()

    return count_flops(step)


@pytest.mark.parametrize("name,batch,seq_len", [("nano", 4, 128), ("micro", 2, 256), ("small", 1, 256)])
def test_counted_training_flops_match_6N_plus_attention_within_5_percent(name, batch, seq_len):
    model = zoo.build(name)
    counted, per_op = _train_step_flops(model, batch, seq_len)
    analytic = model_flops_per_step(model, batch, seq_len)
    assert abs(counted / analytic - 1) < 0.05, (counted, analytic)
    # Attention must be counted on a CPU: torch registers only the CUDA SDPA kernels.
    assert per_op["aten._scaled_dot_product_flash_attention_for_cpu"] > 0
    assert per_op["aten._scaled_dot_product_flash_attention_for_cpu_backward"] > 0


def test_attention_flops_follow_the_sdpa_formula():
    b, h, t, q = 2, 4, 32, 16
    query = torch.randn(b, h, t, q, requires_grad=True)
    total, per_op = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(
        query, query, query, is_causal=True).sum().backward())
    forward = 2 * (2 * b * h * t * t * q)  # QK^T and PV
    assert per_op["aten._scaled_dot_product_flash_attention_for_cpu"] == forward
    # The backward recomputes the scores, then takes four gradient matmuls: 2.5x the forward.
    assert per_op["aten._scaled_dot_product_flash_attention_for_cpu_backward"] == forward * 5 // 2


def test_model_state_bytes_of_adamw_are_params_grads_and_two_moments():
    model = zoo.build("nano")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (2, 16))
    lm_loss(model(x), x).backward()
    opt.step()
    n = model.num_params()
    b = model_state_bytes(model, opt)
    assert b["params_bytes"] == 4 * n  # tied embedding counted once
    assert b["grads_bytes"] == 4 * n
    n_tensors = len(list(model.parameters()))
    assert b["optimizer_bytes"] == 8 * n + 4 * n_tensors  # exp_avg, exp_avg_sq, a float32 step each


def test_model_state_bytes_on_meta_use_nominal_sizes():
    model = zoo.build("gpt2", device="meta")
    assert model_state_bytes(model)["params_bytes"] == 4 * 124_439_808


def test_tensor_bytes_counts_views_and_shared_storages_once():
    a = torch.zeros(1000)
    assert tensor_bytes([a, a[:10], a.view(10, 100).t()]) == 4000
    assert tensor_bytes([a, torch.zeros(10)]) == 4040


def test_saved_activations_exclude_parameters_and_deduplicate():
    layer = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(8, 64, requires_grad=True)
    with SavedActivations(layer.parameters()) as saved:
        layer(x)
    assert saved.bytes == x.numel() * 4  # the weight is saved too, but it is model state
    with SavedActivations() as saved:
        y = x * x  # saves x twice: one storage
    assert saved.bytes == x.numel() * 4
    assert y.shape == x.shape


def test_activation_bytes_grow_linearly_with_batch():
    model = zoo.build("nano")
    sizes = []
    for batch in (2, 4):
        x = torch.randint(0, 256, (batch, 64))
        with SavedActivations(model.parameters()) as saved:
            lm_loss(model(x), x)
        sizes.append(saved.bytes)
    assert sizes[1] == pytest.approx(2 * sizes[0], rel=0.02)


def test_peak_probe_is_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("ETBENCH_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(peak_module, "probe_matmul_flops", lambda *a, **k: calls.append(1) or (1e11, 2048))
    first = peak_flops("cpu", torch.float32)
    second = peak_flops("cpu", torch.float32)
    assert first["fresh"] == first["value"] and "fresh" not in second and len(calls) == 1
    assert (first["value"], first["source"]) == (second["value"], second["source"])
    assert first["source"].startswith("probe:cpu/float32/mm+linear-2048/")


def test_peak_cache_keeps_the_best_probe(tmp_path, monkeypatch):
    """A probe is a lower bound of the peak: one taken under load (lower) never replaces a higher
    cached one, so it cannot push MFU above 100%; a higher one does replace it."""
    monkeypatch.setenv("ETBENCH_CACHE", str(tmp_path))
    rates = iter([190e9, 121e9, 195e9])
    monkeypatch.setattr(peak_module, "probe_matmul_flops", lambda *a, **k: (next(rates), 2048))
    assert peak_flops("cpu", torch.float32)["value"] == 190e9
    busy = peak_flops("cpu", torch.float32, reprobe=True)
    assert busy["fresh"] == 121e9 and busy["value"] == 190e9 and busy["source"].endswith("best-of-2")
    assert peak_flops("cpu", torch.float32, reprobe=True)["value"] == 195e9
    assert peak_flops("cpu", torch.float32)["value"] == 195e9


def test_known_gpus_are_probed_and_cross_checked_against_the_datasheet(tmp_path, monkeypatch):
    """The denominator is the measured probe (the kernel the model runs); the datasheet's dense
    peak rides along as a cross-check (tests/test_gpu_peak.py covers the GPU path in full)."""
    from types import SimpleNamespace

    monkeypatch.setenv("ETBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(peak_module, "device_name", lambda device: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(
        name="NVIDIA H100 80GB HBM3", multi_processor_count=132, total_memory=80 << 30, major=9, minor=0))
    monkeypatch.setattr(peak_module, "probe_gpu_matmul_flops", lambda device, dtype: (700e12, 8192))
    peak = peak_flops("cuda:0", torch.bfloat16)
    assert peak["value"] == 700e12 and peak["source"].startswith("probe:cuda/bfloat16/mm+linear-8192/cuda-events")
    assert peak["datasheet"] == 989.4e12 and peak["sku"] == "H100 SXM5"
    assert peak["measured_over_datasheet"] == pytest.approx(700 / 989.4)


def test_matmul_probe_measures_a_plausible_rate():
    rate, n = peak_module.probe_matmul_flops("cpu", torch.float32, max_n=256, repeats=2)
    assert 1e8 < rate < 1e14 and n == 256


def test_matmul_probe_shrinks_when_a_matmul_is_slow():
    _, n = peak_module.probe_matmul_flops("cpu", torch.float32, max_n=1024, repeats=1, max_seconds=0.0)
    assert n == 128


def test_a_freed_parameter_storage_is_not_mistaken_for_a_parameter():
    """FSDP2 frees each block's gathered parameters after its forward; an activation of the same
    size may then get the same address.  Only a parameter storage that is still allocated is
    excluded from the activation bytes."""
    from impls.measure.memory import is_live_param, param_storages, storage_key

    weight = torch.nn.Parameter(torch.randn(8, 8))
    storages = param_storages([weight])
    key = storage_key(weight)
    assert is_live_param(storages, key)
    weight.untyped_storage().resize_(0)  # what FSDP2's reshard does to the unsharded parameter
    assert not is_live_param(storages, key)
    assert not is_live_param(storages, storage_key(torch.randn(8, 8)))
