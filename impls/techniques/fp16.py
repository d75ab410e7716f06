"""fp16 mixed precision with dynamic loss scaling (Micikevicius et al. 2018, "Mixed Precision
Training", ICLR, §3.1–3.2).

fp16's smallest subnormal is 2^-24 ≈ 6e-8: many activation gradients are smaller and flush to
zero.  Multiplying the loss by a scale S shifts the gradients into range; they are divided by S
before the fp32 master-weight update.  Dynamic scaling grows S while steps are finite and halves
it, skipping the update, when a gradient overflows (inf/NaN).  Library: ``torch.autocast`` and
``torch.amp.GradScaler`` (the engine applies the scaler when ``plan.loss_scaling`` is set).
"""
import torch

NAME = "fp16"
STAGE = "precision"
OPTIONS = {"scaling": True}  # scaling=false: plain fp16 autocast, to show the underflow it causes
CONFLICTS = {"bf16": "a run has one autocast dtype"}


def configure(plan, options):
    plan.autocast_dtype = torch.float16
    plan.loss_scaling = options["scaling"]
