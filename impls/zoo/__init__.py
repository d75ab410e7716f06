"""The shared model zoo: named Transformer shapes from a CPU toy to Llama-7B.

``build(name, **overrides)`` returns an initialised :class:`Transformer`; ``device="meta"`` builds
any size without allocating (materialise with ``to_empty`` + ``init_weights``), so FLOP and memory tables of 7B models can be computed on a laptop.
``sizes()`` lists the names with their parameter counts.
"""
from __future__ import annotations

import dataclasses

import torch

from ..errors import ConfigError

from .model import IGNORE_INDEX, Block, Transformer, TransformerConfig

_GPT2 = dict(vocab_size=50257, block_size=1024)
_LLAMA = dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False)

#: name -> (what it is for, config fields)
CONFIGS: dict[str, tuple[str, dict]] = {
    "nano": ("~100K-parameter CPU toy (quick profile)",
             dict(vocab_size=256, block_size=128, n_layer=2, n_head=2, d_model=64)),
    "micro": ("~1M-parameter CPU model",
              dict(vocab_size=256, block_size=256, n_layer=4, n_head=4, d_model=128)),
    "small": ("CPU 'small' GPT, d_model 384 (MFU reference on a CPU)",
              dict(vocab_size=256, block_size=256, n_layer=6, n_head=6, d_model=384)),
    "gpt2": ("GPT-2 124M (Radford et al. 2019)", dict(_GPT2, n_layer=12, n_head=12, d_model=768)),
    "gpt2-medium": ("GPT-2 350M", dict(_GPT2, n_layer=24, n_head=16, d_model=1024)),
    "gpt2-large": ("GPT-2 774M", dict(_GPT2, n_layer=36, n_head=20, d_model=1280)),
    "gpt2-xl": ("GPT-2 1.5B", dict(_GPT2, n_layer=48, n_head=25, d_model=1600)),
    "llama-1b": ("Llama-3.2-1B shape: RMSNorm, SwiGLU, RoPE, GQA 32/8, tied",
                 dict(_LLAMA, vocab_size=128256, block_size=2048, n_layer=16, n_head=32, n_kv_head=8,
                      d_model=2048, d_ff=8192)),
    "llama-7b": ("Llama-2-7B shape: RMSNorm, SwiGLU, RoPE, untied",
                 dict(_LLAMA, vocab_size=32000, block_size=4096, n_layer=32, n_head=32, d_model=4096,
                      d_ff=11008, tie_embeddings=False)),
    "llama-70b": ("Llama-2-70B shape: RMSNorm, SwiGLU, RoPE, GQA 64/8, untied",
                  dict(_LLAMA, vocab_size=32000, block_size=4096, n_layer=80, n_head=64, n_kv_head=8,
                       d_model=8192, d_ff=28672, tie_embeddings=False)),
    "encoder-nano": ("bidirectional masked-LM encoder, nano shape",
                     dict(vocab_size=256, block_size=128, n_layer=2, n_head=2, d_model=64, causal=False)),
    "encoder-small": ("bidirectional masked-LM encoder, small shape",
                      dict(vocab_size=256, block_size=256, n_layer=6, n_head=6, d_model=384, causal=False)),
    "bert-base": ("BERT-base shape (Devlin et al. 2019)",
                  dict(vocab_size=30522, block_size=512, n_layer=12, n_head=12, d_model=768, causal=False)),
}

_FIELDS = {f.name for f in dataclasses.fields(TransformerConfig)}


def config(name: str, **overrides) -> TransformerConfig:
    """The named config with ``overrides`` applied; a bad name or field fails with the valid ones."""
    if name not in CONFIGS:
        raise ConfigError(f"unknown model {name!r}; valid: {', '.join(CONFIGS)}")
    bad = sorted(set(overrides) - _FIELDS)
    if bad:
        raise ConfigError(f"unknown model field(s) {', '.join(bad)}; valid: {', '.join(sorted(_FIELDS))}")
    try:
        return TransformerConfig(**{**CONFIGS[name][1], **overrides})
    except (TypeError, ValueError) as e:  # inconsistent shape, e.g. d_model not divisible by n_head
        raise ConfigError(f"model {name!r}: {e}") from None


def build(name: str, device: str | torch.device | None = None, **overrides) -> Transformer:
    """Build the named model on ``meta``, then (unless ``device`` is ``"meta"``) materialise it
    on ``device`` and initialise it with :meth:`Transformer.init_weights` from the current seed.

    Construction never allocates, so any size can be planned on a laptop and a sharded run can
    materialise only its shard; the eager result is bit-identical to building directly on
    ``device`` with the initialisation in the constructor."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    cfg = config(name, **overrides)
    # Built outside any FakeTensorMode (a dry run, :mod:`impls.dryrun`): meta tensors hold no data
    # anyway, and a module built on fake meta tensors cannot be moved by ``to_empty`` (torch swaps
    # fake parameters, and the fake mode's weak references forbid the swap).
    with unset_fake_temporarily(), torch.device("meta"):
        model = Transformer(cfg)
    device = torch.device(device or "cpu")
    if device.type != "meta":
        model.to_empty(device=device)
        model.init_weights()
    return model


def sizes() -> list[dict]:
    """One row per zoo name: parameters (total and in matmuls) and the shape, built on ``meta``."""
    rows = []
    for name, (about, _) in CONFIGS.items():
        model = build(name, device="meta")
        cfg = model.cfg
        rows.append(dict(name=name, params=model.num_params(), matmul_params=model.num_params(True),
                         n_layer=cfg.n_layer, d_model=cfg.d_model, n_head=cfg.n_head,
                         vocab_size=cfg.vocab_size, block_size=cfg.block_size, about=about))
    return rows


__all__ = ["Block", "CONFIGS", "IGNORE_INDEX", "Transformer", "TransformerConfig", "build", "config", "sizes"]
