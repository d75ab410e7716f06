"""BERT token dropping (Hou et al. 2022, ``impls/techniques/token_drop.py``) against the full
masked-LM encoder at the same model-FLOP budget: the loss at isoFLOP and the FLOPs saved.

Every variant trains the same encoder (BERT masking at the recipe's ``mlm_rate``) on the same data
to the same model-FLOP budget; with token dropping the middle layers process ``keep`` of the
tokens, so a step costs less (model FLOPs are the counted ones, ``dense_compute=False``) and the
budget buys more steps.  The records are ``tokendrop-<variant>.json``; their
``technique_notes["token_drop"]`` hold the kept tokens per row, the dropping layers, the counted
FLOPs per step with and without dropping, the analytic saving (PaLM App. B form) and their ratio,
and the importance table's summary.  :class:`TokenDropSpeed` times the baseline and ``drop-0.5``
interleaved.
"""
from __future__ import annotations

import functools

from . import common

SETTINGS = {
    "quick": dict(model="encoder-nano", model_args={"n_layer": 4}, batch_size=8, seq_len=128, flops_budget=3e10,
                  lr=3e-3, data="synthetic"),
    "full": dict(model="encoder-small", model_args={}, batch_size=16, seq_len=256, flops_budget=3e14, lr=1e-3,
                 data="pycode"),
    "gpu": dict(model="bert-base", model_args={}, batch_size=32, seq_len=512, flops_budget=2e15, lr=3e-4,
                data="pycode"),
}[common.profile_name()]

#: variant name -> (techniques, recipe overrides): half and a quarter of the tokens in the middle layers.
VARIANTS = {
    "baseline": ([], {}),
    "drop-0.5": (["token_drop:keep=0.5"], {}),
    "drop-0.25": (["token_drop:keep=0.25"], {}),
}


_recipe = functools.partial(common.family_recipe, SETTINGS, "model_args")
#: a track_ of technique_notes["token_drop"][key] (NaN for the baseline, which drops nothing)
_note = functools.partial(common.technique_note, "token_drop")


class TokenDrop(common.FlopSavingRuns):
    """Each variant trained to the same model-FLOP budget as the baseline."""

    params = list(VARIANTS)

    def setup_cache(self):
        return {(name,): common.train_record(f"tokendrop-{name}", techniques=techniques,
                                             flops_budget=SETTINGS["flops_budget"], **_recipe(**overrides))
                for name, (techniques, overrides) in VARIANTS.items()}

    setup_cache.timeout = 1800

    track_model_flops_per_step = common.tracked_field("model_flops_per_step", unit="FLOPs")
    track_kept_fraction = _note("kept_fraction", "ratio")
    track_counted_flops_saved = _note("counted_flops_saved", "ratio")
    track_analytic_flops_saved = _note("analytic_flops_saved", "ratio")
    track_saved_counted_vs_analytic = _note("saved_counted_vs_analytic", "ratio")

    def track_loss_vs_baseline(self, records, variant):
        """Final validation loss minus the baseline's at the same model-FLOP budget (negative: better)."""
        return records[(variant,)]["final_val_loss"] - records[("baseline",)]["final_val_loss"]

    track_loss_vs_baseline.unit = "nats/token"


@common.speed_tracks
class TokenDropSpeed:
    """The baseline and ``drop-0.5`` timed interleaved (rounds, ratio per round, intervals)."""

    params = ["baseline", "drop-0.5"]
    param_names = ["variant"]

    def setup_cache(self):
        variants = {name: dict(techniques=VARIANTS[name][0]) for name in self.params}
        return common.compare_record("tokendrop", variants, common=_recipe(flops_budget=None))

    setup_cache.timeout = 1800
