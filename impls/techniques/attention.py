"""Attention kernels and sparse attention patterns, swapped into every block's ``attend``.

``kind`` picks how softmax(QKᵀ/√Q + mask)V is computed over (B, H, T, Q) tensors:

* ``math``: the eager reference with explicit matmuls (Vaswani et al. 2017, "Attention Is All
  You Need", Eq. 1); it materialises and saves the T×T probability matrix.
* ``sdpa`` (default): torch's fused ``F.scaled_dot_product_attention`` (FlashAttention, Dao et al.
  2022, arXiv 2205.14135, on CUDA; a blocked flash kernel on CPU).
* ``local``: sliding-window attention — query i sees keys j with 0 <= i-j < ``window`` (itself
  and the ``window``-1 before it).  Longformer (Beltagy et al. 2020, arXiv 2004.05150, §3.1);
  the "local" pattern of Child et al. 2019.
* ``strided``: Sparse Transformer strided attention (Child et al. 2019, "Generating Long
  Sequences with Sparse Transformers", arXiv 1904.10509, §4.2), both heads' patterns in one:
  query i sees j when 0 <= i-j and ((i-j) < ``stride`` or (i-j) mod ``stride`` == 0).
* ``block``: block-sparse local attention — the sequence is cut into blocks of ``block`` tokens
  and each query block sees its own block (causally) and the ``blocks``-1 key blocks before it:
  the sliding-block component of BigBird (Zaheer et al. 2020, arXiv 2007.14062, §2 and App. D,
  "blockified" attention) and the block formulation of Sparse Transformer's kernels.

Causal models get the patterns above.  A bidirectional encoder (``causal=False``) gets the
symmetric pattern: |i-j| < window; |i-j| < stride or (i-j) mod stride == 0; key blocks within
``blocks``-1 of the query block on either side.

How the sparse kinds skip work on a CPU (:func:`block_sparse_attention`): the sequence is padded
to nb blocks of ``size`` tokens (``window``, ``stride`` or ``block``); for each query block a
fixed list of key-block offsets (local/strided: -1, 0 [, +1]; block: -(blocks-1)..0 [..+]) is
gathered with ``index_select`` into a (B, H, nb, kw, Q) tensor, so the scores are one batched
matmul of static shape (B, H, nb, size, kw) instead of (B, H, T, T); the exact element mask of the
pattern (and padding) is applied inside those tiles.  ``strided``'s "every stride-th column"
part reaches every earlier block, but each query row needs only one column per block, the one
with its own residue r = i mod stride: grouping queries and keys by residue gives a second batched
matmul of shape (B, H, stride, nb, nb) — per query, nb extra columns rather than T.  Both parts
share one softmax.  Work per query is therefore kw (+ nb) key columns instead of T: counted
FLOPs and the saved probability tensor shrink by about kw/T (2·window/T for ``local``), at the
price of computing the masked-out half of the tiles.  Not skipped, and so still counted: the
strictly-upper half of the diagonal tile and the block-level upper triangle of the strided part.

On CUDA (no dropout, no explicit ``attn_mask``), the same pattern runs through FlexAttention
(Dong et al. 2024, arXiv 2412.05496): ``torch.nn.attention.flex_attention`` compiled, with a
``create_block_mask`` of the pattern's ``mask_mod`` cached per sequence length.  FlexAttention
has no CPU backward in torch 2.13, hence the gather kernel above.  Under ``FlopCounterMode``
torch counts eager FlexAttention as dense attention, so a counted step uses the gather kernel on
CUDA too: counted FLOPs are its tile work (FlexAttention's own 128×128 tiles do somewhat more).

An explicit ``attn_mask`` (bool: True = attend, or additive float, broadcastable to
(B, H, T, T)) is honoured by ``math``/``sdpa`` as SDPA does (it replaces the causal mask) and by
the sparse kinds as an extra restriction on top of the pattern, gathered tile by tile.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..zoo.model import Attention, sdpa_attention

NAME = "attention"
STAGE = "surgery"
RANK = 30  # after MLP replacement and fusion; independent of both
OPTIONS = {"kind": "sdpa", "window": 64, "stride": 16, "block": 16, "blocks": 2}
KINDS = ("math", "sdpa", "local", "strided", "block")
SPARSE_KINDS = ("local", "strided", "block")
CHOICES = {"kind": KINDS}
_POSITIVE = ("window", "stride", "block", "blocks")


# --------------------------------------------------------------------------- dense kernels


def _softmax_dtype(scores: torch.Tensor) -> torch.dtype:
    """Softmax in at least fp32 (bf16/fp16 scores), as the fused kernels accumulate."""
    return torch.promote_types(scores.dtype, torch.float32)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                   attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(QKᵀ/√Q + mask)V with explicit matmuls; same mask semantics as :func:`sdpa_attention`
    (a given ``attn_mask`` replaces the causal mask; bool True = attend, float = additive)."""
    t, s = q.shape[-2], k.shape[-2]
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)  # (B, H, T, S)
    if attn_mask is None and causal:
        attn_mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    probs = scores.softmax(-1, dtype=_softmax_dtype(scores)).to(v.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return probs @ v  # (B, H, T, Q)


# --------------------------------------------------------------------------- sparse patterns


@dataclass(frozen=True)
class Pattern:
    """A sparse pattern: ``allows(i, j)`` is the exact element mask, and every allowed (i, j)
    lies in a key block at one of ``offsets`` from i's block (blocks of ``size`` tokens), or, for
    ``strided``, shares i's residue mod ``size``."""

    kind: str  # local | strided | block
    size: int  # tile size: window, stride or block
    blocks: int  # block kind: key blocks per query block (incl. its own)
    causal: bool

    @property
    def strided(self) -> bool:
        return self.kind == "strided"

    def allows(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Bool mask, broadcast over integer tensors of query positions i and key positions j.
        Pure tensor ops (``&``, ``|``, ``%``, ``//``), so it doubles as a FlexAttention mask_mod."""
        d = i - j
        if self.kind == "block":
            near = i // self.size - j // self.size
            return ((d >= 0) & (near < self.blocks)) if self.causal else (near.abs() < self.blocks)
        if self.kind == "local":
            return ((d >= 0) & (d < self.size)) if self.causal else (d.abs() < self.size)
        strided = (d.abs() < self.size) | (d % self.size == 0)
        return (d >= 0) & strided if self.causal else strided

    def offsets(self) -> tuple[int, ...]:
        """Key-block offsets, relative to the query block, of the tiles the pattern reaches
        (strided: only its local part; the stride-th columns go through the residue matmul)."""
        back = self.blocks - 1 if self.kind == "block" else 1
        return tuple(range(-back, 1 if self.causal else back + 1))

    def mask(self, t: int, s: int | None = None, device=None) -> torch.Tensor:
        """The dense (T, S) bool mask of the pattern (the reference for tests and FlexAttention)."""
        i = torch.arange(t, device=device)[:, None]
        j = torch.arange(t if s is None else s, device=device)[None, :]
        return self.allows(i, j)


def pattern(options: dict, causal: bool) -> Pattern:
    kind = options["kind"]
    if kind not in SPARSE_KINDS:
        raise ConfigError(f"attention:kind={kind} has no sparse pattern; sparse kinds: {', '.join(SPARSE_KINDS)}")
    size = {"local": options["window"], "strided": options["stride"], "block": options["block"]}[kind]
    return Pattern(kind, size, options["blocks"] if kind == "block" else 1, causal)


def gather_mask(attn_mask: torch.Tensor, i: torch.Tensor, j: torch.Tensor, t: int) -> torch.Tensor:
    """attn_mask[..., i, j] for index tensors i, j (clamped into range: out-of-range entries are
    masked by the pattern anyway); keeps attn_mask's leading broadcast dims."""
    return attn_mask[..., i.clamp(0, t - 1), j.clamp(0, t - 1)]


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pat: Pattern,
                           attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention restricted to ``pat`` that computes only the tiles the pattern reaches.

    q, k, v: (B, H, T, Q) -> (B, H, T, Q).  See the module docstring for the scheme.
    """
    b, h, t, dq = q.shape
    if k.shape[-2] != t:
        raise ValueError(f"sparse attention needs self-attention shapes, got T={t}, S={k.shape[-2]}")
    size, dev = pat.size, q.device
    nb = -(-t // size)  # blocks, the last one padded
    tp = nb * size
    offs = torch.tensor([o for o in pat.offsets() if abs(o) < nb], device=dev)  # drop never-valid tiles
    kw = len(offs) * size  # key columns per query block
    pad = (0, 0, 0, tp - t)
    qb = F.pad(q * (1.0 / math.sqrt(dq)), pad).reshape(b, h, nb, size, dq)  # (B, H, nb, size, Q)
    kp, vp = F.pad(k, pad), F.pad(v, pad)  # (B, H, Tp, Q)

    # Local tiles: key block (query block + offset), gathered into (B, H, nb, kw, Q).
    r = torch.arange(size, device=dev)
    blk = torch.arange(nb, device=dev)[:, None] + offs[None, :]  # (nb, n_offsets)
    j = (blk[:, :, None] * size + r).reshape(nb, kw)  # key position of each gathered column
    i = (torch.arange(nb, device=dev)[:, None] * size + r)[:, :, None]  # (nb, size, 1)
    idx = j.clamp(0, tp - 1).reshape(-1)
    kg = kp.index_select(2, idx).view(b, h, nb, kw, dq)
    vg = vp.index_select(2, idx).view(b, h, nb, kw, dq)
    scores = qb @ kg.transpose(-2, -1)  # (B, H, nb, size, kw)
    j = j[:, None, :]  # (nb, 1, kw)
    allowed = pat.allows(i, j) & (j >= 0) & (j < t)  # (nb, size, kw)
    ext = gather_mask(attn_mask, i, j, t) if attn_mask is not None else None

    if pat.strided:
        # Stride-th columns outside the local tiles: query (block c, residue r) sees key
        # (block m, residue r) for every block m, one matmul per residue: (B, H, size, nb, nb).
        qr = qb.transpose(2, 3)  # (B, H, size, nb, Q)
        kr = kp.reshape(b, h, nb, size, dq).transpose(2, 3)
        vr = vp.reshape(b, h, nb, size, dq).transpose(2, 3)
        scores_r = (qr @ kr.transpose(-2, -1)).transpose(2, 3)  # (B, H, nb[c], size[r], nb[m])
        c = torch.arange(nb, device=dev)
        ir = (c[:, None] * size + r)[:, :, None]  # (nb, size, 1) query positions
        jr = (c[None, None, :] * size + r[None, :, None])  # (1, size, nb) key positions
        in_local = torch.isin(c[None, :] - c[:, None], offs)[:, None, :]  # (nb, 1, nb): already a tile
        allowed_r = pat.allows(ir, jr) & (jr < t) & ~in_local
        scores = torch.cat([scores, scores_r], dim=-1)  # (B, H, nb, size, kw + nb)
        allowed = torch.cat([allowed, allowed_r], dim=-1)
        if ext is not None:
            ext = torch.cat([ext, gather_mask(attn_mask, ir, jr, t)], dim=-1)

    if ext is not None:
        if ext.dtype == torch.bool:
            allowed = allowed & ext
        else:
            scores = scores + ext
    # A finite fill, not -inf: padded query rows may have no allowed key, and -inf there would
    # turn their (discarded) rows into NaNs that leak into dK through the backward.
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = scores.softmax(-1, dtype=_softmax_dtype(scores)).to(v.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    out = probs[..., :kw] @ vg  # (B, H, nb, size, Q)
    if pat.strided:
        out = out + (probs[..., kw:].transpose(2, 3) @ vr).transpose(2, 3)
    return out.reshape(b, h, tp, dq)[:, :, :t]


# --------------------------------------------------------------------------- FlexAttention (CUDA)

compiled_flex = None


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pat: Pattern, cache: dict | None = None,
                   compiled: bool = True) -> torch.Tensor:
    """``pat`` through FlexAttention (compiled on CUDA; ``compiled=False`` runs its eager
    forward, which also works on a CPU, for tests)."""
    global compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as flex

    t, s = q.shape[-2], k.shape[-2]
    key = (pat, t, s, str(q.device))
    block_mask = cache.get(key) if cache is not None else None
    if block_mask is None:
        block_mask = create_block_mask(lambda b, h, qi, kj: pat.allows(qi, kj), None, None, t, s, device=q.device)
        if cache is not None:
            cache[key] = block_mask
    if compiled:
        if compiled_flex is None:
            compiled_flex = torch.compile(flex, dynamic=False)
        flex = compiled_flex
    return flex(q, k, v, block_mask=block_mask)


def _counting_flops() -> bool:
    """True inside ``FlopCounterMode``.  Eager FlexAttention is counted as *dense* there (torch
    scales its formula only by a sparsity hint found on traced graphs), so a counted step runs the
    block-sparse kernel instead, whose batched matmuls show the work the pattern skips."""
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
        from torch.utils.flop_counter import _FlopCounterMode
    except ImportError:  # private names moved: count whatever runs
        return False
    return any(isinstance(m, _FlopCounterMode) for m in _get_current_dispatch_mode_stack())


# --------------------------------------------------------------------------- the technique


class SparseAttend:
    """An ``attend`` function for a sparse kind: FlexAttention on CUDA, block gather elsewhere."""

    def __init__(self, options: dict):
        self.options = {k: options[k] for k in OPTIONS}
        self._block_masks: dict = {}

    def __call__(self, q, k, v, causal: bool, attn_mask=None, dropout_p: float = 0.0):
        pat = pattern(self.options, causal)
        # FlexAttention: no dropout, no extra mask, (Triton tiles) head dims of 16 and up, and not
        # while FLOPs are counted (see _counting_flops).
        if (q.is_cuda and attn_mask is None and dropout_p == 0.0 and q.shape[-1] >= 16
                and not _counting_flops()):
            return flex_attention(q, k, v, pat, self._block_masks)
        return block_sparse_attention(q, k, v, pat, attn_mask, dropout_p)

    def __repr__(self):
        return f"SparseAttend({self.options})"


def _check(options: dict) -> None:
    for key in _POSITIVE:
        if not isinstance(options[key], int) or options[key] < 1:
            raise ConfigError(f"attention:{key} must be an integer >= 1, got {options[key]!r}")
    if options["kind"] not in KINDS:
        raise ConfigError(f"bad value {options['kind']!r} for attention:kind; valid: {', '.join(KINDS)}")


def attend_for(options: dict):
    """The ``attend`` function of ``options`` (defaults filled in for missing keys)."""
    options = {**OPTIONS, **options}
    _check(options)
    kind = options["kind"]
    if kind == "sdpa":
        return sdpa_attention
    if kind == "math":
        return math_attention
    return SparseAttend(options)


def masks_nothing(options: dict, seq_len: int) -> bool:
    """Whether the sparse pattern of ``options`` allows every pair a dense (causal or
    bidirectional) attention over ``seq_len`` tokens allows.  Local and strided patterns depend
    on d = i - j only, over 0 <= d < T for causal models (|d| < T, the same test, for encoders):
    strided misses d = stride + 1 unless stride is 1 or T - 1 <= stride.  The block pattern's
    widest pair is (T-1, 0)."""
    kind, t = options["kind"], seq_len
    if kind == "local":
        return options["window"] >= t
    if kind == "strided":
        return options["stride"] == 1 or t - 1 <= options["stride"]
    return (t - 1) // options["block"] < options["blocks"]


def check_model(cfg, seq_len, options):
    if options["kind"] in SPARSE_KINDS and masks_nothing(options, seq_len):
        size = {"local": "window", "strided": "stride", "block": "block"}[options["kind"]]
        raise ConfigError(f"attention:kind={options['kind']} with {size}={options[size]}"
                          + (f",blocks={options['blocks']}" if options["kind"] == "block" else "")
                          + f" masks nothing at seq_len {seq_len}: the run would be dense attention through the "
                          f"sparse kernel; use a smaller {size}")


def configure(plan, options):
    _check(options)
    kind = options["kind"]
    note = {"kind": kind}
    if kind in SPARSE_KINDS:
        used = {"local": ("window",), "strided": ("stride",), "block": ("block", "blocks")}[kind]
        note.update({k: options[k] for k in used})
        note["kernel"] = "flex_attention (CUDA) / block-sparse gather (CPU)"
        plan.dense_compute = False  # masked blocks are skipped: the dense 12·L·H·Q·T over-counts
    plan.notes["attention"] = note


def apply(build, options):
    """Set the ``attend`` kernel of every :class:`Attention` (the model's documented extension
    point for the attention core: weights and module tree unchanged)."""
    attend = attend_for(options)
    for part in build.model_parts:
        for module in part.modules():
            if isinstance(module, Attention):
                module.attend = attend
