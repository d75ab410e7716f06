"""What every engine shares: :class:`EngineBase`.

An engine (:class:`~impls.engines.Engine`) differs in how it runs forward and backward, updates the
parameters and holds state; what it shares with the others is written once here: the fields every
engine sets from the build and the recipe (the peak learning rate scaled for the global batch),
the learning-rate schedule, the skeleton of a training step around the build's hooks, the loss
sum with the build's loss terms, the step's target-token count over the data-parallel ranks,
evaluation, the clipping rule and the FLOP counts' form.  The torch engine
(:class:`~impls.engines.torch_engine.TorchEngine`, and the pipeline engine through it) and the
DeepSpeed engine (:class:`~impls.engines.deepspeed_engine.DeepSpeedEngine`) subclass it.
"""
from __future__ import annotations

import math

import torch

from ..build import StepOutput
from ..loss import lm_loss, lm_loss_sum, target_count


class EngineBase:
    """The shared part of an engine.  A subclass calls ``super().__init__`` before anything that
    reads these fields, and implements ``forward_backward`` (the step's gradients, returning its
    loss) and :meth:`optimizer_step` (the update once the ``before_step`` hooks ran)."""

    def __init__(self, build, recipe, total_steps: int):
        self.build, self.recipe, self.plan, self.total_steps = build, recipe, build.plan, total_steps
        self.device = build.device
        self.dp = build.dims.dp
        # The recipe's lr is for its base_batch; a larger global batch scales it (none, linear, sqrt).
        ratio = recipe.batch_size * self.plan.accum_steps * self.dp / recipe.base_batch
        self.peak_lr = recipe.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[recipe.lr_scaling]
        #: The global gradient norm before clipping, of the last step (None without --grad-clip).
        self.last_grad_norm: float | None = None

    # ------------------------------------------------------------------ the step

    def lr_at(self, step: int) -> float:
        """The learning rate of ``step``: linear warm-up over ``lr_warmup`` steps to the peak, then
        constant or cosine decay to a tenth of it at ``total_steps``."""
        r, peak = self.recipe, self.peak_lr
        if step < r.lr_warmup:
            return peak * (step + 1) / r.lr_warmup
        if r.schedule == "constant":
            return peak
        progress = (step - r.lr_warmup) / max(1, self.total_steps - r.lr_warmup)
        return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    def autocast(self):
        dtype = self.plan.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _run_hooks(self, kind: str, *args):
        for hook in self.build.hooks[kind]:
            hook(*args)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> float:
        """One optimizer step: the build's ``on_batch`` hooks, the schedule's learning rate,
        :meth:`step_forward_backward`, the ``before_step`` hooks, :meth:`optimizer_step` and the
        ``after_step`` hooks; returns the step's training loss."""
        for hook in self.build.hooks["on_batch"]:
            x, y = hook(x, y, step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        loss = self.step_forward_backward(x, y)
        self._run_hooks("before_step", step)
        self.optimizer_step()
        self._run_hooks("after_step", step)
        return loss.item()

    def step_forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training step's gradients: :meth:`forward_backward` (an engine may measure the first)."""
        return self.forward_backward(x, y)

    def optimizer_step(self) -> None:
        """Update the parameters from the gradients of :meth:`forward_backward`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the loss

    def loss_sum(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Σ token cross-entropy of the micro-batch plus, for each loss term of the build,
        weight × term × the micro-batch's target tokens (terms are per-token means, so after the
        division by the step's token count each is weighted exactly like the LM loss)."""
        loss = lm_loss_sum(logits, y)
        if self.build.loss_terms:
            out = StepOutput(x, y, logits)
            for term in self.build.loss_terms:
                if term.weight > 0:
                    value = term.value(out)
                    if value is not None:
                        loss = loss + term.weight * (value * target_count(y))
        return loss

    def step_target_count(self, y: torch.Tensor) -> torch.Tensor:
        """What a micro-batch's loss sum is divided by: the step's target tokens over all
        data-parallel ranks, ÷ ``dp`` (the gradient averaging over the ranks divides by ``dp``
        again), at least 1."""
        n_targets = target_count(y)
        if self.dp > 1:
            self.build.dims.all_reduce(n_targets, "dp", self.device.type)
            n_targets = n_targets / self.dp
        return n_targets.clamp(min=1)

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Pure LM loss in evaluation mode (ZeRO-3 gathers parameters through the module's own hooks)."""
        self.module.eval()
        with self.autocast():
            loss = lm_loss(self.module(x), y)
        self.module.train()
        return loss.item()

    # ------------------------------------------------------------------ clipping, FLOPs

    def clip_to(self, grads: list[torch.Tensor], norm: float) -> float:
        """Keep ``norm`` (the global L2 norm of the gradients before clipping) as
        ``last_grad_norm`` and, as ``torch.nn.utils.clip_grad_norm_``, scale ``grads`` in place by
        ``recipe.grad_clip / (norm + 1e-6)`` when that is below 1 (never up); a non-finite norm
        (an fp16 overflow, which the scaler then skips) clips nothing.  Returns ``norm``."""
        self.last_grad_norm = norm
        if math.isfinite(self.last_grad_norm):
            coef = min(1.0, self.recipe.grad_clip / (self.last_grad_norm + 1e-6))
            if coef < 1.0:
                for g in grads:
                    g.mul_(coef)
        return self.last_grad_norm

    @staticmethod
    def flop_counts(counter) -> dict:
        """What ``count_flops`` returns from its FLOP counter: ``total``, ``frozen`` (of them, the
        frozen modules' share) and ``by_dtype`` (the dtype each counted op ran in, for the MFU
        denominator, :func:`impls.measure.peak.effective_peak`)."""
        frozen = sum(counter.get_flop_counts().get("Frozen", {}).values())
        return dict(total=int(counter.get_total_flops()), frozen=int(frozen), by_dtype=dict(counter.flops_by_dtype))
