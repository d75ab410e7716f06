"""``etbench``: the command line.

    etbench run --model nano --data synthetic --steps 200 --out results/runs/nano.json
    etbench run --nproc 2 ...        # relaunches itself under torchrun (torch.distributed.run)
    etbench zoo                      # model names and parameter counts
    etbench peak                     # the MFU denominator on this machine
    etbench report results/runs -o results/plots
    etbench isoflop --budgets 1e10,3e10 --variants baseline,mod --out results/isoflop/NAME
    etbench compare SPEC.json --out compare.json   # variants timed interleaved, ratios with intervals
    etbench comm --nproc 4 --sizes 4K,1M,64M --out comm.json  # ring all-reduce vs parameter server
    etbench plan --model llama-7b --devices 64 --device-mem 80GiB --device-flops 989e12 --link-gbps 400 \
        --global-batch 1024 --seq-len 2048 [--json plan.json]   # layouts ranked by a predicted step time
    etbench gpu-check --out DIR      # every CUDA path once: a PASS / FAIL / REFUSED table
    etbench model-states --models gpt2-xl llama-7b   # per-rank model-state memory under DDP and ZeRO
    etbench publish RUNS_DIR --machine NAME          # another machine's records under results/published/
    etbench site build|vendor|check HTML_DIR         # the benchmark site (make site)
    etbench bench-time --machine M --commit SHA      # where the time of a make bench went
    etbench wheelhouse build|install DIR             # offline wheels (make wheelhouse, make setup)
    etbench deepspeed-ops                            # build DeepSpeed's JIT ops (make setup)
    etbench dryrun --model gpt2-xl --technique fsdp --world-size 64 [--rank R] [--out F]  # one rank on fake tensors
    etbench dryrun-sweep --model gpt2-xl,llama-7b,llama-70b --world-sizes 8,64,512 --layouts ddp,fsdp,fsdp+tp,tp+pp,dp+tp+pp [--out F]
    etbench plan-calibrate [--out results/atscale/calibration.json]  # planner vs measured step times, ws 1/2/4

Every ``python -m impls.X`` command is also an ``etbench`` command (:data:`MODULE_COMMANDS`), the
same parser either way: ``etbench NAME ARGS`` hands ``ARGS`` to the module's own ``main``
(:data:`DELEGATED`), imported only when that command runs.  ``python -m impls.ranks`` is the one
exception: internal plumbing that starts a rank (see :mod:`impls.ranks`).

Exit statuses: 0 done; 2 bad input (one line on stderr, before any work, nothing written: unknown
names, invalid values, an output path that cannot be written, a training state (``--resume``) that
does not fit);
1 a failure during the work (a write that failed, e.g. a full disk: one line naming the path and
the OS error, the previous file intact; a rank that died; an unexpected error, with its
traceback); 3 the run diverged (its record is written with ``status: "diverged at step N"``;
``--allow-divergence`` exits 0 instead); 130 interrupted (Ctrl-C: one line, naming the training-state
file to ``--resume`` from if there is one; no record written, no traceback from any rank).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import families
from . import recipe as recipe_lib
from . import train
from .errors import (EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_FAILED, EXIT_INTERRUPTED, ConfigError, OneLineParser,
                     WriteError)
from .files import check_distinct, check_writable, clean_stale, exclusive, same_file


def _run_parser(sub) -> None:
    """``etbench run``: the Recipe's flags (generated from its fields, so every field has one)
    and the flags of the run itself, which do not change its result."""
    p = sub.add_parser("run", help="train one recipe and write its record")
    recipe_lib.add_arguments(p)
    from .techniques import REGISTRY

    for action in p._actions:  # the registered techniques, listed where the flag is described
        if "--technique" in action.option_strings:
            action.help += "; registered: " + ", ".join(sorted(REGISTRY))
    p.add_argument("--nproc", type=int, default=1, help="ranks; > 1 relaunches under torchrun")
    _oversubscribe_argument(p)
    _force_argument(p)
    p.add_argument("--out", help="write the JSON record here (atomically)")
    p.add_argument("--save-every", type=int, metavar="N", help="save the training state every N steps")
    p.add_argument("--checkpoint", metavar="STATE_FILE",
                   help="where --save-every writes the training state (model, optimizer, RNG, step: the file "
                        "--resume reads; not activation checkpointing, which is --technique checkpoint) "
                        "(default: OUT with .state.pt)")
    p.add_argument("--resume", metavar="PATH", help="continue from a training state saved by --save-every")
    _timeout_argument(p)
    p.add_argument("--allow-divergence", action="store_true",
                   help="exit 0 when the loss becomes NaN/inf (the record says 'diverged at step N' either way; "
                        "default: exit status 3)")


def _oversubscribe_argument(p) -> None:
    p.add_argument("--oversubscribe", action="store_true",
                   help="allow --nproc above this machine's CPU cores (or CUDA devices): the ranks take turns, "
                        "every collective waits for the slowest, timings are not comparable (default: refused)")


def _check_fit(args, devices: set[str]) -> None:
    """More ranks than cores (or GPUs) are refused before any work unless ``--oversubscribe``."""
    if not _is_rank():
        from . import ranks

        ranks.check_fit(args.nproc, devices, args.oversubscribe)


def _force_argument(p) -> None:
    p.add_argument("--force", action="store_true",
                   help="run although the predicted peak memory per rank exceeds the device's memory (default: "
                        "refused before any work, with the prediction)")


def _apply_force(args) -> None:
    """``--force`` reaches every rank (and every variant's validation) through the environment."""
    if getattr(args, "force", False):
        os.environ[train.FORCE_ENV] = "1"


def _out_of_memory(e: BaseException) -> bool:
    """An allocation that failed during the work: Python's and numpy's MemoryError, torch's
    OutOfMemoryError (CUDA), or the CPU allocator's RuntimeError."""
    import torch

    if isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    return isinstance(e, RuntimeError) and any(text in str(e) for text in (
        "DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory", "out of memory"))


def _out_of_memory_line(e: BaseException) -> str:
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    first = first if len(first) <= 300 else first[:297] + "..."
    return (f"out of memory during the work ({type(e).__name__}: {first}); lower --batch-size or --seq-len, or use a "
            f"memory-saving technique (checkpoint, grad_accum, zero, fsdp)")


def _timeout_argument(p) -> None:
    from .dist import DEFAULT_TIMEOUT_S

    p.add_argument("--timeout", type=float, metavar="S",
                   help=f"seconds a rank waits in a collective for the others before the run fails, naming the "
                        f"rank that stopped responding and the collective (default {DEFAULT_TIMEOUT_S:.0f}, or "
                        f"$ETBENCH_DIST_TIMEOUT)")


def _apply_timeout(args) -> None:
    """``--timeout S`` reaches every rank through the environment the launcher hands on."""
    if getattr(args, "timeout", None) is None:
        return
    from .dist import MAX_TIMEOUT_S, TIMEOUT_ENV

    if not (args.timeout > 0 and args.timeout < float("inf")):
        raise recipe_lib.RecipeError(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    if args.timeout > MAX_TIMEOUT_S:
        raise recipe_lib.RecipeError(f"--timeout {args.timeout:g} is too long; valid: at most {MAX_TIMEOUT_S:.0f} "
                                     f"seconds (30 days)")
    os.environ[TIMEOUT_ENV] = repr(args.timeout)


def _relaunch_under_torchrun(argv: list[str], nproc: int) -> int:
    """Run this same command on ``nproc`` local ranks (:func:`impls.ranks.launch`, torch's
    elastic agent as ``torchrun --standalone`` runs it); their failure is one line, once."""
    from . import ranks

    rest, skip = [], False
    for i, a in enumerate(argv):  # drop --nproc so the children do not relaunch again
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    return ranks.launch(["impls.cli", *rest], nproc)


def _is_rank() -> bool:
    return "LOCAL_RANK" in os.environ


def _writer_lock(*paths):
    """:func:`impls.files.exclusive` on the outputs, held by the process that owns the command:
    the launcher of ``--nproc`` ranks (its ranks write under its lock), or rank 0 of ranks
    started by hand (``torchrun``), or the one process."""
    from contextlib import nullcontext

    from . import ranks

    if ranks.in_launched_rank() or int(os.environ.get("RANK", "0")) != 0:
        return nullcontext()
    return exclusive(*paths)


def _run_inputs(recipe, resume: str | None) -> dict:
    """The files a run reads, by the flag that named them: none may also be one of its outputs."""
    from . import init_from
    from .techniques import parse

    inputs = {"--resume": resume}
    sources = {"--init-from": recipe.init_from}
    for spec in recipe.techniques:
        try:
            parsed = parse(spec)
        except ConfigError:  # reported by the recipe's own checks, with their wording
            continue
        if parsed.name == "distill" and parsed.options.get("teacher"):
            sources["distill:teacher"] = parsed.options["teacher"]
    for flag, source in sources.items():
        if source:
            inputs[flag] = source
            if str(source).endswith(".json"):  # a record: its weights are read from the state beside it
                inputs[f"{flag} weights"] = str(Path(source).with_suffix(init_from.STATE_SUFFIX))
    if recipe.data.startswith("tokens:"):
        inputs["--data"] = recipe.data[len("tokens:"):].split(",")[0]
    return inputs


def _cmd_run(args, argv) -> int:
    recipe = recipe_lib.from_args(args)
    _apply_timeout(args)
    _apply_force(args)
    if args.nproc < 1:
        raise recipe_lib.RecipeError(f"--nproc must be >= 1, got {args.nproc}")
    _check_fit(args, {recipe.device})
    if args.checkpoint is not None and args.save_every is None:
        raise recipe_lib.RecipeError(f"--checkpoint {args.checkpoint!r} is written only with --save-every N (the "
                                     f"steps between saves); give --save-every, or drop --checkpoint")
    state_file = args.checkpoint if args.checkpoint is not None else (
        str(Path(args.out).with_suffix(".state.pt")) if args.out else None)
    if args.save_every is not None:
        if state_file is None:
            raise recipe_lib.RecipeError("--save-every needs --checkpoint PATH or --out FILE")
        if args.save_every < 1:
            raise recipe_lib.RecipeError(f"--save-every must be >= 1, got {args.save_every}")
        args.saving_to = state_file  # named by the line of an interrupted run (_interrupted)
    # Every path the run will write, before any work: a run is never lost to an unwritable path.
    writes = [args.out] if args.out is not None else []
    for path in writes:
        check_writable(path)
    if args.save_every is not None:
        writes.append(state_file)
        check_writable(state_file)
        if args.out is not None and same_file(args.out, state_file):
            raise recipe_lib.RecipeError(f"--checkpoint {state_file!r} is the --out record's path; give another")
    # Nothing read may be overwritten: the record over the training state it resumes from, over the
    # record --init-from names... (the state file may be the --resume file: that is how a run goes on).
    inputs = _run_inputs(recipe, args.resume)
    check_distinct({"--out": args.out}, inputs)
    if args.save_every is not None:
        check_distinct({"--checkpoint": state_file}, {k: v for k, v in inputs.items() if k != "--resume"})
    if args.nproc > 1 and not _is_rank():
        train.validate(recipe, world_size=args.nproc)  # fail here, once, before starting ranks
        if args.resume:
            train.training_state.load(args.resume, recipe, args.nproc)
        with _writer_lock(*writes):
            clean_stale(*writes)
            return _relaunch_under_torchrun(argv, args.nproc)
    with _writer_lock(*writes):
        return _run_here(args, recipe, state_file, writes)


def _run_here(args, recipe, state_file, writes) -> int:
    if int(os.environ.get("RANK", "0")) == 0:
        clean_stale(*writes)  # temporaries of a process killed mid-write
    record = train.run(recipe, save_every=args.save_every, checkpoint=state_file, resume=args.resume)
    status = 0
    if int(os.environ.get("RANK", "0")) == 0:
        if args.out:
            train.write_record(record, args.out)
        loss = record["final_val_loss"]
        print(f"{record['label']}: {record['steps_done']} steps, "
              + (f"val loss {loss:.4f}, " if loss is not None else f"{record['status']}, ")
              + f"{record['tokens_per_second']:.0f} tok/s, MFU {record['mfu']:.1%}, HFU {record['hfu']:.1%}"
              + (f" -> {args.out}" if args.out else ""))
        for error in record["consistency_errors"]:
            print(f"etbench: warning: inconsistent record: {error}", file=sys.stderr)
        if record["load"]["noisy"]:
            load = record["load"]
            others = load.get("other_processes_cores")
            print("etbench: warning: noisy run: " + (f"other processes used {others:.2f} cores, " if others is not None else "")
                  + f"1-min load {load['load1_end']:.2f} on {load['cores_in_use']} cores in use; "
                  "its timings are not comparable", file=sys.stderr)
    if record["status"] != "ok":  # the same record on every rank: every rank exits alike
        where = f"; record with status {record['status']!r} in {args.out}" if args.out else ""
        if args.allow_divergence:
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"etbench: warning: run {record['status']} (non-finite loss){where}", file=sys.stderr)
        else:
            status = _fail(EXIT_DIVERGED, f"run {record['status']} (non-finite loss){where}; "
                                          f"--allow-divergence to exit 0, --grad-clip or a lower --lr may help")
    from . import dist

    dist.shutdown()
    return status


def _cmd_compare(args, argv) -> int:
    from . import compare

    spec = compare.load_spec(args.spec)
    _apply_timeout(args)
    _apply_force(args)
    if args.nproc < 1:
        raise recipe_lib.RecipeError(f"--nproc must be >= 1, got {args.nproc}")
    _check_fit(args, {recipe.device for recipe in spec.recipes.values()})
    if args.out is not None:
        check_writable(args.out)
        inputs = {"spec": args.spec}
        for recipe in spec.recipes.values():
            inputs.update({f"{k} (of a variant)": v for k, v in _run_inputs(recipe, None).items() if v})
        check_distinct({"--out": args.out}, inputs)
    if args.nproc > 1 and not _is_rank():
        for recipe in spec.recipes.values():
            train.validate(recipe, world_size=args.nproc)
        with _writer_lock(args.out):
            clean_stale(args.out)
            return _relaunch_under_torchrun(argv, args.nproc)
    with _writer_lock(args.out):
        if int(os.environ.get("RANK", "0")) == 0:
            clean_stale(args.out)
        record = compare.measure(spec)
        if int(os.environ.get("RANK", "0")) == 0:
            if args.out:
                train.write_record(record, args.out)
            print(compare.summary_line(record) + (f"\n-> {args.out}" if args.out else ""))
    from . import dist

    dist.shutdown()
    return 0


def _cmd_comm(args, argv) -> int:
    from . import commbench

    spec = commbench.validate(args, launched=_is_rank())
    _apply_timeout(args)
    _check_fit(args, {args.device})
    if args.out is not None:
        check_writable(args.out)
    if not _is_rank():
        with _writer_lock(args.out):
            clean_stale(args.out)
            return _relaunch_under_torchrun(argv, args.nproc)
    with _writer_lock(args.out):
        record = commbench.measure(spec)
        if int(os.environ.get("RANK", "0")) == 0:
            if args.out:
                train.write_record(record, args.out)
            print("\n".join(commbench.summary_lines(record)) + (f"\n-> {args.out}" if args.out else ""))
    from . import dist

    dist.shutdown()
    return 0


def _cmd_zoo(args, argv) -> int:
    from . import zoo

    print(f"{'name':<14} {'params':>15} {'matmul N':>15}  L    d     about")
    for row in zoo.sizes():
        print(f"{row['name']:<14} {row['params']:>15,} {row['matmul_params']:>15,}  {row['n_layer']:<4} "
              f"{row['d_model']:<5} {row['about']}")
    return 0


def _cmd_peak(args, argv) -> int:
    import torch

    from .dist import resolve_device
    from .measure import device_name, peak_flops

    device = resolve_device(args.device)
    if args.phase is not None and args.bench_log is None:
        raise ConfigError(f"--phase {args.phase} applies to --bench-log only (which end of a benchmark run the "
                          f"probe logs); give --bench-log JSON, or drop --phase")
    if args.bench_log is not None:  # make bench: fresh probes at its start and end, logged side by side
        check_writable(args.bench_log)
        args.phase = args.phase or "start"
        from .measure.peak import bench_probe

        with exclusive(args.bench_log):
            log = bench_probe(args.bench_log, args.phase, device)
        peaks = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in log[args.phase]["peaks"].items())
        print(f"peak FLOP/s at the {args.phase} of the benchmark run: {peaks} GFLOP/s"
              + (f"; drift {', '.join(f'{k} {v:+.1%}' for k, v in log['drift'].items())}, "
                 f"{'NOISY' if log['noisy'] else 'quiet'}" if "drift" in log else ""))
        return 0
    dtype = getattr(torch, args.dtype)
    peak = peak_flops(device, dtype, reprobe=args.reprobe)
    print(f"{device_name(device)} {args.dtype}: {peak['value'] / 1e9:.1f} GFLOP/s ({peak['source']})")
    if peak.get("datasheet") is not None:  # GPUs with a datasheet row: the cross-check
        print(f"datasheet {peak['datasheet'] / 1e9:.1f} GFLOP/s ({peak['peak_source']}): measured/datasheet "
              f"{peak['measured_over_datasheet']:.1%}")
    elif "peak_source" in peak:
        print(f"datasheet: {peak['peak_source']}")
    if "warning" in peak:
        print(f"WARNING: {peak['warning']}")
    return 0


def _cmd_plan(args, argv) -> int:
    from . import planner

    return planner.run_cli(args)


def _cmd_gpu_check(args, argv) -> int:
    from . import gpucheck

    return gpucheck.run_cli(args)


def _cmd_dryrun(args, argv) -> int:
    """``etbench dryrun``: the record of one rank built and stepped once on fake tensors, and one
    line per model-state component against the ZeRO formula."""
    from . import dryrun

    recipe = recipe_lib.from_args(args)
    if args.out is not None:
        check_writable(args.out)
    dryrun.check(recipe, args.world_size, args.rank)  # bad input: one line, before any work
    record = dryrun.dry_run(recipe, args.world_size, args.rank)
    if args.out:
        train.write_record(record, args.out)
    memory, states, comm = record["memory"], record.get("model_states") or {}, record.get("comm") or {}
    mib = 1 << 20
    print(f"{record['label']}: params {memory['params_bytes'] / mib:.1f} MiB, grads {memory['grads_bytes'] / mib:.1f} "
          f"MiB, optimizer {memory['optimizer_bytes'] / mib:.1f} MiB per rank"
          + (f"; vs the formula ×{states['ratio']['total']:.4f} ({states.get('stage_name')})"
             if (states.get("ratio") or {}).get("total") else "")
          + (f"; traffic {comm['bytes_per_step'] / mib:.1f} MiB/step, ×{comm['ratio']:.4f} of the formula"
             if comm.get("ratio") else "")
          + f"; tracked peak {(record['peak'].get('bytes') or 0) / mib:.0f} MiB; {record['wall_seconds']:.1f} s")
    return 0


def _utc_now() -> str:
    """When an artefact was written, ISO 8601 UTC (a checkout's file times say when git wrote it)."""
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _sweep_done(path: str, head: dict) -> list[dict]:
    """Rows of an earlier ``dryrun-sweep --out path`` with the same batch, sequence, rank and data:
    reused, not rerun (its other rows are kept in the file).  None if there is no file; a file
    that is not such a sweep is refused (one line), never overwritten."""
    if not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--out {path} exists and is not a dry-run sweep ({type(e).__name__}); choose another "
                          f"path or remove it") from None
    differs = [k for k, v in head.items() if not isinstance(old, dict) or old.get(k) != v]
    if differs:
        raise ConfigError(f"--out {path} holds a sweep with other {', '.join(differs)}; choose another path or "
                          f"remove it (a sweep resumes only with the same batch, sequence, rank and data)")
    return [r for r in old.get("rows", []) if isinstance(r, dict) and {"model", "world_size", "layout"} <= set(r)]


def _cmd_dryrun_sweep(args, argv) -> int:
    """``etbench dryrun-sweep``: one dry run per (model, world size, layout), one line each
    (:func:`impls.dryrun_sweep.sweep`); every value is checked before the first run."""
    from . import dryrun_sweep

    models, sizes, layouts = dryrun_sweep.parse_sweep(args.model, args.world_sizes, args.layouts)
    if args.out is not None:
        check_writable(args.out)
    fields = {"data": args.data} if args.data else {}
    from .provenance import SCHEMA_VERSION, provenance

    head = dict(kind=families.DRYRUN_SWEEP, schema=SCHEMA_VERSION, batch_size=args.batch_size, seq_len=args.seq_len,
                rank=args.rank, fields=fields)
    done = _sweep_done(args.out, head) if args.out else []
    rows: list[dict] = []

    def progress(row):
        print(dryrun_sweep.table_line(row), flush=True)
        rows.append(row)
        if args.out:  # row by row: an interrupted sweep keeps what it finished (and resumes from it)
            kept = rows + [r for r in done if (r["model"], r["world_size"], r["layout"]) not in
                           {(x["model"], x["world_size"], x["layout"]) for x in rows}]
            train.write_record(dict(head, **provenance(), date=_utc_now(), tolerance=dryrun_sweep.TOLERANCE,
                                    layouts=dryrun_sweep.LAYOUTS, rows=kept), args.out)

    dryrun_sweep.sweep(models, sizes, layouts, batch_size=args.batch_size, seq_len=args.seq_len, rank=args.rank,
                       fields=fields, progress=progress, done=done)
    explained = [row for row in rows if row.get("explanation")]
    for row in explained:
        print(f"{row['model']} {row['layout']} N={row['world_size']}: {row['explanation']}")
    return 0


def _cmd_deepspeed_ops(args, argv) -> int:
    from .engines import deepspeed_ops

    return deepspeed_ops.main()


#: Commands whose module parses its own arguments: ``etbench NAME ARGS...`` is ``python -m MODULE
#: ARGS...`` (the module's ``main(ARGS)``: one parser per command), the module imported only when
#: its command runs.  Name -> (module, the line ``etbench --help`` shows).
DELEGATED = {
    "isoflop": ("impls.isoflop", "isoFLOP sweep: train sizes × budgets × variants, fit optima (see --help)"),
    "sweep": ("impls.sweep", "a recipe grid or a list of comparisons as jobs: in-process, local, Slurm or Ray "
                             "(see --help)"),
    "report": ("impls.report", "plots and tables from run records, or --compare two runs directories (see --help)"),
    "site": ("impls.site", "the benchmark site: build, vendor (CDN assets made local), check (see --help)"),
    "publish": ("impls.publish", "publish another machine's records under results/published/ (see --help)"),
    "bench-time": ("impls.benchtime", "where the time of a make bench went, per family and phase (see --help)"),
    "model-states": ("impls.measure.model_states",
                     "per-rank model-state memory of zoo models under DDP and ZeRO 1/2/3 (see --help)"),
    "wheelhouse": ("impls.wheelhouse", "build or install an offline folder of wheels (see --help)"),
    "plan-calibrate": ("impls.calibration", "the planner's step time against measured runs at world sizes 1/2/4: "
                                            "rank correlation and error (see --help)"),
}

#: Every ``python -m impls.X`` entry point and its ``etbench`` command (``tests/test_cli_commands.py``
#: fails on an entry point missing here, except the internal ones it lists with their reasons).
MODULE_COMMANDS = {module: name for name, (module, _) in DELEGATED.items()} | {
    "impls.planner": "plan", "impls.gpucheck": "gpu-check", "impls.engines.deepspeed_ops": "deepspeed-ops"}


def _delegate(name: str, rest: list[str]) -> int:
    """``etbench NAME REST...``: the module's own ``main(REST)``; what escapes it is reported as
    every command's is (one line and status 2 for bad input, 1 for a failed write, 130 for Ctrl-C)."""
    import importlib

    module = importlib.import_module(DELEGATED[name][0])
    try:
        return module.main(rest)
    except ConfigError as e:
        return _fail(EXIT_BAD_INPUT, str(e))
    except WriteError as e:
        return _fail(EXIT_FAILED, str(e))
    except KeyboardInterrupt:
        return _interrupted(None, 0.0)
    except Exception as e:  # out of memory (an isoflop point): one line, status 1
        if _out_of_memory(e):
            return _fail(EXIT_FAILED, _out_of_memory_line(e))
        raise


def parser() -> argparse.ArgumentParser:
    """The ``etbench`` parser (the :data:`DELEGATED` commands are only listed here: their modules
    parse their own options)."""
    top = OneLineParser(prog="etbench", description=__doc__.split("\n")[0])
    sub = top.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    p = sub.add_parser("compare", help="time variants interleaved (A B C, B C A, ...): speed-ups with 95%% intervals")
    p.add_argument("spec", help="JSON: {baseline, rounds, steps, warmup, common: {recipe}, variants: {name: {recipe}}}")
    p.add_argument("--out", help="write the JSON record here (atomically)")
    p.add_argument("--nproc", type=int, default=1, help="ranks; > 1 relaunches under torchrun")
    _oversubscribe_argument(p)
    _force_argument(p)
    _timeout_argument(p)
    p = sub.add_parser("comm", help="ring all-reduce vs parameter server: time, algbw, busbw per message size")
    from . import commbench

    commbench.add_arguments(p)
    _oversubscribe_argument(p)
    _timeout_argument(p)
    p = sub.add_parser("dryrun", help="one rank of a recipe at any world size on fake tensors under the fake process "
                                      "group: per-rank model-state bytes, collectives, tracked peak (impls.dryrun)")
    recipe_lib.add_arguments(p)
    p.add_argument("--world-size", type=int, required=True, metavar="N", help="ranks the run is planned for")
    p.add_argument("--rank", type=int, default=0, metavar="R", help="which rank to build and step (default 0)")
    p.add_argument("--out", help="write the JSON record (kind dryrun) here (atomically)")
    p = sub.add_parser("dryrun-sweep", help="dry runs of models x world sizes x layouts (ddp, fsdp, tp, fsdp+tp, tp+pp, "
                                            "dp+tp+pp), one line each: bytes, traffic and activations vs their "
                                            "formulas (impls.dryrun_sweep.sweep)")
    p.add_argument("--model", required=True, metavar="M1,M2", help="zoo names, comma-separated")
    p.add_argument("--world-sizes", required=True, metavar="N1,N2", help="world sizes, comma-separated (each >= 2)")
    p.add_argument("--layouts", default="fsdp,tp", metavar="L1,L2",
                   help="comma-separated: ddp, fsdp (dp=N), tp (tp=N), fsdp+tp, tp+pp, dp+tp+pp (tp=8 inside a node; "
                        "see impls.dryrun_sweep.LAYOUTS) (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per rank (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--rank", type=int, default=0, metavar="R", help="which rank to build and step (default 0)")
    p.add_argument("--data", help="the data source (default: synthetic over each model's own vocabulary, order 1)")
    p.add_argument("--out", help="write the rows as JSON (kind dryrun-sweep) here (atomically)")
    sub.add_parser("zoo", help="list model names and parameter counts")
    p = sub.add_parser("peak", help="peak FLOP/s used as the MFU denominator")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float8_e4m3fn", "int8"],
                   help="the GEMM dtype (float8_e4m3fn: torch._scaled_mm, CUDA capability >= 8.9; int8: torch._int_mm)")
    p.add_argument("--reprobe", action="store_true", help="measure again, replacing the cached value")
    p.add_argument("--bench-log", metavar="JSON",
                   help="re-probe fp32 and bf16 (and fp8 on GPUs that have it) and log them for a benchmark run")
    p.add_argument("--phase", choices=("start", "end"), help="with --bench-log: which end of the run (default start)")
    p = sub.add_parser("plan", help="auto-parallel planner: layouts ranked by a predicted step time (see --help)")
    from . import planner

    planner.add_arguments(p)
    p = sub.add_parser("gpu-check", help="every CUDA path once: a PASS / FAIL / REFUSED table (see --help)")
    from . import gpucheck

    gpucheck.add_arguments(p)
    sub.add_parser("deepspeed-ops", help="build DeepSpeed's JIT-compiled ops once (make setup runs it)",
                   description="Build DeepSpeed's JIT-compiled ops (CPUAdam, the shared-memory collectives) into "
                               "the extensions cache; an op that cannot build is recorded with its reason, and the "
                               "techniques that need it refuse with that reason (impls.engines.deepspeed_ops).")
    for name, (_, summary) in DELEGATED.items():
        sub.add_parser(name, help=summary)
    return top


def _fail(status: int, message: str) -> int:
    """Print ``etbench: error: MESSAGE`` (one line) and return ``status``; in a rank started by
    ``--nproc``, leave it for the parent, which prints it once for all ranks."""
    from . import ranks

    if not ranks.report_error(status, message):
        print(f"etbench: error: {message}", file=sys.stderr)
    return status


def collective_of(exc: BaseException) -> str:
    """The collective a rank was in when ``exc`` was raised: the innermost ``torch.distributed``
    function of the traceback (``all_reduce``, ``barrier``...), or the gradient all-reduce of a
    backward pass (DDP's reducer calls it from C++), else ``a collective``."""
    name, tb = None, exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        path = code.co_filename.replace(os.sep, "/")
        if "/torch/distributed/" in path and not code.co_name.startswith("_") and code.co_name != "wrapper":
            name = code.co_name
        elif "/torch/autograd/" in path and code.co_name == "backward" and name is None:
            name = "the gradient all-reduce of backward"
        tb = tb.tb_next
    return name or "a collective"


def _interrupted(args, started: float) -> int:
    """Ctrl-C: ``etbench: interrupted``, naming the training-state file to resume from if the run
    has one (saved by this run, else the one it resumed from), instead of a traceback; status 130."""
    def written(path) -> bool:  # by this command
        try:
            return path is not None and os.stat(path).st_mtime >= started
        except OSError:
            return False

    saving_to, resumed, out = (getattr(args, name, None) for name in ("saving_to", "resume", "out"))
    out = out if getattr(args, "command", None) in ("run", "compare", "comm") else None  # their JSON record
    resume_from = saving_to if written(saving_to) else resumed
    print("etbench: interrupted" + ("; no record written" if out is not None and not written(out) else "")
          + (f"; resume with --resume {resume_from}" if resume_from else ""), file=sys.stderr)
    return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in DELEGATED:  # its own parser: the module owns its options
        return _delegate(argv[0], argv[1:])
    args = parser().parse_args(argv)
    commands = {"run": _cmd_run, "compare": _cmd_compare, "comm": _cmd_comm, "zoo": _cmd_zoo, "peak": _cmd_peak,
                "plan": _cmd_plan, "gpu-check": _cmd_gpu_check, "deepspeed-ops": _cmd_deepspeed_ops,
                "dryrun": _cmd_dryrun, "dryrun-sweep": _cmd_dryrun_sweep}
    started = time.time()
    try:
        return commands[args.command](args, argv)
    except KeyboardInterrupt:  # Ctrl-C: one line, status 130 (with --nproc, ranks.launch has stopped the ranks)
        return _interrupted(args, started)
    except ConfigError as e:  # bad input: one line, status 2; anything else keeps its traceback
        return _fail(EXIT_BAD_INPUT, str(e))
    except WriteError as e:  # a write failed mid-way (full disk...): one line, status 1, old file intact
        return _fail(EXIT_FAILED, str(e))
    except Exception as e:
        if _out_of_memory(e):  # an allocation failed during the work: one line, status 1 (once, with --nproc)
            return _fail(EXIT_FAILED, _out_of_memory_line(e))
        import torch.distributed as tdist

        lost = isinstance(e, getattr(tdist, "DistError", ())) or (isinstance(e, RuntimeError) and "/gloo/" in str(e))
        if _is_rank() and lost:  # a peer rank died or hung (gloo: closed, reset, timed out): the parent names it
            return _fail(EXIT_FAILED, f"lost contact with the other ranks in {collective_of(e)} ({type(e).__name__}: "
                                      f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})")
        raise


if __name__ == "__main__":
    sys.exit(main())
