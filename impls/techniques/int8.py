"""int8 mixed-precision training: the block Linears' matmuls run as int8 × int8 -> int32 GEMMs in
forward *and* backward, with dynamic row-wise scales; weights, gradients and optimizer state stay
in high precision.

Library: torchao's prototype int8 mixed-precision training
(``torchao.prototype.quantized_training.int8_mixed_precision``), which its README describes as
inspired by SwitchBack (Wortsman et al. 2023, "Stable and low-precision training for large-scale
vision-language models", arXiv 2304.13013) and Jetfire (Xi et al. 2024, "Jetfire: Efficient and
Accurate Transformer Pretraining with INT8 Data Flow and Per-Block Quantization", ICML, arXiv
2403.12422).  For each of the three matmuls of a Linear ``y = x Wᵀ`` —

    forward      y      = x  · Wᵀ        (M×K · K×N)
    grad input   ∂x     = ∂y · W         (M×N · N×K)
    grad weight  ∂Wᵀ    = xᵀ · ∂y        (K×M · M×N)

— both operands are quantised on the fly with absmax scaling, the left one per row and the right
one per column, ``q = round(a / s)``, ``s = max|a_row| / 127`` (``quantize_int8_rowwise``), so
the product is ``(q_A q_B) ⊙ s_A s_Bᵀ`` with the scales factored out of the int32 accumulation
(SwitchBack's row-wise scheme; Jetfire quantises per block instead).  What runs the int8 product
is torchao's Triton kernel ``torchao::scaled_int8_mm`` where Triton is installed (CUDA), else
``torch._int_mm`` (int8 × int8 -> int32, the oneDNN/MKL integer GEMM on a CPU), then the scales.

What is *stored* does not shrink: torchao's autograd function saves the high-precision input and
the weight for backward and quantises them again there, so saved activations keep their dtype, and
the fp32 master weight is the only copy of the weight; the int8 operands are transient (one GEMM
long).  The record's notes say so from a measured probe (the aten ops one wrapped Linear runs and
the dtypes it saves), and ``memory.activations_bytes`` is the suite's meter on the whole model.

Why not ``quantize_(model, Int8MixedPrecisionTrainingConfig())`` as torchao documents it: in
torchao 0.18 its default tensor-subclass path registers its ``F.linear`` override with
``implements`` (the ``__torch_dispatch__`` table of aten ops) instead of
``implements_torch_function``, so ``F.linear`` on the wrapped weight never reaches the int8
function and runs the plain fp32 ``addmm``/``mm`` — fp32 in disguise (``tests/test_quant.py``
counts the ops of both paths and fails if that changes).  Its ``module_swap=True`` path swaps
``__class__``, which this suite does not do.  So each block Linear is replaced by
:class:`Int8TrainingLinear`, a module that takes over the Linear's parameters (same ``state_dict``
keys) and calls torchao's ``_Int8MixedPrecisionTrainingLinearFunction`` — exactly what the
module-swap path's ``forward`` calls.  The tied embedding / LM head is left alone (torchao's
recipe quantises Linears; the embedding gather is no matmul, and the head shares its weight).

Under autocast (``bf16``) the operands are cast to the autocast dtype first, as torchao's
``F.linear`` handler does, and the function runs with autocast off.  Counted FLOPs include the
int8 GEMMs (``impls/measure/flops.py`` registers ``aten._int_mm`` and ``torchao::scaled_int8_mm``:
2·m·n·k each); model FLOPs stay the dense 6N formula, since every multiply-add still runs.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.nn as nn

from .. import dist
from ..errors import ConfigError

NAME = "int8"
STAGE = "surgery"
RANK = 60  # after every module-replacing surgery (moe, fuse, attention, mod): quantise the Linears they leave
OPTIONS = {"forward": True, "grad_input": True, "grad_weight": True}
REQUIRES = ("torchao",)
CONFLICTS = {
    "qat": "both replace the block Linears (int8 training runs real int8 GEMMs; QAT fake-quantises fp32 ones)",
    "fp8": "both replace the block Linears' matmuls (int8 vs float8 GEMMs)",
    "fuse": "fuse:mode=jit calls the MLP's up weight with F.linear directly, bypassing the int8 Linear, and "
            "fuse:mode=compile is not verified with torchao's int8 function here",
    "tp": "tensor-parallel DTensor weights are not quantised by torchao's int8 function",
    "fp16": "torchao's int8 GEMM path multiplies the int32 accumulator by fp16 scales, which overflows fp16 "
            "(max 65504): the loss is inf from the first step",
}

#: The devices whose int8 GEMM this technique can run: torch._int_mm (CPU, CUDA) or torchao's
#: Triton kernel (CUDA).
DEVICES = ("cpu", "cuda")


def configure(plan, options):
    if not any(options.values()):
        raise ConfigError("int8: forward, grad_input and grad_weight are all false: no matmul would run in int8 "
                          "(set at least one to true)")
    device = plan.device_type
    if device is not None and device not in DEVICES:
        raise ConfigError(f"int8: no int8 GEMM kernel on device {device!r} (torch._int_mm / torchao's Triton "
                          f"kernel run on {', '.join(DEVICES)})")
    if device == "cuda" and dist.cuda_available() and dist.cuda_capability() < (7, 5):
        raise ConfigError(f"int8: int8 tensor-core GEMMs need CUDA compute capability >= 7.5, this GPU has "
                          f"{dist.cuda_capability()}")


def _linear_shapes(cfg) -> list[tuple[str, int, int]]:
    kv = cfg.n_kv_head * cfg.head_dim
    up = cfg.d_ff * (2 if cfg.mlp == "swiglu" else 1)
    return [("qkv", cfg.d_model, cfg.d_model + 2 * kv), ("proj", cfg.d_model, cfg.d_model),
            ("up", cfg.d_model, up), ("down", cfg.d_ff, cfg.d_model)]


def check_model(cfg, seq_len, options):
    if cfg.n_layer < 1:
        raise ConfigError(f"int8: model has n_layer={cfg.n_layer}: no block Linears to quantise")


def _config(options):
    from torchao.prototype.quantized_training import Int8MixedPrecisionTrainingConfig

    return Int8MixedPrecisionTrainingConfig(output=options["forward"], grad_input=options["grad_input"],
                                            grad_weight=options["grad_weight"])


def _function():
    from torchao.prototype.quantized_training.int8_mixed_precision import _Int8MixedPrecisionTrainingLinearFunction

    return _Int8MixedPrecisionTrainingLinearFunction


class Int8TrainingLinear(nn.Module):
    """A Linear whose forward and backward matmuls run in int8 through torchao's autograd function;
    it takes over the ``weight`` and ``bias`` of the Linear it replaces (same parameters, same
    ``state_dict`` keys)."""

    def __init__(self, linear: nn.Linear, config):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.config = config
        self._fn = _function()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        kind = x.device.type
        if torch.is_autocast_enabled(kind):  # as torchao's F.linear handler: compute in the autocast dtype
            dtype = torch.get_autocast_dtype(kind)
            x, w = x.to(dtype), w.to(dtype)
            b = b.to(dtype) if b is not None else None
        with torch.autocast(kind, enabled=False):
            return self._fn.apply(x, w, b, self.config)

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8 forward={c.output}, grad_input={c.grad_input}, grad_weight={c.grad_weight}")


def block_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, Linear) of every nn.Linear inside the model's Transformer blocks."""
    out = []
    for name, module in model.named_modules():
        if name.startswith("blocks.") and isinstance(module, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            out.append((model.get_submodule(parent_name), child, module))
    return out


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts every aten op that runs inside it (what executes, below autograd and subclasses)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self.int8_operand_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] += 1
        if name in ("aten._int_mm", "torchao.scaled_int8_mm"):
            self.int8_operand_bytes += sum(a.numel() * a.element_size() for a in args[:2])
        return func(*args, **(kwargs or {}))


MATMUL_OPS = ("aten._int_mm", "torchao.scaled_int8_mm", "aten.mm", "aten.addmm", "aten.bmm", "aten.matmul")


def probe(module: Int8TrainingLinear, rows: int = 64) -> dict:
    """Run one forward + backward of ``module``'s function on a copy of its weight and count the
    matmul ops that execute and the dtypes autograd saves: the measured facts behind the claim
    that the GEMMs are int8 (and behind what is stored)."""
    device = module.weight.device
    w = module.weight.detach().clone().requires_grad_(True)
    b = module.bias.detach().clone().requires_grad_(True) if module.bias is not None else None
    x = torch.randn(rows, module.in_features, device=device, dtype=w.dtype, requires_grad=True,
                    generator=torch.Generator(device).manual_seed(0))
    saved: Counter = Counter()

    def pack(t):
        if t.data_ptr() != w.data_ptr():  # the weight is model state, not an activation
            saved[str(t.dtype).removeprefix("torch.")] += t.numel() * t.element_size()
        return t

    with OpCounter() as ops, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module._fn.apply(x, w, b, module.config)
        y.backward(torch.ones_like(y))
    return dict(rows=rows, in_features=module.in_features, out_features=module.out_features,
                matmul_ops={k: ops.counts[k] for k in MATMUL_OPS if ops.counts[k]},
                int8_operand_bytes=ops.int8_operand_bytes,
                saved_bytes_by_dtype=dict(saved), input_bytes_fp=x.numel() * x.element_size())


def apply(build, options):
    from ..measure.flops import register_scaled_int8_mm

    config = _config(options)
    kernel_module = None
    for part in build.model_parts:
        for parent, child, linear in block_linears(part):
            if build.device.type == "cuda":  # torch._int_mm's CUDA shape rules (the Triton kernel's are looser)
                if linear.in_features % 8 or linear.out_features % 8 or linear.in_features <= 16:
                    raise ConfigError(f"int8: {child} is {linear.in_features}->{linear.out_features}; CUDA int8 "
                                      f"GEMMs need both multiples of 8 and in_features > 16")
            new = Int8TrainingLinear(linear, config)
            setattr(parent, child, new)
            kernel_module = kernel_module or new
    if kernel_module is None:
        raise ConfigError("int8: the model has no Linear inside its blocks to quantise")
    triton_kernel = register_scaled_int8_mm()  # its FLOPs count where torchao runs its Triton GEMM
    layers = sum(isinstance(m, Int8TrainingLinear) for part in build.model_parts for m in part.modules())
    matmuls = dict(forward=options["forward"], grad_input=options["grad_input"], grad_weight=options["grad_weight"])
    build.notes[NAME] = dict(
        library="torchao.prototype.quantized_training int8 mixed-precision (_Int8MixedPrecisionTrainingLinearFunction)",
        int8_matmuls=matmuls, layers=layers, bits=8, scaling="row-wise absmax (left operand per row, right per column)",
        kernel="torchao::scaled_int8_mm (Triton)" if triton_kernel and build.device.type == "cuda" else "aten._int_mm",
        weight_storage_dtype=str(kernel_module.weight.dtype).removeprefix("torch."),
        stored="fp32 master weights only (int8 operands are transient, one GEMM long); saved activations "
               "keep their dtype: torchao saves the high-precision input and re-quantises it in backward")

    def describe():
        facts = probe(kernel_module)
        counts = facts["matmul_ops"]
        int8 = counts.get("aten._int_mm", 0) + counts.get("torchao.scaled_int8_mm", 0)
        return dict(probe=facts, int8_gemms_per_linear_step=int8,
                    fp_gemms_per_linear_step=sum(v for k, v in counts.items() if k.startswith("aten.") and
                                                 k != "aten._int_mm"),
                    saved_activation_dtypes=sorted(facts["saved_bytes_by_dtype"]))

    build.describe(NAME, describe)
