"""Tests of the site's front page (impls.site.build_front_page): etbench's report from synthetic
records, with asv's page moved alongside.  No browser, no network: rendering is checked by the
end-to-end test in test_site.py."""
from __future__ import annotations

import json
import re

import pytest

from impls import site
from test_report import HASH_A, make_interleaved, make_record, make_refused

ASV_INDEX = "<!doctype html><html><head><title>airspeed velocity</title></head><body>asv</body></html>"


def _record(label, stem_speed, *, techniques=(), noisy=False, samples=(0.50, 0.52, 0.48, 0.51, 0.49)):
    record = make_record(label, HASH_A, speed=stem_speed, techniques=techniques)
    record["step_time"] = {"median": 0.5, "ci95": [0.4, 0.6], "samples": list(samples)}
    record["load"] = {"noisy": noisy}
    return record


@pytest.fixture
def results(tmp_path):
    """results/{html (as asv publishes it), runs/<two commits>, plots, isoflop} in a temp dir."""
    html = tmp_path / "html"
    html.mkdir()
    (html / "index.html").write_text(ASV_INDEX)
    (html / "index.json").write_text(json.dumps({"benchmarks": {
        "bench_techniques.Techniques.track_seconds_per_mtok": {
            "params": [["'baseline'", "'bf16'", "'fp16'"]], "param_names": ["variant"]},
        "bench_techniques.Techniques.track_val_loss_at_budget": {
            "params": [["'baseline'", "'bf16'", "'fp16'"]], "param_names": ["variant"]},
    }}))
    runs = tmp_path / "runs"
    for commit, speed in (("aaaaaaaaaaaa", 1000.0), ("bbbbbbbbbbbb", 1100.0)):
        family = runs / commit / "technique"
        family.mkdir(parents=True)
        (family / "technique-baseline.json").write_text(json.dumps(_record("nano/adamw", speed)))
        (family / "technique-bf16.json").write_text(json.dumps(
            _record("nano/adamw/bf16", 2 * speed, techniques=["bf16"], noisy=True)))
    newest = runs / "bbbbbbbbbbbb" / "technique"
    (newest / "technique-fp16.json").write_text(json.dumps(make_refused()))
    (newest / "compare-technique.json").write_text(json.dumps(make_interleaved()))
    # The older commit's records must count as older whatever the file system's clock does.
    import os
    for path in (runs / "aaaaaaaaaaaa").rglob("*.json"):
        os.utime(path, (1_000_000, 1_000_000))
    plots = tmp_path / "plots" / "bbbbbbbbbbbb"
    plots.mkdir(parents=True)
    (plots / "throughput_memory.png").write_bytes(b"\x89PNG fake")
    (plots / "summary.csv").write_text("family,label\n")
    iso = tmp_path / "isoflop" / "bbbbbbbbbbbb-quick"
    iso.mkdir(parents=True)
    (iso / "points.csv").write_text(
        "variant,budget,size,params,steps,tokens,final_val_loss,seconds_per_step,status\n"
        + "".join(f"{v},1e10,S{i},{p},10,100,{l},0.01,ok\n" for v in ("baseline", "mod")
                  for i, (p, l) in enumerate(((1000, 2.0), (2000, 1.8), (4000, 1.9)))))
    (iso / "fits.csv").write_text(
        "variant,budget,n_sizes,status,a,b,c,n_opt,n_opt_lo,n_opt_hi,log_n_opt,log_n_opt_se,loss_opt,loss_opt_se,"
        "nearest_size,nearest_params,nearest_seconds_per_step\n"
        "baseline,1e10,3,ok,0.5,-7.6,30.6,2000,1500,2600,7.6,0.1,1.8,0.01,S1,2000,0.01\n"
        "mod,1e10,3,ok,0.5,-7.6,30.6,2000,1500,2600,7.6,0.1,1.8,0.01,S1,2000,0.01\n")
    (iso / "routing.png").write_bytes(b"\x89PNG fake")
    return tmp_path


def _build(results, **kwargs):
    return site.build_front_page(results / "html", results / "runs", results / "plots", results / "isoflop",
                                 **kwargs)


def _specs(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="etbench-specs">(.*?)</script>', page, re.S)
    return json.loads(match.group(1).replace("<\\/", "</"))


def test_front_page_replaces_asv_index_and_shows_the_report(results):
    summary = _build(results)
    html = results / "html"
    assert (html / "asv.html").read_text() == ASV_INDEX  # asv's page kept, alongside
    page = (html / "index.html").read_text()
    assert site.FRONT_PAGE_MARKER in page
    assert "commit bbbbbbbbbbbb" in page and "2 runs, 1 refused, 1 interleaved comparisons, 1 isoFLOP" in summary[0]
    assert 'id="family-technique"' in page and 'id="isoflop-bbbbbbbbbbbb-quick"' in page
    # Sortable tables (markup and the script), CIs, the load flag.
    assert '<table class="sortable" id=\'table-technique\'>' in page and "table.sortable" in page
    assert "addEventListener('click'" in page
    assert '<td class="text" data-sort="0.5">0.5 [0.4, 0.6]</td>' in page
    assert '<tr class="noisy">' in page
    # The refused record: a row without numbers, and the reason; never a chart point.
    refused_row = re.search(r'<tr class="refused">(.*?)</tr>', page).group(1)
    assert "nano/adamw/fp16" in refused_row and "REFUSED" in refused_row
    assert "2,000" not in refused_row and "%" not in refused_row
    assert "not plotted: MFU 280.0% exceeds 100%: peak too low" in page
    specs = json.dumps(_specs(page))
    assert "nano/adamw/fp16" not in specs
    # The interleaved comparison: table with verdicts and a chart.
    assert "<h3>Interleaved comparison technique vs baseline" in page
    assert "1.500 [1.400, 1.600]" in page and '<td class="text faster">faster</td>' in page
    # Links into asv: the family's graphs, and each run's benchmark with its parameter.
    assert 'href="asv.html#bench_techniques.Techniques.track_val_loss_at_budget"' in page
    assert 'href="asv.html#bench_techniques.Techniques.track_seconds_per_mtok?p-variant=%27bf16%27"' in page
    assert 'href="asv.html#/regressions"' in page
    # Static PNGs copied next to the page and linked.
    assert (html / "report" / "bbbbbbbbbbbb" / "throughput_memory.png").is_file()
    assert 'href="report/bbbbbbbbbbbb/throughput_memory.png"' in page
    assert (html / "report" / "isoflop-bbbbbbbbbbbb-quick" / "routing.png").is_file()
    # The plotting library is named by its CDN URL only, for `vendor` to replace.
    assert [u for u in re.findall(r'<script src="([^"]+)"', page)] == list(site.REPORT_CDN_ASSETS)


def test_front_page_charts_are_vega_lite_specs_with_tooltips(results):
    _build(results)
    specs = _specs((results / "html" / "index.html").read_text())
    # interleaved, technique comparison, loss vs FLOPs, throughput/memory, isoFLOP
    assert len(specs) == 5
    text = json.dumps(specs)
    assert all(s["$schema"] == site.VEGA_LITE_SCHEMA for s in specs.values())
    assert '"tooltip"' in text and '"s/step [95% CI]"' in text and '"techniques"' in text
    iso = next(s for s in specs.values() if "facet" in s)
    kinds = {v["kind"] for v in iso["data"]["values"]}
    assert kinds == {"point", "fit", "optimum"}
    assert "NaN" not in text  # strict JSON for the browser


def test_compare_page_latest_vs_previous(results):
    summary = _build(results)
    assert any("compare.html: bbbbbbbbbbbb vs aaaaaaaaaaaa" in line for line in summary)
    page = (results / "html" / "index.html").read_text()
    assert 'href="compare.html">compare with aaaaaaaaaaaa</a>' in page
    compare = (results / "html" / "compare.html").read_text()
    assert "B = bbbbbbbbbbbb vs A = aaaaaaaaaaaa" in compare and "technique/technique-bf16" in compare
    assert "noisy" in compare and "only in B" in compare  # fp16 and the interleaved record are new


def test_rebuild_keeps_asv_page_and_no_runs_leaves_the_site_alone(results, tmp_path):
    _build(results)
    _build(results)  # the front page is never mistaken for asv's index
    assert (results / "html" / "asv.html").read_text() == ASV_INDEX

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "index.html").write_text(ASV_INDEX)
    with pytest.raises(site.NoRunsError):
        site.build_front_page(bare, tmp_path / "no-runs")
    assert (bare / "index.html").read_text() == ASV_INDEX and not (bare / "asv.html").exists()
    assert site.main(["build", str(bare), "--runs-root", str(tmp_path / "no-runs")]) == 0


def test_build_cli_rejects_missing_runs_dir(results, capsys):
    missing = results / "runs" / "nope"
    assert site.main(["build", str(results / "html"), "--runs", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0]


def test_front_page_data_parallel_section(results):
    """Records with model_states/comm blocks and an ``etbench comm`` record give the data-parallel
    section: Vega-Lite specs holding the measured and formula values, and the memory table."""
    from test_report import DP_PSI, make_comm_record, make_dp_record

    family = results / "runs" / "bbbbbbbbbbbb" / "dataparallel"
    family.mkdir()
    for name, record in {"ddp-1": make_dp_record("ddp", 1, 0, 1000.0, comm_bytes=0),
                         "ddp-2": make_dp_record("ddp", 2, 0, 1800.0, comm_bytes=4 * DP_PSI),
                         "zero3-2": make_dp_record("zero:stage=3", 2, 3, 1500.0, comm_bytes=12 * DP_PSI)}.items():
        (family / f"{name}.json").write_text(json.dumps(record))
    (family / "comm-ws2.json").write_text(json.dumps(make_comm_record()))
    (results / "plots" / "bbbbbbbbbbbb" / "data_parallel_model_states.png").write_bytes(b"\x89PNG fake")
    _build(results)
    page = (results / "html" / "index.html").read_text()
    assert '<section class="family" id="data-parallel">' in page and 'href="#data-parallel"' in page
    assert 'href="report/bbbbbbbbbbbb/data_parallel_model_states.png"' in page
    specs = [s for s in _specs(page).values() if isinstance(s.get("title"), dict)]
    states = next(s for s in specs if s["title"]["text"] == "Per-rank model states vs world size")
    values = states["data"]["values"]
    measured = next(v for v in values if v["kind"] == "measured" and v["technique"] == "zero:stage=3"
                    and v["component"] == "total model states")
    assert measured["MiB"] == pytest.approx(16 * DP_PSI / 2 / 2**20) and measured["measured / formula"] == 1.0
    formula = [v["MiB"] for v in values if v["kind"] == "formula" and v["technique"] == "zero:stage=3"
               and v["component"] == "optimizer state"]
    assert formula == pytest.approx([8 * DP_PSI / 2**20, 8 * DP_PSI / 2 / 2**20])
    scaling = next(s for s in specs if s["title"]["text"] == "Scaling efficiency")
    assert {(v["technique"], v["n_d"]): v["efficiency"] for v in scaling["data"]["values"]}[("ddp", 2)] == pytest.approx(0.9)
    comm = next(s for s in specs if s["title"]["text"].startswith("Communication volume"))
    ddp2 = next(v for v in comm["data"]["values"] if v["row"] == "ddp · N=2" and v["what"] == "measured")
    assert ddp2["ratio (paper)"] == 0.5 and ddp2["ratio (payload)"] == 1.0
    busbw = next(s for s in specs if s["title"]["text"] == "Collective bandwidth vs message size")
    ring = [v["GB/s"] for v in busbw["data"]["values"] if v["scheme"] == "ring"]
    assert ring == pytest.approx([1024 * 8 ** i / (1e-3 * 2 ** i) / 1e9 for i in range(3)])  # 2 ranks: busbw = algbw
    # The memory table: Llama-7B under DDP does not fit 80 GB, under ZeRO-3 with 8 ranks it does.
    table = re.search(r"<table class=\"sortable\" id='data-parallel-memory'>(.*?)</table>", page, re.S).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", table)
    llama_ddp = next(r for r in rows if ">llama-7b<" in r and ">DDP<" in r and 'data-sort="8"' in r)
    assert ">NO<" in llama_ddp and ">100.41<" in llama_ddp
    llama_z3 = next(r for r in rows if ">llama-7b<" in r and ">ZeRO-3 P_os+g+p<" in r and 'data-sort="8"' in r)
    assert ">yes<" in llama_z3 and ">12.55<" in llama_z3
