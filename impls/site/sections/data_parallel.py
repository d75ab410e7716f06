"""The front page's "Data-parallel and sharded training" section (report section
``data_parallel``, issue 10): per-rank model states against the ZeRO formulas, scaling
efficiency, communication volume, collective bus bandwidth and the big-model memory table."""
from __future__ import annotations

from ..page import VEGA_LITE_SCHEMA, Page, bool_value, esc, json_safe
from .base import Rendered, SectionContext, questions_html, section_figure


def spec_dp_model_states(frame, lines) -> dict:
    """Per-rank model-state MiB vs world size, one panel per component: measured points and the
    ZeRO formula as lines (same colour per technique)."""
    from ... import report

    values = []
    for _, r in lines.iterrows():
        for key, name in report.DP_COMPONENTS:
            values.append({"kind": "formula", "technique": r["technique"], "n_d": r["n_d"], "component": name,
                           "MiB": r[key] / report.MIB})
    for _, r in frame.iterrows():
        for key, name in report.DP_COMPONENTS:
            measured = r[f"measured_{key}"]
            if measured is None or measured != measured:
                continue
            formula = r[f"formula_{key}"]
            values.append({"kind": "measured", "technique": r["technique"], "n_d": r["n_d"], "component": name,
                           "MiB": measured / report.MIB, "run": r["run"], "stage": r["stage_name"],
                           "formula MiB": None if formula is None or formula != formula else formula / report.MIB,
                           "measured / formula": measured / formula if formula else None})
    ticks = sorted({int(n) for n in lines["n_d"]} | {int(n) for n in frame["n_d"]})
    x = {"field": "n_d", "type": "quantitative", "scale": {"type": "log", "base": 2}, "title": "data-parallel ranks N_d",
         "axis": {"values": ticks, "format": "d"}}
    y = {"field": "MiB", "type": "quantitative", "title": "MiB per rank"}
    colour = {"field": "technique", "type": "nominal", "legend": {"labelLimit": 320}}
    return {
        "$schema": VEGA_LITE_SCHEMA, "data": {"values": json_safe(values)},
        "title": {"text": "Per-rank model states vs world size",
                  "subtitle": "points: measured (max over ranks); lines: ZeRO formula (Rajbhandari et al. 2020)"},
        "facet": {"column": {"field": "component", "type": "nominal", "title": None,
                             "sort": [name for _, name in report.DP_COMPONENTS]}},
        "spec": {"width": 220, "height": 220, "layer": [
            {"transform": [{"filter": "datum.kind == 'formula'"}], "mark": {"type": "line", "opacity": 0.8},
             "encoding": {"x": x, "y": y, "color": colour}},
            {"transform": [{"filter": "datum.kind == 'measured'"}],
             "mark": {"type": "point", "filled": True, "size": 60, "stroke": "black", "strokeWidth": 0.5},
             "encoding": {"x": x, "y": y, "color": colour, "tooltip": [
                 {"field": "run", "type": "nominal"}, {"field": "technique", "type": "nominal"},
                 {"field": "stage", "type": "nominal"}, {"field": "n_d", "type": "quantitative"},
                 {"field": "MiB", "type": "quantitative", "format": ",.4f"},
                 {"field": "formula MiB", "type": "quantitative", "format": ",.4f"},
                 {"field": "measured / formula", "type": "quantitative", "format": ".4f"}]}}]},
        "resolve": {"scale": {"y": "independent"}},
    }


def spec_dp_scaling(table) -> dict:
    """Scaling efficiency per technique with its interval; oversubscribed runs hollow."""
    from ... import report

    values = [{"technique": r["technique"], "n_d": r["n_d"], "efficiency": r["efficiency"], "lo": r["lo"],
               "hi": r["hi"], "reference": r["reference"], "tokens/s per rank": r["tokens_per_rank"],
               "oversubscribed": "oversubscribed" if bool_value(r["oversubscribed"]) else "no"}
              for _, r in table.iterrows() if r["efficiency"] == r["efficiency"]]
    x = {"field": "n_d", "type": "quantitative", "scale": {"type": "log", "base": 2}, "title": "data-parallel ranks N",
         "axis": {"values": sorted({int(n) for n in table["n_d"]}), "format": "d"}}
    y = {"field": "efficiency", "type": "quantitative", "title": "tokens/s per rank ÷ 1 rank"}
    colour = {"field": "technique", "type": "nominal"}
    return {
        "$schema": VEGA_LITE_SCHEMA, "width": 420, "height": 280, "data": {"values": json_safe(values)},
        "title": {"text": "Scaling efficiency", "subtitle": report.SCALING_NOTE[:160] + "…"},
        "layer": [
            {"mark": "line", "encoding": {"x": x, "y": y, "color": colour}},
            {"mark": "rule", "encoding": {"x": x, "y": {"field": "lo", "type": "quantitative"}, "y2": {"field": "hi"},
                                          "color": colour}},
            {"mark": {"type": "point", "size": 70},
             "encoding": {"x": x, "y": y, "color": colour,
                          "fill": {"condition": {"test": "datum.oversubscribed == 'no'", "field": "technique",
                                                 "type": "nominal"}, "value": "white"},
                          "tooltip": [{"field": f, "type": t, **({"format": fm} if fm else {})} for f, t, fm in (
                              ("technique", "nominal", None), ("n_d", "quantitative", None),
                              ("efficiency", "quantitative", ".3f"), ("lo", "quantitative", ".3f"),
                              ("hi", "quantitative", ".3f"), ("tokens/s per rank", "quantitative", ",.0f"),
                              ("reference", "nominal", None), ("oversubscribed", "nominal", None))]}},
            {"mark": {"type": "rule", "strokeDash": [4, 3]}, "encoding": {"y": {"datum": 1}}},
        ],
    }


def spec_dp_comm(table) -> dict:
    """Measured communication bytes per rank per step (bars) and the formula in three conventions."""
    from ... import report

    values = []
    for _, r in table.iterrows():
        label = f"{r['technique']} · N={r['n_d']}"
        values.append({"row": label, "what": "measured", "MiB": r["comm_measured"] / report.MIB,
                       "ratio (paper)": r["ratio_paper"], "ratio (ring)": r["ratio_ring"],
                       "ratio (payload)": r["ratio_payload"]})
        for column, what in (("comm_paper", "formula: paper 2Ψ/3Ψ"), ("comm_ring", "formula × (N−1)/N (ring)"),
                             ("comm_payload", "collective payloads")):
            values.append({"row": label, "what": what, "MiB": r[column] / report.MIB})
    y = {"field": "row", "type": "nominal", "title": None, "sort": None, "axis": {"labelLimit": 320}}
    x = {"field": "MiB", "type": "quantitative", "title": "MiB per rank per step"}
    return {
        "$schema": VEGA_LITE_SCHEMA, "width": 420, "height": max(60, 26 * len(table)),
        "data": {"values": json_safe(values)},
        "title": {"text": "Communication volume: measured vs ZeRO §7",
                  "subtitle": "bar: measured; tick/points: the formula in each convention"},
        "layer": [
            {"transform": [{"filter": "datum.what == 'measured'"}], "mark": {"type": "bar", "color": "#8da0cb"},
             "encoding": {"y": y, "x": x, "tooltip": [
                 {"field": "row", "type": "nominal"}, {"field": "MiB", "type": "quantitative", "format": ",.4f"},
                 {"field": "ratio (paper)", "type": "quantitative", "format": ".3f"},
                 {"field": "ratio (ring)", "type": "quantitative", "format": ".3f"},
                 {"field": "ratio (payload)", "type": "quantitative", "format": ".3f"}]}},
            {"transform": [{"filter": "datum.what != 'measured'"}], "mark": {"type": "point", "size": 80, "filled": True},
             "encoding": {"y": y, "x": x, "shape": {"field": "what", "type": "nominal"},
                          "color": {"field": "what", "type": "nominal", "scale": {"range": ["#4c72b0", "#111", "#c44e52"]}},
                          "tooltip": [{"field": "what", "type": "nominal"},
                                      {"field": "MiB", "type": "quantitative", "format": ",.4f"}]}},
        ],
    }


def spec_busbw(bw) -> dict:
    """Bus bandwidth (else algorithm bandwidth) vs message size, log-log, one panel per world size."""
    values = []
    for _, r in bw.iterrows():
        use_bus = r["busbw"] == r["busbw"]
        value = r["busbw"] if use_bus else r["algbw"]
        if value != value:
            continue
        values.append({"world_size": f"{r['world_size']} ranks", "scheme": r["scheme"] + ("" if use_bus else " (algbw)"),
                       "bytes": r["bytes"], "GB/s": value / 1e9, "algbw GB/s": r["algbw"] / 1e9,
                       "seconds": r["seconds"]})
    x = {"field": "bytes", "type": "quantitative", "scale": {"type": "log", "base": 2}, "title": "message size (bytes)"}
    y = {"field": "GB/s", "type": "quantitative", "scale": {"type": "log"}, "title": "bus bandwidth (GB/s)"}
    return {
        "$schema": VEGA_LITE_SCHEMA, "data": {"values": json_safe(values)},
        "title": {"text": "Collective bandwidth vs message size",
                  "subtitle": "nccl-tests definitions: algbw = bytes/time; all-reduce busbw = algbw·2(n−1)/n"},
        "facet": {"column": {"field": "world_size", "type": "nominal", "title": None}},
        "spec": {"width": 260, "height": 220, "layer": [
            {"mark": {"type": "line", "point": True},
             "encoding": {"x": x, "y": y, "color": {"field": "scheme", "type": "nominal"},
                          "tooltip": [{"field": "scheme", "type": "nominal"}, {"field": "bytes", "type": "quantitative", "format": ","},
                                      {"field": "GB/s", "type": "quantitative", "format": ".3f"},
                                      {"field": "algbw GB/s", "type": "quantitative", "format": ".3f"},
                                      {"field": "seconds", "type": "quantitative", "format": ".3g"}]}}]},
    }


def data_parallel_memory_html(memory) -> str:
    """The big-model memory table (per-rank model-state GiB per model × technique × N_d, fits in the
    GPU, offload GPU/host GiB) as a sortable table, with its caveats."""
    from ... import report
    from ...measure import model_states as ms

    rows = [{"model": r["model"], "Ψ": r["psi"], "technique": r["technique"], "N_d": r["n_d"],
             "params GiB": r["params_gib"], "grads GiB": r["grads_gib"], "optimizer GiB": r["optimizer_gib"],
             "total GiB": r["total_gib"], f"fits {r['gpu_bytes'] / 1e9:g} GB": "yes" if r["fits"] else "NO",
             "offload: GPU GiB": r["offload_gpu_gib"], "offload: host GiB": r["offload_host_gib"],
             "offload fits": "yes" if r["offload_fits"] else "NO"} for r in memory.to_dict("records")]
    if not rows:
        return ""
    columns = list(rows[0])
    gib = {c: "{:,.2f}" for c in columns if "GiB" in c}
    return ("<h3>What fits on one GPU: model states of big zoo models (Ψ counted on the meta device)</h3>"
            f'<p class="note">{esc(ms.MEMORY_TABLE_NOTE)}</p><div class="scroll">'
            + report.html_table(rows, columns, formats={"Ψ": "{:,.0f}", "N_d": "{:.0f}", **gib},
                                text_columns=("model", "technique", columns[8], "offload fits"),
                                table_id="data-parallel-memory") + "</div>")


def data_parallel_section(loaded, page: Page, copied: set, rel_plots: str, heading: str = "") -> str:
    """The front page's "Data-parallel and sharded training" section: model states vs the ZeRO
    formulas, scaling efficiency, communication volume, bus bandwidth (``etbench comm`` records)
    and the big-model memory table (``heading`` under the title); empty when the runs have no
    ``model_states`` block and there is no comm record."""
    from ... import report

    import pandas as pd

    frame = report.data_parallel_frame(pd.concat([loaded.runs, report.interleaved_parallel_runs(loaded.interleaved)],
                                                 ignore_index=True))
    bw = report.comm_bandwidth_frame(loaded.comm)
    if frame.empty and bw.empty:
        return ""

    def png(kind):
        name = section_figure("data_parallel", kind)
        return f"{rel_plots}/{name}" if name and name in copied else None

    charts = []
    if not frame.empty:
        charts.append(page.chart(spec_dp_model_states(frame, report.model_states_lines(frame)), png=png("model_states"),
                                 caption="Hover a point for the run and its measured/formula ratio."))
        scaling = report.scaling_efficiency(frame)
        if scaling["efficiency"].notna().any():
            charts.append(page.chart(spec_dp_scaling(scaling), png=png("scaling"),
                                     caption="Hollow: oversubscribed CPU run (ranks × threads > cores)."))
        comm = report.comm_volume_table(frame)
        if not comm.empty:
            charts.append(page.chart(spec_dp_comm(comm), png=png("comm"),
                                     caption="Hover a bar for measured/formula in each convention."))
    if not bw.empty:
        charts.append(page.chart(spec_busbw(bw), png=png("busbw"),
                                 caption="A parameter server's root link carries 2(n−1)·bytes per step: it saturates as n grows."))
    return ('<section class="family" id="data-parallel"><h2>Data-parallel and sharded training</h2>' + heading +
            f'<p class="note">{len(frame)} runs with per-rank model states checked against the ZeRO formulas, '
            f"{len(loaded.comm)} collective-bandwidth records.</p>"
            '<div class="charts">' + "".join(charts) + "</div>"
            + data_parallel_memory_html(report.data_parallel_memory_table()) + "</section>")


class DataParallelSection:
    """Report section ``data_parallel``."""

    name = "data_parallel"

    def html(self, ctx: SectionContext) -> Rendered:
        text = data_parallel_section(ctx.loaded, ctx.page, ctx.copied, ctx.rel_plots, questions_html(ctx, self.name))
        return Rendered(text, [("data-parallel", "data-parallel")] if text else [])
