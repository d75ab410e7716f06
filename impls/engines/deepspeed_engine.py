"""The DeepSpeed engine: ``deepspeed.initialize`` owns the optimizer, the precision, backward and
the data-parallel gradient reduction (ZeRO stages 1-3, Rajbhandari et al. 2020; ZeRO-Offload,
Ren et al. 2021; 1-bit Adam, Tang et al. 2021), selected by an ``engine``-stage technique
(:mod:`impls.techniques.zero`, :mod:`impls.techniques.onebit`).

What the training loop sees is the :class:`~impls.engines.Engine` protocol, the same as for the
torch engine:

* **Loss normalisation.**  A micro-batch's loss is its token cross-entropy *sum* divided by the
  step's global target-token count over ``dp`` (as :meth:`TorchEngine.forward_backward`).
  DeepSpeed divides a loss by its ``gradient_accumulation_steps`` in ``backward`` unless told
  not to (``scale_wrt_gas=False``, used here: the global count already normalises the step), and
  ZeRO's reduction averages gradients over the ``dp`` ranks (``average_tensor`` divides by the
  dp world size), which the ``/ dp`` in the count undoes: the gradient equals that of one process
  on the concatenated batch.  Accumulation runs ``accum_steps`` micro-batches with
  ``set_gradient_accumulation_boundary`` (True on the last only) and one ``engine.step()``.
* **Learning rate.**  DeepSpeed gets no scheduler; the engine sets every param group's lr to the
  recipe's :meth:`EngineBase.lr_at` before each step, so both engines follow one schedule.
* **Clipping.**  ``recipe.grad_clip`` becomes DeepSpeed's ``gradient_clipping`` (the same rule as
  ``torch.nn.utils.clip_grad_norm_``: scale by clip / (norm + 1e-6) when < 1);
  ``last_grad_norm`` is ``engine.get_global_grad_norm()``, the pre-clip global norm.
* **Precision.**  With ``plan.low_precision_params`` the module runs in DeepSpeed's bf16/fp16 mode
  (parameters and gradients in 16 bit, an fp32 master partition in the optimizer) and the engine
  does *not* autocast; otherwise everything is fp32.
* **State bytes.**  :meth:`state_bytes` walks the tensors DeepSpeed really holds on this rank
  (module parameters and their flat buffers, the fp32 master partition, the gradient partitions,
  the base optimizer's moments, the reduction buckets), each storage once, and reports them with
  a breakdown.  Gradients are sampled during the first step's backward (after each parameter's
  gradient accumulates) and after it, and the largest sample is reported: ``step()`` frees them,
  and stage 1 holds whole gradients only until the boundary's reduction.
* **Checkpoints.**  ``sharded_state = True``: :meth:`state_dict` runs ``save_checkpoint`` into a
  private temporary directory and returns the files *this rank* wrote ({relative name: bytes});
  :meth:`load_state_dict` writes the union of all ranks' files back and calls
  ``load_checkpoint``.  Resuming at the same world size is bit-identical (tested); another world
  size is refused by the training-state loader (DeepSpeed's elastic checkpoints are not used).
"""
from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch

from .. import optimizers
from ..measure import SavedActivations
from ..measure.flops import DtypeFlopCounterMode as FlopCounterMode
from ..measure.memory import param_storages, storage_key, tensor_bytes, tensors_in
from .base import EngineBase

#: The key under which an engine-stage technique leaves its part of the DeepSpeed config in its
#: notes (``build.notes[technique]["deepspeed_config"]``); the engine completes it (batch sizes,
#: clipping, precision) and writes the config it used back there.
CONFIG_KEY = "deepspeed_config"
#: Recipe optimizers the engine can hand to DeepSpeed (a torch optimizer ZeRO partitions; under
#: optimizer offload, DeepSpeedCPUAdam for the Adam family).
SUPPORTED_OPTIMIZERS = ("adamw", "adam", "sgd")
CHECKPOINT_TAG = "etbench"


def _dist_ready() -> None:
    """DeepSpeed needs a process group even on one rank: create a one-rank gloo group (an
    in-memory store, no port) when the run did not (world size 1).  DeepSpeed caches the groups
    it made (a clone of the world group) at module level; if the process group they belonged to
    was destroyed since (an earlier run in this process, :func:`impls.dist.shutdown`), those
    references are released so DeepSpeed makes new ones."""
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    os.environ.setdefault("LOCAL_RANK", "0")
    from deepspeed.utils import groups

    cached = getattr(groups, "_WORLD_GROUP", None)
    if cached is not None:
        try:
            torch.distributed.get_process_group_ranks(cached)
        except (ValueError, KeyError, RuntimeError):
            groups._release_process_group_references(None)


def _owner(build) -> tuple[str, dict]:
    owners = [(k, v) for k, v in build.notes.items() if isinstance(v, dict) and CONFIG_KEY in v]
    if len(owners) != 1:
        raise ValueError(f"the deepspeed engine needs exactly one technique that configures it (notes with "
                         f"{CONFIG_KEY!r}), found {[k for k, _ in owners]}")
    return owners[0]


def make_optimizer(name: str, module: torch.nn.Module, lr: float, weight_decay: float, offload: bool):
    """The optimizer DeepSpeed partitions: the recipe's (same param groups and hyper-parameters
    as :mod:`impls.optimizers`), or under optimizer offload DeepSpeedCPUAdam for adam/adamw (its
    fused CPU kernel; ``adamw_mode`` picks decoupled decay).  Returns (optimizer, description)."""
    if name not in SUPPORTED_OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is not supported by the deepspeed engine; valid: "
                         f"{', '.join(SUPPORTED_OPTIMIZERS)}")
    if offload and name in ("adam", "adamw"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        groups = optimizers.model_param_groups(module, weight_decay)
        opt = DeepSpeedCPUAdam(groups, lr=lr, betas=optimizers.ADAM_BETAS, eps=1e-8, weight_decay=weight_decay,
                               adamw_mode=name == "adamw")
        return opt, f"deepspeed.ops.adam.DeepSpeedCPUAdam(adamw_mode={name == 'adamw'})"
    opt = optimizers.build(name, module, lr, weight_decay)
    return opt, f"{type(opt).__module__}.{type(opt).__name__}"


class DeepSpeedEngine(EngineBase):
    sharded_state = True

    def __init__(self, build, recipe, total_steps: int):
        import deepspeed

        if len(build.model_parts) != 1:
            raise ValueError("the deepspeed engine trains one model part")
        if build.optimizer_wrappers:
            raise ValueError("the deepspeed engine builds its own (partitioned) optimizer: optimizer-stage "
                             "wrappers cannot apply to it")
        super().__init__(build, recipe, total_steps)
        self.module = build.model
        owner, notes = _owner(build)
        part = copy.deepcopy(notes[CONFIG_KEY])
        offload = part.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
        _dist_ready()
        if torch.distributed.get_world_size() != self.dp:
            raise ValueError(f"the deepspeed engine reduces over the whole world ({torch.distributed.get_world_size()} "
                             f"ranks), but dp={self.dp}")
        config = dict(
            train_micro_batch_size_per_gpu=recipe.batch_size,
            gradient_accumulation_steps=self.plan.accum_steps,
            train_batch_size=recipe.batch_size * self.plan.accum_steps * self.dp,
            gradient_clipping=float(recipe.grad_clip or 0.0),
            steps_per_print=2**62, wall_clock_breakdown=False,
            **part)
        dtype = self.plan.autocast_dtype if self.plan.low_precision_params else None
        if dtype is torch.bfloat16:
            config["bf16"] = {"enabled": True}
        elif dtype is torch.float16:
            config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
        optimizer = None
        if "optimizer" not in config:  # a technique may name DeepSpeed's own (onebit); else the recipe's
            optimizer, described = make_optimizer(recipe.optimizer, self.module, recipe.lr, recipe.weight_decay, offload)
            if recipe.optimizer == "sgd":
                config["zero_allow_untested_optimizer"] = True  # torch SGD is outside ZeRO's tested list
            if offload and recipe.optimizer == "sgd":
                config["zero_force_ds_cpu_optimizer"] = False  # no DeepSpeed CPU SGD: torch's runs on the host
        else:  # DeepSpeed's own optimizer, with the recipe's hyper-parameters
            config["optimizer"]["params"].update(lr=recipe.lr, weight_decay=recipe.weight_decay,
                                                 betas=list(optimizers.ADAM_BETAS), eps=1e-8)
            described = f"DeepSpeed {config['optimizer']['type']}"
        # DeepSpeed's own optimizer (config "optimizer") is built over these groups (the recipe's
        # decay / no-decay split); a client optimizer already holds them.
        groups = optimizers.model_param_groups(self.module, recipe.weight_decay) if optimizer is None else None
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=self.module, optimizer=optimizer, config=config,
                                                             model_parameters=groups, dist_init_required=False)
        notes["deepspeed_config_used"] = {k: v for k, v in config.items()}
        notes["optimizer_ran"] = described
        notes["optimizer_name"] = recipe.optimizer
        self.stage = int(config.get("zero_optimization", {}).get("stage", 0))
        self._grads_snapshot: dict | None = None

    def autocast(self):
        # DeepSpeed's bf16/fp16 modes hold the module in 16 bit: no autocast on top.
        dtype = None if self.plan.low_precision_params else self.plan.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """As :meth:`TorchEngine.forward_backward`, through DeepSpeed's forward and backward: the
        gradients are reduced (and partitioned) by ZeRO at the last micro-batch's boundary (stage
        2/3 reduce bucket by bucket in every micro-batch's backward)."""
        n_targets = self.step_target_count(y)
        chunks = list(zip(x.chunk(self.plan.accum_steps), y.chunk(self.plan.accum_steps)))
        total = torch.zeros((), device=x.device)
        for i, (xm, ym) in enumerate(chunks):
            self.ds.set_gradient_accumulation_boundary(i == len(chunks) - 1)
            with self.autocast():
                logits = self.ds(xm)
                loss = self.loss_sum(xm, ym, logits) / n_targets
            self.ds.backward(loss, scale_wrt_gas=False)  # the global token count already normalises
            total += loss.detach()
        return total

    def step_forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._grads_snapshot is None:  # the first step (of this process): measure the gradients held
            return self._forward_backward_measuring_grads(x, y)
        return self.forward_backward(x, y)

    def optimizer_step(self) -> None:
        self.ds.step()
        if self.recipe.grad_clip is not None:
            norm = self.ds.get_global_grad_norm()
            self.last_grad_norm = None if norm is None else float(norm)

    def _forward_backward_measuring_grads(self, x, y) -> torch.Tensor:
        """:meth:`forward_backward`, sampling the gradient bytes held after every parameter's
        gradient is accumulated (a hook registered after ZeRO's own, so it sees what ZeRO left:
        stage 1 keeps each whole gradient until the boundary, stage 2/3 reduce a bucket and free
        it) and once after the backward; keeps the sample with the most bytes."""
        best: dict = {"total": -1}

        def sample(*_):
            nonlocal best
            now = self._grad_bytes()
            if now["total"] > best["total"]:
                best = now

        handles = [p.register_post_accumulate_grad_hook(sample) for p in self.module.parameters() if p.requires_grad]
        try:
            loss = self.forward_backward(x, y)
        finally:
            for h in handles:
                h.remove()
        sample()
        self._grads_snapshot = best
        return loss

    def count_flops(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, int]:
        """Forward and backward of every micro-batch of a step, counted.  Backward is
        ``torch.autograd.grad`` over the trainable parameters: the same gradient computation, but
        nothing is accumulated into ``.grad``, so ZeRO's gradient hooks (which fire on
        accumulation) neither reduce nor keep anything — the counting pass leaves no state
        behind (ZeRO-3 still gathers and releases parameters through its module hooks)."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        n_targets = self.step_target_count(y)
        with FlopCounterMode(display=False) as counter:
            for xm, ym in zip(x.chunk(self.plan.accum_steps), y.chunk(self.plan.accum_steps)):
                with self.autocast():
                    loss = self.loss_sum(xm, ym, self.module(xm)) / n_targets
                torch.autograd.grad(loss, params, allow_unused=True)
        return self.flop_counts(counter)

    def activation_bytes(self, x: torch.Tensor, y: torch.Tensor) -> int:
        params = list(self.module.parameters())
        saved = _SavedExcludingLiveParams(params) if self.stage == 3 else SavedActivations(params)
        with saved, self.autocast():
            self.loss_sum(x, y, self.module(x))
        return saved.bytes

    # ------------------------------------------------------------------ exact bytes

    def _zero(self):
        return self.optimizer

    def _bucket_tensors(self) -> list[torch.Tensor]:
        """ZeRO's reduction buckets (``ipg_buckets[dtype].buffer``): communication scratch of
        ``reduce_bucket_size`` elements, the paper's constant-size buffers (§6), not model state."""
        out = []
        for bucket in getattr(self._zero(), "ipg_buckets", {}).values():
            out.extend(tensors_in(getattr(bucket, "buffer", None)))
        return out

    def _grad_bytes(self) -> dict:
        """Gradient storage held now: ZeRO's reduced gradient partitions (stage 1/2
        ``averaged_gradients``, stage 2's ``grads_in_partition`` — which holds the *whole*
        gradient of every tensor that overlaps this rank's partition, so a tensor straddling a
        partition boundary is kept whole on both ranks —, stage 3's ``grad_partitions_flat_buffer``,
        under offload the fp32 master partitions' ``.grad``), then the module's other ``.grad``
        tensors (whole gradients: stage 1 until the boundary; under stage 2/3 a gradient is a view
        into a reduction bucket between its hook and the bucket's reduction: bucket bytes)."""
        zero = self._zero()
        buckets = self._bucket_tensors()
        seen = {storage_key(t) for t in buckets}
        out = {"buckets": tensor_bytes(buckets)}
        partitions = [*tensors_in(getattr(zero, "averaged_gradients", None)),
                      *tensors_in(getattr(zero, "grads_in_partition", None))]
        for name, value in vars(zero).items():
            # stage 3: grad_partitions_flat_buffer, _DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition
            if name.endswith("grad_partitions_flat_buffer") or name.endswith("param_id_to_grad_partition"):
                partitions.extend(tensors_in(value))
        for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            partitions.extend(t.grad for t in tensors_in(getattr(zero, name, None)) if t.grad is not None)
        # partitions first: under stage 2 a reduced gradient is a view into grads_in_partition
        groups = {"grad_partitions": partitions,
                  "module_grads": [p.grad for p in self.module.parameters() if p.grad is not None]}
        for kind, tensors in groups.items():
            out[kind] = tensor_bytes(tensors, exclude=seen)
            seen |= {storage_key(t) for t in tensors if t.device.type != "meta"}
        out["total"] = out["module_grads"] + out["grad_partitions"]
        return out

    def state_bytes(self) -> dict[str, int]:
        """This rank's exact bytes, each storage once: ``params_bytes`` (the module's parameters
        as stored: stage 0-2 the flat 16-bit or fp32 buffers they view, stage 3 the
        ``ds_tensor`` partitions), ``grads_bytes`` (see :meth:`_grad_bytes`), ``optimizer_bytes``
        (the fp32 master partition DeepSpeed keeps — also in fp32 mode — plus the base
        optimizer's moments), and ``breakdown`` with the pieces and the reduction buckets
        (``buckets_bytes``, communication scratch of the configured bucket size: reported, not
        summed into the model states)."""
        zero = self._zero()
        seen: set = set()

        def take(tensors) -> int:
            tensors = [t for t in tensors if t is not None and t.numel() > 0]
            n = tensor_bytes(tensors, exclude=seen)
            seen.update(storage_key(t) for t in tensors if t.device.type != "meta")
            return n

        params = list(self.module.parameters())
        if self.stage == 3:
            part = [p.ds_tensor for p in params if hasattr(p, "ds_tensor")]
            flat = list(tensors_in(getattr(zero, "fp16_partitioned_groups_flat", None)))
            live = [p.data for p in params if p.numel() > 0]  # persistent (unpartitioned) or gathered now
            params_bytes = take([*flat, *part]) + take(live)
        else:
            flat = list(tensors_in(getattr(zero, "bit16_groups_flat", None)))
            params_bytes = take([*flat, *params])
        master = list(tensors_in(getattr(zero, "single_partition_of_fp32_groups", None)))
        master += list(tensors_in(getattr(zero, "fp32_partitioned_groups_flat", None)))
        master_bytes = take(master)
        base = getattr(zero, "optimizer", zero)
        moments_bytes = take(tensors_in(base.state))
        buckets_bytes = take(self._bucket_tensors())
        grads = self._grads_snapshot or self._grad_bytes()
        return dict(params_bytes=params_bytes, grads_bytes=grads["total"], optimizer_bytes=master_bytes + moments_bytes,
                    breakdown=dict(stage=self.stage, dp=self.dp, module_params_bytes=params_bytes,
                                   fp32_master_bytes=master_bytes, optimizer_moments_bytes=moments_bytes,
                                   module_grads_bytes=grads["module_grads"],
                                   grad_partitions_bytes=grads["grad_partitions"],
                                   buckets_bytes=max(buckets_bytes, grads["buckets"]),
                                   grads_measured="the most bytes sampled after each gradient's accumulation and after the backward, first step"))

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """``save_checkpoint`` into a private temporary directory; the files this rank wrote."""
        with tempfile.TemporaryDirectory(prefix="etbench-ds-") as tmp:
            self.ds.save_checkpoint(tmp, tag=CHECKPOINT_TAG, save_latest=False)
            root = Path(tmp) / CHECKPOINT_TAG
            files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        return dict(format="deepspeed-checkpoint/1", tag=CHECKPOINT_TAG, stage=self.stage, dp=self.dp, files=files)

    def load_state_dict(self, state: dict) -> None:
        """``state``: what :meth:`state_dict` returned on this rank (a collective: every rank
        loads together).  ``load_checkpoint`` reads files other ranks wrote (rank 0's module
        states), so the ranks first exchange their files; the union is written back, then
        loaded (module, ZeRO partitions, optimizer moments, step counters)."""
        if state.get("dp") != self.dp or state.get("stage") != self.stage:
            raise ValueError(f"a deepspeed checkpoint of stage {state.get('stage')} at dp={state.get('dp')} cannot "
                             f"load into stage {self.stage} at dp={self.dp}")
        files = dict(state["files"])
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, files)
            for other in gathered:
                files.update(other)
        with tempfile.TemporaryDirectory(prefix="etbench-ds-") as tmp:
            root = Path(tmp) / state["tag"]
            for name, blob in files.items():
                path = root / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(blob)
            path, _ = self.ds.load_checkpoint(tmp, tag=state["tag"], load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
            if path is None:
                raise ValueError("DeepSpeed could not load the checkpoint")
        self._grads_snapshot = None


class _SavedExcludingLiveParams(SavedActivations):
    """Saved-for-backward bytes under ZeRO-3: a parameter is gathered into a new full tensor just
    before its module runs, so which storages are parameters is looked up when each tensor is
    saved, not once before the forward."""

    def __init__(self, params):
        super().__init__(())
        self._params = list(params)

    def _pack(self, t):
        self._exclude = param_storages(p for p in self._params if p.numel() > 0)
        return super()._pack(t)
