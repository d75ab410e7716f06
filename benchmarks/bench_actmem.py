"""Activation memory: saved activations stored compressed (bf16, fp8, int8) beside the baseline and
activation checkpointing, on the same model-FLOP budget.

Records ``<runs>/actmem/actmem-<variant>.json``: the loss at budget, exact memory by component
(the saved-activation bytes are the *compressed* bytes: the engine's meter composes with the
technique's saved-tensor hooks), and in ``technique_notes["actcompress"]`` the measured ratio of
saved bytes against the uncompressed forward, the format's own ratio, what stayed uncompressed
and the gradients' relative L2 error against the uncompressed backward.  Speed ratios come from
:class:`ActMemSpeed` (interleaved rounds, ``compare-actmem.json``).  ``offload``
(``save_on_cpu``) needs a CUDA device: on the CPU profile it is refused before any work, so it is
not a variant here.
"""
from __future__ import annotations

import functools

from . import common

SETTINGS = {
    "quick": dict(model="nano", batch_size=8, seq_len=128, flops_budget=3e10, lr=3e-3, data="synthetic"),
    "full": dict(model="small", batch_size=16, seq_len=256, flops_budget=3e14, lr=1e-3, data="pycode"),
    "gpu": dict(model="gpt2", batch_size=16, seq_len=1024, flops_budget=5e14, lr=6e-4, data="pycode"),
}[common.profile_name()]

#: variant name -> (techniques, recipe overrides)
VARIANTS = {
    "baseline": ([], {}),
    "actcompress-bf16": (["actcompress:dtype=bf16"], {}),
    "actcompress-fp8": (["actcompress:dtype=fp8"], {}),
    "actcompress-int8": (["actcompress:dtype=int8"], {}),
    "checkpoint-every1": (["checkpoint:every=1"], {}),  # the recompute alternative, for reference
}
#: the variants timed interleaved against the baseline
SPEED_VARIANTS = ["baseline", "actcompress-bf16", "actcompress-fp8", "actcompress-int8"]


_recipe = functools.partial(common.family_recipe, SETTINGS)
#: a track_ of technique_notes["actcompress"][key] (NaN for variants without it, or without the measurement)
_note = functools.partial(common.technique_note, "actcompress", optional=True)


class ActMem(common.BudgetedRuns):
    """Each variant trained to the same model-FLOP budget as the baseline."""

    params = list(VARIANTS)

    def setup_cache(self):
        return {(name,): common.train_record(f"actmem-{name}", techniques=techniques,
                                             flops_budget=SETTINGS["flops_budget"], **_recipe(**overrides))
                for name, (techniques, overrides) in VARIANTS.items()}

    setup_cache.timeout = 1800

    def track_activations_vs_baseline(self, records, variant):
        """Saved-activation bytes ÷ the baseline's (same batch, same meter)."""
        return records[(variant,)]["memory"]["activations_bytes"] / records[("baseline",)]["memory"]["activations_bytes"]

    track_activations_vs_baseline.unit = "ratio"
    # measured saved-bytes ratio ÷ the format's own ratio (2/4 bf16, 1/4 fp8/int8): 1 = all compressed
    track_measured_ratio = _note("measured_ratio", "ratio")
    track_dtype_ratio = _note("dtype_ratio", "ratio")
    track_grad_rel_l2_error = _note("grad_rel_l2_error", "ratio")


@common.speed_tracks
class ActMemSpeed:
    """The baseline and the three formats timed interleaved (impls.compare): the time the packing
    and unpacking cost per step, with its interval."""

    params = SPEED_VARIANTS
    param_names = ["variant"]

    def setup_cache(self):
        return common.compare_record("actmem", {name: dict(techniques=VARIANTS[name][0], **VARIANTS[name][1])
                                                for name in SPEED_VARIANTS}, common=_recipe())

    setup_cache.timeout = 1800
