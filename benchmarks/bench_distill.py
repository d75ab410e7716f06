"""Knowledge distillation beside the student alone: loss at equal student steps and at equal total FLOPs.

The suite first trains the teacher, a bigger zoo model (``teacher_model``) on the same data to its
own (larger) budget, saving its final weights beside its record (``distill/distill-teacher.json`` and
``distill-teacher.state.pt``, the pair ``distill:teacher=`` reads, as ``--init-from`` does).
The student (the profile's model) then trains

* ``baseline``: alone, to the model-FLOP budget (6N + 12LHQT of the student);
* ``distill``: with the teacher (α = 0.5, T = 2), to the same *model*-FLOP budget: model FLOPs
  exclude the frozen teacher, so it runs exactly the baseline's steps — comparison (a), equal
  student steps;
* ``distill-counted``: the budget in *counted* FLOPs (``budget_flops="counted"``: everything the
  step executes, the teacher's forward included), so the distilled student gets fewer steps for
  the teacher's forward — comparison (b), equal total FLOPs.  The student alone needs no run of
  its own for it: its counted FLOPs are its model FLOPs within 1% (no recomputation, no frozen
  module; the record has both), so the baseline is the same run to within a step, and
  ``track_total_flops`` gives each run's steps × counted FLOPs per step, the totals compared.

``technique_notes["distill"]`` holds the teacher's path, SHA-256, parameters, α, T and
``teacher_flops_per_step`` (equal to the record's ``frozen_flops_per_step``), with its analytic
forward 2N_t + 4LHQT per token for comparison.  :class:`DistillSpeed` times the student alone and
with its teacher interleaved (the teacher's forward is the extra time per step).
"""
from __future__ import annotations

import functools
import json

from . import common

SETTINGS = {
    # Quick: the student is nano at d_model 32 (~32K parameters), the teacher the zoo's nano (~112K,
    # 3.6x) trained to 4x the student's budget; seq_len 64 and half the usual budget, so the
    # teacher, three student runs and the interleaved timing stay within the family's share of
    # make bench (a micro teacher trained to what fits there was no better than the student).
    "quick": dict(model="nano", model_args={"d_model": 32}, batch_size=8, seq_len=64, flops_budget=1.5e10,
                  lr=3e-3, data="synthetic", teacher_model="nano", teacher_budget=6e10, teacher_lr=3e-3),
    "full": dict(model="small", model_args={}, batch_size=16, seq_len=256, flops_budget=3e14, lr=1e-3,
                 data="pycode", teacher_model="gpt2", teacher_budget=1.2e15, teacher_lr=6e-4),
    "gpu": dict(model="gpt2", model_args={}, batch_size=16, seq_len=1024, flops_budget=2e15, lr=6e-4,
                data="pycode", teacher_model="gpt2-medium", teacher_budget=8e15, teacher_lr=3e-4),
}[common.profile_name()]

#: the ``teacher=`` value of the variants, replaced by the teacher record's path when the suite runs
TEACHER = "@teacher"

#: variant name -> (techniques, recipe overrides)
VARIANTS = {
    "baseline": ([], {}),
    "distill": ([f"distill:teacher={TEACHER},alpha=0.5,temperature=2.0"], {}),
    "distill-counted": ([f"distill:teacher={TEACHER},alpha=0.5,temperature=2.0"], {"budget_flops": "counted"}),
    # The knobs around the DistilBERT-style default (α = 0.5, T = 2), at equal student steps: T
    # softens both distributions (Hinton et al. §2: the T² keeps the soft gradients' scale), α
    # weighs the hard-label CE against the teacher's KL.
    "distill-T1": ([f"distill:teacher={TEACHER},alpha=0.5,temperature=1.0"], {}),
    "distill-T4": ([f"distill:teacher={TEACHER},alpha=0.5,temperature=4.0"], {}),
    "distill-a0.1": ([f"distill:teacher={TEACHER},alpha=0.1,temperature=2.0"], {}),
    "distill-a0.9": ([f"distill:teacher={TEACHER},alpha=0.9,temperature=2.0"], {}),
}


_recipe = functools.partial(common.family_recipe, SETTINGS, "model_args", "flops_budget")


def teacher_path():
    return common.runs_dir() / "distill" / "distill-teacher.json"


def resolve(specs: list[str]) -> list[str]:
    return [s.replace(TEACHER, str(teacher_path())) for s in specs]


def _train_teacher() -> dict:
    """The teacher trained to its budget (first seed), its final state saved beside its record."""
    from impls import train

    s = SETTINGS
    recipe = _recipe(model=s["teacher_model"], model_args={}, lr=s["teacher_lr"], flops_budget=s["teacher_budget"],
                     seed=common.PROFILE["seeds"][0], evaluations=common.PROFILE["evaluations"])
    if common.dry_run():  # its saved weights serve every later class
        return common.dry_run().once("distill-teacher", lambda: common.train_run(recipe))
    out = teacher_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    # save_every beyond the run's length: only the final state (always saved at the last step)
    record = train.run(common.recipe(**recipe), save_every=10 ** 9, checkpoint=out.with_suffix(".state.pt"))
    train.write_record(record, out)
    return json.loads(out.read_text())


class Distill(common.BudgetedRuns):
    """The student alone and with its teacher, at equal student steps and at equal counted FLOPs."""

    params = list(VARIANTS)

    def setup_cache(self):
        teacher = _train_teacher()
        records = {}
        for name, (techniques, overrides) in VARIANTS.items():
            records[(name,)] = common.train_record(f"distill-{name}", techniques=resolve(techniques),
                                                   **_recipe(**overrides))
        records[("teacher",)] = teacher
        return records

    setup_cache.timeout = 1800

    track_counted_flops_per_token = common.counted_flops_per_token
    track_frozen_bytes = common.tracked_field("memory", "frozen_bytes", unit="bytes")
    track_steps = common.tracked_field("steps", unit="steps")
    track_flops_per_step = common.tracked_field("flops_per_step", unit="FLOPs")
    track_frozen_flops_per_step = common.tracked_field("frozen_flops_per_step", unit="FLOPs")

    def track_teacher_flops_share(self, records, variant):
        """The teacher's forward as a share of the step's counted FLOPs (0 without a teacher)."""
        record = records[(variant,)]
        return record["frozen_flops_per_step"] / record["flops_per_step"]

    track_teacher_flops_share.unit = "ratio"

    def track_total_flops(self, records, variant):
        """Counted FLOPs of the whole run (steps × counted FLOPs per step, the teacher's included)."""
        record = records[(variant,)]
        return record["steps"] * record["flops_per_step"]

    track_total_flops.unit = "FLOPs"

    def track_loss_vs_student_alone(self, records, variant):
        """Final validation loss minus the student alone's (``distill``: at equal student steps;
        ``distill-counted``: at equal total counted FLOPs).  Negative: the teacher helped."""
        return records[(variant,)]["final_val_loss"] - records[("baseline",)]["final_val_loss"]

    track_loss_vs_student_alone.unit = "nats/token"

    def track_teacher_val_loss(self, records, variant):
        return records[("teacher",)]["final_val_loss"]

    track_teacher_val_loss.unit = "nats/token"


@common.speed_tracks
class DistillSpeed:
    """The student alone and with its teacher, timed interleaved (rounds, ratio per round, intervals)."""

    params = ["baseline", "distill"]
    param_names = ["variant"]

    def setup_cache(self):
        if not teacher_path().with_suffix(".state.pt").is_file():
            _train_teacher()
        variants = {name: dict(techniques=resolve(VARIANTS[name][0])) for name in self.params}
        return common.compare_record("distill", variants, common=_recipe(flops_budget=None))

    setup_cache.timeout = 1800
