"""Reporting: turn etbench run records into a summary table and seaborn plots.

Every training run writes one JSON *run record* (schema 1).  ``make bench`` ends with::

    python -m impls.report RESULTS_DIR_OR_FILES... -o OUT_DIR

which writes into ``OUT_DIR``

* ``summary.csv`` / ``summary.md``: one row per run (throughput, MFU/HFU, memory, final loss);
* ``loss_vs_flops.png``: validation loss against cumulative FLOPs, one panel per dataset;
* ``throughput_memory.png``: tokens/s and the exact memory breakdown of every run;
* ``technique_comparison.png``/``.csv``: each run normalised to its family's baseline;
* ``interleaved-<family>.png``/``.csv``: interleaved comparisons (records of kind
  ``"interleaved"``): speed-up vs the baseline with its 95% interval, and memory ratios;
* data-parallel and sharded training (runs whose record has a ``model_states`` block, and
  ``etbench comm`` records of kind ``"comm"``): ``data_parallel_model_states.png``/``.csv``
  (per-rank model states vs world size, the ZeRO formula drawn over the measured points),
  ``data_parallel_scaling.png`` (tokens/s per rank vs 1 rank), ``data_parallel_comm.png``
  (communication bytes measured vs formula), ``comm_busbw.png`` (bus bandwidth vs message
  size) and ``data_parallel_memory.csv`` (GPT-2 1.5B / Llama-7B model states per technique and
  N_d, a section of ``summary.md``);
* at scale (:mod:`.atscale`, the cached artefacts of ``results/atscale/`` beside the runs folder:
  ``etbench dryrun-sweep`` and ``etbench plan-calibrate``): ``atscale_sweep.csv`` and
  ``atscale_memory.png`` (per-rank bytes and traffic of the big models by layout, against their
  formulas), ``atscale_calibration.csv``/``.png`` (the planner's step time against measured).

Every record is validated up front by one check (:func:`validate_record`, through :func:`load_all`,
for the report, ``--compare`` and the site alike): a file that is no usable record (not JSON,
truncated, no ``recipe``...) is skipped with a warning naming it and why.  Records whose
consistency check failed (e.g. MFU above 100%), and runs that diverged (a ``status`` other than
``ok``: ``diverged at step N``), are refused: listed in ``summary.md`` with the reason, never
plotted as results (a folder of refused records only gets a summary listing them).  Outputs are
written into a staging folder and moved into ``OUT_DIR`` together once all are written
(:func:`staged_outputs`): a report that fails leaves no partial files.  Free text (labels,
folder names) is escaped in every markdown table (:func:`markdown_text`).  ``python -m impls.report --compare RUNS_A RUNS_B
-o OUT_DIR`` compares two runs directories (two commits or two machines): per record, s/step of A
and B, the ratio B/A with a bootstrap interval, and whether the interval excludes 1.  Both sides
are validated as the report's paths are; a side that holds no valid record is bad input (exit 2),
and a broken file on one side is listed as refused, not as a run "only in" the other.

Runs share an axes only when their dataset *hashes* agree: losses measured on different token
streams are not comparable, even when the dataset names match.  All figures are drawn on the Agg
canvas directly, so importing this module never changes the pyplot backend of the caller.

The package, bottom layer first: :mod:`.records` (the record schema: validation, kinds, loading and
routing, the run and curve frames), :mod:`.tables` and :mod:`.figures` (markdown/HTML tables and the
Agg figures every section uses), :mod:`.staging` (all outputs or none), :mod:`.interleaved` and
:mod:`.runs` (the generic per-family section), one module per family section
(:mod:`.data_parallel`, :mod:`.model_parallel`, :mod:`.compression`, :mod:`.tokens`) and the
at-scale artefacts' (:mod:`.atscale`: the cached dry-run sweep and planner calibration), each a
:class:`.section.Section` registered in :data:`.section.SECTIONS`, :mod:`.compare` (two runs
directories) and :mod:`.findings`.  This module writes the report from the registered sections
and keeps every name of the former ``impls/report.py`` importable as ``impls.report.<name>``.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError, WriteError
from ..files import atomic_path, check_writable_dir, clean_stale_in, exclusive, write_text  # noqa: F401
from . import atscale, compression, model_parallel, tokens  # noqa: F401  (impls.report.<section> stay attributes)
from .compare import (  # noqa: F401
    COMPARE_METHOD, COMPARE_MIN_SAMPLES, COMPARE_RESAMPLES, bootstrap_ratio, compare_html, compare_markdown,
    compare_table, load_compare_side, ratio_agreement, ratio_agreement_markdown, verdict_counts, write_compare)
from .data_parallel import (  # noqa: F401
    DATA_PARALLEL_FILES, DP_COMPONENTS, MEMORY_TABLE_MODELS, MEMORY_TABLE_N_DS, SCALING_NOTE, comm_bandwidth_frame,
    comm_volume_table, data_parallel_frame, data_parallel_markdown, data_parallel_memory_table,
    interleaved_parallel_runs, model_states_lines, plot_bus_bandwidth, plot_comm_volume, plot_model_states,
    plot_scaling_efficiency, scaling_efficiency, write_data_parallel)
from .figures import DPI, new_figure, save_figure  # noqa: F401
from .interleaved import (  # noqa: F401
    interleaved_markdown, interleaved_name, interleaved_table, overhead_markdown, plot_interleaved)
from .records import (  # noqa: F401
    COMM_KIND, HASH_PREFIX, INTERLEAVED_KIND, MEMORY_COMPONENTS, MIB, OVERHEAD_KIND, SCHEMA_VERSION, BadInputError,
    DivergedRecordError, InconsistentRecordError, Loaded, NoRecordsError, RecordError, RecordWarning, curve_frame,
    load_all, load_records, read_record, record_consistency_errors, records_frame, validate_comm,
    validate_interleaved, validate_overhead, validate_record)
from .runs import (  # noqa: F401
    comparison_key, describe_device, peak_log_markdown, plot_loss_vs_flops, plot_technique_comparison,
    plot_throughput_memory, refused_markdown, summary_table, technique_comparison)
from .section import SECTIONS, Section  # noqa: F401
from .staging import STAGING_PREFIX, StagedOutputs, staged_outputs  # noqa: F401
from .tables import (  # noqa: F401
    SORTABLE_JS, TABLE_CSS, format_value, html_table, markdown_safe, markdown_table, markdown_text, median_ci)
from .values import nested_block  # noqa: F401


def write_report(paths: Sequence[Path], out_dir: Path) -> list[Path]:
    """Load the records under ``paths`` and write the summary and plots into ``out_dir``.

    Training runs give the summary table and, per family, loss-vs-FLOPs, throughput/memory and
    (where a family has a baseline) the technique comparison; interleaved-comparison records give
    ``interleaved-<family>.png``/``.csv`` and a section of ``summary.md``; refused records are
    listed in ``summary.md`` with the reason (a folder of refused records only gets a summary
    listing them); data-parallel records and comm records give the files of
    :func:`write_data_parallel` and their section of ``summary.md``.

    Every record is read and validated first (:func:`load_all`: files that are no valid record
    are skipped with a warning); then every output is written into a staging folder and moved into
    ``out_dir`` only when all are written (:func:`staged_outputs`), so a failure leaves no partial
    report.  Returns the written paths; raises :class:`NoRecordsError` when no record (valid or
    refused) is found.
    """
    paths = [Path(p) for p in paths]
    loaded = load_all(paths)
    for entry in loaded.refused:
        warnings.warn(f"not plotted: {entry['source']}: " + "; ".join(entry["reasons"]), RecordWarning,
                      stacklevel=2)
    if not loaded.holds_records():
        looked = ", ".join(str(p) for p in paths) or "(no paths given)"
        raise NoRecordsError(f"no valid run records found in {looked} "
                             "(searched recursively for *.json)")
    out_dir = Path(out_dir)
    with staged_outputs(out_dir) as stage:
        stage.add(*_write_report_files(loaded, stage.folder, out_dir))
    return stage.written


def _write_report_files(loaded: Loaded, out_dir: Path, peak_dir: Path) -> list[Path]:
    """:func:`write_report`'s files, written into ``out_dir`` (its staging folder): each section's
    (:data:`impls.report.section.SECTIONS`, in order), then ``summary.md``, the sections' markdown
    followed by the peak FLOP/s log that ``make bench`` leaves in ``peak_dir``, the real output
    folder."""
    written, markdown = [], ""
    for section in SECTIONS:
        frame = section.frame(loaded)
        markdown += section.markdown(frame, loaded)
        written += section.figures(frame, loaded, out_dir)
    return [*written, write_text(out_dir / "summary.md", markdown + peak_log_markdown(peak_dir))]


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Show a warning as one plain line on stderr; the source line is noise on a CLI."""
    print(f"warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m impls.report RESULTS_DIR_OR_FILES... -o OUT_DIR`` or
    ``python -m impls.report --compare RUNS_A RUNS_B -o OUT_DIR``; returns the exit code
    (2: no records, or a bad argument such as an output folder that cannot be written, named in one
    line before any work; 1: a write that failed, named in one line)."""
    parser = argparse.ArgumentParser(
        prog="python -m impls.report",
        description="Summarise etbench run records as a table (CSV, markdown) and PNG plots, or "
                    "compare two runs directories (two commits or two machines).")
    parser.add_argument("paths", nargs="*", type=Path, metavar="RESULTS_DIR_OR_FILE",
                        help="run record files, or directories searched recursively for *.json")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("RUNS_A", "RUNS_B"),
                        help="write compare.{csv,md,html}: per record, s/step of B vs A with the ratio "
                             "B/A and its bootstrap 95%% interval")
    parser.add_argument("-o", "--out", type=Path, required=True, metavar="OUT_DIR",
                        help="directory the report is written to (created if missing)")
    args = parser.parse_args(argv)

    with warnings.catch_warnings():
        warnings.simplefilter("always", RecordWarning)
        warnings.showwarning = _print_warning
        try:
            try:
                check_writable_dir(args.out)
            except ConfigError as exc:
                raise BadInputError(str(exc)) from None
            if args.compare:
                if args.paths:
                    raise BadInputError(f"--compare takes no other paths (got {str(args.paths[0])!r})")
            else:
                if not args.paths:
                    raise BadInputError("no RESULTS_DIR_OR_FILE given (or use --compare RUNS_A RUNS_B)")
                missing = [p for p in args.paths if not p.exists()]
                if missing:
                    raise BadInputError(f"RESULTS_DIR_OR_FILE {str(missing[0])!r} does not exist")
            with exclusive(args.out):  # two reports into one folder would interleave their files
                clean_stale_in(args.out)
                written = write_compare(*args.compare, args.out) if args.compare else write_report(args.paths, args.out)
        except (BadInputError, ConfigError) as exc:  # ConfigError: another command holds the output folder
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except NoRecordsError as exc:  # nothing to report is bad input too: the paths hold no records
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except WriteError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    for path in written:
        print(path)
    return 0

