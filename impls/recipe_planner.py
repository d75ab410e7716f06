"""``etbench plan --search recipes``: the fastest whole training recipe for model M on D devices
of X GiB and F FLOP/s at global batch B, from the layout planner's analytic cost model.

:mod:`impls.planner` ranks rank layouts; this module searches *recipes* on top of it: precision,
activation recomputation, ZeRO stage / FSDP, optimizer or parameter offload to the host, the
micro-batch size (hence gradient accumulation), 8-bit optimizer state and LoRA, combined with the
data- and tensor-parallel degrees (dp·tp = D; pipelines are the layout search's).  Each
:class:`RecipeCandidate` carries its predicted device memory by component (and the bytes kept on
the host), its predicted step time by component, why it was rejected (memory with the numbers,
divisibility, incompatible knobs), the names of the formulas used (:data:`FORMULAS`) and the
etbench :class:`~impls.recipe.Recipe` that runs it, or why etbench cannot.  ``--verify K``
dry-runs the top K (:func:`impls.dryrun.dry_run`, rank 0) and puts the measured bytes beside the
predicted ones.  Nothing here is measured; the assumptions (:data:`ASSUMPTIONS`) are printed.

What each knob changes (planner functions do the counting: :func:`~impls.planner.stage_tensors`,
:func:`~impls.planner.model_state_bytes`, :func:`~impls.planner.stage_activations`; the
communication and its overlap are :func:`~impls.planner.predict`'s for the candidate's layout):

* precision -- ``fp32``: 4+4+8 B/param (+4 B ``step`` per tensor), 4-byte activations, GEMMs at
  ``--device-fp32-flops`` (default half of ``--device-flops``: TF32 tensor cores are listed at half
  the bf16 rate, an ASSUMPTION).  ``bf16``: the ZeRO paper's mixed precision, 2+2+12 B/param
  (Rajbhandari et al. 2020, §3.1), 2-byte activations.  ``fp8``: mixed-precision states as bf16;
  the block Linears' three GEMMs (forward, grad input, grad weight) at ``--device-fp8-flops``
  (default 2x ``--device-flops``: the fp8 dense peak of an H100 is twice its bf16 peak, an
  ASSUMPTION for other devices), the attention core and the LM head at the bf16 rate (Micikevicius
  et al. 2022, arXiv 2209.05433; etbench's ``fp8`` converts the block Linears only).  Activations
  stay 2-byte: torchao's ``Float8Linear`` saves its *high-precision* input and weight for the
  backward and casts them again there (``matmul_with_hp_or_float8_args.forward``:
  ``ctx.save_for_backward(input_hp, weight_hp_t)``, torchao 0.18), so no saved tensor is 1-byte;
  a recipe storing fp8 GEMM inputs (Transformer Engine) would halve the Linear inputs' terms.
* recomputation -- ``none``; ``full`` per block (Chen et al. 2016): each layer keeps its input,
  one more forward of the blocks, 2·N_blocks + 4·L·H·Q·T per token; ``selective``: which
  Korthikanti terms of which layers to drop so that the device fits at the least recompute FLOPs
  (Korthikanti et al. 2022, arXiv 2205.05198, Eq. 1 and §5, which recomputes the attention core's
  5as/h term), an exact knapsack equivalent to torch's ``sac_ilp`` (:mod:`impls.selective_recompute`).
* ZeRO stage 0-3 (3 = FSDP) over dp, as :func:`~impls.planner.model_state_bytes`.
* offload (stages 2-3) -- ``optimizer`` (ZeRO-Offload, Ren et al. 2021, arXiv 2101.06840, §4):
  each rank's gradient and optimizer-state partitions live on the host, the update runs there
  (CPU Adam at ``--host-adam-rate`` parameters/s), every micro-batch's gradient partition goes
  down the host link and the updated 16-bit partition comes back once; ``params`` (ZeRO-Infinity,
  Rajbhandari et al. 2021, arXiv 2104.07857, §5): the parameter partitions too, fetched up the
  link for every micro-batch's forward and backward.  Link: ``--host-link-gbps`` (default 200
  Gbit/s = 25 GB/s per direction, PCIe Gen4 x16's 32 GB/s less protocol overhead, an ASSUMPTION).
* micro-batch size b and accumulation m = B/(dp·b): activations of one micro-batch; the ZeRO-2/3
  per-micro-batch collectives are :func:`~impls.planner.predict`'s.
* ``adamw8bit`` (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization", arXiv
  2110.02861, §2): two 8-bit moments and one fp32 absmax per 256-element block of each, K =
  2 + 8/256 = 2.03125 B/param (:data:`impls.measure.model_states.K_FP32`), + 4 B fp32 master with
  mixed precision; tensors under bitsandbytes' ``min_8bit_size`` (4096 elements) keep fp32 state.
* LoRA (Hu et al. 2021, arXiv 2106.09685, §4.1-4.2) of rank ``--lora-rank`` on each block's qkv,
  proj, up and down as etbench's ``lora`` does: r(m+n) adapter parameters per m×n matrix, trained
  with grads and optimizer state; the base is frozen in the parameter dtype.  FLOPs per token
  4·N_base + 6·N_adapter + 12·L·H·Q·T: the backward still computes the activation gradients
  through the frozen matrices (2N) but no weight gradients for them.  Only the adapters' gradients
  are reduced over dp (and, at stages 1-2, all-gathered); ZeRO-3 still gathers the frozen base.

The step time is :func:`~impls.planner.predict`'s for the candidate's layout (tensor- and
data-parallel traffic, the overlap rule, the exposed remainder), evaluated at the candidate's
compute time -- an effective peak chosen so that predict's compute equals the candidate's
executed FLOPs at its precisions' rates -- and at the bytes the candidate communicates per
parameter (LoRA: the trainable fraction), plus the exposed offload time.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from itertools import islice

from . import planner, selective_recompute
from .errors import ConfigError
from .planner import GIB, PRECISIONS, STAGE_NAMES, Hardware, Layout, Precision
from .selective_recompute import Item

#: Candidates evaluated at most (under a minute on a laptop core); a narrower search brings more under it.
MAX_CANDIDATES = 100_000
PRECISION_CHOICES = ("fp32", "bf16", "fp8")
RECOMPUTE = ("none", "full", "selective")
OFFLOADS = ("none", "optimizer", "params")
OPTIMIZERS = ("adamw", "adamw8bit")
LORA = {"off": (False,), "on": (True,), "both": (False, True)}
#: Defaults of the stated assumptions (see the module docstring and :data:`ASSUMPTIONS`).
FP8_OVER_BF16, FP32_OVER_BF16 = 2.0, 0.5
HOST_LINK_GBPS = 200.0
#: CPU Adam is memory-bound: ~30 bytes move per parameter (fp32 master, two moments read and
#: written, the gradient read, the 16-bit copy written); 2e9 params/s is ~60 GB/s of host memory
#: bandwidth per device -- an assumed share of a host, not a measurement.
HOST_ADAM_RATE = 2e9
HOST_MEM = 256 * GIB  # per device: e.g. 2 TiB of host memory shared by 8 devices

SOURCES = {
    "ren": "Ren et al. 2021, ZeRO-Offload (arXiv 2101.06840) §4",
    "infinity": "Rajbhandari et al. 2021, ZeRO-Infinity (arXiv 2104.07857) §5",
    "dettmers": "Dettmers et al. 2022, 8-bit Optimizers via Block-wise Quantization (arXiv 2110.02861) §2",
    "hu": "Hu et al. 2021, LoRA (arXiv 2106.09685) §4.1-4.2",
    "micikevicius": "Micikevicius et al. 2022, FP8 Formats for Deep Learning (arXiv 2209.05433)",
    "korthikanti5": "Korthikanti et al. 2022 (arXiv 2205.05198) Eq. 1, §5 selective activation recomputation",
}
FORMULAS: dict[str, str] = {
    "precision_mixed": "bf16/fp8: 2+2+12 B/param, 2-byte activations [" + planner.SOURCES["zero"] + "]",
    "adam8bit_state": "K = 2 + 8/256 B/param (+4 fp32 master with mixed); tensors < 4096 elements keep fp32 "
                      "state [" + SOURCES["dettmers"] + "]",
    "lora_states": "adapters r(m+n) per block qkv/proj/up/down with grads + optimizer; base frozen in the param "
                   "dtype [" + SOURCES["hu"] + "]",
    "lora_flops": "4N_base + 6N_adapter + 12LHQT per token: no weight gradients of frozen matrices "
                  "[" + SOURCES["hu"] + "]",
    "gemm_rates": "block Linear GEMMs at the precision's peak (fp8: --device-fp8-flops, fp32: --device-fp32-flops), "
                  "attention core and LM head at bf16 (fp32 for fp32) [" + SOURCES["micikevicius"] + "]",
    "fp8_activations_high_precision": "torchao's Float8Linear saves its high-precision input: activations as bf16",
    "recompute_blocks_forward": "full recomputation: one more forward of the blocks, 2N_blocks + 4LHQT per token",
    "selective_knapsack": "exact min-FLOPs bounded 0/1 knapsack over per-layer Korthikanti terms (torch sac_ilp's "
                          "problem) + one layer's recomputed terms live [" + SOURCES["korthikanti5"] + "]",
    "zero_offload": "gradient + optimizer partitions on the host, CPU Adam, m gradient partitions down and the "
                    "updated 16-bit partition up the host link [" + SOURCES["ren"] + "]",
    "zero_infinity_params": "parameter partitions on the host, fetched for every micro-batch's forward and "
                            "backward [" + SOURCES["infinity"] + "]",
    "predict_comm_at_candidate_rates": "TP/DP traffic, overlap and exposure of planner.predict at the candidate's "
                                       "compute time and communicated bytes per parameter",
}
ASSUMPTIONS = (
    "fp8 GEMMs run at --device-fp8-flops (default 2x --device-flops, an H100's fp8/bf16 dense ratio) and fp32 "
    "GEMMs at --device-fp32-flops (default 0.5x: TF32 tensor cores); the attention core and LM head run at the "
    "bf16 (fp32) rate; the same --mfu applies to every rate.",
    "Offload: --host-link-gbps per device and direction (default 200 Gbit/s = 25 GB/s, PCIe Gen4 x16), CPU Adam at "
    "--host-adam-rate parameters/s per device (default 2e9, memory-bound), --host-mem per device (default "
    "256 GiB).  Gradient partitions go down during the backward and parameter fetches overlap the compute (the "
    "excess is exposed); the CPU update and the parameter upload after it are exposed (no delayed update).",
    "Selective recomputation's elementwise costs are rough FLOPs/element (norm 5, softmax 5, dropout 1, GELU 8, "
    "SwiGLU 5); layers may differ in what they drop; one layer's recomputed terms are live in its backward.",
    "Data-parallel overlap windows come from planner.predict, which splits compute 1:2 (1:3 with full "
    "recomputation) into forward and backward; LoRA's backward is shorter than that split, so its window is "
    "slightly optimistic.",
    "LoRA is a fine-tuning method (it trains adapters, not the model): searched only with --lora on|both.",
    "Tensor parallelism without sequence parallelism, no pipeline parallelism (--search layouts has both).",
)


# --------------------------------------------------------------------------------------------
# Inputs and candidates
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rates:
    """The device's other peaks and the host side of offload (see :data:`ASSUMPTIONS`)."""

    fp8_flops: float
    fp32_flops: float
    host_link_gbps: float = HOST_LINK_GBPS
    host_adam_rate: float = HOST_ADAM_RATE
    host_mem: float = HOST_MEM

    @classmethod
    def default(cls, hw: Hardware, **kw) -> Rates:
        return cls(hw.device_flops * FP8_OVER_BF16, hw.device_flops * FP32_OVER_BF16, **kw)


@dataclass(frozen=True)
class Knobs:
    precision: str  # fp32 | bf16 | fp8
    recompute: str  # none | full | selective
    dp: int
    tp: int
    zero_stage: int
    offload: str  # none | optimizer | params
    optimizer: str  # adamw | adamw8bit
    lora: bool
    micro_batch_size: int
    micro_batches: int

    @property
    def label(self) -> str:
        parts = [self.precision, f"dp{self.dp}"] + ([f"tp{self.tp}"] if self.tp > 1 else [])
        parts.append(STAGE_NAMES[self.zero_stage] + ({"optimizer": "+off-opt", "params": "+off-param"}
                                                     .get(self.offload, "")))
        parts += (["8bit"] if self.optimizer == "adamw8bit" else []) + (["lora"] if self.lora else [])
        parts.append(f"m{self.micro_batches}x{self.micro_batch_size}")
        return " ".join(parts + ({"none": [], "full": ["ckpt"], "selective": ["sel"]}[self.recompute]))

    def layout(self, micro_batches: int | None = None) -> Layout:
        return Layout(self.dp, self.tp, 1, self.zero_stage, "none", 1, self.micro_batch_size,
                      self.micro_batches if micro_batches is None else micro_batches, self.recompute == "full")


@dataclass
class RecipeCandidate:
    """One recipe's prediction: device bytes by component (``memory``), host bytes (``host``),
    seconds by component (``time``), why it is rejected (``kind``/``reason``, None if it fits),
    the formulas used, and its etbench recipe (``recipe``, or ``recipe_reason``)."""

    knobs: Knobs
    fits: bool = False
    kind: str | None = None  # incompatible | divisibility | redundant | memory | None
    reason: str | None = None
    memory: dict[str, float] = field(default_factory=dict)
    memory_total: float | None = None
    host: dict[str, float] = field(default_factory=dict)
    activation_terms: dict[str, float] = field(default_factory=dict)
    recomputed: dict[str, int] = field(default_factory=dict)  # selective: term -> layers that drop it
    time: dict[str, float] = field(default_factory=dict)
    step_time: float | None = None
    predicted_mfu: float | None = None
    traffic_bytes: float | None = None  # DP + TP bytes a device sends per step
    formulas: tuple[str, ...] = ()
    recipe: dict | None = None
    recipe_argv: list[str] | None = None
    recipe_reason: str | None = None
    recipe_notes: list[str] = field(default_factory=list)
    recipe_states: dict[str, float] | None = None  # model states of the etbench recipe as it stores them
    recipe_comm_widths: dict | None = None  # bytes its collectives move per parameter / activation element
    recipe_fits: bool | None = None  # False: etbench's implementation needs more than the device (see the notes)
    verification: dict | None = None

    @property
    def label(self) -> str:
        return self.knobs.label

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["label"] = self.label
        return out


@dataclass(frozen=True)
class Context:
    model: str
    counts: planner.ModelCounts
    hw: Hardware
    rates: Rates
    seq_len: int
    global_batch: int
    attention: str = "stored"
    overlap: str = "dp"
    bucket_mb: float = 25.0
    lora_rank: int = 16

    @property
    def cfg(self):
        return self.counts.cfg


# --------------------------------------------------------------------------------------------
# Model states
# --------------------------------------------------------------------------------------------

def state_precision(precision: str, optimizer: str) -> Precision:
    """Bytes per parameter of a precision (fp32 | bf16/fp8 mixed) and optimizer (adamw | adamw8bit)."""
    from .measure.model_states import K_FP32, MASTER_BYTES  # (measure imports torch: not at the CLI's start)

    base = PRECISIONS["fp32" if precision == "fp32" else "mixed"]
    if optimizer == "adamw":
        return base
    k = K_FP32["adamw8bit"] + (0.0 if precision == "fp32" else MASTER_BYTES)
    return dataclasses.replace(base, name=base.name + "+8bit", k=k, step_bytes=0,
                               about=base.about + "; 8-bit AdamW state (2 + 8/256 B)")


def states_of(shapes, dp: int, stage: int, prec: Precision, eight_bit: bool) -> dict[str, float]:
    """:func:`~impls.planner.model_state_bytes` of ``shapes``; with 8-bit state, tensors under
    bitsandbytes' ``min_8bit_size`` keep its fp32 moments (K of AdamW, no step tensor)."""
    from .measure.model_states import K_FP32, MASTER_BYTES
    from .optimizers import MIN_8BIT_SIZE  # bitsandbytes' min_8bit_size: smaller tensors keep fp32 state

    out = planner.model_state_bytes(shapes, dp, stage, prec)
    if eight_bit:
        big = [s for s in shapes if math.prod(s) >= MIN_8BIT_SIZE]
        small = [s for s in shapes if math.prod(s) < MIN_8BIT_SIZE]
        full = dataclasses.replace(prec, k=K_FP32["adamw"] + (MASTER_BYTES if prec.param_bytes < 4 else 0.0))
        out["optimizer"] = (planner.model_state_bytes(big, dp, stage, prec)["optimizer"] if big else 0.0) + \
            (planner.model_state_bytes(small, dp, stage, full)["optimizer"] if small else 0.0)
    return out


def lora_shapes(cfg, rank: int) -> list[tuple[int, int]]:
    """The adapters of every block: A (r×n) and B (m×r) per adapted m×n matrix (qkv, proj, up,
    down: :func:`impls.techniques.lowrank.target_shapes`, the matrices etbench's lora adapts)."""
    from .techniques import lowrank

    per_block = [s for m, n in lowrank.target_shapes(cfg).values() for s in ((rank, n), (m, rank))]
    return per_block * cfg.n_layer


def model_states(ctx: Context, k: Knobs, prec: Precision) -> tuple[dict, dict, list[str]]:
    """(device bytes, host bytes, formula names) of params/grads/optimizer on rank 0."""
    shapes = planner.stage_tensors(ctx.counts, k.tp, 1, 0)
    eight = k.optimizer == "adamw8bit"
    names = ["param_count_meta", "zero_model_states"] + (["tp_megatron_sharding"] if k.tp > 1 else [])
    names += (["precision_mixed"] if prec.param_bytes < 4 else []) + (["adam8bit_state"] if eight else [])
    names += {1: ["zero_flat_partition"], 2: ["zero_flat_partition"], 3: ["fsdp2_dim0_padding"]}.get(
        k.zero_stage if k.dp > 1 else 0, [])
    if k.lora:
        names.append("lora_states")
        base = planner.model_state_bytes(shapes, k.dp, k.zero_stage, prec)["params"]  # frozen: params only
        states = states_of(lora_shapes(ctx.cfg, ctx.lora_rank), k.dp, k.zero_stage, prec, eight)
        states["params"] += base
    else:
        states = states_of(shapes, k.dp, k.zero_stage, prec, eight)
    host = {}
    if k.offload != "none":
        names.append("zero_offload")
        host = {"grads": states["grads"], "optimizer": states["optimizer"]}
        states["grads"] = states["optimizer"] = 0.0
        if k.offload == "params":
            names.append("zero_infinity_params")
            host["params"], states["params"] = states["params"], 0.0
    return states, host, names


# --------------------------------------------------------------------------------------------
# Step time
# --------------------------------------------------------------------------------------------

def _matmul_split(ctx: Context) -> tuple[int, int]:
    """(N of the blocks' matrices, N of the rest: the LM head) of the 6N of model FLOPs."""
    blocks = sum(math.prod(t.shape) for t in ctx.counts.tensors if isinstance(t.part, int) and len(t.shape) == 2)
    return blocks, ctx.counts.matmul_params - blocks


def compute_flops(ctx: Context, k: Knobs, recomputed: dict[str, int], items: list[Item]) -> dict[str, dict]:
    """One device's executed FLOPs of a step by phase (forward, backward, recompute) and by rate
    (``gemm``: the block Linears at the precision's GEMM rate; ``other``: attention core, LM head)."""
    cfg, s = ctx.cfg, ctx.seq_len
    tokens = ctx.global_batch * s / ctx.hw.devices
    attn = 4 * cfg.n_layer * cfg.n_head * cfg.head_dim * s  # forward per token; 12LHQT for fwd + bwd
    n_block, n_head = _matmul_split(ctx)
    n_adapter = sum(math.prod(x) for x in lora_shapes(cfg, ctx.lora_rank)) if k.lora else 0
    block_wgrad = n_adapter if k.lora else n_block
    head_wgrad = 0 if k.lora else n_head
    out = {"forward": {"gemm": 2 * (n_block + n_adapter) * tokens, "other": (2 * n_head + attn) * tokens},
           "backward": {"gemm": (2 * (n_block + n_adapter) + 2 * block_wgrad) * tokens,
                        "other": (2 * n_head + 2 * head_wgrad + 2 * attn) * tokens},
           "recompute": {"gemm": 0.0, "other": 0.0}}
    if k.recompute == "full":
        out["recompute"] = {"gemm": 2 * (n_block + n_adapter) * tokens, "other": attn * tokens}
    elif k.recompute == "selective":
        m = k.micro_batches
        out["recompute"] = {"gemm": m * sum(it.gemm * recomputed.get(it.name, 0) for it in items),
                            "other": m * sum(it.other * recomputed.get(it.name, 0) for it in items)}
    return out


def model_flops_per_step(ctx: Context, lora: bool) -> float:
    """The algorithm's FLOPs of a step (MFU's numerator): 6N + 12LHQT per token (PaLM App. B), or
    LoRA's 4N_base + 6N_adapter + 12LHQT."""
    from .measure.flops import model_flops_per_token

    cfg, s = ctx.cfg, ctx.seq_len
    per_token = model_flops_per_token(ctx.counts.matmul_params, cfg.n_layer, cfg.n_head, cfg.head_dim, s)
    if lora:
        per_token += -2 * ctx.counts.matmul_params + 6 * sum(math.prod(x) for x in lora_shapes(cfg, ctx.lora_rank))
    return per_token * ctx.global_batch * s


def _rates(ctx: Context, precision: str) -> dict[str, float]:
    hw, r = ctx.hw, ctx.rates
    if precision == "fp32":
        return {"gemm": r.fp32_flops, "other": r.fp32_flops}
    return {"gemm": r.fp8_flops if precision == "fp8" else hw.device_flops, "other": hw.device_flops}


def comm_widths(ctx: Context, k: Knobs, prec: Precision) -> Precision:
    """Bytes communicated per parameter of the device's Ψ: LoRA reduces (and at stages 1-2
    all-gathers) only the adapters, so its widths are scaled by the trainable fraction."""
    if not k.lora:
        return prec
    psi = sum(math.prod(x) for x in planner.stage_tensors(ctx.counts, k.tp, 1, 0))
    frac = sum(math.prod(x) for x in lora_shapes(ctx.cfg, ctx.lora_rank)) / psi
    params = prec.param_bytes * (1 + frac) if k.zero_stage == 3 else prec.param_bytes * frac
    return dataclasses.replace(prec, param_bytes=params, grad_bytes=prec.grad_bytes * frac)


def predict_at(ctx: Context, layout: Layout, widths: Precision, seconds: float) -> planner.Prediction:
    """:func:`planner.predict` of ``layout`` with its compute equal to ``seconds``: the device's
    peak is replaced by the effective one that makes predict's documented compute (model FLOPs x
    4/3 with full recomputation / (devices x peak x MFU)) come out as ``seconds``."""
    hw = ctx.hw
    executed = model_flops_per_step(ctx, False) * (4 / 3 if layout.checkpointing else 1)
    eff = dataclasses.replace(hw, device_flops=executed / (hw.devices * hw.mfu * seconds))
    pred = planner.predict(ctx.counts, layout, eff, ctx.seq_len, ctx.global_batch, widths, attention=ctx.attention,
                           overlap=ctx.overlap, bucket_mb=ctx.bucket_mb)
    if not math.isclose(pred.time["compute"], seconds, rel_tol=1e-9):
        raise AssertionError(f"planner.predict's compute {pred.time['compute']} != {seconds}: its formula changed")
    return pred


def offload_time(ctx: Context, k: Knobs, host: dict, prec: Precision, forward: float, backward: float) -> dict:
    """Seconds of the offload's host traffic and CPU update (ZeRO-Offload §4, ZeRO-Infinity §5).
    The gradient partitions go down during the backward, parameter fetches overlap the compute,
    the CPU Adam and the upload of the updated partition are exposed."""
    if k.offload == "none":
        return {"offload": 0.0, "offload_total": 0.0}
    bw = ctx.rates.host_link_gbps * 1e9 / 8
    m = k.micro_batches
    down = m * host["grads"] / bw
    partition = host["grads"] / prec.grad_bytes  # the parameters of the rank's partition
    adam = partition / ctx.rates.host_adam_rate
    fetch = 2 * m * host["params"] / bw if k.offload == "params" else 0.0
    upload = 0.0 if k.offload == "params" else partition * prec.param_bytes / bw
    exposed = max(0.0, down - backward) + max(0.0, fetch - forward - backward) + adam + upload
    return {"offload": exposed, "offload_total": down + fetch + adam + upload, "cpu_adam": adam}


def step_time(ctx: Context, k: Knobs, prec: Precision, host: dict, recomputed: dict, items: list) -> dict:
    """Seconds by component, the step, the model-FLOPs MFU and the traffic bytes of a candidate."""
    flops, rates, hw = compute_flops(ctx, k, recomputed, items), _rates(ctx, k.precision), ctx.hw
    sec = {phase: sum(f / (rates[kind] * hw.mfu) for kind, f in parts.items()) for phase, parts in flops.items()}
    total = sec["forward"] + sec["backward"] + sec["recompute"]
    pred = predict_at(ctx, k.layout(), comm_widths(ctx, k, prec), total)
    off = offload_time(ctx, k, host, prec, sec["forward"], sec["backward"] + sec["recompute"])
    step = pred.step_time + off["offload"]
    times = {"compute": sec["forward"] + sec["backward"], "recompute": sec["recompute"],
             "tp_comm": pred.time["tp_comm"],
             "dp_comm_exposed": pred.time["dp_comm_exposed"], "dp_comm_total": pred.time["dp_comm_total"], **off}
    traffic = pred.time["dp_comm_total"] * hw.link_bytes_per_s + pred.time["tp_comm"] * hw.tp_bytes_per_s
    mfu = model_flops_per_step(ctx, k.lora) / (step * hw.devices * hw.device_flops)
    return dict(time=times, step=step, mfu=mfu, traffic=traffic, formulas=pred.formulas)


# --------------------------------------------------------------------------------------------
# One candidate
# --------------------------------------------------------------------------------------------

def incompatible(ctx: Context, k: Knobs) -> str | None:
    """Why these knobs do not combine (None: they do)."""
    if k.offload != "none" and k.zero_stage < 2:
        return (f"offload={k.offload} needs ZeRO stage 2 or 3: ZeRO-Offload moves each rank's gradient and optimizer "
                f"partitions to the host (Ren et al. 2021 §4.1); stage {k.zero_stage} keeps whole gradients")
    if k.offload == "params" and k.zero_stage != 3:
        return "offload=params needs ZeRO stage 3: only partitioned parameters can live on the host (ZeRO-Infinity)"
    if k.offload != "none" and k.optimizer == "adamw8bit":
        return "offload with adamw8bit: the host update (DeepSpeedCPUAdam) keeps fp32 moments, no 8-bit state"
    if k.lora and k.offload != "none":
        adapters = sum(math.prod(x) for x in lora_shapes(ctx.cfg, ctx.lora_rank))
        return (f"LoRA with offload: the trainable state is {adapters:,} adapter parameters; offloading it saves "
                f"almost nothing and adds host transfers and a CPU update")
    if k.lora and k.tp > 1:
        return ("LoRA with tensor parallelism: etbench's tp shards the base Linears as DTensors, peft's adapters "
                "have no TP plan")
    return None


def evaluate(ctx: Context, k: Knobs) -> RecipeCandidate:
    """The prediction of one candidate (rejected with the reason where it cannot run or fit)."""
    cand = RecipeCandidate(k)
    why = incompatible(ctx, k)
    if why:
        cand.kind, cand.reason = "incompatible", why
        return cand
    why = planner.divisibility(ctx.cfg, k.layout(), ctx.global_batch)
    if why:
        cand.kind, cand.reason = "divisibility", "divisibility: " + "; ".join(why)
        return cand
    prec = state_precision(k.precision, k.optimizer)
    states, host, names = model_states(ctx, k, prec)
    items: list[Item] = []
    if k.recompute == "selective":
        plan = selective_recompute.plan(ctx.counts, k.layout(), ctx.seq_len, prec, ctx.attention,
                                        ctx.hw.device_mem - sum(states.values()))
        if plan is None:
            cand.kind, cand.reason = "redundant", "fits without recomputation: the same recipe as recompute=none"
            return cand
        act, terms, cand.recomputed, items, act_names = plan
    else:
        act, terms, act_names = planner.stage_activations(ctx.counts, k.layout(), 0, ctx.seq_len, prec, ctx.attention)
    names += act_names + (["fp8_activations_high_precision"] if k.precision == "fp8" else [])
    cand.memory, cand.activation_terms, cand.host = {**states, "activations": act}, terms, host
    cand.memory_total = sum(cand.memory.values())
    if cand.memory_total > ctx.hw.device_mem:
        cand.kind = "memory"
        cand.reason = planner.memory_reason(cand.memory, cand.memory_total, ctx.hw.device_mem, 0, 1)
    elif sum(host.values()) > ctx.rates.host_mem:
        cand.kind = "memory"
        cand.reason = (f"does not fit the host: offloaded {sum(host.values()) / GIB:.1f} GiB > --host-mem "
                       f"{ctx.rates.host_mem / GIB:.1f} GiB per device")
    cand.fits = cand.kind is None
    if cand.fits:
        t = step_time(ctx, k, prec, host, cand.recomputed, items)
        cand.time, cand.step_time, cand.predicted_mfu, cand.traffic_bytes = t["time"], t["step"], t["mfu"], t["traffic"]
        names += ["gemm_rates", "model_flops_palm", "compute_at_stated_mfu", "predict_comm_at_candidate_rates"]
        names += (["lora_flops"] if k.lora else []) + (["recompute_blocks_forward"] if k.recompute == "full" else [])
        names += [n for n in t["formulas"] if n.startswith(("tp_", "zero", "overlap"))]
    cand.formulas = tuple(dict.fromkeys(names))
    return cand


# --------------------------------------------------------------------------------------------
# Enumeration and ranking
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Search:
    """The values searched in each dimension."""

    precisions: tuple[str, ...] = PRECISION_CHOICES
    recompute: tuple[str, ...] = RECOMPUTE
    stages: tuple[int, ...] = (0, 1, 2, 3)
    offloads: tuple[str, ...] = OFFLOADS
    optimizers: tuple[str, ...] = OPTIMIZERS
    lora: tuple[bool, ...] = (False,)
    tps: tuple[int, ...] | None = None  # None: the divisors of the devices up to 8
    micro_batch_sizes: tuple[int, ...] | None = None  # None: powers of two up to global/dp


def knobs_of(devices: int, global_batch: int, search: Search):
    """Every candidate's knobs (a generator).  dp = 1 partitions nothing: stage 0, or stages 2-3
    only to offload (ZeRO-Offload on one device)."""
    tps = search.tps or tuple(t for t in range(1, min(devices, 8) + 1) if devices % t == 0)
    for tp in tps:
        dp = devices // tp
        top = max(1, global_batch // dp)
        mbs = search.micro_batch_sizes or tuple(1 << i for i in range(top.bit_length()))
        for z in search.stages:
            for off in search.offloads:
                if dp == 1 and (z > 0) != (off != "none"):
                    continue
                for prec in search.precisions:
                    for opt in search.optimizers:
                        for lora in search.lora:
                            for b in mbs:
                                m = max(1, global_batch // (dp * b))
                                for rc in search.recompute:
                                    yield Knobs(prec, rc, dp, tp, z, off, opt, lora, b, m)


@dataclass
class RecipePlan:
    """What :func:`plan_recipes` returns: the inputs, the fitting candidates best first, the rest."""

    ctx: Context
    search: Search
    ranked: list[RecipeCandidate] = field(default_factory=list)
    rejected: list[RecipeCandidate] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        from .families import RECIPE_PLAN
        from .provenance import SCHEMA_VERSION, provenance

        c = self.ctx
        kinds: dict[str, int] = {}
        for r in self.rejected:
            kinds[r.kind] = kinds.get(r.kind, 0) + 1
        return {"kind": RECIPE_PLAN, "schema": SCHEMA_VERSION, **provenance(), "model": c.model, "psi": c.counts.psi,
                "hardware": dataclasses.asdict(c.hw), "rates": dataclasses.asdict(c.rates), "seq_len": c.seq_len,
                "global_batch": c.global_batch, "attention": c.attention, "overlap": c.overlap,
                "lora_rank": c.lora_rank, "search": dataclasses.asdict(self.search), "seconds": self.seconds,
                "assumptions": list(planner.ASSUMPTIONS) + list(ASSUMPTIONS),
                "formulas": {**planner.FORMULAS, **FORMULAS}, "rejected_by_kind": kinds,
                "ranked": [x.as_dict() for x in self.ranked],
                "rejected": [{"label": x.label, "knobs": dataclasses.asdict(x.knobs), "kind": x.kind,
                              "reason": x.reason,
                              "memory_total": x.memory_total} for x in self.rejected]}


def plan_recipes(model: str, hw: Hardware, *, seq_len: int, global_batch: int, rates: Rates | None = None,
                 search: Search | None = None, attention: str = "stored", overlap: str = "dp",
                 bucket_mb: float = 25.0, lora_rank: int = 16) -> RecipePlan:
    """Evaluate every candidate (:func:`knobs_of`) and rank those that fit by predicted step time."""
    t0 = time.perf_counter()
    planner.check_inputs(model, hw, seq_len, global_batch, "mixed", attention, overlap)
    search = search or Search()
    n = sum(1 for _ in islice(knobs_of(hw.devices, global_batch, search), MAX_CANDIDATES + 1))
    if n > MAX_CANDIDATES:
        raise ConfigError(f"--devices {hw.devices} with --global-batch {global_batch} gives more than "
                          f"{MAX_CANDIDATES:,} recipes to evaluate; valid: a narrower search (--precisions, "
                          f"--recompute, --stages, --offload, --optimizers, --tp, --micro-batch-sizes)")
    ctx = Context(model, planner.model_counts(model), hw, rates or Rates.default(hw), seq_len, global_batch,
                  attention, overlap, bucket_mb, lora_rank)
    result = RecipePlan(ctx, search)
    for knobs in knobs_of(hw.devices, global_batch, search):
        cand = evaluate(ctx, knobs)
        (result.ranked if cand.fits else result.rejected).append(cand)
    result.ranked.sort(key=lambda c: (c.step_time, c.memory_total))
    from . import recipe_runs  # the etbench recipe of each fitting candidate

    for cand in result.ranked:
        recipe_runs.map_recipe(ctx, cand)
    result.seconds = time.perf_counter() - t0
    return result
