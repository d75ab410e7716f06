"""Operator fusion: fewer, larger kernels for the element-wise work between the matmuls.

``mode=jit`` (model surgery): Megatron-LM's fused bias + GELU (Shoeybi et al. 2019,
"Megatron-LM: Training Multi-Billion Parameter Language Models Using Model Parallelism", arXiv
1909.08053; ``megatron/model/fused_bias_gelu.py``).  Every GELU :class:`~impls.zoo.model.MLP` of
the model — MoE experts included, since ``moe`` replaces MLPs earlier in the surgery stage — is
replaced by a :class:`FusedGeluMLP` that takes over its ``up`` and ``down`` Linears: ``up``
runs without its bias, and the bias add plus tanh-GELU run as one ``torch.jit.script``-ed
function, :func:`bias_gelu`, inside an autograd Function whose backward is the scripted
closed-form derivative :func:`bias_gelu_back`: it saves only the matmul output and the bias, not
the intermediates of the tanh formula.  The parameters and ``state_dict`` keys are the MLP's.  TorchScript fuses the element-wise chain into one kernel on CUDA (NVFuser/NNC); on a
CPU its fuser is off by default (``torch._C._jit_can_fuse_on_cpu()``), so there the script only
removes Python overhead and the result is a correctness baseline rather than a speed-up.
torch 2.13 deprecates ``torch.jit.script`` in favour of ``torch.compile`` (``mode=compile``).

``mode=compile`` (compilation stage): ``torch.compile`` (Ansel et al. 2024, "PyTorch 2: Faster
Machine Learning Through Dynamic Python Bytecode Transformation and Graph Compilation", ASPLOS)
with the default TorchInductor backend, applied per block in place (``block.compile()``, as
torchtitan does): the module tree and ``state_dict`` keys stay those of the eager model, and
compilation sees the blocks after activation checkpointing has wrapped them (dynamo traces
``torch.utils.checkpoint`` as a higher-order op).  Compilation happens lazily, on the first call
in each grad mode; the training loop keeps it out of its timed steps (``timing_warmup``) and
reports it in ``first_step_seconds``, provided its measurement passes run eagerly
(``torch.compiler.set_stance("force_eager")``): otherwise the activation-measuring forward compiles
the training graph before step 0.  Counted FLOPs come from an eager step (dynamo steps aside
under ``FlopCounterMode``), so they equal the eager model's.
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch

from ..errors import ConfigError
from ..zoo.model import MLP

NAME = "fuse"
OPTIONS = {"mode": "jit"}
CHOICES = {"mode": ("jit", "compile")}
RANK = 20  # surgery: after MLP replacement (moe, mode), so experts are fused too


def STAGE(options) -> str:
    return "surgery" if options["mode"] == "jit" else "compile"


# GELU(x) = x·Φ(x) ≈ 0.5·x·(1 + tanh(k·(x + a·x³))), k = √(2/π), a = 0.044715 (Hendrycks & Gimpel
# 2016): the approximation GPT-2 uses, torch's gelu(approximate="tanh").  TorchScript cannot close
# over Python globals, so the scripted functions spell the constants: k = 0.7978845608028654 and
# 3·a·k = 0.10703222440890037 (Megatron rounds them to 0.79788456 and 0.1070322243; full precision
# keeps the fused MLP within float rounding of the eager one).


def bias_gelu(y: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    x = y if bias is None else y + bias
    return x * 0.5 * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def bias_gelu_back(g: torch.Tensor, y: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    x = y if bias is None else y + bias
    tanh_out = torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x))
    # d/dx 0.5·x·(1 + tanh u), u = k(x + a·x³):  0.5(1 + tanh u) + 0.5·x·(1 − tanh²u)·k(1 + 3a·x²)
    ff = 0.5 * x * ((1.0 - tanh_out * tanh_out) * (0.7978845608028654 + 0.10703222440890037 * x * x)) \
        + 0.5 * (1.0 + tanh_out)
    return ff * g


@functools.cache
def scripted() -> tuple[torch.jit.ScriptFunction, torch.jit.ScriptFunction]:
    """``torch.jit.script`` of (:func:`bias_gelu`, :func:`bias_gelu_back`), made on first use so
    that importing the registry compiles nothing.  torch 2.13 deprecates ``torch.jit.script``;
    this technique reproduces Megatron's TorchScript fusion on purpose, so that warning is muted
    here (the docstring says so)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=DeprecationWarning)
        return torch.jit.script(bias_gelu), torch.jit.script(bias_gelu_back)


class BiasGeLUFunction(torch.autograd.Function):
    """GELU(y + bias) with the scripted forward and closed-form backward (Megatron's
    ``GeLUFunction``); saves only ``y`` and ``bias``."""

    @staticmethod
    def forward(ctx, y, bias):
        ctx.save_for_backward(y, bias)
        return scripted()[0](y, bias)

    @staticmethod
    def backward(ctx, grad_out):
        y, bias = ctx.saved_tensors
        grad = scripted()[1](grad_out, y, bias)
        grad_bias = None
        if bias is not None and ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad, grad_bias


class FusedGeluMLP(torch.nn.Module):
    """A GELU MLP whose ``up`` bias add and GELU run fused (:class:`BiasGeLUFunction`); it
    takes over the ``up`` and ``down`` Linears of the MLP it replaces (same parameters, same
    ``state_dict`` keys)."""

    def __init__(self, mlp: MLP):
        super().__init__()
        self.up, self.down = mlp.up, mlp.down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.up
        h = torch.nn.functional.linear(x, up.weight)  # (B, T, F), no bias
        bias = None if up.bias is None else up.bias.to(h.dtype)  # autocast: the bias follows the matmul
        h = BiasGeLUFunction.apply(h, bias)
        return self.down(h)  # (B, T, C)


def check_model(cfg, seq_len, options):
    if options["mode"] == "jit" and cfg.mlp != "gelu":  # before any work, not at assembly
        raise ConfigError(f"fuse:mode=jit fuses bias + GELU; model MLP is {cfg.mlp!r} (needs gelu)")


def _apply_jit(model):
    if model.cfg.mlp != "gelu":
        raise ConfigError(f"fuse:mode=jit fuses bias + GELU; model MLP is {model.cfg.mlp!r} (needs gelu)")
    targets = [name for name, m in model.named_modules() if isinstance(m, MLP)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, FusedGeluMLP(getattr(parent, child)))
    return len(targets)


def _apply_compile(model):
    for block in model.blocks:
        block.compile()  # in place: nn.Module.compile keeps the module and its state_dict keys


def apply(build, options):
    build.notes["fuse"] = dict(mode=options["mode"])
    for part in build.model_parts:
        if options["mode"] == "jit":
            build.notes["fuse"]["fused_mlps"] = _apply_jit(part)
        else:
            _apply_compile(part)
