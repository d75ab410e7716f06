"""N:M semi-structured sparsity, 2:4 by default (Mishra et al. 2021, "Accelerating Sparse Deep
Neural Networks", arXiv 2104.08378; Zhou et al. 2021, "Learning N:M Fine-grained Structured Sparse
Neural Networks From Scratch", ICLR): in every group of M consecutive weights along a Linear's
input dimension at most M − N are nonzero (2:4: two of every four), the N smallest |w| of each
group zeroed.  NVIDIA's sparse tensor cores (Ampere and later) skip the zeros of a 2:4 matrix: half
the multiply-adds, ~2× matmul throughput, and the weight stored as its nonzeros plus 2-bit indices.

``prune_nm:n=2,m=4,at=f,kernel=dense|semi_structured``: after ``round(f · total_steps)`` steps
(``at=0``: before the first) the block Linear weights get the N:M mask -- the mask
``torch.ao.pruning.WeightNormSparsifier(sparsity_level=1, sparse_block_shape=(1, m),
zeros_per_block=n)`` computes (a test checks they are equal); it is kept in
``torch.nn.utils.prune``'s reparametrisation rather than the sparsifier's ``FakeSparsity``
parametrisation because ``FakeSparsity.state_dict`` drops the mask, and a resumed run must keep it
(:mod:`._pruning`: bool mask buffers, pruned weights and their AdamW moments zeroed).

``kernel=dense`` (default): masked dense matmuls, on any device.  No FLOPs are saved and no speed is
claimed: the record says ``flops_saved: false`` and why.

``kernel=semi_structured``: the forward's matmuls run on the 2:4 sparse kernels
(``torch.sparse.to_sparse_semi_structured``, cuSPARSELt/CUTLASS), which exist for CUDA devices of
compute capability ≥ 8.0 only, for n=2, m=4, fp16/bf16 (and int8) weights.  Refused before any work
on any other device or pattern, with that reason.  On CUDA each masked Linear gets a forward hook
pair: the pre-hook compresses the effective weight (after every mask or optimizer update: the
compressed copy is rebuilt each forward, since the dense ``weight_orig`` is what AdamW updates) and
runs ``F.linear`` on it; the weight gradient still flows to the dense ``weight_orig`` through the
sparse tensor's autograd support.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dist
from ..errors import ConfigError
from . import _pruning as P

NAME = "prune_nm"
STAGE = "surgery"
RANK = 60  # masks the Linears the earlier surgeries leave
OPTIONS = {"n": 2, "m": 4, "at": 0.0, "kernel": "dense"}
CHOICES = {"kernel": ("dense", "semi_structured")}
REQUIRES = lambda options: ("torchao",) if options["kernel"] == "semi_structured" else ()  # noqa: E731
CONFLICTS = {**P.CONFLICTS, "prune": "both set the same pruning masks; use one", "gmp": "both set the same pruning "
             "masks; use one", "prune_structured": "prune_structured removes heads and neurons physically; "
             "combine them in separate runs"}


def configure(plan, options):
    n, m = options["n"], options["m"]
    if not 1 <= n < m:
        raise ConfigError(f"prune_nm: need 1 <= n < m (n zeros in every group of m), got n={n}, m={m}")
    P.check_fraction(NAME, "at", options["at"])
    if options["kernel"] == "semi_structured":
        if (n, m) != (2, 4):
            raise ConfigError(f"prune_nm:kernel=semi_structured runs 2:4 sparse kernels only; got n={n}, m={m} "
                              f"(use kernel=dense)")
        if plan.device_type != "cuda":
            raise ConfigError(f"prune_nm:kernel=semi_structured needs CUDA: torch.sparse.to_sparse_semi_structured's "
                              f"2:4 kernels (cuSPARSELt/CUTLASS) exist only for NVIDIA GPUs of compute capability "
                              f">= 8.0; this run's device is {plan.device_type or 'unknown'} (use kernel=dense, which "
                              f"trains the same masks without a speed claim)")
        if dist.cuda_available() and dist.cuda_capability() < (8, 0):
            raise ConfigError(f"prune_nm:kernel=semi_structured needs compute capability >= 8.0, this GPU has "
                              f"{dist.cuda_capability()}")


def check_recipe(recipe, options):
    # Here, not in configure: configure runs in stage order, surgery (this technique) before
    # precision, so the bf16/fp16 technique has not set the plan's autocast dtype yet there.
    if options["kernel"] == "semi_structured" and not any(
            t.partition(":")[0] in ("bf16", "fp16") for t in recipe.techniques):
        raise ConfigError("prune_nm:kernel=semi_structured: the 2:4 kernels take fp16/bf16 weights; add the bf16 "
                          "or fp16 technique")


def check_model(cfg, seq_len, options):
    P.check_divisible(cfg, options["m"], NAME)


class SemiStructuredLinear(torch.nn.Module):
    """Contains a masked Linear and runs its forward on the 2:4 sparse kernels (CUDA only):
    ``torchao.sparsity.training.semi_structured_sparsify`` compresses the effective weight each
    forward (AdamW updates the dense ``weight_orig``) in an autograd Function whose backward
    returns the dense gradient, and ``F.linear`` dispatches to cuSPARSELt."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        from torchao.sparsity.training import semi_structured_sparsify  # CUDA-only kernels: imported on use

        weight = P.effective_weight(self.linear).to(x.dtype)
        bias = None if self.linear.bias is None else self.linear.bias.to(x.dtype)
        return F.linear(x, semi_structured_sparsify(weight, backend="cusparselt"), bias)


def apply(build, options):
    model = build.model
    layers = P.target_linears(model)
    n, m = options["n"], options["m"]
    for _, module in layers:
        P.reparametrize(module)
    optimizer = P.OptimizerRef(build)
    semi = options["kernel"] == "semi_structured"
    notes = dict(kind=f"{n}:{m} semi-structured", n=n, m=m, target_sparsity=n / m, at=options["at"],
                 kernel=options["kernel"], pruned_layers=[name for name, _ in layers], embeddings_pruned=False,
                 flops_saved=semi, applied_at_step=None,
                 flops_note=("2:4 sparse tensor-core kernels (to_sparse_semi_structured) skip half the multiply-adds "
                             "of the masked Linears' forward" if semi else
                             "masked dense matmuls: zeros are multiplied like any weight; only GPU 2:4 kernels "
                             "(kernel=semi_structured, CUDA with compute capability >= 8.0) skip them"))

    def update(done, _):
        for _, module in layers:
            P.set_mask(module, nm_mask_of(module, n, m), optimizer)
        notes["applied_at_step"] = done

    if semi:  # each masked Linear runs inside a wrapper that calls the sparse kernel
        for name, module in layers:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, SemiStructuredLinear(module))
    P.Events(build, lambda total: {P.event_step(options["at"], total): None}, update,
             needs_length=options["at"] > 0).install()
    build.notes[NAME] = notes
    build.describe(NAME, lambda: dict(**P.layer_facts(layers), nonzero_params=P.nonzero_params(model, layers),
                                      mask_bytes=P.mask_bytes(layers), pattern_holds=all(
                                          pattern_holds(m_.weight_mask, n, m) for _, m_ in layers)))


def nm_mask_of(module, n, m):
    return P.nm_mask(P.effective_weight(module), n, m)


def pattern_holds(mask: torch.Tensor, n: int, m: int) -> bool:
    """Every group of ``m`` along the input dimension has at least ``n`` zeros."""
    out_f, in_f = mask.shape
    return bool(((~mask).reshape(out_f, in_f // m, m).sum(-1) >= n).all())
