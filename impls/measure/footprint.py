"""A training step's peak memory per rank, predicted before any work, and the memory it must fit.

:func:`predict` adds what one rank must hold at the peak of a step (the end of a micro-batch's
forward, when its saved activations and its logits are all alive):

* **model states** — the ZeRO paper's formulas (:func:`impls.measure.model_states.formula`:
  p_b·Ψ + g_b·Ψ + K·Ψ, each part divided over the data-parallel ranks from the run's stage on),
  on the Ψ one rank holds before data parallelism (Ψ/(t·p) under tensor and pipeline
  parallelism: the largest stage holds at least the mean);
* **activations** — the tensors one micro-batch's forward saves for backward, per Transformer
  block the count of :mod:`impls.measure.activations` (layer-norm inputs, the GEMM inputs, q/k/v,
  the attention output and log-sum-exp, the MLP hidden tensors: 2 for GELU, 3 for SwiGLU;
  head and MLP terms divided over tensor-parallel ranks), for this rank's L/p blocks;
* **logits** — the LM head's output (in the compute dtype) and the loss's fp32 log-softmax,
  b·s·V each;
* **batch** — the step's token windows as the data side builds them: an int64 index array and
  the int64 batch, 16 bytes per token of every micro-batch.

Every term is a *lower bound* of what the step allocates (no framework workspace, no allocator
slack, no temporaries of the backward, dropout masks and stored attention scores left out), so a
refusal (:func:`exceeds`) never turns away a recipe that would fit; where a technique changes a
term in a way these formulas do not follow, the caller drops that term (``block_activations`` /
``block_states`` False) rather than guess.  ``tests/test_sizes.py`` holds the prediction against
the measured bytes of real runs.

:func:`available` is the memory the run can use: on a CPU the host's available physical memory
(``psutil``: free plus reclaimable caches; ranks on one host share it), on a GPU its free memory
(``torch.cuda.mem_get_info``), read only where CUDA is already initialised or may be.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import model_states

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human(n: float) -> str:
    """Bytes with a binary unit: ``'3.7 TiB'``, ``'512 B'``."""
    n = float(n)
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Footprint:
    """Predicted bytes of one rank at the peak of a step, by component."""

    model_states: float
    activations: float
    logits: float
    batch: float
    notes: tuple[str, ...] = field(default=())
    # a process not started yet (a rank the launcher will start): what this process holds now,
    # torch and the data imported and loaded as the rank will
    runtime: float = 0.0

    @property
    def total(self) -> float:
        return self.model_states + self.activations + self.logits + self.batch + self.runtime

    def parts(self) -> dict[str, float]:
        return {"model states": self.model_states, "activations": self.activations, "logits": self.logits,
                "batch": self.batch, "runtime": self.runtime}

    def describe(self) -> str:
        """``'3.7 TiB per rank (model states 1.2 GiB, activations 3.7 TiB, logits ..., batch ...)'``."""
        parts = ", ".join(f"{k} {human(v)}" for k, v in self.parts().items() if v)
        return f"{human(self.total)} per rank ({parts})"


def block_activation_bytes(cfg, s: int, b: int, t: int = 1, element_bytes: float = 4.0) -> float:
    """Bytes one Transformer block saves for backward for one micro-batch of ``b`` sequences of
    ``s`` tokens (a lower bound: :func:`impls.measure.activations.implementation_per_layer`'s count
    for the GELU block, with SwiGLU's three hidden tensors, RMSNorm's one statistic, no dropout
    masks and the fused attention's output and log-sum-exp instead of the s×s scores)."""
    h, a = cfg.d_model, cfg.n_head
    sb, sbh = s * b, s * b * h
    kv = cfg.n_kv_head * cfg.head_dim
    stats = (2 if cfg.norm == "layernorm" else 1) * 2 * sb  # mean and 1/σ (RMSNorm: 1/rms) of 2 norms
    norm_inputs = 2 * sbh
    gemm_inputs = 2 * sbh  # qkv's and up's inputs (the norms' outputs)
    attention = (sbh * (h + 2 * kv) / h + sbh + sb * a) / t  # q, k, v; the output; log-sum-exp
    mlp = (3 if cfg.mlp == "swiglu" else 2) * sb * cfg.d_ff / t
    return float((norm_inputs + stats + gemm_inputs + attention + mlp) * element_bytes)


def predict(cfg, *, psi: float, seq_len: int, micro_batch: int, accum_steps: int = 1, dp: int = 1, tp: int = 1,
            pp: int = 1, zero_stage: int = 0, optimizer: str = "adamw", low_precision_params: bool = False,
            autocast: bool = False, block_activations: bool = True, block_states: bool = True,
            outside_block_params: float = 0.0, states_on_device: bool = True) -> Footprint:
    """Peak bytes of one rank of a run (see the module docstring).

    ``psi``: trainable parameters of the whole model; ``block_states`` False: count only the
    parameters outside the blocks (``outside_block_params``: embeddings, norms, head), weights only
    (a technique replaces, slices or freezes the block weights); ``block_activations`` False: count
    no block activations (a technique recomputes, compresses, routes or drops them);
    ``states_on_device`` False: the model states live in host memory (offload on a GPU)."""
    notes = []
    per = model_states.bytes_per_param(optimizer, low_precision_params, autocast)
    if per is None:  # Adafactor: its factored state is not a multiple of Ψ; left out (a lower bound)
        notes.append(f"{optimizer} state not counted")
        per = (2.0, 2.0, 0.0) if low_precision_params else (4.0, 4.0, 0.0)
    p_b, g_b, k = per
    if not states_on_device:
        states = 0.0
        notes.append("model states offloaded to host memory")
    elif block_states:
        states = model_states.formula(psi / (tp * pp), dp, zero_stage, param_bytes=p_b, grad_bytes=g_b, k=k)["total"]
    else:
        states = p_b * outside_block_params / (dp if zero_stage >= 3 else 1)
        notes.append("block weights changed by a technique: only the other weights counted")
    e = 2.0 if autocast else 4.0
    s, b = seq_len, micro_batch
    blocks = math.ceil(cfg.n_layer / pp)
    act = blocks * block_activation_bytes(cfg, s, b, tp, e) if block_activations else 0.0
    if not block_activations:
        notes.append("block activations changed by a technique: not counted")
    act += 2 * e * s * b * cfg.d_model  # the final norm's and the LM head's inputs
    logits = (e + 4.0) * s * b * cfg.vocab_size  # the logits and the loss's fp32 log-softmax
    batch = 16.0 * micro_batch * accum_steps * (seq_len + 1)
    return Footprint(float(states), float(act), float(logits), float(batch), tuple(notes))


def available(device, *, may_init_cuda: bool = True) -> tuple[float, str] | None:
    """``(bytes, what)``: the memory a run on ``device`` (a torch.device) can use now, or None
    when it cannot be read without initialising CUDA (``may_init_cuda`` False)."""
    if device.type == "cuda":
        import torch

        if not (may_init_cuda or torch.cuda.is_initialized()):
            return None
        free, total = torch.cuda.mem_get_info(device)
        return float(free), f"{torch.cuda.get_device_name(device)}'s {human(free)} free (of {human(total)})"
    import psutil

    mem = psutil.virtual_memory()
    return float(mem.available), f"this machine's {human(mem.available)} available (of {human(mem.total)})"


def this_process() -> float:
    """Resident bytes of this process now: what a rank started by it to do the same work will
    hold before its first allocation (torch, the data)."""
    import psutil

    return float(psutil.Process().memory_info().rss)


def exceeds(footprint: Footprint, limit: float, ranks_sharing: int = 1) -> bool:
    """True when ``ranks_sharing`` ranks of this footprint (ranks on one host share its memory)
    clearly cannot fit ``limit`` bytes: the prediction is a lower bound, so strictly above."""
    return footprint.total * ranks_sharing > limit
