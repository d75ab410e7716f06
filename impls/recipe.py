"""The :class:`Recipe`: everything a run's result depends on, and the single source of the CLI.

Every way of starting a run — ``etbench run`` flags, the isoFLOP runner, the asv benchmarks'
run helper — derives from these fields; a field added here is reachable from all of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError

SCHEDULES = ("cosine", "constant")
LR_SCALINGS = ("none", "linear", "sqrt")


@dataclass
class Recipe:
    model: str = "nano"
    data: str = "synthetic"
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    schedule: str = "cosine"  # linear warm-up, then cosine decay to 10% at the last step (Chinchilla)
    lr_warmup: int = 0
    # Large batch (Goyal et al. 2017): lr is tuned for base_batch sequences; "linear" scales it by
    # global batch / base_batch, "sqrt" by its square root (Krizhevsky 2014; Hoffer et al. 2017).
    lr_scaling: str = "none"
    base_batch: int = 8
    batch_size: int = 8  # sequences per data-parallel rank per micro-batch (grad_accum multiplies the step's batch)
    seq_len: int = 64
    techniques: list[str] = field(default_factory=list)
    seed: int = 0
    steps: int | None = None
    flops_budget: float | None = None  # counted FLOPs, all ranks; the run stops before exceeding it
    eval_every: int | None = None  # None: ten evaluations per run
    eval_batches: int = 4
    timing_warmup: int = 2  # first steps excluded from timing (allocator, thread-pool warm-up)
    mlm_rate: float = 0.15  # masked-LM encoders only (BERT)
    device: str = "auto"
    model_args: dict = field(default_factory=dict)
    # Named device-mesh dimensions other than dp, e.g. {"tp": 2}; dp takes the remaining ranks.
    mesh: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return "/".join([self.model, self.optimizer, *self.techniques])


class RecipeError(ConfigError):
    """Invalid recipe: the message is one line naming the bad value and the valid choices."""
