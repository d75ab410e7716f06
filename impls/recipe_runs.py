"""The etbench runs of planned recipes: the :class:`~impls.recipe.Recipe` each
:class:`~impls.recipe_planner.RecipeCandidate` maps to, the dry-run verification of the top K,
and the table and command line of ``etbench plan --search recipes``.

The mapping (:func:`map_recipe`) picks the etbench technique that stores what the candidate
predicts where one exists, and says what differs where it does not:

* ZeRO stage 3 is ``fsdp`` (FSDP2: the planner's stage-3 formula follows its dim-0 padding); with
  bf16/fp8, ``fsdp:mp=bf16`` -- bf16 gathered parameters and compute over *fp32* shards (4+4+8
  B/param, the same 16 B/param at stage 3 as 2+2+12), bf16 all-gathers, fp32 reduce-scatters;
  parameter offload is ``fsdp:offload=cpu`` (``CPUOffloadPolicy``: shards, gradients and the
  optimizer step on the host).  Under gradient accumulation etbench's FSDP2 keeps unsharded
  gradients between micro-batches (``set_requires_gradient_sync(False)``); the notes give the bytes.
* ZeRO stages 1-2 in bf16/fp8 and optimizer offload are DeepSpeed's ``zero:stage=k`` (its bf16
  mode is the paper's 2+2+12, plus an fp32 gradient partition DeepSpeed's estimator counts); in
  fp32 they are ``zero-redundancy`` (torch) and ``oss`` (fairscale): fp32 states without a master copy.
* bf16 at stage 0 (and fp32 ZeRO-1/2) is the ``bf16`` technique: autocast over fp32 states.
* fp8 adds ``fp8`` (torchao float8 GEMMs; CUDA capability >= 8.9, refused elsewhere).
* recomputation: ``checkpoint`` (full) or ``checkpoint:policy=selective[,every=k]`` where the
  knapsack dropped exactly the attention core's term in every k-th layer -- any other selective
  plan needs torch's selective activation checkpointing with a custom policy, not an etbench technique.
* m > 1 is ``grad_accum:steps=m``; LoRA ``lora:rank=r``; tp ``tp`` with mesh ``tp=t``; the data a
  synthetic source over the model's vocabulary (the model follows the data's vocabulary).

The model states the mapped recipe really stores are predicted with the same formulas at its
byte widths (``recipe_states``), so :func:`verify` can compare a dry run exactly.
"""
from __future__ import annotations

import dataclasses
import json
import math

from . import planner
from .errors import ConfigError
from .planner import GIB, PRECISIONS
from .recipe_planner import (ASSUMPTIONS, HOST_ADAM_RATE, HOST_LINK_GBPS, HOST_MEM, LORA, OFFLOADS, OPTIMIZERS,
                             PRECISION_CHOICES, RECOMPUTE, Context, Knobs, RecipeCandidate, RecipePlan, Rates, Search,
                             comm_widths, lora_shapes, model_states, plan_recipes, predict_at,
                             state_precision)

_DS_BF16 = ("DeepSpeed's bf16 mode: 16-bit parameters and gradients, fp32 master copy and moments (2+2+12 B/param, "
            "as predicted) plus an fp32 gradient partition (4 B/param over dp) that the paper does not count")
_AUTOCAST = "bf16 autocast over fp32 states: 4+4+K B/param (etbench's bf16), not 2+2+12"


def fsdp_accumulation_bytes(ctx: Context, k: Knobs) -> float:
    """What etbench's FSDP2 holds beyond the candidate under gradient accumulation: the unsharded
    fp32 gradients of the trained parameters between micro-batches, less the shard (0 otherwise)."""
    if k.zero_stage != 3 or k.micro_batches == 1 or k.offload == "optimizer":
        return 0.0
    trained = lora_shapes(ctx.cfg, ctx.lora_rank) if k.lora else planner.stage_tensors(ctx.counts, k.tp, 1, 0)
    return 4 * sum(math.prod(s) for s in trained) * (1 - 1 / k.dp)


def _engine(ctx: Context, k: Knobs, mixed: bool, cand_total: float) -> tuple[list[str], list[str], list[str],
                                                                          planner.Precision, dict]:
    """(techniques, notes, reasons not runnable, state bytes as stored, communicated widths) of the
    candidate's data parallelism, offload and precision."""
    fp32 = state_precision("fp32", k.optimizer)
    tech, notes, why = [], [], []
    if (k.zero_stage in (1, 2) and mixed) or k.offload == "optimizer":
        tech.append(f"zero:stage={k.zero_stage}" + (",offload_optimizer=cpu" if k.offload == "optimizer" else ""))
        if k.tp > 1:
            why.append("etbench's zero (DeepSpeed) partitions over dp only and refuses a tp mesh")
        if k.optimizer != "adamw":
            why.append(f"DeepSpeed's engine runs adamw/adam/sgd, not {k.optimizer}")
        if mixed:
            tech.append("bf16")
            notes.append(_DS_BF16)
            return tech, notes, why, PRECISIONS["mixed"], {"param_bytes": 2.0, "grad_bytes": 2.0, "act_bytes": 2}
        notes.append("DeepSpeed keeps an fp32 master partition in fp32 too: optimizer 12 B/param over dp")
        return tech, notes, why, dataclasses.replace(PRECISIONS["fp32"], k=12.0, step_bytes=0), \
            {"param_bytes": 4.0, "grad_bytes": 4.0, "act_bytes": 4}
    if k.zero_stage == 3:
        opts = (["mp=bf16"] if mixed else []) + (["offload=cpu"] if k.offload == "params" else [])
        tech.append("fsdp" + (":" + ",".join(opts) if opts else ""))
        if k.optimizer == "adamw8bit":
            why.append("bitsandbytes' 8-bit update cannot take FSDP2's DTensor shards (it gets mixed torch.Tensor "
                       "and DTensor)")
        if mixed:
            notes.append("fsdp:mp=bf16 keeps fp32 shards (4+4+K B/param; 16 at stage 3 like 2+2+12): bf16 "
                         "all-gathers, fp32 reduce-scatters")
        if k.offload == "params":
            notes.append("FSDP2's CPUOffloadPolicy keeps the shards, gradients and the optimizer step on the host")
        extra = fsdp_accumulation_bytes(ctx, k)
        if extra:
            over = cand_total + extra > ctx.hw.device_mem
            notes.append(f"etbench's FSDP2 accumulates unsharded gradients between micro-batches: +{extra / GIB:.1f} "
                         f"GiB per device during accumulation, one reduce-scatter per step"
                         + (f" -- {(cand_total + extra) / GIB:.1f} GiB, over the device's "
                            f"{ctx.hw.device_mem / GIB:.1f} GiB" if over else ""))
        return tech, notes, why, fp32, {"param_bytes": 2.0 if mixed else 4.0, "grad_bytes": 4.0,
                                        "act_bytes": 2 if mixed else 4}
    if k.dp > 1 and k.zero_stage:
        tech.append({1: "zero-redundancy", 2: "oss"}[k.zero_stage])
    if mixed:
        tech.append("bf16")
        notes.append(_AUTOCAST)
    return tech, notes, why, fp32, {"param_bytes": 4.0, "grad_bytes": 4.0, "act_bytes": 2 if mixed else 4}


def _selective_technique(ctx: Context, cand: RecipeCandidate) -> tuple[str | None, str | None]:
    """etbench's ``checkpoint:policy=selective[,every=k]`` if the plan drops exactly the attention
    core's term in ceil(L/k) layers, else why not."""
    core = "attention_scores" if ctx.attention == "stored" else "flash_logsumexp"
    layers = ctx.cfg.n_layer
    if set(cand.recomputed) == {core}:
        every = next((e for e in range(1, layers + 1) if -(-layers // e) == cand.recomputed[core]), None)
        if every is not None:
            return "checkpoint:policy=selective" + (f",every={every}" if every > 1 else ""), None
    dropped = ", ".join(f"{n} in {c} layers" for n, c in cand.recomputed.items())
    return None, (f"etbench's checkpoint:policy=selective recomputes the attention core of every k-th block; this "
                  f"plan drops {dropped} (torch selective activation checkpointing with a custom policy)")


def _data(cfg, seq_len: int) -> str:
    vocab = cfg.vocab_size - (0 if cfg.causal else 1)  # an encoder's [MASK] token is added to the data's
    return f"synthetic:vocab={vocab},order=1" + (f",row_len={seq_len + 1}" if seq_len + 1 > 4096 else "")


def map_recipe(ctx: Context, cand: RecipeCandidate) -> None:
    """Fill ``cand``'s etbench recipe (or the reason there is none), notes and ``recipe_states``."""
    from . import recipe as recipes

    k = cand.knobs
    tech, notes, why, stored, widths = _engine(ctx, k, k.precision != "fp32", cand.memory_total)
    if k.precision == "fp8":
        tech.append("fp8")
        notes.append("fp8 needs a CUDA GPU of compute capability >= 8.9 (etbench refuses it elsewhere)")
    if k.recompute == "full":
        tech.append("checkpoint")
    elif k.recompute == "selective":
        spec, reason = _selective_technique(ctx, cand)
        tech += [spec] if spec else []
        why += [reason] if reason else []
    if k.lora:
        tech.append(f"lora:rank={ctx.lora_rank}")
    if k.micro_batches > 1:
        tech.append(f"grad_accum:steps={k.micro_batches}")
    if k.tp > 1:
        tech.append("tp")
    device, host, _ = model_states(ctx, k, stored)
    cand.recipe_states = {c: device[c] + host.get(c, 0.0) for c in device}  # device + host, as a dry run counts
    cand.recipe_comm_widths = widths
    cand.recipe_fits = cand.memory_total + fsdp_accumulation_bytes(ctx, k) <= ctx.hw.device_mem
    cand.recipe_notes = notes + [f"run on {ctx.hw.devices} ranks (torchrun); data: a synthetic source over the "
                                 f"model's vocabulary, replace it with the real data"]
    if why:
        cand.recipe, cand.recipe_reason = None, "; ".join(why)
        return
    recipe = recipes.Recipe(model=ctx.model, data=_data(ctx.cfg, ctx.seq_len), batch_size=k.micro_batch_size,
                            seq_len=ctx.seq_len, techniques=tech, mesh={"tp": k.tp} if k.tp > 1 else {},
                            optimizer=k.optimizer, device="auto", steps=1, eval_batches=1)
    cand.recipe = dataclasses.asdict(recipe)
    cand.recipe_argv = recipes.to_argv(recipe)


# --------------------------------------------------------------------------------------------
# Verification: dry runs of the top K
# --------------------------------------------------------------------------------------------

def _ratio(measured, predicted):
    if measured is None or predicted is None:
        return None
    return (1.0 if measured == 0 else None) if predicted == 0 else measured / predicted


def _dry(recipe, world_size: int) -> tuple[dict | None, str | None, bool]:
    """(record, why not, whether it failed after being accepted) of a rank-0 dry run."""
    from . import dryrun

    try:
        return dryrun.dry_run(recipe, world_size, 0), None, False
    except ConfigError as e:  # refused before any work
        return None, str(e), False
    except Exception as e:  # noqa: BLE001 - one candidate's failure is its row's, not the plan's
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        return None, f"dry run failed: {type(e).__name__}: {first[:300]}", True


#: Techniques a CPU dry run refuses for the device alone, and why leaving them out changes nothing a
#: dry run measures (the bytes the states take, the collectives).
DEVICE_ONLY = {"fp8": "fp8 changes the GEMMs' arithmetic, not the stored states or the collectives (torchao's "
                      "Float8Linear keeps the high-precision weight; FSDP2's float8 all-gather is off)"}


def dry_runnable(recipe, world_size: int) -> tuple[dict | None, str | None, list[str], bool]:
    """(record, why not, notes, whether grad_accum was left out): the recipe dry-run, leaving out a
    :data:`DEVICE_ONLY` technique the CPU refuses, and ``grad_accum`` where a dry run fails under it
    (model states do not depend on the micro-batch count), each with a note saying so."""
    notes, single = [], False
    while True:
        record, why, failed = _dry(recipe, world_size)
        if record is not None:
            return record, None, notes, single
        names = {t.split(":")[0]: t for t in recipe.techniques}
        device = next((n for n in DEVICE_ONLY if n in names and not failed and why.startswith(n + ":")), None)
        if device is not None:
            drop, note = names[device], f"dry-run without {device}, which a CPU refuses: {DEVICE_ONLY[device]}"
        elif failed and "grad_accum" in names:
            drop, note, single = names["grad_accum"], f"dry-run as one micro-batch ({names['grad_accum']}: " \
                f"{why[:120]})", True
        else:
            return None, why, notes, single
        recipe = dataclasses.replace(recipe, techniques=[t for t in recipe.techniques if t != drop])
        notes.append(note)


def verify_one(ctx: Context, cand: RecipeCandidate) -> dict:
    """Dry-run ``cand``'s recipe as rank 0 (:func:`dry_runnable`) and put measured bytes and
    traffic beside the predicted ones (the recipe's as stored, and the candidate's)."""
    from .plan_verify import measured_of
    from .recipe import Recipe

    if cand.recipe is None:
        return {"status": "not verified", "reason": "no etbench recipe: " + str(cand.recipe_reason)}
    record, why, notes, single = dry_runnable(Recipe(**cand.recipe), ctx.hw.devices)
    if record is None:
        return {"status": "not verified", "reason": why, "note": "; ".join(notes) or None}
    m_run, note = 1 if single else cand.knobs.micro_batches, "; ".join(notes) or None
    measured = measured_of(record)
    k = cand.knobs
    run = dataclasses.replace(ctx, global_batch=k.dp * k.micro_batch_size * m_run)
    widths = dataclasses.replace(PRECISIONS["mixed"], **cand.recipe_comm_widths)
    pred = predict_at(run, k.layout(m_run), comm_widths(ctx, k, widths), 1.0)
    traffic = pred.time["dp_comm_total"] * ctx.hw.link_bytes_per_s + pred.time["tp_comm"] * ctx.hw.tp_bytes_per_s
    candidate = {c: cand.memory[c] + cand.host.get(c, 0.0) for c in ("params", "grads", "optimizer", "activations")}
    out = {"status": "verified", "note": note, "micro_batches_run": m_run, "measured": measured,
           "predicted_recipe": dict(cand.recipe_states, traffic=traffic), "predicted_candidate": candidate,
           "ratio_recipe": {c: _ratio(measured[c], cand.recipe_states[c]) for c in cand.recipe_states},
           "ratio_candidate": {c: _ratio(measured[c], candidate[c]) for c in candidate},
           "traffic_formula_dryrun": (record.get("comm") or {}).get("formula_bytes"),
           "seconds": record["wall_seconds"], "precision_measured": record["precision"]}
    out["ratio_recipe"]["traffic"] = _ratio(measured["traffic"], traffic)
    return out


def verify(result: RecipePlan, k: int, progress=None) -> int:
    """Dry-run the top ``k`` ranked candidates that have an etbench recipe (``verification`` of
    each; the better-ranked ones without a recipe get "not verified: no etbench recipe" without a
    dry run); returns how many of those were passed over.  ``progress`` is called with (index,
    candidate, None) before each dry run and (index, candidate, its verification) after."""
    done = passed = 0
    for i, cand in enumerate(result.ranked, 1):
        if done == k:
            break
        if cand.recipe is None:
            cand.verification = verify_one(result.ctx, cand)
            passed += 1
            continue
        if progress:
            progress(i, cand, None)
        cand.verification = verify_one(result.ctx, cand)
        done += 1
        if progress:
            progress(i, cand, cand.verification)
    return passed


# --------------------------------------------------------------------------------------------
# The table and the command line
# --------------------------------------------------------------------------------------------

def _gib(x) -> str:
    return "-" if x is None else f"{x / GIB:.1f}"


def table(result: RecipePlan, top: int = 15) -> str:
    head = (f"{'#':>3}  {'recipe':<44} {'mem GiB':>7} {'param':>6} {'grad':>6} {'optim':>6} {'act':>6} {'host':>6}  "
            f"{'step s':>8} {'comp':>7} {'recomp':>7} {'tp':>6} {'dp exp':>7} {'offload':>7} {'MFU':>6}  etbench")
    # etbench: yes (a recipe), no (none: see below), over (etbench's run would exceed the device: see its note)
    lines = [head, "-" * len(head)]
    for i, c in enumerate(result.ranked[:top], 1):
        m, t = c.memory, c.time
        lines.append(f"{i:>3}  {c.label:<44} {_gib(c.memory_total):>7} {_gib(m['params']):>6} {_gib(m['grads']):>6} "
                     f"{_gib(m['optimizer']):>6} {_gib(m['activations']):>6} {_gib(sum(c.host.values())):>6}  "
                     f"{c.step_time:>8.3f} {t['compute']:>7.3f} {t['recompute']:>7.3f} {t['tp_comm']:>6.3f} "
                     f"{t['dp_comm_exposed']:>7.3f} {t['offload']:>7.3f} {c.predicted_mfu:>6.1%}  "
                     f"{('yes' if c.recipe_fits else 'over') if c.recipe else 'no'}")
    return "\n".join(lines)


def verification_line(i: int, cand: RecipeCandidate) -> str:
    """One verified candidate: measured / predicted (the recipe as stored) MiB and the ratio."""
    v = cand.verification
    if v["status"] != "verified":
        return f"  #{i} {cand.label}: not verified: {v['reason']}"
    meas, pred, r = v["measured"], v["predicted_recipe"], v["ratio_recipe"]
    parts = [f"{n} {meas[n] / 2 ** 20:.1f}/{pred[n] / 2 ** 20:.1f} MiB x{r[n]:.4f}" if r[n] is not None else f"{n} -"
             for n in ("params", "grads", "optimizer", "traffic")]
    return (f"  #{i} {cand.label}: measured/predicted {', '.join(parts)} ({v['seconds']:.0f} s)"
            + (f"; {v['note']}" if v["note"] else ""))


def report(result: RecipePlan, top: int = 15, show_rejected: int = 10) -> str:
    ctx, hw = result.ctx, result.ctx.hw
    kinds: dict[str, list[RecipeCandidate]] = {}
    for r in result.rejected:
        kinds.setdefault(r.kind, []).append(r)
    by_kind = f" ({', '.join(f'{k} {len(v)}' for k, v in kinds.items())})" if kinds else ""
    lines = [f"etbench plan --search recipes: {ctx.model} (Psi {ctx.counts.psi:,}), {hw.devices} devices x "
             f"{hw.device_mem / GIB:.1f} GiB, {hw.device_flops:.3g} FLOP/s (fp8 {ctx.rates.fp8_flops:.3g}, fp32 "
             f"{ctx.rates.fp32_flops:.3g}), link {hw.link_gbps:g} Gbit/s (TP {hw.tp_link_gbps:g}, host "
             f"{ctx.rates.host_link_gbps:g}), global batch {ctx.global_batch} x {ctx.seq_len} tokens",
             f"attention {ctx.attention}; overlap {ctx.overlap}; MFU {hw.mfu:g} ASSUMED; {len(result.ranked)} recipes "
             f"fit, {len(result.rejected)} rejected{by_kind}; {result.seconds:.1f} s; best first by predicted step "
             f"time (MFU: model FLOPs over the bf16 peak):",
             "", table(result, top) if result.ranked else "(no recipe fits)", ""]
    for i, c in enumerate(result.ranked[:min(top, 5)], 1):
        run = f"etbench run {' '.join(c.recipe_argv)}" if c.recipe else f"no etbench recipe: {c.recipe_reason}"
        lines.append(f"  #{i} {run}" + "".join(f"\n       note: {n}" for n in c.recipe_notes[:-1]))
    for kind in ("memory", "incompatible", "divisibility", "redundant"):
        shown = kinds.get(kind, [])
        if kind == "memory":
            shown = sorted(shown, key=lambda r: r.memory_total)  # the closest misses first
        if shown and show_rejected:
            lines += ["", f"rejected, {kind} ({len(shown)}; first {min(show_rejected, len(shown))}):"]
            lines += [f"  {r.label}: {r.reason}" for r in shown[:show_rejected]]
    lines += ["", "assumptions:"] + [f"  - {a}" for a in planner.ASSUMPTIONS + ASSUMPTIONS]
    if result.ranked:
        lines.append(f"formulas of the best recipe: {', '.join(result.ranked[0].formulas)} (--json lists them all)")
    return "\n".join(lines)


def _number(text, flag: str, kind=float, low: float = 0.0, high: float | None = None):
    """``text`` as ``kind`` > ``low`` (<= ``high``), or a one-line ConfigError naming the flag."""
    try:
        value = kind(text)
    except (TypeError, ValueError):
        value = None
    if value is None or not math.isfinite(value) or value <= low or (high is not None and value > high):
        want = ("an integer" if kind is int else "a finite number") + f" > {low:g}" + \
            (f" and <= {high:g}" if high is not None else "")
        raise ConfigError(f"{flag} {text!r} is invalid; valid: {want}")
    return value


def _choices(text: str, flag: str, valid) -> tuple:
    items = tuple(x.strip() for x in str(text).split(",") if x.strip())
    bad = [x for x in items if x not in valid]
    if bad or not items:
        raise ConfigError(f"{flag} {text!r} is not valid; valid: comma-separated of {', '.join(valid)}")
    return items


def add_arguments(p) -> None:
    """The flags of ``etbench plan --search recipes`` (layout flags shared: --stages,
    --micro-batch-sizes, --attention, --overlap, --bucket-mb, --top, --show-rejected, --json, --verify)."""
    import argparse

    g = p.add_argument_group("recipe search (--search recipes)",
                             "--verify K dry-runs the top K ranked recipes that have an etbench recipe")
    g.add_argument("--precisions", default=",".join(PRECISION_CHOICES), help="fp32, bf16 (2+2+12), fp8 GEMMs")
    g.add_argument("--recompute", default=",".join(RECOMPUTE), help="activation recomputation: none, full, selective")
    g.add_argument("--offload", default=",".join(OFFLOADS),
                   help="none, optimizer (ZeRO-Offload), params (ZeRO-Infinity)")
    g.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="adamw, adamw8bit (8-bit state)")
    g.add_argument("--lora", default="off", help="off (default: LoRA fine-tunes adapters, not the model) | on | both")
    g.add_argument("--lora-rank", default="16", help="LoRA rank r (default 16)")
    g.add_argument("--tp", help="tensor-parallel degrees (default: the divisors of --devices up to 8)")
    g.add_argument("--device-fp8-flops", help="fp8 dense peak FLOP/s (default 2 x --device-flops, ASSUMED)")
    g.add_argument("--device-fp32-flops", help="fp32 (TF32) peak FLOP/s (default 0.5 x --device-flops, ASSUMED)")
    g.add_argument("--host-link-gbps", default=f"{HOST_LINK_GBPS:g}",
                   help=f"host link per device and direction, Gbit/s (default {HOST_LINK_GBPS:g}: PCIe Gen4 x16)")
    g.add_argument("--host-adam-rate", default=f"{HOST_ADAM_RATE:g}",
                   help=f"CPU Adam parameters/s per device (default {HOST_ADAM_RATE:g}, ASSUMED)")
    g.add_argument("--host-mem", default=f"{HOST_MEM / GIB:g}GiB", help="host memory per device for offload")
    try:
        p.add_argument("--verify", default="0", metavar="K", help="dry-run the top K as rank 0 (default 0)")
    except argparse.ArgumentError:  # the layout search's --verify: one flag for both searches
        pass


def from_args(args) -> dict:
    """The checked inputs (a one-line ConfigError for the first bad one, before any work)."""
    from .techniques import lowrank

    base = planner.from_args(args)
    hw = base["hw"]
    tps = None
    if args.tp is not None:
        tps = tuple(int(_number(x, "--tp", int)) for x in str(args.tp).split(",") if x.strip()) or None
        bad = [t for t in tps or () if hw.devices % t]
        if bad or not tps:
            raise ConfigError(f"--tp {args.tp!r} is not valid; valid: comma-separated divisors of --devices "
                              f"{hw.devices}")
    if args.lora not in LORA:
        raise ConfigError(f"--lora {args.lora!r} is not valid; valid: {', '.join(LORA)}")
    rank = _number(args.lora_rank, "--lora-rank", int)
    limit = min(lowrank.largest_saving_rank(*s) for s in lowrank.target_shapes(planner.model_counts(base["model"]).cfg)
                .values())
    if True in LORA[args.lora] and rank > limit:
        raise ConfigError(f"--lora-rank {rank} trains as many parameters as a matrix it adapts; valid for "
                          f"{base['model']}: 1..{limit}")
    try:
        host_mem = planner.parse_memory(args.host_mem)
    except ConfigError as e:
        raise ConfigError(str(e).replace("--device-mem", "--host-mem", 1)) from None
    rates = Rates(_number(args.device_fp8_flops, "--device-fp8-flops") if args.device_fp8_flops else
                  Rates.default(hw).fp8_flops,
                  _number(args.device_fp32_flops, "--device-fp32-flops") if args.device_fp32_flops else
                  Rates.default(hw).fp32_flops,
                  _number(args.host_link_gbps, "--host-link-gbps"), _number(args.host_adam_rate, "--host-adam-rate"),
                  host_mem)
    search = Search(_choices(args.precisions, "--precisions", PRECISION_CHOICES),
                    _choices(args.recompute, "--recompute", RECOMPUTE), base["stages"],
                    _choices(args.offload, "--offload", OFFLOADS),
                    _choices(args.optimizers, "--optimizers", OPTIMIZERS),
                    LORA[args.lora], tps, base["micro_batch_sizes"])
    return dict(model=base["model"], hw=hw, seq_len=base["seq_len"], global_batch=base["global_batch"], rates=rates,
                search=search, attention=base["attention"], overlap=base["overlap"], bucket_mb=base["bucket_mb"],
                lora_rank=rank, top=base["top"], show_rejected=base["show_rejected"], verify=base.get("verify", 0))


def run_cli(args) -> int:
    """``etbench plan --search recipes``: inputs checked (exit 2, nothing done), the recipes ranked
    and printed, the top ``--verify`` K dry-run, ``--json`` written atomically."""
    from .files import check_writable, exclusive, write_text
    from .train import strict_json

    inputs = from_args(args)
    if args.json is not None:
        check_writable(args.json)
    top, show, k = inputs.pop("top"), inputs.pop("show_rejected"), inputs.pop("verify")
    model, hw = inputs.pop("model"), inputs.pop("hw")
    with exclusive(args.json):  # one writer per output
        result = plan_recipes(model, hw, **inputs)
        print(report(result, top, show), flush=True)
        if k:
            print(f"\nverification: the top {k} recipes with an etbench recipe, dry-run as rank 0 of {hw.devices} "
                  f"(measured/predicted MiB for the recipe as etbench stores its states):", flush=True)
            passed = verify(result, k, lambda i, cand, row: row and print(verification_line(i, cand), flush=True))
            if passed:
                print(f"  ({passed} better-ranked candidates have no etbench recipe: not verified, see the etbench "
                      f"column)")
        if args.json is not None:
            write_text(args.json, json.dumps(strict_json(result.as_dict()), indent=1, default=str))
            print(f"-> {args.json}")
    return 0
