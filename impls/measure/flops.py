"""FLOPs: counted (hardware) and analytic (model).

*Counted* FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` over one eager training
step, so they include whatever the step really executes: recomputation from activation
checkpointing counts, which makes them the numerator of HFU.  *Model* FLOPs are the analytic
6N + 12·L·H·Q·T per token of PaLM (Chowdhery et al. 2022, App. B), which ignore recomputation:
the numerator of MFU (Korthikanti et al. 2022 make the same split).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
from torch.utils.flop_counter import (FlopCounterMode, register_flop_formula, sdpa_backward_flop_count,
                                      sdpa_flop_count)

_aten = torch.ops.aten


# torch 2.13 registers formulas for the CUDA SDPA kernels only; without these two, attention
# FLOPs on a CPU silently count as zero.
@register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)
def _sdpa_cpu_flop(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


@register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=True)
def _sdpa_cpu_backward_flop(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


# Nor does it register one for the int8 GEMM (int8 × int8 -> int32) that int8 training runs on a
# CPU: without it those matmuls count as zero FLOPs.  An (m, k) × (k, n) product is m·n·k
# multiply-adds, 2·m·n·k operations, like the floating-point ``mm`` formula.
@register_flop_formula(_aten._int_mm)
def _int_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    m, k = a_shape
    k2, n = b_shape
    assert k == k2, (a_shape, b_shape)
    return 2 * m * n * k


def register_scaled_int8_mm() -> bool:
    """Register the FLOP formula of torchao's Triton int8 GEMM ``torchao::scaled_int8_mm`` (the
    kernel torchao's int8 training runs where Triton is installed: A (m, k) int8 × B (k, n) int8,
    scaled row- and column-wise), 2·m·n·k like ``_int_mm``.  The op exists only once torchao's
    ``int8_mm`` module has been imported (it needs Triton); returns whether it is registered."""
    from torch.utils.flop_counter import flop_registry

    try:
        op = torch.ops.torchao.scaled_int8_mm
    except (AttributeError, RuntimeError):
        return False
    if op not in flop_registry:
        @register_flop_formula(op)
        def _scaled_int8_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
            return 2 * a_shape[0] * b_shape[1] * a_shape[1]
    return True


_FLOAT8 = tuple(d for d in (getattr(torch, n, None) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                                                "float8_e5m2fnuz")) if d is not None)
#: Dtypes a GEMM's operands can have (a bool attention mask or an int64 index is no operand).
_GEMM_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int8, *_FLOAT8)


def _operand_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a tensor operand is multiplied in.  torchao's float8 training tensor
    (``Float8TrainingTensor``) reports its high-precision dtype (its ``dtype`` is the original
    one, so autograd sees no change) while its payload ``_data`` is float8 and the op it reaches
    runs ``torch._scaled_mm`` inside its ``__torch_dispatch__``, below this mode: the payload's
    dtype is the one that runs."""
    inner = getattr(t, "_data", None)
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and isinstance(inner, torch.Tensor):
        return inner.dtype
    return t.dtype


def gemm_dtype(args, kwargs=None) -> str | None:
    """The dtype a counted op's multiply-adds run in, by name, or None when its arguments hold no
    operand: the narrowest of its operands' dtypes (:func:`_operand_dtype`), so ``_scaled_mm``'s
    fp32 scales and bf16 bias, or ``addmm``'s bias, do not hide its float8/bf16 operands.  Every
    float8 format is ``float8_e4m3fn`` (e4m3 and e5m2 operands run at one tensor-core rate, the
    datasheets' one "FP8" figure), ``_int_mm``/``scaled_int8_mm`` give ``int8``.  Under autocast
    the counter sees the ops after autocast has cast their operands, so this is the autocast
    dtype."""
    from torch.utils._pytree import tree_leaves

    dtypes = [_operand_dtype(t) for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
    dtypes = [d for d in dtypes if d in _GEMM_DTYPES]
    if not dtypes:
        return None
    narrowest = min(dtypes, key=lambda d: d.itemsize)
    return "float8_e4m3fn" if narrowest in _FLOAT8 else str(narrowest).removeprefix("torch.")


class DtypeFlopCounterMode(FlopCounterMode):
    """``FlopCounterMode`` that also splits the FLOPs by the dtype each op runs in
    (:func:`gemm_dtype`): ``flops_by_dtype`` = {dtype name, or None where an op has no operand:
    FLOPs}, summing to ``get_total_flops()``.  The split is what a mixed-dtype run's MFU
    denominator weighs the per-dtype peaks with (:func:`impls.measure.peak.effective_peak`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.flops_by_dtype: dict[str | None, int] = defaultdict(int)

    def __enter__(self):
        self.flops_by_dtype.clear()
        return super().__enter__()

    def _count_flops(self, func_packet, out, args, kwargs):
        if func_packet not in self.flop_registry:
            return super()._count_flops(func_packet, out, args, kwargs)
        before = sum(self.flop_counts["Global"].values())
        out = super()._count_flops(func_packet, out, args, kwargs)
        added = sum(self.flop_counts["Global"].values()) - before
        if added:
            self.flops_by_dtype[gemm_dtype(args, kwargs)] += int(added)
        return out


def count_flops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """Run ``fn`` eagerly under FlopCounterMode; return total FLOPs and FLOPs per aten op.

    Compiled code is invisible to the counter (dynamo steps aside under a dispatch mode), so
    callers count an eager step.
    """
    with FlopCounterMode(display=False) as counter:
        fn()
    per_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), per_op


def model_flops_per_token(matmul_params: int, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> int:
    """Training (forward + backward) model FLOPs per token: 6N + 12·L·H·Q·T (PaLM, App. B).

    N counts the parameters that take part in matmuls (the tied embedding as LM head, not the
    position table); the attention term uses the full T×T score matrix, like the SDPA FLOP
    formula, so the two agree for causal attention too.
    """
    return 6 * matmul_params + 12 * n_layer * n_head * head_dim * seq_len


def model_flops_per_step(model, batch_size: int, seq_len: int) -> int:
    """Analytic training FLOPs of one step of ``batch_size`` sequences of ``seq_len`` tokens."""
    cfg = model.cfg
    per_token = model_flops_per_token(model.num_params(matmul_only=True), cfg.n_layer, cfg.n_head,
                                      cfg.head_dim, seq_len)
    return per_token * batch_size * seq_len


class _LocalMode:  # filled in lazily below (torch.utils.flop_counter's mode class is private)
    cls = None


def _local_mode_class():
    """``_FlopCounterMode`` that lets tensor subclasses (DTensor) dispatch first: a DTensor op
    returns ``NotImplemented`` here, DTensor runs it as local ops on this rank's shards, and those
    come back through the mode and are counted.  Without this the mode sees the *global* op (a
    DTensor's shape is the whole tensor's) and every tensor-parallel rank counts the whole layer."""
    if _LocalMode.cls is None:
        from torch.distributed.tensor import DTensor
        from torch.utils.flop_counter import _FlopCounterMode

        class _LocalFlopCounterMode(_FlopCounterMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if any(issubclass(t, DTensor) for t in types):
                    return NotImplemented
                return super().__torch_dispatch__(func, types, args, kwargs)

        _LocalMode.cls = _LocalFlopCounterMode
    return _LocalMode.cls


class LocalFlopCounterMode(DtypeFlopCounterMode):
    """``FlopCounterMode`` counting the FLOPs this rank executes: the local shards of DTensor ops
    (tensor parallelism, sequence parallelism), plain ops as usual.  Summed over ranks, it gives
    the hardware FLOPs of the step (replicated work counted on every rank that does it); split by
    dtype as :class:`DtypeFlopCounterMode` does."""

    def __enter__(self):
        self.flop_counts.clear()
        self.flops_by_dtype.clear()
        self.mod_tracker.__enter__()
        self.mode = _local_mode_class()(self)
        self.mode.__enter__()
        return self
