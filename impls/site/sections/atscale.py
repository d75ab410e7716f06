"""The front page's "At scale" section (report section ``atscale``, :mod:`impls.report.atscale`,
issue 24): per-rank memory by layout of the big zoo models from the cached dry-run sweep,
each measured byte count against its formula or the planner's prediction, and the planner's
step-time calibration on this machine; the tables sortable, the report's PNGs and CSVs linked.

The artefacts are found as the report finds them (:func:`impls.report.atscale.artefacts`:
``atscale/`` beside the ``runs`` folder of the commit's records, i.e. ``results/atscale/``).
Every number shown is read from them; without any, the section is one line saying where it
looked (and has no entry in the navigation)."""
from __future__ import annotations

import math

from ..page import VEGA_LITE_SCHEMA, Page, copy_files, esc, json_safe
from .base import Rendered, SectionContext

ANCHOR = "atscale"
#: The quantities the scatter plots against their prediction (those of
#: :data:`impls.report.atscale.CHECKS` but the model states' total, the sum of the first three).
SCATTERED = ("params", "grads", "optimizer", "activations", "traffic")
COLOURS = {"params": "#4c72b0", "grads": "#55a868", "optimizer": "#c44e52", "activations": "#8172b3",
           "traffic": "#dd8452"}


def _number(value):
    return None if value is None or value != value or isinstance(value, str) else float(value)


def _text(value) -> str:
    """A text cell: the string, or empty for a missing value (NaN in a frame)."""
    return value if isinstance(value, str) else ""


def _tooltip(*fields) -> list[dict]:
    return [{"field": f, "type": t, **({"format": fm} if fm else {})} for f, t, fm in fields]


def memory_values(frame) -> tuple[list[dict], str]:
    """Per measured point and component, the bytes per rank in one binary unit (that of the
    largest total), with the point's predicted total as a separate row; and the unit."""
    from ...report import atscale

    long = atscale.memory_frame(frame)
    unit, size = atscale.byte_unit(float(long.groupby(["model", "world_size", "layout"])["bytes"].sum().max()))
    values, order = [], {name: i for i, name in enumerate(atscale.MEMORY_PARTS)}
    for r in frame[frame["skipped"].isna()].to_dict("records"):
        predicted = [_number(r[k]) for k in ("model_states_formula_bytes", "predicted_activation_bytes")]
        info = {"model": r["model"], "N": f"N = {r['world_size']}", "world_size": r["world_size"], "layout": r["layout"],
                "mesh": r["mesh"], "states ÷ formula": _number(r["model_states_ratio"]),
                "activations ÷ planner": _number(r["activation_ratio"])}
        measured = {part: _number(r[column]) for part, column in atscale.MEMORY_COLUMNS.items()}
        total = sum(v for v in measured.values() if v is not None)
        for part, value in measured.items():
            if value is not None:
                values.append({**info, "kind": "measured", "component": part, "order": order[part], unit: value / size,
                               f"total {unit}": total / size})
        if all(p is not None for p in predicted):
            values.append({**info, "kind": "predicted", "component": "predicted total", unit: sum(predicted) / size,
                           f"total {unit}": total / size})
    return values, unit


def spec_memory(frame) -> dict:
    """Bytes per rank by layout, stacked by component (measured by the dry run), the formula's
    model states plus the planner's activations as a black tick; one panel per model (rows) and
    world size (columns), each with its own y scale."""
    values, unit = memory_values(frame)
    x = {"field": "layout", "type": "nominal", "title": None, "sort": None, "axis": {"labelAngle": -30}}
    y = {"field": unit, "type": "quantitative", "title": f"{unit} per rank"}
    tip = _tooltip(("model", "nominal", None), ("N", "nominal", None), ("layout", "nominal", None),
                   ("mesh", "nominal", None), ("component", "nominal", None), (unit, "quantitative", ",.3f"),
                   (f"total {unit}", "quantitative", ",.3f"), ("states ÷ formula", "quantitative", ".4f"),
                   ("activations ÷ planner", "quantitative", ".4f"))
    return {
        "$schema": VEGA_LITE_SCHEMA, "data": {"values": json_safe(values)},
        "title": {"text": "Per-rank memory by layout (dry runs)",
                  "subtitle": "bars: measured on the fake-tensor rank (activations: one micro-batch); "
                              "tick: ZeRO formula + planner activations"},
        "facet": {"row": {"field": "model", "type": "nominal", "title": None, "sort": None},
                  "column": {"field": "N", "type": "nominal", "title": None,
                             "sort": {"field": "world_size", "op": "min"}}},
        "spec": {"width": 170, "height": 150, "layer": [
            {"transform": [{"filter": "datum.kind == 'measured'"}], "mark": "bar",
             "encoding": {"x": x, "y": {**y, "stack": "zero"}, "order": {"field": "order"}, "tooltip": tip,
                          "color": {"field": "component", "type": "nominal", "sort": list(COLOURS)[:4],
                                    "scale": {"domain": list(COLOURS)[:4],
                                              "range": [COLOURS[k] for k in list(COLOURS)[:4]]}}}},
            {"transform": [{"filter": "datum.kind == 'predicted'"}],
             "mark": {"type": "tick", "color": "#111", "thickness": 2},
             "encoding": {"x": x, "y": {**y, "stack": None}, "tooltip": tip}}]},
        "resolve": {"scale": {"y": "independent", "x": "independent"}},
    }


def check_values(frame) -> list[dict]:
    """One point per measured point and checked quantity with both numbers positive (log axes)."""
    from ...report import atscale

    values = []
    for r in frame[frame["skipped"].isna()].to_dict("records"):
        for component in SCATTERED:
            measured, predicted, ratio, what = atscale.CHECKS[component]
            m, p = _number(r.get(measured)), _number(r.get(predicted))
            if m and p and m > 0 and p > 0:
                values.append({"component": component, "predicted by": what, "predicted bytes": p, "measured bytes": m,
                               "measured ÷ predicted": _number(r.get(ratio)), "model": r["model"],
                               "N": r["world_size"], "layout": r["layout"], "mesh": r["mesh"],
                               "explanation": _text(r.get("explanation"))})
    return values


def spec_checks(frame) -> dict:
    """Measured against predicted bytes of every checked quantity (log-log, y = x dashed):
    model states against the ZeRO formula, activations against the planner, traffic against its
    formula; colour by quantity, shape by layout, the sweep's explanation in the tooltip."""
    values = check_values(frame)
    numbers = [v[k] for v in values for k in ("predicted bytes", "measured bytes")]
    diagonal = [{"predicted bytes": min(numbers) / 1.5, "measured bytes": min(numbers) / 1.5},
                {"predicted bytes": max(numbers) * 1.5, "measured bytes": max(numbers) * 1.5}]
    x = {"field": "predicted bytes", "type": "quantitative", "scale": {"type": "log"},
         "title": "formula / planner bytes per rank (log)", "axis": {"format": "~s"}}
    y = {"field": "measured bytes", "type": "quantitative", "scale": {"type": "log"},
         "title": "dry-run measured bytes per rank (log)", "axis": {"format": "~s"}}
    tip = _tooltip(("model", "nominal", None), ("N", "quantitative", None), ("layout", "nominal", None),
                   ("mesh", "nominal", None), ("component", "nominal", None), ("predicted by", "nominal", None),
                   ("measured bytes", "quantitative", ",.0f"), ("predicted bytes", "quantitative", ",.0f"),
                   ("measured ÷ predicted", "quantitative", ".4f"), ("explanation", "nominal", None))
    return {
        "$schema": VEGA_LITE_SCHEMA, "width": 420, "height": 360,
        "title": {"text": "Dry run vs formula, per rank",
                  "subtitle": "on the dashed line measured = predicted; hover for the ratio and the sweep's explanation"},
        "layer": [
            {"data": {"values": json_safe(diagonal)}, "mark": {"type": "line", "strokeDash": [5, 4], "color": "#444"},
             "encoding": {"x": x, "y": y}},
            {"data": {"values": json_safe(values)}, "mark": {"type": "point", "filled": True, "size": 55, "opacity": 0.8},
             "encoding": {"x": x, "y": y, "tooltip": tip, "shape": {"field": "layout", "type": "nominal"},
                          "color": {"field": "component", "type": "nominal", "scale": {
                              "domain": list(COLOURS), "range": list(COLOURS.values())}}}}],
    }


def calibration_values(rows) -> list[dict]:
    """The measured rows of one calibration with their interval, for the log-log plot."""
    values = []
    for r in rows.to_dict("records"):
        predicted, measured = _number(r["predicted_seconds"]), _number(r["measured_seconds"])
        if not (predicted and measured and predicted > 0 and measured > 0):
            continue
        lo, hi = _number(r["ci_low"]), _number(r["ci_high"])
        values.append({"layout": r["layout"], "N": f"N = {r['world_size']}", "world_size": r["world_size"],
                       "predicted s": predicted, "measured s": measured, "ci low": lo, "ci high": hi,
                       "95% interval": f"[{lo:.4g}, {hi:.4g}]" if lo and hi else "n/a",
                       "measured ÷ predicted": _number(r["ratio"]), "fit point": "yes" if r["fit"] else "no",
                       "load": {True: "noisy", False: "quiet"}.get(r["noisy"], "not recorded")})
    return values


def spec_calibration(rows, summary: dict) -> dict:
    """Measured against predicted step time of one calibration (log-log, y = x dashed), the
    measurement's 95% interval as a bar, colour by world size; the record's Spearman ρ and
    median error in the subtitle."""
    from ...report import atscale

    values = calibration_values(rows)
    numbers = [v[k] for v in values for k in ("predicted s", "measured s", "ci low", "ci high") if v.get(k)]
    span = [min(numbers) / 1.2, max(numbers) * 1.2]  # one square domain: y = x is the diagonal
    diagonal = [{"predicted s": t, "measured s": t} for t in span]
    scale = {"type": "log", "domain": span, "nice": False}
    x = {"field": "predicted s", "type": "quantitative", "scale": scale, "title": "predicted step time (s, log)"}
    y = {"field": "measured s", "type": "quantitative", "scale": scale, "title": "measured step time (s, log)"}
    colour = {"field": "N", "type": "nominal", "title": "world size", "sort": {"field": "world_size", "op": "min"}}
    tip = _tooltip(("layout", "nominal", None), ("N", "nominal", None), ("predicted s", "quantitative", ".4g"),
                   ("measured s", "quantitative", ".4g"), ("95% interval", "nominal", None),
                   ("measured ÷ predicted", "quantitative", ".3f"), ("fit point", "nominal", None), ("load", "nominal", None))
    return {
        "$schema": VEGA_LITE_SCHEMA, "width": 420, "height": 360,
        "title": {"text": f"Planner calibration: {summary['machine']}", "subtitle": atscale.short_summary(summary)},
        "layer": [
            {"data": {"values": json_safe(diagonal)}, "mark": {"type": "line", "strokeDash": [5, 4], "color": "#444"},
             "encoding": {"x": x, "y": y}},
            {"data": {"values": json_safe(values)}, "layer": [
                {"transform": [{"filter": "isValid(datum['ci low']) && isValid(datum['ci high'])"}], "mark": "rule",
                 "encoding": {"x": x, "y": {"field": "ci low", "type": "quantitative", "scale": scale},
                              "y2": {"field": "ci high"}, "color": colour}},
                {"mark": {"type": "point", "filled": True, "size": 60},
                 "encoding": {"x": x, "y": y, "color": colour, "tooltip": tip,
                              "shape": {"field": "fit point", "type": "nominal", "title": "MFU fit point"}}}]}],
    }


def sweep_table(frame) -> str:
    """Every point of the sweeps: this rank's bytes against their formulas, the ratios as the
    sweep wrote them, its explanation; skipped points with the reason."""
    from ... import report

    rows = []
    for r in frame.to_dict("records"):
        rows.append({"model": r["model"], "N": r["world_size"], "layout": r["layout"], "mesh": r["mesh"],
                     **{f"{c} ÷ formula": r[f"{c}_ratio"] for c in ("params", "grads", "optimizer")},
                     "states GiB": (_number(r["model_states_bytes"]) or math.nan) / 2 ** 30,
                     "states ÷ formula": r["model_states_ratio"],
                     "activations GiB": (_number(r["activation_bytes"]) or math.nan) / 2 ** 30,
                     "activations ÷ planner": r["activation_ratio"],
                     "traffic GiB / step": (_number(r["traffic_bytes"]) or math.nan) / 2 ** 30,
                     "traffic ÷ formula": r["traffic_ratio"],
                     "outside tolerance": _text(r["outside_tolerance"]),
                     "explanation": _text(r["explanation"]) or (f"skipped: {r['skipped']}" if _text(r["skipped"]) else ""),
                     "note": _text(r["substituted"])})
    gib = {c: "{:,.4g}" for c in ("states GiB", "activations GiB", "traffic GiB / step")}
    return '<div class="scroll">' + report.html_table(
        rows, list(rows[0]), formats={"N": "{:.0f}", **gib}, table_id="atscale-sweep",
        text_columns=("model", "layout", "mesh", "outside tolerance", "explanation", "note")) + "</div>"


def calibration_table(calib) -> str:
    """Every calibration row: predicted and measured step time with the interval and the ratio."""
    from ... import report

    rows = []
    for r in calib.to_dict("records"):
        lo, hi = _number(r["ci_low"]), _number(r["ci_high"])
        rows.append({"machine": r["machine"], "layout": r["layout"], "N": r["world_size"],
                     **{f"{t} s": r[f"predicted_{t}_seconds"] for t in ("compute", "tp_comm", "pp_p2p", "bubble",
                                                                          "dp_comm_exposed")},
                     "predicted s": r["predicted_seconds"],
                     "measured s [95% CI]": (f"{r['measured_seconds']:.4g} [{lo:.4g}, {hi:.4g}]"
                                             if lo and hi and _number(r["measured_seconds"]) else None,
                                             _number(r["measured_seconds"])),
                     "measured ÷ predicted": r["ratio"], "fit point": "yes" if r["fit"] else "",
                     "not measured": _text(r["error"])})
    return '<div class="scroll">' + report.html_table(
        rows, list(rows[0]), formats={"N": "{:.0f}"}, table_id="atscale-calibration",
        text_columns=("machine", "layout", "fit point", "not measured")) + "</div>"


def intro_html(found) -> str:
    """What a dry run is, what the calibration measures, and where each artefact came from."""
    from ...report import atscale

    sources = "".join(f"<li>{esc(atscale.provenance_text(r))}</li>" for r in (*found.sweeps, *found.calibrations))
    summaries = "".join(f"<li>{esc(atscale.summary_line(atscale.calibration_summary(r)))}</li>" for r in found.calibrations)
    return ('<p class="note">A <b>dry run</b> (<code>etbench dryrun</code>) builds one rank of an N-rank run on fake '
            "tensors under a fake process group and steps it once: the bytes that rank would hold and the collectives "
            "it would issue are counted exactly, without the devices or the memory. The sweep "
            "(<code>etbench dryrun-sweep</code>) runs one per model × world size × layout and checks each count "
            "against its formula; the calibration (<code>etbench plan-calibrate</code>) times small layouts on this "
            "machine against the planner's predicted step time. Both are <b>cached artefacts</b>, written by hand "
            f"and committed under <code>{esc(', '.join(found.folders()))}</code>, not by this benchmark run:</p>"
            f'<ul class="note">{sources}</ul>' + (f'<ul class="note">{summaries}</ul>' if summaries else ""))


def atscale_html(found, frame, calib, page: Page, png, downloads: str) -> str:
    """The section's body (charts, then the tables) for artefacts that exist."""
    from ...report import atscale

    charts = []
    measured = frame[frame["skipped"].isna()] if not frame.empty else frame
    if not measured.empty:
        charts.append(page.chart(spec_memory(frame), png=png("atscale_memory.png"),
                                 caption="Hover a bar for its bytes, the total and the ratios to the formulas."))
        if check_values(frame):
            charts.append(page.chart(spec_checks(frame), caption="Hover a point for the layout, the ratio and the "
                                                                 "sweep's explanation of a ratio outside its tolerance."))
    for record in found.calibrations:
        rows = calib[calib["source"] == record["source"]]
        if calibration_values(rows):
            charts.append(page.chart(spec_calibration(rows, atscale.calibration_summary(record)),
                                     png=png("atscale_calibration.png"),
                                     caption="Bars: the measurement's 95% interval; hover for the layout and the ratio."))
    body = '<div class="charts">' + "".join(charts) + "</div>" if charts else ""
    if not frame.empty:
        body += "<h3>Dry-run sweep: per rank, against the formulas</h3>" + sweep_table(frame)
    if not calib.empty:
        body += "<h3>Planner calibration: step time, predicted and measured</h3>" + calibration_table(calib)
    skipped = "".join(f"<li>{esc(s['source'])}: {esc(s['reason'])}</li>" for s in found.skipped)
    return intro_html(found) + (f'<p class="note">Downloads: {downloads}.</p>' if downloads else "") + body + (
        f'<p class="note">Not read:</p><ul class="note">{skipped}</ul>' if skipped else "")


class AtscaleSection:
    """Report section ``atscale``."""

    name = "atscale"
    #: The report's files copied next to the page: the CSVs as downloads, the PNGs as static copies.
    downloads = ("atscale_sweep.csv", "atscale_calibration.csv")
    figures = ("atscale_memory.png", "atscale_calibration.png")

    def html(self, ctx: SectionContext) -> Rendered:
        from ...report import atscale

        found = atscale.artefacts(ctx.loaded)
        heading = f'<section class="family" id="{ANCHOR}"><h2>At scale: dry runs and the planner\'s calibration</h2>'
        if found.empty():
            return Rendered(heading + f'<p class="note">{esc(atscale.absent_note(found))}</p></section>', [])
        present = set(copy_files(ctx.plots_dir, ctx.html_dir / ctx.rel_plots, (*self.downloads, *self.figures))
                      ) if ctx.plots_dir else set()

        def png(name: str) -> str | None:
            return f"{ctx.rel_plots}/{name}" if name in present else None

        links = " · ".join(f'<a href="{ctx.rel_plots}/{esc(n)}">{esc(n)}</a>' for n in self.downloads if n in present)
        body = atscale_html(found, atscale.sweep_frame(found.sweeps), atscale.calibration_frame(found.calibrations),
                            ctx.page, png, links)
        return Rendered(heading + body + "</section>", [(ANCHOR, "at scale")])
