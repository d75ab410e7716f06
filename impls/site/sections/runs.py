"""The generic per-family sections of the front page (report section ``runs``): per family its
sortable run table (with refused records and their reasons), harness-overhead notes, interleaved
comparisons, and the charts of its runs."""
from __future__ import annotations

from pathlib import Path

from ... import families

from ..asv_links import AsvIndex, links_html
from ..page import Page, bool_value, esc, recipe_text
from ..specs import spec_interleaved, spec_loss_vs_flops, spec_technique_comparison, spec_throughput
from .base import Rendered, SectionContext, table_families


def family_table(group, refused: list[dict], asv: AsvIndex, family: str) -> str:
    from ... import report

    rows, classes = [], []
    for _, run in group.iterrows():
        stem = Path(run["source"]).stem if run.get("source") else ""
        href = asv.record_href(family, stem)
        median, ci = run.get("step_time.median"), run.get("step_time.ci95")
        noisy = bool_value(run.get("load.noisy"))
        rows.append({
            "run": f'<a href="{esc(href)}" title="asv history of this benchmark">{esc(run["run"])}</a>'
                   if href else esc(run["run"]),
            "techniques": recipe_text(run, "techniques"), "optimizer": recipe_text(run, "optimizer"),
            "model": recipe_text(run, "model"), "params": run.get("params"),
            "batch": run.get("recipe.batch_size"), "seq": run.get("recipe.seq_len"), "ranks": run.get("world_size"),
            "tokens/s": run.get("tokens_per_second"),
            "s/step median [95% CI]": (report.median_ci(median, ci) or report.format_value(run.get("seconds_per_step")),
                                       median if median == median and median is not None else run.get("seconds_per_step")),
            "load": {True: "noisy", False: "quiet", None: "n/a"}[noisy],
            "MFU": run.get("mfu"), "HFU": run.get("hfu"),
            "activations MiB": run.get("memory.activations_bytes", float("nan")) / report.MIB,
            "peak MiB": run.get("memory.peak_bytes", float("nan")) / report.MIB,
            "final val loss": run.get("final_val_loss"), "status": "ok",
        })
        classes.append("noisy" if noisy else "")
    for entry in refused:
        recipe = entry["record"].get("recipe") or {}
        rows.append({"run": esc(entry["label"]), "techniques": ", ".join(map(str, recipe.get("techniques") or [])) or "none",
                     "optimizer": recipe.get("optimizer"), "model": recipe.get("model"),
                     "status": "REFUSED (reason below)"})
        classes.append("refused")
    columns = ["run", "techniques", "optimizer", "model", "params", "batch", "seq", "ranks", "tokens/s",
               "s/step median [95% CI]", "load", "MFU", "HFU", "activations MiB", "peak MiB", "final val loss", "status"]
    return '<div class="scroll">' + report.html_table(
        rows, columns,
        formats={"params": "{:,.0f}", "batch": "{:.0f}", "seq": "{:.0f}", "ranks": "{:.0f}", "tokens/s": "{:,.0f}",
                 "MFU": "{:.1%}", "HFU": "{:.1%}", "activations MiB": "{:,.2f}", "peak MiB": "{:,.1f}",
                 "final val loss": "{:.4f}"},
        text_columns=("run", "techniques", "optimizer", "model", "s/step median [95% CI]", "load", "status"),
        raw_html=("run",), row_class=classes, table_id=f"table-{family}") + "</div>" + "".join(
        f'<p class="refused-reason"><span class="badge refused">refused</span> <b>{esc(e["label"])}</b> '
        f'(<code>{esc(Path(e["source"]).name)}</code>), not plotted: {esc("; ".join(e["reasons"]))}</p>'
        for e in refused)


def interleaved_block(record: dict, page: Page, png: str | None) -> str:
    from ... import report

    table = report.interleaved_table(record)
    load = record.get("load") or {}
    badge = ('<span class="badge noisy">noisy</span>' if load.get("noisy") else '<span class="badge quiet">quiet</span>')
    rows = []
    for _, r in table.iterrows():
        row = r.to_dict()
        row["speedup [95% CI]"] = (r["speedup [95% CI]"], r["speedup"])
        row["s/step [95% CI]"] = (r["s/step [95% CI]"], r["s/step"])
        row["tokens/s [95% CI]"] = (r["tokens/s [95% CI]"], r["tokens/s"])
        rows.append(row)
    ratio_columns = [f"{short} ratio" for short in report.MEMORY_COMPONENTS.values()]
    columns = ["variant", "label", "s/step [95% CI]", "tokens/s [95% CI]", "speedup [95% CI]", "verdict", *ratio_columns]
    html_table = report.html_table(
        rows, columns, formats={c: "{:.3f}" for c in ratio_columns},
        text_columns=("variant", "label", "s/step [95% CI]", "tokens/s [95% CI]", "speedup [95% CI]", "verdict"),
        cell_class={"verdict": lambda row: row["verdict"] if row["verdict"] in ("faster", "slower") else ""},
        table_id=report.interleaved_name(record))
    return (f"<h3>Interleaved comparison {esc(report.interleaved_name(record)[len('interleaved-'):])} "
            f"vs {esc(record['baseline'])} {badge}</h3>"
            f'<p class="note">{esc(record.get("rounds"))} rounds × {esc(record.get("steps_per_round"))} steps per variant '
            f"(after {esc(record.get('warmup_steps'))} warm-up steps), variants run interleaved so a burst of load hits "
            f"all alike; {esc(record.get('ci_method', ''))}. 1-min load {esc(load.get('load1_start'))} → "
            f"{esc(load.get('load1_end'))} on {esc(load.get('cores_in_use'))} cores in use. A variant is called "
            "faster/slower only where its interval excludes 1.</p>"
            + page.chart(spec_interleaved(record), png=png, caption="Hover a bar for the recipe and the intervals.")
            + f'<div class="scroll">{html_table}</div>')



def overhead_note(record: dict) -> str:
    """A harness-overhead record as one paragraph."""
    o = record["overhead"]
    ci = o.get("ci95") or [float("nan")] * 2
    return (f'<p class="note"><b>Harness overhead</b> of the training loop over a bare loop '
            f'({esc(record.get("label"))}, {esc(record.get("rounds"))} interleaved rounds): '
            f'<b>{o["value"]:+.2%}</b> [{ci[0]:+.2%}, {ci[1]:+.2%}]; {esc(record.get("ci_method", ""))}</p>')


def run_charts(ctx: SectionContext, family: str, group, png) -> str:
    """The charts of a family's runs: techniques vs the baseline, loss vs FLOPs per dataset,
    throughput and memory."""
    from ... import report

    charts = []
    comparison = report.technique_comparison(group, [r for r in ctx.loaded.interleaved if r["family"] == family])
    if len(comparison) > 1:
        charts.append(ctx.page.chart(spec_technique_comparison(comparison, group), png=png("technique_comparison"),
                                     caption="Speed: interleaved rounds (median, 95% CI), absent where the family has "
                                             "no interleaved timing; loss: runs to the same FLOP budget. Hover for the record."))
    for spec in spec_loss_vs_flops(group):
        charts.append(ctx.page.chart(spec, png=png("loss_vs_flops"),
                                     caption="Click a legend entry to highlight a run; hover a point for the record."))
    charts.append(ctx.page.chart(spec_throughput(group), png=png("throughput_memory"),
                                 caption="Hover a bar for the recipe, step-time CI, MFU/HFU and load flag."))
    return '<div class="charts">' + "".join(charts) + "</div>"


def heading_html(family: str) -> str:
    """A family's title (its folder name beside it) and the question it answers."""
    known = families.get(family)
    title = f'<h2>{esc(families.title(family))} <span class="family-name">{esc(family)}</span></h2>' if known \
        else f"<h2>{esc(family)}</h2>"
    return title + (f'<p class="question">{esc(known.question)}</p>' if known and known.question else "")


def family_html(ctx: SectionContext, family: str, multi: bool) -> str:
    """One family's section."""
    from ... import report

    loaded = ctx.loaded
    group = loaded.runs[loaded.runs["family"] == family].reset_index(drop=True)
    refused = [r for r in loaded.refused if r["family"] == family]

    def png(kind: str) -> str | None:
        return ctx.png(f"{kind}-{family}.png" if multi else f"{kind}.png")

    parts = [f'<section class="family" id="family-{esc(family)}">' + heading_html(family)]
    noisy = int(sum(1 for v in group.get("load.noisy", []) if bool_value(v)))
    parts.append(f'<p class="note">{len(group)} runs'
                 + (f', <span class="badge noisy">{noisy} noisy</span>' if noisy else "")
                 + (f', <span class="badge refused">{len(refused)} refused</span>' if refused else "") + "</p>")
    parts.append(links_html(ctx.asv.family_links(family)))
    if not group.empty or refused:
        parts.append(family_table(group, refused, ctx.asv, family))
    parts += [overhead_note(r) for r in loaded.extra if r["family"] == family]
    for record in (r for r in loaded.interleaved if r["family"] == family):
        parts.append(interleaved_block(record, ctx.page, ctx.png(f"{report.interleaved_name(record)}.png")))
    if not group.empty:
        parts.append(run_charts(ctx, family, group, png))
    parts.append("</section>")
    return "".join(parts)


class RunsSection:
    """Report section ``runs``: a section per family with runs, refused, interleaved or overhead
    records (:func:`~impls.site.sections.base.table_families`), in site order."""

    name = "runs"

    def html(self, ctx: SectionContext) -> Rendered:
        names = table_families(ctx.loaded)
        return Rendered("".join(family_html(ctx, f, len(names) > 1) for f in names),
                        [(f"family-{f}", families.title(f)) for f in names])
