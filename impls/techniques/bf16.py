"""bf16 mixed precision: matmuls and convolutions run in bfloat16 under ``torch.autocast``, master
weights, gradients and optimizer state stay fp32.

bfloat16 keeps fp32's 8-bit exponent (range ~1e-38 to 3e38) with a 7-bit mantissa, so gradients do
not underflow and no loss scaling is needed (Kalamkar et al. 2019, "A Study of BFLOAT16 for Deep
Learning Training", arXiv 1905.12322); autocast keeps precision-sensitive ops (softmax,
cross-entropy, norms) in fp32 (Micikevicius et al. 2018).  Library: ``torch.autocast``.
"""
import torch

NAME = "bf16"
STAGE = "precision"
OPTIONS: dict = {}
CONFLICTS = {"fp16": "a run has one autocast dtype"}


def configure(plan, options):
    plan.autocast_dtype = torch.bfloat16
