"""One readable Transformer for the whole suite, in the spirit of nanoGPT's ``model.py``.

The same :class:`Block` serves a causal decoder (GPT-2, Radford et al. 2019; Llama, Touvron et al.
2023) and a bidirectional masked-LM encoder (BERT, Devlin et al. 2019): only the attention mask and
the loss differ.  Shape comments use B batch, T sequence length, C d_model, H heads, Q head dim.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import typing
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

#: Label value ignored by the loss: padding, and unmasked positions of a masked-LM batch.
IGNORE_INDEX = -100  # also impls.loss.IGNORE_INDEX


@dataclass
class TransformerConfig:
    vocab_size: int = 256
    block_size: int = 128  # longest sequence the position table / RoPE cache supports
    n_layer: int = 2
    n_head: int = 2
    n_kv_head: int | None = None  # grouped-query attention (Ainslie et al. 2023); None = n_head
    d_model: int = 64
    d_ff: int | None = None  # None: 4·d_model (GELU) or the Llama rule for SwiGLU
    causal: bool = True  # False: bidirectional encoder for masked-LM
    norm: str = "layernorm"  # "layernorm" (GPT-2) | "rmsnorm" (Llama)
    mlp: str = "gelu"  # "gelu" (GPT-2) | "swiglu" (Shazeer 2020, Llama)
    position: str = "learned"  # "learned" table (GPT-2) | "rope" (Su et al. 2021, Llama)
    bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0

    def __post_init__(self):
        _check_fields(self)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm={self.norm!r}; valid: layernorm, rmsnorm")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp={self.mlp!r}; valid: gelu, swiglu")
        if self.position not in ("learned", "rope"):
            raise ValueError(f"position={self.position!r}; valid: learned, rope")
        if self.position == "rope" and self.head_dim % 2:  # rope rotates pairs of head dimensions
            raise ValueError(f"position=rope needs an even head dimension, d_model/n_head = "
                             f"{self.d_model}/{self.n_head} = {self.head_dim}")
        if self.d_ff is None:
            if self.mlp == "gelu":
                self.d_ff = 4 * self.d_model
            else:  # Llama: 2/3 of 4·d, rounded up to a multiple of 256
                self.d_ff = 256 * math.ceil(int(8 * self.d_model / 3) / 256)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


@functools.cache
def _field_kinds() -> dict[str, tuple[type, bool]]:
    """Field name -> (its type, whether None is allowed), from the annotations."""
    out = {}
    for name, hint in typing.get_type_hints(TransformerConfig).items():
        args = typing.get_args(hint)
        out[name] = (next((t for t in args if t is not type(None)), hint), type(None) in args)
    return out


def _check_fields(cfg: TransformerConfig) -> None:
    """Types and ranges of every field, one ``ValueError`` line each: a config comes from
    ``--model-arg K=V`` texts read as bool/int/float/string, so ``n_layer=two`` or ``causal=1``
    must be caught here rather than deep inside a layer; sizes are >= 1 (``n_layer=0`` would
    train a model with no blocks), dropout in [0, 1) (p=1 drops everything)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kind, optional = _field_kinds()[f.name]
        if value is None and optional:
            continue
        if kind is bool:
            ok, want = isinstance(value, bool), "true or false"
        elif kind is int:
            ok, want = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1, \
                "an integer >= 1"
        elif kind is float:  # dropout, the one float field (nan and inf fail the comparison)
            ok, want = isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 <= value < 1, \
                "a number in [0, 1)"
        else:
            ok, want = isinstance(value, kind), "a string" if kind is str else f"a {kind.__name__}"
        if not ok:
            raise ValueError(f"{f.name}={value!r} is invalid; valid: {want}")


def _norm(cfg: TransformerConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=1e-5)
    return nn.LayerNorm(cfg.d_model, bias=cfg.bias)


def rope_tables(cfg: TransformerConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of rotary embeddings (Su et al. 2021, Eq. 34), each (block_size, Q/2)."""
    q = cfg.head_dim
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, q, 2, device=device, dtype=torch.float32) / q))
    angles = torch.outer(torch.arange(cfg.block_size, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x (B, H, T, Q) by the position angle."""
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, H, T, Q/2)
    t = x.shape[-2]
    c, s = cos[:t].to(x.dtype), sin[:t].to(x.dtype)
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                   attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(QKᵀ/√Q)V over (B, H, T, Q) tensors with torch's fused SDPA kernels."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=causal and attn_mask is None)


class Attention(nn.Module):
    """Multi-head (or grouped-query) self-attention.  ``attend`` computes the attention itself
    from (B, H, T, Q) q/k/v: techniques swap it (math, sparse patterns) without touching weights."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.attend = sdpa_attention
        kv_dim = cfg.n_kv_head * cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * kv_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape  # (B, T, C)
        # The head counts come from the width of qkv's output, not from the config: under tensor
        # parallelism (impls/techniques/tp.py) a rank's qkv computes only its H/t query heads and
        # their Hkv/t K/V heads, laid out [q | k | v] like the whole layer's output.
        group = cfg.n_head // cfg.n_kv_head  # query heads per K/V head (1 without GQA)
        qkv = self.qkv(x)  # (B, T, (H + 2·Hkv)·Q), or its 1/t share
        kv_width = qkv.shape[-1] // (group + 2)
        q, k, v = qkv.split([group * kv_width, kv_width, kv_width], dim=-1)
        q = q.view(b, t, -1, cfg.head_dim).transpose(1, 2)  # (B, H, T, Q)
        k = k.view(b, t, -1, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, Q)
        v = v.view(b, t, -1, cfg.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if group > 1:  # GQA: each K/V head serves n_head/n_kv_head query heads
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        y = self.attend(q, k, v, cfg.causal, attn_mask, cfg.dropout if self.training else 0.0)  # (B, H, T, Q)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.up = nn.Linear(cfg.d_model, cfg.d_ff * (2 if self.swiglu else 1), bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)  # (B, T, F) or (B, T, 2F)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's GELU
        return self.down(h)  # (B, T, C)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm1, self.attn = _norm(cfg), Attention(cfg)
        self.norm2, self.mlp = _norm(cfg), MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, attn_mask=None):
        x = x + self.dropout(self.attn(self.norm1(x), rope, attn_mask))
        return x + self.dropout(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """Token embedding → blocks → final norm → LM head (tied to the embedding by default).

    ``forward(idx)`` returns the logits (B, T, V); the loss lives outside the model
    (:mod:`impls.loss`), as in torchtitan, so the engine can normalise it by a token count that
    spans micro-batches and ranks, and techniques add their loss terms through the build.

    The constructor allocates but does not initialise: build on ``meta`` (``zoo.build(...,
    device="meta")``), shard or wrap, then ``to_empty(device=...)`` and :meth:`init_weights`.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = _norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.position == "rope":
            cos, sin = rope_tables(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def to_empty(self, *, device, recurse: bool = True):
        """``nn.Module.to_empty``, keeping the LM head tied to the embedding: moving a tensor off
        ``meta`` makes a new Parameter per module, which would silently untie them."""
        super().to_empty(device=device, recurse=recurse)
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        return self

    def own_modules(self) -> list[tuple[str, nn.Module]]:
        """The model's own modules, in construction order: (name, module) pairs of
        ``named_modules()`` minus the subtrees of modules a technique added with their own
        ``init_weights`` (routers, experts), which the build initialises after these."""
        out, skip = [], []
        for name, module in self.named_modules():
            if any(name.startswith(prefix) for prefix in skip):
                continue
            if module is not self and callable(getattr(module, "init_weights", None)):
                skip.append(name + ".")
                continue
            out.append((name, module))
        return out

    @torch.no_grad()
    def init_weights(self):
        """GPT-2's initialisation (Radford et al. 2019; nanoGPT), on whatever device the
        parameters are: N(0, 0.02) for linear and embedding weights, zero biases, and the
        residual projections scaled by 1/sqrt(2·L) so the residual stream's variance does not
        grow with depth.

        It first draws each module's PyTorch default initialisation (``reset_parameters``) in
        construction order, then overwrites it: that is the random stream an eagerly built model
        consumed, so a seed gives the same weights whether the model was built eagerly or on
        ``meta`` and materialised later (and the same as the suite's earlier records).
        """
        own = self.own_modules()
        for _, module in own:
            if module is not self and callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
        for _, module in own:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        for name, module in own:
            if name.endswith(("attn.proj", "mlp.down")):
                nn.init.normal_(module.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layer))
        if self.cfg.position == "rope":
            self.rope_cos.copy_(rope_tables(self.cfg, self.rope_cos.device)[0])
            self.rope_sin.copy_(rope_tables(self.cfg, self.rope_sin.device)[1])

    def num_params(self, matmul_only: bool = False) -> int:
        """Distinct parameters; ``matmul_only`` drops the position table, which costs no matmul
        FLOPs (the N of 6N; the tied embedding stays in as the LM head, as in nanoGPT).  A
        parameter partitioned by DeepSpeed ZeRO-3 counts its full size (``ds_numel``)."""

        def numel(p) -> int:
            return getattr(p, "ds_numel", None) or p.numel()

        seen, n = set(), 0
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += numel(p)
        if matmul_only:
            if self.pos_emb is not None:
                n -= numel(self.pos_emb.weight)
            if not self.cfg.tie_embeddings:  # an untied input table is a lookup, not a matmul
                n -= numel(self.tok_emb.weight)
        return n

    def forward(self, idx: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t = idx.shape  # (B, T)
        if t > self.cfg.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.cfg.block_size}")
        x = self.tok_emb(idx)  # (B, T, C)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(t, device=idx.device))
        else:
            rope = (self.rope_cos, self.rope_sin)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, attn_mask)
        return self.lm_head(self.norm_f(x))  # (B, T, V)
