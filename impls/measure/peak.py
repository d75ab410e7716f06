"""The denominator of MFU/HFU: the device's peak FLOP/s, and where that number came from.

Every denominator is *measured*: a timed square-matmul probe in the dtype (and, for fp32 on a GPU,
the math mode) the model's GEMMs run in, cached per machine.  A probe can only under-estimate what
the hardware does (another process takes cycles, the clock drops), so every probe is a lower
bound and the cache keeps the highest rate ever probed; a datasheet figure, by contrast, can be
*above* anything the kernel the model calls can reach (cuBLAS fp32 with TF32 off is not the
datasheet's TF32 rate), or belong to another SKU than the one we run on.  On GPUs the vendor's
dense datasheet peak is kept beside the measured one as a cross-check (``datasheet``,
``peak_source``, ``measured_over_datasheet``): a measured rate above the datasheet by more than
:data:`DATASHEET_TOLERANCE` means the datasheet row or the SKU detection is wrong, and is recorded
as a ``warning``, never silently.

Every record stores the ``source`` string, so an MFU measured against one probe is never compared
silently with one measured against another.

A run whose GEMMs run in several dtypes (bf16 + fp8, fp32 + int8) is divided by
:func:`effective_peak`: each dtype's counted FLOPs at that dtype's peak.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import ConfigError
from ..files import write_text

PROBE_SIZE = 2048  # the largest CPU probe (it shrinks on slow paths: probe_matmul_flops)

#: GPU probes multiply n×n by n×n with n = GPU_PROBE_SIZE: large enough that one product keeps every
#: SM of an H100/H200 busy for about a millisecond (bf16) so launch overhead and the tail wave vanish
#: in the timing, and the rate is the tensor cores' sustained one.
GPU_PROBE_SIZE = 8192
GPU_PROBE_REPEATS = 10
GPU_PROBE_WARMUP = 3

#: A measured peak above the datasheet by more than this fraction is impossible for the SKU the
#: datasheet row describes: it is recorded as a warning (wrong row, or wrong SKU detected).
DATASHEET_TOLERANCE = 0.03

_FLOAT8 = tuple(d for d in (getattr(torch, n, None) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                                "float8_e5m2fnuz")) if d is not None)


def canonical_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype whose peak stands for ``dtype``: every float8 format is probed as e4m3fn (Hopper's
    tensor cores run e4m3 and e5m2 operands at one rate, the datasheets' single "FP8" figure)."""
    return torch.float8_e4m3fn if dtype in _FLOAT8 else dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(canonical_dtype(dtype)).removeprefix("torch.")


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_path() -> Path:
    root = os.environ.get("ETBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "etbench")
    return Path(root) / "peak_flops.json"


# --------------------------------------------------------------------------- datasheets


@dataclass(frozen=True)
class GpuSku:
    """One datasheet row: dense (no 2:4 sparsity) peak FLOP/s (OP/s for int8) per math kind, and
    the full chip's SM count (a MIG slice or a smaller bin has fewer; the datasheet is then scaled
    by the SM fraction)."""
    name: str
    sms: int
    peaks: dict  # "bfloat16", "float16", "tf32", "float32" (CUDA cores), "float8", "int8" -> FLOP/s or None
    cite: str


_H100_SHEET = ("NVIDIA H100 Tensor Core GPU datasheet and H100 architecture whitepaper (dense figures; the "
               "datasheet's starred ones are with sparsity, twice the dense ones)")
_H200_SHEET = "NVIDIA H200 Tensor Core GPU datasheet (dense: half the starred with-sparsity figures)"
_A100_SHEET = "NVIDIA A100 Tensor Core GPU datasheet (dense: half the starred with-sparsity figures)"
_T = 1e12
_H100_SXM = dict(bfloat16=989.4 * _T, float16=989.4 * _T, tf32=494.7 * _T, float32=66.9 * _T,
                 float8=1978.9 * _T, int8=1978.9 * _T)
_H100_NVL = dict(bfloat16=835.5 * _T, float16=835.5 * _T, tf32=417.5 * _T, float32=59.8 * _T,
                 float8=1671 * _T, int8=1671 * _T)
_A100 = dict(bfloat16=312 * _T, float16=312 * _T, tf32=156 * _T, float32=19.5 * _T, float8=None, int8=624 * _T)

#: The official NVIDIA datasheet figures, dense (without sparsity), per SKU.  H100's int8 OP/s
#: equal its fp8 FLOP/s; A100 has no fp8 tensor cores.  H200 (SXM) has H100 SXM's compute (more
#: and faster memory only), H200 NVL H100 NVL's.  fp32 is the CUDA-core rate; "tf32" the
#: tensor-core rate fp32 matmuls get when TF32 is allowed.  A GPU without a row here gets only
#: its measured probe: ``datasheet`` None, and ``peak_source`` says there is no row.
DATASHEETS = {
    "H100 SXM5": GpuSku("H100 SXM5", 132, _H100_SXM, _H100_SHEET),
    "H100 PCIe": GpuSku("H100 PCIe", 114, dict(bfloat16=756.5 * _T, float16=756.5 * _T, tf32=378 * _T,
                                               float32=51.2 * _T, float8=1513 * _T, int8=1513 * _T), _H100_SHEET),
    "H100 NVL": GpuSku("H100 NVL", 132, _H100_NVL, _H100_SHEET + "; NVL: per GPU, not per pair"),
    "H200 SXM": GpuSku("H200 SXM", 132, _H100_SXM, _H200_SHEET),
    "H200 NVL": GpuSku("H200 NVL", 132, _H100_NVL, _H200_SHEET),
    "A100 SXM4": GpuSku("A100 SXM4", 108, _A100, _A100_SHEET),
    "A100 PCIe": GpuSku("A100 PCIe", 108, _A100, _A100_SHEET),
}

_GIB = 1 << 30


def gpu_sku(name: str, props=None) -> tuple[GpuSku | None, str]:
    """``(datasheet row or None, how it was chosen)`` for a GPU named ``name``.

    Names tell the SKUs apart where they say so ("H100 PCIe", "H100 NVL", "A100-SXM4-80GB"); an
    H100 whose name does not (a bare "NVIDIA H100") is told by ``torch.cuda.get_device_properties``:
    114 SMs is the PCIe card, over 85 GiB of memory the NVL (94 GB: 95830 MiB usable, the SXM5's
    80 GB 81559 MiB), 132 SMs with 80 GB the SXM5.
    "H100 80GB HBM3" is the SXM5 (the PCIe card has HBM2e).  A100 SXM4 and PCIe have the same
    dense peaks, so an A100 of unknown form factor still gets its figures."""
    upper = name.upper()
    if "H200" in upper:
        return (DATASHEETS["H200 NVL"], "name") if "NVL" in upper else (DATASHEETS["H200 SXM"], "name")
    if "H100" in upper:
        if "NVL" in upper:
            return DATASHEETS["H100 NVL"], "name"
        if "PCIE" in upper:
            return DATASHEETS["H100 PCIe"], "name"
        if "SXM" in upper or "HBM3" in upper:
            return DATASHEETS["H100 SXM5"], "name"
        sms = getattr(props, "multi_processor_count", None)
        memory = getattr(props, "total_memory", None)
        if memory is not None and memory > 85 * _GIB:
            return DATASHEETS["H100 NVL"], f"properties: {memory / _GIB:.0f} GiB"
        if sms == 114:
            return DATASHEETS["H100 PCIe"], "properties: 114 SMs"
        if sms == 132:
            return DATASHEETS["H100 SXM5"], "properties: 132 SMs, <= 85 GiB"
        return None, f"ambiguous H100 ({sms} SMs, {memory} bytes): no datasheet row"
    if "A100" in upper:
        if "PCIE" in upper:
            return DATASHEETS["A100 PCIe"], "name"
        return DATASHEETS["A100 SXM4"], "name" if "SXM" in upper else "name (form factor unknown; same dense peaks)"
    return None, "unknown GPU: no datasheet row"


def _datasheet_key(dtype: torch.dtype, math: str | None) -> str:
    if dtype == torch.float32:
        return "tf32" if math == "tf32" else "float32"
    if dtype in _FLOAT8:
        return "float8"
    return dtype_name(dtype)


def datasheet_check(name: str, props, dtype: torch.dtype, math: str | None, measured: float) -> dict:
    """The datasheet cross-check of a measured GPU peak: ``sku``, ``datasheet`` (its dense peak for
    this dtype and math, or None), ``peak_source`` (which row, or why none), the ratio
    ``measured_over_datasheet``, and a ``warning`` when the measured rate exceeds the datasheet by
    more than :data:`DATASHEET_TOLERANCE`."""
    sku, how = gpu_sku(name, props)
    key = _datasheet_key(dtype, math)
    if sku is None:
        return dict(sku=None, datasheet=None, peak_source=f"none: {how} for {name!r}; measured probe only",
                    measured_over_datasheet=None)
    figure = sku.peaks.get(key)
    if figure is None:
        return dict(sku=sku.name, datasheet=None, peak_source=f"none: {sku.name} has no {key} figure ({sku.cite})",
                    measured_over_datasheet=None)
    source = f"datasheet:{sku.name}/{key} dense ({how}; {sku.cite})"
    sms = getattr(props, "multi_processor_count", None)
    if isinstance(sms, int) and 0 < sms < sku.sms:  # a MIG slice or a cut-down part: its share of the chip
        figure = figure * sms / sku.sms
        source += f", scaled to {sms}/{sku.sms} SMs"
    out = dict(sku=sku.name, datasheet=figure, peak_source=source, measured_over_datasheet=measured / figure)
    if measured > figure * (1 + DATASHEET_TOLERANCE):
        out["warning"] = (f"measured {measured / _T:.1f} TFLOP/s exceeds the {sku.name} datasheet's {key} "
                          f"{figure / _T:.1f} by {measured / figure - 1:.1%}: the datasheet row or the SKU "
                          f"detection ({how}) is wrong")
    return out


def fp32_matmul_math() -> str:
    """The math CUDA fp32 matmuls run in now: ``"tf32"`` (tensor cores, 10-bit mantissa products)
    when ``torch.backends.cuda.matmul.allow_tf32`` is set (``torch.set_float32_matmul_precision``
    "high" or "medium" set it), else ``"ieee"`` (CUDA cores).  The two differ ~7× on an H100, so
    the fp32 denominator is probed, and cached, under the setting the run trains with."""
    try:
        allowed = bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # newer torch refuses the legacy flag once the fp32_precision API was used
        allowed = getattr(torch.backends.cuda.matmul, "fp32_precision", "ieee") == "tf32"
    return "tf32" if allowed else "ieee"


# --------------------------------------------------------------------------- probes


def _matmul_ops(device: torch.device, dtype: torch.dtype) -> tuple[str, list[tuple[str, Callable]]]:
    """``(label, [(name, make)])``: the GEMMs the model's matmuls in ``dtype`` run, each ``make(n)``
    returning a zero-argument n×n×n product.  Floating dtypes: ``a @ b`` and ``F.linear`` (the op
    every model Linear runs; on a CPU the two can take different kernels).  float8:
    ``torch._scaled_mm`` on e4m3fn operands with unit fp32 scales, bf16 out, with and without fast
    accumulation (torchao's float8 training uses both).  int8: ``torch._int_mm`` (int8 × int8 ->
    int32) with the right operand row- and column-major (torchao's int8 training passes a
    transposed one)."""
    if dtype in _FLOAT8:
        def scaled(fast: bool):
            def make(n):
                a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
                b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # column-major, as required
                one = torch.ones((), device=device, dtype=torch.float32)
                return lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                                use_fast_accum=fast)
            return make
        return "_scaled_mm", [("_scaled_mm", scaled(False)), ("_scaled_mm-fast-accum", scaled(True))]
    if dtype == torch.int8:
        def int_mm(column_major: bool):
            def make(n):
                a = torch.randint(-128, 128, (n, n), dtype=torch.int8, device=device)
                b = torch.randint(-128, 128, (n, n), dtype=torch.int8, device=device)
                b = b.t().contiguous().t() if column_major else b
                return lambda: torch._int_mm(a, b)
            return make
        return "_int_mm", [("_int_mm", int_mm(False)), ("_int_mm-column-major", int_mm(True))]

    def floating(linear: bool):
        def make(n):
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            return (lambda: torch.nn.functional.linear(a, b)) if linear else (lambda: a @ b)
        return make
    return "mm+linear", [("mm", floating(False)), ("linear", floating(True))]


def probe_matmul_flops(device: torch.device, dtype: torch.dtype, max_n: int = PROBE_SIZE, repeats: int = 10,
                       max_seconds: float = 0.5) -> tuple[float, int]:
    """``(FLOP/s, n)`` on a host-timed device (the CPU): the best-of-``repeats`` rate (the best
    resists a briefly busy machine) of an n×n×n product (2n³ FLOPs) in ``dtype``, through every op
    of :func:`_matmul_ops` — for floating dtypes ``a @ b`` and ``F.linear``, whichever is faster: on
    a CPU they can take different kernels (fp16 ``a @ b`` falls back to a reference loop at
    ~1 GFLOP/s while ``F.linear`` reaches oneDNN at ~40), and a peak below what the model's own
    kernel achieves would put its MFU above 100%.  For each op ``n`` grows from 128 up to
    ``max_n`` while one of its products stays under ``max_seconds``, so the probe stays cheap on
    slow paths too.  GPUs are probed by :func:`probe_gpu_matmul_flops` (CUDA events)."""
    device = torch.device(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    # Each op grows its own n: sized by the fastest op, a slow path (fp16 ``a @ b`` on a CPU)
    # would time ``repeats`` products of the largest size at ~1 GFLOP/s -- minutes, not seconds.
    best_rate, best_n = 0.0, 128
    for _, make in _matmul_ops(device, canonical_dtype(dtype))[1]:
        n = 128
        while True:
            op = make(n)
            op()  # warm-up: thread pool start, kernel selection
            # Doubling n multiplies the time by 8: stop before a product would exceed max_seconds.
            if n >= max_n or 8 * timed(op) > max_seconds:
                break
            n *= 2
        rate = 2 * n**3 / min(timed(op) for _ in range(repeats))
        if rate > best_rate:
            best_rate, best_n = rate, n
    return best_rate, best_n


def _cuda_event():
    return torch.cuda.Event(enable_timing=True)


def time_with_events(fn: Callable, repeats: int = GPU_PROBE_REPEATS, warmup: int = GPU_PROBE_WARMUP,
                     event_factory: Callable = _cuda_event) -> float:
    """The shortest of ``repeats`` device-side durations of ``fn`` in seconds, after ``warmup``
    untimed calls (cuBLAS heuristics, clocks ramping up).  Each call is bracketed by two CUDA
    events recorded on the current stream: the GPU timestamps them when it reaches them, so the
    duration is the kernel's alone -- a host timer would add the launch latency and whatever the
    host does meanwhile.  ``event_factory`` makes an event (tests inject a fake one)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start, end = event_factory(), event_factory()
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)  # elapsed_time is in milliseconds
    return best


def probe_gpu_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = GPU_PROBE_SIZE,
                           repeats: int = GPU_PROBE_REPEATS, warmup: int = GPU_PROBE_WARMUP,
                           event_factory: Callable = _cuda_event) -> tuple[float, int]:
    """``(FLOP/s, n)`` on a GPU: 2n³ / the shortest CUDA-event-timed duration
    (:func:`time_with_events`) of an n×n×n product, best over the ops of :func:`_matmul_ops` for
    ``dtype`` (bf16/fp16/fp32: ``a @ b`` and ``F.linear``; fp32 in whatever math
    :func:`fp32_matmul_math` says is on; float8: ``torch._scaled_mm``; int8: ``torch._int_mm``).
    ``n`` >= :data:`GPU_PROBE_SIZE` on a real GPU; smaller sizes are for tests."""
    device = torch.device(device)
    dtype = canonical_dtype(dtype)
    if device.type == "cuda" and dtype in _FLOAT8:
        props = torch.cuda.get_device_properties(device)
        if (props.major, props.minor) < (8, 9):
            raise ConfigError(f"float8 GEMMs (torch._scaled_mm) need CUDA compute capability >= 8.9; "
                              f"{props.name} has {props.major}.{props.minor}")
    best = 0.0
    for _, make in _matmul_ops(device, dtype)[1]:
        op = make(n)
        best = max(best, 2 * n**3 / time_with_events(op, repeats, warmup, event_factory))
    return best, n


def _kept_probe(cache_key: str, probe: Callable[[], tuple[float, int]], reprobe: bool) -> tuple[dict, float | None]:
    """``(kept entry, fresh rate or None)``: the cached entry for ``cache_key`` (``value``, ``n``,
    ``probes``), probing first when there is none or ``reprobe``.  The entry keeps the highest rate
    ever probed: a probe is a lower bound of the peak, so a lower one (taken under load) only
    counts as one more probe."""
    path = _cache_path()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    fresh = None
    if reprobe or not isinstance(cache.get(cache_key), dict):
        value, n = probe()
        fresh = value
        old = cache.get(cache_key)
        if not isinstance(old, dict):
            cache[cache_key] = {"value": value, "n": n, "probes": 1}
        elif not old.get("value", 0) >= value:
            cache[cache_key] = {"value": value, "n": n, "probes": old.get("probes", 0) + 1}
        else:
            cache[cache_key] = dict(old, probes=old.get("probes", 1) + 1)
        write_text(path, json.dumps(cache, indent=1, sort_keys=True))
    return cache[cache_key], fresh


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, reprobe: bool = False) -> dict:
    """``{"value": FLOP/s, "source": str, ...}``: the MFU denominator for GEMMs in ``dtype`` on
    ``device``, a measured probe (:func:`probe_matmul_flops` on a CPU, CUDA-event timed
    :func:`probe_gpu_matmul_flops` on a GPU).

    A probe can only under-estimate the peak (another process takes cycles, the clock drops),
    never exceed it: every probe is a lower bound, so the cache keeps the *highest* rate ever
    probed for this device, dtype, thread count (CPU) or SM count and fp32 math (GPU), and torch
    version.  ``reprobe`` measures again (``fresh`` in the result), and a probe taken while the
    machine was busy never lowers the denominator -- which would push MFU above 100%.

    On a GPU the result also carries the datasheet cross-check (:func:`datasheet_check`:
    ``sku``, ``datasheet``, ``peak_source``, ``measured_over_datasheet``, ``warning``) and, for
    fp32, ``math`` ("tf32" or "ieee", :func:`fp32_matmul_math`): the denominator is the rate of the
    kernel the model runs under the same setting, else fp32 MFU could exceed 100% (TF32 on, IEEE
    probe) or be understated ~7× (the reverse)."""
    device = torch.device(device)
    dtype = canonical_dtype(dtype)
    if dtype in _FLOAT8 and device.type != "cuda":
        raise ConfigError(f"no float8 GEMM on device {device.type!r}: torch._scaled_mm there is a reference path "
                          f"(fp32 mm on converted operands), not a float8 kernel; float8 needs CUDA >= 8.9")
    name = device_name(device)
    label, _ = _matmul_ops(device, dtype)
    dname = dtype_name(dtype)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        math = fp32_matmul_math() if dtype == torch.float32 else None
        kind = dname + (f"-{math}" if math else "")
        # The SM count tells a MIG slice from the whole chip: their probes must not share an entry.
        cache_key = (f"{name}|cuda|{props.multi_processor_count}sm|{kind}|torch{torch.__version__}|"
                     f"{label}|cuda-events")
        probe, fresh = _kept_probe(cache_key, lambda: probe_gpu_matmul_flops(device, dtype), reprobe)
        result = {"value": probe["value"],
                  "source": f"probe:cuda/{kind}/{label}-{probe['n']}/cuda-events/best-of-{probe.get('probes', 1)}"}
        if math:
            result["math"] = math
        result.update(datasheet_check(name, props, dtype, math, probe["value"]))
    else:
        threads = torch.get_num_threads() if device.type == "cpu" else 0
        # "mm+linear": probes of earlier versions timed a @ b only, which under-rates CPU fp16.
        cache_key = f"{name}|{device.type}|{dname}|{threads}threads|torch{torch.__version__}|{label}"
        probe, fresh = _kept_probe(cache_key, lambda: probe_matmul_flops(device, dtype), reprobe)
        where = f"{device.type}/{dname}/{label}-{probe['n']}" + (f"/{threads}threads" if threads else "")
        result = {"value": probe["value"], "source": f"probe:{where}/best-of-{probe.get('probes', 1)}"}
    if fresh is not None:
        result["fresh"] = fresh
    return result


# --------------------------------------------------------------------------- mixed-dtype runs

#: How a run's MFU/HFU denominator combines the peaks of the dtypes its GEMMs run in (recorded).
MFU_RULE = ("each counted FLOP is charged at the peak of the dtype its op runs in (fp8 for _scaled_mm, int8 for "
            "_int_mm/scaled_int8_mm, the operands' dtype -- the autocast dtype under autocast -- otherwise; FLOPs "
            "of ops without one count in the run's compute dtype): peak_eff = sum_d F_d / sum_d (F_d / P_d)")


def effective_peak(flops_by_dtype: dict[str, float], peaks: dict[str, dict]) -> dict:
    """The MFU/HFU denominator of a step whose counted FLOPs ``flops_by_dtype`` ({dtype: F_d}) run
    at the peaks ``peaks`` ({dtype: :func:`peak_flops` result, value P_d}).

    MFU asks what fraction of the hardware's capability the step used; a step whose GEMMs run in
    several dtypes can at best take Σ_d F_d / P_d seconds (each dtype's FLOPs at its own peak), so
    the denominator is the rate that does the step's FLOPs in that time:

        peak_eff = Σ_d F_d / Σ_d (F_d / P_d)

    the FLOP-weighted harmonic mean of the per-dtype peaks (cf. torchtitan issue #560 on fp8 MFU).
    Dividing an fp8 run by the fp32 or bf16 peak instead overstates its MFU (above 100% against
    fp32), dividing it by the fp8 peak alone understates what its bf16 GEMMs could do.

    A one-dtype run gets that dtype's peak exactly (the same dict :func:`peak_flops` returned, not
    F / (F / P) rounded).  Added keys: ``by_dtype`` ({dtype: {"flops_share", "peak", "source",
    and the datasheet cross-check where there is one}}) and ``rule`` (:data:`MFU_RULE`)."""
    used = {d: float(f) for d, f in flops_by_dtype.items() if f > 0}
    if not used:
        raise ValueError(f"no FLOPs to weigh the peaks with: {flops_by_dtype!r}")
    total = sum(used.values())
    by_dtype = {}
    for d, f in sorted(used.items()):
        entry = dict(flops_share=f / total, peak=peaks[d]["value"], source=peaks[d]["source"])
        entry.update({k: peaks[d][k] for k in ("datasheet", "peak_source", "math", "warning") if k in peaks[d]})
        by_dtype[d] = entry
    if len(used) == 1:
        result = dict(peaks[next(iter(used))])
    else:
        value = total / sum(f / peaks[d]["value"] for d, f in used.items())
        result = dict(value=value, source="harmonic:" + " + ".join(
            f"{d} {e['flops_share']:.1%} at {e['source']}" for d, e in by_dtype.items()))
        warnings = [f"{d}: {e['warning']}" for d, e in by_dtype.items() if "warning" in e]
        if warnings:
            result["warning"] = "; ".join(warnings)
    result.update(by_dtype=by_dtype, rule=MFU_RULE)
    return result


# --------------------------------------------------------------------------- benchmark runs

#: Relative change of the probed peak between the start and the end of a benchmark run above
#: which the run is flagged noisy (quiet-machine repeats of the fp32 probe agree within a few %).
PEAK_DRIFT = 0.10


def bench_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    """The dtypes :func:`bench_probe` re-probes by default: fp32 and bf16, and on a GPU of compute
    capability >= 8.9 (Ada, Hopper) float8 e4m3 too, the dtype of fp8 runs' GEMMs."""
    device = torch.device(device)
    dtypes = (torch.float32, torch.bfloat16)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        if (props.major, props.minor) >= (8, 9):
            dtypes += (torch.float8_e4m3fn,)
    return dtypes


def bench_probe(path: str | os.PathLike, phase: str, device: torch.device,
                dtypes: tuple[torch.dtype, ...] | None = None) -> dict:
    """Re-probe the peak FLOP/s at the ``start`` or ``end`` of a benchmark run and log it in
    ``path`` (JSON): the fresh probes (``peaks``) and the denominator runs divide by (``kept``,
    the highest probe so far: :func:`peak_flops`), so a low probe under load is visible without
    lowering any MFU's denominator; on a GPU also each dtype's datasheet figure (``datasheet``)
    and any datasheet ``warnings``.  ``dtypes`` defaults to :func:`bench_dtypes`.  The log's
    ``noisy`` flag is set when the start and end probes differ by more than :data:`PEAK_DRIFT` for
    any dtype, a fresh probe falls more than that below the kept peak, or the load exceeded the
    cores at either end."""
    if phase not in ("start", "end"):
        raise ValueError(f"phase must be start or end, got {phase!r}")
    path = Path(path)
    dtypes = bench_dtypes(device) if dtypes is None else dtypes
    try:
        log = json.loads(path.read_text()) if phase == "end" else {}
    except (OSError, ValueError):
        log = {}
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = None
    probes = {dtype_name(d): peak_flops(device, d, reprobe=True) for d in dtypes}
    log[phase] = dict(time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), load1=load, cpu_count=os.cpu_count(),
                      peaks={k: v["fresh"] for k, v in probes.items()}, kept={k: v["value"] for k, v in probes.items()},
                      sources={k: v["source"] for k, v in probes.items()})
    if any("datasheet" in v for v in probes.values()):
        log[phase]["datasheet"] = {k: v.get("datasheet") for k, v in probes.items()}
        log[phase]["measured_over_datasheet"] = {k: v.get("measured_over_datasheet") for k, v in probes.items()}
        warnings = {k: v["warning"] for k, v in probes.items() if "warning" in v}
        if warnings:
            log[phase]["warnings"] = warnings
    if "start" in log and "end" in log:
        start, end = log["start"]["peaks"], log["end"]["peaks"]
        log["drift"] = {k: end[k] / start[k] - 1 for k in start if k in end}
        log["below_kept"] = {k: min(log[p]["peaks"][k] / log[p]["kept"][k] for p in ("start", "end")) - 1
                             for k in start if k in end and "kept" in log["start"]}
        loads = [p["load1"] for p in (log["start"], log["end"]) if p["load1"] is not None]
        log["noisy"] = (any(abs(v) > PEAK_DRIFT for v in log["drift"].values())
                        or any(v < -PEAK_DRIFT for v in log["below_kept"].values())
                        or any(v > (os.cpu_count() or 1) + 0.5 for v in loads))
        log["rule"] = (f"noisy when a probe drifts by > {PEAK_DRIFT:.0%}, falls > {PEAK_DRIFT:.0%} below the best "
                       f"probe kept, or the 1-min load exceeds the cores + 0.5")
    write_text(path, json.dumps(log, indent=1))
    return log
