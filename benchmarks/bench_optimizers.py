"""Optimizers: state memory, speed and loss at a fixed counted-FLOP budget; and large-batch training.

``Optimizers`` trains the same model once per optimizer (impls.optimizers: SGD, Nesterov, Adam,
AdamW, Adafactor, LAMB, LARS, Lion, 8-bit AdamW) to one FLOP budget, and tracks the optimizer
state's bytes (exact, also per parameter), seconds per million tokens and the validation loss the
budget buys.  ``LargeBatch`` asks the large-batch question at a fixed budget: how does the loss
degrade as the global batch grows, with AdamW under the linear scaling rule (Goyal et al. 2017)
and the layer-wise adaptive LAMB (You et al. 2020) and LARS (You et al. 2017) under the square
root rule the LAMB paper uses?  Every run warms the learning rate up over a fixed fraction of its
steps -- at a fixed budget, a fixed number of samples, like Goyal et al.'s warm-up epochs.

Learning rates and weight decays are per optimizer (the same number means different things to
each: see impls.optimizers).  The quick profile's were tuned on this CPU by a small sweep at the
quick budget (``micro`` 34 steps, ``nano`` 233 steps at batch 8); the full profile's are the
papers' / common GPT-2 values, untuned.  The quick budgets are tiny: they rank early-training
progress, not converged quality.
"""
from __future__ import annotations

import functools

from . import common

P = common.PROFILE

# Weight decay per optimizer (matrices only; vectors are never decayed).  Adam: none -- the L2 form
# is what AdamW fixes, and Kingma & Ba use none.  Lion: 3× AdamW's with its 3-10× smaller lr (Chen
# et al. 2023).  LARS: the paper's 5e-4; its decay sits in the trust ratio's denominator.
WEIGHT_DECAY = {"sgd": 0.1, "nesterov": 0.1, "adam": 0.0, "adamw": 0.1, "adafactor": 0.1, "lamb": 0.1,
                "lars": 5e-4, "lion": 0.3, "adamw8bit": 0.1}
OPTIMIZERS = list(WEIGHT_DECAY)

SETTINGS = {
    "quick": dict(
        model="micro",
        flops_budget=2e11,  # ≈ 34 steps of micro at 8×128 tokens: the class stays near 2 CPU-minutes
        warmup_fraction=0.15,
        # Swept at this budget (val loss after 34 steps; adamw 2e-3: 1.85, 4e-3: 1.79, 8e-3: 3.05).
        lr={"sgd": 0.03, "nesterov": 0.03, "adam": 4e-3, "adamw": 4e-3, "adafactor": 0.1, "lamb": 0.05,
            "lars": 0.03, "lion": 2e-3, "adamw8bit": 4e-3},
        large_batch=dict(
            model="nano",
            batches=[8, 32, 128],
            flops_budget=2e11,  # ≈ 233 / 58 / 14 steps
            warmup_fraction=0.1,
            eval_sequences=128,  # every batch size is evaluated on the same number of sequences
            lr={"adamw": 3e-3, "lamb": 0.02, "lars": 0.01},  # at base_batch 8, swept at batch 8
        ),
    ),
    # full: 9 + 9 runs of gpt2 within the classes' 3600 s at fp32 (~40 TFLOP/s achieved on an
    # H100): 3e15 each; the large batches accumulate micro-batches of 16 (batch 256 × 1024 tokens
    # in one micro-batch saves ~155 GB of activations in fp32).
    "full": dict(
        model="gpt2",
        flops_budget=3e15,
        warmup_fraction=0.05,
        lr={"sgd": 0.03, "nesterov": 0.03, "adam": 6e-4, "adamw": 6e-4, "adafactor": 1e-2, "lamb": 6e-3,
            "lars": 6e-3, "lion": 1e-4, "adamw8bit": 6e-4},
        large_batch=dict(
            model="gpt2",
            batches=[16, 64, 256],
            micro_batch=16,
            flops_budget=3e15,
            warmup_fraction=0.05,
            eval_sequences=256,
            lr={"adamw": 6e-4, "lamb": 6e-3, "lars": 6e-3},
        ),
    ),
    # gpu: as full, in bf16 (the profile's precision) with the budgets sized for <= 60 min in all
    "gpu": dict(
        model="gpt2",
        flops_budget=1.5e15,
        warmup_fraction=0.05,
        lr={"sgd": 0.03, "nesterov": 0.03, "adam": 6e-4, "adamw": 6e-4, "adafactor": 1e-2, "lamb": 6e-3,
            "lars": 6e-3, "lion": 1e-4, "adamw8bit": 6e-4},
        large_batch=dict(
            model="gpt2",
            batches=[16, 64, 256],
            micro_batch=16,
            flops_budget=1.5e15,
            warmup_fraction=0.05,
            eval_sequences=256,
            lr={"adamw": 6e-4, "lamb": 6e-3, "lars": 6e-3},
        ),
    ),
}
S = SETTINGS[common.profile_name()]
LB = S["large_batch"]
LARGE_BATCH_OPTIMIZERS = ["adamw", "lamb", "lars"]
LR_SCALING = {"adamw": "linear", "lamb": "sqrt", "lars": "sqrt"}


@functools.lru_cache(maxsize=None)
def _vocab_size() -> int:
    from impls import data

    return data.load(P["data"]).vocab_size


def _estimated_steps(model: str, batch: int, budget: float) -> int:
    """Steps ``budget`` buys (model FLOPs; the counted FLOPs the run uses are ~2% higher)."""
    from impls import zoo
    from impls.measure import model_flops_per_step

    meta = zoo.build(model, device="meta", vocab_size=_vocab_size())
    return max(1, int(budget // model_flops_per_step(meta, batch, P["seq_len"])))


def _warmup(model: str, batch: int, budget: float, fraction: float) -> int:
    return max(1, round(fraction * _estimated_steps(model, batch, budget)))


def _track(key: str, unit: str, scale=None):
    def track(self, records, *params):
        record = records[params]
        value = record["memory"][key] if key.endswith("bytes") else record[key]
        return scale(value, record) if scale else value

    track.unit = unit
    return track


def optimizer_recipe(name: str) -> dict:
    """Recipe fields of the ``Optimizers`` run of ``name``."""
    return dict(model=S["model"], data=P["data"], optimizer=name, lr=S["lr"][name], weight_decay=WEIGHT_DECAY[name],
                lr_warmup=_warmup(S["model"], P["batch_size"], S["flops_budget"], S["warmup_fraction"]),
                batch_size=P["batch_size"], seq_len=P["seq_len"], flops_budget=S["flops_budget"], eval_every=10**9,
                device=P["device"])


def large_batch_recipe(name: str, batch: int) -> dict:
    """Recipe fields of the ``LargeBatch`` run of ``name`` at global ``batch`` (one rank): a
    batch above the profile's ``micro_batch`` accumulates micro-batches of that size (the same
    optimizer steps; the activations of one micro-batch)."""
    micro = min(batch, LB.get("micro_batch", batch))
    if batch % micro:
        raise ValueError(f"large-batch {batch} is not a multiple of the micro-batch {micro}")
    accum = [f"grad_accum:steps={batch // micro}"] if batch > micro else []
    return dict(model=LB["model"], data=P["data"], optimizer=name, lr=LB["lr"][name],
                weight_decay=WEIGHT_DECAY[name], lr_scaling=LR_SCALING[name], base_batch=LB["batches"][0],
                lr_warmup=_warmup(LB["model"], batch, LB["flops_budget"], LB["warmup_fraction"]),
                batch_size=micro, techniques=accum, seq_len=P["seq_len"], flops_budget=LB["flops_budget"],
                eval_every=10**9, eval_batches=max(1, LB["eval_sequences"] // micro), device=P["device"])


class Optimizers:
    """One run per optimizer to a fixed counted-FLOP budget (one rank, the profile's batch)."""

    params = OPTIMIZERS
    param_names = ["optimizer"]

    def setup_cache(self):
        return {(name,): common.train_record(f"optimizers-{name}", **optimizer_recipe(name)) for name in OPTIMIZERS}

    setup_cache.timeout = 3600

    track_optimizer_bytes = _track("optimizer_bytes", "bytes")
    track_optimizer_bytes_per_param = _track("optimizer_bytes", "bytes/param", lambda v, r: v / r["params"])
    track_seconds_per_mtok = common.seconds_per_mtok
    track_val_loss_at_budget = _track("final_val_loss", "nats/token")


@common.speed_tracks
class OptimizerSpeed:
    """Every optimizer's step timed interleaved with AdamW's on the same model (impls.compare)."""

    params = OPTIMIZERS
    param_names = ["optimizer"]

    def setup_cache(self):
        return common.compare_record("optimizers", {name: dict(optimizer_recipe(name), flops_budget=None)
                                                    for name in OPTIMIZERS}, baseline="adamw")

    setup_cache.timeout = 1800


class LargeBatch:
    """Loss at a fixed budget against the global batch: AdamW (linear lr scaling) vs LAMB, LARS (sqrt)."""

    params = (LARGE_BATCH_OPTIMIZERS, LB["batches"])
    param_names = ["optimizer", "global_batch"]

    def setup_cache(self):
        return {(name, batch): common.train_record(f"largebatch-{name}-b{batch}", **large_batch_recipe(name, batch))
                for name in LARGE_BATCH_OPTIMIZERS for batch in LB["batches"]}

    setup_cache.timeout = 3600

    track_val_loss_at_budget = _track("final_val_loss", "nats/token")
