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

Exit statuses: 0 done; 2 bad input (one line on stderr, before any work, nothing written: unknown
names, invalid values, an output path that cannot be written, a checkpoint that does not fit);
1 a failure during the work (a write that failed, e.g. a full disk: one line naming the path and
the OS error, the previous file intact; a rank that died; an unexpected error, with its
traceback); 3 the run diverged (its record is written with ``status: "diverged at step N"``;
``--allow-divergence`` exits 0 instead).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import recipe as recipe_lib
from . import train
from .errors import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_FAILED, ConfigError, WriteError
from .files import check_writable, check_writable_dir, clean_stale


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
    p.add_argument("--out", help="write the JSON record here (atomically)")
    p.add_argument("--save-every", type=int, metavar="N", help="save the training state every N steps")
    p.add_argument("--checkpoint", help="training-state file for --save-every (default: OUT with .state.pt)")
    p.add_argument("--resume", metavar="PATH", help="continue from a training state saved by --save-every")
    _timeout_argument(p)
    p.add_argument("--allow-divergence", action="store_true",
                   help="exit 0 when the loss becomes NaN/inf (the record says 'diverged at step N' either way; "
                        "default: exit status 3)")


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
    from .dist import TIMEOUT_ENV

    if not (args.timeout > 0 and args.timeout < float("inf")):
        raise recipe_lib.RecipeError(f"--timeout must be a number of seconds > 0, got {args.timeout}")
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


def _same_file(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def _cmd_run(args, argv) -> int:
    recipe = recipe_lib.from_args(args)
    _apply_timeout(args)
    if args.nproc < 1:
        raise recipe_lib.RecipeError(f"--nproc must be >= 1, got {args.nproc}")
    checkpoint = args.checkpoint or (str(Path(args.out).with_suffix(".state.pt")) if args.out else None)
    if args.save_every is not None:
        if checkpoint is None:
            raise recipe_lib.RecipeError("--save-every needs --checkpoint PATH or --out FILE")
        if args.save_every < 1:
            raise recipe_lib.RecipeError(f"--save-every must be >= 1, got {args.save_every}")
    # Every path the run will write, before any work: a run is never lost to an unwritable path.
    writes = [args.out] if args.out else []
    if args.save_every is not None:
        writes.append(checkpoint)
        if args.out and _same_file(args.out, checkpoint):
            raise recipe_lib.RecipeError(f"--checkpoint {checkpoint!r} is the --out record's path; give another")
    for path in writes:
        check_writable(path)
    if args.nproc > 1 and not _is_rank():
        train.validate(recipe, world_size=args.nproc)  # fail here, once, before starting ranks
        if args.resume:
            train.training_state.load(args.resume, recipe, args.nproc)
        clean_stale(*writes)
        return _relaunch_under_torchrun(argv, args.nproc)
    if int(os.environ.get("RANK", "0")) == 0:
        clean_stale(*writes)  # temporaries of a process killed mid-write
    record = train.run(recipe, save_every=args.save_every, checkpoint=checkpoint, resume=args.resume)
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
    if args.nproc < 1:
        raise recipe_lib.RecipeError(f"--nproc must be >= 1, got {args.nproc}")
    if args.out:
        check_writable(args.out)
    if args.nproc > 1 and not _is_rank():
        for recipe in spec.recipes.values():
            train.validate(recipe, world_size=args.nproc)
        clean_stale(args.out)
        return _relaunch_under_torchrun(argv, args.nproc)
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
    if args.out:
        check_writable(args.out)
    if not _is_rank():
        clean_stale(args.out)
        return _relaunch_under_torchrun(argv, args.nproc)
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
    if args.bench_log:  # make bench: fresh probes at its start and end, logged side by side
        check_writable(args.bench_log)
        from .measure.peak import bench_probe

        log = bench_probe(args.bench_log, args.phase, device)
        peaks = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in log[args.phase]["peaks"].items())
        print(f"peak FLOP/s at the {args.phase} of the benchmark run: {peaks} GFLOP/s"
              + (f"; drift {', '.join(f'{k} {v:+.1%}' for k, v in log['drift'].items())}, "
                 f"{'NOISY' if log['noisy'] else 'quiet'}" if "drift" in log else ""))
        return 0
    dtype = getattr(torch, args.dtype)
    peak = peak_flops(device, dtype, reprobe=args.reprobe)
    print(f"{device_name(device)} {args.dtype}: {peak['value'] / 1e9:.1f} GFLOP/s ({peak['source']})")
    return 0


def _cmd_plan(args, argv) -> int:
    from . import planner

    return planner.run_cli(args)


def _cmd_report(args, argv) -> int:
    from . import report

    return report.main([*args.paths, "-o", args.out])


class _OneLineParser(argparse.ArgumentParser):
    """argparse's errors (a flag's type, a missing or exclusive flag) as every other bad input:
    one line on stderr and status 2, without the usage block (``--help`` shows it).  Its
    subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    """The ``etbench`` parser (``isoflop`` is only listed here: it parses its own options)."""
    top = _OneLineParser(prog="etbench", description=__doc__.split("\n")[0])
    sub = top.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    p = sub.add_parser("compare", help="time variants interleaved (A B C, B C A, ...): speed-ups with 95%% intervals")
    p.add_argument("spec", help="JSON: {baseline, rounds, steps, warmup, common: {recipe}, variants: {name: {recipe}}}")
    p.add_argument("--out", help="write the JSON record here (atomically)")
    p.add_argument("--nproc", type=int, default=1, help="ranks; > 1 relaunches under torchrun")
    _timeout_argument(p)
    p = sub.add_parser("comm", help="ring all-reduce vs parameter server: time, algbw, busbw per message size")
    from . import commbench

    commbench.add_arguments(p)
    _timeout_argument(p)
    sub.add_parser("zoo", help="list model names and parameter counts")
    p = sub.add_parser("peak", help="peak FLOP/s used as the MFU denominator")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reprobe", action="store_true", help="measure again, replacing the cached value")
    p.add_argument("--bench-log", metavar="JSON", help="re-probe fp32 and bf16 and log them for a benchmark run")
    p.add_argument("--phase", choices=("start", "end"), default="start", help="with --bench-log: which end of the run")
    sub.add_parser("isoflop", help="isoFLOP sweep: train sizes × budgets × variants, fit optima (see --help)")
    p = sub.add_parser("plan", help="auto-parallel planner: layouts ranked by a predicted step time (see --help)")
    from . import planner

    planner.add_arguments(p)
    p = sub.add_parser("report", help="plots and tables from run records")
    p.add_argument("paths", nargs="+")
    p.add_argument("-o", "--out", default="results/plots")
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["isoflop"]:  # its own parser: the sweep engine owns its options
        from . import isoflop

        try:
            return isoflop.main(argv[1:])
        except ConfigError as e:
            return _fail(EXIT_BAD_INPUT, str(e))
        except WriteError as e:
            return _fail(EXIT_FAILED, str(e))
    args = parser().parse_args(argv)
    commands = {"run": _cmd_run, "compare": _cmd_compare, "comm": _cmd_comm, "zoo": _cmd_zoo, "peak": _cmd_peak, "report": _cmd_report,
                "plan": _cmd_plan}
    try:
        return commands[args.command](args, argv)
    except ConfigError as e:  # bad input: one line, status 2; anything else keeps its traceback
        return _fail(EXIT_BAD_INPUT, str(e))
    except WriteError as e:  # a write failed mid-way (full disk...): one line, status 1, old file intact
        return _fail(EXIT_FAILED, str(e))
    except Exception as e:
        import torch.distributed as tdist

        lost = isinstance(e, getattr(tdist, "DistError", ())) or (isinstance(e, RuntimeError) and "/gloo/" in str(e))
        if _is_rank() and lost:  # a peer rank died or hung (gloo: closed, reset, timed out): the parent names it
            return _fail(EXIT_FAILED, f"lost contact with the other ranks in {collective_of(e)} ({type(e).__name__}: "
                                      f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})")
        raise


if __name__ == "__main__":
    sys.exit(main())
