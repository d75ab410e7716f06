"""Activation offload: the tensors autograd saves for backward are copied to host memory in the
forward pass and back to the accelerator when backward needs them.

Device memory then holds parameters, gradients, optimizer state and the working set of one
operator instead of the whole forward's saved activations, at the cost of moving those bytes over
the host link twice per step (vDNN, Rhu et al. 2016, "vDNN: Virtualized Deep Neural Networks for
Scalable, Memory-Efficient Neural Network Design", MICRO, arXiv 1602.08124; ZeRO-Offload / ZeRO-
Infinity offload model states the same way, Ren et al. 2021, Rajbhandari et al. 2021).  Library:
``torch.autograd.graph.save_on_cpu(pin_memory=...)``, a saved-tensor hooks pair whose pack copies
each saved tensor to a CPU tensor (into pinned memory with ``pin_memory=true``, so the copy is an
asynchronous DMA) and whose unpack copies it back to the tensor's device.  torch's hooks copy
every saved tensor, a matmul's weight included (an extra host copy of the parameters a forward
saves), as the library does.

The engine runs every training forward under the pair (``build.set_saved_tensors_hooks``) and its
activation meter calls the same pack: the record's activation bytes are then host bytes, split by
device in ``technique_notes["offload"]["saved_bytes_by_device"]`` (device bytes ~0).

On a CPU run there is nothing to offload: the activations already live in host memory and
``save_on_cpu``'s pack returns the very tensor (``tensor.cpu()`` of a CPU tensor is itself), so a
CPU run would be the baseline under another name; it is refused before any work.  Writing the
saved tensors to disk instead (ZeRO-Infinity's NVMe tier) would be a real CPU variant; it is not
implemented here.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError

NAME = "offload"
STAGE = "engine"
OPTIONS = {"pin_memory": True}
_WHY_HOOKS = "only one pair of saved-tensor hooks runs (torch does not nest them)"
CONFLICTS = {
    "checkpoint": "torch's checkpoint stores each checkpointed block's saved tensors through its own "
                  "saved-tensor hooks, which replace the offload's inside the block (" + _WHY_HOOKS + ")",
    "zero": "DeepSpeed's engine runs its own forward, outside the build's saved-tensor hooks",
    "onebit": "DeepSpeed's engine runs its own forward, outside the build's saved-tensor hooks",
    "pp": "the pipeline engine runs its own schedule, outside the build's saved-tensor hooks",
}

CPU_REASON = ("offload on a CPU run: nothing to offload, the activations already live in host memory "
              "(save_on_cpu would return the same tensors); run it on a CUDA device")


def configure(plan, options):
    if plan.device_type == "cpu":
        raise ConfigError(CPU_REASON)


def apply(build, options):
    if build.device.type == "cpu":  # device unknown at validation time (device=auto resolved later)
        raise ConfigError(CPU_REASON)
    hooks = torch.autograd.graph.save_on_cpu(pin_memory=options["pin_memory"], device_type=build.device.type)
    build.set_saved_tensors_hooks(hooks.pack_hook, hooks.unpack_hook)
    build.notes[NAME] = dict(pin_memory=options["pin_memory"], to="host memory (torch.autograd.graph.save_on_cpu)")
    build.describe(NAME, lambda: dict(saved_bytes_by_device=dict(build.activation_bytes_by_device or {})))
