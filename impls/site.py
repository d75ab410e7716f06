"""Make the published asv site work offline, and check that it renders.

asv 0.6's ``index.html`` loads jQuery, flot, bootstrap and three small jQuery
plugins from public CDNs, so ``results/html`` shows nothing but asv's
"failed to load" page on a machine without internet access.  This module

* ``vendor``: rewrites every CDN ``<script src>`` / ``<link href>`` in the
  published HTML to a local copy under ``<html_dir>/vendor/``, taking the files
  from npm registry packages (``npm pack``) that are downloaded once into a
  cache directory and verified against pinned tarball hashes; and
* ``check``: opens the site in headless Chromium, served from a localhost
  HTTP server with all other host names made unresolvable, and verifies that
  asv's JavaScript really ran (benchmark names and flot plots in the DOM) and
  that no element still points at an external host.

Command line::

    python -m impls.site vendor results/html [--cache .cache/site-vendor]
    python -m impls.site check results/html [--screenshot results/site.png]
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import html
import http.server
import json
import os
import posixpath
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator, Sequence

DEFAULT_CACHE_DIR = Path(".cache") / "site-vendor"
VENDOR_SUBDIR = "vendor"

# Attributes that only make sense for the CDN copy: ``integrity`` describes the
# CDN's bytes (our unminified flot differs) and ``crossorigin`` turns the load
# into a CORS request, which Chromium refuses for pages opened from file://.
_CDN_ONLY_ATTRS = frozenset({"integrity", "crossorigin", "referrerpolicy"})

# Elements/attributes whose URL the browser fetches while rendering.  Plain
# ``<a href>`` links (asv's GitHub link, the project URL) are navigation, not
# resources, so they may point anywhere.
_RESOURCE_ATTRS = {
    "script": ("src",),
    "link": ("href",),
    "img": ("src", "srcset"),
    "iframe": ("src",),
    "frame": ("src",),
    "embed": ("src",),
    "object": ("data",),
    "source": ("src", "srcset"),
    "audio": ("src",),
    "video": ("src", "poster"),
    "track": ("src",),
    "input": ("src",),
}


class SiteError(Exception):
    """A problem that the command line reports as one line and exit status 1."""


class FetchError(SiteError):
    """A package could not be obtained from the registry (offline, npm missing...)."""


@dataclass(frozen=True)
class Asset:
    """Where the local copy of one CDN URL comes from.

    ``package`` is an npm spec (``name@version``) and ``member`` the file's path
    inside the package.  ``exact`` means the file is byte-identical to the CDN's
    copy, so it must match the ``integrity`` hash asv writes next to the URL;
    otherwise ``note`` says why a same-API substitute is used.  ``companions``
    are package folders copied alongside because the file refers to them by
    relative URL (bootstrap's CSS loads ``../fonts/*``).
    """

    package: str
    member: str
    exact: bool = True
    note: str = ""
    companions: tuple[str, ...] = ()

    @property
    def local_dir(self) -> str:
        """Folder under ``vendor/`` for this package, e.g. ``jquery-3.3.1``."""
        return self.package.replace("@", "-")

    @property
    def local_path(self) -> str:
        """Path of the copy relative to the html dir (POSIX separators)."""
        return posixpath.join(VENDOR_SUBDIR, self.local_dir, self.member)


_FLOT_NOTE = (
    "cdnjs minified flot 0.8.3 itself; no registry ships those exact bytes, "
    "so the unminified 0.8.3 source from the npm package is used"
)

# Every CDN URL in asv 0.6.x's index.html (checked against asv 0.6.6) and its
# registry counterpart.  A URL missing here makes vendoring fail loudly, which
# is what should happen when a future asv adds or bumps a dependency.
CDN_ASSETS: dict[str, Asset] = {
    "https://code.jquery.com/jquery-3.3.1.min.js":
        Asset("jquery@3.3.1", "dist/jquery.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.min.js":
        Asset("flot@0.8.3", "jquery.flot.js", exact=False, note=_FLOT_NOTE),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.time.min.js":
        Asset("flot@0.8.3", "jquery.flot.time.js", exact=False, note=_FLOT_NOTE),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.selection.min.js":
        Asset("flot@0.8.3", "jquery.flot.selection.js", exact=False, note=_FLOT_NOTE),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.categories.min.js":
        Asset("flot@0.8.3", "jquery.flot.categories.js", exact=False, note=_FLOT_NOTE),
    "https://cdn.jsdelivr.net/npm/flot-orderbars@1.0.0/js/jquery.flot.orderBars.js":
        Asset("flot-orderbars@1.0.0", "js/jquery.flot.orderBars.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/stupidtable/1.0.1/stupidtable.min.js":
        Asset(
            "stupid-table-plugin@1.1.3", "stupidtable.min.js", exact=False,
            note="stupidtable 1.0.1 was never published to npm; 1.1.3 is the only "
                 "release there and keeps the stupidtable()/stupidsort() API asv uses",
        ),
    "https://cdnjs.cloudflare.com/ajax/libs/blueimp-md5/2.19.0/js/md5.min.js":
        Asset("blueimp-md5@2.19.0", "js/md5.min.js"),
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/js/bootstrap.min.js":
        Asset("bootstrap@3.1.1", "dist/js/bootstrap.min.js"),
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/css/bootstrap.min.css":
        Asset("bootstrap@3.1.1", "dist/css/bootstrap.min.css", companions=("dist/fonts/",)),
}

# sha512 of each registry tarball (npm's ``dist.integrity``).  Pinning them
# keeps publishing reproducible and lets a cached tarball be trusted offline.
PACKAGE_INTEGRITY: dict[str, str] = {
    "jquery@3.3.1": "sha512-Ubldcmxp5np52/ENotGxlLe6aGMvmF4R8S6tZjsP6Knsaxd/xp3Zrh50cG93lR6nPXyUFwzN3ZSOQI0wRJNdGg==",
    "flot@0.8.3": "sha512-xg2otcTJDvS+ERK+my4wxG/ASq90QURXtoM4LhacCq0jQW2jbyjdttbRNqU2cPykrpMvJ6b2uSp6SAgYAzj9tQ==",
    "flot-orderbars@1.0.0": "sha512-Jv51fvzevUjNXEeozpwEKfPjhiZhfiJddv0WHjduUTCmSF+7T5K7C9c9Y1wIVmUhDBv5fLMjgbwKecT0GIKPZA==",
    "stupid-table-plugin@1.1.3": "sha512-2Vk7XouQPxUQPRe9w0Fu7ZZ8kHLK7rDoLMsCgtKxRNJ7f4dSOGvW9CkHsq5wD6QsaEnWoyLBYH3xOEsrK3yWBg==",
    "blueimp-md5@2.19.0": "sha512-DRQrD6gJyy8FbiE4s+bDoXS9hiW3Vbx5uCdwvcCf3zLHL+Iv7LtGHLpr+GZV8rHG8tK766FGYBwRbu8pELTt+w==",
    "bootstrap@3.1.1": "sha512-TAzqS8E/ISpVHP29gYhy+1NSV+FJwApDVQhDfgLYsIuUDJiqJzH2DfORN5tiu+Ie2iBLrzEG34t4Rf465cigqg==",
}


# --------------------------------------------------------------------------
# HTML scanning
# --------------------------------------------------------------------------

@dataclass
class Tag:
    """One start tag as found in the source: name, attributes and exact span."""

    name: str
    attrs: list[tuple[str, str | None]]
    start: int
    end: int
    self_closing: bool

    def get(self, attr: str) -> str | None:
        return next((v for k, v in self.attrs if k == attr), None)


class _TagCollector(HTMLParser):
    """Collects start tags with their character offsets in the document."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        # HTMLParser reports (line, column); turn that into string offsets.
        self._line_starts = [0]
        for i, ch in enumerate(text):
            if ch == "\n":
                self._line_starts.append(i + 1)
        self.tags: list[Tag] = []
        self.feed(text)
        self.close()

    def _record(self, name: str, attrs, self_closing: bool) -> None:
        line, col = self.getpos()
        start = self._line_starts[line - 1] + col
        raw = self.get_starttag_text() or ""
        self.tags.append(Tag(name, list(attrs), start, start + len(raw), self_closing))

    def handle_starttag(self, tag, attrs):
        self._record(tag, attrs, False)

    def handle_startendtag(self, tag, attrs):
        self._record(tag, attrs, True)


def parse_tags(text: str) -> list[Tag]:
    """All start tags of an HTML document, in document order."""
    return _TagCollector(text).tags


def is_external(url: str | None) -> bool:
    """True for URLs a browser would fetch from another host."""
    if not url:
        return False
    u = url.strip().lower()
    return u.startswith(("http://", "https://", "//"))


def external_resources(tags: Sequence[Tag]) -> list[str]:
    """Resource URLs (scripts, styles, images...) that point at another host."""
    found = []
    for tag in tags:
        for attr in _RESOURCE_ATTRS.get(tag.name, ()):
            value = tag.get(attr)
            if attr == "srcset" and value:
                urls = [part.split()[0] for part in value.split(",") if part.strip()]
            else:
                urls = [value]
            found += [f"<{tag.name} {attr}={u!r}>" for u in urls if is_external(u)]
        style = tag.get("style") or ""
        if "url(" in style and ("http:" in style or "https:" in style or "url(//" in style):
            found.append(f"<{tag.name} style={style!r}>")
    return found


def _render_tag(tag: Tag) -> str:
    parts = [tag.name]
    for key, value in tag.attrs:
        parts.append(key if value is None else f'{key}="{html.escape(value, quote=True)}"')
    return "<" + " ".join(parts) + (" />" if tag.self_closing else ">")


# --------------------------------------------------------------------------
# Fetching packages
# --------------------------------------------------------------------------

def _sri(data: bytes, algorithm: str) -> str:
    """Subresource-Integrity string (``sha256-<base64>``) of ``data``."""
    return f"{algorithm}-" + base64.b64encode(hashlib.new(algorithm, data).digest()).decode()


def _sri_matches(data: bytes, integrity: str) -> bool:
    """Whether ``data`` satisfies an SRI attribute (any of its listed hashes)."""
    for token in integrity.split():
        algorithm = token.split("-", 1)[0]
        if algorithm in ("sha256", "sha384", "sha512") and _sri(data, algorithm) == token:
            return True
    return False


def _tarball_name(spec: str) -> str:
    # What ``npm pack`` names the file: name-version.tgz, scope folded in.
    name, version = spec.rsplit("@", 1)
    return f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"


def fetch_package(spec: str, cache_dir: Path) -> Path:
    """Return the registry tarball of ``spec``, downloading it once with ``npm pack``.

    The tarball's sha512 must equal the pinned ``PACKAGE_INTEGRITY`` value,
    both for a fresh download and for a cached file, so a corrupted or
    tampered cache is re-fetched rather than trusted.
    """
    expected = PACKAGE_INTEGRITY.get(spec)
    if expected is None:
        raise SiteError(f"no pinned integrity for npm package {spec}; add it to PACKAGE_INTEGRITY")
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = cache_dir / _tarball_name(spec)
    if cached.is_file() and _sri_matches(cached.read_bytes(), expected):
        return cached

    npm = shutil.which("npm")
    if npm is None:
        raise FetchError(
            f"npm is needed once to fetch {spec} into {cache_dir} "
            "(Debian: apt-get install -y npm)"
        )
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        proc = subprocess.run(
            [npm, "pack", spec, "--pack-destination", tmp, "--loglevel=error",
             "--ignore-scripts"],
            capture_output=True, text=True, timeout=300,
        )
        fetched = Path(tmp) / _tarball_name(spec)
        if proc.returncode != 0 or not fetched.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise FetchError(f"npm pack {spec} failed (registry unreachable?): {last}")
        if not _sri_matches(fetched.read_bytes(), expected):
            raise SiteError(f"npm tarball of {spec} does not match its pinned sha512")
        os.replace(fetched, cached)  # atomic: a half-written cache file never appears
    return cached


def _package_files(tarball: Path) -> dict[str, bytes]:
    """Regular files of an npm tarball, keyed by path without the top folder.

    npm tarballs normally wrap everything in ``package/``, but old ones may use
    another top-level folder name, so whatever it is gets stripped.
    """
    files = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for info in tar.getmembers():
            if not info.isfile():
                continue
            parts = info.name.split("/", 1)
            if len(parts) == 2 and ".." not in parts[1].split("/"):
                files[parts[1]] = tar.extractfile(info).read()
    return files


# --------------------------------------------------------------------------
# Vendoring
# --------------------------------------------------------------------------

def _html_files(html_dir: Path) -> Iterator[Path]:
    vendor_dir = html_dir / VENDOR_SUBDIR
    for path in sorted(html_dir.rglob("*.html")):
        if vendor_dir not in path.parents:
            yield path


def vendor_offline(html_dir: Path, cache_dir: Path) -> list[str]:
    """Point every CDN script/stylesheet of the published site at a local copy.

    Scans each ``*.html`` under ``html_dir`` for ``<script src>`` and
    ``<link href>`` URLs on another host, copies the matching files from their
    npm packages (see ``CDN_ASSETS``; tarballs cached in ``cache_dir``) to
    ``html_dir/vendor/`` and rewrites the tags to relative URLs, dropping the
    CDN-only ``integrity``/``crossorigin``/``referrerpolicy`` attributes.
    Files marked exact are verified against the page's own integrity hash.

    Returns the vendored paths (relative to ``html_dir``) that the pages now
    reference.  Running it again is harmless: the copies are rewritten from
    the cache and the already rewritten HTML is left as it is.  Raises
    ``SiteError`` (``FetchError`` when the registry can't be reached) before
    touching any HTML file if a CDN URL has no known local counterpart, so a
    CDN link is never silently left behind.
    """
    html_dir = Path(html_dir)
    if not (html_dir / "index.html").is_file():
        raise SiteError(f"{html_dir}/index.html not found: run `asv publish` first")

    # Pass 1: find every external script/stylesheet and make sure we know it.
    # Tags already pointing at vendor/ (an earlier run) count as needed too, so
    # re-running restores a deleted or damaged copy instead of doing nothing.
    local_to_url = {asset.local_path: url for url, asset in CDN_ASSETS.items()}
    pages: list[tuple[Path, str, list[tuple[Tag, str]]]] = []
    integrity: dict[str, str] = {}
    needed: set[str] = set()
    for page in _html_files(html_dir):
        text = page.read_text(encoding="utf-8")
        page_dir = page.parent.relative_to(html_dir).as_posix()
        hits, others = [], []
        for tag in parse_tags(text):
            attr = {"script": "src", "link": "href"}.get(tag.name)
            url = tag.get(attr) if attr else None
            if not is_external(url):
                others.append(tag)
                if url:
                    local = posixpath.normpath(posixpath.join(page_dir, url))
                    if local in local_to_url:
                        needed.add(local_to_url[local])
                continue
            if url not in CDN_ASSETS:
                raise SiteError(
                    f"{page.relative_to(html_dir)}: no local counterpart for CDN asset {url} "
                    "(add it to impls.site.CDN_ASSETS)"
                )
            if tag.get("integrity"):
                integrity[url] = tag.get("integrity")
            hits.append((tag, url))
        left = external_resources(others)
        if left:  # e.g. an external <img>: no package to take it from
            raise SiteError(f"{page.relative_to(html_dir)}: no local counterpart for {left[0]}")
        if hits:
            pages.append((page, text, hits))

    # Pass 2: materialise the needed files (one tarball per package).
    urls = sorted(needed | {url for _, _, hits in pages for _, url in hits})
    by_package: dict[str, list[str]] = {}
    for url in urls:
        by_package.setdefault(CDN_ASSETS[url].package, []).append(url)
    for spec, pkg_urls in by_package.items():
        files = _package_files(fetch_package(spec, cache_dir))
        for url in pkg_urls:
            asset = CDN_ASSETS[url]
            if asset.member not in files:
                raise SiteError(f"{spec} has no file {asset.member} (needed for {url})")
            data = files[asset.member]
            if asset.exact and url in integrity and not _sri_matches(data, integrity[url]):
                raise SiteError(f"{spec}/{asset.member} does not match the integrity hash of {url}")
            wanted = {asset.member: data}
            for folder in asset.companions:
                wanted.update({m: b for m, b in files.items() if m.startswith(folder)})
            for member, blob in wanted.items():
                target = html_dir / VENDOR_SUBDIR / asset.local_dir / member
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(blob)

    # Pass 3: rewrite the tags, last first so earlier offsets stay valid.
    for page, text, hits in pages:
        for tag, url in sorted(hits, key=lambda hit: hit[0].start, reverse=True):
            attr = "src" if tag.name == "script" else "href"
            local = posixpath.relpath(CDN_ASSETS[url].local_path,
                                      page.parent.relative_to(html_dir).as_posix())
            tag.attrs = [(k, local if k == attr else v) for k, v in tag.attrs
                         if k not in _CDN_ONLY_ATTRS]
            text = text[:tag.start] + _render_tag(tag) + text[tag.end:]
        page.write_text(text, encoding="utf-8")

    return [CDN_ASSETS[url].local_path for url in urls]


# --------------------------------------------------------------------------
# Rendering check
# --------------------------------------------------------------------------

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


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass  # per-request lines would drown the check's own output


class _QuietServer(http.server.ThreadingHTTPServer):
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
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.server = _QuietServer(("127.0.0.1", 0), handler)
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


def check_site(html_dir: Path, screenshot: Path | None = None,
               chromium: str | None = None, page: str = "") -> list[str]:
    """Verify that the published site renders offline; return a summary.

    Checks, in order: the HTML files load nothing from other hosts; Chromium,
    fed the site over localhost with the internet unreachable, ends up on
    asv's page rather than its "dependencies failed to load" page; every
    benchmark of ``index.json`` appears in the grid that asv's JavaScript
    builds (the static template contains none); flot drew plots (canvases);
    the benchmark list page was built and sorted (stupidtable ran); and the
    rendered DOM references no external resource.  ``page`` is an
    optional asv route (e.g. ``"#bench.time_x"``) used for the screenshot.
    Raises ``SiteError`` describing the first failure.
    """
    html_dir = Path(html_dir)
    index_json = html_dir / "index.json"
    if not index_json.is_file():
        raise SiteError(f"{index_json} not found: run `asv publish` first")
    names = sorted(json.loads(index_json.read_text())["benchmarks"])
    if not names:
        raise SiteError(f"{index_json} lists no benchmarks: nothing would render")

    for path in _html_files(html_dir):
        left = external_resources(parse_tags(path.read_text(encoding="utf-8")))
        if left:
            raise SiteError(
                f"{path.relative_to(html_dir)} loads {left[0]}: run `python -m impls.site vendor {html_dir}`"
            )

    exe = find_chromium(chromium)
    with serve_directory(html_dir) as server:
        dom = run_chromium(exe, server.url + "index.html")
        list_dom = run_chromium(exe, server.url + "index.html#/summarylist")
        if screenshot:
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            run_chromium(exe, server.url + "index.html" + page, screenshot=screenshot)

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

    summary = [f"rendered {len(names)} benchmarks, {canvases} plot canvases and the "
               "sorted benchmark list, no external resources"]
    if screenshot:
        summary.append(f"screenshot: {screenshot}")
    return summary


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """``python -m impls.site {vendor,check} HTML_DIR ...``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m impls.site", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p_vendor = sub.add_parser("vendor", help="replace CDN scripts/styles by local copies")
    p_vendor.add_argument("html_dir", type=Path)
    p_vendor.add_argument("--cache", type=Path, default=DEFAULT_CACHE_DIR,
                          help=f"where registry tarballs are kept (default: {DEFAULT_CACHE_DIR})")

    p_check = sub.add_parser("check", help="render the site in headless chromium and verify it")
    p_check.add_argument("html_dir", type=Path)
    p_check.add_argument("--screenshot", type=Path, help="also save a PNG of the page")
    p_check.add_argument("--page", default="", help="asv route for the screenshot, e.g. '#mod.time_x'")
    p_check.add_argument("--chromium", help="browser binary (default: $CHROMIUM or chromium on PATH)")

    args = parser.parse_args(argv)
    try:
        if args.command == "vendor":
            paths = vendor_offline(args.html_dir, args.cache)
            if not paths:
                print(f"{args.html_dir}: no CDN links found, nothing to vendor")
            notes = set()
            for path in paths:
                asset = next(a for a in CDN_ASSETS.values() if a.local_path == path)
                print(f"vendored {path} <- npm {asset.package} "
                      f"({'same bytes as the CDN' if asset.exact else 'substitute, see below'})")
                if not asset.exact:
                    notes.add(f"note: {asset.package}: {asset.note}")
            for note in sorted(notes):
                print(note)
        else:
            for line in check_site(args.html_dir, args.screenshot, args.chromium, args.page):
                print(f"site ok: {line}")
    except SiteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
