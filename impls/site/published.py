"""Other machines' results on the site: the publications under ``results/published/`` (written by
:mod:`impls.publish`) beside the local run.

:func:`build` gives the front page a section listing this machine and each published one with its
provenance (devices, torch, commits, profile, peak probes, load, the command that published it,
a link to its ``PROVENANCE.json``) and writes ``published.html``: for every interleaved
comparison (``compare-*.json``) the speed-up of each variant on every machine side by side, each
with its 95% interval (the local newest run first, then each publication), and which cells are
faster/slower (interval excluding 1).  An absent root gives no section and no page.
"""
from __future__ import annotations

import html
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .. import publish, report
from ..files import write_bytes, write_text

#: The site's folder for copies of the publications' provenance, and the compare page.
HTML_SUBDIR = "published"
PAGE = "published.html"
SECTION_ID = "published"


@dataclass
class Machine:
    """One column of the compare view: the local run or a publication."""

    name: str
    provenance: dict
    interleaved: dict[str, dict] = field(default_factory=dict)  # comparison name -> record
    runs: int = 0
    refused: int = 0
    local: bool = False
    provenance_href: str | None = None
    error: str | None = None  # a publication that cannot be read: listed with the reason, no column


@dataclass
class Published:
    """What the front page gets: its section, its nav link, a line for the build's summary."""

    section: str
    nav: str
    summary: str


def _esc(text) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _load(runs_dir: Path) -> report.Loaded:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", report.RecordWarning)
        return report.load_all([runs_dir])


def _by_name(interleaved: list[dict]) -> dict[str, dict]:
    """Comparison name (:func:`report.interleaved_name`) -> record; with several of one name (a
    publication of several commits), the last in path order."""
    named: dict[str, dict] = {}
    for record in sorted(interleaved, key=lambda r: str(r.get("source"))):
        named[report.interleaved_name(record)] = record
    return named


def read_publications(root: Path) -> list[Machine]:
    """Every folder of ``root`` holding a :data:`publish.PROVENANCE_NAME`, by name; hidden
    folders (a publication being written) are ignored, a folder without readable provenance is
    listed with its error."""
    machines = []
    root = Path(root)
    if not root.is_dir():
        return machines
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        prov = publish.read_json(folder / publish.PROVENANCE_NAME)
        if not isinstance(prov, dict):
            machines.append(Machine(folder.name, {}, error=f"no readable {publish.PROVENANCE_NAME}"))
            continue
        loaded = _load(folder / publish.RUNS_SUBDIR) if (folder / publish.RUNS_SUBDIR).is_dir() else None
        if loaded is None or not loaded.holds_records():
            machines.append(Machine(folder.name, prov, error=f"no records under {publish.RUNS_SUBDIR}/"))
            continue
        machines.append(Machine(folder.name, prov, _by_name(loaded.interleaved), len(loaded.runs), len(loaded.refused)))
    return machines


def local_machine(commit: str, runs_dir: Path, loaded: report.Loaded, plots_dir: Path | None) -> Machine:
    """The local newest run as a column: its provenance summarised from its records as
    :mod:`impls.publish` would."""
    documents = {}
    for path in sorted(Path(runs_dir).rglob("*.json")):
        if path.is_file() and not any(p.startswith(".") for p in path.relative_to(runs_dir).parts):
            documents[path.relative_to(runs_dir).as_posix()] = publish.read_json(path)
    prov = publish.summarize(documents)
    peak = publish.read_json(Path(plots_dir) / "peak.json") if plots_dir is not None else None
    prov.update(machine=f"local ({commit})", date=None, profile=None, peak=peak, command=None,
                records=len(loaded.runs) + len(loaded.refused) + len(loaded.interleaved))
    return Machine(f"local ({commit})", prov, _by_name(loaded.interleaved), len(loaded.runs), len(loaded.refused),
                   local=True)


# ------------------------------------------------------------------------------------------
# Provenance table
# ------------------------------------------------------------------------------------------

def _flops(value) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "?"
    return f"{value / 1e12:.1f} TFLOP/s" if value >= 1e12 else f"{value / 1e9:.1f} GFLOP/s"


def peak_text(peak) -> str:
    """The peak probes of a ``peak.json`` log in a few words: each dtype's probe (at the end of the
    run, else its start) and whether the probes were noisy."""
    if not isinstance(peak, dict):
        return "not published"
    phase = next((peak[k] for k in ("end", "start") if isinstance(peak.get(k), dict)), {})
    peaks = phase.get("peaks") if isinstance(phase.get("peaks"), dict) else {}
    text = ", ".join(f"{dtype} {_flops(v)}" for dtype, v in peaks.items()) or "no probe"
    if "noisy" in peak:
        text += " (noisy)" if peak["noisy"] else " (quiet)"
    return text


def devices_text(prov: dict) -> str:
    devices = prov.get("devices") if isinstance(prov.get("devices"), list) else []
    text = ", ".join(f"{d.get('type')}: {d.get('name')}" for d in devices if isinstance(d, dict)) or "not recorded"
    return text


def load_text(prov: dict) -> str:
    load = prov.get("load") if isinstance(prov.get("load"), dict) else {}
    if not load.get("records_with_load"):
        return "not recorded"
    text = f"{load.get('noisy', 0)} of {load['records_with_load']} records noisy"
    if isinstance(load.get("load1_max"), (int, float)):
        text += f"; 1-min load up to {load['load1_max']:.2f}"
    return text


def _list(value) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "not recorded"
    return "not recorded" if value is None else str(value)


def provenance_table(machines: list[Machine]) -> str:
    rows, classes = [], []
    for m in machines:
        prov = m.provenance
        name = _esc(m.name) + (" <b>(this site's run)</b>" if m.local else "")
        if m.provenance_href:
            name += f' · <a href="{_esc(m.provenance_href)}">{_esc(publish.PROVENANCE_NAME)}</a>'
        if m.error:
            rows.append({"machine": name, "status": f"not shown: {m.error}"})
            classes.append("refused")
            continue
        commits = prov.get("commits") if isinstance(prov.get("commits"), list) else []
        rows.append({
            "machine": name, "date": prov.get("date") or ("this build" if m.local else None),
            "devices": devices_text(prov), "ranks": prov.get("device_count"),
            "torch": _list(prov.get("torch")),
            "commits": ", ".join(str(c)[:12] for c in commits) + (" (dirty)" if prov.get("git_dirty") else "")
                       or "not recorded",
            "profile": prov.get("profile") or "not stated",
            "peak probes": peak_text(prov.get("peak")),
            "load": load_text(prov),
            "runs": m.runs, "refused": m.refused, "comparisons": len(m.interleaved),
            "command": prov.get("command") or ("make bench" if m.local else "not recorded"),
            "status": "ok",
        })
        classes.append("")
    columns = ["machine", "date", "devices", "ranks", "torch", "commits", "profile", "peak probes", "load", "runs",
               "refused", "comparisons", "command", "status"]
    return '<div class="scroll">' + report.html_table(
        rows, columns, formats={"ranks": "{:.0f}", "runs": "{:.0f}", "refused": "{:.0f}", "comparisons": "{:.0f}"},
        text_columns=("machine", "date", "devices", "torch", "commits", "profile", "peak probes", "load", "command",
                      "status"),
        raw_html=("machine",), row_class=classes, table_id="published-machines") + "</div>"


# ------------------------------------------------------------------------------------------
# Side-by-side speed-ups
# ------------------------------------------------------------------------------------------

def _interval(stat) -> tuple[float | None, float | None, float | None]:
    """(estimate, low, high) of a ``speedup`` statistic: ``value`` (older records: geomean or
    median) and ``ci95``; Nones where missing."""
    if not isinstance(stat, dict):
        return None, None, None
    point = next((stat[k] for k in ("value", "geomean", "median")
                  if isinstance(stat.get(k), (int, float)) and not isinstance(stat.get(k), bool)), None)
    ci = stat.get("ci95")
    if isinstance(ci, list) and len(ci) == 2 and all(isinstance(c, (int, float)) for c in ci):
        return point, float(ci[0]), float(ci[1])
    return point, None, None


def speedup_cell(record: dict | None, variant: str) -> tuple[str, float | None, str]:
    """(text "1.500 [1.400, 1.600]", estimate, verdict class) of one variant on one machine."""
    if record is None:
        return "not measured", None, ""
    v = (record.get("variants") or {}).get(variant)
    if v is None:
        return "not in this comparison", None, ""
    point, lo, hi = _interval(v.get("speedup"))
    if point is None:
        return "n/a", None, ""
    if lo is None:
        return f"{point:.3f} (no interval)", point, ""
    verdict = "" if variant == record.get("baseline") else "faster" if lo > 1 else "slower" if hi < 1 else ""
    return f"{point:.3f} [{lo:.3f}, {hi:.3f}]", point, verdict


def column_name(machine: Machine) -> str:
    return f"{machine.name} speed-up [95% CI]"


def comparison_block(name: str, machines: list[Machine]) -> str:
    records = {m.name: m.interleaved.get(name) for m in machines}
    present = [r for r in records.values() if r is not None]
    baseline = present[0].get("baseline")
    variants = sorted({v for r in present for v in (r.get("variants") or {})}, key=lambda v: (v != baseline, v))
    rows, verdicts = [], []
    for variant in variants:
        label = next((r["variants"][variant].get("label") for r in present if variant in (r.get("variants") or {})), "")
        row, verdict = {"variant": variant, "label": label}, {}
        for m in machines:
            text, point, css = speedup_cell(records[m.name], variant)
            row[column_name(m)] = (text, point)
            verdict[column_name(m)] = css
        rows.append(row)
        verdicts.append(verdict)
    for row, verdict in zip(rows, verdicts):
        row["_verdict"] = verdict
    columns = ["variant", "label", *(column_name(m) for m in machines)]
    table = report.html_table(
        rows, columns, text_columns=columns,
        cell_class={c: (lambda row, c=c: row["_verdict"][c]) for c in columns[2:]},
        table_id=f"published-{name}")
    notes = []
    for m in machines:
        r = records[m.name]
        if r is None:
            notes.append(f"<li><b>{_esc(m.name)}</b>: not measured</li>")
            continue
        device = r.get("device") if isinstance(r.get("device"), dict) else {}
        load = r.get("load") if isinstance(r.get("load"), dict) else {}
        badge = '<span class="badge noisy">noisy</span>' if load.get("noisy") else '<span class="badge quiet">quiet</span>'
        notes.append(f"<li><b>{_esc(m.name)}</b>: {_esc(device.get('type'))}: {_esc(device.get('name'))}, "
                     f"{_esc(r.get('world_size'))} rank(s), {_esc(r.get('rounds'))} rounds × "
                     f"{_esc(r.get('steps_per_round'))} steps, commit {_esc(str(r.get('git_commit') or '?')[:12])} "
                     f"{badge}</li>")
    return (f'<h3 id="{_esc(name)}">{_esc(name[len("interleaved-"):])} vs {_esc(baseline)}</h3>'
            f'<ul class="note">{"".join(notes)}</ul><div class="scroll">{table}</div>')


def comparison_names(machines: list[Machine]) -> list[str]:
    return sorted({n for m in machines if not m.error for n in m.interleaved})


PAGE_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0; color: #1d2330; background: #fff; }
header { background: #1f3a5f; color: #fff; padding: 14px 28px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header a { color: #cfe3ff; }
header .meta { font-size: 13px; opacity: .9; }
main { padding: 8px 28px 40px; }
h2 { font-size: 20px; margin: 10px 0 4px; }
h3 { font-size: 15px; margin: 16px 0 4px; color: #34405a; }
.note { font-size: 13px; color: #4a5568; }
.scroll { overflow-x: auto; max-width: 100%; }
.badge { display: inline-block; padding: 1px 7px; border-radius: 9px; font-size: 12px; font-weight: 600; }
.badge.noisy { background: #ffe8a3; color: #6b4e00; }
.badge.quiet { background: #d8f3dc; color: #1b5e20; }
span.faster { color: #1b7a3a; font-weight: bold; }
span.slower { color: #b3261e; font-weight: bold; }
"""

_EXPLAIN = ("Speed-ups are the interleaved comparisons' (<code>compare-*.json</code>): per round the variant's "
            "tokens/s over the baseline's of the same round, the median over rounds with its distribution-free "
            "95% interval. A cell is <span class=\"faster\">faster</span>/<span class=\"slower\">slower</span> "
            "only where its interval excludes 1. Ratios are within one machine; the machines' absolute speeds "
            "are never compared.")


def compare_page(machines: list[Machine]) -> str:
    shown = [m for m in machines if not m.error]
    names = comparison_names(shown)
    blocks = "".join(comparison_block(n, shown) for n in names) or "<p class=\"note\">No machine has an interleaved comparison.</p>"
    toc = " · ".join(f'<a href="#{_esc(n)}">{_esc(n[len("interleaved-"):])}</a>' for n in names)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>etbench: speed-ups on every machine</title>
<style>{PAGE_CSS}{report.TABLE_CSS}</style>
</head><body>
<header><h1>etbench: speed-ups on every machine</h1>
<div class="meta"><a href="index.html">← etbench results</a> · {len(shown)} machines · {len(names)} comparisons</div></header>
<main>
<h2>Machines</h2>
{provenance_table(machines)}
<h2>Speed-ups side by side</h2>
<p class="note">{_EXPLAIN}</p>
<p class="note">{toc}</p>
{blocks}
</main>
<script>{report.SORTABLE_JS}</script>
</body></html>
"""


def build(html_dir: Path, published_root: Path | None, *, commit: str, runs_dir: Path, loaded: report.Loaded,
          plots_dir: Path | None = None) -> Published | None:
    """The front page's section on published machines and ``published.html``; None (and no page)
    where ``published_root`` is None or holds no publication."""
    if published_root is None:
        return None
    publications = read_publications(Path(published_root))
    if not publications:
        return None
    html_dir = Path(html_dir)
    for m in publications:
        source = Path(published_root) / m.name / publish.PROVENANCE_NAME
        if source.is_file():
            m.provenance_href = f"{HTML_SUBDIR}/{m.name}/{publish.PROVENANCE_NAME}"
            write_bytes(html_dir / m.provenance_href, source.read_bytes())
    machines = [local_machine(commit, runs_dir, loaded, plots_dir), *publications]
    write_text(html_dir / PAGE, compare_page(machines))
    readable = [m for m in publications if not m.error]
    names = comparison_names(machines)
    shared = [n for n in names if sum(1 for m in machines if n in m.interleaved) > 1]
    section = (f'<section class="family" id="{SECTION_ID}"><h2>Other machines</h2>'
               f'<p class="note">{len(readable)} published machine(s) from <code>{_esc(published_root)}</code> '
               f"(<code>python -m impls.publish</code>) beside this run; "
               f'<a href="{PAGE}">speed-ups side by side</a> for {len(names)} comparisons '
               f"({len(shared)} measured on more than one machine).</p>"
               + provenance_table(machines) + "</section>")
    summary = (f"{PAGE}: {len(readable)} published machines beside {commit}, {len(names)} comparisons "
               f"({len(shared)} on several machines)"
               + (f"; {len(publications) - len(readable)} unreadable" if len(readable) < len(publications) else ""))
    return Published(section, f'<a href="#{SECTION_ID}">other machines</a>', summary)
