"""Optimizers by name.  AdamW (Loshchilov & Hutter 2019) is the suite's baseline.

Weight decay applies to matrices only (not biases, norms or embeddings' position table), as in
GPT-2/nanoGPT, so that the baseline matches common practice.
"""
from __future__ import annotations

import torch

from .errors import ConfigError


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _adamw(model, lr, weight_decay):
    # foreach=True: one fused multi-tensor update, the fast path on both CPU and CUDA.
    return torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95), eps=1e-8, foreach=True)


def _sgd(model, lr, weight_decay):
    return torch.optim.SGD(_param_groups(model, weight_decay), lr=lr, momentum=0.9, foreach=True)


OPTIMIZERS = {"adamw": _adamw, "sgd": _sgd}


def check(name: str) -> None:
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


def build(name: str, model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    check(name)
    return OPTIMIZERS[name](model, lr, weight_decay)
