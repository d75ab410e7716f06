"""The plain PyTorch engine: autograd backward, a ``torch.optim`` optimizer, the plan's autocast
dtype, dynamic loss scaling and micro-batches, over whatever the build's wrap stage produced."""
from __future__ import annotations

import contextlib
import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from .. import optimizers
from ..build import StepOutput
from ..loss import lm_loss, lm_loss_sum, target_count
from ..measure import SavedActivations, model_state_bytes


class TorchEngine:
    sharded_state = False
    def __init__(self, build, recipe, total_steps: int):
        if len(build.model_parts) != 1:
            raise ValueError("the torch engine trains one model part; several parts need a pipeline engine")
        self.build, self.recipe, self.plan, self.total_steps = build, recipe, build.plan, total_steps
        self.module = build.model  # the model itself: evaluation, state, measurements
        self.train_module = build.train_parts[0]  # what training calls (a DDP wrapper, say)
        self.device = build.device
        self.dp = build.dims.dp
        optimizer = optimizers.build(recipe.optimizer, self.module, recipe.lr, recipe.weight_decay)
        for wrap in build.optimizer_wrappers:
            optimizer = wrap(optimizer, build)
        self.optimizer = optimizer
        # fp16 gradients underflow below 2^-24: scale the loss up, unscale before the update, skip
        # steps whose gradients overflowed and back the scale off (Micikevicius et al. 2018, §3.2).
        self.scaler = torch.amp.GradScaler(self.device.type) if self.plan.loss_scaling else None
        global_batch = recipe.batch_size * self.plan.accum_steps * self.dp
        ratio = global_batch / recipe.base_batch
        self.peak_lr = recipe.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[recipe.lr_scaling]
        #: The global gradient norm before clipping, of the last step (None without --grad-clip).
        self.last_grad_norm: float | None = None

    def lr_at(self, step: int) -> float:
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

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradients of the mean loss over all target tokens of the step's ``accum_steps``
        micro-batches; returns that loss.

        Each micro-batch contributes its loss *sum* divided by the step's total target-token
        count, so padded or masked micro-batches of different lengths weigh exactly as in one
        large batch (a mean of per-micro-batch means would not).  Across data-parallel ranks the
        count is the global one, times the ``dp`` size that DDP's gradient averaging divides by
        again.
        """
        self.optimizer.zero_grad(set_to_none=True)
        n_targets = target_count(y)
        if self.dp > 1:
            self.build.dims.all_reduce(n_targets, "dp", self.device.type)
            n_targets = n_targets / self.dp
        n_targets = n_targets.clamp(min=1)
        chunks = list(zip(x.chunk(self.plan.accum_steps), y.chunk(self.plan.accum_steps)))
        total = torch.zeros((), device=x.device)
        for i, (xm, ym) in enumerate(chunks):
            # Only the last micro-batch all-reduces gradients under DDP.
            no_sync = getattr(self.train_module, "no_sync", None)
            sync = i == len(chunks) - 1 or no_sync is None
            with (contextlib.nullcontext() if sync else no_sync()), self.autocast():
                logits = self.train_module(xm)
                loss = self.loss_sum(xm, ym, logits) / n_targets
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
        return total

    def _run_hooks(self, kind: str, *args):
        for hook in self.build.hooks[kind]:
            hook(*args)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> float:
        for hook in self.build.hooks["on_batch"]:
            x, y = hook(x, y, step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        loss = self.forward_backward(x, y)
        self._run_hooks("before_step", step)
        if self.recipe.grad_clip is not None:
            self.clip_gradients()
        if self.scaler:
            self.scaler.step(self.optimizer)  # skipped when the gradients hold inf/NaN
            self.scaler.update()
        else:
            self.optimizer.step()
        self._run_hooks("after_step", step)
        return loss.item()

    def clip_gradients(self) -> float:
        """Clip the global L2 norm of the gradients to ``recipe.grad_clip`` (after unscaling them,
        under fp16 loss scaling, so the threshold is in true gradient units); keep and return the
        pre-clip norm.  Gradients are already averaged over data-parallel ranks here, so every
        rank computes the same norm.  A non-finite norm (an fp16 overflow, which the scaler then
        skips) clips nothing."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            self.last_grad_norm = 0.0
            return 0.0
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach(), dtype=torch.float32)
                                                     for g in grads]))
        self.last_grad_norm = float(norm)
        if math.isfinite(self.last_grad_norm):
            # as torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6), never up
            coef = min(1.0, self.recipe.grad_clip / (self.last_grad_norm + 1e-6))
            if coef < 1.0:
                for g in grads:
                    g.mul_(coef)
        return self.last_grad_norm

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.module.eval()
        with self.autocast():
            loss = lm_loss(self.module(x), y)
        self.module.train()
        return loss.item()

    def count_flops(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, int]:
        with FlopCounterMode(display=False) as counter:
            self.forward_backward(x, y)
        frozen = sum(counter.get_flop_counts().get("Frozen", {}).values())
        return dict(total=int(counter.get_total_flops()), frozen=int(frozen))

    def activation_bytes(self, x: torch.Tensor, y: torch.Tensor) -> int:
        with SavedActivations(self.module.parameters()) as saved, self.autocast():
            self.loss_sum(x, y, self.module(x))
        return saved.bytes

    def state_bytes(self) -> dict[str, int]:
        return model_state_bytes(self.module, self.optimizer)

    def state_dict(self) -> dict:
        return dict(model=self.module.state_dict(), optimizer=self.optimizer.state_dict(),
                    scaler=self.scaler.state_dict() if self.scaler else None)

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler:
            self.scaler.load_state_dict(state["scaler"])
