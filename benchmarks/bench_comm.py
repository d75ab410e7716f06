"""Ring all-reduce vs a parameter server (``etbench comm``): bandwidth per scheme and world size.

One ``etbench comm --nproc W`` per world size (under torchrun's agent, both schemes interleaved
in it); its record is kept as ``results/runs/<commit>/comm/comm-ws<W>.json`` for the plots
(bandwidth vs message size).  Definitions are nccl-tests' (``doc/PERFORMANCE.md``): algbw = S/t,
all-reduce busbw = algbw · 2(n-1)/n; for the parameter server the same per-link quantity is the
root's link, (n-1)·S/t, which is what saturates as n grows (:mod:`impls.commbench`).

Tracked at the largest message size of the profile: ``busbw`` (GB/s through the busiest link),
``algbw`` (GB/s of message), and the median seconds per operation.  asv's ``track_`` values read
as lower-is-better; the bandwidths are the exception (higher is better), the seconds are not.
"""
from __future__ import annotations

from . import common

SCHEMES = ["allreduce", "ps"]
SETTINGS = {
    # quick: world size 2 only, four sizes, few rounds (one launch, ~10 s on a 2-core laptop)
    "quick": dict(world_sizes=[2], sizes=["16K", "256K", "1M", "4M"], iters=5, warmup=1),
    "full": dict(world_sizes=[2, 4, 8], sizes=[f"{4 ** i * 4}K" for i in range(8)], iters=20, warmup=3),
    # gpu: NCCL over NVLink on an 8-GPU box (skipped with the reason on fewer GPUs)
    "gpu": dict(world_sizes=[8], sizes=[f"{4 ** i * 4}K" for i in range(10)], iters=20, warmup=5),
}[common.profile_name()]
WORLD_SIZES = SETTINGS["world_sizes"]


def comm_record(world_size: int) -> dict:
    """Run ``etbench comm`` on ``world_size`` ranks; return its record (plain JSON)."""
    import json

    if common.dry_run():
        from impls.commbench import parse_size

        link = 100e9 if common.PROFILE["device"] == "cuda" else 1e9  # stated: NVLink-class vs gloo on loopback
        total = sum(parse_size(s) for s in SETTINGS["sizes"]) * len(SCHEMES) * (SETTINGS["iters"] + SETTINGS["warmup"])
        return common.dry_run().other(f"comm-ws{world_size}", 2 * total / link * world_size + 20.0,
                                      f"every size × scheme × iteration at ~{link / 1e9:g} GB/s per link, "
                                      f"world size × 2S bytes each (the parameter server's root), + 20 s launch")
    out = common.runs_dir() / "comm" / f"comm-ws{world_size}.json"
    common.launch_ranks(["comm", "--sizes", ",".join(SETTINGS["sizes"]), "--schemes", ",".join(SCHEMES),
                         "--iters", str(SETTINGS["iters"]), "--warmup", str(SETTINGS["warmup"]),
                         "--device", common.PROFILE["device"], "--out", str(out)], world_size,
                        f"etbench comm --nproc {world_size}")
    return json.loads(out.read_text())


def _largest(record: dict, scheme: str) -> dict:
    rows = [r for r in record["results"] if r["scheme"] == scheme]
    return max(rows, key=lambda r: r["size_bytes"])


class CommBandwidth:
    """Bandwidth of each scheme at the profile's largest message, per world size."""

    params = (SCHEMES, WORLD_SIZES)
    param_names = ["scheme", "world_size"]

    def setup_cache(self):
        return {w: comm_record(w) for w in WORLD_SIZES if common.unsupported_world_size(w) is None}

    setup_cache.timeout = 1800

    def setup(self, records, scheme, world_size):
        why = common.unsupported_world_size(world_size)
        if why:
            raise NotImplementedError(why)

    def track_busbw(self, records, scheme, world_size):
        """GB/s through the busiest link (one direction): nccl-tests' busbw for all-reduce, the
        root's link for the parameter server (higher is better)."""
        return _largest(records[world_size], scheme)["link_Bps"]["median"] / 1e9

    track_busbw.unit = "GB/s"

    def track_algbw(self, records, scheme, world_size):
        """Message bytes per second, S/t (higher is better)."""
        return _largest(records[world_size], scheme)["algbw_Bps"]["median"] / 1e9

    track_algbw.unit = "GB/s"

    def track_seconds(self, records, scheme, world_size):
        """Median seconds of one operation (the slowest rank's), lower is better."""
        return _largest(records[world_size], scheme)["time_s"]["median"]

    track_seconds.unit = "seconds"
