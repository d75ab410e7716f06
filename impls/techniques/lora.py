"""LoRA: low-rank adapters trained on a frozen base (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models", arXiv 2106.09685).

Each adapted matrix W₀ (m×n) stays frozen and learns an update of rank r (§4.1, Eq. 3):

    h = W₀x + (α/r)·B A x,   A ∈ ℝ^{r×n} (Kaiming-uniform init), B ∈ ℝ^{m×r} (zero init)

so training starts from the base model exactly (BA = 0) and the trainable parameters are
r(m+n) per adapted matrix instead of mn; the optimizer holds state for those only (Adam:
8·r(m+n) bytes + 4 per tensor for ``step``, instead of 8·mn) and gradients exist only for them.
Everything else — embedding and the tied LM head, norms, biases, the adapted matrices
themselves — is frozen (``requires_grad=False``: the paper adapts the attention matrices and
freezes the rest; here the block Linears ``qkv``, ``proj``, ``up``, ``down`` are adapted).

LoRA is a fine-tuning method: it is meant to start from a trained base (``--init-from``).
Without one it trains adapters on the random initialisation — allowed, and the record's notes
say ``base: random``.

Implementation: Hugging Face ``peft`` (``inject_adapter_in_model`` with a ``LoraConfig``),
which replaces each targeted ``nn.Linear`` by its ``peft.tuners.lora.Linear`` holding the
original layer as ``base_layer`` plus ``lora_A``/``lora_B`` and marks only the adapters
trainable.  ``low_cpu_mem_usage=True`` makes peft create the adapters on ``meta``; each
layer's adapters are registered with ``build.own`` and initialised by peft's own
``reset_lora_parameters`` (the paper's init) from the run's seed.  The base weights are
untouched: the surgery runs after materialisation and after ``--init-from`` loaded them.

FLOPs.  The forward costs 2N_total per token (base and adapters); the backward needs the
gradients with respect to the activations through the frozen matrices too (2N_total) but weight
gradients only for the adapters (2N_adapter): with N_total = N_base + N_adapter, about
4N_base + 6N_adapter + 12·L·H·Q·T per token instead of 6N + 12·L·H·Q·T.  Neither 6N_total
(work that never runs: the frozen weight gradients) nor 6N_trainable (it ignores the forward and backward through the frozen base) is the
model's work, so the record's model FLOPs (MFU's numerator and the budget's unit) are the
*counted* FLOPs of a step (``plan.dense_compute = False``); the notes give the analytic
4N_base + 6N_adapter + 12LHQT per token beside them.  The two differ by a few percent either
way: the first block's ``qkv`` input needs no gradient (embedding and norm are frozen) and biases
and norms do no matmul (lower), while the counted SDPA backward includes the fused kernel's
recomputation (higher, growing with T) — the same differences the dense 6N has.  The record's ZeRO model-state check (``model_states``) counts Ψ =
trainable parameters, so the frozen base's bytes show as parameters beyond its formula.
"""
from __future__ import annotations

import functools
import warnings

import torch.nn as nn

from ..errors import ConfigError
from . import lowrank

NAME = "lora"
STAGE = "surgery"
RANK = 36  # after lowrank's slot (35; the two conflict), before MoD's block routing (40)
OPTIONS = {"rank": 8, "alpha": 16.0, "dropout": 0.0}
REQUIRES = ("peft",)
ADAPTER = "default"  # peft's adapter name
#: the block Linears peft adapts, as its full-match regex over module names (a MoD-routed block
#: holds its block as ``.block``)
TARGET_REGEX = r"blocks\.\d+\.(block\.)?(attn\.(qkv|proj)|mlp\.(up|down))"
CONFLICTS = {
    "lowrank": "lowrank replaces the dense block Linears LoRA adapts",
    "galore": "GaLore projects the gradients of the block matrices, which LoRA freezes",
    "moe": "moe replaces the MLPs with experts; LoRA adapts the dense MLP's up/down Linears",
    "mode": "mode replaces the MLPs with experts; LoRA adapts the dense MLP's up/down Linears",
    "tp": "tensor parallelism shards qkv/proj/up/down as nn.Linear; peft's LoRA layer wraps them",
}


def configure(plan, options):
    if not options["alpha"] > 0:
        raise ConfigError(f"lora:alpha={options['alpha']} is invalid; valid: a number > 0")
    if not 0 <= options["dropout"] < 1:
        raise ConfigError(f"lora:dropout={options['dropout']} is invalid; valid: a number in [0, 1)")
    # Frozen weights get no weight gradients: 6N would count work that never runs (see above).
    plan.dense_compute = False


def check_recipe(recipe, options):
    lowrank.check_fuse_jit(recipe, NAME)


def check_model(cfg, seq_len, options):
    r = options["rank"]
    if r < 1:
        raise ConfigError(f"lora:rank={r} is invalid; valid: an integer >= 1")
    for name, (m, n) in lowrank.target_shapes(cfg).items():
        if r * (m + n) >= m * n:
            limit = min(lowrank.largest_saving_rank(*shape) for shape in lowrank.target_shapes(cfg).values())
            raise ConfigError(f"lora:rank={r} trains as many parameters as the matrix on {name} ({m}×{n}: r(m+n) = "
                              f"{r * (m + n)} >= mn = {m * n}); valid for this model: rank in [1, {limit}]")


def lora_layers(model) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def analytic_flops_per_token(model, adapter_params: int, seq_len: int | None = None) -> dict:
    """4·N_base + 6·N_adapter (+ 12·L·H·Q·T when ``seq_len`` is given) per token: N_base the
    frozen base's matmul parameters as 6N counts them (the tied embedding as LM head, not the
    position table), N_adapter the adapters' r(m+n) summed."""
    cfg = model.cfg
    n_base = model.num_params(matmul_only=True) - adapter_params
    out = dict(n_base=n_base, n_adapter=adapter_params, per_token_no_attention=4 * n_base + 6 * adapter_params)
    if seq_len is not None:
        out["per_token"] = out["per_token_no_attention"] + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len
    return out


def apply(build, options):
    with warnings.catch_warnings():  # peft imports transformers, torchao, bitsandbytes: their import-time noise
        warnings.simplefilter("ignore")
        from peft import LoraConfig, inject_adapter_in_model

    model = build.model
    r = options["rank"]
    base_params = model.num_params()
    config = LoraConfig(r=r, lora_alpha=options["alpha"], lora_dropout=options["dropout"],
                        target_modules=TARGET_REGEX, bias="none", init_lora_weights=True)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER, low_cpu_mem_usage=True)
    layers = lora_layers(model)
    if not layers:
        raise ConfigError("lora: no block Linear (qkv, proj, up, down) found to adapt")
    adapter_params = 0
    for _, layer in layers:
        # The adapters peft created on meta: allocated and initialised by peft's own init
        # (A Kaiming-uniform, B zero) once the build owns them.
        adapters = nn.ModuleList([layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]])
        build.own(adapters, init=functools.partial(layer.reset_lora_parameters, ADAPTER, True))
        adapter_params += r * (layer.in_features + layer.out_features)
    holder = lowrank.capture_optimizer(build)
    base = f"trained (--init-from {build.init_from['path']})" if build.init_from else "random (no --init-from)"
    build.notes[NAME] = dict(rank=r, alpha=options["alpha"], scaling=options["alpha"] / r, dropout=options["dropout"],
                             base=base, library="peft", targets=[t[1] for t in lowrank.TARGETS],
                             layers=[name for name, _ in layers],
                             shapes=[[layer.out_features, layer.in_features] for _, layer in layers],
                             adapter_params=adapter_params,
                             adapted_dense_params=sum(l.in_features * l.out_features for _, l in layers),
                             base_params=base_params,
                             model_flops="counted (frozen weights get no weight gradients); analytic "
                                         "4N_base + 6N_adapter + 12LHQT per token beside it")

    def describe():
        train = lowrank.trainable(model)
        n_train = sum(p.numel() for p in train)
        params = model.num_params()
        notes = dict(params=params, trainable_params=n_train, frozen_params=params - n_train,
                     trainable_vs_base=n_train / base_params,
                     analytic_flops=analytic_flops_per_token(model, adapter_params),
                     **lowrank.optimizer_check(holder, train, build.plan))
        # What full fine-tuning's Adam would hold for the adapted matrices: 8·mn each.
        notes["full_finetune_adam_bytes_adapted"] = 8 * build.notes[NAME]["adapted_dense_params"]
        return notes

    build.describe(NAME, describe)
