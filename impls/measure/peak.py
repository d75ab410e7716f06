"""The denominator of MFU/HFU: the device's peak FLOP/s, and where that number came from.

On GPUs we know, the vendor's dense peak for the dtype (a table); elsewhere a timed square-matmul
probe in the run's dtype, cached per machine.  Every record stores the ``source`` string, so an
MFU measured against a probe is never compared silently with one measured against a datasheet.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from ..files import write_text

# Dense (no 2:4 sparsity) peak FLOP/s from the vendors' datasheets.  fp32 on Ampere/Hopper uses
# TF32 tensor cores only when allowed; we record the plain-fp32 CUDA-core peak for fp32 runs.
_GPU_PEAKS = {
    "H200": {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 66.9e12},
    "H100": {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 66.9e12},
    "A100": {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 19.5e12},
}

PROBE_SIZE = 2048


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


def probe_matmul_flops(device: torch.device, dtype: torch.dtype, max_n: int = PROBE_SIZE, repeats: int = 10,
                       max_seconds: float = 0.5) -> tuple[float, int]:
    """``(FLOP/s, n)``: the best-of-``repeats`` rate (the best resists a briefly busy machine) of
    an n×n×n product (2n³ FLOPs) on ``device`` in ``dtype``, through both ``a @ b`` and
    ``F.linear`` — the op every model matmul runs — whichever is faster: on a CPU they can take
    different kernels (fp16 ``a @ b`` falls back to a reference loop at ~1 GFLOP/s while
    ``F.linear`` reaches oneDNN at ~40), and a peak below what the model's own kernel achieves
    would put its MFU above 100%.  For each op ``n`` grows from 128 up to ``max_n`` while one of
    its products stays under ``max_seconds``, so the probe stays cheap on slow paths too."""
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
    for make in (lambda a, b: (lambda: a @ b), lambda a, b: (lambda: torch.nn.functional.linear(a, b))):
        n = 128
        while True:
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            op = make(a, b)
            op()  # warm-up: thread pool start, kernel selection
            # Doubling n multiplies the time by 8: stop before a product would exceed max_seconds.
            if n >= max_n or 8 * timed(op) > max_seconds:
                break
            n *= 2
        rate = 2 * n**3 / min(timed(op) for _ in range(repeats))
        if rate > best_rate:
            best_rate, best_n = rate, n
    return best_rate, best_n


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, reprobe: bool = False) -> dict:
    """``{"value": FLOP/s, "source": str}`` for ``device`` and ``dtype``.

    A probe can only under-estimate the peak (another process takes cycles, the clock drops),
    never exceed it: every probe is a lower bound, so the cache keeps the *highest* rate ever
    probed for this device, dtype, thread count and torch version.  ``reprobe`` measures again
    (``fresh`` in the result), and a probe taken while the machine was busy never lowers the
    denominator -- which would push MFU above 100%."""
    device = torch.device(device)
    name = device_name(device)
    dtype_name = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        for key, table in _GPU_PEAKS.items():
            if key in name and dtype in table:
                return {"value": table[dtype], "source": f"table:{key}/{dtype_name}"}
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    # "mm+linear": probes of earlier versions timed a @ b only, which under-rates CPU fp16.
    cache_key = f"{name}|{device.type}|{dtype_name}|{threads}threads|torch{torch.__version__}|mm+linear"
    path = _cache_path()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    fresh = None
    if reprobe or not isinstance(cache.get(cache_key), dict):
        value, n = probe_matmul_flops(device, dtype)
        fresh = value
        old = cache.get(cache_key)
        if not isinstance(old, dict) or not old.get("value", 0) >= value:
            cache[cache_key] = {"value": value, "n": n, "probes": (old or {}).get("probes", 0) + 1 if isinstance(old, dict) else 1}
        else:
            cache[cache_key] = dict(old, probes=old.get("probes", 1) + 1)
        write_text(path, json.dumps(cache, indent=1, sort_keys=True))
    probe = cache[cache_key]
    where = f"{device.type}/{dtype_name}/mm+linear-{probe['n']}" + (f"/{threads}threads" if threads else "")
    result = {"value": probe["value"], "source": f"probe:{where}/best-of-{probe.get('probes', 1)}"}
    if fresh is not None:
        result["fresh"] = fresh
    return result


#: Relative change of the probed peak between the start and the end of a benchmark run above
#: which the run is flagged noisy (quiet-machine repeats of the fp32 probe agree within a few %).
PEAK_DRIFT = 0.10


def bench_probe(path: str | os.PathLike, phase: str, device: torch.device,
                dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)) -> dict:
    """Re-probe the peak FLOP/s at the ``start`` or ``end`` of a benchmark run and log it in
    ``path`` (JSON): the fresh probes (``peaks``) and the denominator runs divide by (``kept``,
    the highest probe so far: :func:`peak_flops`), so a low probe under load is visible without
    lowering any MFU's denominator.  The log's ``noisy`` flag is set when the start and end
    probes differ by more than :data:`PEAK_DRIFT` for any dtype, a fresh probe falls more than
    that below the kept peak, or the load exceeded the cores at either end."""
    if phase not in ("start", "end"):
        raise ValueError(f"phase must be start or end, got {phase!r}")
    path = Path(path)
    try:
        log = json.loads(path.read_text()) if phase == "end" else {}
    except (OSError, ValueError):
        log = {}
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = None
    probes = {str(d).removeprefix("torch."): peak_flops(device, d, reprobe=True) for d in dtypes}
    log[phase] = dict(time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), load1=load, cpu_count=os.cpu_count(),
                      peaks={k: v["fresh"] for k, v in probes.items()}, kept={k: v["value"] for k, v in probes.items()},
                      sources={k: v["source"] for k, v in probes.items()})
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
