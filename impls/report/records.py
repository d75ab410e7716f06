"""The record schema every reader shares: what a usable record holds, its kinds, and how a set of
paths is loaded and routed (:func:`load_all`, :class:`Loaded`).

Every record is validated up front by one check per kind (:func:`validate_record` for training
runs, :func:`validate_interleaved`, :func:`validate_overhead`, :func:`validate_comm`,
:func:`validate_storage`), through :func:`load_all`, for the report, ``--compare``, the site and
``publish`` alike: a file that is no usable record (not JSON, truncated, no ``recipe``...) is
skipped with a warning naming it and why, instead of failing halfway through a plot.  Records
whose consistency check failed (e.g. MFU above 100%), and runs that diverged (a ``status`` other
than ``ok``), are refused: routed apart, with the reasons, never plotted as results.

The kind strings are :mod:`impls.families`' (each writer uses the same constants); the schema
version is :data:`impls.provenance.SCHEMA_VERSION`.  This module imports nothing else of the report.
"""
from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from .. import families
from ..provenance import SCHEMA_VERSION  # the one definition, shared with the writers
from .values import estimate, first_number, is_number, lookup

MIB = 1 << 20
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

#: ``kind`` of the interleaved-comparison records (``<runs>/<family>/compare-<family>.json``);
#: training-run records have no ``kind``.
INTERLEAVED_KIND = families.INTERLEAVED
#: ``kind`` of the harness-overhead records (the training loop vs a bare loop, timed interleaved).
OVERHEAD_KIND = families.HARNESS_OVERHEAD
#: ``kind`` of the collective-bandwidth records written by ``etbench comm``.
COMM_KIND = families.COMM
#: Storage-format measurements: sparse weight formats, and compressed token shards.
STORAGE_KINDS = (families.SPARSE_STORAGE, families.DATA_COMPRESSION)
#: Cached at-scale artefacts, written by hand-run commands rather than ``make bench``
#: (``results/atscale/``): dry-run sweeps and the planner's step-time calibration.
ATSCALE_KINDS = (families.DRYRUN_SWEEP, families.PLAN_CALIBRATION)
_INTERLEAVED_STATS = ("seconds_per_step", "tokens_per_second", "speedup")


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
# Validation, one check per kind
# --------------------------------------------------------------------------------------------

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
        value = lookup(record, key)
        if not isinstance(value, str) or not value:
            raise RecordError(f"{key!r} is missing or not a non-empty string")
    techniques = record["recipe"].get("techniques")
    if not isinstance(techniques, list) or not all(isinstance(t, str) for t in techniques):
        raise RecordError(f"'recipe.techniques' is {techniques!r}, expected a list of technique names")
    for key in _TEXT_FIELDS:
        value = lookup(record, key)
        if value is not None and not isinstance(value, str):
            raise RecordError(f"{key!r} is {value!r}, expected a string or null")
    for key in _NUMERIC_FIELDS:
        value = lookup(record, key)
        if value is not None and not is_number(value):
            raise RecordError(f"{key!r} is {value!r}, expected a number or null")
    status = record.get("status", "ok")  # records written before the status existed finished
    if status != "ok":
        raise DivergedRecordError([f"run {status}: not a result"])
    errors = record_consistency_errors(record)
    if errors:
        raise InconsistentRecordError(errors)
    _validate_curve(record.get("curve"))


def _validate_curve(curve) -> None:
    if not isinstance(curve, list):
        raise RecordError("'curve' is missing or not a list")
    for i, point in enumerate(curve):
        if not isinstance(point, dict):
            raise RecordError(f"curve[{i}] is not an object")
        for key in _POINT_NUMERIC_FIELDS:
            value = point.get(key)
            required = key in ("step", "flops")
            if (value is None and required) or (value is not None and not is_number(value)):
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


def validate_overhead(record) -> None:
    """Raise :class:`RecordError` unless ``record`` is a usable harness-overhead record."""
    overhead = record.get("overhead") if isinstance(record, dict) else None
    if not isinstance(overhead, dict) or not is_number(overhead.get("value")):
        raise RecordError("'overhead.value' is missing or not a number")
    ci = overhead.get("ci95")
    if ci is not None and not (isinstance(ci, list) and len(ci) == 2 and all(map(is_number, ci))):
        raise RecordError(f"'overhead.ci95' is {ci!r}, expected [low, high]")


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
            if estimate(value) is None:
                raise RecordError(f"variants.{name}.{stat} has no number (value/geomean/median)")
            ci = value.get("ci95")
            if ci is not None and not (isinstance(ci, list) and len(ci) == 2 and all(map(is_number, ci))):
                raise RecordError(f"variants.{name}.{stat}.ci95 is {ci!r}, expected [low, high]")
        for group in ("memory", "memory_ratio"):
            for key, value in (variant.get(group) or {}).items():
                if value is not None and not is_number(value):
                    raise RecordError(f"variants.{name}.{group}.{key} is {value!r}, expected a number")


def validate_storage(record: dict) -> None:
    """A ``sparse_storage`` record (:mod:`impls.measure.sparse_storage`) or a ``data_compression``
    record (:mod:`impls.measure.data_throughput`) has what the plot and the table read; else
    :class:`RecordError` naming the missing part."""
    if record.get("kind") == families.DATA_COMPRESSION:
        try:
            for spec, data in record["datasets"].items():
                for row in data["formats"]:
                    row["format"], row["disk_bytes_per_token"], row["loader"]["tokens_per_s"]
                    row["loader_vs_step_need"]
            record["step_need"]["tokens_per_s"]
        except (KeyError, TypeError) as exc:
            raise RecordError(f"data_compression record lacks {exc}") from None
        return
    try:
        densities = record["densities"]
        patterns = record["bytes"]["patterns"]
        for pattern in patterns.values():
            for fmt, ratios in pattern["ratio_to_dense"].items():
                if len(ratios) != len(densities):
                    raise RecordError(f"bytes.{fmt}: {len(ratios)} values for {len(densities)} densities")
        speed = record["speed"]
        for fmt, stats in speed["time_ratio"].items():
            if len(stats) != len(speed["densities"]) or any("value" not in s for s in stats):
                raise RecordError(f"speed.time_ratio.{fmt} does not cover the speed densities")
        record["matrix"]["shape"]
    except (KeyError, TypeError) as exc:
        raise RecordError(f"sparse_storage record lacks {exc}") from None


def validate_atscale(record) -> None:
    """Raise :class:`RecordError` unless ``record`` is a usable ``dryrun-sweep`` or
    ``plan-calibration`` artefact: a ``rows`` list whose every entry names its model, world size
    and layout (a sweep's skipped rows too), the keys every table of them is keyed by."""
    rows = record.get("rows") if isinstance(record, dict) else None
    if not isinstance(rows, list):
        raise RecordError(f"{record.get('kind')} record: 'rows' is missing or not a list")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise RecordError(f"rows[{i}] is not an object")
        missing = [key for key in ("model", "world_size", "layout") if row.get(key) is None]
        if missing:
            raise RecordError(f"rows[{i}] lacks {', '.join(missing)}")
        if not is_number(row["world_size"]):
            raise RecordError(f"rows[{i}].world_size is {row['world_size']!r}, expected a number")


def validate_comm(record) -> None:
    """Raise :class:`RecordError` unless ``record`` is a usable ``etbench comm`` record: at least
    one point with a message size and a time or a bandwidth (see :func:`comm_rows`)."""
    if not isinstance(record, dict) or record.get("kind") != COMM_KIND:
        raise RecordError("not a comm record")
    if not list(comm_rows(record)):
        raise RecordError("comm record without a point of (bytes, seconds or bandwidth)")


# --------------------------------------------------------------------------------------------
# Collective-bandwidth records (kind "comm"): the layouts ``etbench comm`` has written
# --------------------------------------------------------------------------------------------

def _seconds(value):
    if isinstance(value, dict):
        return first_number(value.get("median"), value.get("value"), value.get("mean"))
    return first_number(value)


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


def comm_rows(record: dict) -> Iterator[dict]:
    """One row per (scheme, message size) of an ``etbench comm`` record: ``source``,
    ``world_size``, ``scheme``, ``bytes``, ``seconds``, ``algbw``, ``busbw`` (bytes/s).

    ``algbw`` = bytes / median seconds (nccl-tests' definition, bytes/s) where the time is given,
    else the record's ``algbw`` (taken as bytes/s).  ``busbw`` = algbw × the record's own
    busbw/algbw factor where it gives both, else × 2(n−1)/n for a ring all-reduce (``ring``,
    ``all_reduce``), else the record's ``busbw``; NaN when none applies.  Points without a size, a
    world size, or any of a time and a bandwidth are left out."""
    for scheme, point in _comm_points(record):
        if not isinstance(point, dict):
            continue
        size = first_number(point.get("bytes"), point.get("size"), point.get("message_bytes"),
                            point.get("size_bytes"))
        n = first_number(point.get("world_size"), record.get("world_size"))
        seconds = _seconds(point.get("seconds", point.get("time", point.get("time_s"))))
        # etbench comm's fields: medians of algbw_Bps, and link_Bps -- the busiest link's rate
        # (the bus bandwidth of a ring all-reduce, the root's link of the parameter server)
        given_alg = first_number(point.get("algbw"), _median_of(point.get("algbw_Bps")))
        given_bus = first_number(point.get("busbw"), _median_of(point.get("link_Bps")),
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
        yield {"source": record.get("source"), "world_size": int(n), "scheme": scheme, "bytes": size,
               "seconds": seconds, "algbw": algbw if algbw is not None else math.nan,
               "busbw": busbw if busbw is not None else math.nan}


# --------------------------------------------------------------------------------------------
# Loading and routing
# --------------------------------------------------------------------------------------------

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
    #: At-scale artefacts given as paths (kinds :data:`ATSCALE_KINDS`: dry-run sweeps, the
    #: planner's calibration), with ``source``/``family``; :mod:`impls.report.atscale` reads them.
    atscale: list[dict] = []

    def holds_records(self) -> bool:
        """Whether anything usable (or refused) was found: a side of ``--compare`` or the paths of a
        report that hold none of these are bad input."""
        return not self.runs.empty or any((self.refused, self.interleaved, self.extra, self.comm, self.storage,
                                           self.atscale))


#: kind -> (its check, the :class:`Loaded` list it is routed to).  Any other kind is checked as an
#: interleaved comparison (and so skipped as "not an interleaved-comparison record").
_ROUTES = {
    OVERHEAD_KIND: (validate_overhead, "extra"),
    COMM_KIND: (validate_comm, "comm"),
    **{kind: (validate_storage, "storage") for kind in STORAGE_KINDS},
    **{kind: (validate_atscale, "atscale") for kind in ATSCALE_KINDS},
}


def load_all(paths: Sequence[Path]) -> Loaded:
    """Load every record under ``paths`` (files, or directories searched recursively for
    ``*.json``) and route it: training runs, refused (inconsistent) runs, interleaved comparisons.

    Files that are none of these are skipped with a :class:`RecordWarning` naming the file.
    """
    records, sources, skipped = [], [], []
    routed: dict[str, list] = {"refused": [], "interleaved": [], "extra": [], "comm": [], "storage": [],
                               "atscale": []}

    def skip(path, reason: str) -> None:
        skipped.append({"source": str(path), "reason": reason})
        warnings.warn(f"skipping {path}: {reason}", RecordWarning, stacklevel=3)

    for path in _find_json_files(paths):
        try:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            skip(path, f"cannot read JSON: {exc}")
            continue
        folder = Path(path).parent.name
        kind = document.get("kind") if isinstance(document, dict) else None
        try:
            if kind is None:
                validate_record(document)
            elif isinstance(kind, str) and kind in _ROUTES:
                check, where = _ROUTES[kind]
                check(document)
                routed[where].append({**document, "source": str(path), "family": folder})
                continue
            else:
                validate_interleaved(document)
                routed["interleaved"].append({**document, "source": str(path),
                                              "family": document.get("family") or folder})
                continue
        except InconsistentRecordError as exc:
            routed["refused"].append({"family": folder, "label": document["label"],
                                      "source": str(path), "reasons": exc.reasons, "record": document})
            continue
        except RecordError as exc:
            skip(path, str(exc))
            continue
        records.append(document)
        sources.append(path)
    routed["interleaved"].sort(key=lambda r: (r["family"], r["source"]))
    routed["refused"].sort(key=lambda r: (r["family"], r["label"]))
    routed["comm"].sort(key=lambda r: r["source"])
    routed["atscale"].sort(key=lambda r: r["source"])
    return Loaded(records_frame(records, sources), skipped=skipped, **routed)


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


# --------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------

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
