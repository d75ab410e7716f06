"""Random layerwise token dropping (random-LTD, Yao et al. 2022, ``impls/techniques/random_ltd.py``)
against the baseline at the same model-FLOP budget: the loss at isoFLOP, and the FLOPs the
kept-length schedule saved (counted and analytic).

Every variant trains the same 4-layer model (2 middle layers, the ones random-LTD drops tokens
in) on the same data to the same counted-FLOP budget; the kept length starts at ``start`` tokens
and grows to the full length over the first ``steps`` of the run, so the early steps are cheaper
and the budget buys more of them (solved exactly over the schedule by ``train.measure_step``).
The records are ``ltd-<variant>.json``; their ``technique_notes["random_ltd"]`` hold the
schedule as [[first step, kept length], ...], the FLOPs saved (counted, analytic and their
ratio) and the layer-tokens saved.
"""
from __future__ import annotations

import functools

from . import common

SETTINGS = {
    "quick": dict(model="nano", batch_size=8, seq_len=128, flops_budget=3e10, lr=3e-3, data="synthetic",
                  model_args={"n_layer": 4}),
    "full": dict(model="small", batch_size=16, seq_len=256, flops_budget=3e14, lr=1e-3, data="pycode",
                 model_args={}),
    "gpu": dict(model="gpt2", batch_size=16, seq_len=1024, flops_budget=2e15, lr=6e-4, data="pycode",
                model_args={}),
}[common.profile_name()]

_T = SETTINGS["seq_len"]
#: variant name -> (techniques, recipe overrides): kept length from T/4 and T/2, grown to T over
#: the first half of the run (the paper grows over most of training; half keeps the quick runs short).
VARIANTS = {
    "baseline": ([], {}),
    f"start{_T // 4}": ([f"random_ltd:start={_T // 4},steps=0.5"], {}),
    f"start{_T // 2}": ([f"random_ltd:start={_T // 2},steps=0.5"], {}),
}


_recipe = functools.partial(common.family_recipe, SETTINGS, "model_args")
#: a track_ of technique_notes["random_ltd"][key] (NaN for the baseline, which drops nothing)
_note = functools.partial(common.technique_note, "random_ltd")


class RandomLTD(common.FlopSavingRuns):
    """Each variant trained to the same counted-FLOP budget as the baseline."""

    params = list(VARIANTS)

    def setup_cache(self):
        return {(name,): common.train_record(f"ltd-{name}", techniques=techniques,
                                             flops_budget=SETTINGS["flops_budget"], **_recipe(**overrides))
                for name, (techniques, overrides) in VARIANTS.items()}

    setup_cache.timeout = 1800

    track_mean_kept = _note("mean_kept", "tokens")
    track_counted_flops_saved = _note("counted_flops_saved", "ratio")
    track_analytic_flops_saved = _note("analytic_flops_saved", "ratio")
    track_counted_vs_analytic_saved = _note("counted_vs_analytic_saved", "ratio")
    track_layer_tokens_saved = _note("layer_tokens_saved", "ratio")


# No interleaved speed class: impls.compare times a few steps of one phase, while random-LTD's
# kept length changes over the run by design (and reaches the full length, where a step costs
# the baseline's); its time per token is the record's (seconds_per_mtok over the schedule).
