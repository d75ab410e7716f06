"""``etbench comm``: ring all-reduce against a parameter server, per message size and world size.

    etbench comm --nproc 4 --sizes 4K,64K,1M,16M --iters 20 --out results/comm/n4.json
    torchrun --nproc-per-node 8 -m impls.cli comm --out n8.json     # GPUs: NCCL

Both schemes leave every rank holding the element-wise sum of all ranks' tensors (fp32):

* ``allreduce``: ``torch.distributed.all_reduce`` — the backend's bandwidth-optimal collective
  (NCCL's ring/tree; gloo's ring on CPUs).  Under the ring algorithm (Patarasuk & Yuan 2009) each
  rank sends and receives 2(n-1)/n · S, whatever n: the per-link load stays flat as ranks are
  added.
* ``ps`` (parameter server): every rank sends its tensor to rank 0 (point-to-point), rank 0 sums
  them and sends the result back to each.  The root's link carries (n-1)·S in and (n-1)·S out per
  step — it grows linearly with n, which is why the root saturates (Li et al. 2014's parameter
  servers shard the server side for that reason).

Definitions are those of nccl-tests (NVIDIA, ``doc/PERFORMANCE.md``): S is the message size in
bytes, t the time of one operation, *algorithm bandwidth* algbw = S / t, and *bus bandwidth*
busbw = algbw · 2(n-1)/n for all-reduce — the per-link rate the ring achieves, comparable across
world sizes and with the hardware's link bandwidth.  For the parameter server the record gives
algbw and the root's bytes per step 2(n-1)·S with the root's link rate (root_bytes / t): the
quantity that hits the link's limit first.  ``link_Bps`` puts both on one axis: the bytes per
second through the busiest link in one direction — busbw for all-reduce, (n-1)·S / t (the root's)
for the parameter server.

Timing: after ``--warmup`` untimed rounds, ``--iters`` rounds per size, the two schemes
interleaved (A B A B ...) so drift hits both alike; each round starts after a barrier and its
time is the slowest rank's (an operation is done when its last rank is).  A size reports the
median time with a 95% bootstrap interval of the median (:func:`impls.measure.timing.
step_time_stats`), and the bandwidths that follow from them.  Before timing, each scheme's result
is checked against the exact sum.  On a CPU with more ranks than cores the ranks time-share cores
and the times measure the scheduler as much as the network: such records say
``oversubscribed: true`` and are not comparable with others.
"""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass

from . import families
from .errors import ConfigError

SCHEMES = ("allreduce", "ps")
#: 4 KiB .. 64 MiB, powers of 4
DEFAULT_SIZES = tuple(4096 * 4 ** i for i in range(8))
ELEMENT_BYTES = 4  # float32
#: Size limits: a message of at most 1 TiB, and at most a million timed (or untimed) rounds per
#: size and scheme; beyond them a value would not fail but allocate or run for days.
MAX_SIZE = 1 << 40
MAX_ROUNDS = 10 ** 6
_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024 ** 2, "MB": 1024 ** 2, "MIB": 1024 ** 2,
          "G": 1024 ** 3, "GB": 1024 ** 3, "GIB": 1024 ** 3}


def parse_size(text: str) -> int:
    """``4096``, ``4K``, ``64KiB``, ``1M`` -> bytes (binary units)."""
    m = re.fullmatch(r"([-+]?[0-9]*\.?[0-9]+(?:E[-+]?[0-9]+)?)\s*([A-Z]*)", text.strip().upper())
    if m is None:
        raise ConfigError(f"--sizes: {text!r} is not a size (bytes, or with K/M/G for KiB/MiB/GiB: 4K, 1M)")
    value, unit = float(m[1]), m[2]
    if unit not in _UNITS:
        raise ConfigError(f"--sizes: unknown unit in {text!r}; valid: K, M, G (KiB, MiB, GiB) or none (bytes)")
    size = value * _UNITS[unit]
    if not math.isfinite(size) or size > MAX_SIZE:
        raise ConfigError(f"--sizes: {text!r} is too large; valid: at most {MAX_SIZE} bytes (1 TiB)")
    if not size > 0 or size != int(size):
        raise ConfigError(f"--sizes: {text!r} must be a positive whole number of bytes")
    size = int(size)
    if size % ELEMENT_BYTES:
        raise ConfigError(f"--sizes: {text!r} = {size} bytes is not a multiple of {ELEMENT_BYTES} (float32 elements)")
    return size


@dataclass(frozen=True)
class Spec:
    sizes: tuple[int, ...]
    schemes: tuple[str, ...]
    iters: int
    warmup: int
    device: str


def add_arguments(p) -> None:
    p.add_argument("--nproc", type=int, default=2, help="ranks (>= 2), launched under torchrun's agent")
    p.add_argument("--sizes", default=",".join(f"{s // 1024}K" for s in DEFAULT_SIZES),
                   help="message sizes, comma-separated: bytes or K/M/G (KiB...); default 4K..64M, powers of 4")
    p.add_argument("--schemes", default=",".join(SCHEMES), help=f"comma-separated; valid: {', '.join(SCHEMES)}")
    p.add_argument("--iters", type=int, default=20, help="timed rounds per size and scheme")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds per size and scheme")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (gloo on CPUs, NCCL on GPUs)")
    p.add_argument("--out", help="write the JSON record here (atomically)")


def validate(args, launched: bool) -> Spec:
    """Every check that needs no process group; ``launched``: this process is a rank already."""
    if not launched and args.nproc < 2:
        raise ConfigError(f"--nproc must be >= 2 (a collective needs two ranks), got {args.nproc}")
    sizes = tuple(parse_size(s) for s in args.sizes.split(",") if s.strip())
    if not sizes:
        raise ConfigError("--sizes is empty; give at least one size, e.g. 4K,1M")
    schemes = tuple(s.strip() for s in args.schemes.split(",") if s.strip())
    for s in schemes:
        if s not in SCHEMES:
            raise ConfigError(f"unknown scheme {s!r}; valid: {', '.join(SCHEMES)}")
    if not schemes:
        raise ConfigError(f"--schemes is empty; valid: {', '.join(SCHEMES)}")
    if args.iters < 1:
        raise ConfigError(f"--iters must be >= 1, got {args.iters}")
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    for flag, value in (("--iters", args.iters), ("--warmup", args.warmup)):
        if value > MAX_ROUNDS:
            raise ConfigError(f"{flag} {value} is too many rounds; valid: at most {MAX_ROUNDS}")
    from .dist import resolve_device

    device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    n = int(os.environ.get("WORLD_SIZE", args.nproc)) if launched else args.nproc
    check_memory(max(sizes), n, "ps" in schemes, device, launched)
    return Spec(sizes=tuple(dict.fromkeys(sizes)), schemes=tuple(dict.fromkeys(schemes)), iters=args.iters,
                warmup=args.warmup, device=args.device)


def buffer_bytes(size: int, n: int, ps: bool) -> tuple[int, int]:
    """``(largest rank's, all ranks')`` bytes of the buffers :func:`measure` allocates for one
    message size: every rank's tensor, and at the parameter server's root one scratch tensor per
    other rank (a lower bound: the backend's own buffers come on top)."""
    scratch = (n - 1) * size if ps else 0
    return size + scratch, n * size + scratch


def check_memory(size: int, n: int, ps: bool, device, launched: bool) -> None:
    """Refuse, before any rank starts, a message size whose buffers cannot fit: on a CPU all
    ranks' buffers against the host's available memory (the launcher checks, once); on a GPU the
    root's against its free memory (each rank checks its own device, where CUDA is initialised)."""
    from .measure.footprint import available, human

    if device.type == "cpu" and launched:
        return  # the launcher checked all ranks' buffers against this host's memory
    limit = available(device, may_init_cuda=launched)
    if limit is None:
        return
    root, every = buffer_bytes(size, n, ps)
    need, whose = (every, f"the {n} ranks' buffers") if device.type == "cpu" else (root, "the root rank's buffers")
    if need > limit[0]:
        copies = f"{need // size} copies of the message" + (" (each rank's, and the parameter server's scratch)"
                                                             if ps else " (one per rank)")
        raise ConfigError(f"--sizes {human(size)}: {whose} need at least {human(need)}, {copies}, more than "
                          f"{limit[1]}; give smaller sizes")


def bus_factor(n: int) -> float:
    """nccl-tests' all-reduce bus-bandwidth factor 2(n-1)/n."""
    return 2 * (n - 1) / n


def _param_server(t, scratch, rank: int, n: int) -> None:
    """Sum over ranks into ``t`` through rank 0: n-1 receives there, a sum, n-1 sends back."""
    import torch.distributed as dist

    if rank == 0:
        for work in [dist.irecv(scratch[i - 1], src=i) for i in range(1, n)]:
            work.wait()
        for b in scratch:
            t.add_(b)
        for work in [dist.isend(t, dst=i) for i in range(1, n)]:
            work.wait()
    else:
        dist.send(t, dst=0)
        dist.recv(t, src=0)


def _allreduce(t, scratch, rank: int, n: int) -> None:
    import torch.distributed as dist

    dist.all_reduce(t)


_RUN = {"allreduce": _allreduce, "ps": _param_server}


def _bw(nbytes: float, time_stats: dict) -> dict:
    """A rate from a byte count and time statistics: median and interval (from the time's)."""
    ci = time_stats["ci95"]  # None for one timed iteration: no interval
    return dict(median=nbytes / time_stats["median"], ci95=[nbytes / ci[1], nbytes / ci[0]] if ci else None)


def measure(spec: Spec) -> dict:
    """Run the benchmark on this rank (inside a launched job); every rank returns the record."""
    import torch
    import torch.distributed as dist

    from . import dist as dist_lib
    from .measure import device_name
    from .measure.timing import cpu_snapshot, load_average, load_report, other_cores, step_time_stats

    ctx = dist_lib.init(spec.device)
    n, rank, device = ctx.world_size, ctx.rank, ctx.device
    if n < 2:
        raise ConfigError(f"etbench comm needs >= 2 ranks, this job has {n}; use --nproc N or torchrun")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = torch.get_num_threads()
    oversubscribed = device.type == "cpu" and n * threads > (cores or 1)
    load_start, snap_start = load_average(), cpu_snapshot()
    rows = []
    for size in spec.sizes:
        elems = size // ELEMENT_BYTES
        t = torch.empty(elems, dtype=torch.float32, device=device)
        scratch = [torch.empty_like(t) for _ in range(n - 1)] if rank == 0 and "ps" in spec.schemes else []
        # correctness first: rank r holds r+1 everywhere, the sum is n(n+1)/2
        for scheme in spec.schemes:
            t.fill_(rank + 1.0)
            _RUN[scheme](t, scratch, rank, n)
            sync()
            if not bool((t == n * (n + 1) / 2).all()):
                raise RuntimeError(f"scheme {scheme!r} gave a wrong sum at {size} bytes on rank {rank}")
        times = {s: [] for s in spec.schemes}
        for i in range(spec.warmup + spec.iters):
            order = spec.schemes if i % 2 == 0 else spec.schemes[::-1]
            for scheme in order:
                t.fill_(1.0)
                sync()
                dist.barrier()
                start = time.perf_counter()
                _RUN[scheme](t, scratch, rank, n)
                sync()
                if i >= spec.warmup:
                    times[scheme].append(time.perf_counter() - start)
        # a round is done when its slowest rank is
        for scheme in spec.schemes:
            mine = torch.tensor(times[scheme], dtype=torch.float64, device=device)
            dist.all_reduce(mine, op=dist.ReduceOp.MAX)
            stats = step_time_stats(mine.tolist())
            row = dict(scheme=scheme, size_bytes=size, elements=elems, time_s=stats, algbw_Bps=_bw(size, stats))
            if scheme == "allreduce":
                row["busbw_Bps"] = _bw(size * bus_factor(n), stats)
                row["link_Bps"] = row["busbw_Bps"]
                row["bytes_per_rank_per_step"] = bus_factor(n) * size  # ring: sent (= received) by each rank
            else:
                root = 2 * (n - 1) * size  # (n-1)·S in + (n-1)·S out
                row["root_bytes_per_step"] = root
                row["root_bw_Bps"] = _bw(root, stats)
                row["link_Bps"] = _bw((n - 1) * size, stats)  # the root's link, one direction
                row["bytes_per_rank_per_step"] = dict(root=root, other=2 * size)
            rows.append(row)
        del t, scratch
    cores_in_use = min(n * threads, cores or 1)
    snap_end = cpu_snapshot()
    others = None
    if snap_start is not None and snap_end is not None:  # CPU seconds of all ranks, not just this one
        own = torch.tensor([snap_end["own"] - snap_start["own"]], dtype=torch.float64, device=device)
        dist.all_reduce(own)
        others = other_cores(snap_start, snap_end, own_seconds=float(own.item()))
    return dict(
        kind=families.COMM,
        world_size=n,
        backend=str(dist.get_backend()),
        device=device_name(device),
        cores=cores,
        threads_per_rank=threads,
        oversubscribed=oversubscribed,
        timing_note=("oversubscribed: more rank threads than cores, times are not comparable" if oversubscribed
                     else "ranks on one machine: the 'network' is shared memory / loopback"
                     if device.type == "cpu" else ""),
        load=load_report(load_start, load_average(), cores_in_use, others),
        iters=spec.iters,
        warmup=spec.warmup,
        dtype="float32",
        schemes=list(spec.schemes),
        sizes=list(spec.sizes),
        results=rows,
        definitions=dict(
            source="nccl-tests doc/PERFORMANCE.md (NVIDIA): algbw = S/t; all-reduce busbw = algbw·2(n-1)/n",
            allreduce="torch.distributed.all_reduce (bandwidth-optimal ring: Patarasuk & Yuan 2009)",
            ps="point-to-point to rank 0, sum there, point-to-point back: root link (n-1)·S in + (n-1)·S out",
            link="bytes/s through the busiest link, one direction: busbw (allreduce), (n-1)·S/t (ps, the root's)",
            time="slowest rank's time per round after a barrier; median and 95% bootstrap interval of the median",
        ),
    )


def summary_lines(record: dict) -> list[str]:
    n = record["world_size"]
    lines = [f"{record['device']} {record['backend']}, {n} ranks"
             + (" (OVERSUBSCRIBED: times not comparable)" if record["oversubscribed"] else "")]
    lines.append(f"{'scheme':<10} {'size':>10} {'time us':>10} {'algbw GB/s':>11} {'busbw GB/s':>11} {'root GB/s':>10}")
    for r in record["results"]:
        bus = f"{r['busbw_Bps']['median'] / 1e9:11.3f}" if "busbw_Bps" in r else f"{'':>11}"
        root = f"{r['root_bw_Bps']['median'] / 1e9:10.3f}" if "root_bw_Bps" in r else f"{'':>10}"
        lines.append(f"{r['scheme']:<10} {r['size_bytes']:>10} {r['time_s']['median'] * 1e6:10.1f} "
                     f"{r['algbw_Bps']['median'] / 1e9:11.3f} {bus} {root}")
    return lines
