"""Masked-token dropping for the masked-LM encoder: the encoder sees only the visible tokens and a
light decoder re-inserts the mask tokens to predict them (He et al. 2022, "Masked Autoencoders Are
Scalable Vision Learners", CVPR 2022, arXiv 2111.06377, §3 "MAE encoder" / "MAE decoder"; FLIP,
Li et al. 2023, arXiv 2212.00794, drops masked tokens the same way for language-image training).

Why.  A BERT encoder spends the same compute on every position although only the masked ones are
predicted, and the [MASK] inputs carry no information.  MAE removes them from the encoder: with a
fraction ``f`` of positions visible, the encoder's linear layers (QKV, projections, MLP) cost ``f``×
and its attention scores ``f²``× the full-sequence encoder's (6N·f·T + 12·L·H·Q·(f·T)² per row,
PaLM App. B with T → f·T), which is where MAE's 3× and FLIP's 3.7× speed-ups come from at 75 %
masking.  A light decoder (``decoder_layers`` blocks of the model's width, default 1) then runs on
the full length: the encoded visible tokens scattered back to their positions and, at the masked
positions, the [MASK] embedding plus its position (MAE's shared learned mask token plus positional
embedding; here the model's own [MASK] token embedding is that mask token), followed by the
model's final norm and LM head.  The loss is the model's masked-LM loss (targets only at masked
positions), as in MAE (loss on masked patches only).

How (hooks, no forward replaced).  A forward pre-hook on the model reads ``idx``: visible =
``idx != [MASK] id`` (the last id of the model's vocabulary, the data's vocab size).  The masked
count is the same in every row (``data.mask_for_mlm`` chooses ``max(1, round(rate·T))`` per row),
so the visible positions form a (B, T_vis) index, sorted by position.  A forward hook on the
model's embedding dropout (the input of the blocks: token + learned position embeddings already
added) keeps the full embedded sequence and returns its visible rows (B, T_vis, C); with rope a
pre-hook on every block hands it the cos/sin rows of the visible positions (as ``mod`` gathers
them), and an explicit attention mask is gathered likewise.  A forward pre-hook on the final norm
scatters the encoder's output back into the embedded sequence and runs the decoder blocks
(:class:`Decoder`, new zoo :class:`~impls.zoo.model.Block` s created on ``meta`` and registered
with ``build.own``, which initialises them GPT-2 style) on the full length.

The hooks sit on the blocks themselves, so a technique that wraps a block and calls it
(activation checkpointing) keeps them; techniques that hand the blocks other rope rows or
sequence layouts are refused (``CONFLICTS``, ``check_mesh``; sparse attention patterns in
``check_recipe``).

This needs ``mlm_corrupt="mask"``: with BERT's 80/10/10 a tenth of the chosen tokens are replaced
by random tokens and a tenth kept, so 20 % of the predicted positions would stay visible to the
encoder (``check_recipe`` refuses).  Causal models are refused: they are trained as next-token
predictors, with no [MASK] token.  Evaluation takes the same path (validation loss of the same
function).  ``plan.dense_compute = False``: the record's model FLOPs are the counted FLOPs of a
step, so a FLOP budget buys the MAE run more steps (the isoFLOP comparison).

``technique_notes["mae"]`` holds the mask rate, the visible fraction, the counted encoder FLOPs of a
step against the full-sequence encoder's (the same blocks run on all T tokens, counted with the
hooks switched off), the decoder's FLOPs, the total against the baseline model's, the analytic
values (6N·tokens + 12·L·H·Q·T² per row, non-causal attention scores over the full T×T) and the
counted/analytic ratios.  The counted encoder FLOPs equal :func:`counted_encoder_formula` (linear
6N per token, torch's SDPA formula for attention: 14·H·Q·T² per layer and row, forward + backward,
where PaLM's analytic count has 12), so counted/analytic is 1 on the linear parts and 14/12 on the
attention scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..zoo.model import Block
from .mod import gather_mask, gather_rope

NAME = "mae"
STAGE = "surgery"
RANK = 45  # after the surgeries that change what is inside the blocks (hooks sit on the blocks themselves)
OPTIONS = {"decoder_layers": 1}
CONFLICTS = {
    "mod": "mod's routed blocks gather their own rope rows from the full tables, and mae hands every block "
           "the rows of the visible tokens only",
    "pp": "mae gathers the visible tokens before the first block and re-inserts the mask tokens after "
                "the last, which pipeline stages split across ranks",
    "seqlen_warmup": "truncating a masked batch to a shorter length leaves rows with different numbers of "
                     "visible tokens, which mae's (B, T_vis) gather needs equal",
    "random_ltd": "random-LTD's drop blocks gather their kept tokens and rope rows from the full sequence, and mae "
                  "hands the blocks the visible tokens and their rows only (both drop tokens from the same blocks)",
    "token_drop": "token dropping ranks positions of the full sequence by their MLM loss inside the blocks, and mae "
                  "hands the blocks the visible tokens only (both drop tokens from the same blocks)",
}


def configure(plan, options):
    if options["decoder_layers"] < 1:
        raise ConfigError(f"mae:decoder_layers must be >= 1 (the decoder predicts the masked tokens), "
                          f"got {options['decoder_layers']}")
    plan.dense_compute = False  # the encoder skips the masked tokens: the dense 6N + 12·L·H·Q·T over-counts


def check_mesh(dims, options):
    for dim in ("pp", "cp", "tp"):
        if dims[dim] > 1:
            raise ConfigError(f"mae gathers the visible tokens along the sequence dimension of the whole model's "
                              f"residual stream, which pipeline stages, context or tensor/sequence parallelism split "
                              f"(mesh {dim}={dims[dim]}); valid: {dim}=1")


def check_model(cfg, seq_len, options):
    if cfg.causal:
        raise ConfigError("mae needs a masked-LM encoder (causal=False: encoder-nano, encoder-small, bert-base or "
                          "any model with causal=False); a causal model predicts next tokens and has no [MASK] token")


def visible_tokens(seq_len: int, rate: float) -> int:
    """Visible tokens per row under ``data.mask_for_mlm``: T − max(1, round(rate·T))."""
    return seq_len - max(1, round(rate * seq_len))


def check_recipe(recipe, options):
    if recipe.mlm_corrupt != "mask":
        raise ConfigError(f"mae needs mlm_corrupt=mask (got {recipe.mlm_corrupt!r}): with BERT's 80/10/10 a fifth "
                          f"of the chosen tokens are random or unchanged, so they would stay visible to the encoder; "
                          f"valid: mask")
    from . import parse  # the recipe's other techniques (registered, parsed by now)
    from .attention import SPARSE_KINDS

    for text in recipe.techniques:
        spec = parse(text)
        if spec.name == "attention" and spec.options["kind"] in SPARSE_KINDS:
            raise ConfigError(f"mae cannot run with attention:kind={spec.options['kind']}: sparse attention patterns "
                              f"are defined over positions, and mae's encoder sees the visible tokens packed together "
                              f"(neighbours there are not neighbours in the text); valid kinds: math, sdpa")
    if visible_tokens(recipe.seq_len, recipe.mlm_rate) < 1:
        raise ConfigError(f"mae: mlm_rate={recipe.mlm_rate} masks every token of a {recipe.seq_len}-token row, "
                          f"leaving the encoder nothing to see; lower mlm_rate or raise seq_len")


class Decoder(nn.Module):
    """MAE's light decoder: ``layers`` zoo blocks of the model's width on the full sequence."""

    def __init__(self, cfg, layers: int):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(layers))

    @torch.no_grad()
    def init_weights(self):
        """GPT-2's initialisation, as the model's own blocks get (residual projections scaled by
        1/sqrt(2·layers) of the decoder)."""
        for module in self.modules():
            if module is not self and callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = 0.02 / math.sqrt(2 * len(self.blocks)) if name.endswith(("attn.proj", "mlp.down")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x, rope=None, attn_mask=None):
        for block in self.blocks:
            x = block(x, rope, attn_mask)
        return x


@dataclass
class _State:
    """What one forward's hooks share: the visible positions, the embedded full sequence."""
    mask_id: int
    enabled: bool = True
    index: torch.Tensor | None = None  # (B, T_vis) visible positions, increasing
    seq_len: int = 0
    attn_mask: torch.Tensor | None = None
    embedded: torch.Tensor | None = None  # (B, T, C): the blocks' full input
    last_idx: torch.Tensor | None = None  # the last training forward's input, for the FLOP notes
    seen: dict = field(default_factory=dict)  # the encoder's input shape of the last forward


def visible_index(idx: torch.Tensor, mask_id: int) -> torch.Tensor:
    """(B, T_vis) positions of the tokens that are not [MASK], increasing; every row must have the
    same count (``data.mask_for_mlm`` masks a fixed count per row)."""
    visible = idx != mask_id
    counts = visible.sum(dim=1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise ValueError(f"mae: rows have different numbers of visible tokens ({counts.tolist()}); the encoder "
                         f"gathers a (B, T_vis) batch, so every row needs the same number of [MASK] tokens")
    n_vis = int(counts[0]) if counts.numel() else 0
    # stable sort of (masked?) keeps the visible positions first and in increasing order
    order = torch.sort((~visible).to(torch.int8), dim=1, stable=True).indices
    return order[:, :n_vis]


def install(build, model, options: dict) -> tuple[_State, Decoder]:
    """Register the decoder (on ``meta``, initialised by the build) and the hooks on ``model``."""
    cfg = model.cfg
    state = _State(mask_id=cfg.vocab_size - 1)  # the [MASK] id: the token after the data's vocabulary
    with torch.device("meta"):
        decoder = Decoder(cfg, options["decoder_layers"])
    build.own(decoder)
    model.add_module("mae_decoder", decoder)

    def on_model(module, args, kwargs):
        idx = args[0] if args else kwargs["idx"]
        state.attn_mask = args[1] if len(args) > 1 else kwargs.get("attn_mask")
        state.seq_len = idx.shape[1]
        state.index = visible_index(idx, state.mask_id) if state.enabled else None
        if module.training:
            state.last_idx = idx.detach()

    def on_embedded(module, args, out):
        if state.index is None:
            return None
        state.embedded = out
        b, k = state.index.shape
        state.seen["encoder_input"] = (b, k, out.shape[-1])
        return out.gather(1, state.index.unsqueeze(-1).expand(b, k, out.shape[-1]))  # (B, T_vis, C)

    def on_block(module, args):
        if state.index is None or len(args) < 2:
            return None
        x, rope, mask = args[0], args[1], (args[2] if len(args) > 2 else None)
        if rope is None and mask is None:
            return None
        return (x, gather_rope(rope, state.index), gather_mask(mask, state.index, state.seq_len), *args[3:])

    def on_norm(module, args):
        if state.index is None:
            return None
        x = args[0]  # (B, T_vis, C): the encoder's output
        b, k = state.index.shape
        full = state.embedded.scatter(1, state.index.unsqueeze(-1).expand(b, k, x.shape[-1]), x.to(state.embedded.dtype))
        rope = None if model.pos_emb is not None else (model.rope_cos, model.rope_sin)
        return (decoder(full, rope, state.attn_mask).to(x.dtype), *args[1:])

    def after_model(module, args, out):
        state.index = state.embedded = state.attn_mask = None  # blocks or norm called alone are untouched

    model.register_forward_pre_hook(on_model, with_kwargs=True)
    model.register_forward_hook(after_model)
    model.drop.register_forward_hook(on_embedded)
    for block in model.blocks:
        block.register_forward_pre_hook(on_block)
    model.norm_f.register_forward_pre_hook(on_norm)
    return state, decoder


def _matmul_params(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def counted_encoder_formula(model, t: int) -> int:
    """FLOPs FlopCounterMode counts for the encoder blocks on one row of ``t`` tokens, forward +
    backward: 6·N_blocks·t for the linear layers (biases and norms are not counted) plus, per
    layer, torch's SDPA forward and backward formulas (``sdpa_flop_count``: 4·H·Q·t²;
    ``sdpa_backward_flop_count``: 10·H·Q·t², the score matrix recomputed) -- 14·H·Q·t² against
    PaLM's 12·H·Q·t².  Linear parts scale with t, attention with t²."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    cfg = model.cfg
    shape = (1, cfg.n_head, t, cfg.head_dim)
    attention = sdpa_flop_count(shape, shape, shape) + sdpa_backward_flop_count(shape, shape, shape, shape)
    return 6 * sum(_matmul_params(b) for b in model.blocks) * t + cfg.n_layer * attention


def flop_notes(model, state: _State, decoder: Decoder, accum_steps: int = 1) -> dict:
    """Counted FLOPs (forward + backward, torch's FlopCounterMode with the suite's SDPA formulas)
    of one step on the last training input: the encoder blocks with mae, the same blocks on the
    full sequence (hooks off), the decoder, the total; with their analytic values."""
    if state.last_idx is None:
        return {}
    from ..measure import flops as flops_lib  # registers the CPU SDPA formulas
    from torch.utils.flop_counter import FlopCounterMode

    idx = state.last_idx
    rows, t = idx.shape
    root = type(model).__name__
    params = [p for p in model.parameters() if p.requires_grad]

    def count(enabled: bool) -> dict:
        state.enabled = enabled
        try:
            with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
                out = model(idx)
                torch.autograd.grad(out.float().sum(), params, allow_unused=True)
        finally:
            state.enabled = True
        per_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
        enc = sum(per_module.get(f"{root}.blocks.{i}", 0) for i in range(len(model.blocks)))
        return dict(encoder=enc, decoder=per_module.get(f"{root}.mae_decoder", 0),
                    total=int(counter.get_total_flops()))

    was_training = model.training
    model.train()
    try:
        mae, full = count(True), count(False)
    finally:
        model.train(was_training)
    del flops_lib
    cfg = model.cfg
    t_vis = visible_index(idx, state.mask_id).shape[1]
    n_blocks = sum(_matmul_params(b) for b in model.blocks)
    attn = 12 * cfg.n_head * cfg.head_dim  # per layer and token: 12·H·Q·T (PaLM App. B, full T×T scores)
    per_row = dict(
        encoder=6 * n_blocks * t_vis + cfg.n_layer * attn * t_vis ** 2,
        encoder_full=6 * n_blocks * t + cfg.n_layer * attn * t ** 2,
        decoder=6 * _matmul_params(decoder) * t + len(decoder.blocks) * attn * t ** 2,
        head=6 * _matmul_params(model.lm_head) * t)
    s = rows * accum_steps  # sequences of a step on this rank
    analytic = {k: v * s for k, v in per_row.items()}
    analytic_total = analytic["encoder"] + analytic["decoder"] + analytic["head"]
    analytic_baseline = analytic["encoder_full"] + analytic["head"]
    counted = dict(encoder=mae["encoder"] * accum_steps, encoder_full=full["encoder"] * accum_steps,
                   decoder=mae["decoder"] * accum_steps, total=mae["total"] * accum_steps,
                   baseline=full["total"] * accum_steps)
    f = t_vis / t
    expected = {n: s * counted_encoder_formula(model, n) for n in (t_vis, t)}
    return dict(
        mask_rate=1 - f, visible_tokens=t_vis, seq_len=t, visible_fraction=f,
        counted_encoder_flops_per_step=counted["encoder"],
        counted_full_encoder_flops_per_step=counted["encoder_full"],
        encoder_flops_ratio=counted["encoder"] / counted["encoder_full"],
        # linear parts scale with f, attention scores with f²: the expected encoder ratio
        encoder_flops_ratio_expected=expected[t_vis] / expected[t],
        counted_encoder_vs_formula=counted["encoder"] / expected[t_vis],
        counted_decoder_flops_per_step=counted["decoder"],
        counted_flops_per_step=counted["total"],
        counted_baseline_flops_per_step=counted["baseline"],
        counted_flops_ratio_vs_baseline=counted["total"] / counted["baseline"],
        counted_flops_per_token=counted["total"] / (s * t),
        # fraction of the baseline model's step FLOPs saved (negative: mae costs more, as at low
        # mask rates where the decoder outweighs what the encoder skips)
        counted_flops_saved=1 - counted["total"] / counted["baseline"],
        analytic_flops_saved=1 - analytic_total / analytic_baseline,
        analytic_encoder_flops_per_step=analytic["encoder"],
        analytic_full_encoder_flops_per_step=analytic["encoder_full"],
        analytic_decoder_flops_per_step=analytic["decoder"],
        analytic_flops_per_step=analytic_total,
        analytic_baseline_flops_per_step=analytic_baseline,
        counted_vs_analytic_encoder=counted["encoder"] / analytic["encoder"],
        counted_vs_analytic_decoder=counted["decoder"] / analytic["decoder"],
        counted_vs_analytic_total=counted["total"] / analytic_total,
        counted_vs_analytic_baseline=counted["baseline"] / analytic_baseline,
    )


def apply(build, options):
    model = build.model
    state, decoder = install(build, model, options)
    build.notes[NAME] = dict(decoder_layers=options["decoder_layers"], mask_id=state.mask_id,
                             flops_rule="encoder on T_vis tokens: 6N*T_vis + 12*L*H*Q*T_vis^2 per row")
    build.describe(NAME, lambda: flop_notes(model, state, decoder, build.plan.accum_steps))
