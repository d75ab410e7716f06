"""1-bit Adam, 1-bit LAMB and 0/1 Adam: data parallelism whose gradient all-reduce sends about one
bit per element, through DeepSpeed's engine (:mod:`impls.engines.deepspeed_engine`).

1-bit Adam (Tang et al. 2021, "1-bit Adam: Communication Efficient Large-Scale Training with
Adam's Convergence Speed", ICML, arXiv 2102.02888) runs plain Adam for ``freeze_step`` warm-up
steps, then freezes the variance and communicates the momentum compressed to its sign (1 bit per
element) plus one fp32 scale per chunk, with error feedback (the compression error is added back
next step).  1-bit LAMB (Li et al. 2022, HiPC, arXiv 2104.06069) does the same for LAMB, with
frozen layer-wise scaling ratios; 0/1 Adam (Lu et al. 2022, arXiv 2202.06009) adapts the freezing
and skips rounds of communication.  DeepSpeed's compressed all-reduce is two phases (workers send
their signs and scale for each server chunk, each server averages, re-compresses and broadcasts
back); per rank it sends about n/8 + 4·(N_d + 1) bytes for an n-element buffer, against 4n for an
fp32 all-reduce's payload: a ratio of 32n / (n + 32·(N_d + 1)) ≈ 32.

Where it runs: the optimizers live in ``deepspeed.runtime.fp16.onebit`` and need DeepSpeed's
compressed communication backend — ``comm_backend_name`` "nccl" (CUDA, NCCL and ``cupy`` for the
bit packing), "mpi" (``mpi4py``, CUDA-aware MPI or host copies) or "compressed" (an accelerator's
packbits op) — and ZeRO stage 0 (they keep whole optimizer states).  DeepSpeed deleted the three
optimizers (deepspeedai/DeepSpeed#8490) and their compressed transports (#8547); the installed
version is checked, and a run is refused before any work, naming every missing piece: the
optimizers in this DeepSpeed, a CUDA device, cupy or mpi4py.  Where all are present the run goes
through the deepspeed engine with DeepSpeed's optimizer (type OneBitAdam / OneBitLamb /
ZeroOneAdam, ``freeze_step``) and the notes carry the compression ratio.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import ConfigError

NAME = "onebit"
STAGE = "engine"
OPTIONS = {"kind": "adam", "freeze_step": 100}
REQUIRES = ("deepspeed",)
CHOICES = {"kind": ("adam", "lamb", "zerooneadam")}
CONFLICTS = {"ddp": "1-bit optimizers all-reduce the (compressed) momentum themselves; a DDP wrap would all-reduce "
                    "the gradients a second time",
             "zero": "DeepSpeed's 1-bit optimizers keep whole optimizer states (ZeRO stage 0 only)"}
DATA_PARALLEL = True

#: kind -> (DeepSpeed optimizer type, its module under deepspeed.runtime.fp16.onebit)
OPTIMIZERS = {"adam": ("OneBitAdam", "adam"), "lamb": ("OneBitLamb", "lamb"), "zerooneadam": ("ZeroOneAdam", "zoadam")}


def _has(module: str) -> bool:
    """Whether ``module`` is installed, without importing it (nor its package: importing
    deepspeed costs seconds and logs)."""
    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if not rest:
        return True
    base = Path(spec.origin).parent.joinpath(*rest)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def missing_pieces(kind: str, device_type: str | None) -> list[str]:
    """What this machine lacks for ``kind`` (empty: it can run)."""
    missing = []
    _, module = OPTIMIZERS[kind]
    if not _has(f"deepspeed.runtime.fp16.onebit.{module}"):
        from importlib.metadata import version

        missing.append(f"the {OPTIMIZERS[kind][0]} optimizer in the installed DeepSpeed {version('deepspeed')} "
                       f"(deepspeed.runtime.fp16.onebit is absent: upstream deleted the 1-bit optimizers, "
                       f"deepspeedai/DeepSpeed#8490)")
    if device_type != "cuda":
        missing.append(f"a CUDA device for the NCCL compressed backend (this run: {device_type or 'unknown'}, gloo)")
    if not _has("cupy") and not _has("mpi4py"):
        missing.append("cupy (bit packing for comm_backend_name=nccl) or mpi4py (comm_backend_name=mpi)")
    return missing


def configure(plan, options):
    if options["freeze_step"] < 1:
        raise ConfigError(f"onebit:freeze_step must be >= 1 (steps of uncompressed warm-up), got {options['freeze_step']}")
    missing = missing_pieces(options["kind"], plan.device_type)
    if missing:
        raise ConfigError(f"onebit:kind={options['kind']} cannot run here: missing " + "; ".join(missing))


def check_recipe(recipe, options):
    wanted = "lamb" if options["kind"] == "lamb" else "adam"
    if recipe.optimizer != wanted:
        raise ConfigError(f"onebit:kind={options['kind']} replaces the optimizer with its 1-bit form of {wanted!r}; "
                          f"give --optimizer {wanted} (got {recipe.optimizer!r})")
    if recipe.steps is not None and recipe.steps <= options["freeze_step"]:
        raise ConfigError(f"onebit:freeze_step={options['freeze_step']} >= steps={recipe.steps}: every step would be "
                          f"uncompressed warm-up (a baseline run labelled onebit); lower freeze_step")


def compression(params: int, dp: int) -> dict:
    """Bytes per rank per step of DeepSpeed's compressed all-reduce of ``params`` elements vs the
    fp32 payload (signs packed 8 per byte, one fp32 worker scale and N_d server-chunk scales)."""
    compressed = params / 8 + 4 * (dp + 1)
    return dict(elements=params, fp32_bytes=4 * params, compressed_bytes=compressed,
                ratio=4 * params / compressed, formula="32n / (n + 32·(N_d + 1))")


def apply(build, options):
    r_type, _ = OPTIMIZERS[options["kind"]]
    build.engine = "deepspeed"
    params = sum(p.numel() for p in build.model.parameters())
    config = dict(zero_optimization=dict(stage=0),
                  optimizer=dict(type=r_type, params=dict(freeze_step=options["freeze_step"], cuda_aware=False,
                                                          comm_backend_name="nccl")))
    build.notes[NAME] = dict(kind=options["kind"], optimizer=r_type, freeze_step=options["freeze_step"],
                             dp=build.dims.dp, deepspeed_config=config,
                             compression=compression(params, build.dims.dp))
