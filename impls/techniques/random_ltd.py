"""Random layerwise token dropping (random-LTD): every middle layer processes a random subset of
each sequence's tokens, the kept length growing to the full length over training (Yao, Wu, Li,
Youn & He 2022, "Random-LTD: Random and Layerwise Token Dropping Brings Efficient Training for
Large-scale Transformers", arXiv 2211.11586; DeepSpeed data efficiency).

What a layer does (paper §3, Fig. 1).  Every block except the first and the last (the paper's
"all middle layers") is wrapped in a :class:`DropBlock`.  In training, per sequence and per
layer, a *fresh* uniformly random subset of ``r`` of the T positions is drawn (no importance
score: the paper's point is that a random, layer-wise different choice loses no token for
good), **sorted by position** so causal attention among the kept tokens is plain causal
attention in their original order; the kept tokens are gathered to (B, r, C), run through the
unchanged block and scattered back, and the T − r dropped tokens bypass the layer unchanged on
the residual stream.  Positions stay the original ones: learned position embeddings are added
before the blocks, and with rope the kept tokens' cos/sin rows are gathered (as
``impls/techniques/mod.py`` does, whose gather helpers this module reuses).  In evaluation the
full sequence goes through every layer, as in the paper.

The kept length (paper §3.2, "monotonic sequence length growth", MSLG) is DeepSpeed's
``fixed_linear`` random-LTD schedule, computed by DeepSpeed's own scheduler
(``deepspeed.runtime.data_pipeline.data_routing.scheduler.RandomLTDScheduler.get_value``):

    r_t = min(T, ⌊min_value + (T − min_value) · t / require_steps⌋ rounded down to a multiple of seq_per_step)

with ``min_value = start``, ``max_value = T`` (the recipe's ``seq_len``), ``seq_per_step =
every`` and ``require_steps = max(1, round(steps · N))`` for the run's N optimizer steps.
Step t (0-based) trains at r_t.  The paper's companion "LayerToken" learning-rate schedule (the
learning rate driven by consumed layer-tokens instead of steps) is not implemented: DeepSpeed
itself marks it work in progress (``layer_token_lr_schedule.enabled`` raises), so the learning
rate follows the recipe's step schedule as in every other run.

Why not DeepSpeed's layer wrapper.  ``data_routing.basic_layer.RandomLayerTokenDrop`` samples,
sorts, gathers and scatters through ``deepspeed.ops.random_ltd`` (``token_sort_``,
``token_gather``, ``token_scatter_``), whose only implementation is CUDA
(``csrc/random_ltd/*.cu``, ``RandomLTDBuilder`` is a ``CUDAOpBuilder``); on a CPU accelerator
the op builder is DeepSpeed's ``NotImplementedBuilder`` and the first forward raises
``ValueError: This op had not been implemented on CPU backend.``  :func:`deepspeed_cpu_error`
reproduces that failure (a test checks it is still true).  So the gather/scatter here is
torch's ``gather``/``scatter``; the scheduler, which is pure Python, is DeepSpeed's.

Compute.  A middle layer at kept length r costs, per PaLM App. B's 6N + 12·L·H·Q·T form, about
(r/T)× its linear (6·N_layer·T) FLOPs and (r/T)²× its attention-score (12·H·Q·T²) FLOPs; the
first and last layers, embedding and LM head stay at T.  The run's FLOPs therefore change with
the step: ``plan.phase_at`` gives the kept length per step and ``plan.in_phase(r)`` puts the
model at that length, so ``train.measure_step`` counts one step's FLOPs at every kept length the
schedule uses and the budget buys exactly the steps whose summed counted FLOPs fit
(``plan.dense_compute = False``: the record's model FLOPs are the counted ones).  The record's
activation bytes are measured at the full length, the schedule's last (and largest) phase.

``technique_notes["random_ltd"]``: the options, the layers dropped, the schedule as
[[first step, kept length], ...], total steps, the FLOPs saved against the same steps at full
length — counted (FlopCounterMode, per kept length) and analytic (the formula above, per
middle layer) — and their ratio, and the layer-tokens saved (the paper's "LayerToken": the sum
over steps and layers of the tokens a layer processes, §4).

Options: ``start`` (the first kept length, a multiple of ``every``, below ``seq_len``),
``steps`` in (0, 1] (the growth's fraction of training), ``every`` ≥ 1 (the rounding unit).
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..measure import model_flops_per_step
from .mod import gather_mask, gather_rope

NAME = "random_ltd"
STAGE = "surgery"
RANK = 40  # with mod's routing: wraps the block as the other surgeries left it
OPTIONS = {"start": 32, "steps": 0.5, "every": 16}
REQUIRES = ("deepspeed",)
CONFLICTS = {
    "mod": "both route a subset of tokens through the same blocks",
    "seqlen_warmup": "both give the FLOP budget a per-step schedule (sequence length vs kept length); one at a time",
}


def require_steps(total_steps: int, fraction: float) -> int:
    return max(1, round(fraction * total_steps))


@functools.lru_cache(maxsize=64)
def _scheduler(start: int, seq_len: int, every: int, require: int):
    """DeepSpeed's random-LTD scheduler for one run's schedule (imported here: deepspeed's
    import takes seconds, and only runs with this technique pay it)."""
    from deepspeed.runtime.data_pipeline.data_routing.scheduler import RandomLTDScheduler

    return RandomLTDScheduler({
        "total_layer_num": 1, "random_ltd_layer_num": 1, "global_batch_size": 1,
        "random_ltd_schedule": {"min_value": start, "max_value": seq_len, "schedule_type": "fixed_linear",
                                "schedule_config": {"require_steps": require, "seq_per_step": every}},
        "layer_token_lr_schedule": {"enabled": False},
    })


def kept_at(step: int, total_steps: int, seq_len: int, options: dict) -> int:
    """Step ``step``'s kept length (DeepSpeed's fixed_linear schedule, stateless ``get_value``)."""
    sched = _scheduler(options["start"], seq_len, options["every"], require_steps(total_steps, options["steps"]))
    return int(sched.get_value(step))


def breakpoints(values: list[int]) -> list[list[int]]:
    """[[first step, kept length], ...] where the kept length changes."""
    out = []
    for t, v in enumerate(values):
        if not out or out[-1][1] != v:
            out.append([t, v])
    return out


def middle_layers(n_layer: int) -> list[int]:
    return list(range(1, n_layer - 1))


def deepspeed_cpu_error() -> str | None:
    """The error DeepSpeed's random-LTD token sampling raises here, or None if it runs."""
    from deepspeed.ops.random_ltd.dropping_utils import gpt_sample_tokens

    try:
        gpt_sample_tokens(2, 4, 1, 1, "cpu", None)
    except Exception as e:  # noqa: BLE001 (any failure is the reason; reported verbatim)
        return f"{type(e).__name__}: {e}"
    return None


class _Kept:
    """The kept length shared by a model's drop layers (None: full length)."""

    def __init__(self):
        self.value: int | None = None


class DropBlock(nn.Module):
    """A block through which, in training, only ``kept.value`` random tokens per sequence go
    (sorted by position); the others bypass it unchanged.  Contains the original ``block``;
    ``last_indices`` keeps the last forward's kept positions (B, r) (None: all)."""

    def __init__(self, block: nn.Module, kept: _Kept):
        super().__init__()
        self.block = block
        self.kept = kept
        self.last_indices: torch.Tensor | None = None

    def forward(self, x, rope=None, attn_mask=None):
        b, t, c = x.shape
        r = self.kept.value
        if not self.training or r is None or r >= t:
            self.last_indices = None
            return self.block(x, rope, attn_mask)
        keep = torch.rand(b, t, device=x.device).argsort(dim=1)[:, :r].sort(dim=1).values  # (B, r)
        self.last_indices = keep
        idx = keep.unsqueeze(-1).expand(b, r, c)
        xs = x.gather(1, idx)  # (B, r, C)
        ys = self.block(xs, gather_rope(rope, keep), gather_mask(attn_mask, keep, t)).to(x.dtype)
        return x.scatter(1, idx, ys)  # dropped rows: x unchanged


def drop_modules(model) -> list[DropBlock]:
    return [m for m in model.modules() if isinstance(m, DropBlock)]


def configure(plan, options):
    if options["every"] < 1:
        raise ConfigError(f"random_ltd:every must be >= 1, got {options['every']}")
    if options["start"] < options["every"] or options["start"] % options["every"]:
        raise ConfigError(f"random_ltd:start={options['start']} must be a positive multiple of every={options['every']} "
                          f"(DeepSpeed's schedule rounds kept lengths down to multiples of every)")
    if not 0 < options["steps"] <= 1:
        raise ConfigError(f"random_ltd:steps is the growth's fraction of training, in (0, 1]; got {options['steps']}")
    plan.dense_compute = False  # middle layers see r < T tokens: the dense 6N + 12·L·H·Q·T over-counts
    plan.phase_at = lambda step, total, seq_len: kept_at(step, total, seq_len, options)


def check_model(cfg, seq_len, options):
    if cfg.n_layer < 3:
        raise ConfigError(f"random_ltd drops tokens in the middle layers (all but the first and last), and a "
                          f"{cfg.n_layer}-layer model has none; valid: n_layer >= 3")
    if options["start"] >= seq_len:
        raise ConfigError(f"random_ltd:start={options['start']} changes nothing at seq_len {seq_len}; "
                          f"valid: {options['every']} <= start < {seq_len}, a multiple of every={options['every']}")


def check_mesh(dims, options):
    for dim, why in (("pp", "the pipeline engine's stages are built before the drop layers' phase can be set"),
                     ("cp", "context parallelism splits the sequence over ranks; a rank cannot draw from all of it")):
        if dims[dim] > 1:
            raise ConfigError(f"random_ltd does not support mesh {dim}={dims[dim]}: {why}; valid: {dim}=1")


def analytic_sequence_flops(model, seq_len: int, kept: int, n_mid: int) -> float:
    """Training FLOPs of one sequence, PaLM App. B (``model_flops_per_step``'s 6N + 12·L·H·Q·T per
    token), with ``n_mid`` middle layers at ``kept`` tokens: each removes
    6·N_layer·(T − r) linear FLOPs (∝ r/T) and 12·H·Q·(T² − r²) attention-score FLOPs (∝ (r/T)²),
    N_layer being one block's matmul parameters."""
    cfg = model.cfg
    full = model_flops_per_step(model, 1, seq_len)
    block = next(m for m in model.blocks if not isinstance(m, DropBlock))
    n_layer = sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Linear))
    hq = cfg.n_head * cfg.head_dim
    saved = 6 * n_layer * (seq_len - kept) + 12 * hq * (seq_len ** 2 - kept ** 2)
    return float(full - n_mid * saved)


def apply(build, options):
    model = build.model
    kept = _Kept()
    layers = middle_layers(len(model.blocks))
    for i in layers:
        model.blocks[i] = DropBlock(model.blocks[i], kept)

    def set_kept(x, y, step):
        if build.total_steps is None:
            raise RuntimeError("random_ltd needs build.total_steps (set by train.measure_step) before training")
        r = kept_at(step, build.total_steps, x.shape[1], options)
        kept.value = r if r < x.shape[1] else None
        return x, y

    build.add_hook("on_batch", set_kept)

    @contextlib.contextmanager
    def in_phase(value: int):
        before = kept.value
        kept.value = value
        try:
            yield
        finally:
            kept.value = before

    build.plan.in_phase = in_phase
    reason = deepspeed_cpu_error() if build.device.type == "cpu" else None
    build.notes[NAME] = dict(options, layers=layers, layer_wrapper="own DropBlock (torch gather/scatter)",
                             scheduler="deepspeed RandomLTDScheduler fixed_linear",
                             deepspeed_layer_not_used=(f"deepspeed.ops.random_ltd (token_sort_/token_gather/"
                                                       f"token_scatter_) is CUDA-only: {reason}" if reason else
                                                       "not tried on this device: the same DropBlock runs on every device"))

    def describe() -> dict:
        per, n = build.flops_by_phase, build.total_steps
        if not per or not n:
            return {}
        full_len = max(per)
        values = [kept_at(t, n, full_len, options) for t in range(n)]
        counted = sum(per[v][0] for v in values)
        counted_full = n * per[full_len][0]
        cfg = model.cfg
        n_mid = len(layers)
        analytic = sum(analytic_sequence_flops(model, full_len, v, n_mid) for v in values)
        analytic_full = n * analytic_sequence_flops(model, full_len, full_len, n_mid)
        counted_saved = 1 - counted / counted_full
        analytic_saved = 1 - analytic / analytic_full
        # the paper's LayerToken: tokens each layer processes, summed over layers and steps
        layer_tokens = sum(v * n_mid + full_len * (cfg.n_layer - n_mid) for v in values)
        return dict(seq_len=full_len, total_steps=n, require_steps=require_steps(n, options["steps"]),
                    schedule=breakpoints(values), mean_kept=sum(values) / n,
                    counted_flops=float(counted), counted_flops_full_length=float(counted_full),
                    counted_flops_saved=counted_saved, analytic_flops_saved=analytic_saved,
                    counted_vs_analytic_saved=counted_saved / analytic_saved if analytic_saved else None,
                    layer_tokens_saved=1 - layer_tokens / (n * full_len * cfg.n_layer))

    build.describe(NAME, describe)
