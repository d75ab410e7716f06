"""BERT token dropping: the middle layers of a masked-LM encoder process only the tokens judged
important by their accumulated MLM loss; the dropped tokens re-join at the last layer (Hou et al.
2022, "Token Dropping for Efficient BERT Pretraining", ACL 2022, arXiv 2203.13240).

Layers (paper §3, "Token dropping"; the authors' implementation is
``tensorflow/models/official/projects/token_dropping``).  For an L-layer encoder, blocks
``0 … first-1`` see all T tokens, blocks ``first … L-2`` (the *dropping layers*) see only the
``k`` kept tokens of each row, and block ``L-1`` sees all tokens again.  A dropped token re-joins
with the representation it had *before* the dropping layers (its output of block ``first-1``):
it skips the middle layers on the residual stream, so the model still produces a full-length
output for the MLM head.  ``first=-1`` (default) is the official code's ``L//2 - 1`` (12-layer
BERT: all tokens through 5 blocks, the important ones through 6, all through the last),
clamped to >= 1 so at least one block sees every token first.  The official first dropping
layer lets the kept queries attend to all tokens (cross-attention); here every dropping layer
is a plain block over the kept tokens (the zoo's ``Block`` has no separate key/value input),
as the paper's §3 describes it.

Kept tokens per row: ``k = ceil(keep · T)`` (fixed per T: static shapes, FLOPs known in
advance), gathered **sorted by position**; learned position embeddings were added before the
blocks, and with rope the kept tokens' cos/sin rows are gathered (as in
:mod:`impls.techniques.mod`), so every token keeps its position.

Importance (paper §3.2, "identifying important tokens": the cumulative MLM loss of each
vocabulary id; the official ``TokenImportanceWithMovingAvg``).  A buffer ``importance`` of size
V holds, per id, an exponential moving average of the MLM loss of the positions whose *target*
is that id::

    importance[v] ← β · importance[v] + (1 − β) · mean_{predicted positions i with y_i = v} ℓ_i

updated once per optimizer step from that step's per-token losses (ids absent from the step keep
their value), initialised to ``init`` for every id (official: β = 0.995, init 10, above any
early loss, so an id not yet predicted ranks as important).  The official code updates with
``tensor_scatter_nd_update``, whose result for an id occurring several times in a step is one of
the occurrences; we use their mean, which is deterministic.  Tokens are ranked by the
importance of their *input* id (as the official encoder looks up ``input_word_ids``).

Always kept (the paper's "special tokens", the official allow list [UNK], [CLS], [SEP],
[MASK], importance 1e4): every input equal to the [MASK] id (the dataset's vocab size), and in
training every *predicted* position (target != IGNORE_INDEX: also the 10 % random and 10 %
unchanged tokens of BERT masking, which the official code ranks by importance like any other
token) -- so every MLM prediction gets the full depth.  Hence the refusal of a recipe whose
masked count per row ``max(1, round(mlm_rate·T))`` exceeds k: k = max(n_masked, ceil(keep·T))
is then just ceil(keep·T).

How the technique sees the targets and the per-token losses (the model's forward gets only the
input ids): an ``on_batch`` hook keeps the step's (x, y) and empties the pending losses; a
forward pre-hook on the model picks the y rows of the micro-batch it runs (the step's chunk
whose inputs equal the forward's); a loss term (``token_drop``, returns None: it adds nothing
to the loss) records per-target-id loss sums and counts from ``out.logits``/``out.targets``
without gradients; an ``after_step`` hook applies the moving-average update once per step.
Passes outside ``train_step`` (the FLOP and activation measurement, evaluation) run no
``on_batch``/``after_step`` hook, so they never touch the table; in them only the [MASK]-id rule
applies, which keeps the same k tokens per row, so the counted FLOPs are those of a training step.
Under data parallelism the step's per-id sums and counts are summed over the ``dp`` ranks before
the update, so every rank holds the same table (the loss of the global batch).

Evaluation (``eval=full``, default): all tokens through all layers.  The paper's downstream use
is the full model on full sequences ("generalizes well to full sequences during fine-tuning");
the validation loss is then the same function of the weights as the baseline's, directly
comparable.  ``eval=drop`` evaluates as trained (the official MLM validation step runs the
dropping encoder), for the gap between the two.

FLOPs (``plan.dense_compute = False``: model FLOPs are the counted ones).  Per dropping layer
and row, PaLM's form (Chowdhery et al. 2022, App. B) gives 6·N_layer·T + 12·H·Q·T² training
FLOPs dense and 6·N_layer·k + 12·H·Q·k² dropped: linear FLOPs scale by k/T, attention scores by
(k/T)².  ``technique_notes["token_drop"]`` gives the counted FLOPs per step with and without
dropping (FlopCounterMode over one forward+backward of the last training batch shape), their
saving, the analytic saving over the whole model (6N + 12·L·H·Q·T per token) and the ratio, and
a summary of the importance table.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..loss import IGNORE_INDEX
from .mod import gather_mask, gather_rope

NAME = "token_drop"
STAGE = "surgery"
RANK = 40  # wraps blocks as the other surgeries left them (as mod does)
OPTIONS = {"keep": 0.5, "first": -1, "beta": 0.995, "init": 10.0, "eval": "full"}
CHOICES = {"eval": ("full", "drop")}
CONFLICTS = {
    "mod": "both change which tokens a block processes (mod routes the blocks token_drop wraps)",
    "pipeline": "the dropping layers pass a k-token state between blocks that a stage boundary would cut",
}


def configure(plan, options):
    if not 0 < options["keep"] < 1:
        raise ConfigError(f"token_drop:keep={options['keep']} changes nothing or drops everything; "
                          f"valid: 0 < keep < 1")
    if not 0 <= options["beta"] < 1:
        raise ConfigError(f"token_drop:beta={options['beta']} is invalid; valid: 0 <= beta < 1")
    plan.dense_compute = False  # the middle layers run on k of T tokens


def first_layer(n_layer: int, first: int) -> int:
    """The first dropping layer: ``first``, or for -1 the official L//2 - 1, at least 1."""
    return max(1, n_layer // 2 - 1) if first == -1 else first


def dropping_layers(n_layer: int, first: int) -> list[int]:
    return list(range(first_layer(n_layer, first), n_layer - 1))


def kept_tokens(keep: float, seq_len: int) -> int:
    """Tokens the dropping layers process per row: ceil(keep · T) (at least 1)."""
    return max(1, math.ceil(keep * seq_len - 1e-9))


def check_model(cfg, seq_len, options):
    if cfg.causal:
        raise ConfigError("token_drop needs a masked-LM encoder (causal=False: encoder-nano, encoder-small, "
                          "bert-base); valid: an encoder model")
    if cfg.n_layer < 3:
        raise ConfigError(f"token_drop on a {cfg.n_layer}-layer model has no middle layer (the first and last see "
                          f"all tokens); valid: n_layer >= 3")
    first = options["first"]
    if first != -1 and not 0 <= first <= cfg.n_layer - 2:
        raise ConfigError(f"token_drop:first={first} is not a middle layer of a {cfg.n_layer}-layer model; valid: "
                          f"-1 (auto) or 0..{cfg.n_layer - 2}")
    if kept_tokens(options["keep"], seq_len) >= seq_len:
        raise ConfigError(f"token_drop:keep={options['keep']} keeps all {seq_len} tokens; valid: keep < "
                          f"{(seq_len - 1) / seq_len:.4g} at seq_len {seq_len}")


def check_recipe(recipe, options):
    from .. import zoo

    if recipe.model in zoo.CONFIGS and recipe.model_args.get("causal", zoo.CONFIGS[recipe.model][1].get("causal", True)):
        return  # check_model refuses a causal model (the masked count below means nothing there)
    masked = max(1, round(recipe.mlm_rate * recipe.seq_len))
    k = kept_tokens(options["keep"], recipe.seq_len)
    if masked > k:
        raise ConfigError(f"token_drop:keep={options['keep']} keeps {k} tokens per row, fewer than the {masked} "
                          f"masked ones (mlm_rate={recipe.mlm_rate}); valid: keep >= {masked / recipe.seq_len:.4g}")


class State:
    """What the wrapped blocks share within one forward, and the importance table's bookkeeping."""

    def __init__(self, vocab_size: int, mask_id: int, options: dict):
        self.options = dict(options)
        self.mask_id = mask_id
        self.importance: torch.Tensor | None = None  # (V,), a buffer of the entry block
        self.master: torch.Tensor | None = None  # its fp32 copy, where the buffer is not fp32
        self.step_batch: tuple | None = None  # the step's (x, y), from on_batch
        self.pending = None  # (loss sums, counts) per target id, this step
        self.updates = 0
        self.enabled = True  # False: every block sees every token (the no-dropping FLOP count)
        self.idx = None  # the forward's input ids (B, T)
        self.targets = None  # their targets, where the step's batch holds them
        self.top = None  # (B, k) kept positions, increasing
        self.saved = None  # (B, T, C): the stream before the dropping layers
        self.rope = None
        self.mask = None
        self.last_shape = None

    def active(self, module: nn.Module) -> bool:
        return self.enabled and (module.training or self.options["eval"] == "drop")

    def select(self, idx: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        """(B, k) kept positions, increasing: the highest importance of the input ids, [MASK]
        inputs and predicted positions first."""
        b, t = idx.shape
        k = kept_tokens(self.options["keep"], t)
        score = self.importance[idx].float()
        force = idx == self.mask_id
        if targets is not None:
            force = force | (targets != IGNORE_INDEX)
        score = torch.where(force, torch.full_like(score, math.inf), score)
        return score.topk(k, dim=-1).indices.sort(dim=-1).values

    @torch.no_grad()
    def record(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add the micro-batch's per-token MLM losses to this step's per-id sums."""
        if self.pending is None:
            return
        loss = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="none")
        keep = targets.flatten() != IGNORE_INDEX
        ids = targets.flatten()[keep]
        sums, counts = self.pending
        sums.index_add_(0, ids, loss[keep].to(sums.dtype))
        counts.index_add_(0, ids, torch.ones_like(ids, dtype=counts.dtype))

    @torch.no_grad()
    def update(self) -> None:
        """importance[v] ← β·importance[v] + (1 − β)·mean loss of v, for the ids seen this step."""
        if self.pending is None:
            return
        sums, counts = self.pending
        seen = counts > 0
        beta = self.options["beta"]
        mean = (sums[seen] / counts[seen]).float()
        table = self.importance
        # The moving average runs in fp32: in a bf16 table (an engine that casts buffers) a step
        # of (1 − β)·(ℓ − old) ≈ 0.03 near 10 is lost to rounding (bf16 spacing there is 0.0625).
        master = table
        if table.dtype != torch.float32:
            master = self.master if self.master is not None and self.master.device == table.device else table.float()
            self.master = master
        master[seen] = beta * master[seen] + (1 - beta) * mean
        if master is not table:
            table.copy_(master)
        self.updates += 1
        self.pending = None


class Importance(nn.Module):
    """The per-id importance table, a buffer (saved with the model's state), created on ``meta``
    and initialised to ``init`` by the build (:meth:`impls.build.Build.own`)."""

    def __init__(self, vocab_size: int, init: float):
        super().__init__()
        self.init = float(init)
        self.register_buffer("table", torch.empty(vocab_size))

    @torch.no_grad()
    def init_weights(self):
        self.table.fill_(self.init)


class DropEntry(nn.Module):
    """The first dropping layer: selects the kept tokens, saves the full stream, runs ``block``
    on the kept tokens only.  Holds the importance table."""

    def __init__(self, block: nn.Module, state: State, importance: Importance):
        super().__init__()
        self.block = block
        self.state = state
        self.importance_table = importance

    @property
    def importance(self) -> torch.Tensor:
        return self.importance_table.table

    def forward(self, x, rope=None, attn_mask=None):
        s = self.state
        if not s.active(self):
            return self.block(x, rope, attn_mask)
        b, t, c = x.shape
        s.importance = self.importance
        top = s.select(s.idx, s.targets)
        s.top, s.saved = top, x
        s.rope, s.mask = gather_rope(rope, top), gather_mask(attn_mask, top, t)
        xs = x.gather(1, top.unsqueeze(-1).expand(b, top.shape[1], c))
        return self.block(xs, s.rope, s.mask)


class Dropped(nn.Module):
    """A later dropping layer: ``block`` over the kept tokens (B, k, C) with their positions."""

    def __init__(self, block: nn.Module, state: State):
        super().__init__()
        self.block = block
        self.state = state

    def forward(self, x, rope=None, attn_mask=None):
        s = self.state
        if not s.active(self):
            return self.block(x, rope, attn_mask)
        return self.block(x, s.rope, s.mask)


class Rejoin(nn.Module):
    """The last layer: the kept tokens are scattered back into the stream saved before the
    dropping layers (dropped tokens re-join unchanged), then ``block`` sees all tokens."""

    def __init__(self, block: nn.Module, state: State):
        super().__init__()
        self.block = block
        self.state = state

    def forward(self, x, rope=None, attn_mask=None):
        s = self.state
        if s.active(self):
            b, k, c = x.shape
            # (the state stays until the next forward: activation checkpointing recomputes these
            # blocks in backward, from the same selection)
            x = s.saved.scatter(1, s.top.unsqueeze(-1).expand(b, k, c), x.to(s.saved.dtype))
        return self.block(x, rope, attn_mask)


def _targets_for(state: State, idx: torch.Tensor):
    """The y rows of the step's batch whose inputs are ``idx`` (a micro-batch is a chunk of it)."""
    if state.step_batch is None:
        return None
    x, y = state.step_batch
    for start in range(0, x.shape[0] - idx.shape[0] + 1, idx.shape[0]):
        if x.shape[1] == idx.shape[1] and torch.equal(x[start:start + idx.shape[0]], idx):
            return y[start:start + idx.shape[0]]
    return None


def state_of(model) -> State | None:
    for m in model.modules():
        if isinstance(m, DropEntry):
            return m.state
    return None


def wrap(model, options: dict, importance: Importance) -> tuple[State, list[int]]:
    """Wrap the dropping layers and the last layer of ``model``; returns the shared state."""
    cfg = model.cfg
    layers = dropping_layers(cfg.n_layer, options["first"])
    state = State(cfg.vocab_size, cfg.vocab_size - 1, options)  # [MASK] = the data's vocab size = V - 1
    first, last = layers[0], cfg.n_layer - 1
    model.blocks[first] = DropEntry(model.blocks[first], state, importance)
    for i in layers[1:]:
        model.blocks[i] = Dropped(model.blocks[i], state)
    model.blocks[last] = Rejoin(model.blocks[last], state)

    def pre_hook(module, args):
        idx = args[0]
        state.idx = idx
        state.targets = _targets_for(state, idx) if module.training else None
        if module.training:
            state.last_shape = tuple(idx.shape)

    model.register_forward_pre_hook(pre_hook)
    return state, layers


def analytic_flops(cfg, n_matmul: int, rows: int, seq_len: int, k: int, layers: list[int]) -> tuple[float, float]:
    """(dense, dropped) training FLOPs of one step in PaLM's form: 6N + 12·L·H·Q·T per token
    dense; a dropping layer costs 6·N_layer·k + 12·H·Q·k² per row instead of 6·N_layer·T + 12·H·Q·T²."""
    c, f = cfg.d_model, cfg.d_ff
    kv = cfg.n_kv_head * cfg.head_dim
    n_layer = c * (c + 2 * kv) + c * c + c * f * (2 if cfg.mlp == "swiglu" else 1) + f * c
    if cfg.bias:
        n_layer += (c + 2 * kv) + c + f * (2 if cfg.mlp == "swiglu" else 1) + c
    hq = cfg.n_head * cfg.head_dim
    dense = rows * (6.0 * n_matmul * seq_len + 12.0 * cfg.n_layer * hq * seq_len * seq_len)
    saved = len(layers) * rows * (6.0 * n_layer * (seq_len - k) + 12.0 * hq * (seq_len ** 2 - k ** 2))
    return dense, dense - saved


def counted_flops(model, state: State, idx: torch.Tensor, enabled: bool) -> int:
    """FlopCounterMode over one training forward+backward (gradients taken with autograd.grad,
    so no .grad is touched) with dropping on or off."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..loss import lm_loss

    was = model.training
    model.train()
    state.enabled = enabled
    y = torch.where(idx == state.mask_id, torch.zeros_like(idx), torch.full_like(idx, IGNORE_INDEX))
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        with FlopCounterMode(display=False) as counter:
            loss = lm_loss(model(idx), y)
            torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        state.enabled = True
        model.train(was)
    return int(counter.get_total_flops())


def apply(build, options):
    model = build.model
    with torch.device("meta"):
        importance = Importance(model.cfg.vocab_size, options["init"])
    build.own(importance)
    state, layers = wrap(model, options, importance)
    entry = model.blocks[layers[0]]

    def on_batch(x, y, step):
        state.step_batch = (x, y)
        v = entry.importance.numel()
        state.pending = (torch.zeros(v, dtype=torch.float64, device=entry.importance.device),
                         torch.zeros(v, dtype=torch.float64, device=entry.importance.device))
        return x, y

    def after_step(step):
        state.importance = entry.importance
        if build.dims.dp > 1 and state.pending is not None:  # one table on every rank: the global step's losses
            for t in state.pending:
                build.dims.all_reduce(t, "dp", build.device.type)
        state.update()
        state.step_batch = None

    def term(out):
        state.record(out.logits, out.targets)
        return None  # adds nothing: the term only observes the per-token losses

    build.add_hook("on_batch", on_batch)
    build.add_hook("after_step", after_step)
    build.add_loss_term(NAME, 1.0, term)
    cfg = model.cfg
    build.notes[NAME] = dict(keep=options["keep"], first=first_layer(cfg.n_layer, options["first"]),
                             dropping_layers=layers, rejoin_layer=cfg.n_layer - 1, beta=options["beta"],
                             init=options["init"], eval=options["eval"], tokens_rule="ceil(keep*T)",
                             importance="EMA of the MLM loss per target id, beta*old + (1-beta)*step mean",
                             always_kept="[MASK] inputs and predicted positions (training)")

    def describe():
        out = dict(importance_updates=state.updates)
        imp = entry.importance.detach().float().cpu()
        mask_id = state.mask_id
        real = imp[:mask_id]
        order = real.argsort(descending=True)
        out.update(importance_top_ids=order[:5].tolist(), importance_top=real[order[:5]].tolist(),
                   importance_bottom_ids=order[-5:].tolist(), importance_bottom=real[order[-5:]].tolist(),
                   importance_mean=float(real.mean()),
                   ids_never_updated=int((real == float(options["init"])).sum()))
        if state.last_shape is None:
            return out
        rows, t = state.last_shape
        k = kept_tokens(options["keep"], t)
        g = torch.Generator().manual_seed(0)
        idx = torch.randint(0, mask_id, (rows, t), generator=g)
        idx[:, ::max(1, t // max(1, round(0.15 * t)))] = mask_id
        idx = idx.to(entry.importance.device)
        dropped = counted_flops(model, state, idx, True)
        dense = counted_flops(model, state, idx, False)
        a_dense, a_dropped = analytic_flops(cfg, model.num_params(matmul_only=True), rows, t, k, layers)
        counted_saved = 1 - dropped / dense
        analytic_saved = 1 - a_dropped / a_dense
        out.update(kept_tokens_per_row=k, seq_len=t, kept_fraction=k / t, rows=rows,
                   counted_flops_per_step=dropped, counted_flops_per_step_no_drop=dense,
                   analytic_flops_per_step=a_dropped, analytic_flops_per_step_no_drop=a_dense,
                   counted_flops_saved=counted_saved, analytic_flops_saved=analytic_saved,
                   saved_counted_vs_analytic=counted_saved / analytic_saved,
                   flops_per_step_note="one micro-batch of the last training shape (per step: x accum x dp)")
        return out

    build.describe(NAME, describe)
