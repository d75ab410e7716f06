"""Activation memory per Transformer layer: the paper's formula and this suite's implementation.

Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (arXiv
2205.05198), §4, count the bytes one layer saves for backward in fp16 with dropout and an
unfused attention (s sequence, b micro-batch, h hidden, a heads, t tensor-parallel degree):

* no parallelism, Eq. 1: ``sbh(34 + 5as/h)``
* tensor parallel, Eq. 2: ``sbh(10 + 24/t + 5as/(ht))``
* tensor + sequence parallel, Eq. 4: ``sbh(34/t + 5as/(ht))``

This suite's blocks differ in three documented ways, so the *same counting* gives other
constants: activations are fp32 (4 bytes, not 2), dropout is off by default (no masks, no
dropout outputs), and attention is torch's fused SDPA, which saves its output and log-sum-exp
instead of the a·s² score and softmax tensors.  Counting what autograd saves in a GELU block
(elements, ×4 bytes):

* layer-norm inputs 2·sbh, plus their mean and 1/σ 4·sb;
* inputs of the column-parallel GEMMs (``qkv``, ``up``) 2·sbh;
* the ``qkv`` output (q, k, v) ((h + 2·kv)/h)·sbh/t, the SDPA output (also ``proj``'s input)
  sbh/t and its log-sum-exp sab/t;
* the ``up`` output (GELU's input) and GELU's output (``down``'s input), 2·(F/h)·sbh/t.

Tensor parallelism divides the head and F terms by t; sequence parallelism also divides the
layer-norm terms by t, but PyTorch's ``SequenceParallel`` + ``ColwiseParallel`` keep the
*all-gathered* input of each column-parallel GEMM for its weight gradient (2·sbh per layer, not
2·sbh/t): Megatron stores only the sequence shard and all-gathers it again in backward (§4.2.2),
which these styles do not.  :func:`implementation_per_layer` is that count; the record compares
the measured bytes with it (exact) and the measured *reduction* with the paper's.
"""
from __future__ import annotations


def korthikanti_per_layer(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False) -> float:
    """Bytes per layer in the paper's setting (fp16, dropout, unfused attention)."""
    sbh = s * b * h
    if t == 1:
        return sbh * (34 + 5 * a * s / h)
    if sp:
        return sbh * (34 / t + 5 * a * s / (h * t))
    return sbh * (10 + 24 / t + 5 * a * s / (h * t))


def implementation_per_layer(cfg, s: int, b: int, t: int = 1, sp: bool = False, element_bytes: int = 4) -> int | None:
    """Bytes per layer this suite's block saves (GELU MLP, LayerNorm, fused SDPA, no dropout);
    None for the variants the count above does not cover (SwiGLU, RMSNorm, RoPE, dropout)."""
    if cfg.mlp != "gelu" or cfg.norm != "layernorm" or cfg.position != "learned" or cfg.dropout:
        return None
    h, a = cfg.d_model, cfg.n_head
    sb, sbh = s * b, s * b * cfg.d_model
    kv = cfg.n_kv_head * cfg.head_dim
    norm_inputs = 2 * sbh / (t if sp else 1)
    norm_stats = 4 * sb / (t if sp else 1)
    gemm_inputs = 2 * sbh  # replicated under TP; gathered (and kept whole) under torch's SP
    attention = (sbh * (h + 2 * kv) / h + sbh + sb * a) / t
    mlp = 2 * s * b * cfg.d_ff / t
    elements = norm_inputs + norm_stats + gemm_inputs + attention + mlp
    return int(round(elements * element_bytes))


def check(cfg, s: int, b: int, measured_per_layer: list[int] | None, t: int = 1, sp: bool = False,
          element_bytes: int = 4) -> dict:
    """The record's block: measured bytes per layer against both counts, and the paper's
    predicted reduction factor for this layout (vs no parallelism)."""
    paper = korthikanti_per_layer(s, b, cfg.d_model, cfg.n_head, t, sp)
    paper_none = korthikanti_per_layer(s, b, cfg.d_model, cfg.n_head)
    impl = implementation_per_layer(cfg, s, b, t, sp, element_bytes)
    impl_none = implementation_per_layer(cfg, s, b, 1, False, element_bytes)
    measured = max(measured_per_layer) if measured_per_layer else None
    return dict(
        measured_bytes_per_layer=measured,
        implementation_formula_bytes=impl,
        measured_over_implementation=(measured / impl) if measured and impl else None,
        paper_formula_bytes_fp16=paper,
        paper_reduction_vs_no_parallelism=paper / paper_none,
        implementation_reduction_vs_no_parallelism=(impl / impl_none) if impl and impl_none else None,
        s=s, b=b, h=cfg.d_model, a=cfg.n_head, t=t, sp=sp)
