"""The front page's "Tensor, sequence and pipeline parallel" section (report section
``model_parallel``, :mod:`impls.report.model_parallel`): activations per layer per rank by layout
against Korthikanti et al., the pipeline bubble vs micro-batches per schedule with its formula,
the planner's per-device memory for the big zoo models, the layouts' table, the report's PNGs as
static fallbacks and its CSVs as downloads."""
from __future__ import annotations

import math

from ..page import VEGA_LITE_SCHEMA, Page, bool_value, copy_files, esc, json_safe
from .base import Rendered, SectionContext, questions_html, section_figure

KIB, MIB = 1024, 2 ** 20
ACTIVATION_KINDS = {"measured": "measured (this rank)",
                    "count": "implementation count (fp32, fused SDPA, no dropout)",
                    "paper": "paper shape: unsharded × Korthikanti ratio"}
PLANNER_PARTS = ("params", "grads", "optimizer", "activations")


def _number(value):
    return None if value is None or value != value else float(value)


def spec_mp_activations(frame) -> dict:
    """Saved activation bytes per layer per rank by layout: the measurement (bars), the
    implementation's exact count (ticks) and the paper's formula scaled to the unsharded
    measurement (diamonds)."""
    rows = frame[frame["layer_bytes"].notna()].drop_duplicates(["layout", "world_size"])
    unsharded = rows[rows["tp"] == 1]["layer_bytes"]
    base = float(unsharded.iloc[0]) if not unsharded.empty else None
    values, order = [], []
    for r in rows.to_dict("records"):
        label = f"{r['layout']} (ws{r['world_size']})"
        order.append(label)
        info = {"layout": label, "tp": r["tp"], "sp": "yes" if bool_value(r.get("sp")) else "no",
                "measured ÷ count": _number(r["layer_vs_formula"]),
                "reduction (measured)": _number(r["implementation_reduction"]),
                "reduction (paper)": _number(r["paper_reduction"])}
        kib = {"measured": r["layer_bytes"], "count": r["layer_formula_bytes"],
               "paper": base * r["paper_reduction"] if base is not None and _number(r["paper_reduction"]) else None}
        values += [{**info, "what": ACTIVATION_KINDS[k], "KiB": v / KIB} for k, v in kib.items() if _number(v)]
    y = {"field": "layout", "type": "nominal", "sort": order, "title": None, "axis": {"labelLimit": 300}}
    x = {"field": "KiB", "type": "quantitative", "title": "saved activations per layer per rank (KiB)"}
    colour = {"field": "what", "type": "nominal", "title": None, "legend": {"orient": "bottom", "direction": "vertical", "labelLimit": 400},
              "scale": {"domain": list(ACTIVATION_KINDS.values()), "range": ["#4c72b0", "#111", "#dd8452"]}}
    tooltip = [{"field": f, "type": t, **({"format": fm} if fm else {})} for f, t, fm in (
        ("layout", "nominal", None), ("what", "nominal", None), ("KiB", "quantitative", ",.1f"),
        ("tp", "quantitative", None), ("sp", "nominal", None), ("measured ÷ count", "quantitative", ".3f"),
        ("reduction (measured)", "quantitative", ".3f"), ("reduction (paper)", "quantitative", ".3f"))]

    def layer(kind: str, mark: dict) -> dict:
        return {"transform": [{"filter": {"field": "what", "equal": ACTIVATION_KINDS[kind]}}], "mark": mark,
                "encoding": {"y": y, "x": x, "color": colour, "tooltip": tooltip}}

    return {
        "$schema": VEGA_LITE_SCHEMA, "width": 380, "height": max(60, 28 * len(order)),
        "data": {"values": json_safe(values)},
        "title": {"text": "Activation bytes per layer per rank: TP vs TP+SP",
                  "subtitle": "Korthikanti et al. 2022; hover for the measured and paper reductions"},
        "layer": [layer("measured", {"type": "bar", "opacity": 0.85}),
                  layer("count", {"type": "tick", "thickness": 2, "size": 20}),
                  layer("paper", {"type": "point", "shape": "diamond", "size": 90, "filled": True})],
    }


def bubble_values(frame) -> list[dict]:
    """Per (schedule, p, v) of the pipeline layouts: the formula's curve, torch's own schedule
    replayed offline (:func:`impls.report.model_parallel.schedule_bubbles`) and the measured
    idle share of each layout."""
    import numpy as np

    from ...report import model_parallel

    rows = frame[frame["microbatches"].notna() & frame["schedule"].notna()]
    values = []
    for (schedule, p, v), group in rows.groupby(["schedule", "pp", rows["chunks"].fillna(1)]):
        p, v = int(p), int(v)
        series = f"{schedule} p={p}" + (f" v={v}" if v > 1 else "")
        m_max = max(8.0, float(group["microbatches"].max()))
        for m in np.geomspace(1, m_max, 40):
            values.append({"kind": "formula", "series": series, "m": float(m),
                           "bubble": float(model_parallel.bubble_curve(schedule, p, m, v))})
        for m, bubble in model_parallel.schedule_bubbles(schedule, p, v):
            values.append({"kind": "replayed", "series": series, "m": m, "bubble": bubble})
        for r in group.to_dict("records"):
            if _number(r["bubble_measured"]) is not None:
                values.append({"kind": "measured", "series": series, "m": r["microbatches"], "bubble": r["bubble_measured"],
                               "layout": r["layout"], "formula bubble": _number(r["bubble_formula"]),
                               "schedule bubble": _number(r["bubble_schedule"])})
    return values


def spec_mp_bubble(frame) -> dict:
    """Pipeline bubble fraction vs micro-batches m per schedule: the formula (p−1)/(v·m+p−1) as
    lines, torch's schedule replayed (hollow circles) and the measured idle share (crosses)."""
    values = bubble_values(frame)
    x = {"field": "m", "type": "quantitative", "scale": {"type": "log", "base": 2}, "title": "micro-batches m",
         "axis": {"values": sorted({int(v["m"]) for v in values if v["kind"] != "formula"}) or None, "format": "d"}}
    y = {"field": "bubble", "type": "quantitative", "title": "bubble (idle) fraction of the step"}
    colour = {"field": "series", "type": "nominal", "title": "schedule"}
    tip = [{"field": f, "type": t, **({"format": fm} if fm else {})} for f, t, fm in (
        ("series", "nominal", None), ("kind", "nominal", None), ("m", "quantitative", None),
        ("bubble", "quantitative", ".3f"), ("layout", "nominal", None), ("formula bubble", "quantitative", ".3f"),
        ("schedule bubble", "quantitative", ".3f"))]

    def only(kind: str) -> list[dict]:
        return [{"filter": {"field": "kind", "equal": kind}}]

    return {
        "$schema": VEGA_LITE_SCHEMA, "width": 420, "height": 280, "data": {"values": json_safe(values)},
        "title": {"text": "Pipeline bubble vs micro-batches",
                  "subtitle": "lines: (p−1)/(v·m+p−1); hollow: torch's schedule replayed; crosses: measured idle share"},
        "layer": [
            {"transform": only("formula"), "mark": {"type": "line", "strokeWidth": 1.5},
             "encoding": {"x": x, "y": y, "color": colour}},
            {"transform": only("replayed"), "mark": {"type": "point", "size": 70, "filled": False},
             "encoding": {"x": x, "y": y, "color": colour, "tooltip": tip}},
            {"transform": only("measured"), "mark": {"type": "point", "shape": "cross", "size": 110, "filled": True},
             "encoding": {"x": x, "y": y, "color": colour, "tooltip": tip}},
        ],
    }


def spec_mp_planner(memory) -> dict:
    """The planner's per-device GiB by component for each layout, one panel per model, with the
    80 GiB device as a dashed line."""
    from ...report import model_parallel

    values = []
    for order, r in enumerate(memory.to_dict("records")):
        for part in PLANNER_PARTS:
            values.append({"model": r["model"], "layout": r["label"], "order": order, "component": part,
                           "GiB": r[part] / model_parallel.GIB, "total GiB": r["total"] / model_parallel.GIB,
                           "fits": "yes" if bool_value(r["fits"]) else "NO"})
    tooltip = [{"field": f, "type": t, **({"format": fm} if fm else {})} for f, t, fm in (
        ("model", "nominal", None), ("layout", "nominal", None), ("component", "nominal", None),
        ("GiB", "quantitative", ",.2f"), ("total GiB", "quantitative", ",.2f"), ("fits", "nominal", None))]
    return {
        "$schema": VEGA_LITE_SCHEMA, "data": {"values": json_safe(values)},
        "title": {"text": f"Planner: per-device memory on {model_parallel.PLANNER_DEVICES} devices",
                  "subtitle": "etbench plan, no checkpointing; dashed: an 80 GiB device"},
        "facet": {"row": {"field": "model", "type": "nominal", "title": None}},
        "spec": {"width": 420, "height": 200, "layer": [
            {"mark": "bar",
             "encoding": {"x": {"field": "layout", "type": "nominal", "title": None,
                                "sort": {"field": "order", "op": "min"}, "axis": {"labelAngle": -30, "labelLimit": 200}},
                          "y": {"field": "GiB", "type": "quantitative", "stack": "zero", "title": "GiB per device"},
                          "color": {"field": "component", "type": "nominal", "sort": list(PLANNER_PARTS),
                                    "scale": {"range": ["#4c72b0", "#55a868", "#c44e52", "#8172b3"]}},
                          "order": {"field": "component"}, "tooltip": tooltip}},
            {"mark": {"type": "rule", "strokeDash": [5, 4], "color": "#111"}, "encoding": {"y": {"datum": 80}}}]},
        "resolve": {"scale": {"x": "independent"}},
    }


def speed_text(r) -> tuple[str | None, float | None]:
    """Time per token ÷ DDP's with its 95% interval (the inverse of the speed-up's)."""
    ratio, lo, hi = _number(r.get("time_per_token_vs_ddp")), _number(r.get("speedup_ci_low")), _number(r.get("speedup_ci_high"))
    if ratio is None:
        return None, None
    return (f"{ratio:.3g} [{1 / hi:.3g}, {1 / lo:.3g}]" if lo and hi else f"{ratio:.3g}"), ratio


def layouts_table(frame) -> str:
    """One sortable row per layout: the largest rank's bytes, activations per layer against the
    count and the paper, collectives against the formula, speed vs DDP, the bubble."""
    from ... import report

    rows = []
    for r in frame.to_dict("records"):
        mib = {c: (_number(r[f"{c}_bytes"]) or math.nan) / MIB for c in ("params", "activations")}
        rows.append({"layout": r["layout"], "ranks": r["world_size"], "tp": r["tp"], "pp": r["pp"], "dp": r["dp"],
                     "techniques": r["techniques"], "params MiB": mib["params"], "activations MiB": mib["activations"],
                     "states ÷ formula": r["model_states_vs_formula"], "layer KiB": (_number(r["layer_bytes"]) or math.nan) / KIB,
                     "layer ÷ count": r["layer_vs_formula"], "reduction (measured)": r["implementation_reduction"],
                     "reduction (paper)": r["paper_reduction"], "collectives / step": r["collective_calls"],
                     "comm MiB / step": (_number(r["comm_bytes_per_step"]) or math.nan) / MIB,
                     "comm ÷ formula": r["comm_vs_formula"], "time / token ÷ DDP [95% CI]": speed_text(r),
                     "schedule": r["schedule"] if isinstance(r["schedule"], str) else None, "m": r["microbatches"],
                     "bubble: formula": r["bubble_formula"], "bubble: schedule": r["bubble_schedule"],
                     "bubble: measured": r["bubble_measured"], "load": "noisy" if bool_value(r["noisy"]) else "quiet"})
    columns = list(rows[0])
    counts = {c: "{:.0f}" for c in ("ranks", "tp", "pp", "dp", "collectives / step", "m")}
    return '<div class="scroll">' + report.html_table(
        rows, columns, formats={**counts, "params MiB": "{:,.3f}", "activations MiB": "{:,.3f}", "layer KiB": "{:,.1f}",
                                "comm MiB / step": "{:,.3f}"},
        text_columns=("layout", "techniques", "time / token ÷ DDP [95% CI]", "schedule", "load"),
        table_id="model-parallel-layouts") + "</div>"


def planner_table(memory) -> str:
    """The planner's layouts per model: GiB per device by component, and whether it fits."""
    from ... import report
    from ...report import model_parallel

    gib = model_parallel.GIB
    rows = [{"model": r["model"], "layout": r["label"], "tp": r["tp"], "pp": r["pp"], "dp": r["dp"],
             "ZeRO stage": r["zero_stage"], **{f"{p} GiB": r[p] / gib for p in PLANNER_PARTS},
             "total GiB": r["total"] / gib, "fits 80 GiB": "yes" if bool_value(r["fits"]) else "NO"}
            for r in memory.to_dict("records")]
    columns = list(rows[0])
    return '<div class="scroll">' + report.html_table(
        rows, columns, formats={**{c: "{:.0f}" for c in ("tp", "pp", "dp", "ZeRO stage")},
                                **{c: "{:,.2f}" for c in columns if c.endswith("GiB")}},
        text_columns=("model", "layout", "fits 80 GiB"), table_id="model-parallel-planner") + "</div>"


def charts_html(page: Page, frame, memory, png) -> str:
    """The section's interactive charts, each with the report's PNG as its static copy."""
    charts = []
    if frame["layer_bytes"].notna().any():
        charts.append(page.chart(spec_mp_activations(frame), png=png("activations"),
                                 caption="Hover for the measured and the paper's reduction vs no parallelism."))
    if (frame["microbatches"].notna() & frame["schedule"].notna()).any():
        charts.append(page.chart(spec_mp_bubble(frame), png=png("bubble"),
                                 caption="Hover a cross for the layout's measured, formula and schedule bubble."))
    if not memory.empty:
        charts.append(page.chart(spec_mp_planner(memory), png=png("memory"),
                                 caption="Hover a bar for the component's and the layout's total GiB."))
    return '<div class="charts">' + "".join(charts) + "</div>" if charts else ""


def model_parallel_section(loaded, page: Page, copied: set, rel_plots: str, heading: str = "",
                           downloads: tuple[str, ...] = ()) -> str:
    """The section (``heading`` under its title, ``downloads``: the report's CSVs copied next to
    the page); empty where no interleaved comparison has a model-parallel layout."""
    from ...report import model_parallel

    frame = model_parallel.layouts_frame(loaded.interleaved)
    if frame.empty:
        return ""
    memory = model_parallel.planner_memory()

    def png(kind: str) -> str | None:
        name = section_figure("model_parallel", kind)
        return f"{rel_plots}/{name}" if name and name in copied else None

    links = " · ".join(f'<a href="{rel_plots}/{esc(n)}">{esc(n)}</a>' for n in downloads)
    return ('<section class="family" id="model-parallel"><h2>Tensor, sequence and pipeline parallelism</h2>' + heading
            + f'<p class="note">{len(frame)} layouts from {frame["source"].nunique()} interleaved comparison(s): the '
            "largest rank's bytes, activations per layer against the implementation's count and Korthikanti et al., "
            "collective bytes against the formula, time per token against DDP from the same interleaved rounds (95% "
            "interval), and for pipelines the bubble measured, from torch's schedule and from the formula."
            + (f" Downloads: {links}." if links else "") + "</p>"
            + charts_html(page, frame, memory, png) + "<h3>Layouts</h3>" + layouts_table(frame)
            + (f"<h3>Planner: {model_parallel.PLANNER_DEVICES} devices × 80 GiB</h3>" + planner_table(memory)
               if not memory.empty else "") + "</section>")


class ModelParallelSection:
    """Report section ``model_parallel``."""

    name = "model_parallel"
    #: The report's tables copied next to the page and linked as downloads.
    downloads = ("model_parallel_layouts.csv", "model_parallel_memory.csv")

    def html(self, ctx: SectionContext) -> Rendered:
        present = tuple(copy_files(ctx.plots_dir, ctx.html_dir / ctx.rel_plots, self.downloads)) if ctx.plots_dir else ()
        text = model_parallel_section(ctx.loaded, ctx.page, ctx.copied, ctx.rel_plots, questions_html(ctx, self.name),
                                      present)
        return Rendered(text, [("model-parallel", "model-parallel")] if text else [])
