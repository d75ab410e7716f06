"""Storing a pruned weight matrix sparse: exact bytes of torch's COO / CSR / BSR layouts against the
dense matrix across densities, the density below which each format pays, and sparse × dense
matmul time against the dense product, timed interleaved.

Bytes of an m×n matrix with nnz nonzeros, v bytes per value (fp32: 4) and i bytes per index
(torch's sparse layouts use int64 indices: 8), the formats of ``torch.sparse``:

* dense: m·n·v;
* COO (``to_sparse()``): a 2×nnz index tensor and nnz values: nnz·(v + 2i);
* CSR (``to_sparse_csr()``): m+1 row pointers, nnz column indices and values: nnz·(v + i) + (m+1)·i;
* BSR with b×b blocks (``to_sparse_bsr((b, b))``): m/b+1 block-row pointers, one column index
  and b²·v values per nonzero block: N_b·(b²v + i) + (m/b + 1)·i, where N_b counts the blocks
  holding at least one nonzero (a random unstructured pattern of density d fills a block with
  probability 1 - (1-d)^{b²}: at b = 16 and d = 1% that is 92%, so BSR pays only for block
  patterns, which this module measures as a second pattern).

With nnz = d·m·n, the crossover densities below which a format is smaller than dense:

* COO: d < v / (v + 2i) = 4/20 = 0.2;
* CSR: d < (m·n·v - (m+1)·i) / ((v + i)·m·n) = (4mn - 8(m+1)) / (12mn) ≈ 1/3;
* BSR, block pattern (N_b = d·mn/b²): d < (m·n·v - (m/b+1)·i) / (m·n·v + m·n·i/b²).

:func:`measure` builds each format from a seeded random matrix at each density, counts the bytes
of its component tensors (:func:`impls.measure.memory.sparse_components`) in the compact layout
the formula describes and as torch's conversion leaves them (``bytes_as_built``: CSR's and BSR's
column indices stay a view of the COO index buffer the conversion went through, see
:func:`compact`), finds the measured
crossover (linear interpolation of sparse - dense bytes between grid densities) and gives it
against the formula.  Speed: ``torch.sparse.mm(coo, X)``, ``csr @ X``, ``bsr @ X`` against
``W @ X`` on the same X (n × tokens), in rounds; within a round every (density, format) is timed
in a rotated order, the ratio sparse/dense is taken within the round at the same density, and
summarised over rounds with :func:`impls.measure.timing.ratio_stats` (median + order-statistic 95%
interval).  The speed crossover is the density where the median ratio crosses 1.
"""
from __future__ import annotations

import math
import time

import torch

from .. import families
from .memory import sparse_components, tensor_bytes

FORMATS = ("coo", "csr", "bsr")
VALUE_BYTES, INDEX_BYTES = 4, 8  # fp32 values, torch's int64 sparse indices


def random_matrix(m: int, n: int, density: float, pattern: str = "unstructured", block: int = 16,
                  seed: int = 0) -> torch.Tensor:
    """A seeded m×n fp32 matrix with exactly round(density·count) nonzero elements
    (``unstructured``) or nonzero b×b blocks (``block``), at uniformly random positions."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(m, n, generator=g)
    if pattern == "unstructured":
        keep = torch.zeros(m * n, dtype=torch.bool)
        keep[torch.randperm(m * n, generator=g)[:round(density * m * n)]] = True
        return values * keep.view(m, n)
    if pattern == "block":
        rows, cols = m // block, n // block
        keep = torch.zeros(rows * cols, dtype=torch.bool)
        keep[torch.randperm(rows * cols, generator=g)[:round(density * rows * cols)]] = True
        mask = keep.view(rows, cols).repeat_interleave(block, 0).repeat_interleave(block, 1)
        return values * mask
    raise ValueError(f"unknown pattern {pattern!r}; valid: unstructured, block")


def to_format(dense: torch.Tensor, fmt: str, block: int = 16) -> torch.Tensor:
    if fmt == "coo":
        return dense.to_sparse()
    if fmt == "csr":
        return dense.to_sparse_csr()
    if fmt == "bsr":
        return dense.to_sparse_bsr((block, block))
    raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")


def compact(t: torch.Tensor) -> torch.Tensor:
    """The same sparse tensor with each component in its own storage.  torch's dense -> CSR/BSR
    conversion goes through COO and leaves ``col_indices`` a view of the 2×nnz COO index buffer,
    which stays allocated (8 extra bytes per nonzero, or per nonzero block): the formula counts
    the compact layout."""
    if t.layout == torch.sparse_csr:
        return torch.sparse_csr_tensor(t.crow_indices().clone(), t.col_indices().clone(), t.values().clone(), t.shape)
    if t.layout == torch.sparse_bsr:
        return torch.sparse_bsr_tensor(t.crow_indices().clone(), t.col_indices().clone(), t.values().clone(), t.shape)
    return t


def format_bytes(t: torch.Tensor) -> int:
    """Exact bytes of a tensor's storages: a sparse tensor's indices, pointers and values."""
    return tensor_bytes(sparse_components(t)) if t.layout != torch.strided else tensor_bytes([t])


def analytic_bytes(fmt: str, m: int, n: int, nnz: int, blocks: int | None = None, block: int = 16,
                   v: int = VALUE_BYTES, i: int = INDEX_BYTES) -> int:
    """The formula's bytes (module docstring); ``blocks``: BSR's nonzero blocks."""
    if fmt == "dense":
        return m * n * v
    if fmt == "coo":
        return nnz * (v + 2 * i)
    if fmt == "csr":
        return nnz * (v + i) + (m + 1) * i
    if fmt == "bsr":
        return blocks * (block * block * v + i) + (m // block + 1) * i
    raise ValueError(fmt)


def analytic_crossover(fmt: str, m: int, n: int, block: int = 16, v: int = VALUE_BYTES, i: int = INDEX_BYTES) -> float:
    """Density below which ``fmt`` stores fewer bytes than dense (BSR: for a block pattern)."""
    mn = m * n
    if fmt == "coo":
        return v / (v + 2 * i)
    if fmt == "csr":
        return (mn * v - (m + 1) * i) / ((v + i) * mn)
    if fmt == "bsr":
        return (mn * v - (m // block + 1) * i) / (mn * v + mn * i / block ** 2)
    raise ValueError(fmt)


def interpolated_crossing(xs: list[float], ys: list[float], level: float) -> float | None:
    """The x where the piecewise-linear ys first crosses ``level`` going up (below before, at or
    above after); None if it never does within the grid."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if y0 < level <= y1:
            return x0 + (level - y0) * (x1 - x0) / (y1 - y0)
    return None


def zoo_matrix(model: str, which: str = "mlp.up") -> tuple[int, int]:
    """(out, in) of a zoo model's weight: ``mlp.up`` (d_ff × d_model) or ``attn.qkv``."""
    from .. import zoo

    cfg = zoo.config(model)
    if which == "mlp.up":
        return cfg.d_ff, cfg.d_model
    if which == "attn.qkv":
        return cfg.d_model + 2 * cfg.n_kv_head * cfg.head_dim, cfg.d_model
    raise ValueError(f"unknown matrix {which!r}; valid: mlp.up, attn.qkv")


def measure_bytes(m: int, n: int, densities: list[float], block: int = 16, seed: int = 0) -> dict:
    """Measured and analytic bytes per format and pattern across ``densities``, the crossovers."""
    dense_bytes = m * n * VALUE_BYTES
    out = dict(dense_bytes=dense_bytes, patterns={})
    for pattern in ("unstructured", "block"):
        rows = {fmt: [] for fmt in FORMATS}
        analytic = {fmt: [] for fmt in FORMATS}
        as_built = {fmt: [] for fmt in FORMATS}
        nnz_list, block_list = [], []
        for d in densities:
            w = random_matrix(m, n, d, pattern, block, seed)
            nnz = int((w != 0).sum())
            blocks = int((w.view(m // block, block, n // block, block) != 0).any(dim=(1, 3)).sum())
            nnz_list.append(nnz)
            block_list.append(blocks)
            for fmt in FORMATS:
                built = to_format(w, fmt, block)
                rows[fmt].append(format_bytes(compact(built)))
                as_built[fmt].append(format_bytes(built))
                analytic[fmt].append(analytic_bytes(fmt, m, n, nnz, blocks, block))
        crossover = {}
        for fmt in FORMATS:
            measured = interpolated_crossing(densities, [b / dense_bytes for b in rows[fmt]], 1.0)
            formula = analytic_crossover(fmt, m, n, block)
            built = interpolated_crossing(densities, [b / dense_bytes for b in as_built[fmt]], 1.0)
            ratios = [b / dense_bytes for b in rows[fmt]]
            outside = None if measured is not None else ("below the grid" if ratios[0] >= 1 else "above the grid")
            crossover[fmt] = dict(measured=measured, outside_grid=outside, measured_as_built=built, analytic=formula if (fmt != "bsr" or pattern == "block") else None,
                                  measured_over_analytic=(measured / formula) if measured and
                                  (fmt != "bsr" or pattern == "block") else None)
        out["patterns"][pattern] = dict(
            nnz=nnz_list, nonzero_blocks=block_list, bytes=rows, bytes_as_built=as_built, analytic_bytes=analytic,
            ratio_to_dense={fmt: [b / dense_bytes for b in rows[fmt]] for fmt in FORMATS},
            measured_over_analytic={fmt: [b / a if a else None for b, a in zip(rows[fmt], analytic[fmt])]
                                    for fmt in FORMATS},
            crossover=crossover)
    return out


def _matmul(w: torch.Tensor, x: torch.Tensor, fmt: str) -> torch.Tensor:
    return torch.sparse.mm(w, x) if fmt == "coo" else w @ x


def measure_speed(m: int, n: int, densities: list[float], tokens: int, rounds: int, block: int = 16,
                  seed: int = 0, pattern: str = "unstructured", threads: int | None = 1) -> dict:
    """Sparse × dense time ÷ dense time per format and density, interleaved in rounds, on
    ``threads`` threads (default 1: sub-millisecond sparse kernels on a shared machine measure
    the other threads' barrier waits more than the kernel; None keeps torch's setting)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return dict(_measure_speed(m, n, densities, tokens, rounds, block, seed, pattern),
                    threads=torch.get_num_threads())
    finally:
        torch.set_num_threads(previous)


def _measure_speed(m, n, densities, tokens, rounds, block, seed, pattern) -> dict:
    from .timing import ratio_stats

    x = torch.randn(n, tokens, generator=torch.Generator().manual_seed(seed + 1))
    weights = {}
    for d in densities:
        w = random_matrix(m, n, d, pattern, block, seed)
        weights[d, "dense"] = w
        for fmt in FORMATS:
            weights[d, fmt] = compact(to_format(w, fmt, block))
    keys = list(weights)
    for key in keys:  # warm-up: first-call allocations and thread-pool start
        _matmul(weights[key], x, key[1])
    seconds = {key: [] for key in keys}
    for r in range(rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for key in order:
            t0 = time.perf_counter()
            _matmul(weights[key], x, key[1])
            seconds[key].append(time.perf_counter() - t0)
    ratios = {fmt: [ratio_stats([s / b for s, b in zip(seconds[d, fmt], seconds[d, "dense"])]) for d in densities]
              for fmt in FORMATS}
    crossover = {fmt: interpolated_crossing(densities, [r["value"] for r in ratios[fmt]], 1.0) for fmt in FORMATS}
    for fmt in FORMATS:  # never below 1 on the grid: no crossover; always below: beyond the grid
        if crossover[fmt] is None and all(r["value"] < 1 for r in ratios[fmt]):
            crossover[fmt] = float("inf")
    return dict(tokens=tokens, rounds=rounds, pattern=pattern, densities=densities,
                dense_seconds=[_median(seconds[d, "dense"]) for d in densities],
                time_ratio=ratios, crossover=crossover,
                ci_method="per-round ratio sparse/dense at the same density, median over rounds with the "
                          "order-statistic 95% interval (impls.measure.timing.ratio_stats)")


def _median(values: list[float]) -> float:
    s = sorted(values)
    k = len(s) // 2
    return s[k] if len(s) % 2 else (s[k - 1] + s[k]) / 2


def measure(model: str = "small", which: str = "mlp.up", densities: list[float] | None = None,
            speed_densities: list[float] | None = None, tokens: int = 128, rounds: int = 7, block: int = 16,
            seed: int = 0, threads: int | None = 1) -> dict:
    """The ``sparse_storage`` record: bytes per format across densities and the speed ratios."""
    from ..provenance import SCHEMA_VERSION, provenance
    from .peak import device_name

    m, n = zoo_matrix(model, which)
    if m % block or n % block:
        raise ValueError(f"{model} {which} is {m}×{n}: not a multiple of the {block}×{block} BSR block")
    densities = densities or [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.8, 1.0]
    speed_densities = speed_densities or [0.01, 0.05, 0.1, 0.2, 0.3, 0.5]
    record = dict(schema=SCHEMA_VERSION, kind=families.SPARSE_STORAGE, matrix=dict(model=model, weight=which, shape=[m, n]),
                  block=block, value_bytes=VALUE_BYTES, index_bytes=INDEX_BYTES, densities=densities,
                  bytes=measure_bytes(m, n, densities, block, seed),
                  speed=measure_speed(m, n, speed_densities, tokens, rounds, block, seed, threads=threads),
                  device=dict(type="cpu", name=device_name(torch.device("cpu")), threads=torch.get_num_threads()),
                  **provenance())
    return record


def write(record: dict, path) -> None:
    """Write the record atomically (strict JSON: an unbounded crossover is written as null)."""
    import json

    from ..files import write_text

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    write_text(path, json.dumps(clean(record), indent=1))


def plot_sparse_crossover(record: dict):
    """Bytes ÷ dense vs density per format (unstructured and block patterns, the dense line at 1,
    the analytic crossovers marked), and sparse×dense time ÷ dense time vs density with intervals."""
    from matplotlib.figure import Figure  # not pyplot: no global backend switch, no figure left open

    fig = Figure(figsize=(11, 4))
    ax_bytes, ax_speed = fig.subplots(1, 2)
    densities = record["densities"]
    styles = {"unstructured": "-", "block": ":"}
    colors = {"coo": "C0", "csr": "C1", "bsr": "C2"}
    for pattern, data in record["bytes"]["patterns"].items():
        for fmt, ratios in data["ratio_to_dense"].items():
            ax_bytes.plot(densities, ratios, styles[pattern], color=colors[fmt], marker="o", ms=3,
                          label=f"{fmt.upper()} ({pattern})")
    for fmt, cross in record["bytes"]["patterns"]["block"]["crossover"].items():
        if cross["analytic"]:
            ax_bytes.axvline(cross["analytic"], color=colors[fmt], lw=0.7, alpha=0.5)
    ax_bytes.axhline(1.0, color="k", lw=1, label="dense")
    m, n = record["matrix"]["shape"]
    ax_bytes.set(xlabel="density (nonzero fraction)", ylabel="bytes ÷ dense bytes",
                 title=f"storage, {record['matrix']['model']} {record['matrix']['weight']} {m}×{n} "
                       f"(fp32, int64 indices)")
    ax_bytes.legend(fontsize=7)
    speed = record["speed"]
    for fmt, stats in speed["time_ratio"].items():
        values = [s["value"] for s in stats]
        lo = [s["value"] - s["ci95"][0] for s in stats]
        hi = [s["ci95"][1] - s["value"] for s in stats]
        ax_speed.errorbar(speed["densities"], values, yerr=[lo, hi], color=colors[fmt], marker="o", ms=3,
                          capsize=2, label=fmt.upper())
    ax_speed.axhline(1.0, color="k", lw=1, label="dense W @ X")
    ax_speed.set(xlabel="density", ylabel="time ÷ dense time", yscale="log",
                 title=f"sparse × dense ({speed['tokens']} columns, {speed.get('threads')} thread(s),\n"
                       f"{speed['rounds']} interleaved rounds, median + 95% CI)")
    ax_speed.legend(fontsize=7)
    fig.tight_layout()
    return fig
