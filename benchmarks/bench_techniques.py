"""Single-device techniques beside the baseline: throughput, exact memory, loss at a fixed budget.

Every variant trains the same model on the same data to the same model-FLOP budget, so the
records (``results/runs/<commit>/technique-*.json``) line up for the loss-at-budget comparison;
speed ratios come from :class:`TechniqueSpeed`, which times all variants interleaved in rounds
(``compare-technique.json``).  Adding a technique = one line in :data:`VARIANTS`.

Further classes draw the curves each technique is known for: activation memory vs recompute
over the checkpointing interval (Chen et al. 2016's √n trade-off), activation memory vs effective
batch for accumulation, and FLOPs/time/memory vs sequence length for sparse attention.
"""
from __future__ import annotations

import functools

from . import common

SETTINGS = {
    # Reduced-precision speed depends on the CPU: `etbench peak --dtype bfloat16|float16` measures
    # it per machine (make bench logs fp32 and bf16 in peak.json).  Where fp16/bf16 have no native
    # kernels they run far slower than fp32, so the quick budget stays small enough for the
    # precision variants to finish in about half a minute there too.
    "quick": dict(model="nano", batch_size=8, seq_len=128, flops_budget=3e10, lr=3e-3, data="synthetic",
                  curve_model="micro", seq_lens=[128, 512, 1024], window=64),
    "full": dict(model="small", batch_size=16, seq_len=256, flops_budget=3e14, lr=1e-3, data="pycode",
                 curve_model="small", seq_lens=[512, 1024, 2048, 4096], window=128),
    "gpu": dict(model="gpt2", batch_size=8, seq_len=1024, flops_budget=2.5e14, lr=6e-4, data="pycode",
                curve_model="gpt2", seq_lens=[1024, 2048, 4096], window=256),
}[common.profile_name()]

#: variant name -> (techniques, recipe overrides).  grad_accum keeps the effective batch of the
#: baseline with a quarter of its micro-batch.
VARIANTS = {
    "baseline": ([], {}),
    "bf16": (["bf16"], {}),
    "fp16": (["fp16"], {}),
    "grad_accum-4": (["grad_accum:steps=4"], {"batch_size": SETTINGS["batch_size"] // 4}),
    "checkpoint-every1": (["checkpoint:every=1"], {}),
    "checkpoint-every2": (["checkpoint:every=2"], {}),
    "checkpoint-selective": (["checkpoint:policy=selective"], {}),
    "checkpoint-fairscale": (["checkpoint:impl=fairscale"], {}),
    "fuse-jit": (["fuse:mode=jit"], {}),
    "fuse-compile": (["fuse:mode=compile"], {}),
    "attention-math": (["attention:kind=math"], {}),
    "attention-local": ([f"attention:kind=local,window={SETTINGS['window'] // 2}"], {}),
    "attention-block": ([f"attention:kind=block,block={SETTINGS['window'] // 4},blocks=2"], {}),
    "attention-strided": ([f"attention:kind=strided,stride={SETTINGS['window'] // 4}"], {}),
    # Compositions: stacks a user would actually run.
    "bf16+checkpoint+compile": (["bf16", "checkpoint:every=1", "fuse:mode=compile"], {}),
    "checkpoint+grad_accum": (["checkpoint:every=1", "grad_accum:steps=4"],
                              {"batch_size": SETTINGS["batch_size"] // 4}),
    "fuse-jit+attention-local": (["fuse:mode=jit", f"attention:kind=local,window={SETTINGS['window'] // 2}"], {}),
}


_recipe = functools.partial(common.family_recipe, SETTINGS)


class Techniques:
    """Each technique (and a few stacks) trained to the same counted-FLOP budget as the baseline."""

    params = list(VARIANTS)
    param_names = ["variant"]

    def setup_cache(self):
        return {(name,): common.train_record(f"technique-{name}", techniques=techniques,
                                             flops_budget=SETTINGS["flops_budget"], **_recipe(**overrides))
                for name, (techniques, overrides) in VARIANTS.items()}

    setup_cache.timeout = 3600

    track_seconds_per_mtok = common.seconds_per_mtok
    track_val_loss_at_budget = common.tracked_field("final_val_loss", unit="nats/token")
    track_activations_bytes = common.tracked_field("memory", "activations_bytes", unit="bytes")
    track_optimizer_bytes = common.tracked_field("memory", "optimizer_bytes", unit="bytes")
    # Compilation (and first-step allocation) time, kept out of the timed steps.
    track_first_step_seconds = common.tracked_field("first_step_seconds", unit="seconds")


@common.speed_tracks
class TechniqueSpeed:
    """Every variant timed interleaved with the baseline (impls.compare: rotated rounds, ratios
    per round, order-statistic intervals): the speed-ups of the comparison plot, immune to a burst of load."""

    params = list(VARIANTS)
    param_names = ["variant"]

    def setup_cache(self):
        return common.compare_record("technique", {name: dict(techniques=techniques, **overrides)
                                                   for name, (techniques, overrides) in VARIANTS.items()},
                                     common=_recipe())

    setup_cache.timeout = 1800


#: The short runs of the memory and FLOP curves below: the run's 2 warm-up steps (Recipe.timing_warmup)
#: and 2 timed ones -- their time per token is tracked too, and one timed step is not a measurement.
SHORT_RUN_STEPS = 4


class CheckpointCurve:
    """Activation bytes vs counted FLOPs over the checkpointing interval k (every k-th block)."""

    params = [0, 1, 2, 4]  # 0: no checkpointing
    param_names = ["every"]

    def setup_cache(self):
        return {(k,): common.train_record(f"checkpoint-curve-every{k}", steps=SHORT_RUN_STEPS,
                                          techniques=[f"checkpoint:every={k}"] if k else [],
                                          **_recipe(model=SETTINGS["curve_model"]))
                for k in self.params}

    setup_cache.timeout = 600  # asv's default (60 s) is shorter than four runs' start-up on a GPU

    track_activations_bytes = common.tracked_field("memory", "activations_bytes", unit="bytes")
    track_flops_per_step = common.tracked_field("flops_per_step", unit="FLOPs")
    track_seconds_per_mtok = common.seconds_per_mtok


class AccumulationMemory:
    """Activation bytes vs effective batch: a larger batch vs more accumulated micro-batches of 2."""

    params = (["batch", "accumulate"], [2, 4, 8, 16])
    param_names = ["how", "effective_batch"]

    def setup_cache(self):
        records = {}
        for how in self.params[0]:
            for batch in self.params[1]:
                if how == "batch":
                    recipe = _recipe(batch_size=batch)
                else:  # effective batch 2 is one micro-batch of 2: no accumulation, no technique
                    recipe = _recipe(batch_size=2, techniques=[f"grad_accum:steps={batch // 2}"] if batch > 2 else [])
                records[how, batch] = common.train_record(f"accum-{how}-{batch}", steps=SHORT_RUN_STEPS, **recipe)
        return records

    setup_cache.timeout = 600  # eight runs' start-up (asv's default is 60 s)

    track_activations_bytes = common.tracked_field("memory", "activations_bytes", unit="bytes")
    track_seconds_per_mtok = common.seconds_per_mtok


class AttentionScaling:
    """Counted FLOPs, time and activation bytes vs sequence length, dense vs sparse attention."""

    # math is the dense reference for FLOPs: the counted SDPA backward includes its recompute (7/6).
    params = (["math", "sdpa", "local", "block", "strided"], SETTINGS["seq_lens"])
    param_names = ["kind", "seq_len"]

    def setup_cache(self):
        w = SETTINGS["window"]
        options = {"math": "", "sdpa": "", "local": f",window={w}", "block": f",block={w // 2},blocks=2",
                   "strided": f",stride={w // 2}"}
        return {(kind, t): common.train_record(
                    f"attention-{kind}-T{t}", steps=SHORT_RUN_STEPS, techniques=[f"attention:kind={kind}{options[kind]}"],
                    **_recipe(seq_len=t, batch_size=2, model_args={"block_size": max(t, 128)}))
                for kind in self.params[0] for t in self.params[1]}

    setup_cache.timeout = 1800

    def track_flops_per_token(self, records, kind, seq_len):
        record = records[kind, seq_len]
        return record["flops_per_step"] / record["tokens_per_step"]

    track_flops_per_token.unit = "FLOPs/token"
    track_seconds_per_mtok = common.seconds_per_mtok
    track_activations_bytes = common.tracked_field("memory", "activations_bytes", unit="bytes")
