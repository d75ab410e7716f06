"""Every benchmark family and every record kind, defined once.

A *family* is a folder of run records (``results/runs/<commit>/<family>/``; a record's name starts
with its family, see ``benchmarks/common.py``), the asv classes that write them, the report section
that turns them into tables and figures, and its place on the site.  The site's navigation, its
links into asv's graphs and to figures, the report's grouping and the findings page all read this
table; ``tests/test_families.py`` fails when an asv class of ``benchmarks/bench_*.py`` or a record
kind written anywhere has no entry here.  Adding a family touches this table, its ``bench_*.py`` and
(when it has its own figures) one report section.

This module is the bottom layer: it imports nothing from :mod:`impls`.
"""
from __future__ import annotations

import dataclasses
import re

#: Record kinds (the ``kind`` field; a training run's record has none) -> what they hold.  Each
#: writer uses these constants, and the report routes a record by its kind.
RUN = "run"
INTERLEAVED = "interleaved"
HARNESS_OVERHEAD = "harness_overhead"
COMM = "comm"
SPARSE_STORAGE = "sparse_storage"
DATA_COMPRESSION = "data_compression"
DRYRUN = "dryrun"
DRYRUN_SWEEP = "dryrun-sweep"
PLAN_CALIBRATION = "plan-calibration"
RECIPE_PLAN = "recipe-plan"
RECORD_KINDS = {
    RUN: "one training run (train.run): recipe, losses, FLOPs, memory, step times",
    INTERLEAVED: "variants timed in interleaved rounds (compare.run): speed-ups with 95% intervals",
    HARNESS_OVERHEAD: "the training loop's time over a bare loop, interleaved (compare.harness_overhead)",
    COMM: "collective bus bandwidth per message size (commbench)",
    SPARSE_STORAGE: "sparse weight storage formats: bytes and matmul time vs density (measure.sparse_storage)",
    DATA_COMPRESSION: "token storage formats: bytes and loader throughput vs step (measure.data_throughput)",
    DRYRUN: "one rank of a run built and stepped once on fake tensors under the fake process group (dryrun): "
            "per-rank model-state bytes, collectives, tracked peak",
    DRYRUN_SWEEP: "a table of dry runs over models × world sizes × layouts, each against its formulas (dryrun.sweep)",
    PLAN_CALIBRATION: "the planner's predicted step time against measured CPU runs at world sizes 1/2/4, with the "
                      "rank correlation and error (calibration)",
    RECIPE_PLAN: "whole recipes for a model on D devices ranked by predicted step time, with memory by component, "
                 "rejections and dry-run verification (recipe_planner)",
}

#: Report sections (one module each under impls/report/): the families each renders beyond the
#: generic per-family tables and figures, in the site's order (``findings`` opens the page: it reads
#: every family and owns none; ``atscale`` owns none either: it reads the cached dry-run sweep and
#: planner calibration of ``results/atscale/``, kinds :data:`DRYRUN_SWEEP` and :data:`PLAN_CALIBRATION`).
SECTIONS = ("findings", "runs", "data_parallel", "model_parallel", "atscale", "compression", "tokens",
            "isoflop")


@dataclasses.dataclass(frozen=True)
class Family:
    """One benchmark family.

    ``classes`` are the asv classes (``module.Class``) writing its records; ``stem`` is a regex
    over a record's file stem naming the first class's parameters (for links into asv's graph,
    filtered to the record), or None; ``section`` is the report section with its own figures
    (``runs`` for the generic per-family ones only); ``figures`` are the PNGs that section writes
    for it; ``question`` is what the family answers, shown under its heading.
    """
    name: str
    title: str
    classes: tuple[str, ...]
    stem: str | None = None
    section: str = "runs"
    figures: tuple[str, ...] = ()
    question: str = ""

    def __post_init__(self):
        if self.section not in SECTIONS:
            raise ValueError(f"family {self.name}: section {self.section!r} is not one of {', '.join(SECTIONS)}")
        if self.stem is not None:
            re.compile(self.stem)


#: Site order: the baseline, single-device techniques, optimizers, parallelism, compression, tokens.
FAMILIES: tuple[Family, ...] = (
    Family("baseline", "Baseline", ("bench_baseline.BaselineTraining", "bench_baseline.BaselineStep"),
           r"baseline-(?P<model>.+)-ws(?P<world_size>\d+)",
           question="GPT with AdamW in fp32 over zoo sizes: the reference every ratio divides by"),
    Family("overhead", "Harness overhead", ("bench_baseline.HarnessOverhead",),
           question="how much the training loop's bookkeeping costs over a bare loop"),
    Family("technique", "Single-device techniques", ("bench_techniques.Techniques", "bench_techniques.TechniqueSpeed"),
           r"technique-(?P<variant>.+)",
           question="mixed precision, checkpointing, fused kernels, compile, flash attention: speed and memory"),
    Family("attention", "Attention scaling", ("bench_techniques.AttentionScaling",),
           r"attention-(?P<kind>[a-z]+)-T(?P<seq_len>\d+)",
           question="dense vs sparse/flash attention as the sequence grows"),
    Family("checkpoint", "Activation checkpointing", ("bench_techniques.CheckpointCurve",),
           r"checkpoint-curve-every(?P<every>\d+)",
           question="saved-activation memory vs recompute time (Chen et al. 2016)"),
    Family("accum", "Gradient accumulation", ("bench_techniques.AccumulationMemory",),
           r"accum-(?P<how>[a-z]+)-(?P<effective_batch>\d+)",
           question="memory of a large batch vs accumulated micro-batches"),
    Family("optimizers", "Optimizers", ("bench_optimizers.Optimizers", "bench_optimizers.OptimizerSpeed"),
           r"optimizers-(?P<optimizer>.+)",
           question="loss at equal FLOPs, state bytes and speed of Adam variants, 8-bit, Lion, Sophia, GaLore"),
    Family("largebatch", "Large-batch optimizers", ("bench_optimizers.LargeBatch",),
           r"largebatch-(?P<optimizer>[a-z0-9]+)-b(?P<global_batch>\d+)",
           question="LAMB/LARS vs AdamW as the batch grows"),
    Family("parallel", "Data parallel and sharding", ("bench_parallel.DataParallelSharding",),
           section="data_parallel",
           figures=("data_parallel_model_states.png", "data_parallel_scaling.png", "data_parallel_comm.png"),
           question="DDP, ZeRO 1/2/3, FSDP, OSS: model-state bytes per rank and traffic vs the formulas"),
    Family("comm", "Collective bandwidth", ("bench_comm.CommBandwidth",), section="data_parallel",
           figures=("comm_busbw.png",),
           question="all-reduce / all-gather / reduce-scatter bus bandwidth per message size"),
    Family("model_parallel", "Tensor, sequence and pipeline parallel", ("bench_model_parallel.ModelParallel",),
           section="model_parallel",
           figures=("model_parallel_activations.png", "model_parallel_bubble.png", "model_parallel_memory.png"),
           question="TP/SP/PP layouts: activations per rank, pipeline bubble, planner memory at scale"),
    Family("isoflop", "Conditional computation (isoFLOP)",
           ("bench_mod.MoDIsoFLOP", "bench_mod.MoDForwardFLOPs", "bench_mod.MoDCausalSampling"),
           section="isoflop",
           question="MoD/MoE/MoDE vs dense at equal model FLOPs: fitted loss minima"),
    Family("pruning", "Pruning", ("bench_pruning.Pruning", "bench_pruning.PruningSpeed"),
           r"pruning-(?P<variant>.+)", section="compression",
           figures=("compression_memory.png", "compression_loss_vs_sparsity.png"),
           question="loss vs sparsity at a fixed model-FLOP budget, exact memory, and speed"),
    Family("quant", "Quantised training", ("bench_quant.Quant", "bench_quant.QuantSpeed"),
           r"quant-(?P<variant>.+)", section="compression",
           figures=("compression_memory.png",),
           question="int8/fp8/QAT: loss, memory and speed"),
    Family("lowrank", "Low-rank adaptation", ("bench_lowrank.LowRank", "bench_lowrank.LowRankSpeed"),
           r"lowrank-(?P<variant>.+)", section="compression",
           figures=("compression_memory.png", "compression_loss_vs_rank.png"),
           question="LoRA/GaLore rank sweeps: trainable state, loss and speed"),
    Family("actmem", "Activation compression", ("bench_actmem.ActMem", "bench_actmem.ActMemSpeed"),
           r"actmem-(?P<variant>.+)", section="compression",
           figures=("compression_memory.png",),
           question="saved activations in bf16/int8/fp8 vs checkpointing"),
    Family("sparse", "Sparse embeddings and storage",
           ("bench_sparse.SparseEmbedding", "bench_sparse.SparseEmbeddingSpeed", "bench_sparse.SparseStorage"),
           r"sparse-(?P<variant>.+)", section="compression",
           figures=("compression_memory.png", "compression_sparse_crossover.png"),
           question="sparse embedding gradients and sparse weight formats: bytes and crossovers"),
    Family("datacomp", "Token storage", ("bench_datacomp.DataCompression",), section="compression", figures=("compression_data.png",),
           question="compressed token shards: bytes on disk and loader throughput vs the step"),
    Family("seqlen", "Sequence-length warm-up", ("bench_seqlen.SeqlenWarmup",),
           r"seqlen-(?P<variant>.+)", section="tokens",
           question="short-to-long curricula: loss at equal counted FLOPs"),
    Family("distill", "Distillation", ("bench_distill.Distill", "bench_distill.DistillSpeed"),
           r"distill-(?P<variant>.+)", section="tokens", figures=("tokens_distill_sweep.png",),
           question="student loss vs teacher cost"),
    Family("mae", "Masked autoencoding", ("bench_mae.Mae", "bench_mae.MaeSpeed"),
           r"mae-(?P<variant>.+)", section="tokens", figures=("tokens_speedup_vs_mask_rate.png",),
           question="encoder on visible tokens only: speed-up vs mask rate (He et al. 2022)"),
    Family("ltd", "Random layerwise token dropping", ("bench_ltd.RandomLTD",),
           r"ltd-(?P<variant>.+)", section="tokens", figures=("tokens_random_ltd_schedule.png",),
           question="random-LTD: counted vs analytic FLOPs saved and loss"),
    Family("tokendrop", "Token dropping", ("bench_tokendrop.TokenDrop", "bench_tokendrop.TokenDropSpeed"),
           r"tokendrop-(?P<variant>.+)", section="tokens",
           question="dropping unimportant tokens in middle layers: loss and speed"),
)

BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}
NAMES: tuple[str, ...] = tuple(BY_NAME)


def get(name: str) -> Family | None:
    """The family of a record folder, or None for one this table does not know."""
    return BY_NAME.get(name)


def of_section(section: str) -> tuple[str, ...]:
    """Names of the families a report section renders, in site order."""
    if section not in SECTIONS:
        raise ValueError(f"unknown section {section!r}: one of {', '.join(SECTIONS)}")
    return tuple(f.name for f in FAMILIES if f.section == section)


def order_key(name: str) -> tuple[int, str]:
    """Sort key putting families in site order, unknown ones after, alphabetically."""
    return (NAMES.index(name) if name in BY_NAME else len(NAMES), name)


def title(name: str) -> str:
    family = BY_NAME.get(name)
    return family.title if family else name


def asv_classes() -> set[str]:
    """Every asv class some family names (``bench_x.Class``)."""
    return {cls for f in FAMILIES for cls in f.classes}
