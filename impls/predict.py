"""A run's wall time and peak memory per rank, predicted before any work, for a device it is not on.

Why: a user about to spend GPU hours on a profile (``make bench PROFILE=gpu DRY_RUN=1``) wants to
know, on a laptop, that every recipe is valid on the target (shapes, block_size, techniques, mesh
vs world size), that none needs more memory than the device has, and how long each family takes.
:func:`predict` validates a :class:`~impls.recipe.Recipe` exactly as ``etbench run`` does
(:func:`impls.train.validate`, with the target standing in for the device:
:func:`impls.dist.planning_for`; the model is built on ``meta``), then:

* **steps** — the recipe's, or its model-FLOP budget over one step's model FLOPs (the suite's
  budget rule: 6N + 12·L·H·Q·T per token, Kaplan et al. 2020 / PaLM appendix B);
* **time** — ``steps × (F_step / R_d + o_step) + E·B·F_fwd / R_d + o_run`` where ``F_step`` is
  one step's training FLOPs (×4/3 with full recomputation: one more forward), ``R_d`` the achieved
  FLOP/s per device in the run's compute dtype ``d`` times the data-parallel ranks, ``o_step`` a
  fixed per-step cost (launches, the optimizer, the host), ``E·B`` the validation batches
  (``evaluations + 2`` evaluations of ``eval_batches``) at a third of a training step's FLOPs
  (forward only), and ``o_run`` the start-up of one run (model build, the harness's counted-FLOP
  and activation passes, a torchrun launch for several ranks).  The rates are the caller's
  statement about the device (:class:`Rates`), printed with every prediction: this is arithmetic
  on stated rates, not a measurement;
* **memory** — :func:`impls.measure.footprint.predict` through :func:`impls.train.memory_footprint`
  (the ZeRO paper's model states, Korthikanti et al.'s saved activations, the logits), a lower
  bound of the step's peak per rank: over the device's memory means it cannot fit.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from . import dist, train
from .errors import ConfigError
from .measure.flops import model_flops_per_step
from .recipe import Recipe

#: The compute dtypes a rate is given for (the run's autocast or parameter dtype; fp8/int8 GEMMs).
DTYPES = ("float32", "bfloat16", "float16", "float8", "int8")


@dataclass(frozen=True)
class Rates:
    """Achieved FLOP/s per device by compute dtype, and fixed costs, for a device type."""
    flops: dict[str, float]
    step_overhead_s: float  # per optimizer step, beyond its FLOPs
    run_overhead_s: float  # per run: build, counted-FLOP and activation passes, first-step warm-up
    launch_overhead_s: float  # per multi-rank launch (torchrun, the process group)

    def rate(self, dtype: str) -> float:
        if dtype in self.flops:
            return self.flops[dtype]
        if dtype in ("float8", "int8"):  # no rate given for the narrow GEMMs: the autocast dtype's
            return self.flops.get("bfloat16", self.flops["float32"])
        return self.flops["float32"]

    def describe(self) -> str:
        rates = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in self.flops.items())
        return (f"achieved per device: {rates}; + {self.step_overhead_s * 1e3:.3g} ms per step, "
                f"{self.run_overhead_s:.3g} s per run, {self.launch_overhead_s:.3g} s per multi-rank launch")


#: Defaults, stated (not measured here): an H100 SXM reaches ~35% of its 989 TFLOP/s dense bf16
#: peak on GPT-2-sized models in eager PyTorch (nanoGPT-class step times), fp32 without TF32 ~60%
#: of its 67 TFLOP/s; this suite's 2-core CI VM trains fp32 CPU models at ~40 GFLOP/s (its fp32
#: probe ~170-220, tiny models well below), bf16 at a fraction (no AMX).  Override them with the
#: device you have (``--flops``).
DEFAULT_RATES = {
    "cuda": Rates({"float32": 40e12, "bfloat16": 350e12, "float16": 350e12, "float8": 500e12, "int8": 400e12},
                  step_overhead_s=0.004, run_overhead_s=8.0, launch_overhead_s=20.0),
    "cpu": Rates({"float32": 40e9, "bfloat16": 8e9, "float16": 2e9}, step_overhead_s=0.004,
                 run_overhead_s=1.0, launch_overhead_s=6.0),
}


@dataclass
class Prediction:
    """One run's prediction (``error``: the recipe is invalid on the target, with the reason)."""
    label: str
    nproc: int
    steps: int = 0
    dtype: str = "float32"
    model_flops_per_step: float = 0.0
    seconds: float = 0.0
    memory_bytes: float = 0.0  # per rank, a lower bound
    memory_parts: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def compute_dtype(specs, plan) -> str:
    """The dtype the step's GEMMs run in: fp8/int8 where a technique runs them so, else the
    autocast (or low-precision parameter) dtype, else fp32."""
    names = {s.name for s in specs}
    if "fp8" in names:
        return "float8"
    if "int8" in names:
        return "int8"
    return str(plan.autocast_dtype or torch.float32).removeprefix("torch.")


def predict(recipe: Recipe, nproc: int, target: dist.Target, rates: Rates, *, extra_steps: int = 0,
            label: str | None = None) -> Prediction:
    """Validate ``recipe`` on ``nproc`` ranks of ``target`` and predict its time and memory
    (module docstring).  ``extra_steps``: steps the caller runs beyond the recipe's (an
    interleaved comparison's rounds)."""
    out = Prediction(label or recipe.label, nproc)
    with dist.planning_for(target):
        try:
            checked = train.validate(recipe, nproc)
        except ConfigError as e:
            out.error = str(e)
            return out
        meta, specs, plan, dims = checked.meta, checked.specs, checked.plan, checked.dims
        device = torch.device(target.type)
        footprint = train.memory_footprint(recipe, meta, specs, plan, dims, device)
    rows = recipe.batch_size * plan.accum_steps * dims.dp
    step_flops = float(model_flops_per_step(meta, rows, recipe.seq_len))
    if recipe.steps is not None:
        steps = recipe.steps
    else:
        steps = int(recipe.flops_budget // step_flops)
        if recipe.budget_flops != "model":
            out.notes.append(f"budget in {recipe.budget_flops} FLOPs: steps from model FLOPs (an upper bound)")
    names = {s.name for s in specs}
    recompute = 4 / 3 if "checkpoint" in names else 1.0
    dtype = compute_dtype(specs, plan)
    rate = rates.rate(dtype) * max(1, dims.dp)
    train_steps = steps + extra_steps
    evals = (recipe.evaluations + 2) * recipe.eval_batches if recipe.steps is None or steps > 1 else 0
    seconds = (train_steps * (step_flops * recompute / rate + rates.step_overhead_s)
               + evals * (step_flops / 3 / plan.accum_steps / rate + rates.step_overhead_s / 3)
               + rates.run_overhead_s + (rates.launch_overhead_s if nproc > 1 else 0.0))
    out.steps, out.dtype, out.model_flops_per_step, out.seconds = steps, dtype, step_flops, seconds
    out.memory_bytes = footprint.total
    out.memory_parts = {k: v for k, v in footprint.parts().items() if v}
    out.notes.extend(footprint.notes)
    if not plan.dense_compute:
        out.notes.append("conditional computation: time from the dense model's FLOPs (an upper bound)")
    return out


def fits(prediction: Prediction, memory_bytes: float) -> bool:
    """Whether the predicted peak per rank (a lower bound) is within the device's memory."""
    return prediction.error is None and math.isfinite(prediction.memory_bytes) and prediction.memory_bytes <= memory_bytes
