"""Sequence-length warm-up (Li et al. 2022, ``impls/techniques/seqlen_warmup.py``) against the
baseline at the same model-FLOP budget: the loss at isoFLOP, and what the schedule saved.

Every variant trains the same model on the same data to the same model-FLOP budget; with the
warm-up the early steps are shorter and cheaper, so the budget buys more steps (solved exactly
over the schedule by ``train.measure_step``).  The records are ``seqlen-<variant>.json``; their
``technique_notes["seqlen_warmup"]`` hold the schedule, the tokens trained and the FLOPs saved
(counted and analytic).  The quick budget is a third of the other families' so the three runs
stay within the quick profile's time.
"""
from __future__ import annotations

import functools

from . import common

SETTINGS = {
    "quick": dict(model="nano", batch_size=8, seq_len=128, flops_budget=1e10, lr=3e-3, data="synthetic", start=32),
    "full": dict(model="small", batch_size=16, seq_len=256, flops_budget=3e14, lr=1e-3, data="pycode", start=64),
    "gpu": dict(model="gpt2", batch_size=16, seq_len=1024, flops_budget=2e15, lr=6e-4, data="pycode", start=64),
}[common.profile_name()]

#: variant name -> (techniques, recipe overrides): warm-up over 30 % and 60 % of the run.
VARIANTS = {
    "baseline": ([], {}),
    "warmup-0.3": ([f"seqlen_warmup:start={SETTINGS['start']},steps=0.3"], {}),
    "warmup-0.6": ([f"seqlen_warmup:start={SETTINGS['start']},steps=0.6"], {}),
}


_recipe = functools.partial(common.family_recipe, SETTINGS)
#: a track_ of technique_notes["seqlen_warmup"][key] (NaN for the baseline, which has no schedule)
_note = functools.partial(common.technique_note, "seqlen_warmup")


class SeqlenWarmup(common.FlopSavingRuns):
    """Each variant trained to the same model-FLOP budget as the baseline."""

    params = list(VARIANTS)

    def setup_cache(self):
        return {(name,): common.train_record(f"seqlen-{name}", techniques=techniques,
                                             flops_budget=SETTINGS["flops_budget"], **_recipe(**overrides))
                for name, (techniques, overrides) in VARIANTS.items()}

    setup_cache.timeout = 1800

    track_token_fraction = _note("token_fraction", "ratio")
    track_counted_flops_saved = _note("counted_flops_saved", "ratio")
    track_analytic_flops_saved = _note("analytic_flops_saved", "ratio")


# No interleaved speed class: impls.compare times a few steps at the recipe's full length per
# token, while a warm-up's steps are shorter by design; its time per token is the record's
# (seconds_per_mtok over the schedule's mean tokens per step).
