"""The pipeline engine: a ``torch.distributed.pipelining`` schedule over this rank's stage
module(s) (:mod:`impls.techniques.pipeline`), with the torch engine's optimizer, learning-rate
schedule, hooks, autocast and state handling (it subclasses :class:`TorchEngine` and replaces
what differs: the step, clipping, evaluation and the activation meter).

The step's loss is the torch engine's: each micro-batch's Σ token cross-entropy divided by the
step's target-token count (over all micro-batches and data-parallel ranks, times ``dp``, which
DDP's averaging divides by again), computed on the last stage, with the schedule's
``scale_grads=False`` so no further 1/m is applied; the Σ over micro-batches is the step loss,
summed over the pipeline group so every rank returns the same value.

Tied embeddings: the first and the last stage each hold a copy of the table; after the
schedule's backward their gradients (each one contribution of the shared weight) are all-reduced
over a two-rank "embedding group" per data-parallel replica (Megatron-LM's), so both copies take
the same update.  The global gradient norm sums squared norms over the pipeline group, counting
the tied weight once (on the first stage).

Measurements (``notes["pp"]``, per pipeline rank):

* ``schedule_bubble``: the idle share each rank's *executed* action order implies: the order of
  its forward (F) and backward (B) actions, recorded as they ran, replayed as a dependency
  simulation (F(s, i) after F(s−1, i); B(s, i) after F(s, i) and B(s+1, i); a rank runs its
  actions in order, each as soon as its inputs exist) with t_b = 2·t_f per chunk of 1/v of a
  stage — the cost model of the papers' formulas — against (p−1)/(v·m+p−1);
* ``measured_idle``: 1 − busy/step time per rank, where busy is the wall time spent inside
  ``PipelineStage.forward_one_chunk``/``backward_one_chunk`` and the loss function (timestamps
  around each call; the schedule's point-to-point waits happen between them), and the step time
  is the wall time of ``schedule.step``; mean over the training steps after the first;
* ``stash``: the most (chunk, micro-batch) pairs whose forward has run and whose backward has
  not, per rank, counted as they run, and the bytes autograd saved for them (the exact
  saved-tensor meter, :class:`~impls.measure.memory.SavedActivations`): GPipe m, 1F1B ≤ p.
"""
from __future__ import annotations

import contextlib
import time
from types import SimpleNamespace

import torch
import torch.distributed as torch_dist
from torch.distributed.tensor import DTensor
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from ..loss import lm_loss_sum, target_count
from ..measure import SavedActivations
from ..techniques.pipeline import bubble_formula
from .base import EngineBase
from .torch_engine import TorchEngine

T_FORWARD, T_BACKWARD = 1.0, 2.0  # cost model of the bubble formulas: t_b ≈ 2·t_f


# --------------------------------------------------------------------------- schedule orders


def planned_order(schedule: str, p: int, m: int, v: int = 1) -> dict[int, list[tuple[int, str, int]]]:
    """rank -> its compute actions ``(stage, "F"|"B", micro-batch)`` in the order torch runs them.

    gpipe and 1f1b: transcribed from ``ScheduleGPipe``/``Schedule1F1B._step_microbatches`` (torch
    2.13; their ``pipeline_order`` IR is not what runs: 1F1B's numbers the last rank's
    micro-batches from 1).  interleaved: ``ScheduleInterleaved1F1B``'s own ``pipeline_order``,
    which its runtime executes (idle slots dropped), generated from stand-in stage descriptions."""
    if schedule == "gpipe":
        return {s: [(s, "F", i) for i in range(m)] + [(s, "B", i) for i in range(m)] for s in range(p)}
    if schedule == "1f1b":
        out = {}
        for s in range(p):
            warmup = min(m, p - s)
            actions, f, b = [(s, "F", i) for i in range(warmup)], warmup, 0
            while True:
                actions.append((s, "B", b))
                b += 1
                if f == m:
                    break
                actions.append((s, "F", f))
                f += 1
            out[s] = actions + [(s, "B", i) for i in range(b, m)]
        return out
    stand_ins = [SimpleNamespace(num_stages=p * v, group_size=p, group_rank=0, stage_index=k * p) for k in range(v)]
    return order_of(ScheduleInterleaved1F1B(stand_ins, m).pipeline_order)


def order_of(pipeline_order: dict) -> dict[int, list[tuple[int, str, int]]]:
    """A torch schedule IR (rank -> actions, None for idle slots) as compute actions."""
    kinds = {"F": "F", "B": "B"}
    return {rank: [(a.stage_index, kinds[a.computation_type.value], a.microbatch_index) for a in actions
                   if a is not None and a.computation_type.value in kinds]
            for rank, actions in pipeline_order.items()}


def simulate(order: dict, num_stages: int, v: int = 1) -> dict:
    """Replay per-rank action orders under their dependencies with unit costs (t_f = 1/v,
    t_b = 2/v per chunk).  Returns the makespan, each rank's idle share and its most
    (stage, micro-batch) pairs held between forward and backward; raises on an order that
    cannot run (a deadlock)."""
    finish, pos = {}, {r: 0 for r in order}
    free, busy = {r: 0.0 for r in order}, {r: 0.0 for r in order}
    left = sum(len(a) for a in order.values())
    while left:
        moved = False
        for rank, actions in order.items():
            while pos[rank] < len(actions):
                s, kind, i = actions[pos[rank]]
                if kind == "F":
                    deps = [(s - 1, "F", i)] if s > 0 else []
                else:
                    deps = [(s, "F", i)] + ([(s + 1, "B", i)] if s < num_stages - 1 else [])
                if any(d not in finish for d in deps):
                    break
                start = max([free[rank]] + [finish[d] for d in deps])
                cost = (T_FORWARD if kind == "F" else T_BACKWARD) / v
                finish[(s, kind, i)] = free[rank] = start + cost
                busy[rank] += cost
                pos[rank] += 1
                left -= 1
                moved = True
        if not moved:
            raise RuntimeError(f"pipeline order cannot run (deadlock): {order}")
    makespan = max(free.values())
    return dict(makespan=makespan, idle={r: 1 - busy[r] / makespan for r in order},
                stash={r: stash_peak(a) for r, a in order.items()})


def stash_peak(actions: list) -> int:
    """The most (stage, micro-batch) pairs whose forward ran and whose backward has not."""
    live = peak = 0
    for _, kind, _ in actions:
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


# --------------------------------------------------------------------------- the metered stage


class ActionMeter:
    """What the stages of one rank did in one step: their actions in order, the time spent
    computing, and the activations held between each forward and its backward."""

    def __init__(self):
        self.enabled = False
        self.reset()

    def reset(self):
        self.actions, self.busy, self.live, self.bytes = [], 0.0, {}, {}
        self.peak_stash, self.peak_bytes, self.last_forward = 0, 0, None

    @contextlib.contextmanager
    def action(self, stage: int, kind: str, mb: int, params=()):
        if not self.enabled:
            yield
            return
        saved = SavedActivations(params) if kind == "F" else contextlib.nullcontext()
        t0 = time.perf_counter()
        with saved:
            yield
        self.busy += time.perf_counter() - t0
        self.actions.append((stage, kind, mb))
        if kind == "F":
            self.live[(stage, mb)] = saved.bytes
            self.bytes[(stage, mb)] = saved.bytes
            self.last_forward = (stage, mb)
        else:
            self.live.pop((stage, mb), None)
        self.peak_stash = max(self.peak_stash, len(self.live))
        self.peak_bytes = max(self.peak_bytes, sum(self.live.values()))

    @contextlib.contextmanager
    def loss(self, params=()):
        """The last stage's loss of the micro-batch just forwarded: its time is busy time and
        what it saves (the log-softmax) belongs to that micro-batch's stash."""
        if not self.enabled or self.last_forward is None:
            yield
            return
        t0 = time.perf_counter()
        with SavedActivations(params) as saved:
            yield
        self.busy += time.perf_counter() - t0
        key = self.last_forward
        self.bytes[key] += saved.bytes
        if key in self.live:
            self.live[key] += saved.bytes
        self.peak_bytes = max(self.peak_bytes, sum(self.live.values()))


class MeteredStage(PipelineStage):
    """``PipelineStage`` whose compute actions report to an :class:`ActionMeter` (a subclass:
    the stage still runs torch's own forward/backward code)."""

    def __init__(self, *args, meter: ActionMeter, **kwargs):
        super().__init__(*args, **kwargs)
        self.meter = meter

    def forward_one_chunk(self, fwd_chunk_id, *args, **kwargs):
        with self.meter.action(self.stage_index, "F", fwd_chunk_id, self.submod.parameters()):
            return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)

    def backward_one_chunk(self, bwd_chunk_id, *args, **kwargs):
        with self.meter.action(self.stage_index, "B", bwd_chunk_id):
            return super().backward_one_chunk(bwd_chunk_id, *args, **kwargs)


# --------------------------------------------------------------------------- the engine


class PipelineEngine(TorchEngine):
    sharded_state = True  # each rank saves and restores its own stages

    def __init__(self, build, recipe, total_steps: int):  # noqa: D107 (TorchEngine's fields, pipeline's parts)
        EngineBase.__init__(self, build, recipe, total_steps)  # not TorchEngine's: its model is one part
        self.dims = build.dims
        self.options = build.notes["pp"]
        self.parts = list(build.model_parts)
        self.module = nn.ModuleList(self.parts)  # this rank's stages: optimizer, state, measurements
        self.make_optimizer()
        self.train_module = self.module
        self.scaler = None  # fp16 is refused with pp (see the technique's CONFLICTS)

        p, v, m = self.options["pp"], self.options["chunks"], self.options["microbatches"]
        self.p, self.v, self.m, self.num_stages = p, v, m, p * v
        self.pp_group = self.dims.group("pp", self.device.type)
        self.pp_rank = self.dims.rank_in("pp", self.device.type)
        self.has_first = any(part.is_first for part in self.parts)
        self.has_last = any(part.is_last for part in self.parts)
        self.meter = ActionMeter()
        cfg = self.parts[0].cfg
        rows, t = recipe.batch_size // m, recipe.seq_len
        self._mb_shape = (rows, t)
        out_dtype = self.plan.autocast_dtype or torch.float32
        self.stages = []
        for part, train_part in zip(self.parts, build.train_parts):
            # Static shapes (no metadata-inference pass): token ids in, the fp32 residual stream
            # (B/m, T, C) between stages, logits (B/m, T, V) out of the last; float ones require
            # grad, which is how static metadata tells the stage a gradient flows back through them.
            stream = dict(size=(rows, t, cfg.d_model), device="meta", requires_grad=True)
            inputs = torch.empty(rows, t, dtype=torch.long, device="meta") if part.is_first else torch.empty(**stream)
            outputs = (torch.empty(rows, t, cfg.vocab_size, dtype=out_dtype, device="meta", requires_grad=True)
                       if part.is_last else torch.empty(**stream))
            self.stages.append(MeteredStage(train_part, part.index, self.num_stages, self.device, input_args=inputs,
                                            output_args=outputs, group=self.pp_group, meter=self.meter))
        kind = self.options["schedule"]
        common = dict(loss_fn=self._loss_fn, scale_grads=False)
        if kind == "interleaved":
            self.schedule = ScheduleInterleaved1F1B(self.stages, m, **common)
        else:
            self.schedule = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[kind](self.stages[0], m, **common)
        self._n_targets = None
        self.tied, self.emb_group = self._embedding_group(cfg)
        self.steps: list[dict] = []  # per training step: busy, step seconds, stash, actions
        build.describe("pp", self.describe)

    # ------------------------------------------------------------------ setup

    def _embedding_group(self, cfg):
        """The two-rank group (first and last pipeline rank of this data-parallel replica) that
        sums the tied embedding's gradient, and this rank's copy of it (None off those ranks).
        Every rank takes part in creating every group, as ``new_group`` requires."""
        if not cfg.tie_embeddings:
            return None, None
        mesh = self.build.mesh()
        layout = mesh.mesh.movedim(mesh.mesh_dim_names.index("pp"), 0).reshape(self.p, -1)
        me, mine = torch_dist.get_rank(), None
        for j in range(layout.shape[1]):
            ranks = sorted({int(layout[0, j]), int(layout[-1, j])})
            group = torch_dist.new_group(ranks)
            if me in ranks:
                mine = group
        tied = [part.tied_weight() for part in self.parts if part.tied_weight() is not None]
        return (tied[0] if tied else None), mine

    def _loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Σ token cross-entropy of the micro-batch / the step's target-token count."""
        with self.meter.loss(self.module.parameters()):
            return lm_loss_sum(logits, targets) / self._n_targets

    # ------------------------------------------------------------------ the step

    def _run(self, x, y, train: bool) -> torch.Tensor:
        if tuple(x.shape) != (self.m * self._mb_shape[0], self._mb_shape[1]):
            raise ValueError(f"pipeline step got a batch of shape {tuple(x.shape)}; its stages were built for "
                             f"{self.m} micro-batches of {self._mb_shape}")
        losses: list[torch.Tensor] = []
        # contiguous: a batch sliced from longer rows (stride 33 for 32 tokens) fails torch 2.11's
        # check of each micro-batch against the stage's expected input strides (PipeliningShapeError)
        x, y = x.contiguous(), y.contiguous()
        args = (x,) if self.has_first else ()
        if train:
            self.schedule.step(*args, target=y, losses=losses, return_outputs=False)
        else:
            self.schedule.eval(*args, target=y, losses=losses)
        total = torch.stack(losses).sum().detach().float() if self.has_last else torch.zeros((), device=x.device)
        torch_dist.all_reduce(total, group=self.pp_group)  # the last stage's loss, on every rank
        return total

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        self._n_targets = self.step_target_count(y)
        self.meter.reset()
        t0 = time.perf_counter()
        with self.autocast():
            total = self._run(x, y, train=True)
        seconds = time.perf_counter() - t0
        if self.meter.enabled:
            self.steps.append(dict(busy=self.meter.busy, seconds=seconds, stash=self.meter.peak_stash,
                                   stash_bytes=self.meter.peak_bytes, actions=list(self.meter.actions),
                                   mb_bytes=dict(self.meter.bytes)))
        if self.emb_group is not None and self.tied.grad is not None:
            # the two stages' contributions to the shared weight's gradient, summed on both
            # (a replicated DTensor under tensor parallelism: its local tensor is the whole gradient)
            grad = self.tied.grad
            torch_dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=self.emb_group)
        return total

    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> float:
        self.meter.enabled = True  # only training steps are measured (not the FLOP pass, not evaluation)
        try:
            return super().train_step(x, y, step)
        finally:
            self.meter.enabled = False

    def clip_gradients(self) -> float:
        """Global L2 norm over every stage (squared norms summed over the pipeline group; the
        last stage's tied copy left out, so the shared weight counts once); clip as the torch
        engine does."""
        grads, counted = [], []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grads.append(p.grad)
                norm = torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32)
                if isinstance(norm, DTensor):  # tensor parallel: reduced over the dims it is sharded on
                    norm = norm.full_tensor()
                if not (p is self.tied and not self.has_first):
                    counted.append(norm)
        square = torch.stack(counted).square().sum() if counted else torch.zeros((), device=self.device)
        torch_dist.all_reduce(square, group=self.pp_group)
        return self.clip_to(grads, float(square.sqrt()))

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Mean token cross-entropy of the batch, forward only through the stages, the same
        value on every pipeline rank."""
        self._n_targets = target_count(y).clamp(min=1)
        self.module.eval()
        try:
            with self.autocast():
                total = self._run(x, y, train=False)
        finally:
            self.module.train()
        return total.item()

    def activation_bytes(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """Bytes autograd saves for one micro-batch's forward through this rank's stage(s) (the
        loss's included on the last stage), parameters excluded.  Stages after the first are fed
        a zero residual stream of the micro-batch's shape: what a forward saves depends on
        shapes, not values, and no communication is needed.  Data parallelism over the stages'
        DTensors is torch's ``replicate`` (FSDP2 machinery, :mod:`impls.techniques.ddp`): its
        modules are unsharded first, as the torch engine does under FSDP2, so the parameters the
        forward computes with (which a matmul saves) are recognised as parameters."""
        from torch.distributed.fsdp import FSDPModule

        rows = x.shape[0] // self.m if x.shape[0] >= self.m else x.shape[0]
        xm, ym = x[:rows].clone(), y[:rows].clone()
        total = 0
        for part in self.parts:
            h = xm if part.is_first else torch.zeros(*xm.shape, part.cfg.d_model, device=x.device,
                                                     requires_grad=True)
            wrapped = [m for m in part.modules() if isinstance(m, FSDPModule)]
            for module in wrapped:
                module.unshard()
            try:
                with SavedActivations(part.parameters()) as saved, self.autocast():
                    out = part(h)
                    if part.is_last:
                        lm_loss_sum(out, ym)
            finally:
                for module in wrapped:
                    module.reshard()
            total += saved.bytes
        return total

    # ------------------------------------------------------------------ measurements

    def describe(self) -> dict:
        """Bubble from the executed schedule, measured idle share and stash, per pipeline rank
        (gathered over the pipeline group: every rank calls it when the record is made)."""
        timed = self.steps[1:] if len(self.steps) > 1 else self.steps
        mine = dict(pp_rank=self.pp_rank, actions=self.steps[-1]["actions"] if self.steps else [],
                    idle=[1 - s["busy"] / s["seconds"] for s in timed],
                    busy_seconds=[s["busy"] for s in timed], step_seconds=[s["seconds"] for s in timed],
                    stash=max((s["stash"] for s in self.steps), default=0),
                    stash_bytes=max((s["stash_bytes"] for s in self.steps), default=0),
                    mb_bytes=self.steps[-1]["mb_bytes"] if self.steps else {})
        ranks = [None] * self.p
        torch_dist.all_gather_object(ranks, mine, group=self.pp_group)
        ranks.sort(key=lambda r: r["pp_rank"])
        p, m, v = self.p, self.m, self.v
        out = dict(bubble_formula=bubble_formula(p, m, v))
        if not self.steps:
            return out
        executed = {r["pp_rank"]: [tuple(a) for a in r["actions"]] for r in ranks}
        sim = simulate(executed, self.num_stages, v)
        planned = planned_order(self.options["schedule"], p, m, v)
        out.update(
            schedule_bubble=[sim["idle"][r] for r in range(p)],
            schedule_bubble_max=max(sim["idle"].values()),
            schedule_cost_model="t_b = 2 t_f per chunk; dependency replay of each rank's executed action order",
            executed_order_is_planned=executed == planned,
            measured_idle=[sum(r["idle"]) / len(r["idle"]) for r in ranks],
            measured_idle_steps=len(ranks[0]["idle"]),
            busy_seconds=[sum(r["busy_seconds"]) / len(r["busy_seconds"]) for r in ranks],
            step_seconds=[sum(r["step_seconds"]) / len(r["step_seconds"]) for r in ranks],
            measured_idle_method=("1 - busy/step: busy = wall time inside forward_one_chunk, backward_one_chunk and "
                                  "the loss; step = wall time of schedule.step"),
            stash=[r["stash"] for r in ranks],
            stash_from_order=[sim["stash"][r] for r in range(p)],
            stash_bytes=[r["stash_bytes"] for r in ranks],
            microbatch_bytes=[sum(b for (s, mb), b in r["mb_bytes"].items() if mb == 0) for r in ranks],
        )
        return out
