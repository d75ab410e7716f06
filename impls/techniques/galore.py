"""GaLore: Adam with its moments in a rank-r projection of each matrix's gradient (Zhao et al.
2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML, arXiv
2403.03507).

All weights stay trainable at full rank; what is low-rank is the optimizer state.  For a block
matrix W (m×n) with gradient G, GaLore (Alg. 2) keeps an orthonormal projection P from the SVD
of G, recomputed every T steps (``update_proj_gap``), and runs Adam on the projected gradient

    R = G·Pᵀ  (m ≥ n: P = V_rᵀ, r×n)     or     R = Pᵀ·G  (m < n: P = U_r, m×r),

then projects the normalised update back, N = R̃·P (or P·R̃), and applies W ← W − η·α·N with
α the ``scale``.  Adam's two moments have R's shape, r·max(m, n) each, so the state of a matrix is

    4·(2r·max(m, n) + r·min(m, n)) bytes  (two fp32 moments + the projection P)

instead of AdamW's 8mn (+ 4 for its ``step`` tensor).  Ranks where that saves nothing
(2r·max + r·min >= 2mn, which includes r >= min(m, n)) are refused before any work.

Implementation: ``galore_torch.GaLoreAdamW`` (galore-torch 1.0, the authors' package): an AdamW
(from ``transformers``' implementation: bias correction on, decoupled weight decay applied after
the update, ε added to √v) whose parameter groups carrying ``rank``, ``update_proj_gap``,
``scale`` and ``proj_type`` are projected as above (``GaLoreProjector``, ``proj_type="std"``:
project the shorter side).  It replaces the recipe's AdamW in the optimizer stage (so the
recipe's optimizer must be ``adamw``), with the same betas (0.9, 0.95), ε 1e-8, learning rate
and weight decay groups: GaLore groups for the 2-D weights of the block Linears (``qkv``,
``proj``, ``up``, ``down``), plain AdamW for the rest (embedding/LM head, norms, biases).
Parameters of plain groups keep two moments but no ``step`` tensor (the library counts steps in
a Python int): 8 B per element.

The library keeps P inside a ``GaLoreProjector`` object in the optimizer state, where the
memory meter (which walks tensors in dicts and lists) would not see it; :class:`GaLoreAdamW`
also files the projector's matrix under ``state["projection"]`` after every step — the same
tensor, counted once — so the record's optimizer bytes include it.  The library's P is a slice
(``Vh[:r]`` or ``U[:, :r]``) of the SVD's factor, which keeps the whole min(m,n)² factor
allocated; the subclass clones it to its r rows or columns after the step that computed it, so
the persistent state is the formula's (the SVD's factors exist only during that step).  The SVDs and projections
run in the optimizer step, outside the counted FLOPs of forward and backward: model FLOPs stay
6N + 12·L·H·Q·T.
"""
from __future__ import annotations

import warnings

import torch

from ..errors import ConfigError
from . import lowrank

NAME = "galore"
STAGE = "optimizer"
RANK = 10  # replaces the recipe's optimizer; nothing else in this stage may wrap it (conflicts)
OPTIONS = {"rank": 8, "update_proj_gap": 200, "scale": 0.25}
REQUIRES = ("galore-torch", ("bitsandbytes", "galore_torch imports it"))
_SHARDED = "the optimizer would hold shards of the matrices, and GaLore's SVD of a shard's gradient is not the matrix's"
_OWN = "DeepSpeed builds its own optimizer; GaLore replaces the recipe's AdamW in the torch engine"
CONFLICTS = {
    "zero": _OWN, "onebit": _OWN,
    "oss": "oss shards the optimizer state by rebuilding the recipe's optimizer class per rank",
    "zero-redundancy": "ZeroRedundancyOptimizer shards the state by rebuilding the recipe's optimizer class per rank",
    "fsdp": _SHARDED, "fairscale-fsdp": _SHARDED, "tp": _SHARDED,
    "pp": "the pipeline engine builds one optimizer per stage itself",
    "lora": "LoRA freezes the block matrices GaLore projects",
    "lowrank": "lowrank replaces the dense block matrices with rank-r factors",
}


def configure(plan, options):
    if options["update_proj_gap"] < 1:
        raise ConfigError(f"galore:update_proj_gap={options['update_proj_gap']} is invalid; valid: an integer >= 1")
    if not options["scale"] > 0:
        raise ConfigError(f"galore:scale={options['scale']} is invalid; valid: a number > 0")
    plan.optimizer_state_formula = ("GaLore: projected Adam moments (2·r·n per m×n matrix) plus the m×r projection; "
                                    "checked against that formula in technique_notes['galore']")


def check_recipe(recipe, options):
    if recipe.optimizer != "adamw":
        raise ConfigError(f"galore projects AdamW's moments (GaLoreAdamW replaces the optimizer); optimizer="
                          f"{recipe.optimizer!r} given; valid: adamw")


def state_elements(m: int, n: int, r: int) -> int:
    """fp32 elements GaLore keeps for an m×n matrix: two moments of the projected gradient's
    shape (r·max(m, n) each) and the projection (r·min(m, n))."""
    return 2 * r * max(m, n) + r * min(m, n)


def check_model(cfg, seq_len, options):
    r = options["rank"]
    if r < 1:
        raise ConfigError(f"galore:rank={r} is invalid; valid: an integer >= 1")
    shapes = lowrank.target_shapes(cfg)
    for name, (m, n) in shapes.items():
        if state_elements(m, n, r) >= 2 * m * n:
            limit = min((2 * a * b - 1) // (2 * max(a, b) + min(a, b)) for a, b in shapes.values())
            raise ConfigError(f"galore:rank={r} saves no optimizer state on {name} ({m}×{n}: 2r·max + r·min = "
                              f"{state_elements(m, n, r)} >= 2mn = {2 * m * n} elements); valid for this model: "
                              f"rank in [1, {limit}]")


def _optimizer_class():
    with warnings.catch_warnings():  # galore_torch imports transformers
        warnings.simplefilter("ignore")
        import galore_torch

    class GaLoreAdamW(galore_torch.GaLoreAdamW):
        """galore-torch's GaLoreAdamW, with each projector's matrix kept at its own size and
        also filed in the optimizer state as a tensor (``state["projection"]``), where the memory
        meter sees it."""

        def step(self, closure=None):
            loss = super().step(closure)
            for group in self.param_groups:
                if "rank" not in group:
                    continue
                for p in group["params"]:
                    state = self.state.get(p)
                    if not state or "projector" not in state:
                        continue
                    projector = state["projector"]
                    matrix = projector.ortho_matrix
                    # The library keeps Vh[:r] or U[:, :r], a view that holds the whole
                    # min(m,n)-column SVD factor alive: keep only the r rows/columns.
                    if matrix.untyped_storage().nbytes() > matrix.numel() * matrix.element_size():
                        projector.ortho_matrix = matrix = matrix.clone()
                    state["projection"] = matrix
            return loss

    return GaLoreAdamW


def formula_bytes(galore_shapes: list[tuple[int, int]], other_elements: int, r: int) -> int:
    """The optimizer state bytes: 4·(2r·max + r·min) per projected matrix, 8 per element of the
    plain AdamW groups (no ``step`` tensors: the library counts steps in Python ints)."""
    return 4 * sum(state_elements(m, n, r) for m, n in galore_shapes) + 8 * other_elements


def apply(build, options):
    from ..optimizers import ADAM_BETAS, state_bytes_by_kind

    model = build.model
    r = options["rank"]
    matrices = []
    for name, parent, child in lowrank.targets(model):
        layer = getattr(parent, child)
        if not isinstance(getattr(layer, "weight", None), torch.Tensor) or layer.weight.dim() != 2:
            raise ConfigError(f"galore: {name} has no 2-D weight to project (another technique replaced it)")
        matrices.append((name, layer.weight))
    projected = {id(w) for _, w in matrices}
    holder: list = []
    cls = _optimizer_class()

    def replace(optimizer, _build):
        """GaLoreAdamW over the recipe's AdamW groups, the block matrices moved to GaLore groups."""
        if not isinstance(optimizer, torch.optim.AdamW):
            raise ConfigError(f"galore replaces an AdamW; the optimizer here is {type(optimizer).__name__}")
        lr = optimizer.defaults["lr"]
        groups = [dict(params=[p for p in g["params"] if id(p) not in projected], weight_decay=g["weight_decay"])
                  for g in optimizer.param_groups]
        decay = next(g["weight_decay"] for g in optimizer.param_groups if any(id(p) in projected for p in g["params"]))
        groups.append(dict(params=[w for _, w in matrices], weight_decay=decay, rank=r,
                           update_proj_gap=options["update_proj_gap"], scale=options["scale"], proj_type="std"))
        galore = cls([g for g in groups if g["params"]], lr=lr, betas=ADAM_BETAS, eps=1e-8,
                     no_deprecation_warning=True)
        holder.append(galore)
        return galore

    build.wrap_optimizer(replace)
    shapes = [tuple(w.shape) for _, w in matrices]
    build.notes[NAME] = dict(rank=r, update_proj_gap=options["update_proj_gap"], scale=options["scale"],
                             library="galore-torch GaLoreAdamW", proj_type="std", layers=[n for n, _ in matrices],
                             shapes=[list(s) for s in shapes], projected_params=sum(m * n for m, n in shapes),
                             projected_state_elements=sum(state_elements(m, n, r) for m, n in shapes),
                             adam_state_elements_of_projected=sum(2 * m * n for m, n in shapes))

    def describe():
        train = lowrank.trainable(model)
        params = model.num_params()
        other = sum(p.numel() for p in train if id(p) not in projected)
        notes = dict(params=params, trainable_params=sum(p.numel() for p in train),
                     frozen_params=params - sum(p.numel() for p in train))
        formula = formula_bytes(shapes, other, r)
        dense = 8 * sum(p.numel() for p in train) + 4 * len(train)  # torch AdamW's state for the same model
        measured = state_bytes_by_kind(holder[0])["total_bytes"] if holder else None
        notes.update(optimizer_bytes=measured, optimizer_formula_bytes=formula,
                     optimizer_formula="4·(2r·max(m,n) + r·min(m,n)) per projected matrix + 8 B per other element",
                     optimizer_ratio=measured / formula if measured is not None else None,
                     adamw_optimizer_bytes_formula=dense,
                     optimizer_vs_adamw=measured / dense if measured is not None else None)
        return notes

    build.describe(NAME, describe)
