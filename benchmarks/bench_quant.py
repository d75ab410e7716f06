"""Quantized training beside the fp32 baseline: int8 mixed-precision training (torchao's int8 GEMMs
in forward and backward), quantization-aware training with int8 and int4 fake-quantised weights
(int8 activations), and fp8 training where the device has float8 GEMMs; bf16 autocast is the
reduced-precision reference.

Every variant trains the same model on the same data to the same model-FLOP budget, so the records
(``<runs>/quant/quant-*.json``) line up for the loss gap at the same budget; memory is the exact
meters' (parameters, gradients, optimizer state, saved activations), and each technique's facts —
bits, the matmul ops a probe saw run (``aten._int_mm`` for int8), the exported QAT weight bytes —
are in ``technique_notes``.  :class:`QuantSpeed` times the main variants interleaved with the
baseline (speed ratios with intervals).  fp8 needs CUDA compute capability >= 8.9: elsewhere its
``setup`` raises ``NotImplementedError`` with the validation's reason (asv's skip), as the
numpy/pandas suites skip unsupported combinations.
"""
from __future__ import annotations

import functools
import math

from . import common

SETTINGS = {
    "quick": dict(model="nano", batch_size=8, seq_len=128, flops_budget=3e10, lr=3e-3, data="synthetic"),
    "full": dict(model="small", batch_size=16, seq_len=256, flops_budget=3e13, lr=1e-3, data="pycode"),
    "gpu": dict(model="gpt2", batch_size=16, seq_len=1024, flops_budget=5e14, lr=6e-4, data="pycode"),
}[common.profile_name()]

#: variant name -> (techniques, recipe overrides).  The knob is bits (weights' integer width).
VARIANTS = {
    "baseline": ([], {}),
    "bf16": (["bf16"], {}),
    "int8": (["int8"], {}),
    "qat-int8": (["qat:bits=8,group_size=32,act=int8"], {}),
    "qat-int4": (["qat:bits=4,group_size=32,act=int8"], {}),
    "fp8": (["fp8:scaling=tensorwise"], {}),
}

#: the interleaved speed comparison: the baseline and the main variants (fp8 joins where it runs)
SPEED_VARIANTS = ["baseline", "bf16", "int8", "qat-int4"]


_recipe = functools.partial(common.family_recipe, SETTINGS)


def refusal(name: str) -> str | None:
    """Why this machine cannot run variant ``name`` (its validation's one-line reason), or None."""
    from impls import train
    from impls.errors import ConfigError
    from impls.recipe import Recipe

    techniques, overrides = VARIANTS[name]
    try:
        train.check_recipe_fields(Recipe(techniques=techniques, flops_budget=SETTINGS["flops_budget"],
                                         **_recipe(**overrides)))
    except ConfigError as e:
        return str(e)
    return None


class Quant(common.BudgetedRuns):
    """Each quantized-training variant trained to the same model-FLOP budget as the baseline."""

    params = list(VARIANTS)

    def setup_cache(self):
        records = {}
        for name, (techniques, overrides) in VARIANTS.items():
            why = refusal(name)
            records[(name,)] = dict(refused=why) if why else common.train_record(
                f"quant-{name}", techniques=techniques, flops_budget=SETTINGS["flops_budget"], **_recipe(**overrides))
        return records

    setup_cache.timeout = 1800

    def setup(self, records, variant):
        why = records[(variant,)].get("refused")
        if why:
            raise NotImplementedError(why)

    track_flops_per_step = common.tracked_field("flops_per_step", unit="FLOPs")

    def track_weight_bits(self, records, variant):
        """Bits of the block Linears' weight operand in the matmuls: 32 fp32, 16 under bf16 autocast,
        else the technique's ``bits`` (int8 GEMMs, QAT's fake-quantised integer width, fp8)."""
        record = records[(variant,)]
        notes = record.get("technique_notes", {})
        for name in ("int8", "qat", "fp8"):
            if name in notes:
                return notes[name]["bits"]
        return 16 if record["precision"].startswith("bf16") else 32

    track_weight_bits.unit = "bits"

    def track_int8_gemms_per_linear_step(self, records, variant):
        """int8 GEMMs one block Linear runs per training step, counted by the technique's probe
        (3: forward, grad input, grad weight); NaN where no probe ran (no int8 technique)."""
        notes = records[(variant,)].get("technique_notes", {})
        return notes.get("int8", {}).get("int8_gemms_per_linear_step", math.nan)

    track_int8_gemms_per_linear_step.unit = "GEMMs"

    def track_exported_weight_bytes(self, records, variant):
        """QAT: bytes the block weights take once exported (``bits`` per weight packed + one fp32
        scale per group); NaN for the other variants (their weights stay as trained)."""
        notes = records[(variant,)].get("technique_notes", {})
        return notes.get("qat", {}).get("export_packed_bytes", math.nan)

    track_exported_weight_bytes.unit = "bytes"


@common.speed_tracks
class QuantSpeed:
    """The main variants timed interleaved with the fp32 baseline (impls.compare: rotated rounds,
    ratios per round, order-statistic intervals): int8 and QAT vs fp32 and vs bf16 on this device."""

    params = SPEED_VARIANTS + ["fp8"]
    param_names = ["variant"]

    def setup_cache(self):
        names = [n for n in self.params if refusal(n) is None]
        return common.compare_record("quant", {n: dict(techniques=VARIANTS[n][0], **VARIANTS[n][1]) for n in names},
                                     common=_recipe())

    setup_cache.timeout = 1800

    def setup(self, record, variant):
        if variant not in record["variants"]:
            raise NotImplementedError(refusal(variant) or f"{variant} is not in this comparison")
