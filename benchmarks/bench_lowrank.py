"""Low-rank training beside the baseline: factorised layers, LoRA and GaLore at a fixed budget.

Every variant trains the same model on the same data to the same model-FLOP budget; the records
(``<runs>/lowrank/lowrank-*.json``) give loss vs rank per method, exact parameter, gradient and
optimizer bytes (the optimizer state against each method's formula in
``technique_notes[<method>]``), counted FLOPs and time.

* ``lowrank-r*``: every block Linear factorised as U·V of rank r, trained from scratch (SVD of the
  seeded dense init: Khodak et al.'s spectral init); the model is a smaller dense model, its
  budget the analytic 6N' of the new N'.
* ``galore-r*``: full-rank training with GaLore's rank-r projected AdamW state.
* ``lora-r*``: LoRA is fine-tuning: the baseline run saves its final weights beside its record
  (``lowrank-baseline.state.pt``) and the LoRA variants start from them (``--init-from``), as does
  ``finetune``, full fine-tuning from the same weights for the same budget: the reference LoRA's
  loss is compared with (the baseline's own loss is that of the starting point).  LoRA's model
  FLOPs are its counted FLOPs (no weight gradients for the frozen base), so the same budget buys
  it more steps than ``finetune``.

Speed: :class:`LowRankSpeed` times the baseline and one variant per method interleaved
(LoRA there on the random base: the speed does not depend on the weights).
"""
from __future__ import annotations

import functools
import json

from . import common

SETTINGS = {
    "quick": dict(model="nano", batch_size=8, seq_len=128, flops_budget=3e10, lr=3e-3, data="synthetic",
                  ranks=(4, 16)),
    "full": dict(model="small", batch_size=16, seq_len=256, flops_budget=3e14, lr=1e-3, data="pycode",
                 ranks=(8, 32)),
    "gpu": dict(model="gpt2", batch_size=16, seq_len=1024, flops_budget=2e15, lr=6e-4, data="pycode",
                ranks=(8, 64)),
}[common.profile_name()]

#: ``init_from`` value of the variants that start from the baseline's trained weights, replaced
#: by the baseline record's path when the suite runs.
BASELINE = "@baseline"
LOW, HIGH = SETTINGS["ranks"]

#: variant name -> (techniques, recipe overrides)
VARIANTS = {
    "baseline": ([], {}),
    **{f"lowrank-r{r}": ([f"lowrank:rank={r}"], {}) for r in (LOW, HIGH)},
    **{f"galore-r{r}": ([f"galore:rank={r}"], {}) for r in (LOW, HIGH)},
    "finetune": ([], {"init_from": BASELINE}),
    **{f"lora-r{r}": ([f"lora:rank={r},alpha={2 * r}"], {"init_from": BASELINE}) for r in (LOW, HIGH)},
}
#: the method whose notes hold each variant's facts
METHOD = {name: (specs[0].split(":")[0] if specs else None) for name, (specs, _) in VARIANTS.items()}


_recipe = functools.partial(common.family_recipe, SETTINGS, "flops_budget")


def baseline_path():
    return common.runs_dir() / "lowrank" / "lowrank-baseline.json"


def _train_baseline() -> dict:
    """:func:`common.train_record` for the baseline, whose first seed also saves its final
    weights beside the record (``lowrank-baseline.state.pt``, the path ``--init-from`` finds)."""
    from impls import train

    if common.dry_run():
        return common.train_record("lowrank-baseline", **_recipe())
    out = baseline_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for i, seed in enumerate(common.PROFILE["seeds"]):
        # save_every beyond the run's length: only the final state (always saved at the last step)
        extra = dict(save_every=10 ** 9, checkpoint=out.with_suffix(".state.pt")) if i == 0 else {}
        records.append(train.run(common.recipe(**_recipe(seed=seed)), **extra))
    record = records[0]
    record["seeds"] = common.seed_summary(records)
    train.write_record(record, out)
    return json.loads(out.read_text())


def _resolve(overrides: dict) -> dict:
    if overrides.get("init_from") == BASELINE:
        return {**overrides, "init_from": str(baseline_path())}
    return overrides


class LowRank(common.BudgetedRuns):
    """Each low-rank method at two ranks, trained to the baseline's model-FLOP budget."""

    params = list(VARIANTS)

    def setup_cache(self):
        records = {("baseline",): _train_baseline()}
        for name, (techniques, overrides) in VARIANTS.items():
            if name != "baseline":
                records[(name,)] = common.train_record(f"lowrank-{name}", techniques=techniques,
                                                       **_recipe(**_resolve(overrides)))
        return records

    setup_cache.timeout = 3600

    track_flops_per_step = common.tracked_field("flops_per_step", unit="FLOPs")

    def track_trainable_params(self, records, variant):
        notes = records[(variant,)]["technique_notes"].get(METHOD[variant]) if METHOD[variant] else None
        return notes["trainable_params"] if notes else records[(variant,)]["params"]

    track_trainable_params.unit = "parameters"

    def track_optimizer_vs_formula(self, records, variant):
        """Measured optimizer bytes ÷ the method's formula (1.0: the state is what the paper says)."""
        method = METHOD[variant]
        if method is None:
            return float("nan")
        return records[(variant,)]["technique_notes"][method]["optimizer_ratio"]

    track_optimizer_vs_formula.unit = "ratio"


@common.speed_tracks
class LowRankSpeed:
    """The baseline and one variant per method timed interleaved (rounds, ratio per round, intervals)."""

    params = ["baseline", f"lowrank-r{HIGH}", f"galore-r{HIGH}", f"lora-r{HIGH}"]
    param_names = ["variant"]

    def setup_cache(self):
        variants = {name: dict(techniques=VARIANTS[name][0]) for name in self.params}
        return common.compare_record("lowrank", variants, common=_recipe(flops_budget=None))

    setup_cache.timeout = 1800
