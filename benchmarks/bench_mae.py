"""Masked-token dropping for the masked-LM encoder (MAE, He et al. 2022; ``impls/techniques/mae.py``)
against the full-sequence encoder at the same model-FLOP budget, at mask rates 15 %, 40 % and 75 %.

Every variant -- baselines included -- masks with ``mlm_corrupt="mask"`` (every chosen position
becomes [MASK], as MAE removes every masked token), so the pair at a rate predicts the same targets
from the same inputs.  ``mae`` has ``dense_compute=False``: its steps come from its counted FLOPs,
so at the baseline's budget it gets more steps (the isoFLOP comparison).  The records are
``mae-<variant>.json``; their ``technique_notes["mae"]`` hold the visible fraction, the counted
encoder FLOPs against the full-sequence encoder's and the analytic values.  The speed classes
time the baseline and ``mae`` interleaved at each rate (``compare-mae-speed-<rate>.json``).

With encoder-nano's two layers a one-block decoder is a third of the blocks: at 15 % masking mae counts more FLOPs per step than the full encoder, and its saving
grows with the mask rate (the notes' ``counted_flops_ratio_vs_baseline``).
"""
from __future__ import annotations

import functools

from . import common

SETTINGS = {
    "quick": dict(model="encoder-nano", batch_size=8, seq_len=128, flops_budget=3e10, lr=3e-3, data="synthetic"),
    "full": dict(model="encoder-small", batch_size=16, seq_len=256, flops_budget=3e14, lr=1e-3, data="pycode"),
    "gpu": dict(model="bert-base", batch_size=32, seq_len=512, flops_budget=2e15, lr=3e-4, data="pycode"),
}[common.profile_name()]

RATES = (0.15, 0.4, 0.75)

#: variant name -> (techniques, recipe overrides).  "baseline" is the family's baseline name (the
#: site's comparison table keys on it): the full-sequence encoder at 15 %, which "baseline-0.15"
#: names too -- trained once, one record (mae-baseline.json), returned for both names.
VARIANTS = {"baseline": ([], {})}
for _rate in RATES:
    VARIANTS[f"baseline-{_rate}"] = ([], dict(mlm_rate=_rate))
    VARIANTS[f"mae-{_rate}"] = (["mae"], dict(mlm_rate=_rate))
ALIASES = {"baseline-0.15": "baseline"}  # Recipe's default mlm_rate is 0.15: the same run


_recipe = functools.partial(common.family_recipe, SETTINGS, mlm_corrupt="mask")
#: a track_ of technique_notes["mae"][key] (NaN for the baselines, which run the full-sequence encoder)
_note = functools.partial(common.technique_note, "mae")


class Mae(common.FlopSavingRuns):
    """Each variant trained to the same model-FLOP budget; pairs share a mask rate."""

    params = list(VARIANTS)

    def setup_cache(self):
        records = {(name,): common.train_record(f"mae-{name}", techniques=techniques,
                                                flops_budget=SETTINGS["flops_budget"], **_recipe(**overrides))
                   for name, (techniques, overrides) in VARIANTS.items() if name not in ALIASES}
        for alias, name in ALIASES.items():
            records[(alias,)] = records[(name,)]
        return records

    setup_cache.timeout = 1800

    track_visible_fraction = _note("visible_fraction", "ratio")
    track_encoder_flops_ratio = _note("encoder_flops_ratio", "ratio")
    track_counted_flops_ratio_vs_baseline = _note("counted_flops_ratio_vs_baseline", "ratio")


#: the pair each interleaved comparison times, at one mask rate
SPEED_VARIANTS = {"baseline": dict(techniques=[]), "mae": dict(techniques=["mae"])}


class MaeSpeed:
    """The full-sequence encoder and mae timed interleaved at each mask rate: one interleaved
    comparison per rate (``compare-mae-speed-<rate>.json``), all made by one ``setup_cache`` (asv
    keys a cache by the function's source line, so classes made from one function would share it)."""

    params = ([str(r) for r in RATES], ["baseline", "mae"])
    param_names = ["mask_rate", "variant"]

    def setup_cache(self):
        return {str(rate): common.compare_record("mae", SPEED_VARIANTS, common=_recipe(mlm_rate=rate, flops_budget=None),
                                                 name=f"mae-speed-{rate}")
                for rate in RATES}

    setup_cache.timeout = 1800

    def track_time_per_token_vs_baseline(self, records, mask_rate, variant):
        """1 / speed-up: mae's seconds per token ÷ the full-sequence encoder's, same rounds."""
        return 1.0 / records[mask_rate]["variants"][variant]["speedup"]["value"]

    track_time_per_token_vs_baseline.unit = "ratio"

    def track_activations_vs_baseline(self, records, mask_rate, variant):
        return records[mask_rate]["variants"][variant]["memory_ratio"]["activations_bytes"]

    track_activations_vs_baseline.unit = "ratio"
