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

from . import common

SETTINGS = {
    "quick": dict(model="encoder-nano", batch_size=8, seq_len=128, flops_budget=3e10, lr=3e-3, data="synthetic"),
    "full": dict(model="encoder-small", batch_size=16, seq_len=512, flops_budget=3e14, lr=1e-3, data="pycode"),
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


def _recipe(**overrides) -> dict:
    s = SETTINGS
    return {**dict(model=s["model"], data=s["data"], batch_size=s["batch_size"], seq_len=s["seq_len"], lr=s["lr"],
                   mlm_corrupt="mask", device=common.PROFILE["device"]), **overrides}


def _note(key: str, unit: str):
    def track(self, records, variant):
        notes = records[(variant,)]["technique_notes"].get("mae")
        return notes[key] if notes else None  # baselines run the full-sequence encoder

    track.unit = unit
    return track


def _counted_flops_per_token(self, records, variant):
    record = records[(variant,)]
    return record["flops_per_step"] / record["tokens_per_step"]


_counted_flops_per_token.unit = "FLOPs/token"


class Mae:
    """Each variant trained to the same model-FLOP budget; pairs share a mask rate."""

    params = list(VARIANTS)
    param_names = ["variant"]

    def setup_cache(self):
        records = {(name,): common.train_record(f"mae-{name}", techniques=techniques,
                                                flops_budget=SETTINGS["flops_budget"], **_recipe(**overrides))
                   for name, (techniques, overrides) in VARIANTS.items() if name not in ALIASES}
        for alias, name in ALIASES.items():
            records[(alias,)] = records[(name,)]
        return records

    setup_cache.timeout = 1800

    track_val_loss_at_budget = common.tracked_field("final_val_loss", unit="nats/token")
    track_steps_at_budget = common.tracked_field("steps", unit="steps")
    track_seconds_per_mtok = common.seconds_per_mtok
    track_params_bytes = common.tracked_field("memory", "params_bytes", unit="bytes")
    track_grads_bytes = common.tracked_field("memory", "grads_bytes", unit="bytes")
    track_optimizer_bytes = common.tracked_field("memory", "optimizer_bytes", unit="bytes")
    track_activations_bytes = common.tracked_field("memory", "activations_bytes", unit="bytes")
    track_visible_fraction = _note("visible_fraction", "ratio")
    track_encoder_flops_ratio = _note("encoder_flops_ratio", "ratio")
    track_counted_flops_ratio_vs_baseline = _note("counted_flops_ratio_vs_baseline", "ratio")
    track_counted_flops_per_token = _counted_flops_per_token


def _speed_class(rate: float):
    @common.speed_tracks
    class MaeSpeed:
        """The full-sequence encoder and mae timed interleaved at one mask rate."""

        params = ["baseline", f"mae-{rate}"]
        param_names = ["variant"]

        def setup_cache(self):
            variants = {"baseline": dict(techniques=[]), f"mae-{rate}": dict(techniques=["mae"])}
            return common.compare_record("mae", variants, common=_recipe(mlm_rate=rate, flops_budget=None),
                                         name=f"mae-speed-{rate}")

        setup_cache.timeout = 1800

    MaeSpeed.__name__ = MaeSpeed.__qualname__ = f"MaeSpeed{str(rate).replace('.', '')}"
    return MaeSpeed


MaeSpeed015, MaeSpeed04, MaeSpeed075 = (_speed_class(r) for r in RATES)
