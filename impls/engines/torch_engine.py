"""The plain PyTorch engine: autograd backward, a ``torch.optim`` optimizer, the plan's autocast
dtype, dynamic loss scaling and micro-batches, over whatever the build's wrap stage produced.

Data-parallel techniques tell it three things through the build (:class:`~impls.build.Build`):
``no_sync`` (every micro-batch but the last backpropagates inside it, so gradients are
communicated once per step), ``grad_shard_group`` (this rank holds only a partition of the
gradients — FSDP's shards, ShardedDDP's owned gradients — so the global gradient norm and fp16's
overflow check reduce over that group) and ``local_optimizer`` (the rank's share of a sharded
optimizer).  With a sharding technique (``plan.sharding_stage > 0``) the engine's state is
per-rank: :attr:`TorchEngine.sharded_state` is True and :meth:`TorchEngine.state_dict` returns
this rank's local tensors, which :meth:`TorchEngine.load_state_dict` restores bit-identically at
the same world size.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as torch_dist
from torch.distributed.tensor import DTensor
from ..measure.flops import LocalFlopCounterMode as FlopCounterMode

from .. import optimizers
from ..measure import SavedActivations, model_state_bytes
from .base import EngineBase


class TorchEngine(EngineBase):
    sharded_state = False
    def __init__(self, build, recipe, total_steps: int):
        if len(build.model_parts) != 1:
            raise ValueError("the torch engine trains one model part; several parts need a pipeline engine")
        super().__init__(build, recipe, total_steps)
        self.module = build.model  # the model itself: evaluation, state, measurements
        self.make_optimizer()
        # What training calls (a DDP wrapper, say), read after the optimizer wrappers: ShardedDDP
        # wraps the model only once its OSS optimizer exists.
        self.train_module = build.train_parts[0]
        #: True when :meth:`state_dict` holds only this rank's shard (parameters or optimizer state
        #: sharded over the data-parallel ranks); the training state then gathers every rank's.
        self.sharded_state = self.plan.sharding_stage > 0 or any(
            isinstance(p, DTensor) for p in self.module.parameters())  # tensor parallelism shards too
        # fp16 gradients underflow below 2^-24: scale the loss up, unscale before the update, skip
        # steps whose gradients overflowed and back the scale off (Micikevicius et al. 2018, §3.2).
        # With partitioned gradients an overflow may show on one rank only: the sharded scaler
        # all-reduces the found-inf flag over the shard group, so every rank skips the same steps.
        self.scaler = None
        if self.plan.loss_scaling:
            if build.grad_shard_group is None:
                self.scaler = torch.amp.GradScaler(self.device.type)
            else:
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

                self.scaler = ShardedGradScaler(self.device.type, process_group=build.grad_shard_group)

    def make_optimizer(self) -> None:
        """The recipe's optimizer over :attr:`module`, wrapped by the build's optimizer wrappers
        (``optimizer``), and the one holding this rank's state (``local_optimizer``: the sharded
        optimizer's local one, if any)."""
        build, recipe = self.build, self.recipe
        optimizer = optimizers.build(recipe.optimizer, self.module, recipe.lr, recipe.weight_decay)
        for wrap in build.optimizer_wrappers:
            optimizer = wrap(optimizer, build)
        self.optimizer = optimizer
        self.local_optimizer = build.local_optimizer or optimizer

    def saved_tensors_hooks(self):
        """The build's saved-tensor hooks (compressed or offloaded activations) around a training
        forward, or nothing."""
        hooks = self.build.saved_tensors_hooks
        return torch.autograd.graph.saved_tensors_hooks(*hooks) if hooks else contextlib.nullcontext()

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
        n_targets = self.step_target_count(y)
        chunks = list(zip(x.chunk(self.plan.accum_steps), y.chunk(self.plan.accum_steps)))
        total = torch.zeros((), device=x.device)
        no_sync = self.build.no_sync
        for i, (xm, ym) in enumerate(chunks):
            # Only the last micro-batch communicates gradients (DDP's all-reduce, FSDP's
            # reduce-scatter, ShardedDDP's reduce): the earlier ones accumulate locally.
            # The backward runs inside the context too: FSDP2 and ShardedDDP read the flag while
            # their backward hooks fire (DDP already at forward).
            sync = i == len(chunks) - 1 or no_sync is None
            with contextlib.nullcontext() if sync else no_sync():
                with self.autocast(), self.saved_tensors_hooks():
                    logits = self.train_module(xm)
                    loss = self.loss_sum(xm, ym, logits) / n_targets
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
        return total

    def optimizer_step(self) -> None:
        if self.recipe.grad_clip is not None:
            self.clip_gradients()
        if self.scaler:
            self.scaler.step(self.optimizer)  # skipped when the gradients hold inf/NaN
            self.scaler.update()
        else:
            self.optimizer.step()

    def clip_gradients(self) -> float:
        """Clip the global L2 norm of the gradients to ``recipe.grad_clip`` (after unscaling them,
        under fp16 loss scaling, so the threshold is in true gradient units); keep and return the
        pre-clip norm.  Gradients are already averaged over data-parallel ranks here.  Where every
        rank holds them whole, every rank computes the same norm; where this rank holds a
        partition (``build.grad_shard_group``: FSDP's DTensor shards, ShardedDDP's owned
        gradients), the squared norms of the local parts are summed over the group, so the norm
        is the global one on every rank.  A non-finite norm (an fp16 overflow, which the scaler
        then skips) clips nothing."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        all_grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads = [_local(g) for g in all_grads]
        # DTensor gradients (FSDP2's shards, tensor parallelism's shards and replicas) know their
        # layout: the norm of each is reduced over the mesh dimensions it is sharded on, and not
        # over those it is replicated on.  Plain gradients are local (or, with a shard group
        # such as ShardedDDP's, a partition summed over that group).
        plain = [torch.linalg.vector_norm(g.detach(), dtype=torch.float32) for g in all_grads
                 if not isinstance(g, DTensor)]
        dtensor = [torch.linalg.vector_norm(g.detach(), dtype=torch.float32).full_tensor() for g in all_grads
                   if isinstance(g, DTensor)]
        shard_group = self.build.grad_shard_group
        square = torch.stack(plain).square().sum() if plain else torch.zeros((), device=self.device)
        if shard_group is not None and not dtensor:  # every rank joins, even one holding no gradients
            torch_dist.all_reduce(square, group=shard_group)
        if dtensor:
            square = square + torch.stack(dtensor).square().sum()
        if not all_grads and shard_group is None:
            self.last_grad_norm = 0.0
            return 0.0
        return self.clip_to(grads, float(square.sqrt()))

    def count_flops(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, int]:
        with FlopCounterMode(display=False) as counter:
            self.forward_backward(x, y)
        return self.flop_counts(counter)

    def activation_bytes(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """Bytes autograd saves for one micro-batch's backward, the parameters excluded.  FSDP2
        modules are unsharded first, so the gathered parameters the forward computes with (which
        a matmul saves) are recognised as parameters, as they are in an unsharded model."""
        from torch.distributed.fsdp import FSDPModule

        fsdp = [m for m in self.module.modules() if isinstance(m, FSDPModule)]
        for module in fsdp:
            module.unshard()
        try:
            blocks = list(getattr(self.module, "blocks", ()))
            # The meter composes with the build's hooks (it measures what their pack stores).
            with SavedActivations(self.module.parameters(), by_module=blocks,
                                  transform=self.build.saved_tensors_hooks) as saved, self.autocast():
                self.loss_sum(x, y, self.module(x))
        finally:
            for module in fsdp:
                module.reshard()
        # each block's own saved bytes: what per-layer formulas (Korthikanti et al. 2022) describe
        self.build.layer_activation_bytes = saved.per_module
        self.build.activation_bytes_by_device = dict(saved.bytes_by_device)
        return saved.bytes

    def state_bytes(self) -> dict[str, int]:
        """This rank's bytes: local parameter and gradient shards (DTensors count their local
        tensor's storage, FSDP2's padding included), and the state of the optimizer that holds this
        rank's share."""
        return model_state_bytes(self.module, self.local_optimizer)

    def state_dict(self) -> dict:
        """Model, optimizer and scaler state.  With :attr:`sharded_state`, this rank's part only,
        as plain CPU tensors that load without a process group: the local tensor of every
        sharded parameter and the local optimizer's state (DTensor entries as their local
        tensors, listed under ``dtensor_state`` so loading can rebuild them)."""
        scaler = self.scaler.state_dict() if self.scaler else None
        if not self.sharded_state:
            return dict(model=self.module.state_dict(), optimizer=self.optimizer.state_dict(), scaler=scaler)
        model = {k: _local(v).detach().cpu().clone() for k, v in self.module.state_dict().items()}
        optimizer = self.local_optimizer.state_dict()
        dtensor_state = []
        for index, entries in optimizer["state"].items():
            for key, value in list(entries.items()):
                if isinstance(value, DTensor):
                    dtensor_state.append((index, key))
                if isinstance(value, torch.Tensor):
                    entries[key] = _local(value).detach().cpu().clone()
        return dict(model=model, optimizer=optimizer, dtensor_state=dtensor_state, scaler=scaler)

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if self.scaler:
            self.scaler.load_state_dict(state["scaler"])
        if not self.sharded_state:
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            return
        live = self.module.state_dict()
        if live.keys() != state["model"].keys():
            missing, extra = sorted(live.keys() - state["model"].keys()), sorted(state["model"].keys() - live.keys())
            raise ValueError(f"sharded model state does not match the model (missing {missing}, unexpected {extra})")
        for key, tensor in live.items():
            local = _local(tensor)
            saved = state["model"][key]
            if saved.shape != local.shape:
                raise ValueError(f"sharded state of {key} has shape {tuple(saved.shape)}, this rank's shard "
                                 f"{tuple(local.shape)}: saved at another world size?")
            local.copy_(saved)
        saved = state["optimizer"]  # copied, not changed: the caller's state stays plain tensors
        optimizer = {**saved, "state": {index: dict(entries) for index, entries in saved["state"].items()}}
        params = [p for group in self.local_optimizer.param_groups for p in group["params"]]
        for index, key in state.get("dtensor_state", ()):
            param, local = params[index], optimizer["state"][index][key]
            optimizer["state"][index][key] = DTensor.from_local(
                local.to(_local(param).device), param.device_mesh, param.placements, run_check=False,
                shape=param.shape, stride=param.stride())
        self.local_optimizer.load_state_dict(optimizer)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly sharded) tensor this rank holds."""
    return t.to_local() if isinstance(t, DTensor) else t
