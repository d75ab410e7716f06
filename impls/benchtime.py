"""Where the time of a ``make bench`` went: per benchmark family and class, and per phase.

The quick profile has a hard budget (10 minutes on a 2-core laptop), so every run prints what
each family cost, from asv's own bookkeeping: its results file records the duration of each
``setup_cache`` (where the suites train and compare), keyed ``<setup_cache bench_file:line>``;
the line is mapped back to the class that defines it.  The remainder of the asv phase is asv's
sampling of ``time_``/``peakmem_`` benchmarks and process start-up.  Phases outside asv (peak
probes, report, publish) are timed by the Makefile and passed in as ``--phase NAME=SECONDS``.

    python -m impls.benchtime --asv-results results/asv --machine M --commit SHA \
        --phase asv=412 --phase probes=20 --out results/plots/<commit>/bench_time.json
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

from .errors import ConfigError
from .files import write_text

BUDGET_SECONDS = 600
_KEY = re.compile(r"^<setup_cache (\w+):(\d+)>$")


def _class_at(source: Path, line: int) -> str | None:
    """The name of the top-level class of ``source`` whose body spans ``line``."""
    try:
        tree = ast.parse(source.read_text())
    except (OSError, SyntaxError):
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.lineno <= line <= (node.end_lineno or node.lineno):
            return node.name
    return None


def results_file(asv_results: Path, machine: str, commit: str) -> Path:
    folder = asv_results / machine
    found = sorted(folder.glob(f"{commit[:8]}-*.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ConfigError(f"no asv results for commit {commit[:8]} in {str(folder)!r}")
    return found[-1]


def breakdown(durations: dict[str, float], benchmarks_dir: Path) -> list[dict]:
    """One row per setup_cache: family (file), class, seconds — largest first."""
    rows = []
    for key, seconds in durations.items():
        m = _KEY.match(key)
        if not m:
            continue
        module, line = m[1], int(m[2])
        family = module.removeprefix("bench_")
        rows.append(dict(family=family, cls=_class_at(benchmarks_dir / f"{module}.py", line) or f"line {line}",
                         seconds=float(seconds)))
    return sorted(rows, key=lambda r: -r["seconds"])


def summarise(rows: list[dict], phases: dict[str, float]) -> dict:
    families: dict[str, float] = {}
    for row in rows:
        families[row["family"]] = families.get(row["family"], 0.0) + row["seconds"]
    total = sum(phases.values())
    in_setup = sum(families.values())
    if "asv" in phases:
        families["asv sampling of time_/peakmem_ and start-up"] = max(0.0, phases["asv"] - in_setup)
    return dict(total_seconds=total, budget_seconds=BUDGET_SECONDS, within_budget=total <= BUDGET_SECONDS,
                phases=phases, families=dict(sorted(families.items(), key=lambda kv: -kv[1])), setup_caches=rows)


def format_table(summary: dict) -> str:
    lines = [f"make bench time: {summary['total_seconds']:.0f} s of the {summary['budget_seconds']} s budget"
             + ("" if summary["within_budget"] else "  ** OVER BUDGET **")]
    lines += [f"  {name:<48} {seconds:7.1f} s" for name, seconds in summary["families"].items()]
    lines += [f"  phase {name:<42} {seconds:7.1f} s" for name, seconds in summary["phases"].items() if name != "asv"]
    lines.append("  per class: " + ", ".join(f"{r['family']}.{r['cls']} {r['seconds']:.0f}s"
                                             for r in summary["setup_caches"]))
    return "\n".join(lines)


def _phase(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --phase {text!r}; expected NAME=SECONDS") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m impls.benchtime", description=__doc__.split("\n\n")[0])
    p.add_argument("--asv-results", default="results/asv")
    p.add_argument("--machine", required=True)
    p.add_argument("--commit", required=True)
    p.add_argument("--benchmarks", default="benchmarks")
    p.add_argument("--phase", type=_phase, action="append", default=[], help="NAME=SECONDS, in order")
    p.add_argument("--out", help="also write the breakdown as JSON")
    args = p.parse_args(argv)
    try:
        data = json.loads(results_file(Path(args.asv_results), args.machine, args.commit).read_text())
    except ConfigError as e:
        print(f"benchtime: error: {e}", file=sys.stderr)
        return 2
    summary = summarise(breakdown(data.get("durations", {}), Path(args.benchmarks)), dict(args.phase))
    print(format_table(summary))
    if args.out:
        write_text(args.out, json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
