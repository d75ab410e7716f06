"""The ZeRO paper's model-state and communication formulas, and memory tables of big zoo models.

Rajbhandari, Rasley, Ruwase & He, "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models" (SC 2020, arXiv 1910.02054).  Ψ is the number of trainable parameters, N_d
the data-parallel degree, and a parameter costs ``p_b`` bytes of weights, ``g_b`` bytes of
gradient and ``K`` bytes of optimizer state.  Per rank (§3.1, §5, Fig. 1):

=====  ===================  ==========================  ===============================================
stage  ZeRO name            what is partitioned         bytes per rank
=====  ===================  ==========================  ===============================================
0      baseline (DDP)       nothing                     p_b·Ψ + g_b·Ψ + K·Ψ
1      P_os                 optimizer states            p_b·Ψ + g_b·Ψ + K·Ψ/N_d
2      P_os+g               + gradients                 p_b·Ψ + (g_b + K)·Ψ/N_d
3      P_os+g+p             + parameters                (p_b + g_b + K)·Ψ/N_d
=====  ===================  ==========================  ===============================================

Mixed-precision Adam (the paper's case): 16-bit parameters and gradients (p_b = g_b = 2) and
K = 12 (fp32 master weights 4 + momentum 4 + variance 4), so 16Ψ → 4Ψ + 12Ψ/N_d → 2Ψ + 14Ψ/N_d
→ 16Ψ/N_d.  Worked example of Fig. 1 (Ψ = 7.5B, N_d = 64): 120 GB, 31.4 GB, 16.6 GB, 1.9 GB.
fp32 training (parameters fp32, autocast or not): p_b = g_b = 4 and K is the optimizer's own
state, no master copy: 4Ψ + 4Ψ + 8Ψ for Adam.

K of each etbench optimizer (``impls.optimizers``), fp32 parameters; with low-precision
parameters (``StepPlan.low_precision_params``) the fp32 master copy adds 4:

=========  =========  =====================================================================
optimizer  K (fp32)   note
=========  =========  =====================================================================
adam       8          momentum + variance; + 4 B per *tensor* (``step``), not in the formula
adamw      8          as adam
lamb       8          as adam; + 12 B per tensor (norms, trust ratio), not in the formula
sgd        4          momentum buffer (etbench's SGD always has momentum 0.9; SGD without
                      momentum would be K = 0 — not an etbench optimizer)
nesterov   4          momentum buffer
lars       4          momentum buffer
lion       4          one momentum
adamw8bit  ≈ 2.03     APPROXIMATE: 2 B (two 8-bit moments) + 8 B per 256-element block (fp32
                      absmax of both moments) = 2 + 1/32; tensors under ``min_8bit_size``
                      (4096 elements) keep 8 B/param fp32 state, and 2 KiB of quantization maps
                      come once — a small model's measured bytes can exceed the formula a lot
adafactor  —          factored second moment, O(n + m) per n×m matrix: not a multiple of Ψ,
                      NOT COVERED (:func:`bytes_per_param` returns None)
=========  =========  =====================================================================

Communication per rank per step (§7): plain data parallelism all-reduces the gradients, which
the paper counts as 2Ψ elements (an all-reduce is a reduce-scatter plus an all-gather, each
moving Ψ); ZeRO-1/2 reduce-scatter the gradients (Ψ) and all-gather the updated parameters (Ψ):
also 2Ψ; ZeRO-3 all-gathers the parameters in the forward and again in the backward and
reduce-scatters the gradients: 3Ψ (1.5×).  The paper's 2Ψ ignores the ring factor (N_d − 1)/N_d
(a rank sends (N_d − 1)/N_d of a reduce-scatter's or all-gather's data); :func:`comm_volume`
gives both, and the collective payloads (the size of the tensors handed to the collectives, an
all-reduce counted once), so whichever convention a byte counter uses has its formula.

Cross-checking measured bytes (:func:`check`): the measured per-rank bytes (the maximum over
ranks of the engine's exact ``params_bytes``, ``grads_bytes`` and ``optimizer_bytes``) should be
within :data:`TOLERANCE` (2%) of the formula with the model's Ψ.  Known reasons for a larger
difference, to be explained, not hidden: shard padding (FSDP2 pads dim 0 of each tensor to a
multiple of N_d; DeepSpeed aligns its flat partitions), per-tensor optimizer scalars on a tiny
model, 8-bit block constants and fp32 fallbacks, gradients freed (``set_to_none``) before the
bytes were read, and engines that keep more than the paper: DeepSpeed's 16-bit optimizers hold
an fp32 gradient partition too (its estimator ``estimate_zero2_model_states_mem_needs`` counts
2Ψ + 18Ψ/N_d for ZeRO-2: 2 + 4 + 4 + 8 bytes per partitioned parameter, 4 more than K = 12 + 2);
:func:`deepspeed_estimate` calls DeepSpeed's estimators and states the difference.

``python -m impls.measure.model_states [--models ...] [--n-d ...] [--json F]`` prints the memory
table of :func:`memory_table` (model states only; activations, buffers, fragmentation and the
framework's workspace come on top).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence

from ..errors import ConfigError

#: |measured / formula − 1| accepted by :func:`check` (per component and in total).
TOLERANCE = 0.02
GIB = 1 << 30

SOURCE = ("Rajbhandari et al. 2020, ZeRO (arXiv 1910.02054), §3.1 and §5/Fig. 1 (model states), "
          "§7 (communication)")

#: stage -> (short name, what is partitioned) in the paper's terms.
STAGES: dict[int, tuple[str, str]] = {
    0: ("DDP", "baseline: nothing partitioned (data parallelism)"),
    1: ("ZeRO-1 P_os", "optimizer states partitioned"),
    2: ("ZeRO-2 P_os+g", "optimizer states and gradients partitioned"),
    3: ("ZeRO-3 P_os+g+p", "optimizer states, gradients and parameters partitioned"),
}

#: Optimizer-state bytes per parameter with fp32 parameters (see the module table).  None: the
#: state is not a multiple of Ψ (Adafactor's factored moments).
K_FP32: dict[str, float | None] = {
    "sgd": 4.0, "nesterov": 4.0, "adam": 8.0, "adamw": 8.0, "adafactor": None, "lamb": 8.0,
    "lars": 4.0, "lion": 4.0, "adamw8bit": 2.0 + 8.0 / 256,
}
#: Optimizers whose K is an approximation, with the reason.
APPROXIMATE: dict[str, str] = {
    "adamw8bit": "8-bit moments + fp32 absmax per 256-element block; tensors under min_8bit_size (4096 elements) "
                 "keep fp32 state (8 B/param) and the quantization maps (2 KiB) come once",
    "lamb": "12 B per tensor of norms and trust ratio not counted",
}
NOT_COVERED: dict[str, str] = {
    "adafactor": "Adafactor's factored second moment is O(n+m) per n×m matrix, not a multiple of Ψ: "
                 "the ZeRO formulas do not cover it",
}
#: The fp32 master copy of the weights kept in the optimizer state when parameters are 16-bit.
MASTER_BYTES = 4.0
LOW_PRECISION_BYTES = 2.0  # bf16 and fp16 alike

COMPONENTS = ("params", "grads", "optimizer")


def _check_args(psi, n_d, stage) -> None:
    if not isinstance(psi, (int, float)) or isinstance(psi, bool) or not psi >= 0 or math.isinf(psi):
        raise ConfigError(f"Ψ (trainable parameters) must be a finite number >= 0, got {psi!r}")
    if not isinstance(n_d, int) or isinstance(n_d, bool) or n_d < 1:
        raise ConfigError(f"N_d (data-parallel degree) must be an integer >= 1, got {n_d!r}")
    if stage not in STAGES:
        raise ConfigError(f"sharding stage {stage!r} is not one of {', '.join(map(str, STAGES))} "
                          "(0 DDP, 1 P_os, 2 P_os+g, 3 P_os+g+p)")


def formula(psi: float, n_d: int, stage: int, *, param_bytes: float = 2.0, grad_bytes: float = 2.0,
            k: float = 12.0) -> dict[str, float]:
    """Per-rank model-state bytes of ZeRO ``stage`` (0..3) for ``psi`` trainable parameters over
    ``n_d`` data-parallel ranks: ``{"params", "grads", "optimizer", "total"}`` (floats, bytes).
    Defaults are the paper's mixed-precision Adam (2, 2, K = 12)."""
    _check_args(psi, n_d, stage)
    params = param_bytes * psi / (n_d if stage >= 3 else 1)
    grads = grad_bytes * psi / (n_d if stage >= 2 else 1)
    optimizer = k * psi / (n_d if stage >= 1 else 1)
    return {"params": float(params), "grads": float(grads), "optimizer": float(optimizer),
            "total": float(params + grads + optimizer)}


def bytes_per_param(optimizer: str, low_precision_params: bool = False,
                    autocast: bool = False) -> tuple[float, float, float] | None:
    """``(p_b, g_b, K)`` for an etbench optimizer: fp32 parameters and gradients (4, 4) with the
    optimizer's own state, or, with ``low_precision_params`` (16-bit weights and gradients, which
    needs a 16-bit ``autocast`` dtype), (2, 2) and K + 4 for the fp32 master copy.  Autocast over
    fp32 parameters changes no model-state bytes.  None for an optimizer the formulas do not
    cover (:data:`NOT_COVERED`); ConfigError for an unknown name."""
    if optimizer not in K_FP32:
        raise ConfigError(f"unknown optimizer {optimizer!r}; valid: {', '.join(K_FP32)}")
    if low_precision_params and not autocast:
        raise ConfigError("low_precision_params needs a 16-bit (bf16/fp16) autocast dtype: "
                          "parameters stored in 16 bits are what the autocast dtype names")
    k = K_FP32[optimizer]
    if k is None:
        return None
    if low_precision_params:
        return LOW_PRECISION_BYTES, LOW_PRECISION_BYTES, k + MASTER_BYTES
    return 4.0, 4.0, k


def _measured(measured: Mapping) -> dict[str, float | None]:
    """``params``/``grads``/``optimizer`` from an engine's ``state_bytes()`` keys (``*_bytes``) or
    the short names; ``total`` their sum (None where any is missing)."""
    out = {}
    for name in COMPONENTS:
        value = measured.get(f"{name}_bytes", measured.get(name))
        out[name] = None if value is None else float(value)
    out["total"] = None if any(out[c] is None for c in COMPONENTS) else sum(out[c] for c in COMPONENTS)
    return out


def check(measured: Mapping, psi: float, n_d: int, stage: int, *, param_bytes: float = 2.0,
          grad_bytes: float = 2.0, k: float | None = 12.0, tolerance: float = TOLERANCE,
          optimizer: str | None = None) -> dict:
    """Measured per-rank model-state bytes against :func:`formula` (the record's
    ``model_states`` block).

    ``measured``: ``params_bytes``, ``grads_bytes``, ``optimizer_bytes`` (each the maximum over
    ranks).  Returns the inputs (``psi``, ``n_d``, ``stage``, ``stage_name``, ``param_bytes``,
    ``grad_bytes``, ``k``, ``optimizer``), ``formula`` and ``measured`` (params, grads,
    optimizer, total), ``ratio`` (measured / formula per component and total; None where the
    formula is 0 or a value is missing), ``tolerance``, ``within_tolerance`` (per component: is
    |ratio − 1| <= tolerance) and ``ok`` (all of them).  With ``k`` None (an optimizer the
    formulas do not cover) the formula and ratios are None and ``covered`` is False."""
    _check_args(psi, n_d, stage)
    block = {"source": SOURCE, "psi": psi, "n_d": n_d, "stage": stage, "stage_name": STAGES[stage][0],
             "optimizer": optimizer, "param_bytes": param_bytes, "grad_bytes": grad_bytes, "k": k,
             "measured": _measured(measured), "tolerance": tolerance}
    if optimizer in APPROXIMATE:
        block["approximate"] = APPROXIMATE[optimizer]
    if k is None:
        reason = NOT_COVERED.get(optimizer, "the optimizer's state is not a multiple of Ψ")
        return {**block, "covered": False, "reason": reason, "formula": None, "ratio": None,
                "within_tolerance": None, "ok": None}
    expected = formula(psi, n_d, stage, param_bytes=param_bytes, grad_bytes=grad_bytes, k=k)
    ratio, within = {}, {}
    for name in (*COMPONENTS, "total"):
        m, f = block["measured"][name], expected[name]
        ratio[name] = None if m is None or f == 0 else m / f
        within[name] = None if ratio[name] is None else abs(ratio[name] - 1.0) <= tolerance
    ok = all(v for v in within.values() if v is not None) and any(v is not None for v in within.values())
    return {**block, "covered": True, "formula": expected, "ratio": ratio, "within_tolerance": within, "ok": ok}


def check_run(measured: Mapping, psi: float, n_d: int, stage: int, *, optimizer: str,
              low_precision_params: bool = False, autocast: bool = False,
              tolerance: float = TOLERANCE) -> dict:
    """:func:`check` with ``(p_b, g_b, K)`` from :func:`bytes_per_param` of the run's optimizer and
    precision (what the lead puts in ``record["model_states"]``)."""
    per_param = bytes_per_param(optimizer, low_precision_params, autocast)
    if per_param is None:  # not covered: keep the parameter and gradient widths, no K
        width = LOW_PRECISION_BYTES if low_precision_params else 4.0
        per_param = (width, width, None)
    p_b, g_b, k = per_param
    return check(measured, psi, n_d, stage, param_bytes=p_b, grad_bytes=g_b, k=k, tolerance=tolerance,
                 optimizer=optimizer)


# --------------------------------------------------------------------------------------------
# Communication
# --------------------------------------------------------------------------------------------

#: stage -> the collectives of one step: (operation, what, paper weight).  The paper counts an
#: all-reduce of Ψ as 2Ψ (reduce-scatter + all-gather), a reduce-scatter or all-gather as Ψ.
COLLECTIVES: dict[int, tuple[tuple[str, str, int], ...]] = {
    0: (("all_reduce", "gradients", 2),),
    1: (("reduce_scatter", "gradients", 1), ("all_gather", "updated parameters", 1)),
    2: (("reduce_scatter", "gradients", 1), ("all_gather", "updated parameters", 1)),
    3: (("all_gather", "parameters (forward)", 1), ("all_gather", "parameters (backward)", 1),
        ("reduce_scatter", "gradients", 1)),
}


def comm_volume(psi: float, n_d: int, stage: int, *, grad_bytes: float = 2.0,
                param_bytes: float | None = None) -> dict:
    """Per-rank communication of one optimizer step (ZeRO §7), in three conventions.

    * ``elements``: the paper's volume, 2Ψ (stages 0-2) or 3Ψ (stage 3), all-reduce = 2Ψ;
    * ``bytes``: ``elements`` in bytes (gradients at ``grad_bytes``, gathered parameters at
      ``param_bytes``, default ``grad_bytes``), no ring factor — the paper's convention;
    * ``ring_factor`` (N_d − 1)/N_d and ``ring_bytes`` = bytes × ring_factor: what each rank
      actually sends (and receives) with ring/bandwidth-optimal collectives (0 for one rank);
    * ``payload_bytes``: the sizes of the tensors handed to the collectives, an all-reduce
      counted once (Ψ for DDP, 2Ψ for ZeRO-1/2, 3Ψ for ZeRO-3, in bytes) — what a counter of
      collective call sizes sees.

    ``collectives`` lists the operations with their elements and bytes."""
    _check_args(psi, n_d, stage)
    param_bytes = grad_bytes if param_bytes is None else param_bytes
    collectives, elements, nbytes, payload = [], 0.0, 0.0, 0.0
    for op, what, weight in COLLECTIVES[stage]:
        width = grad_bytes if what == "gradients" else param_bytes
        collectives.append({"op": op, "what": what, "elements": float(psi), "bytes": float(psi * width),
                            "paper_weight": weight})
        elements += weight * psi
        nbytes += weight * psi * width
        payload += psi * width
    ring = (n_d - 1) / n_d
    return {"source": SOURCE, "psi": psi, "n_d": n_d, "stage": stage, "stage_name": STAGES[stage][0],
            "grad_bytes": grad_bytes, "param_bytes": param_bytes, "collectives": collectives,
            "elements": float(elements), "bytes": float(nbytes), "ring_factor": ring,
            "ring_bytes": float(nbytes * ring), "payload_bytes": float(payload),
            "multiple_of_psi": elements / psi if psi else None}


def comm_check(measured_bytes: float, psi: float, n_d: int, stage: int, *, grad_bytes: float = 2.0,
               param_bytes: float | None = None) -> dict:
    """Measured per-rank bytes of one step against :func:`comm_volume`: ``formula``,
    ``measured_bytes`` and the ratio to each convention (``ratio_paper``, ``ratio_ring``,
    ``ratio_payload``; None where that formula is 0)."""
    f = comm_volume(psi, n_d, stage, grad_bytes=grad_bytes, param_bytes=param_bytes)

    def ratio(d):
        return None if measured_bytes is None or not d else float(measured_bytes) / d

    return {"formula": f, "measured_bytes": measured_bytes, "ratio_paper": ratio(f["bytes"]),
            "ratio_ring": ratio(f["ring_bytes"]), "ratio_payload": ratio(f["payload_bytes"])}


# --------------------------------------------------------------------------------------------
# DeepSpeed's own estimators, next to the paper
# --------------------------------------------------------------------------------------------

DEEPSPEED_DIFFERENCE = {
    2: "DeepSpeed's estimate_zero2_model_states_mem_needs counts 2Ψ + 18Ψ/N_d per GPU: 16-bit parameters (2, "
       "replicated) and per partitioned parameter 2 (16-bit gradients) + 4 (fp32 gradients) + 4 (fp32 master "
       "weights) + 8 (Adam moments); the paper's 2Ψ + 14Ψ/N_d has no fp32 gradient partition: the difference is "
       "4Ψ/N_d, the fp32 copy of the gradient partition DeepSpeed's optimizer step works on",
    3: "DeepSpeed's estimate_zero3_model_states_mem_needs counts 18Ψ/N_d + 4·(largest layer's parameters) per GPU: "
       "the same 18 bytes per partitioned parameter as ZeRO-2 (16-bit parameters partitioned too: 2 + 2 + 4 + 4 + 8) "
       "and the largest layer gathered in 16 bits with its gradient; the paper's 16Ψ/N_d has neither the fp32 "
       "gradient partition (4Ψ/N_d) nor the gathered layer",
}


def largest_layer_params(model: str, **overrides) -> int:
    """The most parameters any one module of a zoo model holds itself (not its children), as
    DeepSpeed's ``estimate_zero3_model_states_mem_needs_all_live`` counts them; built on ``meta``."""
    from .. import zoo

    module = zoo.build(model, device="meta", **overrides)
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0)


def deepspeed_estimate(psi: int, n_d: int, stage: int, *, largest_layer_params: int = 0) -> dict | None:
    """DeepSpeed's own per-GPU model-state estimate (``estimate_zero2_model_states_mem_needs`` /
    ``estimate_zero3_model_states_mem_needs``, no offload, one node of ``n_d`` GPUs) next to the
    paper's mixed-precision Adam formula: ``{"deepspeed_bytes", "paper_bytes", "ratio",
    "difference_bytes", "explanation"}``; None for stages DeepSpeed gives no estimator for (0, 1).
    Imports DeepSpeed (seconds)."""
    _check_args(psi, n_d, stage)
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, gpu = estimate_zero2_model_states_mem_needs(int(psi), num_gpus_per_node=n_d, num_nodes=1, cpu_offload=False)
    elif stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, gpu, _ = estimate_zero3_model_states_mem_needs(int(psi), int(largest_layer_params), num_gpus_per_node=n_d,
                                                          num_nodes=1, cpu_offload=False, cpu_offload_params=False)
    else:
        return None
    paper = formula(psi, n_d, stage)["total"]
    return {"stage": stage, "n_d": n_d, "psi": psi, "largest_layer_params": largest_layer_params,
            "deepspeed_bytes": float(gpu), "paper_bytes": paper, "ratio": gpu / paper if paper else None,
            "difference_bytes": float(gpu) - paper, "explanation": DEEPSPEED_DIFFERENCE[stage]}


# --------------------------------------------------------------------------------------------
# Memory tables of big models (meta device)
# --------------------------------------------------------------------------------------------

def trainable_params(model: str, **overrides) -> int:
    """Ψ of a zoo model: distinct parameters with ``requires_grad``, built on ``meta`` (nothing
    allocated, so Llama-7B counts on a laptop)."""
    from .. import zoo

    module = zoo.build(model, device="meta", **overrides)
    seen, n = set(), 0
    for p in module.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


MEMORY_TABLE_NOTE = ("Model states only (parameters, gradients, optimizer state per rank, mixed-precision Adam: "
                     "2Ψ + 2Ψ + 12Ψ as the ZeRO paper counts them); activations, temporary buffers, "
                     "communication buckets and allocator fragmentation come on top, so 'fits' is necessary, "
                     "not sufficient. Offload: ZeRO-Offload keeps the optimizer state (KΨ/N_d per rank, fp32 "
                     "master weights included) in host memory; the GPU keeps parameters and gradients (DeepSpeed "
                     "also streams gradient partitions to the host for the CPU update).")


def memory_table(models: Sequence[str] = ("gpt2-xl", "llama-7b"), n_ds: Sequence[int] = (1, 8, 64, 1024),
                 gpu_bytes: float = 80e9, *, optimizer: str = "adamw") -> list[dict]:
    """One row per model × stage × N_d: Ψ from the ``meta`` device, per-rank model-state bytes
    and GiB in mixed precision (16-bit parameters, fp32 master weights and ``optimizer`` state),
    whether they fit in ``gpu_bytes`` (80 GB: an H100/A100-80GB), and with the optimizer state
    offloaded to the host (ZeRO-Offload): GPU and host GiB per rank and whether the GPU part fits.
    See :data:`MEMORY_TABLE_NOTE` for what the numbers leave out."""
    if not models:
        raise ConfigError("no model given for the memory table")
    if not n_ds or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in n_ds):
        raise ConfigError(f"N_d values must be integers >= 1, got {list(n_ds)!r}")
    if not (isinstance(gpu_bytes, (int, float)) and gpu_bytes > 0 and math.isfinite(gpu_bytes)):
        raise ConfigError(f"GPU memory must be a positive number of bytes, got {gpu_bytes!r}")
    per_param = bytes_per_param(optimizer, low_precision_params=True, autocast=True)
    if per_param is None:
        raise ConfigError(f"optimizer {optimizer!r}: {NOT_COVERED[optimizer]}")
    p_b, g_b, k = per_param
    from .. import zoo

    for model in models:
        zoo.config(model)  # a bad name fails here, before any row is computed
    rows = []
    for model in models:
        psi = trainable_params(model)
        for stage, (name, _) in STAGES.items():
            for n_d in n_ds:
                f = formula(psi, n_d, stage, param_bytes=p_b, grad_bytes=g_b, k=k)
                gpu_offload = f["params"] + f["grads"]
                rows.append({
                    "model": model, "psi": psi, "stage": stage, "technique": name, "n_d": n_d,
                    "param_bytes": p_b, "grad_bytes": g_b, "k": k,
                    "params_bytes": f["params"], "grads_bytes": f["grads"], "optimizer_bytes": f["optimizer"],
                    "total_bytes": f["total"],
                    "params_gib": f["params"] / GIB, "grads_gib": f["grads"] / GIB,
                    "optimizer_gib": f["optimizer"] / GIB, "total_gib": f["total"] / GIB,
                    "total_gb": f["total"] / 1e9, "gpu_bytes": gpu_bytes, "fits": f["total"] <= gpu_bytes,
                    "offload_gpu_gib": gpu_offload / GIB, "offload_host_gib": f["optimizer"] / GIB,
                    "offload_fits": gpu_offload <= gpu_bytes,
                })
    return rows


def memory_table_markdown(rows: Sequence[dict]) -> str:
    """The memory table as GitHub markdown, one line per model × stage with a column per N_d
    (total GiB per rank, ✓/✗ fits), then the offload GiB; the caveats below."""
    if not rows:
        return ""
    n_ds = list(dict.fromkeys(r["n_d"] for r in rows))
    gpu_gb = rows[0]["gpu_bytes"] / 1e9
    header = (["model", "Ψ", "technique"] + [f"N_d={n}: GiB/rank (fits {gpu_gb:g} GB)" for n in n_ds]
              + [f"offload N_d={n}: GPU / host GiB" for n in n_ds])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (2 * len(n_ds))) + "|"]
    groups: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["psi"], r["technique"]), {})[r["n_d"]] = r
    for (model, psi, technique), by_n in groups.items():
        cells = [model, f"{psi / 1e9:.3f}B", technique]
        cells += [f"{by_n[n]['total_gib']:,.2f} {'✓' if by_n[n]['fits'] else '✗'}" for n in n_ds]
        cells += [f"{by_n[n]['offload_gpu_gib']:,.2f} / {by_n[n]['offload_host_gib']:,.2f}"
                  f" {'✓' if by_n[n]['offload_fits'] else '✗'}" for n in n_ds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + MEMORY_TABLE_NOTE + "\n"


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"etbench: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"N_d {text!r} is not an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"N_d {text!r} is not an integer >= 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"--gpu-gb {text!r} is not a positive number")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m impls.measure.model_states [--models M ...] [--n-d N ...] [--gpu-gb G]
    [--optimizer O] [--json FILE]``: print the memory table; bad input is one line, exit 2."""
    from .. import zoo
    from ..errors import WriteError
    from ..files import check_writable, write_text

    parser = _OneLineParser(prog="python -m impls.measure.model_states",
                            description="Per-rank model-state memory of zoo models under DDP and ZeRO 1/2/3 "
                                        "(Rajbhandari et al. 2020), counted on the meta device.")
    parser.add_argument("--models", nargs="+", default=["gpt2-xl", "llama-7b"], metavar="MODEL",
                        help=f"zoo models (valid: {', '.join(zoo.CONFIGS)})")
    parser.add_argument("--n-d", nargs="+", type=_positive_int, default=[1, 8, 64, 1024], metavar="N",
                        help="data-parallel degrees")
    parser.add_argument("--gpu-gb", type=_positive_float, default=80.0, help="GPU memory in GB (1e9 bytes)")
    parser.add_argument("--optimizer", default="adamw", help=f"valid: {', '.join(k for k, v in K_FP32.items() if v)}")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON (atomically)")
    args = parser.parse_args(argv)
    try:
        bad = [m for m in args.models if m not in zoo.CONFIGS]
        if bad:
            raise ConfigError(f"unknown model {bad[0]!r}; valid: {', '.join(zoo.CONFIGS)}")
        if args.json is not None:
            check_writable(args.json)
        rows = memory_table(tuple(args.models), tuple(args.n_d), args.gpu_gb * 1e9, optimizer=args.optimizer)
    except ConfigError as exc:
        print(f"etbench: error: {exc}", file=sys.stderr)
        return 2
    print(memory_table_markdown(rows), end="")
    if args.json is not None:
        try:
            write_text(args.json, json.dumps({"source": SOURCE, "note": MEMORY_TABLE_NOTE, "rows": rows}, indent=1))
        except WriteError as exc:
            print(f"etbench: error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


def tp_comm_volume(n_layer: int, tokens: int, d_model: int, t: int, *, activation_bytes: float = 4.0) -> dict:
    """Per-rank tensor-parallel traffic of one step (Shoeybi et al. 2019, §3): per layer and
    micro-batch, 2 all-reduces in forward and 2 in backward of the (b, s, h) activation, i.e.
    4·L·(tokens·h) elements all-reduced, ``tokens`` = b·s summed over the step's micro-batches;
    a ring all-reduce moves 2(t−1)/t of it per rank.  Sequence parallelism replaces each
    all-reduce by a reduce-scatter plus an all-gather, (t−1)/t each: the same bytes (Korthikanti
    et al. 2022, §4.2.2)."""
    elements = 4 * n_layer * tokens * d_model
    ring_factor = 2 * (t - 1) / t if t > 1 else 0.0
    return dict(source="Shoeybi et al. 2019 (arXiv 1909.08053) §3: 2 all-reduces forward + 2 backward per layer",
                all_reduces=4 * n_layer, elements=elements, bytes=elements * activation_bytes,
                ring_factor=ring_factor, ring_bytes=elements * activation_bytes * ring_factor)
