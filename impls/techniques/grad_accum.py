"""Gradient accumulation: ``steps`` micro-batches per optimizer step, so the effective batch grows
while activation memory stays that of one micro-batch.

The engine sums each micro-batch's token losses and divides by the number of target tokens of
the *whole* step, so with variable-length, padded sequences the gradient equals the large
batch's exactly; averaging per-micro-batch means weighs short sequences' tokens more (the bug
several trainers shipped in 2024).  Under DDP only the last micro-batch all-reduces (``no_sync``).
Written here: torch has no accumulation helper beyond ``no_sync``.
"""
from ..errors import ConfigError

NAME = "grad_accum"
STAGE = "engine"  # how a step executes: no module changes
OPTIONS = {"steps": 2}


def configure(plan, options):
    if options["steps"] < 2:
        # steps=1 is the plain loop: a run labelled grad_accum that accumulates nothing is refused.
        raise ConfigError(f"grad_accum:steps must be >= 2 (1 micro-batch per step is no accumulation: "
                          f"leave the technique out), got {options['steps']}")
    plan.accum_steps = options["steps"]
