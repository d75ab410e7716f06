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


def probe_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = PROBE_SIZE, repeats: int = 10) -> float:
    """Best-of-``repeats`` (the best resists a briefly busy machine) FLOP/s of an n×n×n matmul (2n³ FLOPs) on ``device`` in ``dtype``."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b  # warm-up: thread pool start, kernel selection
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, reprobe: bool = False) -> dict:
    """``{"value": FLOP/s, "source": str}`` for ``device`` and ``dtype``; ``reprobe`` replaces the
    cached probe (e.g. one taken while the machine was busy)."""
    device = torch.device(device)
    name = device_name(device)
    dtype_name = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        for key, table in _GPU_PEAKS.items():
            if key in name and dtype in table:
                return {"value": table[dtype], "source": f"table:{key}/{dtype_name}"}
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    cache_key = f"{name}|{device.type}|{dtype_name}|{threads}threads|n{PROBE_SIZE}|torch{torch.__version__}"
    path = _cache_path()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if reprobe or cache_key not in cache:
        cache[cache_key] = probe_matmul_flops(device, dtype)
        write_text(path, json.dumps(cache, indent=1, sort_keys=True))
    where = f"{device.type}/{dtype_name}/matmul-{PROBE_SIZE}" + (f"/{threads}threads" if threads else "")
    return {"value": cache[cache_key], "source": f"probe:{where}"}
