"""Quantization-aware training (QAT): train the fp32 model through *fake* quantisation of the block
Linears' weights (int2..int8, group-wise or per-channel, symmetric) and, optionally, of their input
activations (int8 per token, asymmetric), so that the weights learn to tolerate the rounding the
deployed integer model will apply.

Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-
Only Inference" (CVPR, arXiv 1712.05877), §2 and §3: a real value r is represented as
``r = S (q − Z)`` with scale S and zero point Z; training simulates it in floating point,

    fq(r) = S · (clamp(round(r / S) + Z, q_min, q_max) − Z),

and back-propagates through ``round`` as the identity (the straight-through estimator), so the
gradients and the optimizer update stay fp32 while every forward sees the quantised values.
Weights (symmetric, Z = 0): per group of ``group_size`` input columns of each output row,
``S = max|w_group| / ((q_max − q_min) / 2)`` with ``[q_min, q_max] = [−2^(b−1), 2^(b−1) − 1]``, so
each group takes at most 2^b distinct values.  Activations (asymmetric, per token):
``S = (max − min) / 255``, ``Z = −128 − round(min / S)`` over each token's features.

Library: torchao's QAT API (``torchao.quantization.qat``, torchao 0.18): ``quantize_(model,
QATConfig(base_config, step="prepare"))`` replaces the block Linears by ``FakeQuantizedLinear``
(same weight and bias Parameters, new parent attribute: a module replacement, not a class swap),
inferring the fake-quant configs (``IntxFakeQuantizeConfig``) from the post-training config that
will be exported: ``Int8DynamicActivationIntxWeightConfig`` (``act=int8``: torchao's
"8da4w"-style recipe for ExecuTorch/XNNPACK integer kernels) or ``IntxWeightOnlyConfig``
(``act=none``), with ``weight_dtype = torch.int{bits}`` and ``PerGroup(group_size)``
(``group_size=0``: ``PerAxis(0)``, one scale per output row).  The tied embedding / LM head is
left in fp32 (it is shared with the embedding, which takes no activation quantisation).

Export (not measured here: the suite measures training).  After training,
``quantize_(model, QATConfig(base_config, step="convert"))`` swaps each ``FakeQuantizedLinear``
back to ``nn.Linear`` and applies ``base_config``: the weight becomes an int8-unpacked integer
tensor of ``bits`` bits with its group scales (``IntxUnpackedToInt8Tensor``), and with ``act=int8``
the activation is quantised dynamically per token at inference, the numerics the fake
quantisation simulated (``tests/test_quant.py`` checks the converted model's logits against the
QAT model's).  :func:`convert` does it.

Costs.  Parameters, gradients and optimizer state are the fp32 baseline's; the fake-quantised
weight and activation copies add saved activations and element-wise FLOPs (the FLOP counter
counts matmuls, which stay fp32 ``mm``/``addmm``: QAT runs no integer GEMM).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ConfigError

NAME = "qat"
STAGE = "surgery"
RANK = 60  # after every module-replacing surgery: fake-quantise the Linears the model ends up with
OPTIONS = {"bits": 4, "group_size": 32, "act": "int8"}
REQUIRES = ("torchao",)
CHOICES = {"bits": (2, 3, 4, 5, 6, 7, 8), "act": ("int8", "none")}
CONFLICTS = {
    "int8": "both replace the block Linears (int8 training runs real int8 GEMMs; QAT fake-quantises fp32 ones)",
    "fp8": "both replace the block Linears' matmuls",
    "fuse": "fuse:mode=jit calls the MLP's up weight with F.linear directly, bypassing the fake-quantised Linear, "
            "and fuse:mode=compile is not verified with torchao's fake quantisers here",
    "tp": "tensor-parallel DTensor weights are not fake-quantised group-wise by torchao",
}


def configure(plan, options):
    if options["group_size"] < 0:
        raise ConfigError(f"qat:group_size must be >= 0 (0: one scale per output channel), got {options['group_size']}")


def _in_features(cfg) -> dict[str, int]:
    return {"qkv": cfg.d_model, "proj": cfg.d_model, "up": cfg.d_model, "down": cfg.d_ff}


def check_model(cfg, seq_len, options):
    g = options["group_size"]
    if cfg.n_layer < 1:
        raise ConfigError(f"qat: model has n_layer={cfg.n_layer}: no block Linears to fake-quantise")
    bad = {name: k for name, k in _in_features(cfg).items() if g and k % g}
    if bad:
        raise ConfigError(f"qat:group_size={g} does not divide the block Linears' input features "
                          f"({', '.join(f'{n}: {k}' for n, k in bad.items())}); choose a divisor of "
                          f"{cfg.d_model} and {cfg.d_ff}, or 0 for per-channel scales")


def base_config(options):
    """The post-training config QAT prepares for and exports to."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    dtype = getattr(torch, f"int{options['bits']}")
    granularity = PerGroup(options["group_size"]) if options["group_size"] else PerAxis(0)
    if options["act"] == "int8":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=granularity)
    return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity)


def _is_block_linear(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and fqn.startswith("blocks.")


def prepare(model: nn.Module, options) -> int:
    """Replace the block Linears of ``model`` by torchao's FakeQuantizedLinear; returns how many."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    quantize_(model, QATConfig(base_config(options), step="prepare"), filter_fn=_is_block_linear)
    return sum(isinstance(m, FakeQuantizedLinear) for m in model.modules())


def convert(model: nn.Module, options) -> nn.Module:
    """The export step: fake-quantised Linears -> Linears with real integer weights (``base_config``)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    quantize_(model, QATConfig(base_config(options), step="convert"),
              filter_fn=lambda m, fqn: isinstance(m, FakeQuantizedLinear))
    return model


def exported_weight_bytes(model: nn.Module, options) -> dict:
    """Bytes the exported block weights would take: ``bits`` per weight packed, plus one fp32 scale
    per group (the integer format's size; torchao's unpacked layout holds one int8 per weight)."""
    from torchao.quantization.qat import FakeQuantizedLinear

    weights = [m.weight for m in model.modules() if isinstance(m, FakeQuantizedLinear)]
    numel = sum(w.numel() for w in weights)
    groups = sum(w.numel() // (options["group_size"] or w.shape[1]) for w in weights)
    return dict(fp32_bytes=4 * numel, packed_bytes=numel * options["bits"] // 8 + 4 * groups,
                int8_unpacked_bytes=numel + 4 * groups, groups=groups, weights=numel)


def apply(build, options):
    layers = sum(prepare(part, options) for part in build.model_parts)
    if layers == 0:
        raise ConfigError("qat: the model has no Linear inside its blocks to fake-quantise")
    config = base_config(options)
    build.notes[NAME] = dict(
        library="torchao.quantization.qat QATConfig(step='prepare') -> FakeQuantizedLinear",
        base_config=type(config).__name__, bits=options["bits"], group_size=options["group_size"],
        weight_granularity="per-channel" if options["group_size"] == 0 else f"per-group of {options['group_size']}",
        act=options["act"], layers=layers,
        max_distinct_weight_values_per_group=2 ** options["bits"],
        stored="fp32 weights, gradients and optimizer state (fake quantisation only simulates integers); "
               "the fake-quantised copies add saved activations",
        export=f"quantize_(model, QATConfig({type(config).__name__}(...), step='convert'))",
        **{f"export_{k}": v for k, v in exported_weight_bytes(build.model_parts[0], options).items()})
