"""The language-model loss, outside the model (as in torchtitan).

The model returns logits; the engine turns them into the step's loss: the *sum* of token
cross-entropies over target positions that are not :data:`IGNORE_INDEX`, divided by the number of
such positions in the whole step (all micro-batches, all data-parallel ranks).  A mean per
micro-batch would weigh the tokens of short or heavily padded micro-batches more than those of
full ones; the global count makes accumulation and data parallelism exact.  Causal LM and
masked-LM (BERT) are the same call: only which positions carry a target differs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .zoo.model import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "lm_loss", "lm_loss_sum", "target_count"]


def lm_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ cross-entropy over target positions; logits (B, T, V), targets (B, T). fp32 softmax."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over target positions (validation losses, tests)."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="mean")


def target_count(targets: torch.Tensor) -> torch.Tensor:
    """Number of positions that carry a target (int64 tensor, on the targets' device)."""
    return (targets != IGNORE_INDEX).sum()
