"""The model-parallel family: tensor parallelism (Megatron column/row split), sequence
parallelism, pipeline parallelism (GPipe, 1F1B, interleaved 1F1B) and their 2-D layouts with data
parallelism, per world size.

Each world size is one interleaved comparison (:mod:`impls.compare`, launched under torchrun):
every layout is built once in the same ranks and timed in rotated rounds against plain DDP over
all ranks, so speed ratios per token come with intervals.  The record carries, per layout, each
rank's exact parameter/gradient/optimizer bytes (checked against replicated + sharded/t and the
ZeRO formula over dp), the saved activations per layer against Korthikanti et al.'s formula
(:mod:`impls.measure.activations`), the collectives of one step against Megatron's 4 all-reduces
per layer plus the dp gradients' volume, and for pipelines the schedule's bubble against
(p−1)/(m+p−1).  Layouts are described by their techniques and ``mesh`` (dp takes the rest).

The model is the zoo's ``nano`` with 4 layers (two per stage at p = 2, one per model chunk for
interleaved 1F1B at v = 2).  On a CPU with fewer cores than ranks the ranks share cores: bytes,
collectives and schedules are exact, times are labelled oversubscribed.
"""
from __future__ import annotations

from . import common

#: layout name -> recipe fields (techniques, mesh) over :func:`_common`.
LAYOUTS = {
    "ddp": dict(techniques=[]),
    "tp": dict(techniques=["tp"], mesh={"tp": 2}),
    "tp-sp": dict(techniques=["tp:sp=true"], mesh={"tp": 2}),
    "fsdp-tp": dict(techniques=["fsdp", "tp"], mesh={"tp": 2}),
    "dp-tp-sp": dict(techniques=["tp:sp=true"], mesh={"tp": 2}),
    "pp-gpipe": dict(techniques=["pp:schedule=gpipe,microbatches=4"], mesh={"pp": 2}),
    "pp-1f1b": dict(techniques=["pp:schedule=1f1b,microbatches=4"], mesh={"pp": 2}),
    "pp-interleaved": dict(techniques=["pp:schedule=interleaved,microbatches=4,chunks=2"], mesh={"pp": 2}),
    # the bubble's dependence on m (the formula's other end): m = 2 and 8
    "pp-1f1b-m2": dict(techniques=["pp:schedule=1f1b,microbatches=2"], mesh={"pp": 2}),
    "pp-1f1b-m8": dict(techniques=["pp:schedule=1f1b,microbatches=8"], mesh={"pp": 2}),
    "pp-gpipe-m8": dict(techniques=["pp:schedule=gpipe,microbatches=8"], mesh={"pp": 2}),
    "dp-pp": dict(techniques=["pp:schedule=1f1b,microbatches=4"], mesh={"pp": 2}),
    "tp-pp": dict(techniques=["pp:schedule=1f1b,microbatches=4", "tp"], mesh={"pp": 2, "tp": 2}),
}
#: which world sizes a layout needs (its mesh's non-dp product, and dp > 1 for the 2-D ones)
MIN_WORLD = {"fsdp-tp": 4, "dp-tp-sp": 4, "dp-pp": 4, "tp-pp": 4}
WORLD_SIZES = [2, 4]

SETTINGS = {
    "quick": dict(model="nano", world_sizes=[2], batch_size=8, seq_len=64,
                  layouts=["ddp", "tp", "tp-sp", "pp-gpipe", "pp-1f1b", "pp-interleaved"]),
    "full": dict(model="small", world_sizes=[2, 4], batch_size=8, seq_len=256, layouts=list(LAYOUTS)),
    # gpu: an 8-GPU box (skipped with the reason on fewer GPUs)
    "gpu": dict(model="gpt2", world_sizes=[8], batch_size=8, seq_len=1024, layouts=list(LAYOUTS)),
}[common.profile_name()]


def _layouts(world_size: int) -> dict[str, dict]:
    return {name: LAYOUTS[name] for name in SETTINGS["layouts"] if world_size >= MIN_WORLD.get(name, 2)}


def _common() -> dict:
    return dict(model=SETTINGS["model"], model_args=dict(n_layer=4), data=common.PROFILE["data"], optimizer="adamw",
                lr=1e-3, batch_size=SETTINGS["batch_size"], seq_len=SETTINGS["seq_len"],
                device=common.PROFILE["device"])


def _runnable(world_size: int) -> str | None:
    if world_size not in SETTINGS["world_sizes"]:
        return f"world size {world_size} is not in the {common.profile_name()} profile of this family"
    if common.PROFILE["device"] != "cpu":
        return common.unsupported_world_size(world_size)
    return None


class ModelParallel:
    """Per-rank bytes by component, tokens/s, collectives and (pipelines) bubble of each layout,
    per world size; each world size one interleaved comparison against DDP."""

    # The profile's layouts and world sizes (as bench_mod's grids follow its profile): asv forks a
    # process for every grid point, skipped ones too, and the quick grid would be 4/5 skips.
    params = (SETTINGS["layouts"], SETTINGS["world_sizes"])
    param_names = ["layout", "world_size"]
    timeout = 1800

    def setup_cache(self):
        return {w: common.compare_record("model_parallel", _layouts(w), baseline="ddp", common=_common(), nproc=w,
                                         name=f"ws{w}")
                for w in SETTINGS["world_sizes"] if _runnable(w) is None}

    setup_cache.timeout = 1800

    def setup(self, records, layout, world_size):
        why = _runnable(world_size)
        if why:
            raise NotImplementedError(why)
        if layout not in records[world_size]["variants"]:
            raise NotImplementedError(f"{layout} is not in the {common.profile_name()} profile of this family at "
                                      f"world size {world_size}")

    @staticmethod
    def _v(records, layout, world_size) -> dict:
        return records[world_size]["variants"][layout]

    def track_params_bytes(self, records, layout, world_size):
        """The largest rank's parameter bytes."""
        return self._v(records, layout, world_size)["memory"]["params_bytes"]

    def track_grads_bytes(self, records, layout, world_size):
        return self._v(records, layout, world_size)["memory"]["grads_bytes"]

    def track_optimizer_bytes(self, records, layout, world_size):
        return self._v(records, layout, world_size)["memory"]["optimizer_bytes"]

    def track_activations_bytes(self, records, layout, world_size):
        """Bytes saved for backward by one micro-batch on a rank."""
        return self._v(records, layout, world_size)["memory"]["activations_bytes"]

    def track_layer_activations_vs_paper_reduction(self, records, layout, world_size):
        """Measured per-layer activation bytes ÷ the unsharded layer's count, ÷ Korthikanti et
        al.'s predicted reduction for this layout (1.0: the paper's shape exactly)."""
        check = self._v(records, layout, world_size).get("layer_activations") or {}
        impl = check.get("implementation_reduction_vs_no_parallelism")
        paper = check.get("paper_reduction_vs_no_parallelism")
        return impl / paper if impl and paper else float("nan")

    def track_model_states_vs_formula(self, records, layout, world_size):
        return self._v(records, layout, world_size)["model_states"]["ratio"]["total"]

    def track_comm_bytes_per_step(self, records, layout, world_size):
        return self._v(records, layout, world_size)["comm"]["bytes_per_step"]

    def track_collective_calls_per_step(self, records, layout, world_size):
        return sum(self._v(records, layout, world_size)["comm"]["calls"].values())

    def track_comm_vs_formula(self, records, layout, world_size):
        comm = self._v(records, layout, world_size)["comm"]
        return comm["ratio"] if comm.get("ratio") is not None else float("nan")

    def track_seconds_per_mtok(self, records, layout, world_size):
        v = self._v(records, layout, world_size)
        return 1e6 * v["seconds_per_step"]["median"] / v["tokens_per_step"]

    def track_bubble_measured(self, records, layout, world_size):
        """Pipelines: the largest stage's idle share of the step (1 − busy/step, wall clock)."""
        pp = self._v(records, layout, world_size)["technique_notes"].get("pp") or {}
        return max(pp["measured_idle"]) if pp.get("measured_idle") else float("nan")

    def track_bubble_schedule(self, records, layout, world_size):
        """Pipelines: the idle share of torch's executed action order (t_b = 2 t_f), which
        should equal (p−1)/(m+p−1) (÷ v interleaved)."""
        pp = self._v(records, layout, world_size)["technique_notes"].get("pp") or {}
        return pp.get("schedule_bubble_max", float("nan"))

    def track_bubble_formula(self, records, layout, world_size):
        pp = self._v(records, layout, world_size)["technique_notes"].get("pp") or {}
        return pp.get("bubble_formula", float("nan"))

    def track_time_per_token_vs_ddp(self, records, layout, world_size):
        return 1.0 / self._v(records, layout, world_size)["speedup"]["value"]

    track_params_bytes.unit = track_grads_bytes.unit = track_optimizer_bytes.unit = "bytes"
    track_activations_bytes.unit = track_comm_bytes_per_step.unit = "bytes"
    track_collective_calls_per_step.unit = "calls"
    track_layer_activations_vs_paper_reduction.unit = track_model_states_vs_formula.unit = "ratio"
    track_comm_vs_formula.unit = track_time_per_token_vs_ddp.unit = "ratio"
    track_seconds_per_mtok.unit = "s/Mtok"
    track_bubble_measured.unit = track_bubble_schedule.unit = track_bubble_formula.unit = "fraction"
