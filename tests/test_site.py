"""Tests of impls.site: vendoring asv's CDN assets and checking the rendered site.

The unit tests use a fake npm package and need neither network nor browser.
The end-to-end test builds a tiny asv project, publishes it, vendors it from
the npm registry (tarballs cached in <repo>/.cache/site-vendor) and renders it
in headless Chromium; it is skipped when Chromium is not installed
(`apt-get install -y chromium`) or the registry can't be reached.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import asv
from impls import site
from impls.site import vendor as site_vendor
from test_frontpage import parallel_results, results  # noqa: F401 - fixtures
from test_frontpage import results as frontpage_results  # noqa: F401 - fixture

REPO_ROOT = Path(__file__).resolve().parents[1]
VENDOR_CACHE = REPO_ROOT / ".cache" / "site-vendor"

CDN_JS = "https://cdn.example.org/fakelib/1.0.0/fakelib.min.js"
CDN_CSS = "https://cdn.example.org/fakelib/1.0.0/fakelib.min.css"
JS_BYTES = b"window.fakelib = 1;\n"
CSS_BYTES = b"body{background:url(../fonts/x.woff)}\n"


def _npm_tarball(files: dict[str, bytes]) -> bytes:
    """An npm-style .tgz: every file under the top-level ``package/`` folder."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """A cache dir pre-filled with one fake package, and asset tables pointing at it.

    npm is made unavailable, so any attempt to download fails the test loudly
    instead of reaching the network.
    """
    cache = tmp_path / "cache"
    cache.mkdir()
    tgz = _npm_tarball({
        "dist/fakelib.min.js": JS_BYTES,
        "dist/fakelib.min.css": CSS_BYTES,
        "fonts/x.woff": b"font",
        "README.md": b"not copied",
    })
    (cache / "fakelib-1.0.0.tgz").write_bytes(tgz)
    monkeypatch.setattr(site_vendor, "PACKAGE_INTEGRITY", {"fakelib@1.0.0": site.sri(tgz, "sha512")})
    monkeypatch.setattr(site_vendor, "CDN_ASSETS", {
        CDN_JS: site.Asset("fakelib@1.0.0", "dist/fakelib.min.js"),
        CDN_CSS: site.Asset("fakelib@1.0.0", "dist/fakelib.min.css", exact=False,
                            note="test", companions=("fonts/",)),
    })
    monkeypatch.setattr(site_vendor.shutil, "which", lambda name: None)
    return cache


def _write_site(html_dir: Path, js_integrity: str) -> None:
    html_dir.mkdir()
    (html_dir / "index.html").write_text(f"""<!doctype html>
<html><head>
<script src="{CDN_JS}" integrity="{js_integrity}" crossorigin="anonymous" onerror="js_load_failure()"></script>
<link rel="stylesheet" href="{CDN_CSS}" crossorigin="anonymous"/>
<script src="asv.js"></script>
</head><body><a href="https://github.com/airspeed-velocity/asv/">asv</a></body></html>
""")
    (html_dir / "sub").mkdir()
    (html_dir / "sub" / "page.html").write_text(f'<script src="{CDN_JS}"></script>\n')


def test_vendor_rewrites_cdn_links_to_local_copies(tmp_path, fake_registry):
    html_dir = tmp_path / "html"
    _write_site(html_dir, site.sri(JS_BYTES, "sha256"))

    vendored = site.vendor_offline(html_dir, fake_registry)

    assert vendored == ["vendor/fakelib-1.0.0/dist/fakelib.min.css",
                        "vendor/fakelib-1.0.0/dist/fakelib.min.js"]
    assert (html_dir / "vendor/fakelib-1.0.0/dist/fakelib.min.js").read_bytes() == JS_BYTES
    # The stylesheet's relative font URL must keep working.
    assert (html_dir / "vendor/fakelib-1.0.0/fonts/x.woff").is_file()
    assert not (html_dir / "vendor/fakelib-1.0.0/README.md").exists()

    index = (html_dir / "index.html").read_text()
    assert ('<script src="vendor/fakelib-1.0.0/dist/fakelib.min.js" '
            'onerror="js_load_failure()">') in index
    assert '<link rel="stylesheet" href="vendor/fakelib-1.0.0/dist/fakelib.min.css" />' in index
    assert "integrity" not in index and "crossorigin" not in index
    assert "cdn.example.org" not in index
    # Local scripts and plain hyperlinks are left exactly as they were.
    assert '<script src="asv.js"></script>' in index
    assert '<a href="https://github.com/airspeed-velocity/asv/">' in index
    # Pages in sub-folders get a path relative to themselves.
    sub = (html_dir / "sub" / "page.html").read_text()
    assert 'src="../vendor/fakelib-1.0.0/dist/fakelib.min.js"' in sub

    # Running again leaves the HTML alone but restores a lost copy.
    (html_dir / "vendor/fakelib-1.0.0/dist/fakelib.min.js").unlink()
    assert site.vendor_offline(html_dir, fake_registry) == vendored
    assert (html_dir / "index.html").read_text() == index
    assert (html_dir / "vendor/fakelib-1.0.0/dist/fakelib.min.js").read_bytes() == JS_BYTES


@pytest.mark.parametrize("tag", ['<script src="https://unpkg.com/other@2/x.js">',
                                 '<img src="https://example.org/logo.png"><script>'])
def test_vendor_refuses_unknown_external_url_without_touching_html(tmp_path, fake_registry, tag):
    html_dir = tmp_path / "html"
    _write_site(html_dir, "")
    index = html_dir / "index.html"
    index.write_text(index.read_text().replace('<script src="asv.js">', tag))
    before = index.read_text()

    with pytest.raises(site.SiteError, match="no local counterpart for .*https://"):
        site.vendor_offline(html_dir, fake_registry)
    assert index.read_text() == before
    assert not (html_dir / "vendor").exists()


def test_vendor_rejects_copy_that_differs_from_cdn_hash(tmp_path, fake_registry):
    html_dir = tmp_path / "html"
    _write_site(html_dir, site.sri(b"other bytes", "sha256"))
    with pytest.raises(site.SiteError, match="does not match the integrity hash"):
        site.vendor_offline(html_dir, fake_registry)


def test_corrupt_cache_is_refetched_not_trusted(tmp_path, fake_registry):
    (fake_registry / "fakelib-1.0.0.tgz").write_bytes(b"truncated")
    html_dir = tmp_path / "html"
    _write_site(html_dir, "")
    # npm is unavailable in this fixture, so the re-fetch fails with a clear message.
    with pytest.raises(site.FetchError, match="npm is needed once to fetch fakelib@1.0.0"):
        site.vendor_offline(html_dir, fake_registry)


def test_external_resources_ignores_hyperlinks():
    tags = site.parse_tags(
        '<a href="https://x.org/">x</a><img src="logo.png">'
        '<img srcset="a.png 1x, https://cdn.x.org/b.png 2x">'
        '<div style="background: url(https://x.org/bg.png)"></div>'
        '<link rel="icon" href="//cdn.x.org/i.ico">'
    )
    found = site.external_resources(tags)
    assert len(found) == 3
    assert "https://cdn.x.org/b.png" in found[0]
    assert "bg.png" in found[1] and "i.ico" in found[2]


def test_table_covers_every_cdn_url_of_installed_asv():
    """Fails on an asv upgrade that adds or bumps a CDN dependency."""
    template = Path(asv.__file__).parent / "www" / "index.html"
    tags = site.parse_tags(template.read_text(encoding="utf-8"))
    urls = [t.get("src") or t.get("href") for t in tags if t.name in ("script", "link")]
    cdn = [u for u in urls if site.is_external(u)]
    assert cdn, "asv's template no longer uses CDNs? then vendoring may be unnecessary"
    assert sorted(cdn) == sorted(site.ASV_CDN_ASSETS)
    assert {a.package for a in site.CDN_ASSETS.values()} == set(site.PACKAGE_INTEGRITY)
    # The front page's plotting library comes from the same pinned registry packages.
    assert site.CDN_ASSETS == {**site.ASV_CDN_ASSETS, **site.REPORT_CDN_ASSETS}
    assert {a.package for a in site.REPORT_CDN_ASSETS.values()} == {site.VEGA, site.VEGA_LITE, site.VEGA_EMBED}


def test_cli_reports_one_line_errors(tmp_path, capsys):
    assert site.main(["vendor", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run `asv publish` first" in err


# --------------------------------------------------------------------------
# End to end: a real asv project, published, vendored and rendered.
# --------------------------------------------------------------------------

BENCHMARKS = '''\
import os
import sys


def track_value():
    """Changes from run to run, so the graphs have a visible line."""
    return float(os.environ["TP_VALUE"])


def track_profile_env():
    return 1 if os.environ.get("ETBENCH_PROFILE") == "quick" else 0


def track_pythonpath_in_environ():
    return 1 if "PYTHONPATH" in os.environ else 0


def track_pythonpath_on_sys_path():
    return 1 if os.environ.get("TP_MARKER_DIR", "?") in sys.path else 0


def time_small_sum():
    sum(range(1000))
'''


@pytest.fixture(scope="module")
def asv_project(tmp_path_factory):
    """A git repo with three commits, each benchmarked by ``asv run --python=same``.

    Returns the project dir; results in ``results/``, site in ``html/``.
    HOME points into the temp dir because ``asv machine`` writes
    ``~/.asv-machine.json``.
    """
    root = tmp_path_factory.mktemp("asvproj")
    home = root / "home"
    home.mkdir()
    proj = root / "proj"
    (proj / "tinybench").mkdir(parents=True)
    (proj / "tinybench" / "__init__.py").write_text("")
    (proj / "tinybench" / "bench_tiny.py").write_text(BENCHMARKS)
    (proj / "asv.conf.json").write_text(json.dumps({
        "version": 1, "project": "tiny", "project_url": "https://example.org/tiny",
        "repo": ".", "branches": ["HEAD"], "environment_type": "existing",
        "benchmark_dir": "tinybench", "results_dir": "results", "html_dir": "html",
    }))
    marker = str(root / "marker-on-pythonpath")
    env = dict(os.environ, HOME=str(home), ETBENCH_PROFILE="quick",
               PYTHONPATH=marker, TP_MARKER_DIR=marker,
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.org")

    def run(*cmd, **extra):
        proc = subprocess.run(cmd, cwd=proj, env=dict(env, **extra),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    asv_cmd = (sys.executable, "-m", "asv")
    run("git", "init", "-q")
    run(*asv_cmd, "machine", "--yes", "--machine", "testbox")
    for i, value in enumerate(("3", "5", "4")):
        (proj / "VERSION").write_text(f"{i}\n")
        run("git", "add", "-A")
        run("git", "commit", "-qm", f"commit {i}")
        commit = run("git", "rev-parse", "HEAD").strip()
        run(*asv_cmd, "run", "--python=same", "--quick", "--machine", "testbox",
            "--set-commit-hash", commit, "--show-stderr", TP_VALUE=value)
    run(*asv_cmd, "publish")
    return proj


def test_asv_passes_environment_but_drops_pythonpath_from_sys_path(asv_project):
    """Documents asv 0.6 behaviour the benchmarks rely on (``--python=same``)."""
    # One result file per commit; every run got the same environment.
    result_files = sorted(p for p in (asv_project / "results" / "testbox").glob("*.json")
                          if p.name != "machine.json")
    assert len(result_files) == 3
    results = json.loads(result_files[0].read_text())["results"]
    value = {name: res[0][0] for name, res in results.items()}  # [values, params, ...]
    assert value["bench_tiny.track_profile_env"] == 1          # env vars pass through
    assert value["bench_tiny.track_pythonpath_in_environ"] == 1  # PYTHONPATH stays in os.environ...
    assert value["bench_tiny.track_pythonpath_on_sys_path"] == 0  # ...but is taken off sys.path


def test_published_site_renders_offline(asv_project, tmp_path):
    try:
        chromium = site.find_chromium()
    except site.SiteError as err:
        pytest.skip(str(err))
    html_dir = asv_project / "html"
    try:
        vendored = site.vendor_offline(html_dir, VENDOR_CACHE)
    except site.FetchError as err:
        pytest.skip(f"npm registry not reachable: {err}")
    assert "vendor/jquery-3.3.1/dist/jquery.min.js" in vendored

    shot = tmp_path / "site.png"
    summary = site.check_site(html_dir, screenshot=shot, chromium=chromium)
    assert "5 benchmarks" in summary[0]
    assert shot.stat().st_size > 10_000  # a blank page is ~2-5 kB

    # A site whose scripts can't load must be caught, not pass silently.
    os.remove(html_dir / "vendor" / "jquery-3.3.1" / "dist" / "jquery.min.js")
    with pytest.raises(site.SiteError, match="error.html"):
        site.check_site(html_dir, chromium=chromium)


def test_front_page_plots_are_drawn_offline_by_the_vendored_library(asv_project, frontpage_results, tmp_path):
    """etbench's report as the front page of a real asv site: vendored, then rendered in Chromium
    with every other host unreachable; the Vega-Lite charts must be drawn as SVG."""
    try:
        chromium = site.find_chromium()
    except site.SiteError as err:
        pytest.skip(str(err))
    html_dir = tmp_path / "site"
    shutil.copytree(asv_project / "html", html_dir)  # the module's site stays as published
    results = frontpage_results
    site.build_front_page(html_dir, results / "runs", results / "plots", results / "isoflop")
    try:
        vendored = site.vendor_offline(html_dir, VENDOR_CACHE)
    except site.FetchError as err:
        pytest.skip(f"npm registry not reachable: {err}")
    assert "vendor/vega-embed-7.3.0/build/vega-embed.min.js" in vendored
    page = (html_dir / "index.html").read_text()
    assert "cdn.jsdelivr.net" not in page and 'src="vendor/vega-6.4.0/build/vega.min.js"' in page

    shot = tmp_path / "front.png"
    summary = site.check_site(html_dir, screenshot=shot, chromium=chromium)
    assert "5 benchmarks" in summary[0] and "asv.html" in summary[0]  # asv's page still works
    assert summary[1].startswith("front page: 5 of 5 charts drawn as SVG")
    assert shot.stat().st_size > 30_000

    # Without the plotting library the check must fail, not pass on the static markup.
    os.remove(html_dir / "vendor" / "vega-embed-7.3.0" / "build" / "vega-embed.min.js")
    with pytest.raises(site.SiteError, match="vega-embed\\) did not load"):
        site.check_site(html_dir, chromium=chromium)


def test_model_parallel_charts_are_drawn_offline(asv_project, parallel_results, tmp_path):
    """The model-parallel section's charts count in the check: every chart of the page, these
    three included, drawn as SVG by the vendored vega-embed."""
    try:
        chromium = site.find_chromium()
    except site.SiteError as err:
        pytest.skip(str(err))
    html_dir = tmp_path / "site"
    shutil.copytree(asv_project / "html", html_dir)
    site.build_front_page(html_dir, parallel_results / "runs", parallel_results / "plots", parallel_results / "isoflop")
    try:
        site.vendor_offline(html_dir, VENDOR_CACHE)
    except site.FetchError as err:
        pytest.skip(f"npm registry not reachable: {err}")
    page = (html_dir / "index.html").read_text()
    section = page[page.index('<section class="family" id="model-parallel">'):]
    assert section.count('<div class="chart"') >= 3
    n = page.count('<div class="chart"')
    summary = site.check_site(html_dir, chromium=chromium)
    assert summary[1].startswith(f"front page: {n} of {n} charts drawn as SVG")


def _front_dom(charts: str) -> str:
    return f'<html><body>{charts}<table class="sortable"></table></body></html>'


def test_check_front_page_wants_every_chart_marked_rendered():
    source = '<script type="application/json" id="etbench-specs">{"chart-1": {}, "chart-2": {}}</script>'
    drawn = '<div class="chart" id="chart-{}" data-rendered="yes"><svg class="marks"></svg></div>'
    ok = _front_dom(drawn.format(1) + drawn.format(2))
    assert site.check_front_page(ok, source).startswith("front page: 2 of 2 charts drawn")
    # A chart element that vega-embed never finished (a spec missing from the block, or still
    # pending) fails the check even when the counts of the spec block are met.
    pending = _front_dom(drawn.format(1) + drawn.format(2) + '<div class="chart" id="chart-3"></div>')
    with pytest.raises(site.SiteError, match="1 of 3 front-page charts were not drawn \\(first: chart-3\\)"):
        site.check_front_page(pending, source)
    failed = _front_dom(drawn.format(1) + '<div class="chart" id="chart-2" data-error="Error: bad"></div>')
    with pytest.raises(site.SiteError, match="failed to render"):
        site.check_front_page(failed, source)
