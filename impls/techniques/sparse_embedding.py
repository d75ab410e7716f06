"""Sparse embedding gradients: the token table's gradient holds only the rows of the tokens in the
batch, and SparseAdam updates only those rows.

A lookup ``x_t = E[i_t]`` has ∂L/∂E nonzero only on the rows i_t of the batch's tokens, so the
dense V×d gradient of an embedding table is mostly zeros when a step holds far fewer tokens than
the vocabulary (word2vec and fastText train this way; Mikolov et al. 2013, arXiv 1310.4546).
Library: ``nn.Embedding(sparse=True)`` makes autograd return a ``torch.sparse_coo`` gradient,
and ``torch.optim.SparseAdam`` applies Adam's update to the rows present (Kingma & Ba 2015; its
"lazy" variant: moments of absent rows are not decayed, so the update differs from dense Adam's
for rows not seen every step).  The rest of the model keeps the recipe's optimizer.

Bytes of the gradient, d features, fp32 values, torch's int64 indices:

* dense: V·d·4;
* sparse as autograd returns it: **uncoalesced**, one row per token *occurrence* (the
  embedding backward writes every position's gradient row without summing duplicates):
  n·d·4 + n·8 for the step's n tokens (indices are a 1×n int64 tensor);
* coalesced (what SparseAdam computes with, after ``grad.coalesce()``): u·d·4 + u·8 for the u
  distinct tokens.

So the stored gradient pays only while n·(4d + 8) < 4·V·d, i.e. tokens per step below about
the vocabulary size: a byte-level vocabulary (256) with a 1024-token step is *larger* sparse.
``technique_notes["sparse_embedding"]`` records the measured bytes of the first step's gradient
against these formulas.

Needs an untied table (``model_args tie_embeddings=false``): a tied table is also the LM head,
whose gradient ∂L/∂W = Σ δ·hᵀ is dense over the whole vocabulary, so the sum is dense.  The
optimizer is split with the build's optimizer-wrapper extension point: the engine's optimizer
(built from all parameters) loses the table, and :class:`SplitOptimizer` steps both.  Weight
decay: SparseAdam has none, so the table is no longer decayed.  Gradient clipping is refused:
``torch.linalg.vector_norm`` has no sparse kernel.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ..measure.memory import tensor_bytes
from ..optimizers import ADAM_BETAS

NAME = "sparse_embedding"
STAGE = "optimizer"
OPTIONS: dict = {}
CONFLICTS = {
    "zero": "DeepSpeed's engine builds its own partitioned optimizer: the SparseAdam split cannot apply",
    "onebit": "DeepSpeed's engine builds its own optimizer: the SparseAdam split cannot apply",
}


def check_model(cfg, seq_len, options):
    if cfg.tie_embeddings:
        raise ConfigError("sparse_embedding needs an untied embedding (model_args tie_embeddings=false): the tied "
                          "table is also the LM head, whose gradient is dense over the whole vocabulary")


def check_recipe(recipe, options):
    if recipe.optimizer not in ("adam", "adamw"):
        raise ConfigError(f"sparse_embedding updates the table with SparseAdam (Adam's update): the rest of the model "
                          f"must use adam or adamw, got optimizer {recipe.optimizer!r}")
    if recipe.grad_clip is not None:
        raise ConfigError(f"sparse_embedding cannot run with grad_clip={recipe.grad_clip}: the global norm needs "
                          f"torch.linalg.vector_norm, which has no kernel for the sparse gradient")


class SplitOptimizer:
    """The recipe's optimizer for every parameter but the table, SparseAdam for the table: one
    object with the optimizer interface the engine uses (param_groups, state, step, zero_grad,
    state_dict)."""

    def __init__(self, dense: torch.optim.Optimizer, sparse: torch.optim.Optimizer):
        self.dense, self.sparse = dense, sparse

    @property
    def param_groups(self) -> list[dict]:
        return self.dense.param_groups + self.sparse.param_groups  # the groups themselves: lr set on both

    @property
    def state(self) -> dict:
        return {**self.dense.state, **self.sparse.state}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none=set_to_none)
        self.sparse.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        self.dense.step()
        self.sparse.step()

    def state_dict(self) -> dict:
        return dict(dense=self.dense.state_dict(), sparse=self.sparse.state_dict())

    def load_state_dict(self, state: dict) -> None:
        self.dense.load_state_dict(state["dense"])
        self.sparse.load_state_dict(state["sparse"])


def split(optimizer: torch.optim.Optimizer, table: torch.nn.Parameter) -> SplitOptimizer:
    if optimizer.state:
        raise ValueError("sparse_embedding must split the optimizer before its first step")
    lr = optimizer.param_groups[0]["lr"]
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if p is not table]
    return SplitOptimizer(optimizer, torch.optim.SparseAdam([table], lr=lr, betas=ADAM_BETAS, eps=1e-8))


def grad_bytes(grad: torch.Tensor, vocab: int, d: int, tokens: int) -> dict:
    """The table gradient's measured bytes against the dense and sparse formulas."""
    measured = tensor_bytes([grad])
    dense = vocab * d * 4
    rows = grad._nnz() if grad.is_sparse else vocab
    unique = int(torch.unique(grad._indices()).numel()) if grad.is_sparse else vocab
    uncoalesced = tokens * (4 * d + 8)
    coalesced = unique * (4 * d + 8)
    return dict(layout=str(grad.layout), measured_bytes=measured, dense_bytes=dense, rows=rows, tokens=tokens,
                unique_tokens=unique, formula_bytes=uncoalesced, measured_over_formula=measured / uncoalesced,
                coalesced_formula_bytes=coalesced, sparse_over_dense=measured / dense,
                coalesced_over_dense=coalesced / dense,
                pays_below_tokens_per_step=4 * vocab * d / (4 * d + 8))


def apply(build, options):
    model = build.model
    table = model.tok_emb
    table.sparse = True  # F.embedding(..., sparse=True): the documented switch of nn.Embedding
    build.wrap_optimizer(lambda optimizer, _build: split(optimizer, table.weight))
    seen: dict = {}

    def count_tokens(x, y, step):
        seen.setdefault("tokens", x.numel())
        return x, y

    def measure(step):
        if "grad" not in seen and table.weight.grad is not None:
            seen["grad"] = grad_bytes(table.weight.grad, table.num_embeddings, table.embedding_dim,
                                      seen.get("tokens", 0))

    build.add_hook("on_batch", count_tokens)
    build.add_hook("before_step", measure)
    build.notes[NAME] = dict(optimizer="SparseAdam for tok_emb, the recipe's optimizer for the rest")
    build.describe(NAME, lambda: dict(embedding_grad=seen.get("grad")))
