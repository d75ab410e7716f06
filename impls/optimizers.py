"""Optimizers by name.  AdamW (Loshchilov & Hutter 2019) is the suite's baseline.

=========  =====================================================  ==================================  ================================================
name       method                                                 implementation                      persistent state, fp32 parameters (exact)
=========  =====================================================  ==================================  ================================================
sgd        SGD, heavy-ball momentum 0.9 (Polyak 1964)             ``torch.optim.SGD``                 4 B/param (momentum buffer)
nesterov   SGD, Nesterov momentum 0.9 (Nesterov 1983, in the      ``torch.optim.SGD(nesterov=True)``  4 B/param
           form of Sutskever et al. 2013)
adam       Adam (Kingma & Ba 2015); weight decay as an L2 term    ``torch.optim.Adam``                8 B/param + 4 B/tensor (``step``)
           added to the gradient
adamw      AdamW, decoupled weight decay (Loshchilov & Hutter     ``torch.optim.AdamW``               8 B/param + 4 B/tensor (``step``)
           2019) -- the baseline
adafactor  Adafactor (Shazeer & Stern 2018): factored second      ``torch.optim.Adafactor``           4(n+m) B per n×m matrix, 4 B/param for vectors,
           moment, no first moment, relative step size                                                + 4 B/tensor (``step``)
lamb       LAMB (You et al. 2020, arXiv 2019): Adam direction,    ``pytorch_optimizer.Lamb``          8 B/param + 12 B/tensor (weight norm, update norm
           layer-wise trust ratio                                                                     and trust ratio the library keeps)
lars       LARS (You, Gitman & Ginsburg 2017): momentum SGD,      ``pytorch_optimizer.LARS``          4 B/param
           layer-wise trust ratio η‖w‖/(‖g‖+λ‖w‖) on matrices
           (vectors: plain momentum SGD)
lion       Lion (Chen et al. 2023): sign of interpolated          ``pytorch_optimizer.Lion``          4 B/param (one momentum)
           momentum
adamw8bit  AdamW with block-wise 8-bit state (Dettmers et al.     ``bitsandbytes.optim.AdamW8bit``    tensors ≥ ``min_8bit_size`` (4096) elements:
           2022, "8-bit Optimizers via Block-wise Quantization",                                      2 B/param + 8 B per 256-element block (fp32
           arXiv 2021)                                                                                absmax of both moments); smaller tensors keep
                                                                                                      fp32 state, 8 B/param; + 2 KiB once (two
                                                                                                      256-entry fp32 quantization maps)
=========  =====================================================  ==================================  ================================================

Hyper-parameters other than ``lr`` and ``weight_decay`` are fixed here: betas (0.9, 0.95) for
the Adam family (adam, adamw, adamw8bit: only the state format or the decay differs from the
baseline), the papers' values elsewhere (LAMB (0.9, 0.999), eps 1e-6; Lion (0.9, 0.99)), except
LARS's trust coefficient η = 1 instead of 0.001 (see ``_lars``: pytorch-optimizer exempts vectors
from the trust ratio, so η only splits lr between matrices and vectors).  ``lr`` means different
things: a step size for SGD/Adam/Lion, a *relative* step (fraction of the tensor's RMS, capped at
1/√t) for Adafactor, the relative step of each matrix for LAMB (it moves by lr·‖w‖) and LARS (by
lr·‖w‖·‖g+λw‖/(‖g‖+λ‖w‖), before momentum); the benchmarks give each optimizer its own lr and
weight decay.  Lion wants a lr 3-10× smaller and a weight decay 3-10× larger than AdamW (Chen et
al. 2023, §5); LARS's decay sits in the trust ratio's denominator, so it wants the paper's small
λ (5e-4), not AdamW's 0.1, which would dominate ‖g‖ and turn the step into pure decay.

Weight decay applies to tensors of ≥ 2 dimensions only (matrices and embedding tables, not biases
or norms), as in GPT-2/nanoGPT, so that the baseline matches common practice.  LAMB takes it inside the update
before the trust ratio (the paper's form, ``weight_decouple=False``); LARS adds it to the gradient
before the trust ratio, as in the paper.

bitsandbytes and pytorch-optimizer are imported only when their optimizers are built (both add
seconds to start-up).  On a CPU, bitsandbytes (0.50, verified) runs its 8-bit update in PyTorch
ops as dequantize → fp32 update → requantize, one tensor at a time: the *persistent* state is
8-bit, the step briefly holds an fp32 copy of one tensor's two moments, and it is slower than the
fused fp32 AdamW (+26% s/Mtok on ``micro``).
"""
from __future__ import annotations

from collections import defaultdict

import torch

from .errors import ConfigError
from .measure.memory import storage_key, tensors_in

ADAM_BETAS = (0.9, 0.95)
MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller tensors keep fp32 state
LARS_TRUST_COEFFICIENT = 1.0  # η; the paper's 0.001 assumes every tensor is adapted (see _lars)


def model_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _sgd(model, lr, weight_decay):
    # foreach=True: one fused multi-tensor update, the fast path on both CPU and CUDA.
    return torch.optim.SGD(model_param_groups(model, weight_decay), lr=lr, momentum=0.9, foreach=True)


def _nesterov(model, lr, weight_decay):
    return torch.optim.SGD(model_param_groups(model, weight_decay), lr=lr, momentum=0.9, nesterov=True, foreach=True)


def _adam(model, lr, weight_decay):
    return torch.optim.Adam(model_param_groups(model, weight_decay), lr=lr, betas=ADAM_BETAS, eps=1e-8, foreach=True)


def _adamw(model, lr, weight_decay):
    return torch.optim.AdamW(model_param_groups(model, weight_decay), lr=lr, betas=ADAM_BETAS, eps=1e-8, foreach=True)


def _adafactor(model, lr, weight_decay):
    # Defaults are the paper's: beta2_t = 1 - t^-0.8, update clipping d = 1, relative step
    # min(lr, 1/sqrt(t)) × max(1e-3, RMS(param)).  Weight decay: param *= 1 - lr·wd.
    return torch.optim.Adafactor(model_param_groups(model, weight_decay), lr=lr, foreach=True)


def _lamb(model, lr, weight_decay):
    from pytorch_optimizer import Lamb

    # adam_debias=True: step size lr, as in the paper.  The library's default divides the step by
    # 1 - beta1^t *outside* the trust ratio, which makes the first steps up to 10x longer; in the
    # paper the bias corrections sit inside r = m/(sqrt(v)+eps), where the trust ratio cancels them.
    return Lamb(model_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999), eps=1e-6,
                weight_decouple=False, adam_debias=True, foreach=True)


def _lars(model, lr, weight_decay):
    from pytorch_optimizer import LARS

    # Matrices move by lr·η·‖w‖/(‖g‖+λ‖w‖)·(g+λw): only the product lr·η matters for them, but the
    # library gives vectors (biases, norms) plain momentum SGD at lr.  With the paper's η = 0.001
    # (and its lr of 1-30) the zero-initialised biases of a Transformer blow up; η = 1 puts lr on
    # the SGD scale for vectors and makes it the relative step of a matrix (as in LAMB).
    return LARS(model_param_groups(model, weight_decay), lr=lr, momentum=0.9, trust_coefficient=LARS_TRUST_COEFFICIENT,
                foreach=True)


def _lion(model, lr, weight_decay):
    from pytorch_optimizer import Lion

    return Lion(model_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.99), weight_decouple=True, foreach=True)


def _adamw8bit(model, lr, weight_decay):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(model_param_groups(model, weight_decay), lr=lr, betas=ADAM_BETAS, eps=1e-8,
                               min_8bit_size=MIN_8BIT_SIZE)


OPTIMIZERS = {"sgd": _sgd, "nesterov": _nesterov, "adam": _adam, "adamw": _adamw, "adafactor": _adafactor,
              "lamb": _lamb, "lars": _lars, "lion": _lion, "adamw8bit": _adamw8bit}


#: Optimizers from optional packages (a missing one is refused by :func:`check`, before any work).
PACKAGES = {"adamw8bit": "bitsandbytes", "lamb": "pytorch-optimizer", "lars": "pytorch-optimizer",
            "lion": "pytorch-optimizer"}


def check(name: str) -> None:
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    if name in PACKAGES:
        from . import requires

        requires.require(f"optimizer {name!r}", PACKAGES[name])


def build(name: str, model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    check(name)
    return OPTIMIZERS[name](model, lr, weight_decay)


# --------------------------------------------------------------------------- state accounting


def _min_8bit_size(optimizer) -> int | None:
    """bitsandbytes' threshold below which a tensor keeps fp32 state; None for other optimizers."""
    args = getattr(optimizer, "args", None)
    if getattr(args, "optim_bits", None) == 8:
        return int(args.min_8bit_size)
    return None


def state_bytes_by_kind(optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None) -> dict:
    """The optimizer's state split by how each parameter's state is stored -- report it, don't hide it.

    A parameter's *kind* is the width of its largest state tensor: ``"8bit"`` (bitsandbytes'
    quantized moments), ``"32bit"`` (fp32 state: every torch optimizer, and bitsandbytes' fallback
    for tensors below ``min_8bit_size``), ``"16bit"``, or ``"none"`` (no state yet, or none kept).
    Storages used by several parameters or held by the optimizer itself (bitsandbytes'
    quantization maps, LAMB's stacked per-tensor norms) are counted once, in ``shared_bytes``; storages that are parameters are excluded, so
    ``total_bytes`` equals :func:`impls.measure.model_state_bytes`'s ``optimizer_bytes``.

    Returns ``{"total_bytes", "shared_bytes", "min_8bit_size", "kinds": {kind: {"tensors",
    "elements", "bytes"}}, "fp32_fallback": [...]}``.  For an 8-bit optimizer ``min_8bit_size`` is
    its threshold and ``fp32_fallback`` names the parameters it left in fp32 for being smaller
    (names when ``model`` is given, else shapes); for others they are None and [].
    """
    param_keys = {storage_key(p) for g in optimizer.param_groups for p in g["params"]}
    params, seen = [], set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    state_of = {id(p): [t for t in tensors_in(optimizer.state.get(p, {})) if storage_key(t) not in param_keys]
                for p in params}
    owners: dict[tuple, set] = defaultdict(set)  # state storage -> the parameters using it
    for pid, tensors in state_of.items():
        for t in tensors:
            owners[storage_key(t)].add(pid)
    for t in tensors_in(getattr(optimizer, "name2qmap", {})):  # bitsandbytes' optimizer-wide maps
        if storage_key(t) in owners:
            owners[storage_key(t)].add("optimizer")

    min_8bit = _min_8bit_size(optimizer)
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    kinds: dict[str, dict[str, int]] = {}
    fallback = []
    for p in params:
        tensors = state_of[id(p)]
        widest = max(tensors, key=lambda t: t.numel(), default=None)
        kind = "none" if widest is None else f"{8 * widest.element_size()}bit"
        entry = kinds.setdefault(kind, dict(tensors=0, elements=0, bytes=0))
        entry["tensors"] += 1
        entry["elements"] += p.numel()
        for key in {storage_key(t) for t in tensors}:
            if len(owners[key]) == 1:
                entry["bytes"] += key[1]
        if min_8bit is not None and kind == "32bit" and p.numel() < min_8bit:
            fallback.append(names.get(id(p), "x".join(map(str, p.shape))))
    shared = sum(key[1] for key, pids in owners.items() if len(pids) > 1)
    return dict(total_bytes=shared + sum(k["bytes"] for k in kinds.values()), shared_bytes=shared,
                min_8bit_size=min_8bit, kinds=kinds, fp32_fallback=fallback)
