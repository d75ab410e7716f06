"""The rendering check: the published site opened in headless Chromium, served from a localhost
HTTP server with every other host name unresolvable.  asv's JavaScript must really run
(benchmark names and flot plots in the DOM), every front-page chart must be drawn as SVG, and no
element may still point at an external host."""
from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from .errors import SiteError
from .htmlscan import external_resources, html_files, parse_tags
from .page import ASV_PAGE, FRONT_PAGE_MARKER

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium(explicit: str | None = None) -> str:
    """Path of a Chromium binary: ``explicit``, ``$CHROMIUM`` or the first on PATH."""
    for candidate in (explicit, os.environ.get("CHROMIUM"), *CHROMIUM_CANDIDATES):
        if candidate and (found := shutil.which(candidate)):
            return found
    raise SiteError(
        "chromium not found: install it with `apt-get install -y chromium` "
        "(or set CHROMIUM=/path/to/chrome)"
    )


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass  # per-request lines would drown the check's own output


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # Chromium drops connections it no longer needs (e.g. when a failed
        # script sends it to error.html); that is not an error of the site.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class serve_directory:
    """Context manager: serve ``root`` on 127.0.0.1 (free port) in a thread.

    asv's pages load ``index.json`` and the graph data with XHR, which Chromium
    refuses for file:// pages, so the site is viewed over HTTP like
    ``asv preview`` does.
    """

    def __init__(self, root: Path):
        handler = functools.partial(QuietHandler, directory=str(root))
        self.server = QuietServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "serve_directory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()



def run_chromium(chromium: str, url: str, *, screenshot: Path | None = None,
                 window: str = "1280,900", timeout: float = 90) -> str:
    """Load ``url`` headless and return the DOM after scripts ran (or take a screenshot).

    All host names except 127.0.0.1 are made unresolvable, so anything the
    page still wanted from the internet fails exactly as it would offline,
    even on a machine that has network access.
    """
    with tempfile.TemporaryDirectory(prefix="etbench-chromium-") as profile:
        cmd = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--hide-scrollbars",
            f"--user-data-dir={profile}", "--virtual-time-budget=10000",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            # Containers often have a tiny /dev/shm, which makes Chromium crash.
            "--disable-dev-shm-usage",
            f"--window-size={window}",
        ]
        cmd += [f"--screenshot={Path(screenshot).resolve()}"] if screenshot else ["--dump-dom"]
        try:
            proc = subprocess.run(cmd + [url], capture_output=True, text=True,
                                  timeout=timeout, cwd=profile)
        except subprocess.TimeoutExpired:
            raise SiteError(f"chromium did not finish loading {url} within {timeout:.0f} s") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SiteError(f"chromium exited with status {proc.returncode}: {last}")
    if screenshot and not Path(screenshot).is_file():
        raise SiteError(f"chromium wrote no screenshot to {screenshot}")
    return proc.stdout



def check_front_page(dom: str, source: str) -> str:
    """Check the rendered DOM of etbench's front page (``source``: the page as published): every
    chart of its spec block was drawn by vega-embed as SVG (each ``.chart`` element marked
    ``data-rendered``), none failed, the plotting library loaded, the tables are sortable and
    nothing points at another host.  Returns a summary."""
    match = re.search(r'<script type="application/json" id="etbench-specs">(.*?)</script>', source, re.S)
    if not match:
        raise SiteError("the front page has no chart specs (id=etbench-specs)")
    expected = len(json.loads(match.group(1).replace("<\\/", "</")))
    tags = parse_tags(dom)
    body = next((t for t in tags if t.name == "body"), None)
    if body is not None and body.get("data-vega-missing"):
        raise SiteError("the front page's plotting library (vega-embed) did not load")
    failed = [t.get("id") for t in tags if t.get("data-error") is not None]
    if failed:
        raise SiteError(f"{len(failed)} front-page charts failed to render (first: {failed[0]})")
    charts = [t for t in tags if "chart" in (t.get("class") or "").split()]
    undrawn = [t.get("id") for t in charts if t.get("data-rendered") != "yes"]
    if undrawn:
        raise SiteError(f"{len(undrawn)} of {len(charts)} front-page charts were not drawn (first: {undrawn[0]})")
    rendered = sum(1 for t in tags if t.get("data-rendered") == "yes")
    svgs = sum(1 for t in tags if t.name == "svg" and "marks" in (t.get("class") or "").split())
    if rendered < expected or svgs < expected:
        raise SiteError(f"only {rendered} of {expected} front-page charts were drawn ({svgs} SVG plots)")
    tables = sum(1 for t in tags if t.name == "table" and "sortable" in (t.get("class") or "").split())
    if tables == 0:
        raise SiteError("the front page has no sortable table")
    left = external_resources(tags)
    if left:
        raise SiteError(f"the rendered front page still references an external resource: {left[0]}")
    return f"front page: {rendered} of {expected} charts drawn as SVG by the vendored vega-embed, {tables} sortable tables"


def asv_benchmarks(html_dir: Path) -> list[str]:
    """The benchmark names of asv's ``index.json``; raises where there is none."""
    index_json = html_dir / "index.json"
    if not index_json.is_file():
        raise SiteError(f"{index_json} not found: run `asv publish` first")
    names = sorted(json.loads(index_json.read_text())["benchmarks"])
    if not names:
        raise SiteError(f"{index_json} lists no benchmarks: nothing would render")
    return names


def check_static_html(html_dir: Path) -> None:
    """No HTML file of the site loads anything from another host."""
    for path in html_files(html_dir):
        left = external_resources(parse_tags(path.read_text(encoding="utf-8")))
        if left:
            raise SiteError(
                f"{path.relative_to(html_dir)} loads {left[0]}: run `python -m impls.site vendor {html_dir}`"
            )


def check_asv_dom(dom: str, list_dom: str, names: list[str]) -> int:
    """asv's page as rendered: every benchmark in the grid, flot plots drawn, the benchmark list
    sorted (stupidtable ran), no external resource.  Returns the number of plot canvases."""
    tags = parse_tags(dom)
    # A script that fails to load makes asv's onerror handler navigate to error.html.
    if "<title>airspeed velocity error</title>" in dom:
        raise SiteError("asv showed error.html: a JavaScript dependency failed to load")
    links = {tag.get("href") for tag in tags if tag.name == "a"}
    missing = [name for name in names if f"#{name}" not in links]
    if missing:
        raise SiteError(
            f"{len(missing)} of {len(names)} benchmarks not rendered by asv's JavaScript "
            f"(first: {missing[0]}); the page's scripts did not run or index.json did not load"
        )
    canvases = sum(1 for tag in tags if tag.name == "canvas")
    if canvases == 0:
        raise SiteError("no flot plot was drawn (no <canvas> in the rendered page)")
    # The benchmark list sorts its table on load; asv marks the sorted column
    # with an asc/desc class from stupidtable's callback, proving that plugin ran.
    list_tags = parse_tags(list_dom)
    sorted_th = [t for t in list_tags if t.name == "th"
                 and {"asc", "desc"} & set((t.get("class") or "").split())]
    if not sorted_th:
        raise SiteError("the benchmark list (#/summarylist) was not rendered and sorted")
    left = external_resources(tags) or external_resources(list_tags)
    if left:
        raise SiteError(f"the rendered page still references an external resource: {left[0]}")
    return canvases


def check_site(html_dir: Path, screenshot: Path | None = None,
               chromium: str | None = None, page: str = "",
               asv_screenshot: Path | None = None) -> list[str]:
    """Verify that the published site renders offline; return a summary.

    Checks, in order: the HTML files load nothing from other hosts; Chromium,
    fed the site over localhost with the internet unreachable, ends up on
    asv's page (``asv.html`` when etbench's report is the front page, else
    ``index.html``) rather than its "dependencies failed to load" page; every
    benchmark of ``index.json`` appears in the grid that asv's JavaScript
    builds (the static template contains none); flot drew plots (canvases);
    the benchmark list page was built and sorted (stupidtable ran); the
    rendered DOM references no external resource; and, with etbench's front
    page, :func:`check_front_page`.  The screenshot shows the front page (asv's
    page where there is none; ``page`` is an optional asv route for it, e.g.
    ``"#bench.time_x"``); ``asv_screenshot`` saves asv's page too.  Raises
    ``SiteError`` describing the first failure.
    """
    html_dir = Path(html_dir)
    names = asv_benchmarks(html_dir)
    check_static_html(html_dir)
    front_source = (html_dir / "index.html").read_text(encoding="utf-8") if (html_dir / "index.html").is_file() else ""
    has_front = FRONT_PAGE_MARKER in front_source
    asv_page = ASV_PAGE if has_front else "index.html"
    if not (html_dir / asv_page).is_file():
        raise SiteError(f"{html_dir / asv_page} not found: run `asv publish` first")

    exe = find_chromium(chromium)
    with serve_directory(html_dir) as server:
        dom = run_chromium(exe, server.url + asv_page)
        list_dom = run_chromium(exe, server.url + asv_page + "#/summarylist")
        front_dom = run_chromium(exe, server.url + "index.html") if has_front else ""
        for shot, url, window in ((screenshot, "index.html" if has_front else asv_page + page, "1400,3200"),
                                  (asv_screenshot, asv_page + page, "1280,900")):
            if shot:
                Path(shot).parent.mkdir(parents=True, exist_ok=True)
                run_chromium(exe, server.url + url, screenshot=shot, window=window)

    canvases = check_asv_dom(dom, list_dom, names)
    summary = [f"rendered {len(names)} benchmarks, {canvases} plot canvases and the "
               f"sorted benchmark list on {asv_page}, no external resources"]
    if has_front:
        summary.append(check_front_page(front_dom, front_source))
    for shot in (screenshot, asv_screenshot):
        if shot:
            summary.append(f"screenshot: {shot}")
    return summary
