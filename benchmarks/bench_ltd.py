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

import math

from . import common

SETTINGS = {
    "quick": dict(model="nano", batch_size=8, seq_len=128, flops_budget=3e10, lr=3e-3, data="synthetic",
                  n_layer=4),
    "full": dict(model="small", batch_size=16, seq_len=256, flops_budget=3e14, lr=1e-3, data="pycode",
                 n_layer=None),
    "gpu": dict(model="gpt2", batch_size=16, seq_len=1024, flops_budget=2e15, lr=6e-4, data="pycode",
                n_layer=None),
}[common.profile_name()]

_T = SETTINGS["seq_len"]
#: variant name -> (techniques, recipe overrides): kept length from T/4 and T/2, grown to T over
#: the first half of the run (the paper grows over most of training; half keeps the quick runs short).
VARIANTS = {
    "baseline": ([], {}),
    f"start{_T // 4}": ([f"random_ltd:start={_T // 4},steps=0.5"], {}),
    f"start{_T // 2}": ([f"random_ltd:start={_T // 2},steps=0.5"], {}),
}


def _recipe(**overrides) -> dict:
    s = SETTINGS
    model_args = {"n_layer": s["n_layer"]} if s["n_layer"] else {}
    return {**dict(model=s["model"], data=s["data"], batch_size=s["batch_size"], seq_len=s["seq_len"], lr=s["lr"],
                   model_args=model_args, device=common.PROFILE["device"]), **overrides}


def _note(key: str, unit: str):
    def track(self, records, variant):
        notes = records[(variant,)]["technique_notes"].get("random_ltd")
        # NaN, not None, without the technique (the baseline drops nothing): asv shows NaN as n/a, None as a failure
        return notes[key] if notes else math.nan

    track.unit = unit
    return track


class RandomLTD:
    """Each variant trained to the same counted-FLOP budget as the baseline."""

    params = list(VARIANTS)
    param_names = ["variant"]

    def setup_cache(self):
        return {(name,): common.train_record(f"ltd-{name}", techniques=techniques,
                                             flops_budget=SETTINGS["flops_budget"], **_recipe(**overrides))
                for name, (techniques, overrides) in VARIANTS.items()}

    setup_cache.timeout = 1800

    track_val_loss_at_budget = common.tracked_field("final_val_loss", unit="nats/token")
    track_steps_at_budget = common.tracked_field("steps", unit="steps")
    track_seconds_per_mtok = common.seconds_per_mtok
    track_counted_flops_per_token = common.counted_flops_per_token
    track_params_bytes = common.tracked_field("memory", "params_bytes", unit="bytes")
    track_grads_bytes = common.tracked_field("memory", "grads_bytes", unit="bytes")
    track_optimizer_bytes = common.tracked_field("memory", "optimizer_bytes", unit="bytes")
    track_activations_bytes = common.tracked_field("memory", "activations_bytes", unit="bytes")
    track_mean_kept = _note("mean_kept", "tokens")
    track_counted_flops_saved = _note("counted_flops_saved", "ratio")
    track_analytic_flops_saved = _note("analytic_flops_saved", "ratio")
    track_counted_vs_analytic_saved = _note("counted_vs_analytic_saved", "ratio")
    track_layer_tokens_saved = _note("layer_tokens_saved", "ratio")


# No interleaved speed class: impls.compare times a few steps of one phase, while random-LTD's
# kept length changes over the run by design (and reaches the full length, where a step costs
# the baseline's); its time per token is the record's (seconds_per_mtok over the schedule).
