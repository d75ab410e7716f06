"""The MFU denominator on GPUs (impls/measure/peak.py) and in mixed-dtype runs (impls/train.py),
all on a CPU: the CUDA device is faked (``torch.cuda.get_device_name``/``get_device_properties``/
``is_available`` and the probe itself), the CUDA-event timing path runs with injected fake events.

* GPU peaks are measured probes kept as a lower bound (the highest ever), ``fresh`` on reprobe,
  cross-checked against the datasheet row of the exact SKU (ratio, warning when above it);
* fp32 on CUDA is probed and cached under the TF32 setting in force;
* a run divides by peak_eff = Σ F_d / Σ (F_d / P_d) over the dtypes its GEMMs run in, and a
  one-dtype run by exactly that dtype's peak, as before.
"""
from __future__ import annotations

import functools
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from impls import train
from impls.errors import ConfigError
from impls.measure import peak as peak_module
from impls.measure.flops import DtypeFlopCounterMode, gemm_dtype
from impls.measure.peak import bench_probe, effective_peak, gpu_sku, peak_flops

pytestmark = pytest.mark.usefixtures("one_thread")
GIB = 1 << 30
T = 1e12


def fake_gpu(monkeypatch, tmp_path, name="NVIDIA H100 80GB HBM3", sms=132, memory=80 * GIB, capability=(9, 0),
             rates=None):
    """A CUDA device named ``name`` whose probe returns ``rates(dtype)`` (FLOP/s); returns the list
    of probed dtypes.  The peak cache lives in ``tmp_path``."""
    monkeypatch.setenv("ETBENCH_CACHE", str(tmp_path))
    props = SimpleNamespace(name=name, multi_processor_count=sms, total_memory=memory, major=capability[0],
                            minor=capability[1])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    probed = []
    rates = rates or (lambda dtype: 500 * T)

    def probe(device, dtype):
        assert torch.device(device).type == "cuda"
        probed.append(dtype)
        return rates(dtype), peak_module.GPU_PROBE_SIZE

    monkeypatch.setattr(peak_module, "probe_gpu_matmul_flops", probe)
    return probed


# --------------------------------------------------------------------------- GPU peaks


def test_bench_probe_on_cuda_reprobes_fp32_bf16_and_fp8_with_fresh_values(tmp_path, monkeypatch):
    """The KeyError of issue 22: a known GPU returned a table entry without ``fresh``."""
    rates = {torch.float32: 50 * T, torch.bfloat16: 700 * T, torch.float8_e4m3fn: 1300 * T}
    probed = fake_gpu(monkeypatch, tmp_path, rates=rates.get)
    log = bench_probe(tmp_path / "peak.json", "start", torch.device("cuda:0"))
    assert probed == [torch.float32, torch.bfloat16, torch.float8_e4m3fn]
    start = log["start"]
    assert start["peaks"] == {"float32": 50 * T, "bfloat16": 700 * T, "float8_e4m3fn": 1300 * T}
    assert start["kept"] == start["peaks"]
    assert start["datasheet"] == {"float32": 66.9 * T, "bfloat16": 989.4 * T, "float8_e4m3fn": 1978.9 * T}
    assert start["measured_over_datasheet"]["bfloat16"] == pytest.approx(700 / 989.4)
    assert all(s.startswith("probe:cuda/") and "cuda-events" in s for s in start["sources"].values())
    log = bench_probe(tmp_path / "peak.json", "end", torch.device("cuda:0"))
    assert log["drift"] == {"float32": 0.0, "bfloat16": 0.0, "float8_e4m3fn": 0.0} and log["noisy"] is not None
    assert json.loads((tmp_path / "peak.json").read_text())["end"]["peaks"] == start["peaks"]


def test_bench_probe_skips_fp8_below_compute_capability_8_9(tmp_path, monkeypatch):
    probed = fake_gpu(monkeypatch, tmp_path, name="NVIDIA A100-SXM4-80GB", sms=108, capability=(8, 0))
    log = bench_probe(tmp_path / "peak.json", "start", torch.device("cuda"))
    assert probed == [torch.float32, torch.bfloat16] and set(log["start"]["peaks"]) == {"float32", "bfloat16"}


def test_peak_flops_reprobe_on_cuda_has_fresh_and_the_cache_keeps_the_highest(tmp_path, monkeypatch):
    rates = iter([700 * T, 520 * T, 760 * T])
    fake_gpu(monkeypatch, tmp_path, rates=lambda dtype: next(rates))
    first = peak_flops("cuda:0", torch.bfloat16)
    assert first["value"] == first["fresh"] == 700 * T
    busy = peak_flops("cuda:0", torch.bfloat16, reprobe=True)  # a probe under load: lower, not kept
    assert busy["fresh"] == 520 * T and busy["value"] == 700 * T and busy["source"].endswith("best-of-2")
    assert peak_flops("cuda:0", torch.bfloat16, reprobe=True)["value"] == 760 * T
    cached = peak_flops("cuda:0", torch.bfloat16)
    assert cached["value"] == 760 * T and "fresh" not in cached
    assert cached["source"] == "probe:cuda/bfloat16/mm+linear-8192/cuda-events/best-of-3"


def test_a_mig_slice_does_not_share_the_whole_chips_probe_and_its_datasheet_is_scaled(tmp_path, monkeypatch):
    fake_gpu(monkeypatch, tmp_path, rates=lambda dtype: 700 * T)
    whole = peak_flops("cuda:0", torch.bfloat16)
    probed = fake_gpu(monkeypatch, tmp_path, sms=66, rates=lambda dtype: 340 * T)
    half = peak_flops("cuda:0", torch.bfloat16)
    assert probed == [torch.bfloat16] and (whole["value"], half["value"]) == (700 * T, 340 * T)
    assert half["datasheet"] == pytest.approx(989.4 * T / 2) and "scaled to 66/132 SMs" in half["peak_source"]


@pytest.mark.parametrize("name, props, sku", [
    ("NVIDIA H100 80GB HBM3", {}, "H100 SXM5"),
    ("NVIDIA H100 SXM5 80GB", {}, "H100 SXM5"),
    ("NVIDIA H100 PCIe", {}, "H100 PCIe"),
    ("NVIDIA H100 NVL", {}, "H100 NVL"),
    ("NVIDIA H200", {}, "H200 SXM"),
    ("NVIDIA H200 NVL", {}, "H200 NVL"),
    ("NVIDIA A100-SXM4-80GB", {}, "A100 SXM4"),
    ("NVIDIA A100-SXM4-40GB", {}, "A100 SXM4"),
    ("NVIDIA A100-PCIE-40GB", {}, "A100 PCIe"),
    ("NVIDIA A100 80GB PCIe", {}, "A100 PCIe"),
    # a name that does not say which H100: the properties do
    ("NVIDIA H100", dict(multi_processor_count=114, total_memory=80 * GIB), "H100 PCIe"),
    ("NVIDIA H100", dict(multi_processor_count=132, total_memory=80 * GIB), "H100 SXM5"),
    ("NVIDIA H100", dict(multi_processor_count=132, total_memory=95830 << 20), "H100 NVL"),
    ("NVIDIA H100", dict(multi_processor_count=16, total_memory=10 * GIB), None),
    ("NVIDIA GeForce RTX 4090", {}, None),
])
def test_sku_detection(name, props, sku):
    got, how = gpu_sku(name, SimpleNamespace(**props) if props else None)
    assert (got.name if got else None) == sku and how


@pytest.mark.parametrize("name, sms, memory, dtype, figure", [
    ("NVIDIA H100 80GB HBM3", 132, 80 * GIB, torch.bfloat16, 989.4),
    ("NVIDIA H100 80GB HBM3", 132, 80 * GIB, torch.float8_e4m3fn, 1978.9),
    ("NVIDIA H100 80GB HBM3", 132, 80 * GIB, torch.int8, 1978.9),
    ("NVIDIA H100 80GB HBM3", 132, 80 * GIB, torch.float32, 66.9),
    ("NVIDIA H100 PCIe", 114, 80 * GIB, torch.bfloat16, 756.5),
    ("NVIDIA H100 PCIe", 114, 80 * GIB, torch.float8_e4m3fn, 1513),
    ("NVIDIA H100 PCIe", 114, 80 * GIB, torch.float32, 51.2),
    ("NVIDIA H100 NVL", 132, 95830 << 20, torch.bfloat16, 835.5),
    ("NVIDIA H100 NVL", 132, 95830 << 20, torch.float8_e4m3fn, 1671),
    ("NVIDIA H100 NVL", 132, 95830 << 20, torch.float32, 59.8),
    ("NVIDIA H200", 132, 141 * 10**9, torch.bfloat16, 989.4),
    ("NVIDIA H200", 132, 141 * 10**9, torch.float8_e4m3fn, 1978.9),
    ("NVIDIA A100-SXM4-80GB", 108, 80 * GIB, torch.float16, 312),
    ("NVIDIA A100-PCIE-40GB", 108, 40 * GIB, torch.bfloat16, 312),
    ("NVIDIA A100-SXM4-80GB", 108, 80 * GIB, torch.float32, 19.5),
    ("NVIDIA A100-SXM4-80GB", 108, 80 * GIB, torch.int8, 624),
])
def test_datasheet_cross_check_of_each_sku(tmp_path, monkeypatch, name, sms, memory, dtype, figure):
    fake_gpu(monkeypatch, tmp_path, name=name, sms=sms, memory=memory, rates=lambda dtype: 0.8 * figure * T)
    peak = peak_flops("cuda:0", dtype)
    assert peak["value"] == 0.8 * figure * T  # the denominator: the measured probe, never the datasheet
    assert peak["datasheet"] == pytest.approx(figure * T)
    assert peak["measured_over_datasheet"] == pytest.approx(0.8)
    assert peak["peak_source"].startswith("datasheet:") and "warning" not in peak


def test_fp32_on_cuda_follows_the_tf32_setting_and_is_cached_by_it(tmp_path, monkeypatch):
    probed = fake_gpu(monkeypatch, tmp_path, rates=lambda dtype: (400 if tf32[0] else 50) * T)
    tf32 = [False]
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert torch.backends.cuda.matmul.allow_tf32 is False
        ieee = peak_flops("cuda:0", torch.float32)
        tf32[0] = True
        torch.set_float32_matmul_precision("high")  # what turns TF32 on in user code (allow_tf32 = True)
        fast = peak_flops("cuda:0", torch.float32)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert len(probed) == 2  # two cache entries: an IEEE probe never stands for a TF32 run
    assert (ieee["math"], ieee["value"], ieee["datasheet"]) == ("ieee", 50 * T, 66.9 * T)
    assert (fast["math"], fast["value"], fast["datasheet"]) == ("tf32", 400 * T, 494.7 * T)
    assert "float32-ieee" in ieee["source"] and "float32-tf32" in fast["source"]
    assert "/tf32 dense" in fast["peak_source"]


def test_a_measured_peak_above_the_datasheet_is_a_warning_never_silent(tmp_path, monkeypatch):
    fake_gpu(monkeypatch, tmp_path, name="NVIDIA H100 PCIe", sms=114, rates=lambda dtype: 950 * T)
    peak = peak_flops("cuda:0", torch.bfloat16)
    assert peak["value"] == 950 * T and peak["measured_over_datasheet"] == pytest.approx(950 / 756.5)
    assert "exceeds the H100 PCIe datasheet" in peak["warning"]


def test_an_unknown_gpu_gets_the_measured_probe_only(tmp_path, monkeypatch):
    fake_gpu(monkeypatch, tmp_path, name="NVIDIA GeForce RTX 4090", sms=128, capability=(8, 9),
             rates=lambda dtype: 150 * T)
    peak = peak_flops("cuda:0", torch.bfloat16)
    assert peak["value"] == 150 * T and peak["datasheet"] is None and peak["measured_over_datasheet"] is None
    assert peak["peak_source"].startswith("none: unknown GPU")


def test_fp8_has_no_datasheet_figure_on_an_a100_and_no_probe_below_8_9(tmp_path, monkeypatch):
    real_probe = peak_module.probe_gpu_matmul_flops
    fake_gpu(monkeypatch, tmp_path, name="NVIDIA A100-SXM4-80GB", sms=108, capability=(8, 0))
    with pytest.raises(ConfigError, match="compute capability >= 8.9"):  # refused before any tensor exists
        real_probe("cuda:0", torch.float8_e4m3fn)
    check = peak_module.datasheet_check("NVIDIA A100-SXM4-80GB", None, torch.float8_e4m3fn, None, 1.0)
    assert check["datasheet"] is None and "has no float8 figure" in check["peak_source"]


def test_float8_is_refused_off_cuda():
    with pytest.raises(ConfigError, match="no float8 GEMM on device 'cpu'"):
        peak_flops("cpu", torch.float8_e4m3fn)


# --------------------------------------------------------------------------- CUDA-event timing


class FakeEvent:
    """A CUDA event stand-in: ``elapsed_time`` plays back scripted milliseconds, and refuses to
    answer before the end event was synchronised (as a real one would be unfinished)."""

    def __init__(self, script: list, log: list):
        self.script, self.log, self.synced = script, log, False

    def record(self):
        self.log.append("record")

    def synchronize(self):
        self.synced = True
        self.log.append("sync")

    def elapsed_time(self, end: "FakeEvent") -> float:
        assert end.synced, "elapsed_time before the end event completed"
        return self.script.pop(0)


def test_time_with_events_takes_the_shortest_event_timed_repeat_after_warmup():
    calls, log, script = [], [], [4.0, 2.5, 3.0]
    best = peak_module.time_with_events(lambda: calls.append(1), repeats=3, warmup=2,
                                        event_factory=lambda: FakeEvent(script, log))
    assert best == pytest.approx(2.5e-3) and len(calls) == 5 and script == []
    assert log == ["record", "record", "sync"] * 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8, torch.float8_e4m3fn])
def test_gpu_probe_rate_is_2n3_over_the_best_event_time(dtype):
    """The GPU probe's code path on a CPU (small n, fake events): each op of the dtype (mm and
    linear; _int_mm in both layouts; _scaled_mm with and without fast accumulation) is timed and
    the best rate wins."""
    n, log = 32, []
    script = [8.0, 5.0, 6.0] + [2.0, 4.0, 3.0]  # ms: op 1's best is 5, op 2's is 2
    rate, got_n = peak_module.probe_gpu_matmul_flops("cpu", dtype, n=n, repeats=3, warmup=1,
                                                     event_factory=lambda: FakeEvent(script, log))
    assert got_n == n and rate == pytest.approx(2 * n**3 / 2e-3) and script == []


# --------------------------------------------------------------------------- per-dtype denominator


def test_effective_peak_is_the_flop_weighted_harmonic_mean():
    flops = {"bfloat16": 3e12, "float8_e4m3fn": 9e12}
    peaks = {"bfloat16": dict(value=800 * T, source="probe:bf16"),
             "float8_e4m3fn": dict(value=1600 * T, source="probe:fp8", datasheet=1978.9 * T)}
    got = effective_peak(flops, peaks)
    assert got["value"] == pytest.approx(12e12 / (3e12 / (800 * T) + 9e12 / (1600 * T)))
    assert 800 * T < got["value"] < 1600 * T
    assert got["by_dtype"]["bfloat16"] == dict(flops_share=0.25, peak=800 * T, source="probe:bf16")
    assert got["by_dtype"]["float8_e4m3fn"]["flops_share"] == 0.75
    assert got["by_dtype"]["float8_e4m3fn"]["datasheet"] == 1978.9 * T
    assert "bfloat16 25.0% at probe:bf16" in got["source"] and "F_d / P_d" in got["rule"]


def test_a_one_dtype_step_gets_exactly_that_dtypes_peak():
    peak = dict(value=7.0, source="probe:x", fresh=7.0)
    got = effective_peak({"float32": 3, "int8": 0}, {"float32": peak})
    assert got["value"] == 7.0 and got["source"] == "probe:x"  # not 3 / (3 / 7) = 7.000000000000001
    assert got["by_dtype"] == {"float32": dict(flops_share=1.0, peak=7.0, source="probe:x")}


def _split(fn) -> dict:
    with DtypeFlopCounterMode(display=False) as counter:
        fn()
    assert sum(counter.flops_by_dtype.values()) == counter.get_total_flops() > 0
    return dict(counter.flops_by_dtype)


def test_the_counter_splits_flops_by_the_dtype_each_gemm_runs_in():
    lin, x = nn.Linear(32, 32), torch.randn(16, 32, requires_grad=True)
    assert set(_split(lambda: lin(x).sum().backward())) == {"float32"}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the counter sees the ops after autocast's casts
        assert set(_split(lambda: lin(x).sum().backward())) == {"bfloat16"}
    a = torch.randint(-128, 128, (32, 32), dtype=torch.int8)
    assert _split(lambda: torch._int_mm(a, a)) == {"int8": 2 * 32**3}
    f8 = torch.randn(32, 32).to(torch.float8_e5m2)
    one = torch.ones(())
    assert _split(lambda: torch._scaled_mm(f8, f8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)) == {
        "float8_e4m3fn": 2 * 32**3}
    assert gemm_dtype((torch.ones(3, dtype=torch.bool),)) is None


def test_torchao_float8_linears_count_as_float8():
    """torchao's float8 tensors reach the counter as ``aten.mm`` on a wrapper whose dtype is the
    high-precision one; the payload is float8 and that is what runs (``_scaled_mm``)."""
    float8 = pytest.importorskip("torchao.float8")
    model = nn.Sequential(nn.Linear(32, 32))
    float8.convert_to_float8_training(model, config=float8.Float8LinearConfig.from_recipe_name("tensorwise"))
    x = torch.randn(16, 32, requires_grad=True)
    assert set(_split(lambda: model(x).sum().backward())) == {"float8_e4m3fn"}


COMMON = dict(model="nano", data="synthetic:vocab=64,train_tokens=8192,val_tokens=2048,row_len=64",
              batch_size=4, seq_len=32, steps=3, eval_batches=1, timing_warmup=0, device="cpu")


@pytest.fixture
def quick_probe(tmp_path, monkeypatch):
    """Real CPU probes (the MFU bound needs real rates), fewer repeats, a private cache."""
    monkeypatch.setenv("ETBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(peak_module, "probe_matmul_flops",
                        functools.partial(peak_module.probe_matmul_flops, repeats=3, max_n=1024))


@pytest.mark.parametrize("techniques, dtype", [([], torch.float32), (["bf16"], torch.bfloat16)])
def test_a_one_dtype_run_divides_by_that_dtypes_peak_as_before(quick_probe, techniques, dtype):
    """fp32, and bf16 autocast (every counted op, LM head and attention included, runs in bf16):
    the denominator is exactly what ``peak_flops(device, plan.autocast_dtype or fp32)`` gave before."""
    record = train.run(train.Recipe(**COMMON, techniques=techniques))
    peak, name = record["peak_flops"], str(dtype).removeprefix("torch.")
    assert peak["value"] == peak_flops("cpu", dtype)["value"]
    assert peak["source"] == peak_flops("cpu", dtype)["source"]
    assert peak["by_dtype"][name]["flops_share"] == 1.0 and set(peak["by_dtype"]) == {name}
    assert peak["rule"] and record["consistency_errors"] == []


def test_an_int8_run_charges_its_int8_gemms_at_the_int8_peak(quick_probe):
    record = train.run(train.Recipe(**COMMON, techniques=["int8"]))
    peak = record["peak_flops"]
    assert set(peak["by_dtype"]) == {"int8", "float32"}  # block Linears int8; attention, LM head fp32
    assert 0 < peak["by_dtype"]["int8"]["flops_share"] < 1
    assert sum(e["flops_share"] for e in peak["by_dtype"].values()) == pytest.approx(1)
    int8_peak, fp32_peak = peak_flops("cpu", torch.int8)["value"], peak_flops("cpu", torch.float32)["value"]
    shares = {d: e["flops_share"] for d, e in peak["by_dtype"].items()}
    assert peak["value"] == pytest.approx(1 / (shares["int8"] / int8_peak + shares["float32"] / fp32_peak))
    assert peak["by_dtype"]["int8"]["source"].startswith("probe:cpu/int8/_int_mm-")
    assert 0 < record["mfu"] <= 1 and 0 < record["hfu"] <= 1 and record["consistency_errors"] == []
