"""Comparing two runs directories (two commits, or two machines): ``python -m impls.report
--compare RUNS_A RUNS_B -o OUT_DIR``.

Per record present on both sides (matched by family folder and file name): A's and B's s/step, the
ratio of medians B/A of the per-step times, and its 95% percentile-bootstrap interval
(:func:`bootstrap_ratio`: each side's ``step_time.samples`` resampled independently, the ratio of
the resampled medians taken each time).  A change (``faster``/``slower``) is claimed only where the
interval excludes 1; a record measured under load (noisy) needs re-measuring before a change is
believed.  Interleaved speed-ups of the two sides are set side by side too
(:func:`ratio_agreement`): their intervals overlap or they do not.

Both sides are validated as the report's paths are (:func:`load_compare_side`); a side that holds no
valid record is bad input, and a broken file on one side is listed as refused, not as a run "only
in" the other.
"""
from __future__ import annotations

import html
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..files import write_text
from .records import BadInputError, Loaded, NoRecordsError, RecordWarning, load_all
from .staging import staged_outputs
from .tables import SORTABLE_JS, TABLE_CSS, format_value, html_table, markdown_table, median_ci
from .values import estimate, is_number

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
    if not is_number(median) or median != median:
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
            if is_number(a["median"]) and is_number(b["median"]) and a["median"] > 0:
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
        a, b = estimate(sa), estimate(sb)
        (alo, ahi), (blo, bhi) = sa.get("ci95") or (math.nan, math.nan), sb.get("ci95") or (math.nan, math.nan)
        overlap = is_number(alo) and is_number(blo) and max(alo, blo) <= min(ahi, bhi)
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
    if not is_number(row["ratio B/A"]) or math.isnan(row["ratio B/A"]):
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


def compare_html(table: pd.DataFrame, name_a: str, name_b: str, *, head_extra: str = "",
                 nav: str = "") -> str:
    """A standalone page (no external resources) with the compare table, sortable."""
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
    summary = ", ".join(f"{n} {html.escape(k)}" for k, n in sorted(counts.items()))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>etbench compare: {html.escape(name_b)} vs {html.escape(name_a)}</title>
<style>body {{ font-family: system-ui, sans-serif; margin: 20px 32px; color: #222; }}{TABLE_CSS}</style>{head_extra}
</head><body>{nav}
<h1>Seconds per step: B = {html.escape(name_b)} vs A = {html.escape(name_a)}</h1>
<p>{html.escape(COMPARE_METHOD)}. A ratio above 1 means B is slower. A change is claimed only where the
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
