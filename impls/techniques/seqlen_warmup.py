"""Sequence-length warm-up: train on truncated sequences first, growing them linearly to the
recipe's ``seq_len`` (Li, Zhang & He 2022, "The Stability-Efficiency Dilemma: Investigating
Sequence Length Warmup for Training GPT Models", NeurIPS 2022, arXiv 2108.06084).

The paper's linear pacing function (§4, "Sequence length warmup"), with ``start`` = seqlen_s,
``seq_len`` = seqlen_e and the warm-up lasting ``W = max(1, round(steps · N))`` of the run's ``N``
optimizer steps:

    seqlen_t = seqlen_s + (seqlen_e − seqlen_s) · min(t / W, 1)

rounded *down* to a multiple of ``every`` (the paper uses 8, for tensor-core-friendly shapes),
never below ``start``, and exactly ``seq_len`` from step W on.  Like the paper, each batch is
**truncated**: every sequence keeps its first ``seqlen_t`` tokens (and targets), so the batch
keeps its number of sequences and the tokens per step grow with the schedule.  The torch
engine normalises the loss by the step's global target-token count *after* the ``on_batch``
hook, so the mean over the shorter sequences is exact.

The point of the technique is compute: a step at length T costs B·T·(6N + 12·L·H·Q·T) model
FLOPs (PaLM App. B), less than the full length's.  The FLOP budget therefore buys more steps:
``plan.seq_len_at`` exposes the schedule as a function of the step, the run's step count and
the full length, and ``train.measure_step`` counts one step's FLOPs at every length the schedule
uses and finds the largest N with Σ_{t<N} FLOPs(T_t) ≤ budget (the schedule itself depends on N
through W).  The record's curve then accumulates the FLOPs and tokens of the steps as trained.

``technique_notes["seqlen_warmup"]``: the options, warm-up steps and the schedule's breakpoints
(first step of each length), tokens trained vs the same steps at full length, and the FLOPs
saved against full-length steps, counted (FlopCounterMode) and analytic, with their ratio.

Options: ``start`` ≥ 1 and below ``seq_len`` (else nothing changes: refused), ``steps`` in
(0, 1] (the warm-up's fraction of the run), ``every`` ≥ 1.
"""
from __future__ import annotations

from ..errors import ConfigError

NAME = "seqlen_warmup"
STAGE = "engine"  # a data hook (on_batch) and a plan field: no module changes
OPTIONS = {"start": 64, "steps": 0.3, "every": 8}


def warmup_steps(total_steps: int, fraction: float) -> int:
    return max(1, round(fraction * total_steps))


def length_at(step: int, total_steps: int, seq_len: int, options: dict) -> int:
    """Li et al.'s linear pacing, rounded down to a multiple of ``every``, within [start, seq_len]."""
    start, every = options["start"], options["every"]
    w = warmup_steps(total_steps, options["steps"])
    if step >= w:
        return seq_len
    raw = start + (seq_len - start) * step // w  # integer floor of the linear pacing
    return min(seq_len, max(start, raw // every * every))


def breakpoints(lengths: list[int]) -> list[list[int]]:
    """[[first step, length], ...] where the length changes."""
    out = []
    for t, length in enumerate(lengths):
        if not out or out[-1][1] != length:
            out.append([t, length])
    return out


def configure(plan, options):
    if options["start"] < 1:
        raise ConfigError(f"seqlen_warmup:start must be >= 1, got {options['start']}")
    if not 0 < options["steps"] <= 1:
        raise ConfigError(f"seqlen_warmup:steps is the warm-up's fraction of training, in (0, 1]; got {options['steps']}")
    if options["every"] < 1:
        raise ConfigError(f"seqlen_warmup:every must be >= 1, got {options['every']}")
    plan.seq_len_at = lambda step, total, seq_len: length_at(step, total, seq_len, options)


def check_model(cfg, seq_len, options):
    if options["start"] >= seq_len:
        raise ConfigError(f"seqlen_warmup:start={options['start']} changes nothing at seq_len {seq_len}; "
                          f"valid: 1 <= start < {seq_len}")


def check_mesh(dims, options):
    for dim, why in (("pp", "the pipeline engine's micro-batch shapes are fixed"),
                     ("cp", "context parallelism splits the full length over its ranks")):
        if dims[dim] > 1:
            raise ConfigError(f"seqlen_warmup changes the sequence length per step and {why} "
                              f"(mesh {dim}={dims[dim]}); valid: {dim}=1")


def apply(build, options):
    def truncate(x, y, step):
        if build.total_steps is None:
            raise RuntimeError("seqlen_warmup needs build.total_steps (set by train.measure_step) before training")
        length = length_at(step, build.total_steps, x.shape[1], options)
        if length >= x.shape[1]:
            return x, y
        return x[:, :length].contiguous(), y[:, :length].contiguous()

    build.add_hook("on_batch", truncate)

    def describe() -> dict:
        notes = dict(start=options["start"], steps=options["steps"], every=options["every"])
        per_length, n = build.flops_by_length, build.total_steps
        if not per_length or not n:
            return notes
        full = max(per_length)
        lengths = [length_at(t, n, full, options) for t in range(n)]
        counted = sum(per_length[t][0] for t in lengths)
        model = sum(per_length[t][2] for t in lengths)
        short = min(lengths)
        notes.update(
            seq_len=full, warmup_steps=warmup_steps(n, options["steps"]), total_steps=n,
            schedule=breakpoints(lengths),
            # tokens per sequence summed over the steps; × the global batch = tokens trained
            tokens_per_sequence_trained=sum(lengths), tokens_per_sequence_full=n * full,
            token_fraction=sum(lengths) / (n * full),
            counted_flops=float(counted), counted_flops_full_length=float(n * per_length[full][0]),
            model_flops=float(model), model_flops_full_length=float(n * per_length[full][2]),
            counted_flops_saved=1 - counted / (n * per_length[full][0]),
            analytic_flops_saved=1 - model / (n * per_length[full][2]),
            # counted ÷ analytic (6N + 12·L·H·Q·T) FLOPs of one step at the shortest length
            short_length=short, counted_vs_analytic_at_short=per_length[short][0] / per_length[short][2],
        )
        return notes

    build.describe(NAME, describe)
