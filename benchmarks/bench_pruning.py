"""Pruning family: loss vs sparsity at a fixed model-FLOP budget, exact memory, and speed.

Every variant trains the same model on the same data to the same model-FLOP budget as the
baseline (records ``<runs>/pruning/pruning-*.json``): unstructured magnitude pruning over a
sparsity grid (one shot at 25% of training, Han et al. 2015), gradual magnitude pruning with Zhu &
Gupta's cubic schedule, 2:4 semi-structured masks (masked dense on a CPU: no FLOPs saved) and
structured head + neuron pruning (physically smaller: the budget buys more steps).  The knob and
the measured facts (target and achieved sparsity per layer, nonzero parameters, whether FLOPs are
saved) are in ``record["technique_notes"][<technique>]``.  :class:`PruningSpeed` times the
baseline and three variants interleaved (``compare-pruning.json``); the masked variants prune
before step 0 there (``at=0``), so the timed steps run the pruned model.
"""
from __future__ import annotations

import functools

from . import common

SETTINGS = {
    "quick": dict(model="nano", batch_size=8, seq_len=128, flops_budget=3e10, lr=3e-3, data="synthetic",
                  gmp_every=2),
    "full": dict(model="small", batch_size=16, seq_len=256, flops_budget=3e14, lr=1e-3, data="pycode",
                 gmp_every=20),
    "gpu": dict(model="gpt2", batch_size=16, seq_len=1024, flops_budget=2e15, lr=6e-4, data="pycode",
                gmp_every=20),
}[common.profile_name()]

SPARSITIES = (0.5, 0.75, 0.9)  # with 0 (the baseline): the loss-vs-sparsity curve

#: variant name -> (technique specs, recipe overrides)
VARIANTS = {
    "baseline": ([], {}),
    **{f"unstructured-{s}": ([f"prune:sparsity={s},at=0.25"], {}) for s in SPARSITIES},
    "gmp-0.75": ([f"gmp:sparsity=0.75,start=0.1,end=0.6,every={SETTINGS['gmp_every']}"], {}),
    "nm-2of4": (["prune_nm:n=2,m=4,at=0.25"], {}),
    "structured-h0.5-n0.5": (["prune_structured:heads=0.5,neurons=0.5"], {}),
}

#: the interleaved speed comparison: baseline + three variants, the same recipes as the trained
#: ones (so the site pairs each speed ratio with its run); the comparison's steps are the length
#: the masks' ``at`` refers to, and a mask multiplies in every forward from the first step.
SPEED_VARIANTS = {name: VARIANTS[name][0] for name in ("baseline", "unstructured-0.5", "nm-2of4",
                                                         "structured-h0.5-n0.5")}

#: technique name of each variant (the technique_notes key holding its facts)
NOTES_KEY = {"unstructured": "prune", "gmp": "gmp", "nm": "prune_nm", "structured": "prune_structured"}


_recipe = functools.partial(common.family_recipe, SETTINGS)


def _notes(record: dict, variant: str) -> dict | None:
    key = NOTES_KEY.get(variant.split("-")[0])
    return record["technique_notes"][key] if key else None


class Pruning(common.BudgetedRuns):
    """Each pruning variant trained to the baseline's model-FLOP budget: loss vs sparsity."""

    params = list(VARIANTS)

    def setup_cache(self):
        return {(name,): common.train_record(f"pruning-{name}", techniques=techniques,
                                             flops_budget=SETTINGS["flops_budget"], **_recipe(**overrides))
                for name, (techniques, overrides) in VARIANTS.items()}

    setup_cache.timeout = 1800

    track_model_flops_per_step = common.tracked_field("model_flops_per_step", unit="FLOPs")

    def track_achieved_sparsity(self, records, variant):
        """Fraction of the pruned weights (structured: of all parameters removed); 0 for the baseline."""
        notes = _notes(records[(variant,)], variant)
        return 0.0 if notes is None else notes["overall_sparsity"]

    track_achieved_sparsity.unit = "fraction"

    def track_nonzero_params(self, records, variant):
        record = records[(variant,)]
        notes = _notes(record, variant)
        return record["params"] if notes is None else notes["nonzero_params"]

    track_nonzero_params.unit = "parameters"


@common.speed_tracks
class PruningSpeed:
    """Baseline and three pruned variants timed interleaved: only structured pruning removes work here."""

    params = list(SPEED_VARIANTS)
    param_names = ["variant"]

    def setup_cache(self):
        return common.compare_record("pruning", {name: dict(techniques=techniques)
                                                 for name, techniques in SPEED_VARIANTS.items()},
                                     common=_recipe())

    setup_cache.timeout = 1800
