"""fp8 training: the block Linears' three matmuls (output, grad input, grad weight) run as float8
GEMMs (``torch._scaled_mm``) with dynamic scaling, master weights and optimizer state in high
precision.

Micikevicius et al. 2022, "FP8 Formats for Deep Learning" (arXiv 2209.05433): e4m3 (4 exponent,
3 mantissa bits, max 448) for weights and activations, e5m2 for gradients where range matters;
each tensor is cast as ``x_fp8 = cast(x · s)`` with ``s = fp8_max / amax(x)`` and the GEMM's output
is divided by the product of the operands' scales.  Library: torchao's float8 training
(``torchao.float8.convert_to_float8_training`` with ``Float8LinearConfig.from_recipe_name``),
which replaces each selected ``nn.Linear`` by a ``Float8Linear`` holding the same weight and bias
(a new module set on the parent: a module replacement, not a class swap).  ``scaling`` picks
torchao's recipe:

* ``tensorwise``: one dynamic scale per tensor, cuBLAS's tensor-wise fp8 GEMM (torchao's fastest);
* ``rowwise``: one scale per row of each operand (powers of two), e4m3 throughout, the CUTLASS
  row-wise kernel: more accurate with outliers;
* ``rowwise_with_gw_hp``: row-wise, with the grad-weight GEMM kept in high precision.

The fp8 GEMMs need tensor cores with float8 support, CUDA compute capability >= 8.9 (Ada, Hopper:
``torch._scaled_mm``).  torch 2.13 does accept ``_scaled_mm`` on a CPU, but there it is a
reference path: it converts both float8 operands to fp32, multiplies them by their scales and runs
an fp32 ``mm`` (``tests/test_quant.py`` profiles it) — fp8 numerics on an fp32 GEMM, which would
report fp8 speed and FLOP/s that no float8 kernel produced.  So a CPU (or any non-CUDA device, or
a GPU below 8.9) is refused at validation (``plan.device_type``, then the GPU's capability)
before any work, with that reason.
torchao also requires both dimensions of each converted Linear to be multiples of 16 (the fp8
GEMM's layout rule), checked from the model config.  Counted FLOPs include ``aten._scaled_mm``
(torch's FLOP counter has its formula, 2·m·n·k); model FLOPs stay the dense 6N formula.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .. import dist
from ..errors import ConfigError

NAME = "fp8"
STAGE = "surgery"
RANK = 60  # after every module-replacing surgery: convert the Linears the model ends up with
OPTIONS = {"scaling": "tensorwise"}
REQUIRES = ("torchao",)
CHOICES = {"scaling": ("tensorwise", "rowwise", "rowwise_with_gw_hp")}
CONFLICTS = {
    "int8": "both replace the block Linears' matmuls (float8 vs int8 GEMMs)",
    "qat": "both replace the block Linears",
    "fuse": "fuse:mode=jit calls the MLP's up weight with F.linear directly, bypassing the float8 Linear",
    "fp16": "torchao's float8 training casts from fp32 or bf16 (its autocast handling assumes the GPU dtype)",
}
MIN_CAPABILITY = (8, 9)


def configure(plan, options):
    device = plan.device_type
    need = f"float8 GEMMs need a CUDA GPU of compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ada/Hopper)"
    if device == "cpu":
        raise ConfigError(f"fp8: {need}; on this run's device 'cpu' torch's _scaled_mm is a reference path that "
                          f"converts the float8 operands to fp32 and runs an fp32 mm (no float8 GEMM)")
    if device is not None and device != "cuda":
        raise ConfigError(f"fp8: {need}; this run's device is {device!r}")
    if device == "cuda":
        if not dist.cuda_available():
            raise ConfigError("fp8: device cuda requested but torch sees no CUDA GPU")
        capability = dist.cuda_capability()
        if capability < MIN_CAPABILITY:
            raise ConfigError(f"fp8: float8 GEMMs need CUDA compute capability >= {MIN_CAPABILITY[0]}."
                              f"{MIN_CAPABILITY[1]}; {dist.cuda_name()} has "
                              f"{capability[0]}.{capability[1]}")


def _linear_dims(cfg) -> dict[str, tuple[int, int]]:
    kv = cfg.n_kv_head * cfg.head_dim
    up = cfg.d_ff * (2 if cfg.mlp == "swiglu" else 1)
    return {"qkv": (cfg.d_model, cfg.d_model + 2 * kv), "proj": (cfg.d_model, cfg.d_model),
            "up": (cfg.d_model, up), "down": (cfg.d_ff, cfg.d_model)}


def check_model(cfg, seq_len, options):
    if cfg.n_layer < 1:
        raise ConfigError(f"fp8: model has n_layer={cfg.n_layer}: no block Linears to convert")
    bad = {n: d for n, d in _linear_dims(cfg).items() if d[0] % 16 or d[1] % 16}
    if bad:
        raise ConfigError("fp8: float8 GEMMs need Linear dimensions that are multiples of 16; "
                          + ", ".join(f"{n} is {i}->{o}" for n, (i, o) in bad.items()))


def _is_block_linear(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and fqn.startswith("blocks.")


def probe(module: nn.Module, rows: int = 64) -> dict:
    """One forward + backward of a copy of a converted Linear under the torch profiler, counting
    the matmul ops that ran: the measured fact that its GEMMs are float8 (``aten::_scaled_mm``).
    The profiler, not a dispatch mode, because torchao's float8 tensors issue ``_scaled_mm`` from
    inside their own ``__torch_dispatch__``, below where a mode sees ``aten.mm``."""
    from torch.profiler import ProfilerActivity, profile

    layer = copy.deepcopy(module)
    x = torch.randn(rows, layer.in_features, device=layer.weight.device, dtype=layer.weight.dtype,
                    requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        layer(x).sum().backward()
    names = ("aten::_scaled_mm", "aten::mm", "aten::addmm", "aten::_int_mm")
    counts = {e.key: e.count for e in prof.key_averages() if e.key in names}
    return dict(rows=rows, in_features=layer.in_features, out_features=layer.out_features, matmul_ops=counts,
                fp8_gemms_per_linear_step=counts.get("aten::_scaled_mm", 0))


def apply(build, options):
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    if build.device.type != "cuda":  # configure refuses first when validation knows the device
        raise ConfigError(f"fp8: float8 GEMMs need CUDA; this build is on {build.device.type!r}")
    config = Float8LinearConfig.from_recipe_name(options["scaling"])
    for part in build.model_parts:
        convert_to_float8_training(part, module_filter_fn=_is_block_linear, config=config)
    converted = [m for part in build.model_parts for m in part.modules() if isinstance(m, Float8Linear)]
    if not converted:
        raise ConfigError("fp8: the model has no Linear inside its blocks to convert")
    build.notes[NAME] = dict(library="torchao.float8 convert_to_float8_training", scaling=options["scaling"],
                             layers=len(converted), kernel="aten._scaled_mm", bits=8,
                             capability=".".join(map(str, torch.cuda.get_device_capability(build.device))),
                             stored="high-precision master weights; float8 casts are transient (dynamic scaling)")
    build.describe(NAME, lambda: dict(probe=probe(converted[0])))
