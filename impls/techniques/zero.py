"""ZeRO: data parallelism that partitions the model states over the ``dp`` ranks instead of
replicating them (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models", SC20, arXiv 1910.02054), through DeepSpeed's engine
(:mod:`impls.engines.deepspeed_engine`).

With Ψ parameters, mixed-precision Adam holds 2Ψ (16-bit params) + 2Ψ (16-bit grads) + KΨ
(fp32 master params, momentum, variance: K = 12) per replica under DDP.  Stage 1 (P_os)
partitions the optimizer states: 4Ψ + KΨ/N_d; stage 2 (P_os+g) the gradients too:
2Ψ + (2+K)Ψ/N_d; stage 3 (P_os+g+p) the parameters too: (4+K)Ψ/N_d, gathering each layer's
parameters just before it runs (paper §5).  In fp32 (no precision technique) the paper's
equivalents are params 4Ψ, grads 4Ψ, Adam 8Ψ, with the sharded parts divided by N_d — but
DeepSpeed keeps its fp32 master partition (4Ψ/N_d) even when the module is fp32, so the measured
optimizer bytes are 12Ψ/N_d, not 8Ψ/N_d (the record says so).

ZeRO-Offload (Ren et al. 2021, "ZeRO-Offload: Democratizing Billion-Scale Model Training", USENIX
ATC, arXiv 2101.06840): ``offload_optimizer=cpu`` keeps the fp32 master partition, gradient
partition and optimizer moments in host memory and runs the update there (DeepSpeedCPUAdam, a
vectorised C++ Adam, for adam/adamw); ``offload_param=cpu`` (stage 3 only, ZeRO-Infinity, Rajbhandari
et al. 2021, arXiv 2104.07857) keeps the parameter partitions in host memory too.  On a CPU-only
machine the "device" *is* the host: nothing moves, and the notes say so with the bytes that
would have left a GPU.

``offload_optimizer=cpu`` with adam/adamw runs DeepSpeedCPUAdam, a C++ op that ``make setup`` builds
(:mod:`impls.engines.deepspeed_ops`); where that build failed, or cannot happen (no compiler,
ninja or Python headers), the option is refused before any work, in one line with the reason.

Options: ``stage`` 1|2|3, ``offload_optimizer`` none|cpu, ``offload_param`` none|cpu (stage 3),
``bucket_mb`` (DeepSpeed's ``reduce_bucket_size``/``allgather_bucket_size``, and stage 3's
prefetch bucket, in MiB of fp32 elements).  A bf16/fp16 precision technique switches DeepSpeed's
bf16/fp16 mode on (16-bit parameters and gradients, fp32 master copy: ``plan.low_precision_params``)
instead of autocast.  Stage 3 partitions *every* parameter (``stage3_param_persistence_threshold``
0; DeepSpeed's default keeps tensors under 10^5 elements whole on every rank, which on a small
model would be all of them).  This technique replaces the ``ddp`` wrap (it reduces gradients
itself); meshes with tp/cp/pp are refused (DeepSpeed would need an ``mpu`` for them).
"""
from __future__ import annotations

from ..errors import ConfigError

NAME = "zero"
STAGE = "engine"
OPTIONS = {"stage": 2, "offload_optimizer": "none", "offload_param": "none", "bucket_mb": 25.0}
REQUIRES = ("deepspeed",)
CHOICES = {"stage": (1, 2, 3), "offload_optimizer": ("none", "cpu"), "offload_param": ("none", "cpu")}
CONFLICTS = {"ddp": "zero reduces (and partitions) the gradients itself inside DeepSpeed's engine; a DDP wrap "
                    "would all-reduce them a second time"}
#: Does its own data parallelism: no default ``ddp`` is added when dp > 1.
DATA_PARALLEL = True

#: The ZeRO paper's K for Adam with fp32 master weights (master params, momentum, variance).
K_ADAM = 12
#: K per optimizer the engine runs: bytes per parameter of fp32 master copy plus optimizer state.
K_BY_OPTIMIZER = {"adamw": K_ADAM, "adam": K_ADAM, "sgd": 8}  # SGD: master 4 + momentum 4


def configure(plan, options):
    if options["offload_param"] != "none" and options["stage"] != 3:
        raise ConfigError(f"zero:offload_param={options['offload_param']} needs stage=3 (only ZeRO-3 partitions "
                          f"the parameters, so only it can keep them off the device); got stage={options['stage']}")
    if not options["bucket_mb"] > 0:
        raise ConfigError(f"zero:bucket_mb must be > 0, got {options['bucket_mb']}")
    plan.sharding_stage = options["stage"]
    if plan.autocast_dtype is not None:
        import torch

        if plan.autocast_dtype is torch.float16 and plan.device_type == "cpu":
            # DeepSpeed's CPU accelerator answers is_fp16_supported() with exactly this call
            # (deepspeed/accelerator/cpu_accelerator.py); asked directly, no deepspeed import.
            try:
                fp16_ok = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
            except Exception:
                fp16_ok = False
            if not fp16_ok:
                raise ConfigError("zero with fp16: DeepSpeed's CPU accelerator reports no fp16 support on this "
                                  "machine (torch.ops.mkldnn._is_mkldnn_fp16_supported() is False); use bf16")
        # DeepSpeed's bf16/fp16 mode: 16-bit params and grads, fp32 master partition; no autocast.
        plan.low_precision_params = True


def check_mesh(dims, options):
    others = {d: dims[d] for d in ("pp", "cp", "tp") if dims[d] > 1}
    if others:
        raise ConfigError(f"zero partitions over the data-parallel ranks only; this mesh also has "
                          f"{', '.join(f'{k}={v}' for k, v in others.items())} (DeepSpeed would need an mpu "
                          f"describing them)")


def check_recipe(recipe, options):
    from ..engines.deepspeed_engine import SUPPORTED_OPTIMIZERS

    if recipe.optimizer not in SUPPORTED_OPTIMIZERS:
        raise ConfigError(f"zero: optimizer {recipe.optimizer!r} cannot be partitioned by DeepSpeed here; valid: "
                          f"{', '.join(SUPPORTED_OPTIMIZERS)}")
    if options["offload_optimizer"] != "none" and recipe.optimizer in ("adam", "adamw"):
        # DeepSpeedCPUAdam runs the offloaded update: its C++ op must load without a build failing
        # mid-run (make setup built it, or recorded why it could not: impls.engines.deepspeed_ops)
        from ..engines import deepspeed_ops

        problem = deepspeed_ops.cpu_adam_problem()
        if problem:
            raise ConfigError(f"zero:offload_optimizer={options['offload_optimizer']} cannot run here: {problem}; "
                              f"valid here: offload_optimizer=none")


def deepspeed_config(options, elem_bytes: int = 4) -> dict:
    """The ``zero_optimization`` part of the DeepSpeed config for ``options``."""
    bucket = int(options["bucket_mb"] * 2**20 / elem_bytes)
    zero = dict(stage=options["stage"], reduce_bucket_size=bucket, allgather_bucket_size=bucket,
                contiguous_gradients=True, overlap_comm=False)
    if options["stage"] == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=bucket,
                    stage3_max_live_parameters=10**9, stage3_max_reuse_distance=10**9)
        del zero["allgather_bucket_size"]
    if options["offload_optimizer"] != "none":
        zero["offload_optimizer"] = dict(device=options["offload_optimizer"], pin_memory=False)
    if options["offload_param"] != "none":
        zero["offload_param"] = dict(device=options["offload_param"], pin_memory=False)
    return dict(zero_optimization=zero)


def deepspeed_estimates(model, dp: int, options) -> dict:
    """DeepSpeed's own estimates of per-device model-state bytes for ``model`` at ``dp`` ranks on
    one node, from the functions behind ``estimate_zero2_model_states_mem_needs_all_live`` /
    ``estimate_zero3_...`` (which only print): the same calls, their numbers kept."""
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    offload = options["offload_optimizer"] != "none"
    if options["stage"] in (1, 2):
        total = stage_1_and_2.model_to_params(model)
        cpu, dev = stage_1_and_2.estimate_zero2_model_states_mem_needs(
            total, num_gpus_per_node=dp, num_nodes=1, cpu_offload=offload)
        return dict(function="estimate_zero2_model_states_mem_needs", params=total, per_device_bytes=dev,
                    per_cpu_bytes=cpu, formula=("2Ψ (16-bit params)" if offload else "2Ψ + 18Ψ/N_d"),
                    note=("DeepSpeed has no stage-1 estimator: this is its stage-2 figure" if options["stage"] == 1
                          else ""))
    total, largest = stage3.model_to_params(model)
    cpu, dev, largest_bytes = stage3.estimate_zero3_model_states_mem_needs(
        total, largest, num_gpus_per_node=dp, num_nodes=1, cpu_offload=offload,
        cpu_offload_params=options["offload_param"] != "none", zero_init=False)
    return dict(function="estimate_zero3_model_states_mem_needs", params=total, largest_layer_params=largest,
                per_device_bytes=dev, per_cpu_bytes=cpu, largest_layer_bytes=largest_bytes,
                formula="4·largest_layer + 18Ψ/N_d" if not offload else "4·largest_layer (+ 2Ψ/N_d without param offload)")


def paper_bytes(params: int, dp: int, stage: int, low_precision: bool, k: int = K_ADAM) -> dict:
    """The ZeRO paper's per-rank model-state bytes (params, grads, optimizer) at ``stage``:
    mixed precision 2Ψ + 2Ψ + KΨ; fp32 equivalents 4Ψ + 4Ψ + (K-4)Ψ (Adam: 8Ψ, its two moments;
    the weights are their own master copy).  Stage s divides optimizer (s >= 1), grads (s >= 2) and
    params (s >= 3) by N_d."""
    p, g, o = (2, 2, k) if low_precision else (4, 4, k - 4)
    return dict(params_bytes=p * params / (dp if stage >= 3 else 1), grads_bytes=g * params / (dp if stage >= 2 else 1),
                optimizer_bytes=o * params / (dp if stage >= 1 else 1))


def apply(build, options):
    import torch

    build.engine = "deepspeed"
    model, dp = build.model, build.dims.dp
    params = sum(p.numel() for p in model.parameters())
    offloaded = options["offload_optimizer"] != "none" or options["offload_param"] != "none"
    notes = dict(stage=options["stage"], dp=dp, params=params,
                 precision=("DeepSpeed " + {torch.bfloat16: "bf16", torch.float16: "fp16"}[build.plan.autocast_dtype]
                            + " mode (16-bit params/grads, fp32 master partition)")
                 if build.plan.low_precision_params else "fp32",
                 deepspeed_config=deepspeed_config(options),
                 deepspeed_estimate=deepspeed_estimates(model, dp, options),
                 estimate_vs_paper=(
                     "DeepSpeed's estimators assume 16-bit params and count 18 bytes/param of partitioned state "
                     "(2 16-bit grads + 4 fp32 grads + 4 fp32 params + 8 Adam moments) where the paper counts "
                     "2 + K = 14: they add the fp32 gradient partition the optimizer step reads; the stage-3 "
                     "estimate also adds 4 bytes × the largest layer's parameters (the gathered 16-bit params and "
                     "grads of the layer being computed); both assume mixed precision even for an fp32 run, and "
                     "neither counts the alignment padding of the flat partitions or the reduction buckets"),
                 measured_vs_paper=(
                     "DeepSpeed keeps an fp32 master partition (4Ψ/N_d, counted in optimizer_bytes) also when the "
                     "module is fp32, so fp32 optimizer bytes are KΨ/N_d against the paper's fp32 equivalent "
                     "(K-4)Ψ/N_d (Adam: 12 vs 8); stage 2 keeps the whole gradient of every tensor overlapping "
                     "this rank's partition (grads_in_partition), so a tensor straddling a partition boundary is "
                     "held whole on both ranks (at most one tensor per param group above 4Ψ/N_d or 2Ψ/N_d); "
                     "stage 1's whole gradients exist from backward until the boundary's reduction, when they "
                     "are sampled; the flat buffers are padded to a multiple of N_d (and an alignment), a few "
                     "bytes; the reduction buckets (breakdown.buckets_bytes) are constant-size scratch, not "
                     "model state"),
                 comm_vs_paper=(
                     "the paper's 2Ψ for stages 1-2 assumes a reduce-scatter of the gradients (Ψ) and an all-gather "
                     "of the updated parameters (Ψ); DeepSpeed 0.19's stage 1/2 all-reduces each gradient bucket "
                     "(use_multi_rank_bucket_allreduce, its default: 2Ψ) and then all-gathers the parameters (Ψ), "
                     "3Ψ per step, 1.5x the paper (record.comm.ratio); stage 3 gathers parameters for the forward "
                     "and the backward and reduce-scatters gradients, the paper's 3Ψ"
                     if options["stage"] in (1, 2) else
                     "stage 3: all-gather of the parameters in the forward and again in the backward, reduce-scatter "
                     "of the gradients: the paper's 3Ψ (record.comm.ratio; prefetch and the persistence threshold "
                     "move it a little)"),
                 model_init=("the model is materialised whole on every rank and then partitioned by "
                             "deepspeed.initialize (no deepspeed.zero.Init): start-up briefly holds 4Ψ per rank"
                             if options["stage"] == 3 else None))
    build.notes[NAME] = notes

    def formula() -> dict:  # when the record is made: the engine has named the optimizer it ran
        k = K_BY_OPTIMIZER.get(notes.get("optimizer_name"), K_ADAM)
        per = paper_bytes(params, dp, options["stage"], build.plan.low_precision_params, k)
        out = dict(paper_k=k, paper_formula=per)
        if offloaded:
            moved = {"optimizer": options["offload_optimizer"] != "none", "params": options["offload_param"] != "none"}
            # the paper's bytes of what offload keeps in host memory: master + optimizer states and
            # the gradient partition (the update's input), and the parameter partition (offload_param)
            would = (per["optimizer_bytes"] + per["grads_bytes"] / (1 if options["stage"] >= 2 else dp)
                     if moved["optimizer"] else 0) + (per["params_bytes"] if moved["params"] else 0)
            out["offload"] = dict(
                device_type=build.device.type, moved=moved, bytes_off_the_device=int(would),
                meaning=("on this CPU-only run the device is the host: offloading moves no bytes anywhere (the "
                         "states stay in the same RAM); it changes only which code runs the update "
                         "(DeepSpeedCPUAdam for adam/adamw) and adds copies between the 'device' and host buffers "
                         "(an fp32 host copy of the gradient partition: see breakdown.grad_partitions_bytes)"
                         if build.device.type == "cpu" else
                         f"these states live in host memory instead of {build.device.type} memory"))
        return out

    build.describe(NAME, formula)
