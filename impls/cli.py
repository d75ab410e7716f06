"""``etbench``: the command line.

    etbench run --model nano --data synthetic --steps 200 --out results/runs/nano.json
    etbench run --nproc 2 ...        # relaunches itself under torchrun (torch.distributed.run)
    etbench zoo                      # model names and parameter counts
    etbench peak                     # the MFU denominator on this machine
    etbench report results/runs -o results/plots
    etbench isoflop --budgets 1e10,3e10 --variants baseline,mod --out results/isoflop/NAME
    etbench compare SPEC.json --out compare.json   # variants timed interleaved, ratios with intervals

Bad input exits with status 2 and one line on stderr, before any work and without writing files.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from . import recipe as recipe_lib
from . import train
from .errors import ConfigError


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


def _relaunch_under_torchrun(argv: list[str], nproc: int) -> int:
    """Run this same command under ``torch.distributed.run`` with ``nproc`` ranks."""
    rest, skip = [], False
    for i, a in enumerate(argv):  # drop --nproc so the children do not relaunch again
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    env = dict(os.environ)
    # Children must import what this process imports (asv strips PYTHONPATH from benchmarks).
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "impls.cli", *rest]
    return subprocess.run(cmd, env=env).returncode


def _cmd_run(args, argv) -> int:
    recipe = recipe_lib.from_args(args)
    if args.nproc < 1:
        raise recipe_lib.RecipeError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        train.validate(recipe, world_size=args.nproc)  # fail here, once, before starting ranks
        return _relaunch_under_torchrun(argv, args.nproc)
    checkpoint = args.checkpoint or (str(Path(args.out).with_suffix(".state.pt")) if args.out else None)
    if args.save_every is not None and checkpoint is None:
        raise recipe_lib.RecipeError("--save-every needs --checkpoint PATH or --out FILE")
    record = train.run(recipe, save_every=args.save_every, checkpoint=checkpoint, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        if args.out:
            train.write_record(record, args.out)
        print(f"{record['label']}: {record['steps']} steps, val loss {record['final_val_loss']:.4f}, "
              f"{record['tokens_per_second']:.0f} tok/s, MFU {record['mfu']:.1%}, HFU {record['hfu']:.1%}"
              + (f" -> {args.out}" if args.out else ""))
        for error in record["consistency_errors"]:
            print(f"etbench: warning: inconsistent record: {error}", file=sys.stderr)
        if record["load"]["noisy"]:
            print(f"etbench: warning: noisy run: 1-min load {record['load']['load1_end']:.2f} on "
                  f"{record['load']['cores_in_use']} cores in use; its timings are not comparable", file=sys.stderr)
    from . import dist

    dist.shutdown()
    return 0


def _cmd_compare(args, argv) -> int:
    from . import compare
    from .files import check_writable

    spec = compare.load_spec(args.spec)
    if args.nproc < 1:
        raise recipe_lib.RecipeError(f"--nproc must be >= 1, got {args.nproc}")
    if args.out:
        check_writable(args.out)
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        for recipe in spec.recipes.values():
            train.validate(recipe, world_size=args.nproc)
        return _relaunch_under_torchrun(argv, args.nproc)
    record = compare.measure(spec)
    if int(os.environ.get("RANK", "0")) == 0:
        if args.out:
            train.write_record(record, args.out)
        print(compare.summary_line(record) + (f"\n-> {args.out}" if args.out else ""))
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
    sub.add_parser("zoo", help="list model names and parameter counts")
    p = sub.add_parser("peak", help="peak FLOP/s used as the MFU denominator")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reprobe", action="store_true", help="measure again, replacing the cached value")
    p.add_argument("--bench-log", metavar="JSON", help="re-probe fp32 and bf16 and log them for a benchmark run")
    p.add_argument("--phase", choices=("start", "end"), default="start", help="with --bench-log: which end of the run")
    sub.add_parser("isoflop", help="isoFLOP sweep: train sizes × budgets × variants, fit optima (see --help)")
    p = sub.add_parser("report", help="plots and tables from run records")
    p.add_argument("paths", nargs="+")
    p.add_argument("-o", "--out", default="results/plots")
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["isoflop"]:  # its own parser: the sweep engine owns its options
        from . import isoflop

        try:
            return isoflop.main(argv[1:])
        except ConfigError as e:
            print(f"etbench: error: {e}", file=sys.stderr)
            return 2
    args = parser().parse_args(argv)
    commands = {"run": _cmd_run, "compare": _cmd_compare, "zoo": _cmd_zoo, "peak": _cmd_peak, "report": _cmd_report}
    try:
        return commands[args.command](args, argv)
    except ConfigError as e:  # bad input: one line, status 2; anything else keeps its traceback
        print(f"etbench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
