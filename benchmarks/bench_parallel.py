"""The data-parallel and sharded-training family: DDP, ZeRO 1/2/3 (DeepSpeed, with and without
CPU offload), torch FSDP2, ZeroRedundancyOptimizer and fairscale OSS/ShardedDDP, per world size.

Each world size is one interleaved comparison (:mod:`impls.compare`, launched under torchrun):
every technique is built once in the same ranks and timed in rotated rounds against DDP, so the
speed ratios come with intervals; the same record carries each technique's exact per-rank
parameter, gradient and optimizer bytes with the ZeRO paper's formula for its stage
(:mod:`impls.measure.model_states`), and the bytes and calls of every collective of one step
against the communication formula (2Ψ per rank for DDP and ZeRO-1/2, 3Ψ for ZeRO-3 and FSDP).

World size 1 has no data parallelism: its "ddp" row is the plain single-process run, and the
sharding techniques hold everything (N_d = 1), the baseline of the scaling-efficiency plot.  On a
CPU with fewer cores than ranks the ranks share cores: bytes and communication volumes are exact,
times are labelled oversubscribed in the record and the plots.
"""
from __future__ import annotations

from . import common

#: technique name -> the recipe's --technique list (DDP is the default wrap at world size > 1).
VARIANTS = {
    "ddp": [],
    "zero1": ["zero:stage=1"],
    "zero2": ["zero:stage=2"],
    "zero3": ["zero:stage=3"],
    # DeepSpeed's bf16 mode: 16-bit parameters and gradients, fp32 master partition -- the paper's
    # mixed-precision setting (2Ψ + 2Ψ + 12Ψ), where its formula should hold to the byte
    "zero1-bf16": ["bf16", "zero:stage=1"],
    "zero2-bf16": ["bf16", "zero:stage=2"],
    "zero3-bf16": ["bf16", "zero:stage=3"],
    "zero2-offload": ["zero:stage=2,offload_optimizer=cpu"],
    "zero3-offload": ["zero:stage=3,offload_optimizer=cpu,offload_param=cpu"],
    "fsdp": ["fsdp"],
    "fsdp-no-reshard": ["fsdp:reshard_after_forward=false"],
    "zero-redundancy": ["zero-redundancy"],
    "oss": ["oss"],
}
WORLD_SIZES = [1, 2, 4]  # the full profile's world sizes (the quick one runs 2)

SETTINGS = {
    # nano at 2 ranks, all techniques in one launch: the family's whole quick cost
    # (ZeRO in the paper's mixed precision; fp32 ZeRO-2 for DeepSpeed's fp32 master copy, and with
    # its optimizer offloaded; the fp32 stage-1/3 rows are the full profile's)
    "quick": dict(model="nano", world_sizes=[2], batch_size=4, seq_len=64,
                  variants=["ddp", "zero1-bf16", "zero2-bf16", "zero3-bf16", "zero2", "zero2-offload", "fsdp",
                            "zero-redundancy", "oss"]),
    "full": dict(model="small", world_sizes=[1, 2, 4], batch_size=8, seq_len=256, variants=list(VARIANTS)),
    # gpu: ZeRO/FSDP at one rank on any box; 8 ranks on an 8-GPU box (skipped with the reason on fewer GPUs)
    "gpu": dict(model="gpt2", world_sizes=[1, 8], batch_size=8, seq_len=1024, variants=list(VARIANTS)),
}[common.profile_name()]


#: Techniques refused on one rank (nothing to shard or wrap: they would be the single-process run
#: under their name); DeepSpeed's ZeRO runs there (N_d = 1: the formula's unsharded end).
NEEDS_RANKS = ("fsdp", "fsdp-no-reshard", "zero-redundancy", "oss")


def _variants(world_size: int) -> dict[str, dict]:
    return {name: dict(techniques=VARIANTS[name]) for name in SETTINGS["variants"]
            if world_size > 1 or name not in NEEDS_RANKS}


def _common() -> dict:
    return dict(model=SETTINGS["model"], data=common.PROFILE["data"], optimizer="adamw", lr=1e-3,
                batch_size=SETTINGS["batch_size"], seq_len=SETTINGS["seq_len"], device=common.PROFILE["device"])


def _runnable(world_size: int) -> str | None:
    """Why this machine does not run ``world_size`` for this family (None: it does).  CPU ranks
    may outnumber the cores here (bytes are exact, times are labelled oversubscribed)."""
    if world_size not in SETTINGS["world_sizes"]:
        return f"world size {world_size} is not in the {common.profile_name()} profile of this family"
    if common.PROFILE["device"] != "cpu":
        return common.unsupported_world_size(world_size)
    return None


class DataParallelSharding:
    """Per-rank model-state bytes, communication per step and speed of each technique, per
    world size; each world size one interleaved comparison against DDP."""

    # The profile's grid (as BaselineTraining's models and world sizes): every asv parameter
    # combination costs a process start (~0.17 s) even when skipped, and this class has 9 tracks.
    params = (SETTINGS["variants"], SETTINGS["world_sizes"])
    param_names = ["technique", "world_size"]
    timeout = 1800

    def setup_cache(self):
        return {w: common.compare_record("parallel", _variants(w), baseline="ddp", common=_common(), nproc=w,
                                         name=f"ws{w}")
                for w in SETTINGS["world_sizes"] if _runnable(w) is None}

    setup_cache.timeout = 1800

    def setup(self, records, technique, world_size):
        why = _runnable(world_size)
        if why:
            raise NotImplementedError(why)
        if technique not in records[world_size]["variants"]:
            raise NotImplementedError(f"{technique} is not in the {common.profile_name()} profile of this family"
                                      + (" (it needs more than one rank)" if technique in NEEDS_RANKS else ""))

    @staticmethod
    def _variant(records, technique, world_size) -> dict:
        return records[world_size]["variants"][technique]

    def track_params_bytes(self, records, technique, world_size):
        return self._variant(records, technique, world_size)["memory"]["params_bytes"]

    def track_grads_bytes(self, records, technique, world_size):
        return self._variant(records, technique, world_size)["memory"]["grads_bytes"]

    def track_optimizer_bytes(self, records, technique, world_size):
        return self._variant(records, technique, world_size)["memory"]["optimizer_bytes"]

    def track_activations_bytes(self, records, technique, world_size):
        """Bytes saved for backward by one micro-batch on a rank (gathered parameters excluded)."""
        return self._variant(records, technique, world_size)["memory"]["activations_bytes"]

    def track_model_states_vs_formula(self, records, technique, world_size):
        """Measured per-rank model-state bytes ÷ the ZeRO formula of the technique's stage."""
        return self._variant(records, technique, world_size)["model_states"]["ratio"]["total"]

    def track_comm_bytes_per_step(self, records, technique, world_size):
        """Bytes this rank sends per optimizer step under the ring model (nccl-tests bus factors)."""
        return self._variant(records, technique, world_size)["comm"]["bytes_per_step"]

    def track_comm_vs_formula(self, records, technique, world_size):
        comm = self._variant(records, technique, world_size)["comm"]
        return comm["ratio"] if comm.get("ratio") is not None else float("nan")

    def track_seconds_per_mtok(self, records, technique, world_size):
        v = self._variant(records, technique, world_size)
        return 1e6 * v["seconds_per_step"]["median"] / v["tokens_per_step"]

    def track_time_per_token_vs_ddp(self, records, technique, world_size):
        """1 / speed-up over DDP, from the same interleaved rounds."""
        return 1.0 / self._variant(records, technique, world_size)["speedup"]["value"]

    track_params_bytes.unit = track_grads_bytes.unit = track_optimizer_bytes.unit = "bytes"
    track_activations_bytes.unit = "bytes"
    track_comm_bytes_per_step.unit = "bytes"
    track_model_states_vs_formula.unit = track_comm_vs_formula.unit = track_time_per_token_vs_ddp.unit = "ratio"
    track_seconds_per_mtok.unit = "s/Mtok"

