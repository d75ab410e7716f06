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
  N_d, a section of ``summary.md``).

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
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..errors import ConfigError, WriteError
from ..files import atomic_path, check_writable_dir, clean_stale_in, exclusive, write_text
from ..provenance import SCHEMA_VERSION  # the one definition, shared with the writers

MIB = 1 << 20
DPI = 120
#: Characters of the dataset hash shown next to its name; enough to tell datasets apart.
HASH_PREFIX = 12

#: Byte counts of the exact memory breakdown (flattened record fields), in stacking order.
MEMORY_COMPONENTS = {
    "memory.params_bytes": "params",
    "memory.grads_bytes": "grads",
    "memory.optimizer_bytes": "optimizer state",
    "memory.activations_bytes": "activations",
}

# Record fields used as numbers.  A record holding anything else there is rejected when it is
# read, instead of failing halfway through a plot.
_NUMERIC_FIELDS = (
    "params", "world_size", "tokens_per_second", "seconds_per_step", "mfu", "hfu",
    "peak_flops.value", "final_val_loss", "dataset.entropy_floor", "memory.peak_bytes",
    *MEMORY_COMPONENTS,
)
# Text fields the table reads; like the numeric ones they may be absent from a record.
_TEXT_FIELDS = ("recipe.model", "device.type", "device.name", "peak_flops.source",
                "memory.peak_kind")
_POINT_NUMERIC_FIELDS = ("step", "flops", "tokens", "train_loss", "val_loss")
# Run columns repeated on every row of the curve frame.
_CURVE_RUN_COLUMNS = ("run", "label", "dataset_key", "dataset.name", "dataset.hash",
                      "dataset.entropy_floor", "world_size")

# Display format of each numeric column of the markdown summary; the CSV keeps full precision.
_MARKDOWN_FORMATS = {
    "params": "{:,.0f}",
    "world_size": "{:.0f}",
    "tokens/s": "{:,.0f}",
    "s/step": "{:.4g}",
    "MFU": "{:.2%}",
    "HFU": "{:.2%}",
    "peak FLOP/s": "{:.3g}",
    **{f"{name} MiB": "{:,.2f}" for name in MEMORY_COMPONENTS.values()},
    "peak MiB": "{:,.1f}",
    "final val loss": "{:.4f}",
    "entropy floor": "{:.4f}",
}


class RecordError(ValueError):
    """A JSON document that is not a valid run record."""


class RecordWarning(UserWarning):
    """A file was skipped because it is not a valid run record."""


class NoRecordsError(RuntimeError):
    """No valid run record was found, so there is nothing to report."""


class InconsistentRecordError(RecordError):
    """A well-formed record whose consistency check failed (e.g. MFU above 100%): the report
    refuses to plot it and shows it as refused, with ``reasons``."""

    def __init__(self, reasons: Sequence[str]):
        self.reasons = [str(r) for r in reasons]
        super().__init__("inconsistent record, not plotted: " + "; ".join(self.reasons))


class DivergedRecordError(InconsistentRecordError):
    """The record of a run that did not finish as a result (``status`` is not ``ok``, e.g.
    ``diverged at step 7``): shown as refused, with its status, never plotted."""


class BadInputError(ValueError):
    """A command-line value that cannot be used (reported as one line, exit status 2)."""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def _lookup(record: dict, dotted: str):
    """The value at ``"a.b"`` in a nested record, or None where any level is missing."""
    value = record
    for key in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _is_number(value) -> bool:
    # bool is an int subclass, but ``true`` is never a valid count or rate.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_record(record) -> None:
    """Raise :class:`RecordError` unless ``record`` is a schema-1 run record this module can use.

    Only what the report reads is checked: a label, a recipe (an object with a ``model`` name and a
    ``techniques`` list), a dataset name and hash, a curve whose points have numeric ``step`` and
    ``flops``, numbers (or null) wherever numbers are expected and text (or null) where text is.
    Every reader of run records (the report, ``--compare``, the site) goes through
    :func:`load_all`, hence through this one check, before anything is written.
    """
    if not isinstance(record, dict):
        raise RecordError("top level is not a JSON object")
    if record.get("schema") != SCHEMA_VERSION:
        raise RecordError(f"schema is {record.get('schema')!r}, expected {SCHEMA_VERSION}")
    if not isinstance(record.get("recipe"), dict):
        raise RecordError(f"'recipe' is {record.get('recipe')!r}, expected an object (the run's recipe)")
    for key in ("label", "dataset.name", "dataset.hash", "recipe.model"):
        value = _lookup(record, key)
        if not isinstance(value, str) or not value:
            raise RecordError(f"{key!r} is missing or not a non-empty string")
    techniques = record["recipe"].get("techniques")
    if not isinstance(techniques, list) or not all(isinstance(t, str) for t in techniques):
        raise RecordError(f"'recipe.techniques' is {techniques!r}, expected a list of technique names")
    for key in _TEXT_FIELDS:
        value = _lookup(record, key)
        if value is not None and not isinstance(value, str):
            raise RecordError(f"{key!r} is {value!r}, expected a string or null")
    for key in _NUMERIC_FIELDS:
        value = _lookup(record, key)
        if value is not None and not _is_number(value):
            raise RecordError(f"{key!r} is {value!r}, expected a number or null")
    status = record.get("status", "ok")  # records written before the status existed finished
    if status != "ok":
        raise DivergedRecordError([f"run {status}: not a result"])
    errors = record_consistency_errors(record)
    if errors:
        raise InconsistentRecordError(errors)
    curve = record.get("curve")
    if not isinstance(curve, list):
        raise RecordError("'curve' is missing or not a list")
    for i, point in enumerate(curve):
        if not isinstance(point, dict):
            raise RecordError(f"curve[{i}] is not an object")
        for key in _POINT_NUMERIC_FIELDS:
            value = point.get(key)
            required = key in ("step", "flops")
            if (value is None and required) or (value is not None and not _is_number(value)):
                raise RecordError(f"curve[{i}].{key} is {value!r}, expected a number")


def record_consistency_errors(record: dict) -> list[str]:
    """The record's own ``consistency_errors``, or for records written before the check existed,
    the check run here."""
    errors = record.get("consistency_errors")
    if errors is None:
        from ..measure.timing import consistency_errors

        errors = consistency_errors(record)
    return [str(e) for e in errors or []]


def read_record(path: Path) -> dict:
    """Parse and validate one run record file; raise :class:`RecordError` if it is not one."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"cannot read JSON: {exc}") from exc
    validate_record(record)
    return record


def _find_json_files(paths: Iterable[Path]) -> list[Path]:
    """Files named directly plus every ``*.json`` under the directories, each file once."""
    found: dict[Path, Path] = {}
    for path in map(Path, paths):
        if path.is_dir():
            candidates = sorted(p for p in path.rglob("*.json") if p.is_file())
        elif path.is_file():
            candidates = [path]
        else:
            warnings.warn(f"skipping {path}: no such file or directory", RecordWarning,
                          stacklevel=3)
            continue
        for candidate in candidates:
            # A file reached through two arguments must not count as two runs.
            found.setdefault(candidate.resolve(), candidate)
    return list(found.values())


#: ``kind`` of the interleaved-comparison records (``<runs>/<family>/compare-<family>.json``);
#: training-run records have no ``kind``.
INTERLEAVED_KIND = "interleaved"
#: ``kind`` of the harness-overhead records (the training loop vs a bare loop, timed interleaved).
OVERHEAD_KIND = "harness_overhead"
_INTERLEAVED_STATS = ("seconds_per_step", "tokens_per_second", "speedup")


class Loaded(NamedTuple):
    """Everything found under a set of paths, routed by kind.

    ``runs``: the run frame of valid training-run records (:func:`records_frame`); ``refused``:
    well-formed records whose consistency check failed, as dicts with ``family``, ``label``,
    ``source``, ``reasons`` and the ``record``; ``interleaved``: valid interleaved-comparison
    records, each with ``source`` and ``family`` added (the record's own family, else its folder);
    ``comm``: ``etbench comm`` bandwidth records (kind ``comm``, :func:`validate_comm`).
    """

    runs: pd.DataFrame
    refused: list[dict]
    interleaved: list[dict]
    #: Records of other kinds the report knows (``harness_overhead``), with ``source``/``family``.
    extra: list[dict] = []
    #: ``etbench comm`` bandwidth records (kind ``comm``), with ``source``/``family``.
    comm: list[dict] = []
    #: Storage-format measurements: kind ``sparse_storage`` (bytes per sparse format and
    #: sparse×dense matmul time across densities) and kind ``data_compression`` (token storage
    #: formats, loader throughput vs the step's need), with ``source``/``family``.
    storage: list[dict] = []
    #: Files that are no record the report can use, each ``{"source", "reason"}`` (each also warned
    #: about with a :class:`RecordWarning`): ``--compare`` lists them instead of calling the run
    #: "only in" the other side.
    skipped: list[dict] = []

    def holds_records(self) -> bool:
        """Whether anything usable (or refused) was found: a side of ``--compare`` or the paths of a
        report that hold none of these are bad input."""
        return not self.runs.empty or any((self.refused, self.interleaved, self.extra, self.comm, self.storage))


def _estimate(stat: dict):
    """The point estimate an interval belongs to: ``impls.compare`` gives ``value`` (the median over
    rounds) with ``ci95`` (order statistics); older records only a ``geomean`` or ``median``."""
    for key in ("value", "geomean", "median"):
        if isinstance(stat, dict) and _is_number(stat.get(key)):
            return stat[key]
    return None


def validate_overhead(record) -> None:
    """Raise :class:`RecordError` unless ``record`` is a usable harness-overhead record."""
    overhead = record.get("overhead") if isinstance(record, dict) else None
    if not isinstance(overhead, dict) or not _is_number(overhead.get("value")):
        raise RecordError("'overhead.value' is missing or not a number")
    ci = overhead.get("ci95")
    if ci is not None and not (isinstance(ci, list) and len(ci) == 2 and all(map(_is_number, ci))):
        raise RecordError(f"'overhead.ci95' is {ci!r}, expected [low, high]")


def overhead_markdown(records: Sequence[dict]) -> str:
    """The harness-overhead measurements (loop vs bare loop), one line each; empty if none."""
    if not records:
        return ""
    lines = ["", "### Harness overhead (training loop vs a bare loop, interleaved)", ""]
    for r in records:
        o = r["overhead"]
        ci = o.get("ci95") or [math.nan, math.nan]
        lines.append(f"- {markdown_text(r.get('label', '?'))}: {o['value']:+.2%} [{ci[0]:+.2%}, {ci[1]:+.2%}] over "
                     f"{r.get('rounds', '?')} rounds; {r.get('ci_method', '')}")
        mfu = r.get("mfu")
        if isinstance(mfu, dict) and _is_number(mfu.get("value")):
            lo, hi = mfu.get("ci95") or [math.nan, math.nan]
            if mfu["value"] > 1:
                lines.append(f"  - MFU {mfu['value']:.1%} exceeds 100%: the peak it was divided by is wrong; not a result")
            else:
                lines.append(f"  - the loop's MFU: {mfu['value']:.1%} [{lo:.1%}, {hi:.1%}] (model FLOPs ÷ median "
                             f"s/step ÷ peak {r['peak_flops']['value'] / 1e9:.1f} GFLOP/s, {r['peak_flops']['source']})")
    return "\n".join(lines) + "\n"


def validate_interleaved(record) -> None:
    """Raise :class:`RecordError` unless ``record`` is a usable interleaved-comparison record:
    a family, a baseline among its variants, and per variant a label and median/CI numbers."""
    if not isinstance(record, dict) or record.get("kind") != INTERLEAVED_KIND:
        raise RecordError("not an interleaved-comparison record")
    if record.get("schema") != SCHEMA_VERSION:
        raise RecordError(f"schema is {record.get('schema')!r}, expected {SCHEMA_VERSION}")
    variants = record.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise RecordError("'variants' is missing or empty")
    if record.get("baseline") not in variants:
        raise RecordError(f"baseline {record.get('baseline')!r} is not one of the variants")
    for name, variant in variants.items():
        if not isinstance(variant, dict) or not isinstance(variant.get("label"), str):
            raise RecordError(f"variants.{name}.label is missing or not a string")
        for stat in _INTERLEAVED_STATS:
            value = variant.get(stat)
            if _estimate(value) is None:
                raise RecordError(f"variants.{name}.{stat} has no number (value/geomean/median)")
            ci = value.get("ci95")
            if ci is not None and not (isinstance(ci, list) and len(ci) == 2 and all(map(_is_number, ci))):
                raise RecordError(f"variants.{name}.{stat}.ci95 is {ci!r}, expected [low, high]")
        for group in ("memory", "memory_ratio"):
            for key, value in (variant.get(group) or {}).items():
                if value is not None and not _is_number(value):
                    raise RecordError(f"variants.{name}.{group}.{key} is {value!r}, expected a number")


def load_all(paths: Sequence[Path]) -> Loaded:
    """Load every record under ``paths`` (files, or directories searched recursively for
    ``*.json``) and route it: training runs, refused (inconsistent) runs, interleaved comparisons.

    Files that are none of these are skipped with a :class:`RecordWarning` naming the file.
    """
    from .compression import STORAGE_KINDS

    records, sources, refused, interleaved, extra, comm, storage, skipped = [], [], [], [], [], [], [], []

    def skip(path, reason: str) -> None:
        skipped.append({"source": str(path), "reason": reason})
        warnings.warn(f"skipping {path}: {reason}", RecordWarning, stacklevel=3)

    for path in _find_json_files(paths):
        try:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            skip(path, f"cannot read JSON: {exc}")
            continue
        try:
            if isinstance(document, dict) and document.get("kind") == OVERHEAD_KIND:
                validate_overhead(document)
                extra.append({**document, "source": str(path), "family": Path(path).parent.name})
                continue
            if isinstance(document, dict) and document.get("kind") == COMM_KIND:
                validate_comm(document)
                comm.append({**document, "source": str(path), "family": Path(path).parent.name})
                continue
            if isinstance(document, dict) and document.get("kind") in STORAGE_KINDS:
                from .compression import validate_storage

                validate_storage(document)
                storage.append({**document, "source": str(path), "family": Path(path).parent.name})
                continue
            if isinstance(document, dict) and document.get("kind") is not None:
                validate_interleaved(document)
                interleaved.append({**document, "source": str(path),
                                    "family": document.get("family") or Path(path).parent.name})
                continue
            validate_record(document)
        except InconsistentRecordError as exc:
            refused.append({"family": Path(path).parent.name, "label": document["label"],
                            "source": str(path), "reasons": exc.reasons, "record": document})
            continue
        except RecordError as exc:
            skip(path, str(exc))
            continue
        records.append(document)
        sources.append(path)
    interleaved.sort(key=lambda r: (r["family"], r["source"]))
    refused.sort(key=lambda r: (r["family"], r["label"]))
    comm.sort(key=lambda r: r["source"])
    return Loaded(records_frame(records, sources), refused, interleaved, extra, comm, storage, skipped)


def load_records(paths: Sequence[Path]) -> pd.DataFrame:
    """Load run records from files and directories (searched recursively for ``*.json``).

    Files that are not valid run records are skipped with a :class:`RecordWarning` naming the
    file, refused (inconsistent) records too; interleaved-comparison records are not training runs
    and are left out silently (:func:`load_all` returns them).  Returns the run frame of
    :func:`records_frame` (empty if nothing valid was found).
    """
    loaded = load_all(paths)
    for entry in loaded.refused:
        warnings.warn(f"skipping {entry['source']}: inconsistent record, not plotted: "
                      + "; ".join(entry["reasons"]), RecordWarning, stacklevel=2)
    return loaded.runs


def _unique_run_names(labels: Sequence[str], sources: Sequence[Path | None]) -> list[str]:
    """Display names: the label, with the record's file stem appended when several runs share
    it, so no two runs merge into one line or bar; a counter settles any remaining tie."""
    counts = Counter(labels)
    names = [label if counts[label] == 1 or source is None else f"{label} ({Path(source).stem})"
             for label, source in zip(labels, sources)]
    counts, seen, unique = Counter(names), Counter(), []
    for name in names:
        if counts[name] > 1:
            seen[name] += 1
            name = f"{name} #{seen[name]}"
        unique.append(name)
    return unique


def records_frame(records: Iterable[dict],
                  sources: Iterable[Path | None] | None = None) -> pd.DataFrame:
    """One row per run, nested fields flattened to dotted columns (``"memory.params_bytes"``).

    Added columns: ``run`` (unique display name, see :func:`_unique_run_names`), ``dataset_key``
    (``"name [hash prefix]"``), ``source`` (the record's file, if known) and ``curve`` (the raw
    list of curve points).  Every field the report reads is present, NaN/None where a record
    lacks it.  Rows are sorted by dataset, then run, so runs to compare sit together.
    """
    records = list(records)
    for record in records:
        validate_record(record)
    sources = list(sources) if sources is not None else [None] * len(records)

    runs = pd.json_normalize([{k: v for k, v in r.items() if k != "curve"} for r in records])
    for column in _NUMERIC_FIELDS:
        runs[column] = pd.to_numeric(runs[column]) if column in runs else np.nan
    for column in ("label", "dataset.name", "dataset.hash", *_TEXT_FIELDS):
        if column not in runs:
            runs[column] = None

    runs["run"] = _unique_run_names(list(runs["label"]), sources)
    runs["dataset_key"] = [f"{name} [{digest[:HASH_PREFIX]}]"
                           for name, digest in zip(runs["dataset.name"], runs["dataset.hash"])]
    runs["source"] = [str(s) if s is not None else None for s in sources]
    # The benchmark family is the folder a record sits in (results/runs/<commit>/<family>/).
    runs["family"] = [Path(s).parent.name if s is not None else "runs" for s in sources]
    runs["curve"] = pd.Series([r["curve"] for r in records], index=runs.index, dtype=object)
    return runs.sort_values(["family", "dataset_key", "run"], kind="stable").reset_index(drop=True)


def curve_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """Tidy long-form curves: one row per curve point of every run in ``runs``.

    Columns: the run's ``run``, ``label``, ``dataset_key``, ``dataset.name``, ``dataset.hash``,
    ``dataset.entropy_floor`` and ``world_size``, then the point fields ``step``, ``flops``,
    ``tokens``, ``train_loss``, ``val_loss`` (NaN where null) and any extra point fields.
    """
    pieces = []
    for _, run in runs.iterrows():
        points = pd.DataFrame(run["curve"])
        extra = [c for c in points.columns if c not in _POINT_NUMERIC_FIELDS]
        points = points.reindex(columns=[*_POINT_NUMERIC_FIELDS, *extra])
        for column in reversed(_CURVE_RUN_COLUMNS):
            points.insert(0, column, run[column])
        pieces.append(points)
    if not pieces:
        return pd.DataFrame(columns=[*_CURVE_RUN_COLUMNS, *_POINT_NUMERIC_FIELDS])
    curves = pd.concat(pieces, ignore_index=True)
    for column in _POINT_NUMERIC_FIELDS:
        # null losses arrive as None in object columns; NaN keeps them plottable and droppable.
        curves[column] = pd.to_numeric(curves[column])
    return curves


# --------------------------------------------------------------------------------------------
# Summary table
# --------------------------------------------------------------------------------------------

def describe_device(kind, name) -> str | None:
    """``"cpu: AMD EPYC ..."`` from the record's device type and name, either of which may lack."""
    parts = [str(p) for p in (kind, name) if p is not None and not pd.isna(p)]
    return ": ".join(parts) or None


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run with the headline numbers, in the run frame's order.

    Numbers are kept at full precision (memory converted to MiB, MFU/HFU as fractions); the
    markdown rendering rounds them for reading.
    """
    table = pd.DataFrame({
        "family": runs["family"],
        "label": runs["run"],
        "model": runs["recipe.model"],
        "params": runs["params"],
        "dataset": runs["dataset_key"],
        "world_size": runs["world_size"],
        "device": [describe_device(k, n) for k, n in zip(runs["device.type"], runs["device.name"])],
        "tokens/s": runs["tokens_per_second"],
        "s/step": runs["seconds_per_step"],
        "s/step median [95% CI]": [median_ci(m, ci) for m, ci in zip(_column(runs, "step_time.median"),
                                                                        _column(runs, "step_time.ci95"))],
        "noisy": [None if v is None or v != v else bool(v) for v in _column(runs, "load.noisy")],
        "MFU": runs["mfu"],
        "HFU": runs["hfu"],
        "peak FLOP/s": runs["peak_flops.value"],
        "peak FLOP/s source": runs["peak_flops.source"],
        **{f"{name} MiB": runs[column] / MIB for column, name in MEMORY_COMPONENTS.items()},
        "peak MiB": runs["memory.peak_bytes"] / MIB,
        "peak kind": runs["memory.peak_kind"],
        "final val loss": runs["final_val_loss"],
        "entropy floor": runs["dataset.entropy_floor"],
    })
    return table.reset_index(drop=True)


def _column(runs: pd.DataFrame, name: str) -> list:
    """A column of the run frame, or Nones for records written before it existed."""
    return list(runs[name]) if name in runs else [None] * len(runs)


def median_ci(median, ci) -> str | None:
    if median is None or median != median or not isinstance(ci, (list, tuple)):
        return None
    return f"{median:.4g} [{ci[0]:.4g}, {ci[1]:.4g}]"


def markdown_text(value) -> str:
    """``value`` as text that stays inside one markdown table cell or list item: labels, device
    names, family folders and data specs are free text, so a ``|`` (which would split the cell) is
    escaped and a line break (which would end the table) is shown as ``\\n``."""
    text = str(value)
    return (text.replace("\\", "\\\\").replace("|", r"\|").replace("\r\n", r"\n").replace("\n", r"\n")
            .replace("\r", r"\r"))


def markdown_safe(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with every text cell and column name passed through :func:`markdown_text`, for
    tables rendered by another writer (``DataFrame.to_markdown``)."""
    def cell(value):
        return markdown_text(value) if isinstance(value, str) else value

    return table.rename(columns=lambda c: markdown_text(c) if isinstance(c, str) else c).map(cell)


def _markdown_cell(value, fmt: str | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return markdown_text(fmt.format(value) if fmt else value)


def markdown_table(table: pd.DataFrame, formats: dict | None = None) -> str:
    """GitHub-flavoured markdown for :func:`summary_table`, numeric columns right-aligned;
    ``formats`` adds display formats for other tables' columns.  Every cell and header goes
    through :func:`markdown_text`, so free text never breaks the table."""
    formats = {**_MARKDOWN_FORMATS, **(formats or {})}
    header = "| " + " | ".join(map(markdown_text, table.columns)) + " |"
    rule = "|" + "|".join("---:" if c in formats else "---" for c in table.columns) + "|"
    rows = ["| " + " | ".join(_markdown_cell(v, formats.get(c))
                              for c, v in zip(table.columns, row)) + " |"
            for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------

def new_figure(width: float, height: float) -> Figure:
    """A figure on the non-interactive Agg canvas, independent of pyplot's global state."""
    figure = Figure(figsize=(width, height), dpi=DPI, layout="tight")
    FigureCanvasAgg(figure)
    return figure


def _run_palette(runs: pd.DataFrame) -> dict[str, tuple]:
    """One colour per run, shared by all figures so a run looks the same everywhere."""
    names = list(runs["run"])
    return dict(zip(names, sns.color_palette("tab10" if len(names) <= 10 else "husl",
                                             len(names))))


def plot_loss_vs_flops(runs: pd.DataFrame) -> Figure:
    """Validation loss against cumulative FLOPs (log x), one panel per dataset hash.

    Each panel has one line per run and, when the records give one, a dashed line at the
    dataset's entropy floor.  Points without a validation loss are dropped, as is the 0-FLOP
    start point, which a log axis cannot show.
    """
    curves = curve_frame(runs)
    curves = curves[curves["val_loss"].notna() & (curves["flops"] > 0)]
    palette = _run_palette(runs)
    hashes = list(dict.fromkeys(runs["dataset.hash"]))

    ncols = max(1, min(len(hashes), 3))
    nrows = max(1, math.ceil(len(hashes) / ncols))
    figure = new_figure(6.0 * ncols, 4.5 * nrows)
    with sns.axes_style("whitegrid"):
        axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(hashes):]:
        ax.remove()

    for ax, digest in zip(axes, hashes):
        dataset_runs = runs[runs["dataset.hash"] == digest]
        points = curves[curves["dataset.hash"] == digest]
        if points.empty:
            ax.text(0.5, 0.5, "no validation points", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set(xticks=[], yticks=[])  # unit ticks on an empty panel would look like data
        else:
            order = [r for r in dataset_runs["run"] if r in set(points["run"])]
            sns.lineplot(data=points, x="flops", y="val_loss", hue="run", hue_order=order,
                         palette={r: palette[r] for r in order}, estimator=None, sort=True,
                         marker="o", markersize=4, ax=ax)
            ax.set_xscale("log")
        floors = dataset_runs["dataset.entropy_floor"].dropna()
        if not floors.empty:
            floor = floors.iloc[0]
            ax.axhline(floor, color="0.25", linestyle="--", linewidth=1.2,
                       label=f"entropy floor (H = {floor:.3f} nats)")
        if ax.get_legend_handles_labels()[0]:
            # Rebuilt after axhline so the floor joins seaborn's run entries.
            ax.legend(title="run", loc="best", fontsize="small", title_fontsize="small")
        # Full specs (every option spelled out) overflow a panel: wrap them; the hash still tells
        # corpora apart.
        ax.set_title("dataset " + textwrap.fill(dataset_runs["dataset_key"].iloc[0], 70), fontsize="small")
        ax.set_xlabel("cumulative training FLOPs (log scale)")
        ax.set_ylabel("validation loss (nats/token)")
    figure.suptitle("Validation loss vs compute")
    return figure


def plot_throughput_memory(runs: pd.DataFrame) -> Figure:
    """Two panels sharing the run axis: tokens/s per run, and the exact memory breakdown
    (params, grads, optimizer state, activations) as stacked bars in MiB with the total."""
    figure = new_figure(14.0, 1.6 + 0.45 * max(len(runs), 1))
    with sns.axes_style("whitegrid"):
        ax_speed, ax_memory = figure.subplots(1, 2, sharey=True)
    order = list(runs["run"])

    sns.barplot(data=runs, y="run", x="tokens_per_second", hue="run", order=order,
                hue_order=order, palette=_run_palette(runs), legend=False, ax=ax_speed)
    for bars in ax_speed.containers:
        ax_speed.bar_label(bars, fmt="{:,.0f}", padding=3, fontsize="small")
    ax_speed.margins(x=0.15)
    ax_speed.set_title("Throughput")
    ax_speed.set_xlabel("tokens / second")
    ax_speed.set_ylabel("run")

    # seaborn placed run i at y = i (first run on top); stack the memory bars on the same rows.
    mib = runs[list(MEMORY_COMPONENTS)].reset_index(drop=True) / MIB
    left = np.zeros(len(runs))
    colours = sns.color_palette("Set2", len(MEMORY_COMPONENTS))
    for (column, name), colour in zip(MEMORY_COMPONENTS.items(), colours):
        widths = mib[column].fillna(0.0).to_numpy()
        bars = ax_memory.barh(np.arange(len(runs)), widths, left=left, height=0.8,
                              color=colour, label=name)
        left += widths
    # A total over a missing component would understate memory, so it reads "n/a" instead.
    totals = mib.sum(axis=1, min_count=len(MEMORY_COMPONENTS))
    ax_memory.bar_label(bars, labels=[f"{t:,.2f} MiB" if pd.notna(t) else "n/a" for t in totals],
                        padding=3, fontsize="small")
    ax_memory.margins(x=0.2)
    ax_memory.yaxis.grid(False)  # whitegrid's row lines would run through the stacked bars
    ax_memory.set_title("Exact memory breakdown")
    ax_memory.set_xlabel("MiB")
    ax_memory.legend(title="component", fontsize="small", title_fontsize="small",
                     loc="center left", bbox_to_anchor=(1.01, 0.5))
    return figure


def comparison_key(runs: pd.DataFrame) -> pd.Series:
    """Runs comparable with one another: same model and model_args, data, sequence length, FLOP
    budget, world size, starting weights and masked-LM task (rate and corruption: a masked-LM loss
    at another rate is another task) (batch may differ: accumulation keeps the effective batch with
    smaller ones).  A run started ``--init-from`` trained weights (LoRA) is compared with full
    fine-tuning from the same weights, not with training from scratch."""
    columns = ["recipe.model", "dataset.hash", "recipe.seq_len", "recipe.flops_budget", "world_size",
               "recipe.init_from", "recipe.mlm_rate", "recipe.mlm_corrupt"]
    keys = runs.reindex(columns=columns)
    # model_args change the architecture (an untied embedding is another model): flattened to
    # recipe.model_args.<k> columns, so every such column is part of the key
    args = runs[sorted(c for c in runs.columns if isinstance(c, str) and c.startswith("recipe.model_args"))]
    keys = pd.concat([keys, args], axis=1)
    return pd.Series(["|".join(map(str, row)) for row in keys.itertuples(index=False)], index=runs.index)


def _timing_key(label, mlm_rate, mlm_corrupt) -> tuple:
    """What an interleaved timing of a variant is matched on: its label (model, optimizer,
    techniques) and its masked-LM task -- the same encoder technique is timed once per mask rate,
    and a causal model's defaults (rate 0.15, ``bert``) match records that predate the fields."""
    rate = 0.15 if mlm_rate is None or (isinstance(mlm_rate, float) and math.isnan(mlm_rate)) else float(mlm_rate)
    corrupt = mlm_corrupt if isinstance(mlm_corrupt, str) else "bert"
    return label, round(rate, 6), corrupt


def technique_comparison(runs: pd.DataFrame, interleaved: Sequence[dict] = ()) -> pd.DataFrame:
    """Each technique run relative to the baseline of its comparison group (the run without
    techniques, optimizer AdamW): memory components as fractions of the baseline's total exact
    memory, the loss difference at the same FLOP budget, and the speed ratio -- taken only from
    an interleaved comparison (``interleaved`` records, matched by label and masked-LM task:
    rounds A B A B ..., with its 95% interval), never from two separately timed runs; NaN where no
    such timing exists."""
    timed = {}
    for record in interleaved:
        for variant in record.get("variants", {}).values():
            speedup = variant.get("speedup") or {}
            if _is_number(_estimate(speedup)):
                ci = speedup.get("ci95") or [math.nan, math.nan]
                recipe = variant.get("recipe") or {}
                key = _timing_key(variant.get("label"), recipe.get("mlm_rate"), recipe.get("mlm_corrupt"))
                timed.setdefault(key, (_estimate(speedup), ci[0], ci[1]))
    runs = runs.assign(_key=comparison_key(runs))
    is_baseline = runs["recipe.techniques"].map(lambda t: isinstance(t, list) and not t) & (
        runs.get("recipe.optimizer", pd.Series("adamw", index=runs.index)) == "adamw")
    rows = []
    for _, group in runs.groupby("_key", sort=False):
        baselines = group[is_baseline.loc[group.index]]
        if baselines.empty or len(group) < 2:
            continue
        base = baselines.iloc[0]
        base_total = sum(base[c] for c in MEMORY_COMPONENTS)
        for index, run in group.iterrows():
            speed, low, high = timed.get(_timing_key(run.get("label"), run.get("recipe.mlm_rate"),
                                                     run.get("recipe.mlm_corrupt")), (math.nan, math.nan, math.nan))
            if index == base.name and timed:  # the reference itself: 1 by definition
                speed, low, high = 1.0, 1.0, 1.0
            row = {"run": run["run"], "speed ratio": speed, "speed ratio lo": low, "speed ratio hi": high,
                   "loss delta": run["final_val_loss"] - base["final_val_loss"]}
            for column, name in MEMORY_COMPONENTS.items():
                row[f"{name} / baseline memory"] = run[column] / base_total
            rows.append(row)
    return pd.DataFrame(rows)


def plot_technique_comparison(comparison: pd.DataFrame) -> Figure:
    """Three panels per technique, normalised to the baseline: speed ratio, the exact memory
    breakdown as stacked fractions of the baseline's total, and the loss delta at equal FLOPs."""
    figure = new_figure(16.0, 1.6 + 0.42 * max(len(comparison), 1))
    with sns.axes_style("whitegrid"):
        ax_speed, ax_memory, ax_loss = figure.subplots(1, 3, sharey=True)
    y = np.arange(len(comparison))
    speed = comparison["speed ratio"].to_numpy(float)
    timed = np.isfinite(speed)
    if timed.any():
        err = np.abs(np.vstack([speed - comparison["speed ratio lo"], comparison["speed ratio hi"] - speed]))
        ax_speed.errorbar(speed[timed], y[timed], xerr=err[:, timed], fmt="o", color="#4c72b0", capsize=3)
        for yi, value in zip(y[timed], speed[timed]):
            ax_speed.annotate(f"{value:.2f}×", (value, yi), textcoords="offset points", xytext=(6, 4), fontsize="small")
        ax_speed.set_xscale("log")
    for yi in y[~timed]:
        ax_speed.text(0.02, yi, "not timed interleaved", transform=ax_speed.get_yaxis_transform(),
                      va="center", fontsize="small", color="0.4")
    ax_speed.axvline(1.0, color="0.3", linestyle="--", linewidth=1)
    ax_speed.set_yticks(y, comparison["run"])
    ax_speed.invert_yaxis()
    ax_speed.margins(x=0.2)
    ax_speed.set_title("Throughput vs baseline (interleaved rounds, 95% CI)")
    ax_speed.set_xlabel("tokens/s ÷ baseline (log scale)")

    left = np.zeros(len(comparison))
    for (column, name), colour in zip(MEMORY_COMPONENTS.items(), sns.color_palette("Set2", len(MEMORY_COMPONENTS))):
        widths = comparison[f"{name} / baseline memory"].fillna(0.0).to_numpy()
        bars = ax_memory.barh(y, widths, left=left, height=0.8, color=colour, label=name)
        left += widths
    ax_memory.bar_label(bars, labels=[f"{t:.2f}" for t in left], padding=3, fontsize="small")
    ax_memory.axvline(1.0, color="0.3", linestyle="--", linewidth=1)
    ax_memory.margins(x=0.15)
    ax_memory.set_title("Exact memory vs baseline")
    ax_memory.set_xlabel("bytes ÷ baseline total")
    ax_memory.legend(fontsize="small", loc="lower right")

    colours = ["#c44e52" if d > 0 else "#55a868" for d in comparison["loss delta"]]
    ax_loss.barh(y, comparison["loss delta"], color=colours)
    ax_loss.axvline(0.0, color="0.3", linewidth=1)
    ax_loss.bar_label(ax_loss.containers[0], fmt="{:+.3f}", padding=3, fontsize="small")
    ax_loss.margins(x=0.25)
    ax_loss.set_title("Validation loss at the same FLOP budget")
    ax_loss.set_xlabel("loss − baseline loss (nats/token)")
    figure.suptitle("Techniques normalised to the baseline")
    return figure


# --------------------------------------------------------------------------------------------
# Interleaved comparisons (records of kind "interleaved")
# --------------------------------------------------------------------------------------------

def _ci_text(stat: dict | None, fmt: str = "{:.4g}") -> str | None:
    """``"median [lo, hi]"`` of a ``{"median", "ci95"}`` statistic (median alone without CI)."""
    point = _estimate(stat)
    if point is None:
        return None
    ci = stat.get("ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return f"{fmt.format(point)} [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"
    return fmt.format(point)


def _ci_bounds(stat: dict | None) -> tuple[float, float]:
    ci = stat.get("ci95") if isinstance(stat, dict) else None
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        return float(ci[0]), float(ci[1])
    return math.nan, math.nan


def interleaved_table(record: dict) -> pd.DataFrame:
    """One row per variant of an interleaved comparison, the baseline first: the estimate over the
    rounds (the record's ``value``: the median) with its 95% interval, the speed-up vs the baseline (per-round ratios) and whether
    its interval excludes 1, and the memory ratios per component."""
    rows = []
    names = sorted(record["variants"], key=lambda n: (n != record["baseline"], n))
    for name in names:
        v = record["variants"][name]
        speed_lo, speed_hi = _ci_bounds(v["speedup"])
        if name == record["baseline"]:
            verdict = "baseline"
        elif math.isnan(speed_lo):
            verdict = "no interval"
        elif speed_lo > 1:
            verdict = "faster"
        elif speed_hi < 1:
            verdict = "slower"
        else:
            verdict = "no clear difference"
        row = {
            "family": record["family"], "variant": name, "label": v["label"],
            "s/step": _estimate(v["seconds_per_step"]),
            "s/step [95% CI]": _ci_text(v["seconds_per_step"]),
            "tokens/s": _estimate(v["tokens_per_second"]),
            "tokens/s [95% CI]": _ci_text(v["tokens_per_second"], "{:,.0f}"),
            "speedup": _estimate(v["speedup"]), "speedup lo": speed_lo, "speedup hi": speed_hi,
            "speedup [95% CI]": _ci_text(v["speedup"], "{:.3f}"),
            "verdict": verdict,
        }
        for column, short in MEMORY_COMPONENTS.items():
            ratio = (v.get("memory_ratio") or {}).get(column.split(".", 1)[1])
            row[f"{short} ratio"] = np.nan if ratio is None else float(ratio)
        rows.append(row)
    return pd.DataFrame(rows)


def interleaved_name(record: dict) -> str:
    """File name stem of a comparison's outputs: ``interleaved-<name>``, the name taken from the
    record's file (``compare-<name>.json``; a family may hold several), else its family.  A name
    that does not start with its family gets it in front (``interleaved-parallel-ws2``): two
    families' ``compare-ws2.json`` would otherwise write the same files, one silently replacing
    the other's."""
    source = record.get("source")
    stem = Path(source).stem if source else ""
    family = record.get("family") or ""
    name = stem[len("compare-"):] if stem.startswith("compare-") else (stem or family or "comparison")
    if family and not name.startswith(family):
        name = f"{family}-{name}"
    return f"interleaved-{name}"


def interleaved_markdown(record: dict) -> str:
    """A paragraph on how the comparison was measured, then its table (markdown)."""
    table = interleaved_table(record)
    columns = ["variant", "label", "s/step [95% CI]", "tokens/s [95% CI]", "speedup [95% CI]", "verdict",
               *[f"{short} ratio" for short in MEMORY_COMPONENTS.values()]]
    load = record.get("load") or {}
    head = (f"### Interleaved comparison: {markdown_text(interleaved_name(record).removeprefix('interleaved-'))} "
            f"(baseline {markdown_text(record['baseline'])})\n\n"
            f"{record.get('rounds', '?')} rounds of {record.get('steps_per_round', '?')} steps per variant, "
            f"run interleaved; {record.get('ci_method', 'interval method not recorded')}. "
            f"Load: {'**noisy**' if load.get('noisy') else 'quiet'}"
            f" (1-min load {load.get('load1_start', '?')} → {load.get('load1_end', '?')}, "
            f"{load.get('cores_in_use', '?')} cores in use).\n\n")
    formats = {f"{short} ratio": "{:.3f}" for short in MEMORY_COMPONENTS.values()}
    return head + markdown_table(table[columns], formats)


def plot_interleaved(record: dict) -> Figure:
    """Speed-up vs the baseline with its 95% interval (log x), and memory ratios per component."""
    table = interleaved_table(record)
    figure = new_figure(14.0, 1.8 + 0.45 * max(len(table), 1))
    with sns.axes_style("whitegrid"):
        ax_speed, ax_memory = figure.subplots(1, 2, sharey=True)
    y = np.arange(len(table))
    speed = table["speedup"].to_numpy()
    lo = np.where(np.isnan(table["speedup lo"]), speed, table["speedup lo"])
    hi = np.where(np.isnan(table["speedup hi"]), speed, table["speedup hi"])
    colours = {"faster": "#55a868", "slower": "#c44e52"}
    ax_speed.barh(y, speed, color=[colours.get(v, "#8c8c8c") for v in table["verdict"]], alpha=0.8)
    ax_speed.errorbar(speed, y, xerr=[speed - lo, hi - speed], fmt="none", ecolor="black", capsize=4)
    ax_speed.axvline(1.0, color="0.3", linestyle="--", linewidth=1)
    for yi, text in zip(y, table["speedup [95% CI]"]):
        ax_speed.annotate(f"{text}×", (hi[yi], yi), xytext=(4, 0), textcoords="offset points",
                          va="center", fontsize="small")
    ax_speed.set_yticks(y, table["label"])
    ax_speed.invert_yaxis()
    ax_speed.margins(x=0.35)
    ax_speed.set_title("Speed-up vs baseline over rounds, 95% CI")
    ax_speed.set_xlabel("baseline s/step ÷ variant s/step")

    components = list(MEMORY_COMPONENTS.values())
    height = 0.8 / len(components)
    for i, (short, colour) in enumerate(zip(components, sns.color_palette("Set2", len(components)))):
        ax_memory.barh(y - 0.4 + height * (i + 0.5), table[f"{short} ratio"].fillna(0.0), height=height,
                       color=colour, label=short)
    ax_memory.axvline(1.0, color="0.3", linestyle="--", linewidth=1)
    ax_memory.set_title("Memory vs baseline, per component")
    ax_memory.set_xlabel("bytes ÷ baseline bytes")
    ax_memory.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    load = record.get("load") or {}
    figure.suptitle(f"{record['family']}: interleaved comparison, {record.get('rounds', '?')} rounds"
                    + (" (NOISY: load exceeded the cores in use)" if load.get("noisy") else ""))
    return figure


def refused_markdown(refused: Sequence[dict]) -> str:
    """The records the report refused to plot, with the reason (markdown); empty if none."""
    if not refused:
        return ""
    lines = ["", "### Refused records (diverged, or failed the consistency check; not plotted)", ""]
    lines += [f"- {markdown_text(r['family'])} / {markdown_text(r['label'])} (`{markdown_text(Path(r['source']).name)}`): "
              + markdown_text("; ".join(r["reasons"])) for r in refused]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Comparing two sets of runs (two commits, or two machines)
# --------------------------------------------------------------------------------------------

#: Resamples of the ratio-of-medians bootstrap; the generator is seeded so a page is reproducible.
COMPARE_RESAMPLES = 10_000
#: Fewer per-step samples than this on either side give no interval: the bootstrap of a median of
#: one or two values is degenerate (zero width) and would call every difference real.
COMPARE_MIN_SAMPLES = 3
COMPARE_METHOD = (f"ratio of medians B/A of the per-step times; 95% percentile bootstrap interval, "
                  f"{COMPARE_RESAMPLES} resamples of each record's step_time.samples independently")


def bootstrap_ratio(a_samples: Sequence[float], b_samples: Sequence[float], *,
                    resamples: int = COMPARE_RESAMPLES, level: float = 0.95,
                    seed: int = 0) -> tuple[float, float, float]:
    """``(median(b) / median(a), low, high)``: the ratio of medians and its percentile-bootstrap
    interval, resampling each sample set with replacement independently of the other."""
    a = np.asarray(a_samples, dtype=float)
    b = np.asarray(b_samples, dtype=float)
    if a.size == 0 or b.size == 0:
        raise ValueError("bootstrap_ratio needs at least one sample on each side")
    rng = np.random.default_rng(seed)
    a_medians = np.median(a[rng.integers(0, a.size, (resamples, a.size))], axis=1)
    b_medians = np.median(b[rng.integers(0, b.size, (resamples, b.size))], axis=1)
    ratios = b_medians / a_medians
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(ratios, [tail, 1.0 - tail])
    return float(np.median(b) / np.median(a)), float(low), float(high)


def _record_key(source: str, root: Path) -> str:
    """A record's identity across two runs directories: its path under the root, no suffix
    (``technique/technique-bf16``), the file name being derived from the benchmark's parameters."""
    path = Path(source)
    try:
        path = path.resolve().relative_to(Path(root).resolve())
    except ValueError:
        path = Path(path.parent.name) / path.name
    return path.with_suffix("").as_posix()


def _step_stats(run) -> dict:
    """Median s/step, its interval text, samples and noisy flag of a run-frame row."""
    samples = run.get("step_time.samples")
    samples = list(samples) if isinstance(samples, (list, tuple)) and samples else None
    median = run.get("step_time.median")
    if not _is_number(median) or median != median:
        median = float(np.median(samples)) if samples else run.get("seconds_per_step")
    noisy = run.get("load.noisy")
    return {"median": median, "ci": median_ci(median, run.get("step_time.ci95")), "samples": samples,
            "noisy": None if noisy is None or noisy != noisy else bool(noisy)}


def _load_quietly(root: Path) -> Loaded:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecordWarning)
        return load_all([root])


def load_compare_side(label: str, root: Path) -> Loaded:
    """One side of ``--compare`` (``RUNS_A`` or ``RUNS_B``), read and validated as ``report`` reads
    its paths (:func:`load_all`: broken files skipped with a warning); a side that is not a folder,
    or holds no valid record at all (empty, or every file broken), is bad input."""
    root = Path(root)
    if not root.is_dir():
        raise BadInputError(f"--compare {label} {str(root)!r} is not a directory")
    loaded = load_all([root])
    if not loaded.holds_records():
        broken = f"; {len(loaded.skipped)} file(s) skipped as no valid record" if loaded.skipped else ""
        raise NoRecordsError(f"--compare {label} {str(root)!r} holds no valid run records (searched recursively "
                             f"for *.json{broken}): nothing to compare")
    return loaded


def compare_table(dir_a: Path, dir_b: Path, *, resamples: int = COMPARE_RESAMPLES,
                  sides: tuple[Loaded, Loaded] | None = None) -> pd.DataFrame:
    """Per record present in both runs directories (matched by family and file name): A and B
    s/step side by side, the ratio B/A with its bootstrap interval (:func:`bootstrap_ratio`) and
    a verdict: ``slower``/``faster`` when the interval excludes 1, ``no change`` when it holds 1,
    ``no samples`` when a record has no per-step samples (ratio of the point values, no interval).
    Records of only one side, or refused on either side, are listed with that verdict; a file that
    is not a valid record on one side (truncated, no recipe) is ``refused: not a valid record in
    B: ...``, never "only in" the other.  ``sides``: the two directories already loaded
    (:func:`load_compare_side`); else they are loaded here, without warnings."""
    loaded_sides = sides or (_load_quietly(Path(dir_a)), _load_quietly(Path(dir_b)))
    sides = {}
    for name, root, loaded in (("A", dir_a, loaded_sides[0]), ("B", dir_b, loaded_sides[1])):
        entries = {}
        for s in loaded.skipped:
            entries[_record_key(s["source"], root)] = {
                "family": Path(s["source"]).parent.name, "label": Path(s["source"]).stem,
                "refused": f"not a valid record in {name}: {s['reason']}", "invalid": True, "median": None,
                "ci": None, "samples": None, "noisy": None}
        for _, run in loaded.runs.iterrows():
            entries[_record_key(run["source"], root)] = {"family": run["family"], "label": run["label"],
                                                         "refused": None, **_step_stats(run)}
        for r in loaded.refused:
            entries[_record_key(r["source"], root)] = {"family": r["family"], "label": r["label"],
                                                       "refused": "; ".join(r["reasons"]), "median": None,
                                                       "ci": None, "samples": None, "noisy": None}
        sides[name] = entries
    rows = []
    for key in sorted(set(sides["A"]) | set(sides["B"])):
        a, b = sides["A"].get(key), sides["B"].get(key)
        some = a or b
        row = {"record": key, "family": some["family"], "label": some["label"],
               "A s/step": a and a["median"], "A [95% CI]": a and a["ci"], "A noisy": a and a["noisy"],
               "B s/step": b and b["median"], "B [95% CI]": b and b["ci"], "B noisy": b and b["noisy"],
               "ratio B/A": math.nan, "ratio lo": math.nan, "ratio hi": math.nan}
        invalid = [side for side in (a, b) if side and side.get("invalid")]
        if invalid:  # a broken file is not a run "only in" the other side
            row["verdict"] = "refused: " + invalid[0]["refused"]
        elif a is None or b is None:
            row["verdict"] = "only in A" if b is None else "only in B"
        elif a["refused"] or b["refused"]:
            row["verdict"] = "refused: " + (a["refused"] or b["refused"])
        elif min(len(a["samples"] or ()), len(b["samples"] or ())) >= COMPARE_MIN_SAMPLES:
            ratio, low, high = bootstrap_ratio(a["samples"], b["samples"], resamples=resamples)
            row.update({"ratio B/A": ratio, "ratio lo": low, "ratio hi": high})
            row["verdict"] = "slower" if low > 1 else "faster" if high < 1 else "no change"
        else:
            if _is_number(a["median"]) and _is_number(b["median"]) and a["median"] > 0:
                row["ratio B/A"] = b["median"] / a["median"]
            few = min(len(a["samples"] or ()), len(b["samples"] or ()))
            row["verdict"] = "no samples" if few == 0 else f"too few samples ({few})"
        row["noisy"] = bool(row["A noisy"] or row["B noisy"])
        rows.append(row)
    columns = ["record", "family", "label", "A s/step", "A [95% CI]", "A noisy", "B s/step", "B [95% CI]",
               "B noisy", "ratio B/A", "ratio lo", "ratio hi", "verdict", "noisy"]
    return pd.DataFrame(rows, columns=columns)


def ratio_agreement(dir_a: Path, dir_b: Path, *, sides: tuple[Loaded, Loaded] | None = None) -> pd.DataFrame:
    """Interleaved speed-ups of two runs directories side by side (matched by record file and
    variant): ``agree`` when the two 95% intervals overlap, ``differ`` when they do not -- a
    ratio that moved more than its stated uncertainty, to re-measure before believing either --
    and each side's noisy flag.  ``sides`` as for :func:`compare_table`."""
    loaded_sides = sides or (_load_quietly(Path(dir_a)), _load_quietly(Path(dir_b)))
    sides = {}
    for name, root, loaded in (("A", Path(dir_a), loaded_sides[0]), ("B", Path(dir_b), loaded_sides[1])):
        sides[name] = {(_record_key(r["source"], root), variant): (r, v)
                       for r in loaded.interleaved for variant, v in r["variants"].items()}
    rows = []
    for key in sorted(set(sides["A"]) & set(sides["B"])):
        (ra, va), (rb, vb) = sides["A"][key], sides["B"][key]
        if key[1] == ra.get("baseline"):
            continue  # 1 by definition
        sa, sb = va.get("speedup") or {}, vb.get("speedup") or {}
        a, b = _estimate(sa), _estimate(sb)
        (alo, ahi), (blo, bhi) = sa.get("ci95") or (math.nan, math.nan), sb.get("ci95") or (math.nan, math.nan)
        overlap = _is_number(alo) and _is_number(blo) and max(alo, blo) <= min(ahi, bhi)
        rows.append({"record": key[0], "variant": key[1], "A speed-up": a, "A lo": alo, "A hi": ahi,
                     "B speed-up": b, "B lo": blo, "B hi": bhi,
                     "verdict": "agree" if overlap else "differ",
                     "A noisy": bool((ra.get("load") or {}).get("noisy")),
                     "B noisy": bool((rb.get("load") or {}).get("noisy"))})
    return pd.DataFrame(rows, columns=["record", "variant", "A speed-up", "A lo", "A hi", "B speed-up", "B lo",
                                       "B hi", "verdict", "A noisy", "B noisy"])


def ratio_agreement_markdown(table: pd.DataFrame, name_a: str, name_b: str) -> str:
    if table.empty:
        return ""
    counts = Counter(table["verdict"])
    shown = pd.DataFrame({
        "record": table["record"], "variant": table["variant"],
        f"A = {name_a}": [f"{a:.3f} [{lo:.3f}, {hi:.3f}]" for a, lo, hi in zip(table["A speed-up"], table["A lo"], table["A hi"])],
        f"B = {name_b}": [f"{b:.3f} [{lo:.3f}, {hi:.3f}]" for b, lo, hi in zip(table["B speed-up"], table["B lo"], table["B hi"])],
        "verdict": ["**differ**" if v == "differ" else v for v in table["verdict"]],
        "noisy": [", ".join(s for s, n in (("A", a), ("B", b)) if n) for a, b in zip(table["A noisy"], table["B noisy"])]})
    return ("\n\n# Interleaved speed-ups: do the two runs agree?\n\nSpeed-up vs the family's baseline, "
            "median over rounds [95% interval]; `agree` when the intervals overlap, **differ** otherwise "
            "(re-measure before believing either).\n\n"
            + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + "\n\n" + markdown_table(shown))


def verdict_counts(table: pd.DataFrame) -> Counter:
    """How many records got each verdict (all refusals counted as one kind)."""
    return Counter("refused" if v.startswith("refused") else v for v in table["verdict"])


def _ratio_text(row) -> str | None:
    if not _is_number(row["ratio B/A"]) or math.isnan(row["ratio B/A"]):
        return None
    if math.isnan(row["ratio lo"]):
        return f"{row['ratio B/A']:.3f}"
    return f"{row['ratio B/A']:.3f} [{row['ratio lo']:.3f}, {row['ratio hi']:.3f}]"


def compare_markdown(table: pd.DataFrame, name_a: str, name_b: str) -> str:
    counts = verdict_counts(table)
    shown = table.assign(**{"ratio B/A [95% CI]": [_ratio_text(r) for _, r in table.iterrows()],
                            "noisy": ["**noisy**" if n else "" for n in table["noisy"]]})
    columns = ["record", "label", "A [95% CI]", "B [95% CI]", "ratio B/A [95% CI]", "verdict", "noisy"]
    shown["A [95% CI]"] = [c or format_value(v) for c, v in zip(shown["A [95% CI]"], shown["A s/step"])]
    shown["B [95% CI]"] = [c or format_value(v) for c, v in zip(shown["B [95% CI]"], shown["B s/step"])]
    head = (f"# s/step: B = {name_b} vs A = {name_a}\n\n{COMPARE_METHOD}. A ratio above 1 is slower. "
            "A change is reported only where the interval excludes 1; a record measured under load "
            "(noisy) needs re-measuring before a change is believed.\n\n"
            + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + "\n\n")
    return head + markdown_table(shown[columns].rename(columns={"A [95% CI]": "A s/step [95% CI]",
                                                                "B [95% CI]": "B s/step [95% CI]"}))


def format_value(value) -> str | None:
    return None if value is None or not _is_number(value) or value != value else f"{value:.4g}"


# --------------------------------------------------------------------------------------------
# HTML tables (the site's front page and the compare page)
# --------------------------------------------------------------------------------------------

#: Vanilla JS sorting every ``table.sortable`` by a click on its header: numeric by the cells'
#: ``data-sort`` values where present, text otherwise; a second click reverses.
SORTABLE_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('thead th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var asc = th.getAttribute('aria-sort') !== 'ascending';
      table.querySelectorAll('thead th').forEach(function (h) { h.removeAttribute('aria-sort'); });
      th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var cell = row.cells[col];
        var v = cell ? cell.getAttribute('data-sort') : null;
        if (v !== null && v !== '' && !isNaN(Number(v))) return [0, Number(v)];
        return [1, cell ? cell.textContent.trim().toLowerCase() : ''];
      }
      rows.sort(function (a, b) {
        var ka = key(a), kb = key(b);
        if (ka[0] !== kb[0]) return ka[0] - kb[0];
        var c = ka[1] < kb[1] ? -1 : ka[1] > kb[1] ? 1 : 0;
        return asc ? c : -c;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""

TABLE_CSS = """
table.sortable { border-collapse: collapse; font-size: 13px; margin: 8px 0 16px; }
table.sortable th, table.sortable td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; }
table.sortable td.text, table.sortable th.text { text-align: left; }
table.sortable th { background: #f3f5f8; cursor: pointer; user-select: none; position: sticky; top: 0; }
table.sortable th::after { content: ' \\2195'; color: #aaa; font-size: 11px; }
table.sortable th[aria-sort=ascending]::after { content: ' \\25B2'; color: #333; }
table.sortable th[aria-sort=descending]::after { content: ' \\25BC'; color: #333; }
table.sortable tr.refused td { background: #fdecea; color: #8a1c10; }
table.sortable tr.noisy td { background: #fff8e1; }
table.sortable td.faster { color: #1b7a3a; font-weight: bold; }
table.sortable td.slower { color: #b3261e; font-weight: bold; }
"""


def html_table(rows: Sequence[dict], columns: Sequence[str], *, formats: dict | None = None,
               text_columns: Sequence[str] = (), raw_html: Sequence[str] = (),
               row_class: Sequence[str] | None = None, cell_class: dict | None = None,
               table_id: str | None = None) -> str:
    """A ``<table class="sortable">`` (see :data:`SORTABLE_JS`): numbers formatted with
    ``formats`` and their full value kept in ``data-sort``; a ``(text, number)`` tuple shows the
    text and sorts by the number; ``raw_html`` columns hold markup built by the caller (already
    escaped), every other value is escaped here."""
    import html as _html

    formats = formats or {}
    out = [f'<table class="sortable"{f" id={_html.escape(table_id)!r}" if table_id else ""}><thead><tr>']
    out += [f'<th class="{"text" if c in text_columns else "num"}" scope="col">{_html.escape(c)}</th>'
            for c in columns]
    out.append("</tr></thead><tbody>")
    for i, row in enumerate(rows):
        css = row_class[i] if row_class else ""
        out.append(f'<tr class="{_html.escape(css)}">' if css else "<tr>")
        for c in columns:
            value = row.get(c)
            classes = ["text"] if c in text_columns else []
            if cell_class and c in cell_class:
                classes.append(cell_class[c](row))
            cls = f' class="{" ".join(x for x in classes if x)}"' if any(classes) else ""
            if c in raw_html:
                out.append(f"<td{cls}>{value or ''}</td>")
                continue
            if isinstance(value, tuple):  # (text shown, number sorted by), e.g. "0.5 [0.4, 0.6]"
                text, key = value
                key = "" if key is None or not _is_number(key) or key != key else repr(float(key))
                out.append(f'<td{cls} data-sort="{key}">{_html.escape(text or "n/a")}</td>')
                continue
            missing = value is None or (isinstance(value, float) and math.isnan(value))
            if missing:
                out.append(f'<td{cls} data-sort="">n/a</td>')
            elif _is_number(value):
                fmt = formats.get(c, "{:.4g}")
                out.append(f'<td{cls} data-sort="{value!r}">{_html.escape(fmt.format(value))}</td>')
            else:
                text = "yes" if value is True else "no" if value is False else str(value)
                out.append(f"<td{cls}>{_html.escape(text)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def compare_html(table: pd.DataFrame, name_a: str, name_b: str, *, head_extra: str = "",
                 nav: str = "") -> str:
    """A standalone page (no external resources) with the compare table, sortable."""
    import html as _html

    counts = verdict_counts(table)
    rows = []
    for _, r in table.iterrows():
        row = r.to_dict()
        row["ratio B/A [95% CI]"] = _ratio_text(r)
        row["A s/step [95% CI]"] = r["A [95% CI]"] or format_value(r["A s/step"])
        row["B s/step [95% CI]"] = r["B [95% CI]"] or format_value(r["B s/step"])
        row["A noisy"] = "noisy" if r["A noisy"] else ("" if r["A noisy"] is None else "quiet")
        row["B noisy"] = "noisy" if r["B noisy"] else ("" if r["B noisy"] is None else "quiet")
        rows.append(row)
    columns = ["record", "label", "A s/step [95% CI]", "A noisy", "B s/step [95% CI]", "B noisy",
               "ratio B/A", "ratio B/A [95% CI]", "verdict"]
    body = html_table(
        rows, columns, formats={"ratio B/A": "{:.3f}"},
        text_columns=[c for c in columns if c != "ratio B/A"],
        row_class=["refused" if str(r["verdict"]).startswith("refused") else "noisy" if r["noisy"] else ""
                   for r in rows],
        cell_class={"verdict": lambda row: row["verdict"] if row["verdict"] in ("faster", "slower") else ""},
        table_id="compare")
    summary = ", ".join(f"{n} {_html.escape(k)}" for k, n in sorted(counts.items()))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>etbench compare: {_html.escape(name_b)} vs {_html.escape(name_a)}</title>
<style>body {{ font-family: system-ui, sans-serif; margin: 20px 32px; color: #222; }}{TABLE_CSS}</style>{head_extra}
</head><body>{nav}
<h1>Seconds per step: B = {_html.escape(name_b)} vs A = {_html.escape(name_a)}</h1>
<p>{_html.escape(COMPARE_METHOD)}. A ratio above 1 means B is slower. A change is claimed only where the
interval excludes 1 (<b>faster</b>/<b>slower</b>); rows measured under load (noisy, shaded) need
re-measuring before a change is believed. Records without per-step samples get the ratio of their
point values and no verdict.</p>
<p>{summary}</p>
{body}
<script>{SORTABLE_JS}</script>
</body></html>
"""


def write_compare(dir_a: Path, dir_b: Path, out_dir: Path) -> list[Path]:
    """Write ``compare.csv``, ``compare.md`` and ``compare.html`` for two runs directories.

    Both sides are read and validated first (:func:`load_compare_side`: a side that is not a
    folder or holds no valid record is bad input), every output is computed, and only then are
    the files written (all of them or, on a failed write, none: :func:`staged_outputs`)."""
    dir_a, dir_b = Path(dir_a), Path(dir_b)
    sides = (load_compare_side("RUNS_A", dir_a), load_compare_side("RUNS_B", dir_b))
    table = compare_table(dir_a, dir_b, sides=sides)
    name_a, name_b = dir_a.name, dir_b.name
    ratios = ratio_agreement(dir_a, dir_b, sides=sides)
    texts = {"compare.csv": table.to_csv(index=False), "compare_ratios.csv": ratios.to_csv(index=False),
             "compare.md": compare_markdown(table, name_a, name_b) + ratio_agreement_markdown(ratios, name_a, name_b),
             "compare.html": compare_html(table, name_a, name_b)}
    with staged_outputs(out_dir) as stage:
        for name, text in texts.items():
            stage.add(write_text(stage.folder / name, text))
    return stage.written


# --------------------------------------------------------------------------------------------
# Data-parallel and sharded training (issue 10): model states and communication vs the ZeRO
# formulas, scaling efficiency, bus bandwidth (records of kind "comm"), big-model memory tables
# --------------------------------------------------------------------------------------------

#: ``kind`` of the collective-bandwidth records written by ``etbench comm``.
COMM_KIND = "comm"
#: File names of the data-parallel outputs (no family suffix: the techniques of every family
#: that has ``model_states`` records share one set of plots).
DATA_PARALLEL_FILES = {
    "model_states": "data_parallel_model_states",
    "scaling": "data_parallel_scaling",
    "comm": "data_parallel_comm",
    "busbw": "comm_busbw",
    "memory": "data_parallel_memory",
}
#: Components of the model-state plot: (record key in model_states.measured/formula, title).
DP_COMPONENTS = (("params", "parameters"), ("grads", "gradients"), ("optimizer", "optimizer state"),
                 ("total", "total model states"))
#: Models of the memory table (GPT-2 1.5B, Llama-7B) and its data-parallel degrees.
MEMORY_TABLE_MODELS = ("gpt2-xl", "llama-7b")
MEMORY_TABLE_N_DS = (1, 8, 64, 1024)
SCALING_NOTE = ("tokens/s per rank at N ranks ÷ tokens/s of the same technique on 1 rank (else of the run without "
                "techniques on 1 rank); separately timed runs, not interleaved rounds: the interval combines each run's "
                "own step-time 95% CI and is no substitute for an interleaved comparison; oversubscribed CPU runs "
                "(ranks × threads > cores) measure contention, not scaling")


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def nested_block(run, prefix: str) -> dict | None:
    """The nested block ``prefix`` of a record, rebuilt from the run frame's flattened columns
    (``"model_states.formula.params"``); None where the record has none."""
    out: dict = {}
    whole = run.get(prefix) if hasattr(run, "get") else None
    if isinstance(whole, dict):
        out.update(whole)
    for key, value in run.items():
        if not isinstance(key, str) or not key.startswith(prefix + ".") or _missing(value):
            continue
        node, parts = out, key[len(prefix) + 1:].split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[parts[-1]] = value
    return out or None


def _technique_label(techniques) -> str:
    if isinstance(techniques, (list, tuple)) and techniques:
        return "+".join(map(str, techniques))
    return "none"


def _first_number(*values):
    for value in values:
        if _is_number(value) and not (isinstance(value, float) and math.isnan(value)):
            return float(value)
    return None


def _comm_measured(comm: dict | None):
    """Per-rank bytes of one step from a record's ``comm`` block, tolerant of the key the counter
    uses (``bytes_per_step``, ``measured_bytes``, ``bytes``, ``total_bytes``, or ``check.measured_bytes``)."""
    if not isinstance(comm, dict):
        return None
    check = comm.get("check") if isinstance(comm.get("check"), dict) else {}
    return _first_number(comm.get("bytes_per_step"), comm.get("measured_bytes"), comm.get("bytes"),
                         comm.get("total_bytes"), check.get("measured_bytes"))


def interleaved_parallel_runs(interleaved: Sequence[dict]) -> pd.DataFrame:
    """The variants of interleaved comparisons that carry a ``model_states`` block (the
    data-parallel family times every technique of a world size in one comparison) as rows like
    :func:`records_frame`'s, for :func:`data_parallel_frame`: per-rank bytes, the collectives of
    one step and tokens/s from the interleaved rounds' median step time (its interval from theirs)."""
    rows = []
    for record in interleaved:
        if record.get("family") == "model_parallel":  # its own section (impls.report.model_parallel)
            continue
        for name, v in record.get("variants", {}).items():
            if not isinstance(v.get("model_states"), dict) or "error" in v["model_states"]:
                continue
            seconds = v.get("seconds_per_step") or {}
            median = seconds.get("median")
            if not _is_number(median) or median <= 0:
                continue
            rows.append({"run": f"{name}/ws{record.get('world_size')} [{Path(record.get('source') or '').stem}]",
                         "family": record.get("family"), "recipe": v.get("recipe") or {},
                         "world_size": record.get("world_size"), "tokens_per_step": v.get("tokens_per_step"),
                         "tokens_per_second": v["tokens_per_step"] / median,
                         "step_time": {"ci95": seconds.get("ci95")}, "device": record.get("device") or {},
                         "load": record.get("load") or {}, "model_states": v["model_states"],
                         "comm": v.get("comm")})
    return pd.json_normalize(rows) if rows else pd.DataFrame()


def data_parallel_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run that has a ``model_states`` block (records of data-parallel techniques).

    Columns: ``run``, ``family``, ``model``, ``optimizer``, ``technique`` (the recipe's techniques
    joined by ``+``, the model appended when several models are present), ``n_d`` (the block's
    data-parallel degree, else the record's world size), ``world_size``, ``stage``, ``stage_name``,
    ``psi``, ``param_bytes``, ``grad_bytes``, ``k``, ``covered``, ``measured_<c>`` and ``formula_<c>``
    (bytes per rank, c in params/grads/optimizer/total), ``ratio_total``, ``tokens_per_second``,
    ``tokens_per_rank``, ``tokens_per_rank_lo``/``_hi`` (from the step-time 95% CI), ``cpu_count``,
    ``threads``, ``oversubscribed`` (CPU runs with ranks × threads > cores), ``comm_measured``
    (bytes per rank per step), ``comm_paper``, ``comm_ring``, ``comm_payload`` (the formula in the
    three conventions of :func:`impls.measure.model_states.comm_volume`)."""
    from ..measure import model_states as ms

    rows = []
    for _, run in runs.iterrows():
        block = nested_block(run, "model_states")
        if not block or not all(_is_number(block.get(k)) for k in ("psi", "n_d", "stage")):
            continue
        psi, n_d, stage = float(block["psi"]), int(block["n_d"]), int(block["stage"])
        p_b, g_b, k = block.get("param_bytes"), block.get("grad_bytes"), block.get("k")
        formula = block.get("formula") if isinstance(block.get("formula"), dict) else None
        if formula is None and all(_is_number(v) for v in (p_b, g_b, k)):
            formula = ms.formula(psi, n_d, stage, param_bytes=p_b, grad_bytes=g_b, k=k)
        measured = block.get("measured") or {}
        world_size = run.get("world_size")
        world_size = int(world_size) if _is_number(world_size) and world_size == world_size else n_d
        tps = run.get("tokens_per_second")
        tokens, ci = run.get("tokens_per_step"), run.get("step_time.ci95")
        lo = hi = math.nan
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and _is_number(tokens) and ci[0] > 0:
            lo, hi = tokens / ci[1] / world_size, tokens / ci[0] / world_size
        cpus, threads = run.get("load.cpu_count"), run.get("device.threads")
        oversubscribed = None
        if run.get("device.type") == "cpu" and _is_number(cpus) and cpus == cpus:
            per_rank = int(threads) if _is_number(threads) and threads == threads else 1
            oversubscribed = world_size * max(per_rank, 1) > cpus
        comm = nested_block(run, "comm")
        comm_formula = None
        if comm:
            comm_formula = comm.get("formula") or (comm.get("check") or {}).get("formula")
        if comm and not isinstance(comm_formula, dict) and _is_number(g_b):
            comm_formula = ms.comm_volume(psi, n_d, stage, grad_bytes=g_b, param_bytes=p_b if _is_number(p_b) else None)
        row = {"run": run["run"], "family": run["family"], "model": run.get("recipe.model"),
               "batch_size": run.get("recipe.batch_size"), "seq_len": run.get("recipe.seq_len"),
               "optimizer": run.get("recipe.optimizer"), "technique": _technique_label(run.get("recipe.techniques")),
               "n_d": n_d, "world_size": world_size, "stage": stage,
               "stage_name": block.get("stage_name") or ms.STAGES[stage][0], "psi": psi,
               "param_bytes": p_b, "grad_bytes": g_b, "k": k, "covered": formula is not None,
               "tokens_per_second": tps,
               "tokens_per_rank": tps / world_size if _is_number(tps) and tps == tps else math.nan,
               "tokens_per_rank_lo": lo, "tokens_per_rank_hi": hi, "cpu_count": cpus, "threads": threads,
               "oversubscribed": oversubscribed, "comm_measured": _comm_measured(comm),
               "comm_paper": (comm_formula or {}).get("bytes"), "comm_ring": (comm_formula or {}).get("ring_bytes"),
               "comm_payload": (comm_formula or {}).get("payload_bytes")}
        for key, _ in DP_COMPONENTS:
            row[f"measured_{key}"] = _first_number(measured.get(key))
            row[f"formula_{key}"] = _first_number((formula or {}).get(key))
        if row["measured_total"] is None and all(row[f"measured_{c}"] is not None for c, _ in DP_COMPONENTS[:3]):
            row["measured_total"] = sum(row[f"measured_{c}"] for c, _ in DP_COMPONENTS[:3])
        row["ratio_total"] = (row["measured_total"] / row["formula_total"]
                              if row["measured_total"] is not None and row["formula_total"] else math.nan)
        rows.append(row)
    columns = ["run", "family", "model", "optimizer", "technique", "n_d", "world_size", "stage", "stage_name", "psi",
               "param_bytes", "grad_bytes", "k", "covered", *[f"{w}_{c}" for c, _ in DP_COMPONENTS
                                                               for w in ("measured", "formula")],
               "ratio_total", "tokens_per_second", "tokens_per_rank", "tokens_per_rank_lo", "tokens_per_rank_hi",
               "cpu_count", "threads", "oversubscribed", "comm_measured", "comm_paper", "comm_ring", "comm_payload"]
    frame = pd.DataFrame(rows, columns=columns + ["batch_size", "seq_len"])
    # Every record checks its model states, single-process ones included: the section shows the
    # data-parallel runs, and of the one-rank runs only those that are a multi-rank run's
    # reference (same model, batch and sequence length), for the scaling efficiency.
    config = ["family", "model", "batch_size", "seq_len"]
    parallel = (frame["n_d"] > 1) | (frame["stage"] > 0)
    if frame.empty:
        return frame
    key = frame[config].astype(str).apply(tuple, axis=1)
    wanted = {(k, t) for k, t in zip(key[parallel], frame.loc[parallel, "technique"])}
    # a one-rank reference: same family and config, and the same technique or none
    reference = [(k, t) in wanted or (t == "none" and any(k == w for w, _ in wanted))
                 for k, t in zip(key, frame["technique"])]
    frame = frame[parallel | pd.Series(reference, index=frame.index)].reset_index(drop=True)
    if frame["model"].nunique() > 1:
        frame["technique"] = [f"{t} [{m}]" for t, m in zip(frame["technique"], frame["model"])]
    return frame.sort_values(["technique", "n_d", "run"], kind="stable").reset_index(drop=True)


def _n_grid(n_max: int, measured: Iterable[int]) -> list[int]:
    """World sizes to draw a formula line at: every integer up to 64, powers of two beyond, and
    the measured ones."""
    grid = set(range(1, min(n_max, 64) + 1)) | {2 ** i for i in range(int(math.log2(max(n_max, 1))) + 1)}
    return sorted(n for n in grid | set(measured) if n <= n_max)


def model_states_lines(frame: pd.DataFrame) -> pd.DataFrame:
    """The formula of each technique (its Ψ, stage, p_b, g_b, K) evaluated from 1 rank to the
    largest world size measured: columns ``technique``, ``n_d``, ``params``, ``grads``,
    ``optimizer``, ``total`` (bytes per rank)."""
    from ..measure import model_states as ms

    rows = []
    for technique, group in frame[frame["covered"]].groupby("technique", sort=False):
        first = group.iloc[0]
        if not all(_is_number(first[c]) for c in ("param_bytes", "grad_bytes", "k")):
            continue  # a block with its formula only: the measured world sizes carry it
        for n in _n_grid(int(group["n_d"].max()), group["n_d"]):
            f = ms.formula(first["psi"], n, int(first["stage"]), param_bytes=first["param_bytes"],
                           grad_bytes=first["grad_bytes"], k=first["k"])
            rows.append({"technique": technique, "n_d": n, **f})
    return pd.DataFrame(rows, columns=["technique", "n_d", "params", "grads", "optimizer", "total"])


def scaling_efficiency(frame: pd.DataFrame) -> pd.DataFrame:
    """Per data-parallel run: tokens/s per rank ÷ the 1-rank tokens/s of the same technique (else
    of the same model's run without techniques), with the interval from both runs' step-time 95%
    CIs (lo: slowest N vs fastest 1; hi: the reverse) where both have one.  Columns ``technique``,
    ``n_d``, ``tokens_per_rank``, ``reference`` (which 1-rank run), ``efficiency``, ``lo``, ``hi``,
    ``oversubscribed``."""
    rows = []
    for _, r in frame.iterrows():
        # the same tokens per rank and step: same model, batch and sequence length
        config = ((frame["model"] == r["model"]) & (frame["batch_size"].astype(str) == str(r["batch_size"]))
                  & (frame["seq_len"].astype(str) == str(r["seq_len"])) & (frame["family"] == r["family"]))
        same = frame[(frame["technique"] == r["technique"]) & (frame["n_d"] == 1) & config]
        reference = "same technique, 1 rank"
        if same.empty:
            same = frame[(frame["technique"].str.split(" ").str[0] == "none") & (frame["n_d"] == 1) & config]
            reference = "no technique, 1 rank"
        if same.empty:
            rows.append({"technique": r["technique"], "n_d": r["n_d"], "tokens_per_rank": r["tokens_per_rank"],
                         "reference": "no 1-rank run", "efficiency": math.nan, "lo": math.nan, "hi": math.nan,
                         "oversubscribed": r["oversubscribed"]})
            continue
        ref = same.iloc[0]
        eff = r["tokens_per_rank"] / ref["tokens_per_rank"]
        if ref["run"] == r["run"]:  # the reference itself: 1 by definition
            lo = hi = 1.0
        else:
            lo = r["tokens_per_rank_lo"] / ref["tokens_per_rank_hi"]
            hi = r["tokens_per_rank_hi"] / ref["tokens_per_rank_lo"]
        rows.append({"technique": r["technique"], "n_d": r["n_d"], "tokens_per_rank": r["tokens_per_rank"],
                     "reference": reference, "efficiency": eff, "lo": lo, "hi": hi,
                     "oversubscribed": r["oversubscribed"]})
    return pd.DataFrame(rows, columns=["technique", "n_d", "tokens_per_rank", "reference", "efficiency", "lo", "hi",
                                       "oversubscribed"])


def comm_volume_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Runs with communication bytes: measured bytes per rank per step against the formula in the
    paper's convention (2Ψ / 3Ψ elements in bytes), the ring convention (× (N−1)/N) and the
    collective payloads, with measured/formula ratios.  One-rank runs are left out: a single
    rank communicates nothing, and the paper's 2Ψ assumes N_d > 1."""
    table = frame[frame["comm_measured"].notna() & frame["comm_paper"].notna() & (frame["n_d"] > 1)]
    out = table[["technique", "stage_name", "n_d", "psi", "comm_measured", "comm_paper", "comm_ring",
                 "comm_payload"]].reset_index(drop=True).astype({"comm_measured": float, "comm_paper": float,
                                                                  "comm_ring": float, "comm_payload": float})
    with np.errstate(divide="ignore", invalid="ignore"):
        out["ratio_paper"] = out["comm_measured"] / out["comm_paper"].replace(0, np.nan)
        out["ratio_ring"] = out["comm_measured"] / out["comm_ring"].replace(0, np.nan)
        out["ratio_payload"] = out["comm_measured"] / out["comm_payload"].replace(0, np.nan)
    return out


def validate_comm(record) -> None:
    """Raise :class:`RecordError` unless ``record`` is a usable ``etbench comm`` record: at least
    one point with a message size and a time or a bandwidth (see :func:`comm_bandwidth_frame`)."""
    if not isinstance(record, dict) or record.get("kind") != COMM_KIND:
        raise RecordError("not a comm record")
    if comm_bandwidth_frame([record]).empty:
        raise RecordError("comm record without a point of (bytes, seconds or bandwidth)")


def _seconds(value):
    if isinstance(value, dict):
        return _first_number(value.get("median"), value.get("value"), value.get("mean"))
    return _first_number(value)


def _comm_points(record: dict):
    """(scheme, point) pairs of a comm record, whichever layout it uses: ``schemes`` as
    ``{name: [points]}`` or ``[{"scheme"/"name", "points"/"results"}]``, or flat ``points``/
    ``results`` rows with a ``scheme``."""
    schemes = record.get("schemes")
    if isinstance(schemes, dict):
        for name, points in schemes.items():
            if isinstance(points, dict):
                points = points.get("points") or points.get("results") or []
            for point in points if isinstance(points, list) else []:
                yield str(name), point
    elif isinstance(schemes, list):
        for entry in schemes:
            if isinstance(entry, dict):
                name = entry.get("scheme") or entry.get("name") or "?"
                for point in entry.get("points") or entry.get("results") or []:
                    yield str(name), point
    for key in ("points", "results"):
        for point in record.get(key) or [] if isinstance(record.get(key), list) else []:
            if isinstance(point, dict):
                yield str(point.get("scheme") or point.get("name") or "?"), point


def _median_of(value):
    """``value["median"]`` of a summary dict, the number itself otherwise."""
    return value.get("median") if isinstance(value, dict) else value


def comm_bandwidth_frame(records: Sequence[dict]) -> pd.DataFrame:
    """One row per (record, scheme, message size) of ``etbench comm`` records.

    ``algbw`` = bytes / median seconds (nccl-tests' definition, bytes/s) where the time is given,
    else the record's ``algbw`` (taken as bytes/s).  ``busbw`` = algbw × the record's own
    busbw/algbw factor where it gives both, else × 2(n−1)/n for a ring all-reduce (``ring``,
    ``all_reduce``), else the record's ``busbw``; NaN when none applies."""
    rows = []
    for record in records:
        for scheme, point in _comm_points(record):
            if not isinstance(point, dict):
                continue
            size = _first_number(point.get("bytes"), point.get("size"), point.get("message_bytes"),
                                 point.get("size_bytes"))
            n = _first_number(point.get("world_size"), record.get("world_size"))
            seconds = _seconds(point.get("seconds", point.get("time", point.get("time_s"))))
            # etbench comm's fields: medians of algbw_Bps, and link_Bps -- the busiest link's rate
            # (the bus bandwidth of a ring all-reduce, the root's link of the parameter server)
            given_alg = _first_number(point.get("algbw"), _median_of(point.get("algbw_Bps")))
            given_bus = _first_number(point.get("busbw"), _median_of(point.get("link_Bps")),
                                      _median_of(point.get("busbw_Bps")))
            if size is None or n is None or (seconds is None and given_alg is None and given_bus is None):
                continue
            algbw = size / seconds if seconds else given_alg
            if given_alg and given_bus is not None:
                factor = given_bus / given_alg
            elif scheme.lower() in ("ring", "all_reduce", "allreduce", "ring_allreduce"):
                factor = 2 * (n - 1) / n
            else:
                factor = None
            busbw = algbw * factor if algbw is not None and factor is not None else given_bus
            rows.append({"source": record.get("source"), "world_size": int(n), "scheme": scheme, "bytes": size,
                         "seconds": seconds, "algbw": algbw if algbw is not None else math.nan,
                         "busbw": busbw if busbw is not None else math.nan})
    frame = pd.DataFrame(rows, columns=["source", "world_size", "scheme", "bytes", "seconds", "algbw", "busbw"])
    return frame.sort_values(["world_size", "scheme", "bytes"], kind="stable").reset_index(drop=True)


def data_parallel_memory_table(models: Sequence[str] = MEMORY_TABLE_MODELS,
                               n_ds: Sequence[int] = MEMORY_TABLE_N_DS, gpu_bytes: float = 80e9) -> pd.DataFrame:
    """:func:`impls.measure.model_states.memory_table` as a frame (Ψ counted on ``meta``)."""
    from ..measure import model_states as ms

    return pd.DataFrame(ms.memory_table(tuple(models), tuple(n_ds), gpu_bytes))


def _technique_palette(techniques: Sequence[str]) -> dict[str, tuple]:
    names = list(dict.fromkeys(techniques))
    return dict(zip(names, sns.color_palette("tab10" if len(names) <= 10 else "husl", len(names))))


def plot_model_states(frame: pd.DataFrame, lines: pd.DataFrame) -> Figure:
    """Per-rank model-state bytes (MiB) vs data-parallel world size, one panel per component
    (parameters, gradients, optimizer state, total): measured points per technique, the ZeRO
    formula of the same technique drawn as a line over them (``gid`` = the technique)."""
    palette = _technique_palette(frame["technique"])
    figure = new_figure(16.0, 4.4)
    with sns.axes_style("whitegrid"):
        axes = figure.subplots(1, len(DP_COMPONENTS))
    for ax, (key, title) in zip(axes, DP_COMPONENTS):
        for technique, colour in palette.items():
            line = lines[lines["technique"] == technique]
            if not line.empty:
                (artist,) = ax.plot(line["n_d"], line[key] / MIB, color=colour, linewidth=1.4, alpha=0.8,
                                    label=f"{technique} (formula)")
                artist.set_gid(f"formula:{technique}")
            points = frame[(frame["technique"] == technique) & frame[f"measured_{key}"].notna()]
            if not points.empty:
                artist = ax.scatter(points["n_d"], points[f"measured_{key}"].astype(float) / MIB, color=colour,
                                    edgecolor="black", zorder=3, s=36, label=f"{technique} (measured)")
                artist.set_gid(f"measured:{technique}")
        ax.set_xscale("log", base=2)
        ax.set_title(title)
        ax.set_xlabel("data-parallel ranks N_d (log2)")
        ax.set_ylabel("MiB per rank")
    handles, labels = axes[-1].get_legend_handles_labels()
    if handles:
        axes[-1].legend(handles, labels, fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.suptitle("Per-rank model states vs world size: measured (points) and ZeRO formula (lines; "
                    "Rajbhandari et al. 2020)")
    return figure


def plot_scaling_efficiency(table: pd.DataFrame) -> Figure:
    """Tokens/s per rank at N ranks ÷ 1 rank per technique, with the interval of
    :func:`scaling_efficiency`; oversubscribed CPU runs hollow and annotated."""
    palette = _technique_palette(table["technique"])
    figure = new_figure(9.0, 5.4)
    with sns.axes_style("whitegrid"):
        ax = figure.subplots()
    for technique, colour in palette.items():
        rows = table[(table["technique"] == technique) & table["efficiency"].notna()].sort_values("n_d")
        if rows.empty:
            continue
        (line,) = ax.plot(rows["n_d"], rows["efficiency"], color=colour, label=technique, marker=None)
        line.set_gid(f"efficiency:{technique}")
        over = rows["oversubscribed"].fillna(False).astype(bool).to_numpy()
        ax.errorbar(rows["n_d"], rows["efficiency"],
                    yerr=np.abs(np.vstack([rows["efficiency"] - rows["lo"], rows["hi"] - rows["efficiency"]])),
                    fmt="none", ecolor=colour, capsize=3)
        ax.scatter(rows["n_d"][~over], rows["efficiency"][~over], color=colour, zorder=3)
        ax.scatter(rows["n_d"][over], rows["efficiency"][over], facecolor="none", edgecolor=colour, zorder=3)
        for n, eff in zip(rows["n_d"][over], rows["efficiency"][over]):
            ax.annotate("oversubscribed", (n, eff), xytext=(4, 4), textcoords="offset points", fontsize="x-small",
                        color="0.35")
    ax.axhline(1.0, color="0.3", linestyle="--", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("data-parallel ranks N (log2)")
    ax.set_ylabel("tokens/s per rank ÷ 1 rank")
    ax.set_title("Scaling efficiency (hollow: oversubscribed CPU run)", fontsize="medium")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    # Under the axes, inside the tight layout (a figure.text would overlap the x label).
    ax.annotate(textwrap.fill(SCALING_NOTE, 130), (0, 0), xycoords="axes fraction", xytext=(0, -42),
                textcoords="offset points", va="top", fontsize="x-small", color="0.35")
    return figure


def plot_comm_volume(table: pd.DataFrame) -> Figure:
    """Measured communication bytes per rank per step (bars) with the formula in the paper's
    convention (black |), the ring convention (red x) and the collective payloads (blue o)."""
    labels = [f"{t} · N={n}" for t, n in zip(table["technique"], table["n_d"])]
    figure = new_figure(11.0, 1.8 + 0.45 * max(len(table), 1))
    with sns.axes_style("whitegrid"):
        ax = figure.subplots()
    y = np.arange(len(table))
    bars = ax.barh(y, table["comm_measured"] / MIB, color="#8da0cb", label="measured")
    ax.bar_label(bars, labels=[f"{r:.2f}× paper" if r == r else "" for r in table["ratio_paper"]], padding=3,
                 fontsize="small")
    ax.scatter(table["comm_paper"] / MIB, y, marker="|", s=400, color="black", zorder=3,
               label="formula, paper (2Ψ / 3Ψ)")
    ax.scatter(table["comm_ring"] / MIB, y, marker="x", s=60, color="#c44e52", zorder=3,
               label="formula × (N−1)/N (ring)")
    ax.scatter(table["comm_payload"] / MIB, y, marker="o", s=30, facecolor="none", edgecolor="#4c72b0", zorder=3,
               label="collective payloads (all-reduce once)")
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.margins(x=0.25)
    ax.set_xlabel("MiB per rank per step")
    ax.set_title("Communication volume: measured vs ZeRO §7 formula")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return figure


def plot_bus_bandwidth(bw: pd.DataFrame) -> Figure:
    """Bus bandwidth vs message size (log-log), one panel per world size, one line per scheme
    (nccl-tests' definitions; a parameter server's root link saturates as N grows)."""
    sizes = sorted(bw["world_size"].unique())
    figure = new_figure(5.5 * max(len(sizes), 1), 4.4)
    with sns.axes_style("whitegrid"):
        axes = figure.subplots(1, max(len(sizes), 1), squeeze=False).ravel()
    palette = _technique_palette(bw["scheme"])
    for ax, n in zip(axes, sizes):
        for scheme, colour in palette.items():
            rows = bw[(bw["world_size"] == n) & (bw["scheme"] == scheme)].sort_values("bytes")
            column = "busbw" if rows["busbw"].notna().any() else "algbw"
            rows = rows[rows[column].notna()]
            if rows.empty:
                continue
            (line,) = ax.plot(rows["bytes"], rows[column] / 1e9, marker="o", color=colour,
                              label=scheme + ("" if column == "busbw" else " (algbw)"))
            line.set_gid(f"busbw:{n}:{scheme}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{n} ranks")
        ax.set_xlabel("message size (bytes, log2)")
        ax.set_ylabel("bus bandwidth (GB/s)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    figure.suptitle("Collective bandwidth vs message size\n(algbw = bytes/time; all-reduce busbw = algbw·2(n−1)/n)",
                    fontsize="medium")
    return figure


def data_parallel_markdown(frame: pd.DataFrame, scaling: pd.DataFrame, comm: pd.DataFrame,
                           memory: pd.DataFrame) -> str:
    """The summary.md section: measured vs formula model states per run, scaling efficiency,
    communication volume, and the big-model memory table; empty without data-parallel data."""
    from ..measure import model_states as ms

    if frame.empty and comm.empty and memory.empty:
        return ""
    parts = ["", "## Data-parallel and sharded training", ""]
    if not frame.empty:
        table = pd.DataFrame({
            "technique": frame["technique"], "stage": frame["stage_name"], "N_d": frame["n_d"],
            **{f"{name} MiB (measured / formula)": [
                "n/a" if m is None or m != m else f"{m / MIB:,.3f} / " + ("n/a" if f is None or f != f else f"{f / MIB:,.3f}")
                for m, f in zip(frame[f"measured_{key}"], frame[f"formula_{key}"])] for key, name in DP_COMPONENTS},
            "ratio": frame["ratio_total"],
            "oversubscribed": frame["oversubscribed"],
        })
        parts += [f"Per-rank model states against the ZeRO formulas ({ms.SOURCE}; tolerance {ms.TOLERANCE:.0%}):", "",
                  markdown_table(table, {"N_d": "{:.0f}", "ratio": "{:.4f}"})]
    if not scaling.empty:
        parts += ["Scaling efficiency: " + SCALING_NOTE + ".", "",
                  markdown_table(scaling, {"n_d": "{:.0f}", "tokens_per_rank": "{:,.0f}", "efficiency": "{:.3f}",
                                           "lo": "{:.3f}", "hi": "{:.3f}"})]
    if not comm.empty:
        parts += ["Communication per rank per step vs ZeRO §7 (paper: 2Ψ/3Ψ elements in bytes; ring: × (N−1)/N; "
                  "payload: tensor sizes handed to the collectives):", "",
                  markdown_table(comm, {c: "{:,.0f}" for c in ("n_d", "psi", "comm_measured", "comm_paper", "comm_ring",
                                                               "comm_payload")}
                                 | {c: "{:.3f}" for c in ("ratio_paper", "ratio_ring", "ratio_payload")})]
    if not memory.empty:
        parts += ["Model-state memory of big zoo models (Ψ counted on the meta device):", "",
                  ms.memory_table_markdown(memory.to_dict("records"))]
    return "\n".join(parts) + "\n"


def write_data_parallel(runs: pd.DataFrame, comm_records: Sequence[dict], out_dir: Path) -> tuple[list[Path], str]:
    """Write the data-parallel plots and tables (:data:`DATA_PARALLEL_FILES`) for the runs with a
    ``model_states`` block and the ``etbench comm`` records; returns the written paths and the
    summary.md section (nothing when there are neither)."""
    frame = data_parallel_frame(runs)
    bw = comm_bandwidth_frame(comm_records)
    if frame.empty and bw.empty:
        return [], ""
    out_dir, names, written = Path(out_dir), DATA_PARALLEL_FILES, []
    scaling, comm = scaling_efficiency(frame), comm_volume_table(frame)
    memory = data_parallel_memory_table()
    if not frame.empty:
        lines = model_states_lines(frame)
        written += [write_text(out_dir / f"{names['model_states']}.csv", frame.to_csv(index=False)),
                    save_figure(out_dir / f"{names['model_states']}.png", plot_model_states(frame, lines))]
        if scaling["efficiency"].notna().any():
            written += [write_text(out_dir / f"{names['scaling']}.csv", scaling.to_csv(index=False)),
                        save_figure(out_dir / f"{names['scaling']}.png", plot_scaling_efficiency(scaling))]
        if not comm.empty:
            written += [write_text(out_dir / f"{names['comm']}.csv", comm.to_csv(index=False)),
                        save_figure(out_dir / f"{names['comm']}.png", plot_comm_volume(comm))]
    if not bw.empty:
        written += [write_text(out_dir / f"{names['busbw']}.csv", bw.to_csv(index=False)),
                    save_figure(out_dir / f"{names['busbw']}.png", plot_bus_bandwidth(bw))]
    written.append(write_text(out_dir / f"{names['memory']}.csv", memory.to_csv(index=False)))
    return written, data_parallel_markdown(frame, scaling, comm, memory)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def save_figure(destination: Path, figure: Figure) -> Path:
    with atomic_path(destination) as temporary:
        figure.savefig(temporary, format="png", dpi=DPI)
    return destination


#: Name prefix of the hidden folder inside an output folder where a command's outputs are written
#: before they are moved into place together (:func:`staged_outputs`).
STAGING_PREFIX = ".staging."


class StagedOutputs:
    """The outputs of one command, written into ``folder`` (hidden, inside the output folder)
    and moved into the output folder by :func:`staged_outputs` once every one of them is written.
    ``add`` the path of each file written under ``folder``; ``written`` holds their final paths."""

    def __init__(self, out_dir: Path, folder: Path):
        self.out_dir, self.folder = out_dir, folder
        self.staged: list[Path] = []
        self.written: list[Path] = []

    def add(self, *paths: Path) -> None:
        self.staged += [Path(p) for p in paths]


def _pid_running(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_stages(out_dir: Path) -> None:
    """Staging folders of a command killed before it finished (its pid is gone)."""
    import re
    import shutil

    for entry in out_dir.iterdir():
        m = re.match(re.escape(STAGING_PREFIX) + r"(\d+)\.", entry.name)
        if m and entry.is_dir() and not entry.is_symlink() and not _pid_running(int(m[1])):
            shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def staged_outputs(out_dir: Path) -> Iterator[StagedOutputs]:
    """All of a command's outputs or none: files are written into a hidden staging folder inside
    ``out_dir`` and moved into place (one atomic rename each) only after the block has written
    every one of them.  A block that fails -- a record found unusable late, a full disk, a bug --
    leaves ``out_dir`` as it was (no partial report beside the previous one's files, which stay
    intact) and removes the folders this call created.  A staging folder left by a killed command
    is removed by the next one."""
    import errno
    import os
    import shutil
    import tempfile

    out_dir = Path(out_dir)
    created, probe = [], out_dir
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        created.append(probe)
        probe = probe.parent

    def remove_created() -> None:
        for folder in created:  # innermost first; one that is not empty stays
            try:
                folder.rmdir()
            except OSError:
                break

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_stages(out_dir)
        stage = StagedOutputs(out_dir, Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}.", dir=out_dir)))
    except OSError as e:
        remove_created()
        raise WriteError(out_dir, e) from None
    try:
        yield stage
        names = [staged.relative_to(stage.folder) for staged in stage.staged]
        twice = sorted({str(n) for n in names if names.count(n) > 1})
        if twice:  # two outputs of one name: one would replace the other (a bug), found before any move
            raise WriteError(out_dir / twice[0], FileExistsError(errno.EEXIST, f"{len(twice)} output name(s) written "
                                                                           f"twice; none moved into place"))
        moves = []
        for staged in stage.staged:
            final = out_dir / staged.relative_to(stage.folder)
            target = Path(os.path.realpath(final)) if final.is_symlink() else final  # links written through
            if target.exists() and not target.is_file():
                raise WriteError(final, IsADirectoryError(errno.EISDIR, "is a directory, not a file"))
            moves.append((staged, target, final))
        for staged, target, final in moves:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, target)
            except OSError as e:
                raise WriteError(final, e) from None
            stage.written.append(final)
    except BaseException:
        shutil.rmtree(stage.folder, ignore_errors=True)
        remove_created()
        raise
    shutil.rmtree(stage.folder, ignore_errors=True)


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
    """:func:`write_report`'s files, written into ``out_dir`` (its staging folder); ``peak_dir``
    is the real output folder, where ``make bench`` leaves ``peak.json``."""
    runs = loaded.runs
    table = summary_table(runs)
    markdown = markdown_table(table) + refused_markdown(loaded.refused)
    markdown += "".join("\n" + interleaved_markdown(record) for record in loaded.interleaved)
    markdown += overhead_markdown(loaded.extra)
    parallel_runs = pd.concat([runs, interleaved_parallel_runs(loaded.interleaved)], ignore_index=True)
    data_parallel_written, data_parallel_section = write_data_parallel(parallel_runs, loaded.comm, out_dir)
    markdown += data_parallel_section
    from .model_parallel import write_model_parallel

    model_parallel_written, model_parallel_section = write_model_parallel(loaded.interleaved, out_dir)
    markdown += model_parallel_section
    from .compression import write_compression

    compression_written, compression_section = write_compression(runs, loaded.interleaved, loaded.storage, out_dir)
    markdown += compression_section
    from .tokens import write_tokens

    tokens_written, tokens_section = write_tokens(runs, loaded.interleaved, out_dir)
    markdown += tokens_section
    written = [write_text(out_dir / "summary.csv", table.to_csv(index=False)),
               write_text(out_dir / "summary.md", markdown + peak_log_markdown(peak_dir)),
               *data_parallel_written, *model_parallel_written, *compression_written, *tokens_written]
    # One set of plots per benchmark family: dozens of runs in one axes would be unreadable.
    families = list(dict.fromkeys(runs["family"]))
    multi = len(set(families) | {r["family"] for r in loaded.interleaved}) > 1
    jobs = [(_family_files, (runs[runs["family"] == family].reset_index(drop=True),
                             [r for r in loaded.interleaved if r["family"] == family], out_dir,
                             f"-{family}" if multi else ""))
            for family in families]
    jobs += [(_interleaved_files, (record, out_dir)) for record in loaded.interleaved]
    for paths in _run_jobs(jobs):
        written += paths
    return written


def _family_files(group: pd.DataFrame, interleaved: list[dict], out_dir: Path, suffix: str) -> list[Path]:
    """One family's loss-vs-FLOPs, throughput/memory and (with a baseline) technique comparison."""
    written = [save_figure(out_dir / f"loss_vs_flops{suffix}.png", plot_loss_vs_flops(group)),
               save_figure(out_dir / f"throughput_memory{suffix}.png", plot_throughput_memory(group))]
    comparison = technique_comparison(group, interleaved)
    if len(comparison) > 1:
        written += [write_text(out_dir / f"technique_comparison{suffix}.csv", comparison.to_csv(index=False)),
                    save_figure(out_dir / f"technique_comparison{suffix}.png", plot_technique_comparison(comparison))]
    return written


def _interleaved_files(record: dict, out_dir: Path) -> list[Path]:
    name = interleaved_name(record)
    return [write_text(out_dir / f"{name}.csv", interleaved_table(record).to_csv(index=False)),
            save_figure(out_dir / f"{name}.png", plot_interleaved(record))]


def _run_jobs(jobs: list[tuple]) -> list[list[Path]]:
    """``[fn(*args) for fn, args in jobs]``, on the machine's cores: laying out and rasterising the
    per-family figures is most of a report's time, and each job writes its own files (atomically).
    Forked workers (this process has run no torch kernel, so no thread pool is copied mid-use);
    results come back in the jobs' order.  One core, or ``ETBENCH_REPORT_WORKERS=1``: in process."""
    import os

    workers = min(len(jobs), int(os.environ.get("ETBENCH_REPORT_WORKERS", os.cpu_count() or 1)))
    if workers <= 1 or sys.platform == "win32":
        return [fn(*args) for fn, args in jobs]
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(fn, *args) for fn, args in jobs]
        return [future.result() for future in futures]


def peak_log_markdown(out_dir: Path) -> str:
    """The peak FLOP/s probed at the start and end of the benchmark run (``peak.json``, written
    by ``make bench``), as a paragraph under the table; empty when there is no log."""
    try:
        log = json.loads((Path(out_dir) / "peak.json").read_text())
    except (OSError, ValueError):
        return ""
    lines = ["", "Peak FLOP/s probed around the benchmark run (MFU divides by the best probe kept, "
             "never by a lower one taken under load):", ""]
    for phase in ("start", "end"):
        if phase in log:
            p = log[phase]
            peaks = ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in p["peaks"].items())
            kept = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in p.get("kept", {}).items())
            lines.append(f"- {phase} ({p['time']}, 1-min load {p['load1']}): {peaks}"
                         + (f" (denominator kept: {kept} GFLOP/s)" if kept else ""))
    if "drift" in log:
        drift = ", ".join(f"{k} {v:+.1%}" for k, v in log["drift"].items())
        lines.append(f"- drift {drift}: **{'noisy' if log['noisy'] else 'quiet'}** ({log['rule']})")
    return "\n".join(lines) + "\n"


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

