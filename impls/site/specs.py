"""Vega-Lite specs of a family's runs: validation loss vs FLOPs, throughput with its interval and
the exact memory breakdown, techniques against the baseline, and an interleaved comparison."""
from __future__ import annotations

from pathlib import Path

from .page import VEGA_LITE_SCHEMA, bool_value, json_safe, recipe_text


def run_fields(run) -> dict:
    """Key record fields for a chart's tooltip."""
    from .. import report

    median, ci = run.get("step_time.median"), run.get("step_time.ci95")
    return {
        "run": run["run"], "record": Path(run["source"]).stem if run.get("source") else None,
        "techniques": recipe_text(run, "techniques"), "optimizer": recipe_text(run, "optimizer"),
        "model": recipe_text(run, "model"), "batch": recipe_text(run, "batch_size"),
        "seq_len": recipe_text(run, "seq_len"), "world_size": run.get("world_size"),
        "tokens/s": run.get("tokens_per_second"),
        "s/step [95% CI]": report.median_ci(median, ci) or report.format_value(run.get("seconds_per_step")),
        "MFU": run.get("mfu"), "HFU": run.get("hfu"),
        "noisy": {True: "NOISY", False: "quiet"}.get(bool_value(run.get("load.noisy")), "not recorded"),
        "final val loss": run.get("final_val_loss"),
    }



TOOLTIP_RUN = [
    {"field": "run", "type": "nominal"}, {"field": "techniques", "type": "nominal"},
    {"field": "optimizer", "type": "nominal"}, {"field": "model", "type": "nominal"},
    {"field": "batch", "type": "nominal"}, {"field": "seq_len", "type": "nominal"},
    {"field": "world_size", "type": "quantitative"},
    {"field": "tokens/s", "type": "quantitative", "format": ",.0f"},
    {"field": "s/step [95% CI]", "type": "nominal"},
    {"field": "MFU", "type": "quantitative", "format": ".1%"}, {"field": "HFU", "type": "quantitative", "format": ".1%"},
    {"field": "noisy", "type": "nominal"}, {"field": "final val loss", "type": "quantitative", "format": ".4f"},
]


def legend_pick():
    return [{"name": "pick", "select": {"type": "point", "fields": ["run"]}, "bind": "legend"}]


def spec_loss_vs_flops(runs) -> list[dict]:
    """One Vega-Lite chart per dataset hash: validation loss vs cumulative FLOPs (log x)."""
    from .. import report

    specs = []
    curves = report.curve_frame(runs)
    curves = curves[curves["val_loss"].notna() & (curves["flops"] > 0)]
    fields = {run["run"]: run_fields(run) for _, run in runs.iterrows()}
    for digest in dict.fromkeys(runs["dataset.hash"]):
        points = curves[curves["dataset.hash"] == digest]
        if points.empty:
            continue
        values = [{**fields[p["run"]], "flops": p["flops"], "val_loss": p["val_loss"], "step": p["step"],
                   "tokens": p["tokens"]} for _, p in points.iterrows()]
        tooltip = [{"field": "run", "type": "nominal"}, {"field": "step", "type": "quantitative"},
                   {"field": "flops", "type": "quantitative", "format": ".3s"},
                   {"field": "val_loss", "type": "quantitative", "format": ".4f"}, *TOOLTIP_RUN[1:]]
        colour = {"field": "run", "type": "nominal", "sort": list(runs["run"]),
                  "legend": {"labelLimit": 320, "symbolLimit": 60}}
        x = {"field": "flops", "type": "quantitative", "scale": {"type": "log"},
             "title": "cumulative training FLOPs (log)", "axis": {"format": ".0e", "tickCount": 5}}
        y = {"field": "val_loss", "type": "quantitative", "scale": {"zero": False},
             "title": "validation loss (nats/token)"}
        opacity = {"condition": {"param": "pick", "value": 1}, "value": 0.12}
        layers = [
            {"mark": {"type": "line", "interpolate": "linear"},
             "encoding": {"x": x, "y": y, "color": colour, "opacity": opacity}, "params": legend_pick()},
            {"mark": {"type": "point", "filled": True, "size": 36},
             "encoding": {"x": x, "y": y, "color": colour, "tooltip": tooltip, "opacity": opacity}},
        ]
        floor = runs[runs["dataset.hash"] == digest]["dataset.entropy_floor"].dropna()
        if not floor.empty:
            h = float(floor.iloc[0])
            layers.append({"data": {"values": [{"val_loss": h, "what": f"entropy floor H = {h:.3f} nats"}]},
                           "mark": {"type": "rule", "strokeDash": [5, 4], "color": "#444"},
                           "encoding": {"y": y, "tooltip": {"field": "what", "type": "nominal"}}})
        key = runs[runs["dataset.hash"] == digest]["dataset_key"].iloc[0]
        specs.append({
            "$schema": VEGA_LITE_SCHEMA, "width": 460, "height": 300,
            "title": {"text": "Validation loss vs compute", "subtitle": key[:90] + ("…" if len(key) > 90 else "")},
            "data": {"values": json_safe(values)},
            "layer": layers,
        })
    return specs


def spec_throughput(runs) -> dict:
    """Tokens/s per run with the 95% interval of its step time, and the exact memory breakdown."""
    from .. import report

    values, memory = [], []
    for _, run in runs.iterrows():
        row = run_fields(run)
        ci = run.get("step_time.ci95")
        tokens = run.get("tokens_per_step")
        if isinstance(ci, list) and len(ci) == 2 and tokens and ci[0] > 0:
            row["tok_lo"], row["tok_hi"] = tokens / ci[1], tokens / ci[0]
        values.append(row)
        for column, name in report.MEMORY_COMPONENTS.items():
            memory.append({"run": run["run"], "component": name, "MiB": run.get(column, float("nan")) / report.MIB})
    order = list(runs["run"])
    y = {"field": "run", "type": "nominal", "sort": order, "title": None, "axis": {"labelLimit": 300}}
    height = max(60, 20 * len(order))
    speed = {
        "title": "Throughput (bar: tokens/s of the run; whisker: from the step-time 95% CI)",
        "width": 330, "height": height, "data": {"values": json_safe(values)},
        "layer": [
            {"mark": {"type": "bar", "color": "#4c72b0"},
             "encoding": {"y": y, "x": {"field": "tokens/s", "type": "quantitative", "title": "tokens / second"},
                          "tooltip": TOOLTIP_RUN}},
            {"mark": {"type": "rule", "color": "#111"},
             "encoding": {"y": y, "x": {"field": "tok_lo", "type": "quantitative"}, "x2": {"field": "tok_hi"}}},
        ],
    }
    mem = {
        "title": "Exact memory breakdown (MiB)", "width": 330, "height": height,
        "data": {"values": json_safe(memory)},
        "mark": "bar",
        "encoding": {"y": {**y, "axis": None}, "x": {"field": "MiB", "type": "quantitative", "stack": "zero"},
                     "color": {"field": "component", "type": "nominal", "sort": list(report.MEMORY_COMPONENTS.values()),
                               "scale": {"scheme": "set2"}},
                     "order": {"field": "component"},
                     "tooltip": [{"field": "run", "type": "nominal"}, {"field": "component", "type": "nominal"},
                                 {"field": "MiB", "type": "quantitative", "format": ",.2f"}]},
    }
    return {"$schema": VEGA_LITE_SCHEMA, "hconcat": [speed, mem], "resolve": {"scale": {"y": "shared"}}}


def spec_technique_comparison(comparison, runs) -> dict:
    """Speed ratio vs the baseline (log x, bars from 1) and the loss delta at the same budget."""
    fields = {run["run"]: run_fields(run) for _, run in runs.iterrows()}
    values = [{**fields.get(r["run"], {"run": r["run"]}), "speed ratio": r["speed ratio"],
               "speed lo": r.get("speed ratio lo"), "speed hi": r.get("speed ratio hi"),
               "loss delta": r["loss delta"]} for _, r in comparison.iterrows()]
    order = list(comparison["run"])
    y = {"field": "run", "type": "nominal", "sort": order, "title": None, "axis": {"labelLimit": 300}}
    tooltip = [{"field": "run", "type": "nominal"}, {"field": "speed ratio", "type": "quantitative", "format": ".3f"},
               {"field": "loss delta", "type": "quantitative", "format": "+.4f"}, *TOOLTIP_RUN[1:]]
    height = max(60, 20 * len(order))
    return {
        "$schema": VEGA_LITE_SCHEMA, "data": {"values": json_safe(values)},
        "title": "Techniques normalised to the baseline (same model, data and FLOP budget)",
        "hconcat": [
            {"width": 330, "height": height, "layer": [
                {"transform": [{"filter": "isValid(datum['speed lo']) && isFinite(datum['speed lo'])"}],
                 "mark": {"type": "rule", "color": "#4c72b0"},
                 "encoding": {"y": y, "x": {"field": "speed lo", "type": "quantitative", "scale": {"type": "log"},
                                            "title": "tokens/s ÷ baseline (log; interleaved, 95% CI)"},
                              "x2": {"field": "speed hi"}}},
                {"transform": [{"filter": "isValid(datum['speed ratio']) && isFinite(datum['speed ratio'])"}],
                 "mark": {"type": "point", "filled": True, "color": "#4c72b0", "size": 50},
                 "encoding": {"y": y, "x": {"field": "speed ratio", "type": "quantitative", "scale": {"type": "log"}},
                              "tooltip": tooltip}},
                {"mark": {"type": "rule", "strokeDash": [4, 3]}, "encoding": {"x": {"datum": 1}}}]},
            {"width": 260, "height": height, "layer": [
                {"mark": "bar",
                 "encoding": {"y": {**y, "axis": None},
                              "x": {"field": "loss delta", "type": "quantitative", "title": "val loss − baseline (nats)"},
                              "color": {"condition": {"test": "datum['loss delta'] > 0", "value": "#c44e52"},
                                        "value": "#55a868"},
                              "tooltip": tooltip}},
                {"mark": "rule", "encoding": {"x": {"datum": 0}}}]},
        ],
    }


def spec_interleaved(record: dict) -> dict:
    """Speed-up vs the baseline with its 95% interval (interleaved rounds), and memory ratios."""
    from .. import report

    table = report.interleaved_table(record)
    values, memory = [], []
    for _, r in table.iterrows():
        variant = record["variants"][r["variant"]]
        recipe = variant.get("recipe") or {}
        values.append({"label": r["label"], "variant": r["variant"], "speedup": r["speedup"],
                       "lo": r["speedup lo"], "hi": r["speedup hi"], "verdict": r["verdict"],
                       "speedup [95% CI]": r["speedup [95% CI]"], "s/step [95% CI]": r["s/step [95% CI]"],
                       "tokens/s [95% CI]": r["tokens/s [95% CI]"],
                       "techniques": ", ".join(map(str, recipe.get("techniques") or [])) or "none",
                       "model": recipe.get("model"), "batch": recipe.get("batch_size")})
        for short in report.MEMORY_COMPONENTS.values():
            memory.append({"label": r["label"], "component": short, "ratio": r[f"{short} ratio"]})
    order = list(table["label"])
    y = {"field": "label", "type": "nominal", "sort": order, "title": None, "axis": {"labelLimit": 300}}
    height = max(60, 24 * len(order))
    tooltip = [{"field": f, "type": "nominal"} for f in
               ("label", "variant", "speedup [95% CI]", "verdict", "s/step [95% CI]", "tokens/s [95% CI]",
                "techniques", "model", "batch")]
    return {
        "$schema": VEGA_LITE_SCHEMA,
        "title": {"text": f"{report.interleaved_name(record)} ({record.get('rounds', '?')} rounds)",
                  "subtitle": record.get("ci_method", "")},
        "hconcat": [
            {"width": 330, "height": height, "data": {"values": json_safe(values)}, "layer": [
                {"mark": {"type": "bar", "opacity": 0.85},
                 "encoding": {"y": y, "x": {"field": "speedup", "type": "quantitative",
                                            "title": "speed-up vs baseline (whisker: 95% CI)"},
                              "x2": {"datum": 1},
                              "color": {"field": "verdict", "type": "nominal",
                                        "scale": {"domain": ["faster", "slower", "no clear difference", "baseline",
                                                             "no interval"],
                                                  "range": ["#55a868", "#c44e52", "#9aa5b1", "#4c72b0", "#cccccc"]}},
                              "tooltip": tooltip}},
                {"mark": {"type": "rule", "strokeWidth": 2, "color": "#111"},
                 "encoding": {"y": y, "x": {"field": "lo", "type": "quantitative"}, "x2": {"field": "hi"}}},
                {"mark": {"type": "rule", "strokeDash": [4, 3]}, "encoding": {"x": {"datum": 1}}}]},
            {"width": 260, "height": height, "data": {"values": json_safe(memory)}, "layer": [
                {"mark": "bar",
                 "encoding": {"y": {**y, "axis": None}, "yOffset": {"field": "component"},
                              "x": {"field": "ratio", "type": "quantitative", "title": "bytes ÷ baseline bytes"},
                              "color": {"field": "component", "type": "nominal", "scale": {"scheme": "set2"}},
                              "tooltip": [{"field": "label", "type": "nominal"}, {"field": "component", "type": "nominal"},
                                          {"field": "ratio", "type": "quantitative", "format": ".3f"}]}},
                {"mark": {"type": "rule", "strokeDash": [4, 3]}, "encoding": {"x": {"datum": 1}}}]},
        ],
        "resolve": {"scale": {"color": "independent"}},
    }

